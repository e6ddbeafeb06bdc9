"""Ingest at depth, on real NATS and PostgreSQL: every event type end to end, derived ids,
dedup within and beyond the event log's window and by business key, the dead-letter round
trip, outcome counts, and PostgreSQL going away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

import devstack
from ingest.server import IngestApp, create_app
from ingest.settings import Settings
from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime_common.errors import field_violations, status_of
from sendtime_common.event_log import (
    ErasureHandler,
    EventLogSubscription,
    Following,
    JetStreamEventLog,
    JetStreamSettings,
    OutgoingMessage,
    PublishOutcome,
    PublishReceipt,
)
from tests.conftest import LOCAL_SERVER, channel, empty_database, eventually, user, wait_for_profile
from tests.factories import cart_item_added, event, identify, money, order_completed, timestamp
from tests.ingest.test_validation import VALID_PAYLOADS
from tests.keys import issue_key

ACCEPTED = ingest_pb2.EVENT_OUTCOME_ACCEPTED
DUPLICATE = ingest_pb2.EVENT_OUTCOME_DUPLICATE
REJECTED = ingest_pb2.EVENT_OUTCOME_REJECTED
RETRY = ingest_pb2.EVENT_OUTCOME_RETRY


@asynccontextmanager
async def ingest_service(
    **settings: Any,
) -> AsyncIterator[tuple[IngestApp, ingest_pb2_grpc.IngestServiceAsyncStub]]:
    """An ingest service of its own (settings as given), with a client."""
    app_settings = Settings(**LOCAL_SERVER, **settings)
    app = await create_app(app_settings)
    await app.start()
    try:
        async with channel(f"127.0.0.1:{app.grpc.port}", await issue_key(app_settings.database_url)) as calls:
            yield app, ingest_pb2_grpc.IngestServiceStub(calls)
    finally:
        await app.stop(grace_s=1)


async def send(
    stub: ingest_pb2_grpc.IngestServiceAsyncStub, *events: ingest_pb2.Event
) -> list[ingest_pb2.EventResult]:
    response = await stub.SendEvents(ingest_pb2.SendEventsRequest(events=list(events)))
    return list(response.results)


async def test_every_event_type_is_accepted_and_merges(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    unique: str,
) -> None:
    events = [event(user_id=f"u-{unique}", **{name: payload}) for name, payload in VALID_PAYLOADS.items()]
    results = await send(ingest_stub, *events)
    assert [r.outcome for r in results] == [ACCEPTED] * len(events), results
    # The alias linked the anonymous id to the same customer.
    anonymous = profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_ANONYMOUS_ID, value="anon-1")
    by_anonymous = await wait_for_profile(profile_stub, anonymous, lambda p: p.traits["first_name"] == "Ada")
    assert (
        by_anonymous.customer_id
        == (await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: True)).customer_id
    )


async def test_an_event_without_id_gets_a_derived_one_and_a_resend_is_a_duplicate(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub, unique: str
) -> None:
    fact = event(event_id="", user_id=f"u-{unique}", identify=identify(plan="pro"))
    (first,) = await send(ingest_stub, fact)
    (again,) = await send(ingest_stub, fact)
    assert first.outcome == ACCEPTED and first.event_id.startswith("auto-")
    assert (again.outcome, again.event_id) == (DUPLICATE, first.event_id)


async def test_a_fact_resent_under_another_id_counts_once(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub, unique: str
) -> None:
    order = order_completed(f"order-{unique}", "25.00", "sku-1")
    refund = ingest_pb2.OrderRefunded(
        order_id=f"order-{unique}", refund_id=f"refund-{unique}", amount=money("5.00")
    )
    results = await send(
        ingest_stub,
        event(user_id=f"u-{unique}", order_completed=order),
        event(user_id=f"u-{unique}", order_completed=order),  # same batch, another id
        event(user_id=f"u-{unique}", order_refunded=refund),
    )
    assert [r.outcome for r in results] == [ACCEPTED, DUPLICATE, ACCEPTED]
    later = await send(
        ingest_stub,
        event(user_id=f"u-{unique}", order_completed=order),
        event(user_id=f"u-{unique}", order_refunded=refund),
    )
    assert [r.outcome for r in later] == [DUPLICATE, DUPLICATE]


async def test_a_resend_after_the_event_log_window_is_still_a_duplicate(
    tmp_path: Path, database_url: str, unique: str
) -> None:
    port = devstack.free_port()
    nats = devstack.start_nats(port, tmp_path / "nats")
    try:
        log_settings = JetStreamSettings(url=f"nats://127.0.0.1:{port}", duplicate_window_s=1)
        async with ingest_service(database_url=database_url, event_log=log_settings) as (app, stub):
            e = event(user_id=f"u-{unique}", identify=identify(a=1))
            assert [r.outcome for r in await send(stub, e)] == [ACCEPTED]
            # Past JetStream's duplicate window, on positive evidence: a probe stored after the
            # event is forgotten too (nats-server forgets ids in the order it stored them, when
            # its purge timer fires, which a loaded machine delays).
            probe = OutgoingMessage("identify", f"probe-{unique}", b"probe")
            assert not (await app.event_log.publish(probe)).duplicate

            async def probe_forgotten() -> bool | None:
                return not (await app.event_log.publish(probe)).duplicate or None

            await eventually(probe_forgotten, timeout_s=30)
            # The log would take it as new now: the duplicate is ingest's own record.
            assert [r.outcome for r in await send(stub, e)] == [DUPLICATE]

            # Once the ids are purged (the dedup window has passed), the same id is new again.
            assert await app.store.purge_processed(datetime.now(UTC) + timedelta(seconds=1)) >= 1
            assert [r.outcome for r in await send(stub, e)] == [ACCEPTED]
    finally:
        devstack.stop_process(nats)


async def test_skewed_sender_clock_is_corrected_with_sent_at(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub, unique: str
) -> None:
    fast = datetime.now(UTC) + timedelta(hours=2)  # the sender's clock is two hours fast
    without = event(user_id=f"u-{unique}", occurred_at=fast, identify=identify(a=1))
    with_sent_at = event(user_id=f"u-{unique}", occurred_at=fast, identify=identify(a=2))
    with_sent_at.sent_at.CopyFrom(timestamp(fast + timedelta(seconds=1)))
    results = await send(ingest_stub, without, with_sent_at)
    assert [r.outcome for r in results] == [REJECTED, ACCEPTED]
    assert field_violations(results[0].status)[0].field == "occurred_at"


async def test_rejected_events_are_listed_and_replayed_once_the_cause_is_fixed(
    nats_url: str, database_url: str, unique: str
) -> None:
    source = ingest_pb2.EVENT_SOURCE_MOBILE_APP  # only this test's rejections use it
    strict = {
        "database_url": database_url,
        "event_log": JetStreamSettings(url=nats_url),
        "custom_event_names": "quiz_completed",
    }
    unknown_name = event(
        user_id=f"u-{unique}", source=source, custom=ingest_pb2.CustomEvent(name="quiz_started")
    )
    bad_quantity = event(
        user_id=f"u-{unique}", source=source, cart_item_added=cart_item_added("s", quantity=0)
    )
    fillers = [
        event(user_id=f"u-{unique}", source=source, cart_item_removed=ingest_pb2.CartItemRemoved(sku=f"s{i}"))
        for i in range(3)
    ]
    async with ingest_service(**strict) as (_, stub):
        results = await send(stub, unknown_name, bad_quantity, *fillers)
        assert [r.outcome for r in results] == [REJECTED] * 5

        # Paged, newest first; a token is only good for the filters it was issued for.
        names, token = [], ""
        while True:
            page = await stub.ListRejectedEvents(
                ingest_pb2.ListRejectedEventsRequest(page_size=2, page_token=token, source=source)
            )
            names += [r.name for r in page.rejected_events]
            assert len(page.rejected_events) <= 2
            if not (token := page.next_page_token):
                break
        assert len(names) == len(set(names)) >= 5
        first = await stub.ListRejectedEvents(
            ingest_pb2.ListRejectedEventsRequest(page_size=1, source=source)
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListRejectedEvents(
                ingest_pb2.ListRejectedEventsRequest(
                    page_token=first.next_page_token, source=ingest_pb2.EVENT_SOURCE_WEB
                )
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        status = status_of(caught.value)
        assert status is not None and field_violations(status)[0].field == "page_token"

        listed = {
            r.event.event_id: r
            for r in (
                await stub.ListRejectedEvents(
                    ingest_pb2.ListRejectedEventsRequest(page_size=1000, source=source)
                )
            ).rejected_events
        }
        dead_name = listed[unknown_name.event_id]
        assert dead_name.state == ingest_pb2.REJECTED_EVENT_STATE_PENDING
        assert field_violations(dead_name.status)[0].field == "custom.name"

        # A corrected event replaces a bad one; replaying it twice is refused.
        fixed = ingest_pb2.Event()
        fixed.CopyFrom(bad_quantity)
        fixed.cart_item_added.quantity = 2
        replayed = await stub.ReplayRejectedEvent(
            ingest_pb2.ReplayRejectedEventRequest(
                name=listed[bad_quantity.event_id].name, corrected_event=fixed
            )
        )
        assert replayed.result.outcome == ACCEPTED
        assert replayed.rejected_event.state == ingest_pb2.REJECTED_EVENT_STATE_REPLAYED
        with pytest.raises(grpc.aio.AioRpcError) as twice:
            await stub.ReplayRejectedEvent(
                ingest_pb2.ReplayRejectedEventRequest(name=replayed.rejected_event.name)
            )
        assert twice.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        # Still unknown under this configuration: stays pending, no second dead letter.
        still = await stub.ReplayRejectedEvent(ingest_pb2.ReplayRejectedEventRequest(name=dead_name.name))
        assert still.result.outcome == REJECTED
        assert still.rejected_event.state == ingest_pb2.REJECTED_EVENT_STATE_PENDING

    # The configuration is fixed (the name is now known): the stored event replays as it was.
    async with ingest_service(**(strict | {"custom_event_names": "quiz_completed,quiz_started"})) as (
        _,
        stub,
    ):
        replayed = await stub.ReplayRejectedEvent(ingest_pb2.ReplayRejectedEventRequest(name=dead_name.name))
        assert (replayed.result.outcome, replayed.result.event_id) == (ACCEPTED, unknown_name.event_id)
        pending = await stub.ListRejectedEvents(
            ingest_pb2.ListRejectedEventsRequest(
                page_size=1000, source=source, state=ingest_pb2.REJECTED_EVENT_STATE_PENDING
            )
        )
        assert {r.event.event_id for r in pending.rejected_events} == {e.event_id for e in fillers}

        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.ReplayRejectedEvent(
                ingest_pb2.ReplayRejectedEventRequest(name="rejectedEvents/999999999")
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as malformed:
            await stub.ReplayRejectedEvent(ingest_pb2.ReplayRejectedEventRequest(name="events/1"))
        assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_outcomes_are_counted_per_source_with_duplicates_by_kind(nats_url: str, unique: str) -> None:
    # In a database of its own: the counts are the whole database's, and the other ingest services
    # on this worker (the session's, flushing once a second) write CRM counts to theirs late.
    crm = ingest_pb2.EVENT_SOURCE_CRM
    async with (
        empty_database("outcomes") as database_url,
        ingest_service(database_url=database_url, event_log=JetStreamSettings(url=nats_url)) as (_, stub),
    ):
        before = await stub.GetIngestStats(ingest_pb2.GetIngestStatsRequest())
        e = event(user_id=f"u-{unique}", source=crm, identify=identify(a=1))
        order = order_completed(f"o-{unique}", "5.00")
        await send(
            stub,
            e,
            event(user_id=f"u-{unique}", source=crm, identify=ingest_pb2.Identify()),
            event(user_id=f"u-{unique}", source=crm, order_completed=order),
        )
        await send(stub, e, event(user_id=f"u-{unique}", source=crm, order_completed=order))
        after = await stub.GetIngestStats(ingest_pb2.GetIngestStatsRequest())

    def crm_counts(response: ingest_pb2.GetIngestStatsResponse) -> dict[str, int]:
        for s in response.sources:
            if s.source == crm:
                counts = {"accepted": s.accepted, "rejected": s.rejected}
                counts |= {ingest_pb2.DuplicateKind.Name(d.kind): d.count for d in s.duplicates}
                return counts
        return {}

    b, a = crm_counts(before), crm_counts(after)
    assert {k: a.get(k, 0) - b.get(k, 0) for k in a} == {
        "accepted": 2,
        "rejected": 1,
        "DUPLICATE_KIND_EVENT_ID": 1,
        "DUPLICATE_KIND_BUSINESS_KEY": 1,
    }
    assert after.HasField("start_time")


async def test_with_postgres_down_events_get_retry_never_accepted(
    private_postgres: tuple[str, Path], nats_url: str, unique: str
) -> None:
    dsn, workdir = private_postgres
    async with ingest_service(database_url=dsn, event_log=JetStreamSettings(url=nats_url)) as (_, stub):
        (ok,) = await send(stub, event(user_id=f"u-{unique}", identify=identify(a=1)))
        assert ok.outcome == ACCEPTED
        devstack.stop_postgres(workdir)
        results = await asyncio.wait_for(
            send(
                stub,
                event(user_id=f"u-{unique}", identify=identify(a=2)),
                event(
                    user_id=f"u-{unique}", identify=ingest_pb2.Identify()
                ),  # invalid: cannot be dead-lettered
            ),
            timeout=30,
        )
        assert [r.outcome for r in results] == [RETRY, RETRY]
        assert results[0].status.code == grpc.StatusCode.UNAVAILABLE.value[0]


class SlowEventLog:
    """The real event log behind a delay, counting publishes in progress: shows how much work
    a flooding stream can put in flight."""

    def __init__(self, inner: JetStreamEventLog, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s
        self.in_flight = self.most_in_flight = 0

    async def publish(self, message: OutgoingMessage) -> PublishReceipt:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
            return await self.inner.publish(message)
        finally:
            self.in_flight -= 1

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> Awaitable[list[PublishOutcome]]:
        self.in_flight += len(messages)
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        confirmations = await self.inner.publish_batch(messages)

        async def outcomes() -> list[PublishOutcome]:
            try:
                await asyncio.sleep(self.delay_s)  # a slow log: its answers take a while
                return await confirmations
            finally:
                self.in_flight -= len(messages)

        return outcomes()

    async def subscribe(self, durable_name: str, *, lane: int | None = None) -> EventLogSubscription:
        return await self.inner.subscribe(durable_name, lane=lane)

    async def read(self, position: int) -> bytes | None:
        return await self.inner.read(position)

    async def erase(self, positions: Sequence[int]) -> None:
        await self.inner.erase(positions)

    async def publish_erasure(self, notice_id: str, notice: bytes) -> None:
        await self.inner.publish_erasure(notice_id, notice)

    async def follow_erasures(self, handle: ErasureHandler) -> Following:
        return await self.inner.follow_erasures(handle)

    async def publish_profile_changes(self, changes: Sequence[OutgoingMessage]) -> list[PublishOutcome]:
        return await self.inner.publish_profile_changes(changes)

    async def subscribe_profile_changes(self, durable_name: str) -> EventLogSubscription:
        return await self.inner.subscribe_profile_changes(durable_name)

    async def close(self) -> None:
        await self.inner.close()


async def test_a_flooding_stream_is_held_to_its_in_flight_limit(
    nats_url: str, database_url: str, unique: str
) -> None:
    slow = SlowEventLog(await JetStreamEventLog.connect(JetStreamSettings(url=nats_url)), delay_s=0.01)
    app = await create_app(
        Settings(**LOCAL_SERVER, database_url=database_url, max_in_flight_per_stream=16),
        event_log=slow,
    )
    await app.start()
    sent = 0

    async def flood() -> AsyncIterator[ingest_pb2.StreamEventsRequest]:
        nonlocal sent
        for i in range(400):
            sent += 1
            yield ingest_pb2.StreamEventsRequest(
                event=event(user_id=f"u-{unique}-{i % 7}", identify=identify(n=i))
            )

    try:
        async with channel(f"127.0.0.1:{app.grpc.port}", await issue_key(database_url)) as calls:
            stub = ingest_pb2_grpc.IngestServiceStub(calls)
            outcomes = [r.result.outcome async for r in stub.StreamEvents(flood())]
    finally:
        await app.stop(grace_s=1)
    assert outcomes == [ACCEPTED] * 400
    assert 1 < slow.most_in_flight <= 16  # batched, and never more than the stream's limit
