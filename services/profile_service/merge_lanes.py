"""Which lanes of the event stream this process merges: each lane by one process at a time.

The event stream has ``NATS_EVENT_PARTITIONS`` partitions (ingest picks an event's from its
customer's routing key), and one more lane, for events published without a partition (a stream
of one partition, or events stored before it had more). Each lane has a durable consumer of its
own (``sendtime_common.event_log.partition_consumer``) and is merged by exactly one profile
process at a time, so replicas never fetch the same customers' events, and a lane's events merge
in the log's order.

Ownership lives in PostgreSQL, which every profile process already needs, as session advisory
locks on one connection of the process's own (not the pool's):

- a process joins by taking a *member* lock under a random id, on a connection named after the
  consumer and the stream (``application_name``); the members are the holders of member locks
  on connections of that name (``pg_locks`` with ``pg_stat_activity``), so processes reading
  another stream, or through other consumers, share no lanes with these;
- every ``REBALANCE_EVERY_S`` it deals the lanes round the members in id order (``share``),
  takes the lock of each lane of its share that is free and starts merging it, and lets go of
  each lane outside its share: it finishes the batch in hand, acks it, then unlocks;
- a process that dies loses its connection and PostgreSQL drops its locks at once; the others
  take its lanes within a round, and what it had fetched but not acked is redelivered to them
  after the consumer's ack wait.

Ownership is for speed, not for correctness: any process may merge any event, twice or out of
order, and the profile comes out the same (the event id makes a second merge a no-op; the
identifiers' transaction locks keep one customer's merges serial; a late event replays its
customer's history). So while PostgreSQL is away (the lock connection lost) a process keeps
merging the lanes it has, which hold their batches until PostgreSQL is back anyway, and takes
their locks again once it can; a lane another process took meanwhile is let go.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from profile_service.merger import EventMerger
from profile_service.metrics import MERGE_LANES_OWNED
from sendtime_common.database import STORE_ERRORS
from sendtime_common.event_log import UNPARTITIONED, EventLogSubscription

log = logging.getLogger(__name__)

REBALANCE_EVERY_S = 1.0
# A round's statements on the lock connection: past this, the connection counts as lost (its
# locks may be gone with it) rather than holding the round up.
STATEMENT_TIMEOUT_S = 5.0
# Advisory lock namespaces (the first of two int4 keys; the second: a member's id, or the hash of
# the lane's consumer). The merge's own transaction locks use the one-bigint form, another space.
MEMBER_LOCKS = 0x4D454D42  # "MEMB"
LANE_LOCKS = 0x4C414E45  # "LANE"
APPLICATION_NAME = "sendtime-merge-lanes:{group}"  # PostgreSQL keeps 63 bytes of it

_MEMBERS = """
SELECT l.objid::bigint AS member FROM pg_locks AS l JOIN pg_stat_activity AS a USING (pid)
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.classid = $1::bigint::oid
  AND a.application_name = $2
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY 1
"""
_LANE_HOLDERS = """
SELECT pid, count(*) AS lanes FROM pg_locks
WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid = $1::bigint::oid
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
GROUP BY pid
"""


def lanes_of(partitions: int) -> list[int]:
    """The lanes of a stream of ``partitions`` partitions: the unpartitioned one, and one per
    partition where there are more than one."""
    return [UNPARTITIONED, *range(partitions)] if partitions > 1 else [UNPARTITIONED]


def share(lanes: Sequence[int], members: Sequence[int], member: int) -> frozenset[int]:
    """``member``'s lanes when ``lanes`` are dealt round ``members`` in order: every process
    computes the same split from the same membership, and each lane has one owner."""
    ordered = sorted(set(members) | {member})
    me = ordered.index(member)
    return frozenset(lane for i, lane in enumerate(sorted(lanes)) if i % len(ordered) == me)


async def lane_holders(connection: asyncpg.Connection) -> dict[int, int]:
    """Who merges lanes in this database now: each holding session's backend pid, and how many
    lanes it holds (every group's; ``pg_stat_activity`` names a pid's replica)."""
    return {row["pid"]: row["lanes"] for row in await connection.fetch(_LANE_HOLDERS, LANE_LOCKS)}


@dataclass(eq=False)
class _Running:
    """A lane being merged: its task, and the signal that lets it go."""

    until: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


Subscribe = Callable[[int], Awaitable[EventLogSubscription]]
Connect = Callable[[str], Awaitable[asyncpg.Connection]]  # with this application_name
Watch = Callable[[int], Coroutine[Any, Any, None]]


class MergeLanes:
    def __init__(
        self,
        merger: EventMerger,
        group: str,
        lanes: Sequence[int],
        subscribe: Subscribe,
        connect: Connect,
        *,
        watch: Watch | None = None,
        rebalance_every_s: float = REBALANCE_EVERY_S,
    ) -> None:
        """``group``: names the processes sharing these lanes (the durable consumers' base name
        and the stream's id, ``JetStreamEventLog.event_stream_id``); ``subscribe(lane)``: the
        subscription a lane is merged from (its durable consumer's); ``connect(application_name)``:
        a PostgreSQL connection of the lanes' own; ``watch(lane)``: what runs beside a lane while
        this process owns it (its backlog's gauges), cancelled after."""
        self._merger = merger
        self._group = group
        self._application_name = APPLICATION_NAME.format(group=group)[:63]
        self._lanes = list(lanes)
        self._subscribe = subscribe
        self._connect = connect
        self._watch = watch
        self._every_s = rebalance_every_s
        self._connection: asyncpg.Connection | None = None
        self._member = 0
        self._locked: set[int] = set()  # lanes whose lock this process's connection holds
        self._running: dict[int, _Running] = {}
        self._watching: dict[int, asyncio.Task[None]] = {}
        self._lost_logged = False

    @property
    def owned(self) -> frozenset[int]:
        """The lanes this process merges now."""
        return frozenset(self._running)

    async def run(self) -> None:
        """Take and let go of lanes every round until ``stop`` (or the merger's); then let go of
        all, finishing the batches in hand."""
        try:
            while not self._merger.stopping:
                try:
                    await self._rebalance()
                    if self._lost_logged:
                        log.info("merge lanes: PostgreSQL answers again", extra={"owned": sorted(self.owned)})
                        self._lost_logged = False
                except STORE_ERRORS as exc:
                    await self._lost(exc)
                except Exception:  # noqa: BLE001 - a lane not taken this round is tried again next
                    log.exception("merge lanes: a round failed; trying again at the next")
                try:
                    async with asyncio.timeout(self._every_s):
                        await self._merger.wait_stopping()
                except TimeoutError:
                    pass
        finally:
            await self._let_go(list(self._running))
            await self._close_connection()

    def stop(self) -> None:
        """The merger's stop: the lanes are let go once their batches in hand are merged."""
        self._merger.stop()

    async def _rebalance(self) -> None:
        before = self.owned
        if self._connection is None or self._connection.is_closed():
            await self._join()
        assert self._connection is not None
        rows = await self._connection.fetch(
            _MEMBERS, MEMBER_LOCKS, self._application_name, timeout=STATEMENT_TIMEOUT_S
        )
        members = [row["member"] for row in rows]
        mine = share(self._lanes, members, self._member)
        await self._let_go(self._running.keys() - mine)
        for lane in sorted(mine - self._running.keys()):
            if await self._try_lock(lane):
                await self._start(lane)
        if self.owned != before:
            log.info(
                "merge lanes rebalanced",
                extra={"members": len(set(members)), "owned": sorted(self.owned), "lanes": len(self._lanes)},
            )

    async def _join(self) -> None:
        """A fresh connection and member lock. Lanes still merging from before a lost connection
        are locked again, or let go where another process took them meanwhile."""
        await self._close_connection()
        self._connection = await self._connect(self._application_name)
        self._locked.clear()
        while True:
            candidate = random.randrange(1, 2**31)
            joined = await self._connection.fetchval(
                "SELECT pg_try_advisory_lock($1, $2)", MEMBER_LOCKS, candidate, timeout=STATEMENT_TIMEOUT_S
            )
            if joined:
                self._member = candidate
                break
        for lane in list(self._running):
            if not await self._try_lock(lane):
                log.warning(
                    "merge lanes: another replica took a lane while PostgreSQL was away", extra={"lane": lane}
                )
                await self._let_go([lane])

    async def _try_lock(self, lane: int) -> bool:
        assert self._connection is not None
        taken = bool(
            await self._connection.fetchval(
                "SELECT pg_try_advisory_lock($1, hashtext($2))",
                LANE_LOCKS,
                self._lane_name(lane),
                timeout=STATEMENT_TIMEOUT_S,
            )
        )
        if taken:
            self._locked.add(lane)
        return taken

    def _lane_name(self, lane: int) -> str:
        return f"{self._group}:{lane}"

    async def _start(self, lane: int) -> None:
        try:
            subscription = await self._subscribe(lane)
        except Exception:
            await self._unlock(lane)
            raise
        running = _Running()
        running.task = asyncio.create_task(
            self._merger.merge_from([subscription], running.until), name=f"merge-lane-{lane}"
        )
        self._running[lane] = running
        if self._watch is not None:
            self._watching[lane] = asyncio.create_task(self._watch(lane), name=f"merge-lane-{lane}-backlog")
        MERGE_LANES_OWNED.set(len(self._running))

    async def _let_go(self, lanes: Iterable[int]) -> None:
        """Finish the lanes' batches in hand (acked), all at once, then unlock them for their
        next owners (one by one: a connection runs one statement at a time)."""
        lanes = list(lanes)
        await asyncio.gather(*(self._finish(lane) for lane in lanes))
        for lane in lanes:
            await self._unlock(lane)

    async def _finish(self, lane: int) -> None:
        running = self._running[lane]
        running.until.set()
        assert running.task is not None
        try:
            await running.task
        except Exception:  # noqa: BLE001 - a lane's crash must not stop the others' handover
            log.exception("a merge lane failed", extra={"lane": lane})
        watching = self._watching.pop(lane, None)
        if watching is not None:
            watching.cancel()
        del self._running[lane]
        MERGE_LANES_OWNED.set(len(self._running))

    async def _unlock(self, lane: int) -> None:
        if lane not in self._locked:
            return
        self._locked.discard(lane)
        connection = self._connection
        if connection is None or connection.is_closed():
            return
        try:
            await connection.execute(
                "SELECT pg_advisory_unlock($1, hashtext($2))",
                LANE_LOCKS,
                self._lane_name(lane),
                timeout=STATEMENT_TIMEOUT_S,
            )
        except STORE_ERRORS as exc:  # gone with the connection anyway
            log.warning("merge lanes: could not unlock a lane", extra={"lane": lane, "error": str(exc)})

    async def _lost(self, exc: BaseException) -> None:
        """The lock connection failed: its locks are gone. Merging goes on (module docstring)."""
        if not self._lost_logged:
            log.warning(
                "merge lanes: PostgreSQL unreachable; merging the lanes held until it answers again",
                extra={"owned": sorted(self.owned), "error": f"{type(exc).__name__}: {exc}"},
            )
            self._lost_logged = True
        await self._close_connection()

    async def _close_connection(self) -> None:
        connection, self._connection = self._connection, None
        self._locked.clear()
        if connection is not None and not connection.is_closed():
            try:
                await asyncio.wait_for(connection.close(), timeout=1.0)
            except (*STORE_ERRORS, TimeoutError):
                connection.terminate()
