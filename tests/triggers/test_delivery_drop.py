"""Dropping what the dispatcher holds: an erased customer's deliveries, wherever they wait (for
a retry, for their lane, in flight), are not attempted again; others go on."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta

import orjson
from aiohttp import web

from tests.triggers.support import Receiver, until
from triggers.delivery import Dispatcher, DispatcherSettings, OutboundDelivery, WebhookDestination
from triggers.delivery_log import MemoryDeliveryLog
from triggers.signing import SigningKeys, new_signing_secret, new_webhook_id
from triggers.ssrf import AllowList, UrlPolicy

SECRET = new_signing_secret()
LOOPBACK_ALLOWED = UrlPolicy(AllowList.parse(["127.0.0.0/8", "::1"]))


class GatedTime:
    """A clock whose retries wait until the test opens the gate (then they are due)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)
        self.gate = asyncio.Event()

    def clock(self) -> datetime:
        return self.now

    async def sleep(self, seconds: float) -> None:
        await self.gate.wait()
        self.now += timedelta(seconds=seconds)


def delivery(n: int, customer_id: str, *, next_attempt_time: datetime | None = None) -> OutboundDelivery:
    body = orjson.dumps({"n": n, "profile": f"profiles/{customer_id}"})
    return OutboundDelivery(
        f"deliveries/{n}",
        "destinations/d1",
        new_webhook_id(),
        body,
        next_attempt_time=next_attempt_time,
        customer_id=customer_id,
    )


async def test_an_erased_customer_s_held_deliveries_are_dropped_wherever_they_wait() -> None:
    first_answer = asyncio.Event()

    async def answer(n: int, request: web.Request) -> web.StreamResponse:
        if n == 0:
            await first_answer.wait()  # the first delivery stays in flight until the test says
            return web.Response(status=503)
        return web.Response(status=204)

    receiver = await Receiver([SECRET], answer).start()
    time = GatedTime()
    dispatcher = Dispatcher(
        MemoryDeliveryLog(),
        LOOPBACK_ALLOWED,
        DispatcherSettings(),
        clock=time.clock,
        sleep=time.sleep,
        rng=random.Random(3),
    )
    await dispatcher.start()
    try:
        await dispatcher.set_destination(
            WebhookDestination("destinations/d1", receiver.url, SigningKeys(SECRET), max_concurrency=1)
        )
        dispatcher.submit(delivery(1, "erased"))  # in flight
        await until(lambda: len(receiver.requests) == 1)
        dispatcher.submit(delivery(2, "erased"))  # waiting for the lane
        dispatcher.submit(delivery(3, "erased", next_attempt_time=time.now + timedelta(minutes=5)))  # timer
        dispatcher.submit(delivery(4, "kept"))  # waiting for the lane
        assert dispatcher.pending("destinations/d1") == 4
        assert sorted(dispatcher.held()) == [f"deliveries/{n}" for n in (1, 2, 3, 4)]

        assert dispatcher.drop_customer("erased") == 3
        # The one in flight is held (its lease renewed) until its attempt ends.
        assert sorted(dispatcher.held()) == ["deliveries/1", "deliveries/4"]
        assert dispatcher.drop_customer("") == 0
        first_answer.set()  # the attempt in flight ends (503): it is not tried again
        await until(lambda: len(receiver.requests) == 2)
        time.gate.set()  # every wait for a retry is over
        await until(lambda: dispatcher.pending("destinations/d1") == 0)
        assert dispatcher.held() == []
        # One more, due after all of them: the lane attempts one at a time, in the order handed
        # over, so anything dropped but still attempted would come before it (a fixed wait also
        # passed while the dispatcher was merely slow).
        dispatcher.submit(delivery(5, "kept", next_attempt_time=time.now + timedelta(days=1)))
        await until(lambda: len(receiver.requests) == 3)
    finally:
        await dispatcher.close()
        await receiver.stop()
    assert [orjson.loads(r.body)["n"] for r in receiver.requests] == [1, 4, 5]


async def test_deliveries_are_dropped_by_name() -> None:
    time = GatedTime()
    dispatcher = Dispatcher(MemoryDeliveryLog(), LOOPBACK_ALLOWED, clock=time.clock, sleep=time.sleep)
    await dispatcher.start()
    try:
        await dispatcher.set_destination(
            WebhookDestination("destinations/d1", "http://127.0.0.1:9/hooks", SigningKeys(SECRET))
        )
        later = time.now + timedelta(hours=1)
        for n in (1, 2, 3):
            dispatcher.submit(delivery(n, "c", next_attempt_time=later))
        assert dispatcher.drop_deliveries(["deliveries/1", "deliveries/3", "deliveries/9"]) == 2
        assert dispatcher.pending("destinations/d1") == 1
        assert dispatcher.held() == ["deliveries/2"]
    finally:
        await dispatcher.close()
