"""What ingest adds to an event's envelope before validating it: an id when the sender gave
none, the receive time and the clock-skew correction, and the business key that makes a fact
count once. Pure functions."""

from __future__ import annotations

import functools
import hashlib
from datetime import datetime

from google.protobuf import timestamp_pb2

from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.event_integrity import DERIVED_ID_PREFIX
from sendtime_common.identifiers import InvalidIdentifier, identifiers_of
from sendtime_common.storable import (
    NANOS_PER_SECOND,
    TIMESTAMP_MAX_SECONDS,
    TIMESTAMP_MIN_SECONDS,
    valid_timestamp,
)

BusinessKey = tuple[str, str]  # (kind, value), e.g. ("order", "1001")


def event_type(event: ingest_pb2.Event) -> str:
    """The payload case (``cart_item_added``), or ``custom.<name>`` for custom events."""
    payload = event.WhichOneof("payload") or ""
    return f"custom.{event.custom.name}" if payload == "custom" else payload


def derive_event_id(event: ingest_pb2.Event) -> str:
    """A deterministic id from what makes the event this fact: source, identifiers, type, the
    sender's occurred_at and the payload. A sender that resends the same fact without an id
    produces the same id, so the resend is a duplicate."""
    digest = hashlib.sha256()
    try:
        identifiers = sorted(identifiers_of(event.customer).items())
    except InvalidIdentifier:  # rejected by validation anyway; any stable value will do
        identifiers = []
    payload_field = event.WhichOneof("payload")
    payload = getattr(event, payload_field).SerializeToString(deterministic=True) if payload_field else b""
    for part in (
        str(event.source).encode(),
        repr(identifiers).encode(),
        event_type(event).encode(),
        f"{event.occurred_at.seconds}.{event.occurred_at.nanos}".encode(),
        payload,
    ):
        digest.update(len(part).to_bytes(4, "big"))  # length-prefixed: no two splits collide
        digest.update(part)
    return DERIVED_ID_PREFIX + digest.hexdigest()[:40]


def stamp(event: ingest_pb2.Event, received_at: datetime) -> ingest_pb2.Event:
    """A copy with an id, ``received_at``, and ``occurred_at`` corrected for the sender's clock.

    With ``sent_at``, the sender's clock is off by ``received_at − sent_at`` (network time is
    negligible next to skewed clocks), so ``occurred_at`` moves by as much — as analytics
    pipelines do. The sender's value stays in ``original_occurred_at``.
    """
    stamped = ingest_pb2.Event()
    stamped.CopyFrom(event)
    stamped.ClearField("original_occurred_at")  # output only: never taken from the caller
    if not stamped.event_id:
        stamped.event_id = derive_event_id(event)
    stamped.received_at.CopyFrom(_timestamp(received_at))
    if event.HasField("occurred_at"):
        stamped.original_occurred_at.CopyFrom(event.occurred_at)
        # Invalid times are left as sent, for validation to name.
        readable = valid_timestamp(event.occurred_at) and valid_timestamp(event.sent_at)
        if event.HasField("sent_at") and readable:
            skew_ns = _nanos(stamped.received_at) - _nanos(event.sent_at)
            corrected = _nanos(event.occurred_at) + skew_ns
            # A sent_at centuries off moves occurred_at out of Timestamp's range: kept at its edge,
            # which validation refuses as too old or in the future, as the corrected time is.
            stamped.occurred_at.FromNanoseconds(min(max(corrected, _MIN_NANOS), _MAX_NANOS))
    return stamped


@functools.lru_cache(maxsize=4)
def _timestamp(at: datetime) -> timestamp_pb2.Timestamp:
    """``at`` as a Timestamp, converted once for a batch's events (all received at one time);
    only ever copied from."""
    converted = timestamp_pb2.Timestamp()
    converted.FromDatetime(at)
    return converted


def _nanos(ts: timestamp_pb2.Timestamp) -> int:
    return int(ts.ToNanoseconds())


_MIN_NANOS = TIMESTAMP_MIN_SECONDS * NANOS_PER_SECOND
_MAX_NANOS = TIMESTAMP_MAX_SECONDS * NANOS_PER_SECOND


def business_key(event: ingest_pb2.Event) -> BusinessKey | None:
    """The fact an event records that must count once, whatever the event's id: an order
    placed, an order cancelled, a refund."""
    payload = event.WhichOneof("payload")
    if payload == "order_completed" and event.order_completed.order_id:
        return ("order_completed", event.order_completed.order_id)
    if payload == "order_cancelled" and event.order_cancelled.order_id:
        return ("order_cancelled", event.order_cancelled.order_id)
    if payload == "order_refunded" and event.order_refunded.refund_id:
        return ("order_refunded", event.order_refunded.refund_id)
    return None
