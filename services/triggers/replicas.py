"""Which replicas are alive, and handing back at once what a dead one held.

Claims of due episodes and delivery leases name their holder (``owner``) and end by
themselves: a claim after 60 s, a delivery lease a minute past its next attempt. Long, because
a live replica must not lose them in the middle of a slow fire or attempt; too long to wait when
the holder was killed. So every replica also writes a heartbeat (``triggers_replicas``: its
owner, alive until PostgreSQL's clock plus ``ttl``) every ``interval``, and takes over from the
replicas whose heartbeat lapsed: their claimed episodes are due again now (and their version
moves on, so a late commit by the holder changes nothing) and their pending deliveries are let
go at their next attempt time, for any replica to take. A replica that stops cleanly hands its
own back the same way (``leave``).

Two guards:
- Liveness is judged by PostgreSQL's clock, one clock for all replicas.
- A replica takes over only once its own heartbeats have succeeded for a whole ``ttl``, each
  within half a ``ttl`` of the one before: after PostgreSQL was away (a restart), or all
  replicas were paused, every row looks lapsed, and the first replica back must not take from
  those that are alive but have not written theirs yet.

A replica taken over while alive (paused longer than ``ttl``) loses its claims, its commits fail
the version check, and it may attempt a delivery another replica attempts too, under the same
``webhook-id`` (receivers drop the second, as with a lapsed lease). A replica of an older
release writes no heartbeat and is never taken over: its leases end by themselves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

import asyncpg

from sendtime_common.errors import log_unexpected, new_error_id
from triggers.delivery_store import PENDING
from triggers.store import StoreError

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

DEFAULT_INTERVAL: Final = timedelta(seconds=1)
DEFAULT_TTL: Final = timedelta(seconds=5)


@dataclass(frozen=True, slots=True)
class TakenOver:
    """What was handed back from replicas no longer alive (or from one that left)."""

    replicas: tuple[str, ...] = ()
    episodes: int = 0
    deliveries: int = 0


_HAND_BACK = f"""
    , episodes AS (
        UPDATE triggers_episodes
        SET due_at = $1, claimed_by = NULL, claimed_at = NULL, version = version + 1, updated_at = now()
        WHERE claimed_by IN (SELECT owner FROM gone) AND state = 'waiting'
        RETURNING 1
    ), deliveries AS (
        UPDATE triggers_deliveries SET claimed_by = NULL, available_at = next_attempt_time
        WHERE claimed_by IN (SELECT owner FROM gone) AND state = {PENDING}
        RETURNING 1
    )
    SELECT ARRAY(SELECT owner FROM gone ORDER BY owner) AS replicas,
        (SELECT count(*) FROM episodes) AS episodes, (SELECT count(*) FROM deliveries) AS deliveries
"""


class ReplicaRegistry:
    """One replica's heartbeat, and its take-overs of the replicas that lapsed."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        owner: str,
        ttl: timedelta = DEFAULT_TTL,
        interval: timedelta = DEFAULT_INTERVAL,
    ) -> None:
        """``owner``: this replica's name in claims and leases (unique per process start);
        ``ttl``: how long after its last heartbeat a replica counts as dead; ``interval``: how
        often the heartbeat is written (well under ``ttl``)."""
        if interval * 2 > ttl:
            raise ValueError("the heartbeat interval must be at most half the ttl")
        self._pool = pool
        self.owner = owner
        self._ttl = ttl
        self._interval = interval
        self._healthy_since: float | None = None  # monotonic time of the first heartbeat of a streak
        self._last_beat = float("-inf")
        self._stopping = asyncio.Event()
        self.taken_over = 0  # replicas taken over by this one

    async def beat(self) -> None:
        """Write this replica's heartbeat: alive until PostgreSQL's now plus ``ttl``.

        Raises:
            triggers.store.StoreError: PostgreSQL failed (the streak starts again).
        """
        try:
            await self._pool.execute(
                "INSERT INTO triggers_replicas (owner, alive_until) VALUES ($1, clock_timestamp() + $2)"
                " ON CONFLICT (owner) DO UPDATE SET alive_until = excluded.alive_until",
                self.owner,
                self._ttl,
            )
        except StoreError:
            self._healthy_since = None
            raise
        now = time.monotonic()
        # A gap longer than half the ttl (this process paused, or its loop starved) ends the
        # streak too: the others may have been paused alike (a frozen VM) and not beaten yet.
        if self._healthy_since is None or now - self._last_beat > self._ttl.total_seconds() / 2:
            self._healthy_since = now
        self._last_beat = now

    @property
    def may_take_over(self) -> bool:
        """Whether this replica's heartbeats have succeeded for a whole ``ttl`` in a row."""
        return (
            self._healthy_since is not None
            and time.monotonic() - self._healthy_since >= self._ttl.total_seconds()
        )

    async def take_over(self, now: datetime) -> TakenOver:
        """Hand back what the replicas whose heartbeat lapsed held (never this one's: its own row
        may lapse while its heartbeat is late): their claimed episodes due at ``now``, their
        pending deliveries at their next attempt time. One statement: the lapsed rows are
        deleted by it, so two replicas never hand back the same one twice.

        Raises:
            triggers.store.StoreError: PostgreSQL failed.
        """
        row = await self._pool.fetchrow(
            "WITH gone AS (DELETE FROM triggers_replicas"
            " WHERE alive_until < clock_timestamp() AND owner <> $2 RETURNING owner)" + _HAND_BACK,
            now,
            self.owner,
        )
        return _taken_over(row)

    async def leave(self, now: datetime) -> TakenOver:
        """Stop counting as alive and hand back what this replica still holds (a clean stop,
        after its loops finished): claims due at ``now``, deliveries at their next attempt.

        Raises:
            triggers.store.StoreError: PostgreSQL failed (what it held ends with the leases).
        """
        self.stop()
        row = await self._pool.fetchrow(
            "WITH gone AS (SELECT $2::text AS owner), dropped AS ("
            " DELETE FROM triggers_replicas WHERE owner = $2)" + _HAND_BACK,
            now,
            self.owner,
        )
        return _taken_over(row)

    def stop(self) -> None:
        """End ``run`` (the heartbeat lapses by itself unless ``leave`` follows)."""
        self._stopping.set()

    async def run(self, clock: Clock) -> None:
        """Beat every ``interval`` and take over the lapsed replicas (once allowed) until
        ``stop``; PostgreSQL failures are logged and tried again next beat."""
        interval_s = self._interval.total_seconds()
        while not self._stopping.is_set():
            try:
                await self.beat()
                if self.may_take_over:
                    taken = await self.take_over(clock())
                    if taken.replicas:
                        self.taken_over += len(taken.replicas)
                        log.warning(
                            "took over from replicas whose heartbeat lapsed",
                            extra={
                                "replicas": len(taken.replicas),
                                "episodes": taken.episodes,
                                "deliveries": taken.deliveries,
                            },
                        )
            except StoreError as exc:
                log.warning("replica heartbeat failed; trying again", extra={"error": type(exc).__name__})
            except Exception as exc:  # noqa: BLE001 - a bug must not end the heartbeat
                log_unexpected(log, "replica heartbeat failed", exc, {"error_id": new_error_id()})
            try:
                async with asyncio.timeout(interval_s):
                    await self._stopping.wait()
            except TimeoutError:
                pass


def _taken_over(row: asyncpg.Record | None) -> TakenOver:
    if row is None:
        return TakenOver()
    return TakenOver(tuple(row["replicas"]), row["episodes"], row["deliveries"])
