"""Without an exporter the services record no spans but still make and pass on trace ids (for
the logs and the event log's headers); an exporter or a chosen sampler turns recording on."""

from __future__ import annotations

import os

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import Decision

from sendtime_common.telemetry import tracer_provider, unsampled


def test_without_an_exporter_spans_are_not_recorded_but_carry_trace_ids() -> None:
    provider = tracer_provider("test", None, {})
    tracer = provider.get_tracer(__name__)
    with tracer.start_as_current_span("outer") as outer:
        with tracer.start_as_current_span("inner") as inner:
            pass
    assert not outer.is_recording() and not inner.is_recording()
    assert outer.get_span_context().is_valid
    assert inner.get_span_context().trace_id == outer.get_span_context().trace_id
    provider.shutdown()


def _samples(provider: TracerProvider) -> bool:
    # The sampler's decision for a new trace, without making a span the exporter would send.
    decision = provider.sampler.should_sample(None, 0x1234, "span").decision
    return decision is Decision.RECORD_AND_SAMPLE


def test_with_an_exporter_the_default_sampler_records() -> None:
    provider = tracer_provider("test", "http://127.0.0.1:1", {})
    assert _samples(provider)
    provider.shutdown()


@pytest.mark.parametrize(
    ("sampler", "endpoint", "recording"),
    [("always_on", None, True), ("always_off", "http://127.0.0.1:1", False)],
)
def test_a_sampler_chosen_in_the_environment_wins(
    monkeypatch: pytest.MonkeyPatch, sampler: str, endpoint: str | None, recording: bool
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    provider = tracer_provider("test", endpoint, os.environ)
    assert _samples(provider) is recording
    provider.shutdown()


def test_only_a_decided_unsampled_trace_counts_as_unsampled() -> None:
    def context(flags: int, trace_id: int = 0x4BF92F3577B34DA6A3CE929D0E0E4736) -> trace.SpanContext:
        return trace.SpanContext(
            trace_id, 0x00F067AA0BA902B7, is_remote=True, trace_flags=trace.TraceFlags(flags)
        )

    assert unsampled(context(0x00))
    assert not unsampled(context(0x01))
    assert not unsampled(trace.INVALID_SPAN_CONTEXT)  # no trace yet: this process's sampler decides
