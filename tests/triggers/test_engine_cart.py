"""The engine end to end, on real PostgreSQL, real NATS (the profile change stream) and real
HTTP receivers that verify every signature with standardwebhooks: the cart story of issue 17.
The profile reader and the renderer are small in-test implementations of our own interfaces;
the engine's clock is one the test moves, so no test waits for the hour."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import orjson
import pytest

from sendtime.triggers.v1 import triggers_pb2
from sendtime_common.event_log import JetStreamEventLog, JetStreamSettings
from tests.triggers.engine_support import (
    MovingClock,
    Profiles,
    Renderer,
    cart_added,
    cart_profile,
    change,
    episode_states,
    eventually_true,
    log_settings,
    nothing_more_on_the_way,
    order,
    publish,
    running_engine,
)
from tests.triggers.store_support import T0, Stores, unique, webhook
from tests.triggers.support import Receiver
from triggers import builtin
from triggers.secret_box import SecretBox
from triggers.signing import SigningKeys, new_signing_secret

DUE = T0 + timedelta(hours=1, seconds=5)  # an entry at T0 falls due (the hour and the lateness)
TEMPLATE = "templates/abandoned-cart"


@pytest.fixture
def log_config(nats_url: str) -> JetStreamSettings:
    return log_settings(nats_url)


@pytest.fixture
async def publisher(log_config: JetStreamSettings) -> AsyncIterator[JetStreamEventLog]:
    """The profile service's side: makes the streams and publishes the changes."""
    log = await JetStreamEventLog.connect(log_config)
    yield log
    await log.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = await Receiver([new_signing_secret()]).start()
    yield receiver
    await receiver.stop()


async def cart_trigger(stores: Stores, receiver: Receiver, template: str = TEMPLATE) -> str:
    """The ready-made cart reminder to the receiver's webhook, rendering ``template``."""
    destination_id = unique("d")
    await stores.destinations.create(
        destination_id, webhook(receiver.url), signing_keys=SigningKeys(receiver.secrets[0])
    )
    trigger = builtin.cart_abandoned([f"destinations/{destination_id}"], template)
    trigger.delivery.variables.update({"code": "COMEBACK10"})
    trigger_id = unique("cart")
    await stores.triggers.create(trigger_id, trigger)
    return trigger_id


async def test_an_abandoned_cart_sends_one_signed_webhook_with_the_rendered_message_after_the_hour(
    stores: Stores,
    store_url: str,
    box: SecretBox,
    log_config: JetStreamSettings,
    publisher: JetStreamEventLog,
    receiver: Receiver,
) -> None:
    trigger_id = await cart_trigger(stores, receiver)
    customer = unique("c")
    profiles, renderer, clock = Profiles(), Renderer(), MovingClock(T0)
    profiles.by_id[customer] = cart_profile(customer)
    async with running_engine(
        store_url, box, log_config, owner="a", profiles=profiles, renderer=renderer, clock=clock
    ) as replica:
        await publish(publisher, change(customer, cart_added(T0)))
        await eventually_true(lambda: replica.engine.consumer.stats.changes == 1)
        assert await episode_states(stores.pool, customer) == {f"{trigger_id}/": "waiting:"}

        clock.move(timedelta(minutes=59))  # not yet
        await nothing_more_on_the_way(stores, replica, trigger_id, clock.now)
        assert receiver.requests == []

        clock.now = DUE
        await eventually_true(lambda: len(receiver.requests) == 1)
        await nothing_more_on_the_way(stores, replica, trigger_id, clock.now)
        assert len(receiver.requests) == 1  # and no second one
        [request] = receiver.requests
        assert request.verified[receiver.secrets[0]]
        body = orjson.loads(request.body)
        assert body["type"] == "trigger.fired"
        data = body["data"]
        assert data["trigger"] == f"triggers/{trigger_id}" and data["profile"] == f"profiles/{customer}"
        assert data["fire_time"] == "2026-12-05T09:00:00.000000Z"
        assert data["fired_at"] == "2026-12-05T09:00:05.000000Z" == body["timestamp"]
        assert data["message"] == {
            "subject": f"{customer}, your cart is waiting",
            "html": "<p>Trail runner</p>",
            "text": "Trail runner",
            "template": TEMPLATE,
            "template_version": "3",
            "profile_version": "7",
        }
        assert data["variables"] == {"code": "COMEBACK10"}
        assert renderer.calls == [(TEMPLATE, customer, {"code": "COMEBACK10"})]

        async def delivered() -> bool:
            state = await stores.pool.fetchval(
                "SELECT state FROM triggers_deliveries WHERE customer_id = $1", customer
            )
            return bool(state == triggers_pb2.DELIVERY_STATE_DELIVERED)

        await eventually_true(delivered)
        assert await episode_states(stores.pool, customer) == {f"{trigger_id}/": "fired:fired"}


