"""The sync service's Prometheus metrics (docs/operations.md): connector runs and what they
read or pushed, how far behind each connector is, and the profile changes read for pushes."""

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
    "How far behind a connector was at the end of its last run. A pull: then less the time of"
    " the newest provider change it had handed on. A push: then less the time of the oldest"
    " profile change not yet pushed (0: none).",
    ["connector"],
)
PUSH_ITEMS = Counter(
    "sendtime_sync_push_items_total",
    "Customers a push run looked at, by connector and outcome: pushed (the provider took them),"
    " refused (by the provider), unchanged (it holds these values: not sent) or skipped (gone,"
    " or with neither a user id nor an address).",
    ["connector", "outcome"],
)
CHANGES = Counter(
    "sendtime_sync_profile_changes_total",
    "Profile changes read for the push connectors, by result: marked (their customers are"
    " pending), retried (handed back to the log: PostgreSQL away) or undecodable (discarded).",
    ["result"],
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
    for outcome, count in (
        ("pushed", report.pushed),
        ("refused", report.items_refused),
        ("unchanged", report.unchanged),
        ("skipped", report.skipped),
    ):
        PUSH_ITEMS.labels(report.connector_id, outcome).inc(count)
    if newest is not None:
        LAG.labels(report.connector_id).set(max(0.0, (datetime.now(UTC) - newest).total_seconds()))


def record_lag(connector_id: str, oldest_waiting: datetime | None) -> None:
    """A push's lag: since the oldest profile change not yet pushed (0: none waits)."""
    since = 0.0 if oldest_waiting is None else (datetime.now(UTC) - oldest_waiting).total_seconds()
    LAG.labels(connector_id).set(max(0.0, since))
