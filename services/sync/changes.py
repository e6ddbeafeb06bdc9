"""The profile change stream, read for the push connectors: each change
(``sendtime.profile.v1.ProfileChange``) marks its customer pending for every push destination
(sync.push.PendingPushes), a batch of changes in one statement, then the batch is acknowledged.
The push runs (sync.pusher) read the marks; this reader never calls a provider, so a destination
that is away holds up nothing but its own marks, which wait in PostgreSQL (not in the stream,
which keeps changes only a day).

At least once: a batch is acknowledged only after its marks are stored; a batch whose marks
could not be stored (PostgreSQL away) is handed back to the log, backing off. Marking again is
harmless (the newest version and the oldest time are kept). One durable consumer
(``sync-changes``) serves every push connector: a replica takes a batch, the others the next.

A message that is not a ProfileChange is logged (its position and size, never its bytes),
discarded and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import UTC, datetime

from google.protobuf.message import DecodeError

from sendtime.profile.v1 import profile_pb2
from sendtime_common.database import STORE_ERRORS
from sendtime_common.errors import log_unexpected, new_error_id
from sendtime_common.event_log import Delivery, EventLog, EventLogSubscription
from sync import metrics
from sync.push import Change, PendingPushes

log = logging.getLogger(__name__)

DURABLE_NAME = "sync-changes"
BATCH_SIZE = 500
FETCH_TIMEOUT_S = 1.0
RETRY_BASE_S = 0.5
RETRY_MAX_S = 30.0


def change_of(message: profile_pb2.ProfileChange, stored_at_s: float | None) -> Change | None:
    """The mark a change makes (pure); None for one that names no customer."""
    if not message.customer_id:
        return None
    if message.HasField("merge_time"):
        changed_at = message.merge_time.ToDatetime(tzinfo=UTC)
    elif stored_at_s is not None:
        changed_at = datetime.fromtimestamp(stored_at_s, UTC)
    else:
        changed_at = datetime.now(UTC)
    return Change(message.customer_id, message.profile_version, changed_at)


class ChangeFollower:
    def __init__(
        self,
        event_log: EventLog,
        pending: PendingPushes,
        destinations: Sequence[str],
        *,
        durable_name: str = DURABLE_NAME,
    ) -> None:
        self._event_log = event_log
        self._pending = pending
        self._destinations = list(destinations)
        self._durable_name = durable_name
        self._subscription: EventLogSubscription | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="profile-changes")

    async def _subscribe(self) -> EventLogSubscription:
        """Subscribe, trying again while the stream is not there yet (the profile service makes
        it) or NATS is away."""
        delay_s = RETRY_BASE_S
        while True:
            try:
                return await self._event_log.subscribe_profile_changes(self._durable_name)
            except Exception as exc:  # noqa: BLE001 - NATS away or the stream not made yet
                log.warning("profile changes not readable yet", extra={"error": type(exc).__name__})
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, RETRY_MAX_S)

    async def _run(self) -> None:
        self._subscription = await self._subscribe()
        while True:
            try:
                batch = await self._subscription.fetch(BATCH_SIZE, FETCH_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - NATS away: the client reconnects; try again
                log.warning("profile changes could not be fetched", extra={"error": type(exc).__name__})
                await asyncio.sleep(RETRY_BASE_S)
                continue
            if not batch:
                continue
            try:
                await self.apply_batch(batch)
            except Exception as exc:  # noqa: BLE001 - a bug, or an ack lost: unacked, the batch comes back
                log_unexpected(log, "profile changes not marked", exc, {"error_id": new_error_id()})
                await asyncio.sleep(RETRY_BASE_S)

    async def apply_batch(self, batch: Sequence[Delivery]) -> None:
        """Mark the batch's customers, then acknowledge it; or hand it back to the log."""
        changes: list[Change] = []
        kept: list[Delivery] = []
        for delivery in batch:
            try:
                message = profile_pb2.ProfileChange.FromString(delivery.payload)
            except DecodeError:
                metrics.CHANGES.labels("undecodable").inc()
                log.error(
                    "undecodable profile change discarded",
                    extra={"position": delivery.position, "bytes": len(delivery.payload)},
                )
                await delivery.discard()
                continue
            change = change_of(message, delivery.stored_at_s)
            if change is not None:
                changes.append(change)
            kept.append(delivery)
        try:
            await self._pending.mark(self._destinations, changes)
        except STORE_ERRORS as exc:
            log.warning("profile changes will be marked again", extra={"error": type(exc).__name__})
            metrics.CHANGES.labels("retried").inc(len(kept))
            for delivery in kept:
                delay_s = min(RETRY_BASE_S * 2 ** max(delivery.attempt - 1, 0), RETRY_MAX_S)
                with contextlib.suppress(Exception):  # unacked, it comes back after the ack wait
                    await delivery.retry_later(delay_s)
            return
        for delivery in kept:
            await delivery.ack()
        metrics.CHANGES.labels("marked").inc(len(kept))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._subscription is not None:
            await self._subscription.close()
