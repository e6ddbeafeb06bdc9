"""The dead-letter store as the API shows it: listing rejected events and idempotency conflicts
(AIP-158 pages) and replaying one once the cause of its rejection is fixed; and forgetting an
erased person's."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime

from google.rpc import status_pb2

from ingest.ingestor import Ingestor
from ingest.store import IngestStore, StoredRejection, StoreError
from sendtime.ingest.v1 import ingest_pb2
from sendtime.profile.v1 import profile_pb2
from sendtime_common.event_log import RetryLater
from sendtime_common.paging import decode_time_position, encode_time_position

log = logging.getLogger(__name__)

NAME_PREFIX = "rejectedEvents/"


class InvalidName(ValueError):
    """Not a ``rejectedEvents/{id}`` name."""


class AlreadyReplayed(Exception):
    """The dead letter was replayed before; it is kept for the record only."""


def parse_name(name: str) -> int:
    """The id in ``rejectedEvents/{id}``.

    Raises:
        InvalidName: the name has another shape.
    """
    suffix = name.removeprefix(NAME_PREFIX)
    if suffix == name or not suffix.isdigit():
        raise InvalidName(f"must look like {NAME_PREFIX}123")
    return int(suffix)


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
    return proto


class DeadLetters:
    def __init__(self, store: IngestStore, ingestor: Ingestor) -> None:
        self._store = store
        self._ingestor = ingestor

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
    ) -> tuple[ingest_pb2.EventResult, ingest_pb2.RejectedEvent] | None:
        """Ingest the dead letter (or its correction) again; None when there is no such one.

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
        event = stored_event
        if corrected is not None:
            event = ingest_pb2.Event()
            event.CopyFrom(corrected)
            event.event_id = event.event_id or stored_event.event_id
        (result,) = await self._ingestor.ingest_batch([event], dead_letter=False)
        updated = rejection  # RETRY: nothing changes
        # Either update finds nothing if the purge took the dead letter meanwhile (its retention
        # ran out): the answer still says what the replay did.
        if result.outcome in (ingest_pb2.EVENT_OUTCOME_ACCEPTED, ingest_pb2.EVENT_OUTCOME_DUPLICATE):
            replayed_at = datetime.now().astimezone()
            updated = await self._store.update_rejection(
                rejection_id, status=None, replayed_at=replayed_at
            ) or replace(rejection, replayed_at=replayed_at)
        elif result.outcome in (ingest_pb2.EVENT_OUTCOME_REJECTED, ingest_pb2.EVENT_OUTCOME_CONFLICT):
            status = result.status.SerializeToString()
            updated = await self._store.update_rejection(
                rejection_id, status=status, replayed_at=None
            ) or replace(rejection, status=status)
        return result, to_proto(updated)

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
