"""Generate the Grafana dashboards of deploy/components/prometheus/dashboards/ (docs/operations.md).

Run through `make gen`; the JSON is committed (the kustomize component turns each file into a
ConfigMap for Grafana's sidecar) and tests/test_prometheus_rules.py fails when it is stale.
Panels are written here once, as (title, queries, unit), instead of by hand in Grafana's JSON,
where a panel is forty lines. tests/e2e/test_prometheus.py runs every query against a real
Prometheus scraping the suite.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "deploy" / "components" / "prometheus" / "dashboards"

SENDTIME_GRPC = 'grpc_service=~"sendtime\\\\..*"'
# What a healthy service does not answer: its own failures (docs/slo.md says why these).
SERVER_GRPC_CODES = 'grpc_code=~"UNKNOWN|INTERNAL|UNAVAILABLE|DEADLINE_EXCEEDED|DATA_LOSS"'
RATE = "$__rate_interval"


@dataclass(frozen=True, slots=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True, slots=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"  # or "stat"
    width: int = 8


@dataclass(frozen=True, slots=True)
class Row:
    title: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def p99(metric: str, by: str, selector: str = "") -> str:
    return f"histogram_quantile(0.99, sum by ({by}, le) (rate({metric}_bucket{{{selector}}}[{RATE}])))"


SLO_ROWS = (
    Row(
        "Service level objectives (docs/slo.md)",
        (
            Panel(
                "SLIs over the last day",
                (Query("1 - sendtime:slo_errors:ratio_rate1d", "{{slo}}"),),
                unit="percentunit",
                kind="stat",
                width=12,
                description="The share of good events per SLO over one day; objectives: 99.9% (render,"
                " GetProfile, ingest), 99% (freshness).",
            ),
            Panel(
                "Error budget burn rate (1h)",
                (
                    Query(
                        "sendtime:slo_errors:ratio_rate1h / on (slo) (1 - sendtime:slo_objective:ratio)",
                        "{{slo}}",
                    ),
                ),
                width=12,
                description="1 spends the 30-day budget in 30 days; the page fires at 14.4 (1h and 5m) and"
                " 6 (6h and 30m).",
            ),
        ),
    ),
    Row(
        "Freshness",
        (
            Panel(
                "Stored to readable, p50 and p99",
                (
                    Query(
                        "histogram_quantile(0.99, sum by (le) (rate("
                        f"sendtime_profile_freshness_from_stored_seconds_bucket[{RATE}])))",
                        "p99",
                    ),
                    Query(
                        "histogram_quantile(0.5, sum by (le) (rate("
                        f"sendtime_profile_freshness_from_stored_seconds_bucket[{RATE}])))",
                        "p50",
                    ),
                ),
                unit="s",
                description="From the event log storing an event to its merge being readable: the SLO is"
                " p99 < 1 s.",
            ),
            Panel(
                "Readable within 1 s",
                (
                    Query(
                        "sum(rate(sendtime_profile_freshness_from_stored_seconds_bucket"
                        f'{{le=~"1(\\\\.0)?"}}[{RATE}])) / sum(rate('
                        f"sendtime_profile_freshness_from_stored_seconds_count[{RATE}]))",
                        "within 1 s",
                    ),
                ),
                unit="percentunit",
            ),
            Panel(
                "Occurred to readable, p99",
                (
                    Query(
                        "histogram_quantile(0.99, sum by (le) (rate("
                        f"sendtime_profile_freshness_from_occurred_seconds_bucket[{RATE}])))",
                        "p99",
                    ),
                ),
                unit="s",
                description="From the event's occurred_at: large while imports or late senders run.",
            ),
        ),
    ),
    Row(
        "Throughput",
        (
            Panel(
                "gRPC calls by service",
                (
                    Query(
                        f"sum by (grpc_service) (rate(grpc_server_handled_total{{{SENDTIME_GRPC}}}[{RATE}]))",
                        "{{grpc_service}}",
                    ),
                ),
                unit="reqps",
            ),
            Panel(
                "HTTP requests by service and listener",
                (
                    Query(
                        "sum by (job, listener) (rate(http_server_requests_total"
                        f'{{listener!="metrics"}}[{RATE}]))',
                        "{{job}} {{listener}}",
                    ),
                ),
                unit="reqps",
            ),
            Panel(
                "Ingested events by outcome",
                (Query(f"sum by (outcome) (rate(sendtime_ingest_events_total[{RATE}]))", "{{outcome}}"),),
                unit="ops",
            ),
        ),
    ),
    Row(
        "Latency",
        (
            Panel(
                "gRPC p99 by method",
                (
                    Query(
                        p99("grpc_server_handling_seconds", "grpc_service, grpc_method", SENDTIME_GRPC),
                        "{{grpc_method}}",
                    ),
                ),
                unit="s",
            ),
            Panel(
                "HTTP p99 by route",
                (
                    Query(
                        p99("http_server_request_duration_seconds", "job, route", 'listener!="metrics"'),
                        "{{job}} {{route}}",
                    ),
                ),
                unit="s",
            ),
            Panel(
                "Render and GetProfile p99 (gRPC)",
                (
                    Query(
                        p99(
                            "grpc_server_handling_seconds",
                            "grpc_method",
                            'grpc_method=~"Render|GetProfile",' + SENDTIME_GRPC,
                        ),
                        "{{grpc_method}}",
                    ),
                ),
                unit="s",
            ),
        ),
    ),
    Row(
        "Errors",
        (
            Panel(
                "Server errors by method and code (gRPC)",
                (
                    Query(
                        "sum by (grpc_method, grpc_code) (rate(grpc_server_handled_total"
                        f"{{{SENDTIME_GRPC},{SERVER_GRPC_CODES}}}[{RATE}])) or vector(0)",
                        "{{grpc_method}} {{grpc_code}}",
                    ),
                ),
                unit="reqps",
                width=6,
                description="The codes the SLOs count against the service; 0 when there are none.",
            ),
            Panel(
                "Calls not OK by method and code (gRPC)",
                (
                    Query(
                        "sum by (grpc_method, grpc_code) (rate(grpc_server_handled_total"
                        f'{{{SENDTIME_GRPC},grpc_code!="OK"}}[{RATE}]))',
                        "{{grpc_method}} {{grpc_code}}",
                    ),
                ),
                unit="reqps",
                width=6,
                description="Callers' mistakes (NOT_FOUND, INVALID_ARGUMENT), refusals (UNAUTHENTICATED,"
                " RESOURCE_EXHAUSTED) and server errors.",
            ),
            Panel(
                "HTTP answers other than 2xx by service and code",
                (
                    Query(
                        "sum by (job, code) (rate(http_server_requests_total"
                        f'{{listener!="metrics",code!~"2.."}}[{RATE}]))',
                        "{{job}} {{code}}",
                    ),
                ),
                unit="reqps",
                width=6,
            ),
            Panel(
                "Dead letters by source and kind",
                (
                    Query(
                        f"sum by (source, kind) (rate(sendtime_ingest_dead_letters_total[{RATE}]))",
                        "{{source}} {{kind}}",
                    ),
                ),
                unit="ops",
                width=6,
                description="Kept for review in ingest's dead-letter store: events rejected or conflicting,"
                " webhook items that could not be mapped.",
            ),
        ),
    ),
)

INTERNAL_ROWS = (
    Row(
        "Profile cache",
        (
            Panel(
                "Reads by where they were answered",
                (Query(f"sum by (source) (rate(sendtime_profile_reads_total[{RATE}]))", "{{source}}"),),
                unit="ops",
                width=12,
            ),
            Panel(
                "Cache hit ratio (near and Redis)",
                (
                    Query(
                        f'sum(rate(sendtime_profile_reads_total{{source=~"near|redis"}}[{RATE}]))'
                        f' / sum(rate(sendtime_profile_reads_total{{source!="missing"}}[{RATE}]))',
                        "hit ratio",
                    ),
                ),
                unit="percentunit",
                width=12,
                description="Missing customers aside: a read of no one is neither a hit nor a miss.",
            ),
        ),
    ),
    Row(
        "Render fallbacks",
        (
            Panel(
                "Renders by where the profile came from",
                (
                    Query(
                        f"sum by (profile_source) (rate(sendtime_render_renders_total[{RATE}]))",
                        "{{profile_source}}",
                    ),
                ),
                unit="ops",
            ),
            Panel(
                "Fallbacks by reason",
                (
                    Query(
                        "sum by (fallback_reason) (rate(sendtime_render_renders_total"
                        f'{{fallback_reason!=""}}[{RATE}]))',
                        "{{fallback_reason}}",
                    ),
                ),
                unit="ops",
            ),
            Panel(
                "Profile breaker open",
                (Query("sendtime_render_profile_breaker_open", "{{instance}}"),),
                description="1 while a render replica's breaker to the profile service is open.",
            ),
        ),
    ),
    Row(
        "Event log lag",
        (
            Panel(
                "Pending messages by consumer",
                (Query("max by (consumer) (sendtime_consumer_pending_messages)", "{{consumer}}"),),
                width=8,
                description="Stored in the event log, not yet delivered to the durable consumer (every"
                " replica reports the same figure).",
            ),
            Panel(
                "Unacknowledged messages by consumer",
                (Query("max by (consumer) (sendtime_consumer_ack_pending_messages)", "{{consumer}}"),),
                width=8,
            ),
            Panel(
                "Events set aside unmerged",
                (
                    Query(
                        f"sum by (reason) (increase(sendtime_profile_unmerged_events_total[{RATE}]))",
                        "{{reason}}",
                    ),
                ),
                width=8,
                description="Acknowledged events the profile merger could not merge, by reason: each waits"
                " in ListUnmergedEvents until replayed.",
            ),
        ),
    ),
    Row(
        "Triggers",
        (
            Panel(
                "Timers pending and overdue",
                (
                    Query("max(sendtime_triggers_timers_pending)", "pending"),
                    Query("max(sendtime_triggers_timers_overdue)", "overdue"),
                ),
                width=6,
            ),
            Panel(
                "Webhook attempts by result",
                (
                    Query(
                        f"sum by (result) (rate(sendtime_triggers_delivery_attempts_total[{RATE}]))",
                        "{{result}}",
                    ),
                ),
                unit="ops",
                width=6,
            ),
            Panel(
                "Webhook attempt p99 by destination (top 10)",
                (
                    Query(
                        "topk(10, " + p99("sendtime_triggers_delivery_attempt_seconds", "destination") + ")",
                        "{{destination}}",
                    ),
                ),
                unit="s",
                width=6,
            ),
            Panel(
                "Destinations disabled (1 day)",
                (
                    Query(
                        "sum by (destination) (increase(sendtime_triggers_destination_disables_total[1d]))",
                        "{{destination}}",
                    ),
                ),
                width=6,
            ),
        ),
    ),
    Row(
        "Merging and the database",
        (
            Panel(
                "Merge batch size, p50 and p99",
                (
                    Query(
                        "histogram_quantile(0.5, sum by (le) (rate("
                        f"sendtime_profile_merge_batch_events_bucket[{RATE}])))",
                        "p50",
                    ),
                    Query(
                        "histogram_quantile(0.99, sum by (le) (rate("
                        f"sendtime_profile_merge_batch_events_bucket[{RATE}])))",
                        "p99",
                    ),
                ),
            ),
            Panel(
                "Merge batch time, p99",
                (
                    Query(
                        "histogram_quantile(0.99, sum by (le) (rate("
                        f"sendtime_profile_merge_batch_seconds_bucket[{RATE}])))",
                        "p99",
                    ),
                ),
                unit="s",
            ),
            Panel(
                "PostgreSQL connections in use, of the pool's maximum",
                (
                    Query('sum by (job) (sendtime_db_pool_connections{state="in_use"})', "{{job}} in use"),
                    Query('sum by (job) (sendtime_db_pool_connections{state="max"})', "{{job}} max"),
                ),
            ),
        ),
    ),
)

DASHBOARDS = {
    "sendtime-overview": ("Sendtime: SLOs, throughput, latency, errors", SLO_ROWS),
    "sendtime-internals": ("Sendtime: cache, fallbacks, lag, triggers", INTERNAL_ROWS),
}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PANEL_HEIGHT = 8


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    targets = [
        {
            "datasource": DATASOURCE,
            "expr": q.expr,
            "legendFormat": q.legend or "__auto",
            "refId": chr(ord("A") + i),
        }
        for i, q in enumerate(panel.queries)
    ]
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": PANEL_HEIGHT, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}}
        if panel.kind == "timeseries"
        else {},
        "targets": targets,
    }


def dashboard(uid: str, title: str, rows: tuple[Row, ...]) -> dict[str, Any]:
    """One dashboard in Grafana's JSON model: a row panel per row, its panels 24 columns wide."""
    panels: list[dict[str, Any]] = []
    y = 0
    for row in rows:
        panels.append(
            {
                "id": len(panels) + 1,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        y += 1
        x = 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y = 0, y + PANEL_HEIGHT
            panels.append(_panel(panel, len(panels) + 1, x, y))
            x += panel.width
        y += PANEL_HEIGHT
    return {
        "uid": uid,
        "title": title,
        "tags": ["sendtime"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus"},
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def rendered() -> dict[Path, str]:
    """Each dashboard file's path and its text."""
    return {
        OUT / f"{uid}.json": json.dumps(dashboard(uid, title, rows), indent=2) + "\n"
        for uid, (title, rows) in DASHBOARDS.items()
    }


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for path, text in rendered().items():
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
