"""Runs each pull connector when it is due, in one replica at a time.

Every ``poll_interval_s`` (or at once, when ``wake`` is called) a replica asks the store which
connectors are due, and starts a run of each it is not running already. A run first takes the
connector's PostgreSQL advisory lock on a connection of its own (``pg_try_advisory_lock``): if
another replica holds it, that replica is running it, and this one leaves it. The lock is the
session's, so a replica killed mid-run (kill -9, a node lost) lets go of it when its connection
ends, and the next replica to look runs the connector again from its stored cursor.

A run's own failures are in its report and its stored state (sync.runner); an error outside
them (the store away while taking the lock) is logged and the connector is looked at again at
the next poll. At most ``max_runs`` run at once in a replica (each holds a pooled connection for
its lock); the others wait for a free slot, due all the while.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from functools import partial

import asyncpg

from sendtime_common.database import STORE_ERRORS
from sync.runner import RunReport
from sync.store import ConnectorStore

log = logging.getLogger(__name__)

_LOCK_NAMESPACE = 0x53594E43  # "SYNC": with the connector id's hash, one lock per connector

Run = Callable[[], Awaitable[RunReport]]


class Scheduler:
    def __init__(
        self,
        pool: asyncpg.Pool,
        store: ConnectorStore,
        runs: Mapping[str, Run],
        *,
        poll_interval_s: float = 1.0,
        max_runs: int = 4,
    ) -> None:
        self._pool = pool
        self._store = store
        self._runs = dict(runs)
        self._poll_interval_s = poll_interval_s
        # A run holds a pooled connection (its lock's) and uses others: fewer runs than the pool
        # has connections, or they would wait for each other's.
        self._max_runs = max_runs
        self._woken = asyncio.Event()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._loop: asyncio.Task[None] | None = None

    @property
    def loop(self) -> asyncio.Task[None] | None:
        return self._loop

    def running(self) -> frozenset[str]:
        """The connectors this replica is running now."""
        return frozenset(self._running)

    def start(self) -> None:
        self._loop = asyncio.create_task(self._poll(), name="sync-scheduler")

    def wake(self) -> None:
        """Look for due connectors now (RunConnector made one due)."""
        self._woken.set()

    async def _poll(self) -> None:
        ids = sorted(self._runs)
        ensured = False
        while True:
            try:
                if not ensured:
                    await self._store.ensure(ids)
                    ensured = True
                for connector_id in await self._store.due(ids):
                    if connector_id not in self._running and len(self._running) < self._max_runs:
                        task = asyncio.create_task(self._run(connector_id), name=f"sync-run-{connector_id}")
                        self._running[connector_id] = task
                        task.add_done_callback(partial(self._ended, connector_id))
            except STORE_ERRORS as exc:
                log.warning("could not read which connectors are due", extra={"error": type(exc).__name__})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), self._poll_interval_s)
            self._woken.clear()

    def _ended(self, connector_id: str, _: asyncio.Task[None]) -> None:
        self._running.pop(connector_id, None)

    async def _run(self, connector_id: str) -> None:
        try:
            async with self._pool.acquire() as connection:
                key = (_LOCK_NAMESPACE, await connection.fetchval("SELECT hashtext($1)", connector_id))
                if not await connection.fetchval("SELECT pg_try_advisory_lock($1, $2)", *key):
                    return  # another replica runs it
                try:
                    # Still due? Another replica may have finished a run since this one looked.
                    if connector_id in await self._store.due([connector_id]):
                        await self._runs[connector_id]()
                finally:
                    await connection.execute("SELECT pg_advisory_unlock($1, $2)", *key)
        except STORE_ERRORS as exc:
            log.warning(
                "connector run interrupted by the store",
                extra={"connector_id": connector_id, "error": type(exc).__name__},
            )

    async def close(self) -> None:
        """Stop looking; cancel the runs under way (their cursors hold what ingest answered)."""
        tasks = [t for t in (self._loop, *self._running.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
