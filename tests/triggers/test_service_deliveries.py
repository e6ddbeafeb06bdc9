"""DeliveryService served on real PostgreSQL: the delivery log (newest first, a page at a time),
Redeliver, and subscriptions: a stream sends the pending deliveries in the order they were
made, at most max_unacknowledged at once, sends again what is not acknowledged within the ack
timeout, and stops sending what is; it ends cleanly when the server stops."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, TypeAlias

import grpc
import pytest

from sendtime.triggers.v1 import triggers_pb2, triggers_pb2_grpc
from tests.conftest import channel, eventually, triggers_settings
from tests.triggers.service_support import new_subscription, new_webhook, reason, violated_fields
from tests.triggers.store_support import T0, insert_delivery
from triggers import delivery_servicer
from triggers.delivery_store import DeliveryStore
from triggers.server import TriggersApp, create_app

# Strings: the async stub types exist for type checkers only.
Destinations: TypeAlias = "triggers_pb2_grpc.DestinationServiceAsyncStub"
Deliveries: TypeAlias = "triggers_pb2_grpc.DeliveryServiceAsyncStub"

# Longer than a stop takes on a loaded machine (its close is bounded by seconds), so that a stream
# held until the grace ran out is told apart from a slow stop.
STOP_GRACE_S = 60


async def made(app: TriggersApp, destination: str, n: int) -> list[str]:
    """``n`` pending deliveries to ``destination``, a second apart, oldest first: their names."""
    return [
        await insert_delivery(
            app.pool, destination, created_at=T0 + timedelta(seconds=i), payload=f'{{"n": {i}}}'
        )
        for i in range(n)
    ]


class Received:
    """What a stream sends, read by a task of its own: cancelling a read would cancel the call."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.got: list[str] = []  # everything sent, in order
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._reading = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for answer in self.stream:
            self.got.append(answer.delivery.name)
            self._queue.put_nowait(answer.delivery.name)

    async def next(self, n: int, timeout_s: float = 30) -> list[str]:
        async with asyncio.timeout(timeout_s):
            return [await self._queue.get() for _ in range(n)]

    def nothing_more(self) -> None:
        assert self._queue.empty(), self._queue.get_nowait()

    async def at_least(self, n: int) -> None:
        async def got_them() -> bool:
            return len(self.got) >= n

        await eventually(got_them, timeout_s=30)

    async def ended(self) -> grpc.StatusCode:
        await self._reading
        code: grpc.StatusCode = await self.stream.code()
        return code

    def cancel(self) -> None:
        self.stream.cancel()
        self._reading.cancel()


class ServicerClock:
    """The clock of the subscription streams (``datetime.now`` in triggers.delivery_servicer),
    moved only by the test: an ack deadline passes when the test moves it past, not when a
    loaded machine took a second over the rounds before. The store compares with the time the
    stream passes it, and acknowledging does not look at the time."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.at = datetime.now(UTC)  # the deliveries the tests make are due since T0
        monkeypatch.setattr(delivery_servicer, "datetime", self)

    def now(self, tz: tzinfo | None = None) -> datetime:
        return self.at


class Rounds:
    """What the streams of one subscription asked the store, round by round (the session's
    triggers service runs in this process): each round with deliveries out asks which of them
    are still pending, and each round with room takes what is due. Positive evidence of what a
    stream did and did not send, however slow the machine."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, destination: str) -> None:
        self.looked = 0  # rounds that asked which of the deliveries out are still pending
        self.takes: list[tuple[datetime, list[str]]] = []  # each take: its time, what it took
        destination_id = destination.removeprefix("destinations/")
        still_pending, take = DeliveryStore.still_pending, DeliveryStore.take_for_subscription

        async def looking(store: DeliveryStore, of: str, delivery_ids: Sequence[int]) -> set[int]:
            self.looked += of == destination_id
            return await still_pending(store, of, delivery_ids)

        async def taking(
            store: DeliveryStore, of: str, now: datetime, *, ack_timeout: timedelta, limit: int
        ) -> list[triggers_pb2.Delivery]:
            taken = await take(store, of, now, ack_timeout=ack_timeout, limit=limit)
            if of == destination_id:
                self.takes.append((now, [d.name for d in taken]))
            return taken

        monkeypatch.setattr(DeliveryStore, "still_pending", looking)
        monkeypatch.setattr(DeliveryStore, "take_for_subscription", taking)

    async def more_looks(self, rounds: int) -> None:
        """Until the streams have looked ``rounds`` more times (the rounds before the last have
        taken what they took)."""
        target = self.looked + rounds

        async def looked() -> bool:
            return self.looked >= target

        await eventually(looked, timeout_s=30)

    async def a_take_at(self, when: datetime) -> None:
        """Until a round at ``when`` or later has taken what it took."""

        async def taken() -> bool:
            return any(now >= when for now, _ in self.takes)

        await eventually(taken, timeout_s=30)


