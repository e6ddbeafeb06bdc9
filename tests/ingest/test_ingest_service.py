"""IngestService against a real NATS JetStream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import nats
import pytest
from prometheus_client import REGISTRY

import devstack
from ingest.server import create_app
from ingest.settings import Settings
from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime_common.errors import FieldViolation, field_violations, status_of
from sendtime_common.event_log import JetStreamSettings
from tests.conftest import LOCAL_SERVER, channel
from tests.factories import cart_item_added, event, identify, product_viewed
from tests.keys import issue_key

ACCEPTED = ingest_pb2.EVENT_OUTCOME_ACCEPTED
DUPLICATE = ingest_pb2.EVENT_OUTCOME_DUPLICATE
REJECTED = ingest_pb2.EVENT_OUTCOME_REJECTED
RETRY = ingest_pb2.EVENT_OUTCOME_RETRY


async def test_valid_events_are_accepted_and_a_resend_is_a_duplicate(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub, unique: str
) -> None:
    e = event(user_id=f"u-{unique}", product_viewed=product_viewed("sku-1"))
    first = await ingest_stub.SendEvents(ingest_pb2.SendEventsRequest(events=[e]))
    again = await ingest_stub.SendEvents(ingest_pb2.SendEventsRequest(events=[e]))
    assert [r.outcome for r in first.results] == [ACCEPTED]
    assert [(r.event_id, r.outcome) for r in again.results] == [(e.event_id, DUPLICATE)]


async def test_a_batch_keeps_its_good_events_and_explains_each_bad_one(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub, unique: str
) -> None:
    good = event(user_id=f"u-{unique}", identify=identify(first_name="Ada"))
    no_customer = event(cart_item_added=cart_item_added("sku-1"))
    bad_quantity = event(email=f"{unique}@example.com", cart_item_added=cart_item_added("sku-1", quantity=-2))
    response = await ingest_stub.SendEvents(
        ingest_pb2.SendEventsRequest(events=[good, no_customer, bad_quantity])
    )

    assert [r.event_id for r in response.results] == [
        good.event_id,
        no_customer.event_id,
        bad_quantity.event_id,
    ]
    assert [r.outcome for r in response.results] == [ACCEPTED, REJECTED, REJECTED]
    assert response.results[1].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert field_violations(response.results[1].status) == [
        FieldViolation(
            "customer", "at least one of user_id, email, anonymous_id, crm_id, device_id is required"
        )
    ]
    assert field_violations(response.results[2].status) == [
        FieldViolation("cart_item_added.quantity", "must be positive")
    ]


async def test_an_empty_batch_is_invalid_argument_with_a_field_violation(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest_stub.SendEvents(ingest_pb2.SendEventsRequest())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = status_of(caught.value)
    assert status is not None
    assert field_violations(status) == [FieldViolation("events", "must hold 1 to 1000 events, got 0")]


async def test_stream_answers_every_event_by_id(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub, unique: str
) -> None:
    events = [event(user_id=f"u-{unique}", product_viewed=product_viewed(f"sku-{i}")) for i in range(50)]
    events.append(
        event(
            user_id=f"u-{unique}",
            occurred_at=datetime.now(UTC) + timedelta(hours=1),
            product_viewed=product_viewed("late"),
        )
    )

    async def requests() -> AsyncIterator[ingest_pb2.StreamEventsRequest]:
        for e in events:
            yield ingest_pb2.StreamEventsRequest(event=e)

    outcomes = {r.result.event_id: r.result.outcome async for r in ingest_stub.StreamEvents(requests())}
    expected = {e.event_id: ACCEPTED for e in events[:-1]} | {events[-1].event_id: REJECTED}
    assert outcomes == expected


async def test_when_nats_is_down_events_get_retry_with_retry_info_never_accepted(
    tmp_path: Path, database_url: str, unique: str
) -> None:
    port = devstack.free_port()
    nats = devstack.start_nats(port, tmp_path / "nats")
    settings = Settings(
        **LOCAL_SERVER,
        database_url=database_url,
        # Long enough for a fresh server's first ack (stream files created and fsynced) on a
        # loaded machine; short enough for each call while NATS is down to end well within 10 s.
        event_log=JetStreamSettings(url=f"nats://127.0.0.1:{port}", publish_timeout_s=2.0),
    )
    app = await create_app(settings)
    await app.start()
    try:
        async with channel(f"127.0.0.1:{app.grpc.port}", await issue_key(database_url)) as calls:
            stub = ingest_pb2_grpc.IngestServiceStub(calls)
            ok = await stub.SendEvents(
                ingest_pb2.SendEventsRequest(events=[event(user_id=unique, identify=identify(a=1))])
            )
            assert ok.results[0].outcome == ACCEPTED

            devstack.stop_process(nats)
            response = await asyncio.wait_for(
                stub.SendEvents(
                    ingest_pb2.SendEventsRequest(events=[event(user_id=unique, identify=identify(a=2))])
                ),
                timeout=10,
            )
            result = response.results[0]
            assert result.outcome == RETRY
            assert result.status.code == grpc.StatusCode.UNAVAILABLE.value[0]
            detail_types = {d.type_url.rsplit("/", 1)[-1] for d in result.status.details}
            assert detail_types == {"google.rpc.ErrorInfo", "google.rpc.RetryInfo"}

            several = await asyncio.wait_for(  # published as one atomic batch
                stub.SendEvents(
                    ingest_pb2.SendEventsRequest(
                        events=[event(user_id=unique, identify=identify(a=n)) for n in range(3, 6)]
                    )
                ),
                timeout=10,
            )
            assert [r.outcome for r in several.results] == [RETRY] * 3
    finally:
        await app.stop(grace_s=1)
        devstack.stop_process(nats)


async def test_a_streams_events_reach_the_log_in_the_order_they_were_sent(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub, nats_url: str, unique: str
) -> None:
    # Many small batches run side by side (their dedup queries return in any order); the
    # profile merger must still get one customer's events in order, or it replays history.
    events = [event(user_id=f"u-{unique}", product_viewed=product_viewed(f"sku-{i}")) for i in range(600)]

    async def requests() -> AsyncIterator[ingest_pb2.StreamEventsRequest]:
        for e in events:
            yield ingest_pb2.StreamEventsRequest(event=e)
            if len(e.event_id) % 3 == 0:
                await asyncio.sleep(0)  # let batches form at random points

    client = await nats.connect(nats_url)
    try:
        js = client.jetstream()
        start = (await js.stream_info(JetStreamSettings().stream)).state.last_seq + 1
        outcomes = [r.result.outcome async for r in ingest_stub.StreamEvents(requests())]
        assert set(outcomes) == {ACCEPTED}
        end = (await js.stream_info(JetStreamSettings().stream)).state.last_seq
        logged = []
        for seq in range(start, end + 1):
            stored = await js.get_msg(JetStreamSettings().stream, seq)
            assert stored.data is not None
            logged.append(ingest_pb2.Event.FromString(stored.data))
    finally:
        await client.close()
    assert [e.event_id for e in logged if e.customer.user_id == f"u-{unique}"] == [e.event_id for e in events]


def test_the_stream_linger_comes_from_the_environment() -> None:
    assert Settings().stream_linger_ms == 20
    assert Settings.from_env({"INGEST_STREAM_LINGER_MS": "0"}).stream_linger_ms == 0


@pytest.mark.parametrize(("linger_ms", "batches"), [(0, 6), (2000, 1)])
async def test_stream_events_arriving_within_the_linger_go_to_the_log_as_one_batch(
    database_url: str, nats_url: str, unique: str, linger_ms: float, batches: int
) -> None:
    """Without a linger, an event goes out as soon as it is read: one sent only after the
    previous one's answer cannot share its publish. With one, events sent together do. (Events
    sent 10 ms apart once shared a publish without a linger on a loaded machine: the gaps were
    the producer's, not the server's.)"""
    settings = Settings(
        **LOCAL_SERVER,
        database_url=database_url,
        event_log=JetStreamSettings(url=nats_url),
        stream_linger_ms=linger_ms,
    )
    events = [event(user_id=f"l-{unique}", product_viewed=product_viewed(f"sku-{i}")) for i in range(6)]
    answered = asyncio.Queue[None]()

    async def one_at_a_time() -> AsyncIterator[ingest_pb2.StreamEventsRequest]:
        for e in events:
            yield ingest_pb2.StreamEventsRequest(event=e)
            await answered.get()

    async def all_at_once() -> AsyncIterator[ingest_pb2.StreamEventsRequest]:
        for e in events:
            yield ingest_pb2.StreamEventsRequest(event=e)

    app = await create_app(settings)
    await app.start()
    client = await nats.connect(nats_url)
    try:
        js = client.jetstream()
        start = (await js.stream_info(JetStreamSettings().stream)).state.last_seq + 1
        async with channel(f"127.0.0.1:{app.grpc.port}", await issue_key(database_url)) as calls:
            stub = ingest_pb2_grpc.IngestServiceStub(calls)
            outcomes = []
            async for r in stub.StreamEvents(one_at_a_time() if linger_ms == 0 else all_at_once()):
                outcomes.append(r.result.outcome)
                answered.put_nowait(None)
        assert outcomes == [ACCEPTED] * 6
        end = (await js.stream_info(JetStreamSettings().stream)).state.last_seq
        published_in: dict[str, str] = {}  # event id -> the publish it went out in
        for seq in range(start, end + 1):
            stored = await js.get_msg(JetStreamSettings().stream, seq)
            headers = stored.headers or {}
            # A lone event goes out on its own, not as an atomic batch of one.
            published_in[headers["Nats-Msg-Id"]] = headers.get("Nats-Batch-Id", f"alone-{seq}")
    finally:
        await client.close()
        await app.stop(grace_s=1)
    assert len({published_in[e.event_id] for e in events}) == batches


async def test_outcomes_are_counted_for_prometheus_by_source_outcome_and_reason(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub, unique: str
) -> None:
    good = event(user_id=f"m-{unique}", product_viewed=product_viewed("sku-1"))
    no_customer = event(cart_item_added=cart_item_added("sku-1"))
    source = ingest_pb2.EventSource.Name(good.source).removeprefix("EVENT_SOURCE_").lower()
    kinds = ("event_log_window", "event_id", "business_key")

    def counts() -> list[float]:
        def counted(name: str, **labels: str) -> float:
            return REGISTRY.get_sample_value(name, {"source": source, **labels}) or 0.0

        events = "sendtime_ingest_events_total"
        return [
            counted(events, outcome="accepted", reason=""),
            counted(events, outcome="rejected", reason="INVALID_ARGUMENT"),
            counted(events, outcome="duplicate", reason=""),
            sum(counted("sendtime_ingest_duplicates_total", kind=kind) for kind in kinds),
            counted("sendtime_ingest_dead_letters_total", kind="event"),
        ]

    before = counts()
    await ingest_stub.SendEvents(ingest_pb2.SendEventsRequest(events=[good, no_customer]))
    again = await ingest_stub.SendEvents(ingest_pb2.SendEventsRequest(events=[good]))
    assert again.results[0].outcome == DUPLICATE
    assert [a - b for a, b in zip(counts(), before, strict=True)] == [1, 1, 1, 1, 1]
