"""Outcome counts per source (and duplicates per kind), kept in memory and flushed to
PostgreSQL once a second, so counting costs the hot path nothing and every replica adds up."""

from __future__ import annotations

import logging
from collections import Counter
from datetime import date

from ingest.store import CountKey, IngestStore, StoreError
from sendtime.ingest.v1 import ingest_pb2

log = logging.getLogger(__name__)


class OutcomeCounters:
    def __init__(self) -> None:
        self._pending: Counter[CountKey] = Counter()

    def add(self, day: date, source: int, outcome: int, duplicate_kind: int = 0) -> None:
        self._pending[(day, source, outcome, duplicate_kind)] += 1

    async def flush(self, store: IngestStore) -> None:
        """Write what was counted since the last flush; kept for the next one if that fails."""
        pending, self._pending = self._pending, Counter()
        try:
            await store.add_counts(pending)
        except StoreError as exc:
            self._pending.update(pending)
            log.warning("could not write ingest counts", extra={"error": str(exc)})


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
