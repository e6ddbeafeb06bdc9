"""What the engine does with each outcome at the fire and with each kind of change: a profile
service down or a render on fallback data is retried, never ended nor sent; a skipped render
ends the episode; redelivered changes and undecodable messages; a new trigger seen at once
after triggers_changed(). Real PostgreSQL, NATS and receivers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import orjson
import pytest

from sendtime.triggers.v1 import triggers_pb2
from sendtime_common.event_log import JetStreamEventLog, JetStreamSettings, OutgoingMessage
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
from tests.triggers.store_support import T0, Stores, episode_row, insert_delivery, open_episode, unique
from tests.triggers.support import Receiver
from tests.triggers.test_engine_cart import DUE, cart_trigger
from triggers.delivery import DispatcherSettings
from triggers.secret_box import SecretBox
from triggers.signing import new_signing_secret


@pytest.fixture
def log_config(nats_url: str) -> JetStreamSettings:
    return log_settings(nats_url)


@pytest.fixture
async def publisher(log_config: JetStreamSettings) -> AsyncIterator[JetStreamEventLog]:
    log = await JetStreamEventLog.connect(log_config)
    yield log
    await log.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = await Receiver([new_signing_secret()]).start()
    yield receiver
    await receiver.stop()


@pytest.fixture
def customer() -> str:
    return unique("c")


@pytest.fixture
def profiles(customer: str) -> Profiles:
    profiles = Profiles()
    profiles.by_id[customer] = cart_profile(customer)
    return profiles


async def test_a_fire_while_the_profile_service_is_down_is_retried_then_sent_not_ended(
    stores: Stores,
    store_url: str,
    box: SecretBox,
    log_config: JetStreamSettings,
    publisher: JetStreamEventLog,
    receiver: Receiver,
    customer: str,
    profiles: Profiles,
) -> None:
    trigger_id = await cart_trigger(stores, receiver)
    clock = MovingClock(T0)
    async with running_engine(
        store_url, box, log_config, owner="a", profiles=profiles, renderer=Renderer(), clock=clock
    ) as replica:
        await publish(publisher, change(customer, cart_added(T0)))
        await eventually_true(lambda: replica.engine.consumer.stats.changes == 1)
        profiles.down = True
        clock.now = DUE
        await eventually_true(lambda: replica.engine.firer.stats.released >= 1)
        row = await episode_row(stores.pool, customer, trigger_id)
        assert row["state"] == "waiting" and row["claimed_by"] is None
        assert row["due_at"] == DUE + timedelta(seconds=1)  # the first backoff
        await nothing_more_on_the_way(stores, replica, trigger_id, clock.now)
        assert receiver.requests == []

        profiles.down = False
        clock.move(timedelta(seconds=1))
        await eventually_true(lambda: len(receiver.requests) == 1)
        assert replica.engine.firer.stats.fired == 1
    assert await episode_states(stores.pool, customer) == {f"{trigger_id}/": "fired:fired"}


@pytest.mark.parametrize(
    ("answer", "reason"), [("skipped", "render_skipped"), ("missing", "template_missing")]
)
async def test_a_skipped_render_ends_the_episode_without_a_webhook(
    stores: Stores,
    store_url: str,
    box: SecretBox,
    log_config: JetStreamSettings,
    publisher: JetStreamEventLog,
    receiver: Receiver,
    customer: str,
    profiles: Profiles,
    answer: str,
    reason: str,
) -> None:
    trigger_id = await cart_trigger(stores, receiver)
    clock, renderer = MovingClock(T0), Renderer(answer)
    async with running_engine(
        store_url, box, log_config, owner="a", profiles=profiles, renderer=renderer, clock=clock
    ) as replica:
        await publish(publisher, change(customer, cart_added(T0)))
        await eventually_true(lambda: replica.engine.consumer.stats.changes == 1)
        clock.now = DUE
        await eventually_true(lambda: len(renderer.calls) == 1)

        async def ended() -> bool:
            return bool((await episode_row(stores.pool, customer, trigger_id))["state"] == "ended")

        await eventually_true(ended)
        await nothing_more_on_the_way(stores, replica, trigger_id, clock.now)
    assert await episode_states(stores.pool, customer) == {f"{trigger_id}/": f"ended:{reason}"}
    assert receiver.requests == []
    assert (
        await stores.pool.fetchval("SELECT count(*) FROM triggers_fires WHERE customer_id = $1", customer)
        == 0
    )


@pytest.mark.parametrize("answer", ["fallback", "down"])
async def test_a_render_on_fallback_data_or_a_render_service_down_is_retried_never_sent(
    stores: Stores,
    store_url: str,
    box: SecretBox,
    log_config: JetStreamSettings,
    publisher: JetStreamEventLog,
    receiver: Receiver,
    customer: str,
    profiles: Profiles,
    answer: str,
) -> None:
    trigger_id = await cart_trigger(stores, receiver)
    clock, renderer = MovingClock(T0), Renderer(answer)
    async with running_engine(
        store_url, box, log_config, owner="a", profiles=profiles, renderer=renderer, clock=clock
    ) as replica:
        await publish(publisher, change(customer, cart_added(T0)))
        await eventually_true(lambda: replica.engine.consumer.stats.changes == 1)
        clock.now = DUE
        await eventually_true(lambda: replica.engine.firer.stats.released >= 1)
        clock.move(timedelta(seconds=1))  # due again: released again, with a longer backoff
        await eventually_true(lambda: replica.engine.firer.stats.released >= 2)
        row = await episode_row(stores.pool, customer, trigger_id)
        assert row["state"] == "waiting"
        assert row["due_at"] == DUE + timedelta(seconds=1 + 2)
        await nothing_more_on_the_way(stores, replica, trigger_id, clock.now)
        assert receiver.requests == []

        renderer.answer = "rendered"
        clock.move(timedelta(seconds=2))
        await eventually_true(lambda: len(receiver.requests) == 1)
    assert await episode_states(stores.pool, customer) == {f"{trigger_id}/": "fired:fired"}


async def test_redelivered_changes_are_harmless(
    stores: Stores,
    store_url: str,
    box: SecretBox,
    log_config: JetStreamSettings,
    publisher: JetStreamEventLog,
    receiver: Receiver,
    customer: str,
    profiles: Profiles,
) -> None:
    trigger_id = await cart_trigger(stores, receiver)
    clock = MovingClock(T0)
    entry, later_entry = (
        change(customer, cart_added(T0)),
        change(customer, cart_added(T0 + timedelta(minutes=5))),
    )
    async with running_engine(
        store_url, box, log_config, owner="a", profiles=profiles, renderer=Renderer(), clock=clock
    ) as replica:
        stats = replica.engine.consumer.stats
        for made in (entry, later_entry, entry, later_entry, later_entry):
            await publish(publisher, made)
        await eventually_true(lambda: stats.changes == 5)
        row = await episode_row(stores.pool, customer, trigger_id)
        assert (row["state"], row["fire_at"]) == ("waiting", T0 + timedelta(minutes=65))
        assert stats.decisions["opened"] == 1 and stats.decisions["restarted"] == 1

        clock.now = T0 + timedelta(minutes=65, seconds=5)
        await eventually_true(lambda: len(receiver.requests) == 1)
        # The same changes again after the fire: the episode they belong to has fired.
        await publish(publisher, entry)
        await publish(publisher, later_entry)
        await eventually_true(lambda: stats.changes == 7)
        clock.move(timedelta(hours=2))
        await nothing_more_on_the_way(stores, replica, trigger_id, clock.now)
    assert len(receiver.requests) == 1
    assert await episode_states(stores.pool, customer) == {f"{trigger_id}/": "fired:fired"}


async def test_a_redelivered_exit_is_harmless_and_known_for_a_late_entry(
    stores: Stores,
    store_url: str,
    box: SecretBox,
    log_config: JetStreamSettings,
    publisher: JetStreamEventLog,
    receiver: Receiver,
    customer: str,
    profiles: Profiles,
) -> None:
    trigger_id = await cart_trigger(stores, receiver)
    clock = MovingClock(T0)
    ordered = change(customer, order(T0 + timedelta(minutes=10)))
    async with running_engine(
        store_url, box, log_config, owner="a", profiles=profiles, renderer=Renderer(), clock=clock
    ) as replica:
        # The order arrives (twice) before the cart event that it follows.
        await publish(publisher, ordered)
        await publish(publisher, ordered)
        await publish(publisher, change(customer, cart_added(T0)))
        await eventually_true(lambda: replica.engine.consumer.stats.changes == 3)
        assert replica.engine.consumer.stats.decisions["exited_after_entry"] == 1
        clock.now = DUE
        await nothing_more_on_the_way(stores, replica, trigger_id, clock.now)
    assert await episode_states(stores.pool, customer) == {}
    assert receiver.requests == []
    exits = await stores.pool.fetchval(
        "SELECT occurred_at FROM triggers_known_exits WHERE customer_id = $1 AND trigger_id = $2",
        customer,
        trigger_id,
    )
    assert exits == [T0 + timedelta(minutes=10)]


async def test_an_undecodable_change_is_discarded_and_counted_and_the_next_one_applied(
    stores: Stores,
    store_url: str,
    box: SecretBox,
    log_config: JetStreamSettings,
    publisher: JetStreamEventLog,
    receiver: Receiver,
    customer: str,
    profiles: Profiles,
) -> None:
    trigger_id = await cart_trigger(stores, receiver)
    async with running_engine(
        store_url, box, log_config, owner="a", profiles=profiles, renderer=Renderer(), clock=MovingClock(T0)
    ) as replica:
        await publisher.publish_profile_changes(
            [
                OutgoingMessage(
                    key="cart_item_added", message_id=unique("bad"), payload=b"\xff\xff not a change"
                )
            ]
        )
        await publish(publisher, change(customer, cart_added(T0)))
        stats = replica.engine.consumer.stats
        await eventually_true(lambda: stats.changes == 1 and stats.undecodable == 1)
    assert await episode_states(stores.pool, customer) == {f"{trigger_id}/": "waiting:"}


async def test_a_change_that_cannot_be_applied_is_retried_until_it_is(
    stores: Stores,
    store_url: str,
    box: SecretBox,
    log_config: JetStreamSettings,
    publisher: JetStreamEventLog,
    receiver: Receiver,
    customer: str,
    profiles: Profiles,
) -> None:
    """A trigger with profile conditions reads the profile at the open: with the profile
    service down, the change goes back to the log (not acked, not dropped) and is applied once
    it is up."""
    trigger_id = await cart_trigger(stores, receiver)
    profiles.down = True
    async with running_engine(
        store_url, box, log_config, owner="a", profiles=profiles, renderer=Renderer(), clock=MovingClock(T0)
    ) as replica:
        await publish(publisher, change(customer, cart_added(T0)))
        stats = replica.engine.consumer.stats
        await eventually_true(lambda: stats.retried >= 2)
        assert stats.changes == 0 and await episode_states(stores.pool, customer) == {}
        profiles.down = False
        await eventually_true(lambda: stats.changes == 1)
    assert await episode_states(stores.pool, customer) == {f"{trigger_id}/": "waiting:"}


async def test_a_profile_that_no_longer_matches_at_the_open_opens_nothing(
    stores: Stores,
    store_url: str,
    box: SecretBox,
    log_config: JetStreamSettings,
    publisher: JetStreamEventLog,
    receiver: Receiver,
    customer: str,
    profiles: Profiles,
) -> None:
    await cart_trigger(stores, receiver)
    profiles.by_id[customer].cart.ClearField("items")  # emptied since (the conditions fail)
    async with running_engine(
        store_url, box, log_config, owner="a", profiles=profiles, renderer=Renderer(), clock=MovingClock(T0)
    ) as replica:
        await publish(publisher, change(customer, cart_added(T0)))
        await eventually_true(lambda: replica.engine.consumer.stats.changes == 1)
        assert replica.engine.consumer.stats.decisions["profile_conditions"] == 1
    assert await episode_states(stores.pool, customer) == {}


async def test_a_trigger_created_in_this_replica_is_applied_at_once_after_triggers_changed(
    stores: Stores,
    store_url: str,
    box: SecretBox,
    log_config: JetStreamSettings,
    publisher: JetStreamEventLog,
    receiver: Receiver,
    customer: str,
    profiles: Profiles,
) -> None:
    async with running_engine(
        store_url,
        box,
        log_config,
        owner="a",
        profiles=profiles,
        renderer=Renderer(),
        clock=MovingClock(T0),
        trigger_refresh_s=3600.0,
    ) as replica:
        await replica.engine.triggers.all()  # read once: none yet
        trigger_id = await cart_trigger(stores, receiver)
        replica.engine.triggers_changed()
        await publish(publisher, change(customer, cart_added(T0)))
        await eventually_true(lambda: replica.engine.consumer.stats.changes == 1)
    assert await episode_states(stores.pool, customer) == {f"{trigger_id}/": "waiting:"}


async def test_a_paused_trigger_s_due_episode_is_parked_and_fires_after_the_resume(
    stores: Stores,
    store_url: str,
    box: SecretBox,
    log_config: JetStreamSettings,
    publisher: JetStreamEventLog,
    receiver: Receiver,
    customer: str,
    profiles: Profiles,
) -> None:
    trigger_id = await cart_trigger(stores, receiver)
    clock = MovingClock(T0)
    async with running_engine(
        store_url, box, log_config, owner="a", profiles=profiles, renderer=Renderer(), clock=clock
    ) as replica:
        await publish(publisher, change(customer, cart_added(T0)))
        await eventually_true(lambda: replica.engine.consumer.stats.changes == 1)
        await stores.triggers.pause(trigger_id)
        replica.engine.triggers_changed()
        clock.now = DUE

        async def parked() -> bool:
            return bool(
                await stores.pool.fetchval(
                    "SELECT due_at = 'infinity' FROM triggers_episodes WHERE customer_id = $1", customer
                )
            )

        await eventually_true(parked)
        await nothing_more_on_the_way(stores, replica, trigger_id, clock.now)
        assert receiver.requests == []

        clock.move(timedelta(minutes=30))
        await stores.triggers.resume(trigger_id, clock.now)
        replica.engine.triggers_changed()
        await eventually_true(lambda: len(receiver.requests) == 1)
    assert await episode_states(stores.pool, customer) == {f"{trigger_id}/": "fired:fired"}


async def test_the_sweep_takes_up_a_dead_replica_s_delivery_and_a_deleted_destination_leaves_the_dispatcher(
    stores: Stores,
    store_url: str,
    box: SecretBox,
    log_config: JetStreamSettings,
    receiver: Receiver,
    profiles: Profiles,
) -> None:
    trigger = await stores.triggers.get(await cart_trigger(stores, receiver))
    [destination] = trigger.delivery.destinations
    # Pending, held by a replica that died (its lease ended at T0).
    left = await insert_delivery(
        stores.pool, destination, customer_id="c-left", created_at=T0 - timedelta(minutes=5)
    )
    await stores.pool.execute(
        "UPDATE triggers_deliveries SET claimed_by = 'dead', available_at = $1", T0 - timedelta(seconds=1)
    )
    async with running_engine(
        store_url, box, log_config, owner="a", profiles=profiles, renderer=Renderer(), clock=MovingClock(T0)
    ) as replica:
        await eventually_true(lambda: len(receiver.requests) == 1)
        assert receiver.requests[0].verified[receiver.secrets[0]]
        assert replica.engine.pump.stats.taken == 1

        # The attempt is recorded once its answer is in, a moment after the receiver saw it, and
        # its outcome a moment after that (waiting for the attempt alone read it still pending).
        async def settled() -> bool:
            delivery = await stores.deliveries.get(int(left.removeprefix("deliveries/")))
            return delivery.state != triggers_pb2.DELIVERY_STATE_PENDING

        await eventually_true(settled)
        delivered = await stores.deliveries.get(int(left.removeprefix("deliveries/")))
        assert len(delivered.attempts) == 1
        assert delivered.state == triggers_pb2.DELIVERY_STATE_DELIVERED

        await stores.destinations.delete(destination.removeprefix("destinations/"))
        replica.engine.destinations_changed()
        await eventually_true(lambda: not replica.engine.dispatcher.knows(destination))


async def test_carts_due_together_fire_in_batches_and_what_a_full_backlog_refused_goes_out_later(
    stores: Stores, store_url: str, box: SecretBox, log_config: JetStreamSettings, receiver: Receiver
) -> None:
    """24 carts due at once: the firer commits them in batches, each one webhook with its own
    id; the dispatcher, holding at most 4, refuses the others, which are released in the log
    together and sent by the sweep."""
    trigger_id = await cart_trigger(stores, receiver)
    customers = [unique("c") for _ in range(24)]
    profiles = Profiles()
    for customer in customers:
        profiles.by_id[customer] = cart_profile(customer)
        await open_episode(stores, trigger_id, customer)
    async with running_engine(
        store_url,
        box,
        log_config,
        owner="a",
        profiles=profiles,
        renderer=Renderer(),
        clock=MovingClock(DUE),
        dispatcher=DispatcherSettings(max_pending_per_destination=4),
    ) as replica:
        await eventually_true(lambda: len(receiver.requests) >= len(customers), timeout_s=15)
        assert replica.engine.firer.stats.fired == len(customers)
        assert replica.engine.pump.stats.released > 0
    assert len(receiver.requests) == len(customers)
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == len(customers)
    assert all(r.verified[receiver.secrets[0]] for r in receiver.requests)
    assert {orjson.loads(r.body)["data"]["profile"] for r in receiver.requests} == {
        f"profiles/{customer}" for customer in customers
    }