async def test_deliveries_are_listed_newest_first_read_and_redelivered(
    triggers_app: TriggersApp, destination_stub: Destinations, delivery_stub: Deliveries
) -> None:
    destination = (await new_webhook(destination_stub)).destination
    names = await made(triggers_app, destination.name, 3)

    first = await delivery_stub.ListDeliveries(
        triggers_pb2.ListDeliveriesRequest(destination=destination.name, page_size=2)
    )
    rest = await delivery_stub.ListDeliveries(
        triggers_pb2.ListDeliveriesRequest(
            destination=destination.name, page_size=2, page_token=first.next_page_token
        )
    )
    assert [d.name for d in [*first.deliveries, *rest.deliveries]] == names[::-1]
    assert not rest.next_page_token

    got = (await delivery_stub.GetDelivery(triggers_pb2.GetDeliveryRequest(name=names[0]))).delivery
    assert got.destination == destination.name and got.payload["n"] == 0
    await triggers_app.pool.execute(
        "UPDATE triggers_deliveries SET state = 3, available_at = NULL WHERE id = $1",
        int(names[0].removeprefix("deliveries/")),
    )
    again = (await delivery_stub.Redeliver(triggers_pb2.RedeliverRequest(name=names[0]))).delivery
    assert again.state == triggers_pb2.DELIVERY_STATE_PENDING and again.webhook_id == got.webhook_id

    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await delivery_stub.ListDeliveries(
            triggers_pb2.ListDeliveriesRequest(destination="destinations/nowhere")
        )
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await delivery_stub.GetDelivery(triggers_pb2.GetDeliveryRequest(name="deliveries/999999999"))
    assert reason(missing.value) == "DELIVERY_NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as malformed:
        await delivery_stub.Redeliver(triggers_pb2.RedeliverRequest(name="deliveries/one"))
    assert violated_fields(malformed.value) == {"name"}


