"""DeliveryService served on real PostgreSQL: the delivery log (newest first, a page at a time),
Redeliver, and subscriptions: a stream sends the pending deliveries in the order they were
made, at most max_unacknowledged at once, sends again what is not acknowledged within the ack
timeout, and stops sending what is; it ends cleanly when the server stops."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any, TypeAlias

import grpc
import pytest

from sendtime.triggers.v1 import triggers_pb2, triggers_pb2_grpc
from tests.conftest import channel, triggers_settings
from tests.triggers.service_support import new_subscription, new_webhook, reason, violated_fields
from tests.triggers.store_support import T0, insert_delivery
from triggers.server import TriggersApp, create_app

# Strings: the async stub types exist for type checkers only.
Destinations: TypeAlias = "triggers_pb2_grpc.DestinationServiceAsyncStub"
Deliveries: TypeAlias = "triggers_pb2_grpc.DeliveryServiceAsyncStub"


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
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._reading = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for answer in self.stream:
            self._queue.put_nowait(answer.delivery.name)

    async def next(self, n: int, timeout_s: float = 5) -> list[str]:
        async with asyncio.timeout(timeout_s):
            return [await self._queue.get() for _ in range(n)]

    async def nothing_more(self, wait_s: float = 0.3) -> None:
        await asyncio.sleep(wait_s)
        assert self._queue.empty(), self._queue.get_nowait()

    async def ended(self) -> grpc.StatusCode:
        await self._reading
        code: grpc.StatusCode = await self.stream.code()
        return code

    def cancel(self) -> None:
        self.stream.cancel()
        self._reading.cancel()


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
    triggers_app: TriggersApp, destination_stub: Destinations, delivery_stub: Deliveries
) -> None:
    subscription = await new_subscription(destination_stub, ack_timeout_s=1)
    names = await made(triggers_app, subscription.name, 3)
    stream = Received(
        delivery_stub.SubscribeDeliveries(
            triggers_pb2.SubscribeDeliveriesRequest(destination=subscription.name, max_unacknowledged=2)
        )
    )
    try:
        assert await stream.next(2) == names[:2]  # the oldest first, two at most
        await stream.nothing_more()

        acked = await delivery_stub.AcknowledgeDeliveries(
            triggers_pb2.AcknowledgeDeliveriesRequest(destination=subscription.name, names=[names[0]])
        )
        assert acked.acknowledged == 1
        assert await stream.next(1) == [names[2]]  # room for one more

        # The second was not acknowledged within the second it had: sent again.
        started = time.monotonic()
        assert await stream.next(1) == [names[1]]
        assert time.monotonic() - started < 1.5
        acked = await delivery_stub.AcknowledgeDeliveries(
            triggers_pb2.AcknowledgeDeliveriesRequest(destination=subscription.name, names=names)
        )
        assert acked.acknowledged == 2  # the first was already
        await stream.nothing_more(wait_s=1.3)  # past the ack timeout: nothing comes back
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
        started = time.monotonic()
        await app.stop(grace_s=10)
        assert time.monotonic() - started < 5  # the stream did not hold the drain for its grace
        assert await stream.ended() == grpc.StatusCode.OK
