"""The dead-letter store as the API shows it: listing rejected events and idempotency conflicts
(AIP-158 pages) and replaying one once the cause of its rejection is fixed; quarantining webhook
items that could not be mapped (kept as received, mapped again on replay); and forgetting an
erased person's."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime

from google.rpc import code_pb2, status_pb2

from ingest.ingestor import Ingestor
from ingest.store import IngestStore, Rejection, StoredRejection, StoreError
from ingest.webhook_mapping import (
    ITEM_REASONS,
    ItemOutcome,
    MappedItem,
    Provider,
    item_identifiers,
    map_item,
    quarantine_id,
)
from sendtime.ingest.v1 import ingest_pb2
from sendtime.profile.v1 import profile_pb2
from sendtime_common import json_input
from sendtime_common.errors import error_info_status, log_unexpected, new_error_id
from sendtime_common.event_integrity import identifier_hashes
from sendtime_common.event_log import RetryLater
from sendtime_common.identifiers import IdentifierHasher
from sendtime_common.paging import decode_time_position, encode_time_position
from sendtime_common.resource_names import InvalidName as InvalidName
from sendtime_common.resource_names import numeric_id

log = logging.getLogger(__name__)

NAME_PREFIX = "rejectedEvents/"
_STORED = (ingest_pb2.EVENT_OUTCOME_ACCEPTED, ingest_pb2.EVENT_OUTCOME_DUPLICATE)
_PROVIDERS = {
    Provider.SHOPIFY: (ingest_pb2.WEBHOOK_PROVIDER_SHOPIFY, ingest_pb2.EVENT_SOURCE_SERVER),
    Provider.SENDGRID: (ingest_pb2.WEBHOOK_PROVIDER_SENDGRID, ingest_pb2.EVENT_SOURCE_EMAIL),
}
_PROVIDER_OF = {proto: provider for provider, (proto, _) in _PROVIDERS.items()}
_ITEM_CODES = {
    ItemOutcome.UNKNOWN_TYPE: code_pb2.UNIMPLEMENTED,
    ItemOutcome.MALFORMED: code_pb2.INVALID_ARGUMENT,
    ItemOutcome.FAILED: code_pb2.INTERNAL,
}


class AlreadyReplayed(Exception):
    """The dead letter was replayed before; it is kept for the record only."""


def parse_name(name: str) -> int:
    """The id in ``rejectedEvents/{id}``.

    Raises:
        InvalidName: the name has another shape.
    """
    return numeric_id(name, NAME_PREFIX)


def to_proto(rejection: StoredRejection) -> ingest_pb2.RejectedEvent:
    proto = ingest_pb2.RejectedEvent(
        name=f"{NAME_PREFIX}{rejection.id}",
        event=ingest_pb2.Event.FromString(rejection.event),
        status=status_pb2.Status.FromString(rejection.status),
        state=(
            ingest_pb2.REJECTED_EVENT_STATE_REPLAYED
            if rejection.replayed_at
            else ingest_pb2.REJECTED_EVENT_STATE_PENDING
        ),
    )
    proto.reject_time.FromDatetime(rejection.rejected_at)
    if rejection.replayed_at:
        proto.replay_time.FromDatetime(rejection.replayed_at)
    if rejection.webhook_item is not None:
        proto.webhook_item.ParseFromString(rejection.webhook_item)
    return proto


def webhook_item_status(provider: Provider, item: MappedItem, error_id: str = "") -> status_pb2.Status:
    """Why an item was not mapped: an ErrorInfo with the item's reason, provider, type, index
    (and the error id of a mapping that failed, as logged)."""
    metadata = {"provider": str(provider), "type": item.type, "index": str(item.index)}
    if error_id:
        metadata["error_id"] = error_id
    return error_info_status(_ITEM_CODES[item.outcome], item.problem, ITEM_REASONS[item.outcome], metadata)


class DeadLetters:
    def __init__(self, store: IngestStore, ingestor: Ingestor, hasher: IdentifierHasher) -> None:
        """``hasher`` names a quarantined item's people, as the ingestor names a dead letter's."""
        self._store = store
        self._ingestor = ingestor
        self._hasher = hasher

    async def quarantine(
        self, provider: Provider, webhook_id: str, items: Sequence[tuple[MappedItem, str]]
    ) -> None:
        """Keep webhook items that could not be mapped, as received, each with why (and the
        error id logged for a mapping that failed, or ''). An item already kept (the provider
        redelivered it) is not kept twice.

        Raises:
            ingest.store.StoreError: PostgreSQL failed.
        """
        proto_provider, source = _PROVIDERS[provider]
        rejections = []
        for item, error_id in items:
            status = webhook_item_status(provider, item, error_id)
            event = ingest_pb2.Event(
                event_id=quarantine_id(provider, item.type, item.raw),
                source=source,
                customer=item_identifiers(provider, item.raw),
            )
            webhook_item = ingest_pb2.WebhookItem(
                provider=proto_provider,
                type=item.type,
                webhook_id=webhook_id[:128],
                index=item.index,
                json=json_input.dumps(item.raw),
            )
            rejections.append(
                Rejection(
                    event.event_id,
                    source,
                    event.SerializeToString(),
                    status.SerializeToString(),
                    identifier_hashes(event, self._hasher),
                    webhook_item.SerializeToString(),
                )
            )
        await self._store.add_webhook_items(rejections, datetime.now(UTC))

    async def list(
        self, *, page_size: int, page_token: str, state: int, source: int
    ) -> tuple[list[ingest_pb2.RejectedEvent], str]:
        """One page, newest first, and the token for the next ('' on the last page).

        Raises:
            sendtime_common.paging.InvalidPageToken: a token from another listing.
            ingest.store.StoreError: PostgreSQL failed.
        """
        filters = {"state": state, "source": source}
        after = decode_time_position(page_token, filters, int) if page_token else None
        replayed = (
            None
            if state == ingest_pb2.REJECTED_EVENT_STATE_UNSPECIFIED
            else (state == ingest_pb2.REJECTED_EVENT_STATE_REPLAYED)
        )
        rows = await self._store.list_rejections(
            limit=page_size + 1, after=after, replayed=replayed, source=source or None
        )
        page, more = rows[:page_size], len(rows) > page_size
        token = encode_time_position(page[-1].rejected_at, page[-1].id, filters) if more else ""
        return [to_proto(r) for r in page], token

    async def replay(
        self, rejection_id: int, corrected: ingest_pb2.Event | None
    ) -> tuple[ingest_pb2.EventResult | None, ingest_pb2.RejectedEvent] | None:
        """Ingest the dead letter (or its correction) again; None when there is no such one.
        A quarantined webhook item without a correction is mapped again first.

        Accepted (or already stored): the dead letter is marked replayed. Rejected again, or
        an idempotency conflict again: it stays pending with the new reasons. RETRY: nothing
        changes.

        Raises:
            AlreadyReplayed: it was replayed before.
            ingest.store.StoreError: PostgreSQL failed.
        """
        rejection = await self._store.get_rejection(rejection_id)
        if rejection is None:
            return None
        if rejection.replayed_at is not None:
            raise AlreadyReplayed(f"{NAME_PREFIX}{rejection_id} was replayed at {rejection.replayed_at}")
        stored_event = ingest_pb2.Event.FromString(rejection.event)
        if rejection.webhook_item is not None and corrected is None:
            return await self._replay_webhook_item(rejection, stored_event.event_id)
        event = stored_event
        if corrected is not None:
            event = ingest_pb2.Event()
            event.CopyFrom(corrected)
            event.event_id = event.event_id or stored_event.event_id
        (result,) = await self._ingestor.ingest_batch([event], dead_letter=False)
        return result, to_proto(await self._after_replay(rejection, result))

    async def _replay_webhook_item(
        self, rejection: StoredRejection, event_id: str
    ) -> tuple[ingest_pb2.EventResult | None, ingest_pb2.RejectedEvent]:
        """Map the item again, as a delivery now would, and ingest its events."""
        assert rejection.webhook_item is not None
        stored = ingest_pb2.WebhookItem.FromString(rejection.webhook_item)
        provider = _PROVIDER_OF[stored.provider]
        item = map_item(provider, stored.type, stored.webhook_id, json_input.parse_json(stored.json))
        item = replace(item, index=stored.index)
        if item.outcome in ITEM_REASONS:
            error_id = ""
            if item.error is not None:
                error_id = new_error_id()
                log_unexpected(
                    log,
                    "webhook item could not be mapped",
                    item.error,
                    {"error_id": error_id, "provider": str(provider), "dead_letter": rejection.id},
                )
            status = webhook_item_status(provider, item, error_id)
            result = ingest_pb2.EventResult(
                event_id=event_id, outcome=ingest_pb2.EVENT_OUTCOME_REJECTED, status=status
            )
            return result, to_proto(await self._after_replay(rejection, result))
        results = await self._ingestor.ingest_batch(item.events, dead_letter=False) if item.events else []
        # The one result to show: the first that did not store its event, else the first.
        shown = next((r for r in results if r.outcome not in _STORED), results[0] if results else None)
        return shown, to_proto(await self._after_replay(rejection, shown))

    async def _after_replay(
        self, rejection: StoredRejection, result: ingest_pb2.EventResult | None
    ) -> StoredRejection:
        """The dead letter marked replayed (stored, or nothing to store), or with the new
        reasons (rejected again); unchanged for RETRY."""
        # Either update finds nothing if the purge took the dead letter meanwhile (its retention
        # ran out): the answer still says what the replay did.
        if result is None or result.outcome in _STORED:
            replayed_at = datetime.now().astimezone()
            return await self._store.update_rejection(
                rejection.id, status=None, replayed_at=replayed_at
            ) or replace(rejection, replayed_at=replayed_at)
        if result.outcome in (ingest_pb2.EVENT_OUTCOME_REJECTED, ingest_pb2.EVENT_OUTCOME_CONFLICT):
            status = result.status.SerializeToString()
            return await self._store.update_rejection(
                rejection.id, status=status, replayed_at=None
            ) or replace(rejection, status=status)
        return rejection  # RETRY: nothing changes

    async def on_erasure_notice(self, payload: bytes) -> None:
        """Delete the dead letters of an erased person (a ``sendtime.profile.v1.ErasureNotice``).

        Raises:
            RetryLater: PostgreSQL failed (the follower hands the notice again).
        """
        notice = profile_pb2.ErasureNotice.FromString(payload)
        try:
            deleted = await self._store.delete_rejections_of(list(notice.identifier_hashes))
        except StoreError as exc:
            raise RetryLater("the dead letters could not be deleted") from exc
        if deleted:
            log.info("deleted an erased person's dead letters", extra={"count": deleted})