async def test_a_subscription_streams_in_order_resends_after_its_ack_timeout_and_stops_once_acknowledged(
    triggers_app: TriggersApp,
    destination_stub: Destinations,
    delivery_stub: Deliveries,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    subscription = await new_subscription(destination_stub, ack_timeout_s=1)
    ack_timeout = timedelta(seconds=1)
    names = await made(triggers_app, subscription.name, 3)
    clock = ServicerClock(monkeypatch)
    rounds = Rounds(monkeypatch, subscription.name)
    stream = Received(
        delivery_stub.SubscribeDeliveries(
            triggers_pb2.SubscribeDeliveriesRequest(destination=subscription.name, max_unacknowledged=2)
        )
    )

    def all_taken() -> list[str]:
        return [name for _, names_taken in rounds.takes for name in names_taken]

    try:
        assert await stream.next(2) == names[:2]  # the oldest first, two at most
        # Rounds went by with the two out, and took nothing more (a fixed wait also passed while
        # the stream was merely slow).
        await rounds.more_looks(3)
        sent_at, first = rounds.takes[0]
        assert sent_at == clock.at
        assert first == names[:2] and all(taken == [] for _, taken in rounds.takes[1:])
        stream.nothing_more()

        acked = await delivery_stub.AcknowledgeDeliveries(
            triggers_pb2.AcknowledgeDeliveriesRequest(destination=subscription.name, names=[names[0]])
        )
        assert acked.acknowledged == 1
        assert await stream.next(1) == [names[2]]  # room for one more
        # The third acknowledged too: only the second is left out. Rounds before its deadline
        # (the clock has not moved) send nothing again.
        acked = await delivery_stub.AcknowledgeDeliveries(
            triggers_pb2.AcknowledgeDeliveriesRequest(destination=subscription.name, names=[names[2]])
        )
        assert acked.acknowledged == 1
        await rounds.more_looks(2)
        assert all_taken() == names  # the first two, then the third

        # The second was not acknowledged within the second it had: sent again, by the first
        # round past its deadline.
        clock.at = sent_at + ack_timeout
        assert await stream.next(1) == [names[1]]
        past_deadline = [taken for now, taken in rounds.takes if now >= sent_at + ack_timeout]
        assert past_deadline[0] == [names[1]]
        acked = await delivery_stub.AcknowledgeDeliveries(
            triggers_pb2.AcknowledgeDeliveriesRequest(destination=subscription.name, names=names)
        )
        assert acked.acknowledged == 1  # the first and the third were already
        # Past the ack timeout of anything sent before (a round that late has taken what it took),
        # nothing comes back.
        clock.at += ack_timeout
        await rounds.a_take_at(clock.at)
        assert all_taken() == [*names, names[1]]  # the second once more, and nothing since
        await stream.at_least(len(all_taken()))
        assert stream.got == all_taken()  # and it sent nothing it did not take
    finally:
        stream.cancel()

    listed = await delivery_stub.ListDeliveries(
        triggers_pb2.ListDeliveriesRequest(
            destination=subscription.name, state=triggers_pb2.DELIVERY_STATE_DELIVERED
        )
    )
    assert sorted(d.name for d in listed.deliveries) == sorted(names)


async def test_only_a_subscription_is_streamed_or_acknowledged(
    destination_stub: Destinations, delivery_stub: Deliveries
) -> None:
    webhook = (await new_webhook(destination_stub)).destination
    with pytest.raises(grpc.aio.AioRpcError) as ack:
        await delivery_stub.AcknowledgeDeliveries(
            triggers_pb2.AcknowledgeDeliveriesRequest(destination=webhook.name, names=["deliveries/1"])
        )
    assert ack.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason(ack.value) == "DESTINATION_NOT_A_SUBSCRIPTION"
    with pytest.raises(grpc.aio.AioRpcError) as stream:
        async for _ in delivery_stub.SubscribeDeliveries(
            triggers_pb2.SubscribeDeliveriesRequest(destination=webhook.name)
        ):
            pass
    assert stream.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await delivery_stub.AcknowledgeDeliveries(
            triggers_pb2.AcknowledgeDeliveriesRequest(destination=webhook.name, names=["nope"])
        )
    assert violated_fields(bad.value) == {"names[0]"}


async def test_a_stream_ends_cleanly_when_the_server_stops(
    triggers_app: TriggersApp,
    destination_stub: Destinations,
    database_url: str,
    nats_url: str,
    admin_key: str,
) -> None:
    subscription = await new_subscription(destination_stub)
    (name,) = await made(triggers_app, subscription.name, 1)
    app = await create_app(
        triggers_settings(
            "127.0.0.1:1", "127.0.0.1:1", database_url, nats_url, profile_api_key="k", render_api_key="k"
        )
    )
    await app.start()
    async with channel(f"127.0.0.1:{app.grpc.port}", admin_key) as calls:
        stream = Received(
            triggers_pb2_grpc.DeliveryServiceStub(calls).SubscribeDeliveries(
                triggers_pb2.SubscribeDeliveriesRequest(destination=subscription.name)
            )
        )
        assert await stream.next(1) == [name]
        # A drain that waited for the stream would hold it for the whole grace (then cut it): it
        # ends, cleanly, well before.
        stopping = asyncio.create_task(app.stop(grace_s=STOP_GRACE_S))
        try:
            assert await asyncio.wait_for(stream.ended(), STOP_GRACE_S / 2) == grpc.StatusCode.OK
        finally:
            await stopping
