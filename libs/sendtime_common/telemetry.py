"""OpenTelemetry setup and context propagation across the event log.

Traces leave the process only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set; otherwise spans are
still created (so trace ids reach the logs and the event log's headers) but nothing is exported
or printed.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor


def configure_tracing(service: str, otlp_endpoint: str | None) -> TracerProvider:
    """Install a global tracer provider for ``service``; export over OTLP/gRPC when an endpoint
    is given. The exporter reads the other standard ``OTEL_EXPORTER_OTLP_*`` variables itself."""
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}))
    if otlp_endpoint:
        # Imported here: the exporter pulls in its own gRPC channel machinery, unused otherwise.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    trace.set_tracer_provider(provider)
    return provider


def inject_trace_headers(headers: dict[str, str]) -> dict[str, str]:
    """Write the active trace context (W3C ``traceparent``) into message headers."""
    propagate.inject(headers)
    return headers


def extract_trace_context(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context carried by message headers (an empty context when there is none)."""
    return propagate.extract(dict(headers or {}))


def current_trace_id() -> str:
    """The active trace id as 32 hex digits, or an empty string outside a trace."""
    span_context = trace.get_current_span().get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else ""
