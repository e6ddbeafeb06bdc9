"""Outcome counts per source (and duplicates per kind), kept in memory and flushed to
PostgreSQL once a second, so counting costs the hot path nothing and every replica adds up."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import Iterable
from datetime import date

from ingest.store import CountKey, IngestStore, StoreError
from sendtime.ingest.v1 import ingest_pb2

log = logging.getLogger(__name__)


class OutcomeCounters:
    def __init__(self) -> None:
        self._pending: Counter[CountKey] = Counter()
        # Writes that failed, with their ids: retried as they were, since one may have committed.
        self._unwritten: list[tuple[uuid.UUID, Counter[CountKey]]] = []
        # One flush at a time: the periodic one and GetIngestStats's would otherwise both write
        # the first unwritten batch and both take it off the list.
        self._flushing = asyncio.Lock()

    def add_all(self, day: date, answered: Iterable[tuple[int, ingest_pb2.EventResult, int]]) -> None:
        """Count answers, each (source, result, duplicate kind)."""
        self._pending.update((day, source, result.outcome, kind) for source, result, kind in answered)

    async def flush(self, store: IngestStore) -> None:
        """Write what was counted since the last flush, and the writes that failed before;
        each is kept for the next flush if it fails (and counted once if it had committed). A
        flush called during another waits for it, then writes what is left."""
        async with self._flushing:
            await self._flush(store)

    async def _flush(self, store: IngestStore) -> None:
        if self._pending:
            self._unwritten.append((uuid.uuid4(), self._pending))
            self._pending = Counter()
        while self._unwritten:
            flush_id, counts = self._unwritten[0]
            try:
                await store.add_counts(counts, flush_id)
            except StoreError as exc:
                log.warning(
                    "could not write ingest counts",
                    extra={"error": str(exc), "unwritten": len(self._unwritten)},
                )
                return
            self._unwritten.pop(0)


def stats_response(
    totals: dict[tuple[int, int, int], int], first_day: date | None
) -> ingest_pb2.GetIngestStatsResponse:
    """Totals per (source, outcome, duplicate kind) as the API reports them."""
    by_source: dict[int, ingest_pb2.SourceStats] = {}
    duplicates: dict[int, Counter[int]] = {}
    for (source, outcome, kind), count in sorted(totals.items()):
        stats = by_source.setdefault(source, ingest_pb2.SourceStats(source=source))  # type: ignore[arg-type]
        if outcome == ingest_pb2.EVENT_OUTCOME_ACCEPTED:
            stats.accepted += count
        elif outcome == ingest_pb2.EVENT_OUTCOME_REJECTED:
            stats.rejected += count
        elif outcome == ingest_pb2.EVENT_OUTCOME_RETRY:
            stats.retried += count
        elif outcome == ingest_pb2.EVENT_OUTCOME_CONFLICT:
            stats.conflicts += count
        elif outcome == ingest_pb2.EVENT_OUTCOME_DUPLICATE:
            duplicates.setdefault(source, Counter())[kind] += count
    for source, kinds in duplicates.items():
        by_source[source].duplicates.extend(
            ingest_pb2.DuplicateCount(kind=kind, count=count)  # type: ignore[arg-type]
            for kind, count in sorted(kinds.items())
        )
    response = ingest_pb2.GetIngestStatsResponse(sources=list(by_source.values()))
    if first_day is not None:
        response.start_time.FromSeconds(_epoch(first_day))
    return response


def _epoch(day: date) -> int:
    return (day - date(1970, 1, 1)).days * 86400
