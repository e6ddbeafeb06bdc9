"""The sync service's Prometheus metrics (docs/operations.md): connector runs and what they
read, and how far behind each connector is."""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client import Counter, Gauge

from sync.runner import RunReport

RUNS = Counter(
    "sendtime_sync_runs_total",
    "Connector runs, by connector and result: succeeded (went to the end) or failed (ended early;"
    " tried again later).",
    ["connector", "result"],
)
RECORDS = Counter(
    "sendtime_sync_records_total",
    "Provider records a connector read, by connector.",
    ["connector"],
)
EVENTS = Counter(
    "sendtime_sync_events_total",
    "Events handed to ingest, by connector and ingest's answer: accepted, duplicate or refused"
    " (REJECTED or CONFLICT, in ingest's dead-letter store).",
    ["connector", "answer"],
)
LAG = Gauge(
    "sendtime_sync_lag_seconds",
    "How far behind its provider a connector was at the end of its last run: then less the time"
    " of the newest change it had handed on.",
    ["connector"],
)


def record_run(report: RunReport, newest: datetime | None) -> None:
    """Count a run (scheduler's ``on_report``)."""
    RUNS.labels(report.connector_id, "failed" if report.error else "succeeded").inc()
    RECORDS.labels(report.connector_id).inc(report.records)
    for answer, count in (
        ("accepted", report.accepted),
        ("duplicate", report.duplicates),
        ("refused", report.refused),
    ):
        EVENTS.labels(report.connector_id, answer).inc(count)
    if newest is not None:
        LAG.labels(report.connector_id).set(max(0.0, (datetime.now(UTC) - newest).total_seconds()))
