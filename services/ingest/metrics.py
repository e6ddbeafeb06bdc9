"""Ingest's Prometheus metrics (docs/operations.md): what became of each event, by source, and
the dead letters kept."""

from __future__ import annotations

import collections
from collections.abc import Iterable

from google.rpc import code_pb2, error_details_pb2, status_pb2
from prometheus_client import Counter

from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.errors import details_of

EVENTS = Counter(
    "sendtime_ingest_events_total",
    "Events answered, by source, outcome and reason (the ErrorInfo reason of a retry or a"
    " conflict, the status code of a rejection; empty when accepted or a duplicate).",
    ["source", "outcome", "reason"],
)
DUPLICATES = Counter(
    "sendtime_ingest_duplicates_total",
    "Events answered DUPLICATE, by source and by what caught them.",
    ["source", "kind"],
)

DEAD_LETTERS = Counter(
    "sendtime_ingest_dead_letters_total",
    "Dead letters kept (ListRejectedEvents shows them), by source and kind: a rejected or"
    " conflicting event, or a webhook item that could not be mapped (a redelivered one counts"
    " each time).",
    ["source", "kind"],
)


def _short(name: str, prefix: str) -> str:
    return name.removeprefix(prefix).lower()


def reason_of(status: status_pb2.Status) -> str:
    """A label for why an event was not accepted: its ErrorInfo reason, else its code's name."""
    infos = details_of(status, error_details_pb2.ErrorInfo)
    if infos:
        return infos[0].reason
    return code_pb2.Code.Name(status.code) if status.code else ""


def count_outcomes(answered: Iterable[tuple[int, ingest_pb2.EventResult, int]]) -> None:
    """Count answers, each (source, result, duplicate kind): one counter update per distinct
    label set, not one per event (a batch of 500 is mostly one outcome)."""
    events: collections.Counter[tuple[int, int, str]] = collections.Counter()
    duplicates: collections.Counter[tuple[int, int]] = collections.Counter()
    for source, result, duplicate_kind in answered:
        reason = reason_of(result.status) if result.HasField("status") else ""
        events[source, result.outcome, reason] += 1
        if result.outcome == ingest_pb2.EVENT_OUTCOME_DUPLICATE:
            duplicates[source, duplicate_kind] += 1
    for (source, outcome, reason), count in events.items():
        outcome_name = _short(ingest_pb2.EventOutcome.Name(outcome), "EVENT_OUTCOME_")  # type: ignore[arg-type]
        EVENTS.labels(_source_name(source), outcome_name, reason).inc(count)
    for (source, duplicate_kind), count in duplicates.items():
        kind = _short(ingest_pb2.DuplicateKind.Name(duplicate_kind), "DUPLICATE_KIND_")  # type: ignore[arg-type]
        DUPLICATES.labels(_source_name(source), kind).inc(count)


def _source_name(source: int) -> str:
    return _short(ingest_pb2.EventSource.Name(source), "EVENT_SOURCE_")  # type: ignore[arg-type]


def count_dead_letters(sources: Iterable[int], kind: str) -> None:
    """Count dead letters kept, one per source given; ``kind``: ``event`` or ``webhook_item``."""
    for source in sources:
        DEAD_LETTERS.labels(_source_name(source), kind).inc()
