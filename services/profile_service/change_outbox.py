"""Profile change notices: each event the merger merged, announced on the event log's profile
change stream as a ``sendtime.profile.v1.ProfileChange`` once its merge has committed, for the
services that act on what profiles hold (triggers). docs/profiles.md#profile-change-notices.

The merge's own transaction writes a row per merged event into ``profile_change_outbox``
(``merge_transaction``); this relay publishes the rows and deletes them once the log has them:

- never before the commit: a row exists only once its merge committed;
- at least once: a row is deleted only after the log confirmed it, so a crash, NATS down or a
  failed delete leaves it to publish again under the same change id (the stream's message id),
  which the stream's duplicate window (``NATS_DUPLICATE_WINDOW_SECONDS``, 2 minutes) stores
  once; a resend later than that is stored twice, and consumers drop it by change id;
- in commit order per customer: one customer's rows have increasing ids in commit order (its
  merges serialize on its locks), rows go out oldest id first, one round at a time across
  replicas (a transaction-scoped advisory lock, tried: a replica whose relay finds another's at
  work tries again RELAY_BUSY_RETRY_S later rather than hold a connection in a lock wait,
  ``make bench-scale``), each round as one atomic batch where the log
  takes them (stored whole or not at all), and only the confirmed prefix of a round is deleted:
  what follows a change the log did not confirm goes again after it.

Woken after each merged batch, and every ``retry_after_s`` anyway (other replicas' merges,
work NATS did not take). NATS down: the rows wait, and go out in order once it is back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import asyncpg

from sendtime.profile.v1 import profile_pb2
from sendtime_common.database import STORE_ERRORS
from sendtime_common.event_log import EventLog, EventLogUnavailable, OutgoingMessage, PublishReceipt

log = logging.getLogger(__name__)

PUBLISH_BATCH = 500
# One relay round at a time across replicas (pg_advisory_xact_lock's two-key space; the
# migration runner's namespace is another).
RELAY_LOCK = (0x50C4, 1)
RELAY_BUSY_RETRY_S = 0.05  # another replica's round takes a publish round trip or two
NO_EVENT_KEY = "customer_merged"  # the subject of a change without an event
# PostgreSQL failing: asyncpg raises InterfaceError, not a PostgresError, for a connection lost
# in the middle of a round.
DatabaseError = STORE_ERRORS


def change_id(sequence: int, customer_id: str) -> str:
    """A change's id: its sequence, and its customer so that another database publishing on the
    same stream (or a restored one) cannot reuse one inside the duplicate window."""
    return f"{sequence}-{customer_id}"


def change_message(row: Any) -> OutgoingMessage:
    """A row read by ``_READ`` as the stream's message."""
    change = profile_pb2.ProfileChange(
        change_id=change_id(row["id"], row["customer_id"]),
        sequence=row["id"],
        customer_id=row["customer_id"],
        profile_version=row["profile_version"],
        merged_customer_ids=row["merged_customer_ids"],
        log_position=row["log_position"] or 0,
    )
    # From microseconds: FromDatetime of an aware datetime took a third of the relay's time.
    change.merge_time.FromMicroseconds(row["merged_at_us"])
    if row["body"] is not None:
        change.event.ParseFromString(row["body"])
    return OutgoingMessage(
        key=row["event_type"] or NO_EVENT_KEY, message_id=change.change_id, payload=change.SerializeToString()
    )


# The oldest changes with their events (kept with them); ids as text and the time in
# microseconds, which cost less to decode and encode again than uuid and datetime objects. FOR
# UPDATE: an erasure deleting some of them waits until they are out (and then leaves the stream
# with its max age).
_READ = (
    "SELECT id, customer_id::text, event_id, profile_version,"
    " merged_customer_ids::text[], (extract(epoch FROM merged_at) * 1000000)::bigint AS merged_at_us,"
    " event_type, body, log_position"
    " FROM profile_change_outbox ORDER BY id LIMIT $1 FOR UPDATE"
)


class ProfileChangeOutbox:
    def __init__(self, pool: asyncpg.Pool, event_log: EventLog, *, retry_after_s: float = 1.0) -> None:
        self._pool = pool
        self._event_log = event_log
        self._retry_after_s = retry_after_s
        self._wake = asyncio.Event()
        self._stopping = False

    def wake(self) -> None:
        """A merge committed: publish its changes now rather than at the next retry."""
        self._wake.set()

    async def publish_changes(self) -> int | None:
        """Publish the oldest changes waiting (up to a batch), in order, and take the ones the
        log confirmed (a prefix) out of the outbox; how many were taken out, or None when
        another replica's relay is at work (its round publishes the oldest, whoever merged them).

        Raises:
            EventLogUnavailable: the log did not confirm a change; it and the ones after it stay
                (the confirmed ones before it are taken out).
            OSError, asyncpg.PostgresError, asyncpg.InterfaceError: PostgreSQL failed; the changes
                not yet taken out stay (ones already published go again).
        """
        async with self._pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1, $2)", *RELAY_LOCK):
                return None
            rows = await conn.fetch(_READ, PUBLISH_BATCH)
            if not rows:
                return 0
            # An event gone with its row still here cannot happen (an erasure deletes both in one
            # transaction); such a row would be taken out unpublished, not sent without its event.
            sendable = [r for r in rows if r["event_id"] is None or r["body"] is not None]
            outcomes = await self._event_log.publish_profile_changes([change_message(r) for r in sendable])
            confirmed = _confirmed_prefix(outcomes)
            done = [r["id"] for r in sendable[: len(confirmed)]]
            if len(confirmed) == len(sendable):
                done += [r["id"] for r in rows if r["event_id"] is not None and r["body"] is None]
            # By id, never "up to an id": a row with a smaller id whose merge committed after this
            # read has not been published.
            await conn.execute("DELETE FROM profile_change_outbox WHERE id = ANY($1::bigint[])", done)
        if len(confirmed) < len(outcomes):
            refused = outcomes[len(confirmed)]
            raise refused if isinstance(refused, EventLogUnavailable) else EventLogUnavailable(str(refused))
        return len(done)

    async def run(self) -> None:
        """Publish what the outbox holds whenever woken or every ``retry_after_s``; once more
        after ``stop``, then end."""
        while True:
            self._wake.clear()
            stopping = self._stopping
            published: int | None = 0
            try:
                while (published := await self.publish_changes()) == PUBLISH_BATCH:
                    pass
            except (EventLogUnavailable, *DatabaseError) as exc:
                log.warning("profile changes not published yet; retrying", extra={"error": str(exc)})
            except Exception:  # noqa: BLE001 - the relay must outlive a bug; the rows wait for it
                log.exception("profile changes not published; retrying")
            if published is None:  # another replica's round: this one's rows may be after it
                await asyncio.sleep(RELAY_BUSY_RETRY_S)
                continue
            if stopping:
                return
            try:
                await asyncio.wait_for(self._wake.wait(), self._retry_after_s)
            except TimeoutError:
                pass

    def stop(self) -> None:
        """End ``run`` after one more round (for the changes of the last merges)."""
        self._stopping = True
        self._wake.set()


def _confirmed_prefix(outcomes: Sequence[object]) -> list[PublishReceipt]:
    """The receipts up to the first outcome that is not one: what may be taken out while
    keeping the order (a change after an unconfirmed one goes again after it)."""
    confirmed: list[PublishReceipt] = []
    for outcome in outcomes:
        if not isinstance(outcome, PublishReceipt):
            break
        confirmed.append(outcome)
    return confirmed
