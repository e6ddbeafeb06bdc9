"""One trace follows an event from the ingest call, through the NATS message, to the merge; and
one follows a render call into its profile lookup."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable

import nats
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2_grpc
from sendtime.render.v1 import render_pb2, render_pb2_grpc
from tests.conftest import eventually, user, wait_for_profile
from tests.factories import event, identify


async def finished_span(
    exporter: InMemorySpanExporter, matches: Callable[[ReadableSpan], bool], timeout_s: float = 5
) -> ReadableSpan:
    """The first finished span that ``matches``, waiting for it: a span ends a moment after the
    work it covers is visible (the merge span, after the cache write it waits on the ack)."""

    async def finished() -> ReadableSpan | None:
        return next((span for span in exporter.get_finished_spans() if matches(span)), None)

    return await eventually(finished, timeout_s)


RENDER_CALL = "/sendtime.render.v1.RenderService/Render"
PROFILE_LOOKUP = "render.profile_lookup"


async def test_ingest_call_and_merge_share_one_trace(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    span_exporter: InMemorySpanExporter,
    unique: str,
) -> None:
    sent = event(user_id=f"u-{unique}", identify=identify(traced=True))
    await ingest_stub.SendEvents(ingest_pb2.SendEventsRequest(events=[sent]))
    await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: "traced" in p.traits)

    rpc = await finished_span(
        span_exporter, lambda s: s.name == "/sendtime.ingest.v1.IngestService/SendEvents"
    )
    merge = await finished_span(
        span_exporter,
        lambda s: (
            s.name == "profile.merge" and (s.attributes or {}).get("sendtime.event_id") == sent.event_id
        ),
    )
    assert merge.context is not None and rpc.context is not None
    assert merge.context.trace_id == rpc.context.trace_id
    trace_id = rpc.context.trace_id
    ingest_event = await finished_span(
        span_exporter,
        lambda s: s.name == "ingest.event" and s.context is not None and s.context.trace_id == trace_id,
    )
    assert ingest_event.context is not None
    assert merge.parent is not None and merge.parent.span_id == ingest_event.context.span_id


async def test_an_unsampled_call_still_hands_its_trace_id_to_the_event_it_publishes(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub, nats_url: str, unique: str
) -> None:
    # A caller that did not sample its trace: ingest records no span for it (nor one per event),
    # but the event on the log carries the caller's trace id, so the merge's logs can be found.
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    sent = event(user_id=f"u-{unique}", identify=identify(unsampled=True))
    await ingest_stub.SendEvents(
        ingest_pb2.SendEventsRequest(events=[sent]),
        metadata=(("traceparent", f"00-{trace_id}-{span_id}-00"),),
    )
    client = await nats.connect(nats_url)
    try:
        stored = await client.jetstream().get_last_msg("SENDTIME_EVENTS", "sendtime.events.identify")
    finally:
        await client.close()
    assert stored.headers is not None and stored.headers["Nats-Msg-Id"] == sent.event_id
    version, carried_trace_id, _, flags = stored.headers["traceparent"].split("-")
    assert (version, carried_trace_id, flags) == ("00", trace_id, "00")


async def test_render_call_and_profile_lookup_share_one_trace(
    render_stub: render_pb2_grpc.RenderServiceAsyncStub,
    span_exporter: InMemorySpanExporter,
    unique: str,
) -> None:
    await render_stub.Render(
        render_pb2.RenderRequest(customer=user(f"u-{unique}"), template=render_pb2.Template(subject="Hi"))
    )

    render = await finished_span(span_exporter, lambda s: s.name == RENDER_CALL)
    lookup = await finished_span(  # the lookups of concurrent renders go out as one batch
        span_exporter, lambda s: s.name == "/sendtime.profile.v1.ProfileService/BatchGetProfiles"
    )
    assert lookup.context is not None and render.context is not None
    assert lookup.context.trace_id == render.context.trace_id
    assert lookup.parent is not None  # the profile server's span continues render's client span


def finished(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def traces_with_a_lookup(lookups: list[ReadableSpan]) -> set[int]:
    """Traces that hold one of ``lookups``, or that one of them links to."""
    return {s.context.trace_id for s in lookups if s.context} | {
        link.context.trace_id for s in lookups for link in s.links
    }


async def test_each_render_in_a_batched_lookup_leads_to_the_lookup(
    render_stub: render_pb2_grpc.RenderServiceAsyncStub,
    span_exporter: InMemorySpanExporter,
    unique: str,
) -> None:
    span_exporter.clear()
    template = render_pb2.Template(subject="Hi")
    await asyncio.gather(
        *(
            render_stub.Render(render_pb2.RenderRequest(customer=user(f"u-{unique}-{i}"), template=template))
            for i in range(20)
        )
    )

    renders = finished(span_exporter, RENDER_CALL)
    lookups = finished(span_exporter, PROFILE_LOOKUP)
    assert len(renders) == 20
    sizes = [(s.attributes or {}).get("sendtime.batch_size") for s in lookups]
    assert sum(size for size in sizes if isinstance(size, int)) == 20
    assert any(s.links for s in lookups)  # concurrent renders shared a lookup
    # Each render's trace holds a lookup span, or is linked from one.
    assert {s.context.trace_id for s in renders if s.context} <= traces_with_a_lookup(lookups)
    # And the profile service's side of each lookup continues the lookup span's trace.
    batch_calls = finished(span_exporter, "/sendtime.profile.v1.ProfileService/BatchGetProfiles")
    assert {s.context.trace_id for s in lookups if s.context} <= {
        s.context.trace_id for s in batch_calls if s.context
    }


async def test_a_render_that_joins_another_renders_lookup_leads_to_it(
    render_stub: render_pb2_grpc.RenderServiceAsyncStub,
    span_exporter: InMemorySpanExporter,
    unique: str,
) -> None:
    span_exporter.clear()
    template = render_pb2.Template(subject="Hi")
    request = render_pb2.RenderRequest(customer=user(f"u-{unique}"), template=template)
    await asyncio.gather(*(render_stub.Render(request) for _ in range(10)))  # one customer

    renders = finished(span_exporter, RENDER_CALL)
    lookups = finished(span_exporter, PROFILE_LOOKUP)
    assert len(renders) == 10 and len(lookups) < 10  # some renders shared a lookup
    with_lookup = traces_with_a_lookup(lookups)
    for render in renders:
        assert render.context is not None
        # Its trace holds a lookup span or is linked from one, or it links to a render's that does.
        leads_to = {render.context.trace_id} | {link.context.trace_id for link in render.links}
        assert leads_to & with_lookup, render
