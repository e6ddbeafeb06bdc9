"""One trace follows an event from the ingest call, through the NATS message, to the merge; and
one follows a render call into its profile lookup."""

from __future__ import annotations

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2_grpc
from sendtime.render.v1 import render_pb2, render_pb2_grpc
from tests.conftest import user, wait_for_profile
from tests.factories import event, identify


async def test_ingest_call_and_merge_share_one_trace(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    span_exporter: InMemorySpanExporter,
    unique: str,
) -> None:
    sent = event(user_id=f"u-{unique}", identify=identify(traced=True))
    await ingest_stub.SendEvents(ingest_pb2.SendEventsRequest(events=[sent]))
    await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: "traced" in p.traits)

    spans = span_exporter.get_finished_spans()
    rpc = next(s for s in spans if s.name == "/sendtime.ingest.v1.IngestService/SendEvents")
    merge = next(
        s
        for s in spans
        if s.name == "profile.merge" and (s.attributes or {}).get("sendtime.event_id") == sent.event_id
    )
    assert merge.context.trace_id == rpc.context.trace_id
    ingest_event = next(
        s for s in spans if s.name == "ingest.event" and s.context.trace_id == rpc.context.trace_id
    )
    assert merge.parent is not None and merge.parent.span_id == ingest_event.context.span_id


async def test_render_call_and_profile_lookup_share_one_trace(
    render_stub: render_pb2_grpc.RenderServiceAsyncStub,
    span_exporter: InMemorySpanExporter,
    unique: str,
) -> None:
    await render_stub.Render(
        render_pb2.RenderRequest(customer=user(f"u-{unique}"), template=render_pb2.Template(subject="Hi"))
    )

    spans = span_exporter.get_finished_spans()
    render = next(s for s in spans if s.name == "/sendtime.render.v1.RenderService/Render")
    lookup = next(s for s in spans if s.name == "/sendtime.profile.v1.ProfileService/GetProfile")
    assert lookup.context.trace_id == render.context.trace_id
    assert lookup.parent is not None  # the profile server's span continues render's client span
