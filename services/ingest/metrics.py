"""Ingest's Prometheus metrics (docs/operations.md): what became of each event, by source, and
the dead letters kept."""

from __future__ import annotations

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


def count_outcome(source: int, result: ingest_pb2.EventResult, duplicate_kind: int) -> None:
    """Count one event's answer."""
    source_name = _short(ingest_pb2.EventSource.Name(source), "EVENT_SOURCE_")  # type: ignore[arg-type]
    outcome = _short(ingest_pb2.EventOutcome.Name(result.outcome), "EVENT_OUTCOME_")
    reason = reason_of(result.status) if result.HasField("status") else ""
    EVENTS.labels(source_name, outcome, reason).inc()
    if result.outcome == ingest_pb2.EVENT_OUTCOME_DUPLICATE:
        kind = _short(ingest_pb2.DuplicateKind.Name(duplicate_kind), "DUPLICATE_KIND_")  # type: ignore[arg-type]
        DUPLICATES.labels(source_name, kind).inc()


def count_dead_letters(sources: Iterable[int], kind: str) -> None:
    """Count dead letters kept, one per source given; ``kind``: ``event`` or ``webhook_item``."""
    for source in sources:
        DEAD_LETTERS.labels(_short(ingest_pb2.EventSource.Name(source), "EVENT_SOURCE_"), kind).inc()  # type: ignore[arg-type]
