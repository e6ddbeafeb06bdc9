"""Render's Prometheus metrics (docs/operations.md): what each send-time render answered, where
its profile came from, why it fell back, and the circuit breaker to the profile service."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import Counter, Gauge

from sendtime.render.v1 import render_pb2

RENDERS = Counter(
    "sendtime_render_renders_total",
    "Renders answered (Render and each customer of RenderBatch), by status (rendered, skipped,"
    " template_error), where the profile came from, why it fell back and why it was skipped"
    " (empty when it did not).",
    ["status", "profile_source", "fallback_reason", "skip_reason"],
)
BREAKER_OPEN = Gauge(
    "sendtime_render_profile_breaker_open",
    "1 while the circuit breaker to the profile service is open: renders fall back at once.",
)


def _label(enum: Any, number: int, prefix: str) -> str:
    return "" if number == 0 else str(enum.Name(number)).removeprefix(prefix).lower()


_series: dict[tuple[int, int, int, int], Any] = {}


def count_render(response: render_pb2.RenderResponse) -> None:
    """Count one render's answer."""
    key = (response.status, response.profile_source, response.fallback_reason, response.skip_reason)
    series = _series.get(key)
    if series is None:
        series = _series[key] = RENDERS.labels(
            _label(render_pb2.RenderStatus, key[0], "RENDER_STATUS_"),
            _label(render_pb2.ProfileSource, key[1], "PROFILE_SOURCE_"),
            _label(render_pb2.FallbackReason, key[2], "FALLBACK_REASON_"),
            _label(render_pb2.SkipReason, key[3], "SKIP_REASON_"),
        )
    series.inc()


def count_template_error() -> None:
    """Count a render the template failed on (the caller got an error, not an answer)."""
    RENDERS.labels("template_error", "", "", "").inc()


def watch_breaker(is_open: Callable[[], bool]) -> None:
    """Report the breaker's state at each scrape."""
    BREAKER_OPEN.set_function(lambda: 1.0 if is_open() else 0.0)
