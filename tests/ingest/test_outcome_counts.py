"""Ingest's outcome counts (GetIngestStats) are written once a second from memory: a write that
fails is retried, and counted once even where it had committed before the error (the reply lost
with the connection), on real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import date

import asyncpg
import pytest

from ingest.stats import OutcomeCounters
from ingest.store import CountKey, IngestStore
from sendtime.ingest.v1 import ingest_pb2
from tests.ingest.migrated import migrated_pool

DAY = date(2026, 12, 7)
WEB, ACCEPTED = ingest_pb2.EVENT_SOURCE_WEB, ingest_pb2.EVENT_OUTCOME_ACCEPTED


class FailingWrites(IngestStore):
    """Fails the next ``failures`` writes of counts: after committing them (``committed``), as
    a connection lost before the reply does, or before."""

    def __init__(self, pool: asyncpg.Pool, failures: int, *, committed: bool) -> None:
        super().__init__(pool)
        self.failures = failures
        self.committed = committed

    async def add_counts(self, counts: Mapping[CountKey, int], flush_id: uuid.UUID) -> None:
        if self.failures and not self.committed:
            self.failures -= 1
            raise ConnectionResetError("the connection was lost")
        await super().add_counts(counts, flush_id)
        if self.failures:
            self.failures -= 1
            raise ConnectionResetError("the connection was lost after the commit")


@pytest.fixture
async def pool() -> AsyncIterator[asyncpg.Pool]:
    async with migrated_pool("sendtime_counts", max_size=2) as made:
        yield made


async def _accepted(store: IngestStore) -> int:
    totals, _ = await store.counts(None)
    return totals.get((WEB, ACCEPTED, 0), 0)


def _count(counters: OutcomeCounters, n: int) -> None:
    accepted = ingest_pb2.EventResult(outcome=ACCEPTED)
    counters.add_all(DAY, [(WEB, accepted, 0)] * n)


@pytest.mark.parametrize("committed", [True, False], ids=["committed before the error", "not committed"])
async def test_a_failed_write_of_counts_is_retried_and_counted_once(
    pool: asyncpg.Pool, committed: bool
) -> None:
    store = FailingWrites(pool, failures=2, committed=committed)
    counters = OutcomeCounters()
    _count(counters, 3)
    await counters.flush(store)  # fails
    _count(counters, 4)
    await counters.flush(store)  # the first write fails again: the second waits behind it
    assert await _accepted(store) == (3 if committed else 0)
    await counters.flush(store)
    assert await _accepted(store) == 7
    await counters.flush(store)  # nothing left
    assert await _accepted(store) == 7
    assert await pool.fetchval("SELECT count(*) FROM ingest_count_flushes") == 2


class SlowWrites(IngestStore):
    async def add_counts(self, counts: Mapping[CountKey, int], flush_id: uuid.UUID) -> None:
        await asyncio.sleep(0.05)  # long enough for the other flush to start meanwhile
        await super().add_counts(counts, flush_id)


async def test_flushes_at_once_write_each_count_once(pool: asyncpg.Pool) -> None:
    """GetIngestStats flushes while the periodic flush may be writing."""
    store, counters = SlowWrites(pool), OutcomeCounters()
    _count(counters, 3)
    first = asyncio.create_task(counters.flush(store))
    await asyncio.sleep(0.01)
    _count(counters, 2)
    await asyncio.gather(first, counters.flush(store), counters.flush(store))
    assert await _accepted(store) == 5
