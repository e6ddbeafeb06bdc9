"""What an erasure leaves to do once it has committed, kept in outboxes written in the
erasure's transaction:

- the erasure notice (``erasure_notice_outbox``) goes to the event log, where render (and any
  service keeping copies of profiles) hears it and drops its copies;
- the person's raw events are erased from the event log itself (``log_erasure_outbox``: their
  positions, and those of late events of erased people the merger dropped), so they do not wait
  there for the stream's max age.

Woken by each erasure, and every ``retry_after_s`` anyway: work the log could not take (NATS
down) stays in its outbox until it can. Replicas may do the same work twice; the log's
duplicate window drops most repeated notices, dropping a copy twice is harmless, and erasing a
message already gone counts as done.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from sendtime.profile.v1 import profile_pb2
from sendtime_common.event_log import EventLog, EventLogUnavailable

log = logging.getLogger(__name__)

PUBLISH_BATCH = 100
ERASE_BATCH = 1000


class ErasureOutbox:
    def __init__(self, pool: asyncpg.Pool, event_log: EventLog, *, retry_after_s: float = 5.0) -> None:
        self._pool = pool
        self._event_log = event_log
        self._retry_after_s = retry_after_s
        self._wake = asyncio.Event()
        self._stopping = False

    def wake(self) -> None:
        """An erasure committed: do its work now rather than at the next retry."""
        self._wake.set()

    async def publish_notices(self) -> int:
        """Publish the oldest notices waiting (up to a batch) and take them out of the outbox;
        how many.

        Raises:
            EventLogUnavailable: the log did not take one; it and the rest of the batch stay.
            OSError, asyncpg.PostgresError: PostgreSQL failed.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT id, identifier_hashes, erased_at, customer_id FROM erasure_notice_outbox"
                " ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",  # replicas share the work
                PUBLISH_BATCH,
            )
            for row in rows:
                notice = profile_pb2.ErasureNotice(
                    identifier_hashes=row["identifier_hashes"], customer_id=row["customer_id"]
                )
                notice.erase_time.FromDatetime(row["erased_at"])
                await self._event_log.publish_erasure(f"erasure-{row['id']}", notice.SerializeToString())
            await conn.execute(
                "DELETE FROM erasure_notice_outbox WHERE id = ANY($1::bigint[])", [r["id"] for r in rows]
            )
        return len(rows)

    async def erase_from_log(self) -> int:
        """Erase the oldest waiting events from the event log (up to a batch) and take them out
        of the outbox; how many.

        Raises:
            EventLogUnavailable: the log did not confirm them all; the batch stays.
            OSError, asyncpg.PostgresError: PostgreSQL failed.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            positions = [
                row["log_position"]
                for row in await conn.fetch(
                    "SELECT log_position FROM log_erasure_outbox ORDER BY added_at LIMIT $1"
                    " FOR UPDATE SKIP LOCKED",  # replicas share the work
                    ERASE_BATCH,
                )
            ]
            await self._event_log.erase(positions)
            await conn.execute(
                "DELETE FROM log_erasure_outbox WHERE log_position = ANY($1::bigint[])", positions
            )
        if positions:
            log.info("erased events from the event log", extra={"events": len(positions)})
        return len(positions)

    async def run(self) -> None:
        """Do what the outboxes hold whenever woken or every ``retry_after_s``, until ``stop``."""
        while not self._stopping:
            self._wake.clear()
            try:
                while await self.publish_notices() == PUBLISH_BATCH:
                    pass
            except (EventLogUnavailable, OSError, asyncpg.PostgresError) as exc:
                log.warning("erasure notices not published yet; retrying", extra={"error": str(exc)})
            try:
                while await self.erase_from_log() == ERASE_BATCH:
                    pass
            except (EventLogUnavailable, OSError, asyncpg.PostgresError) as exc:
                log.warning("events not yet erased from the event log; retrying", extra={"error": str(exc)})
            try:
                await asyncio.wait_for(self._wake.wait(), self._retry_after_s)
            except TimeoutError:
                pass

    def stop(self) -> None:
        """End ``run`` after its current round."""
        self._stopping = True
        self._wake.set()
