"""How far each durable consumer of the event log is behind, as Prometheus gauges
(docs/operations.md): read from NATS every few seconds by the service that consumes, since a
scrape cannot wait on NATS."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from prometheus_client import Gauge

from sendtime_common.event_log import ConsumerBacklog, EventLogUnavailable
from sendtime_common.metrics import sample_every

READ_EVERY_S = 5.0

PENDING = Gauge(
    "sendtime_consumer_pending_messages",
    "Messages stored in the event log and not yet delivered to the durable consumer.",
    ["consumer"],
)
ACK_PENDING = Gauge(
    "sendtime_consumer_ack_pending_messages",
    "Messages delivered to the durable consumer and not yet acknowledged.",
    ["consumer"],
)


async def watch_backlog(
    consumer: str, read: Callable[[], Awaitable[ConsumerBacklog]], every_s: float = READ_EVERY_S
) -> None:
    """Set ``consumer``'s gauges from ``read()`` every ``every_s`` until cancelled. While NATS
    does not answer, the gauges keep their last values and one warning is logged."""
    pending, ack_pending = PENDING.labels(consumer), ACK_PENDING.labels(consumer)

    def record(backlog: ConsumerBacklog) -> None:
        pending.set(backlog.pending)
        ack_pending.set(backlog.ack_pending)

    await sample_every(
        every_s, read, record, unavailable=(EventLogUnavailable,), what=f"the backlog of {consumer}"
    )


def forget_backlog(consumer: str) -> None:
    """Drop ``consumer``'s gauges: this process no longer reads it (another replica reports it)."""
    for gauge in (PENDING, ACK_PENDING):
        try:
            gauge.remove(consumer)
        except KeyError:
            pass