async def test_an_order_within_the_wait_sends_nothing(
    stores: Stores,
    store_url: str,
    box: SecretBox,
    log_config: JetStreamSettings,
    publisher: JetStreamEventLog,
    receiver: Receiver,
) -> None:
    trigger_id = await cart_trigger(stores, receiver)
    customer = unique("c")
    profiles, renderer, clock = Profiles(), Renderer(), MovingClock(T0)
    profiles.by_id[customer] = cart_profile(customer)
    async with running_engine(
        store_url, box, log_config, owner="a", profiles=profiles, renderer=renderer, clock=clock
    ) as replica:
        await publish(publisher, change(customer, cart_added(T0)))
        await publish(publisher, change(customer, order(T0 + timedelta(minutes=30))))
        await eventually_true(lambda: replica.engine.consumer.stats.changes == 2)
        assert await episode_states(stores.pool, customer) == {f"{trigger_id}/": "exited:exited"}
        clock.now = DUE + timedelta(hours=1)
        replica.engine.firer.wake()
        await nothing_more_on_the_way(stores, replica, trigger_id, clock.now)
    assert receiver.requests == []
    assert renderer.calls == []


async def test_two_engines_on_one_database_send_each_cart_reminder_exactly_once(
    stores: Stores,
    store_url: str,
    box: SecretBox,
    log_config: JetStreamSettings,
    publisher: JetStreamEventLog,
    receiver: Receiver,
) -> None:
    trigger = await stores.triggers.get(await cart_trigger(stores, receiver))
    [destination] = trigger.delivery.destinations
    customers = [unique("c") for _ in range(30)]
    profiles, renderer, clock = Profiles(), Renderer(), MovingClock(T0)
    for customer in customers:
        profiles.by_id[customer] = cart_profile(customer)
    common = {"profiles": profiles, "renderer": renderer, "clock": clock}
    async with (
        running_engine(store_url, box, log_config, owner="a", **common) as a,  # type: ignore[arg-type]
        running_engine(store_url, box, log_config, owner="b", **common) as b,  # type: ignore[arg-type]
    ):
        # Each change twice (a resend after the duplicate window): harmless.
        for customer in customers:
            made = change(customer, cart_added(T0))
            await publish(publisher, made)
            await publish(publisher, made)
        await eventually_true(lambda: a.engine.consumer.stats.changes + b.engine.consumer.stats.changes == 60)
        clock.now = DUE
        await eventually_true(lambda: len(receiver.requests) >= 30)

        # Nothing more on its way (a fixed wait also passed while the engines were merely slow):
        # no episode is left to claim, the settles under way are done, and neither dispatcher
        # holds a delivery, so every attempt made has been answered.
        async def none_waiting() -> bool:
            waiting = "SELECT count(*) FROM triggers_episodes WHERE state = 'waiting'"
            return not await stores.pool.fetchval(waiting)

        await eventually_true(none_waiting)
        for replica in (a, b):
            await asyncio.wait_for(replica.engine.firer.drain(), 10)
        await eventually_true(lambda: a.engine.dispatcher.pending(destination) == 0)
        await eventually_true(lambda: b.engine.dispatcher.pending(destination) == 0)
        fired_by = (a.engine.firer.stats.fired, b.engine.firer.stats.fired)
    assert len(receiver.requests) == 30
    assert all(r.verified[receiver.secrets[0]] for r in receiver.requests)
    profiles_sent = sorted(orjson.loads(r.body)["data"]["profile"] for r in receiver.requests)
    assert profiles_sent == sorted(f"profiles/{c}" for c in customers)
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 30
    assert sum(fired_by) == 30
    count = await stores.pool.fetchval("SELECT count(*) FROM triggers_fires")
    assert count == 30
