"""The triggers service's Prometheus metrics (docs/operations.md): webhook attempts by
destination and what followed each, and destinations disabled."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from sendtime_common.metrics import LATENCY_BUCKETS

ATTEMPTS = Counter(
    "sendtime_triggers_delivery_attempts_total",
    "Webhook attempts, by destination and what followed: delivered, retry (another attempt is"
    " scheduled) or failed (given up).",
    ["destination", "result"],
)
ATTEMPT_SECONDS = Histogram(
    "sendtime_triggers_delivery_attempt_seconds",
    "Time from sending a webhook to its receiver's answer (or the attempt's failure).",
    ["destination"],
    buckets=LATENCY_BUCKETS,
)
DISABLES = Counter(
    "sendtime_triggers_destination_disables_total",
    "Destinations disabled: gone (410) or failing for the configured time.",
    ["destination"],
)
