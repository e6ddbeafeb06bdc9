"""What ingest and the profile merger both need to know of an event beyond its contract: whether
a second event under the same id is the same event (an idempotency conflict when not), and which
people a kept copy of an event names (so that erasing them deletes it).

Pure functions.
"""

from __future__ import annotations

import hashlib

from google.rpc import code_pb2, status_pb2

from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.errors import error_info_status
from sendtime_common.identifiers import (
    IdentifierHasher,
    IdentifierKind,
    InvalidIdentifier,
    normalize_identifier,
)

# Ids ingest derives from an event's content (ingest.envelope.derive_event_id).
DERIVED_ID_PREFIX = "auto-"
CONFLICT_REASON = "IDEMPOTENCY_CONFLICT"
FINGERPRINT_BYTES = 16


def fingerprint(event: ingest_pb2.Event) -> bytes | None:
    """What makes ``event`` this event, hashed (SHA-256, first 16 bytes), to tell a resend (the
    same fingerprint) from another event under the same id (an idempotency conflict).

    ``event`` as ingest stamped it (as the event log holds it). The fingerprint covers the event
    as its sender meant it, so the same event sent again later has the same one:
    ``occurred_at`` counts as sent (before the clock-skew correction, which depends on when it
    arrived); ``sent_at``, which a sender's retry sets anew, and what ingest stamps, do not.

    None for an id ingest derived from the content: the same id is the same fact by
    construction (and the fields left out of the derivation, such as ``context``, may differ).
    """
    if event.event_id.startswith(DERIVED_ID_PREFIX):
        return None
    meant = ingest_pb2.Event()
    meant.CopyFrom(event)
    if event.HasField("original_occurred_at"):
        meant.occurred_at.CopyFrom(event.original_occurred_at)
    # Set by ingest, or by the sender's transport rather than the event: a retry may differ.
    meant.ClearField("event_id")
    meant.ClearField("received_at")
    meant.ClearField("original_occurred_at")
    meant.ClearField("sent_at")
    return hashlib.sha256(meant.SerializeToString(deterministic=True)).digest()[:FINGERPRINT_BYTES]


def conflicts(a: bytes | None, b: bytes | None) -> bool:
    """Whether two fingerprints of events under one id say they are different events. An
    unknown one (a record from before fingerprints, a derived id) conflicts with nothing."""
    return a is not None and b is not None and a != b


def conflict_status(event_id: str) -> status_pb2.Status:
    """ALREADY_EXISTS with an ErrorInfo: ``event_id`` was stored before with another payload."""
    return error_info_status(
        code_pb2.ALREADY_EXISTS,
        "an event with this id was stored before with another payload (an idempotency conflict):"
        " send a new event under an id of its own",
        CONFLICT_REASON,
        {"event_id": event_id},
    )


def identifier_hashes(event: ingest_pb2.Event, hasher: IdentifierHasher) -> tuple[bytes, ...]:
    """The (current-key) hashes of the identifiers an event names (its customer's, and an alias's
    other), as an erasure notice names them: a kept copy of the event (a dead letter) is found by
    them when its person is erased. A value that does not normalize (often why the event was
    refused) is hashed as sent."""
    customers = [event.customer]
    if event.WhichOneof("payload") == "alias":
        customers.append(event.alias.other)
    hashes: dict[bytes, None] = {}
    for customer in customers:
        for kind in IdentifierKind:
            raw = getattr(customer, kind.value)
            if not raw:
                continue
            try:
                value = normalize_identifier(kind, raw)
            except InvalidIdentifier:
                value = raw
            hashes[hasher.hash((kind, value))] = None
    return tuple(hashes)
