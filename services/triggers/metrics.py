"""The triggers service's Prometheus metrics (docs/operations.md): the timers waiting and
overdue, webhook attempts by destination and what followed each, and destinations disabled."""

from __future__ import annotations

from datetime import timedelta

from prometheus_client import Counter, Gauge, Histogram

from sendtime_common.metrics import LATENCY_BUCKETS

# Past this a due episode is overdue. A firer that keeps up fires within a second of the due
# time (bench-triggers: p99 0.06-0.12 s at 1,000/s), so a minute late means it does not keep up,
# or none runs.
OVERDUE_AFTER = timedelta(minutes=1)
# Every replica reads the same table, so each reports the same figures: take max() over them.
TIMERS_PENDING = Gauge(
    "sendtime_triggers_timers_pending",
    "Episodes waiting to fall due (a trigger's wait), parked ones of paused triggers aside; the"
    " same in every replica.",
)
TIMERS_OVERDUE = Gauge(
    "sendtime_triggers_timers_overdue",
    "Waiting episodes that fell due more than a minute ago and have not fired or ended; the same"
    " in every replica.",
)

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
