"""Merged customers and erased ones: a merge moves episodes, exits, fires and deliveries to the
surviving customer (store.merge_customers, with its conflict rule), and the engine applies it
from a change's merged_customer_ids; an erasure notice on real NATS removes everything the
service keeps about the customer, and nothing is sent for them after it, not even a retry the
dispatcher was holding."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import orjson
import pytest

from sendtime.profile.v1 import profile_pb2
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
from tests.triggers.store_support import (
    HOUR,
    T0,
    Stores,
    count,
    episode_row,
    fire_due,
    insert_delivery,
    new_trigger,
    new_webhook,
    open_episode,
    unique,
)
from tests.triggers.support import Receiver, statuses
from tests.triggers.test_engine_cart import DUE, cart_trigger
from triggers import builtin
from triggers.episode_store import CommitOutcome
from triggers.episodes import DueAction, DueDecision, Reason
from triggers.secret_box import SecretBox
from triggers.signing import new_signing_secret
from triggers.store import Merged, merge_customers

TABLES = (
    "triggers_episodes",
    "triggers_known_exits",
    "triggers_fires",
    "triggers_customer_fires",
    "triggers_deliveries",
)


@pytest.fixture
def log_config(nats_url: str) -> JetStreamSettings:
    return log_settings(nats_url)


@pytest.fixture
async def publisher(log_config: JetStreamSettings) -> AsyncIterator[JetStreamEventLog]:
    log = await JetStreamEventLog.connect(log_config)
    yield log
    await log.close()


# ---- the store's merge ---------------------------------------------------------------------------


async def test_a_merge_moves_everything_to_the_survivor_and_a_keyed_fire_outranks_a_waiting_episode(
    stores: Stores,
) -> None:
    destination, _ = await new_webhook(stores)
    orders = await new_trigger(stores, builtin.order_completed([destination]))
    survivor, merged = unique("s"), unique("m")
    await open_episode(stores, orders, survivor, at=T0, key="o-1")
    [fired] = await fire_due(stores, T0 + timedelta(seconds=5))
    assert fired.outcome == CommitOutcome.COMMITTED
    # The other customer (the same person, not yet known as such) has o-1 and o-2 waiting.
    await open_episode(stores, orders, merged, at=T0 + HOUR, key="o-1")
    await open_episode(stores, orders, merged, at=T0 + HOUR, key="o-2")
    await stores.episodes.record_exit(merged, orders, T0, any_key=True)
    await insert_delivery(stores.pool, destination, customer_id=merged, trigger_id=orders)
    sequence_before = await stores.pool.fetchval(
        "SELECT fire_sequence FROM triggers_customer_fires WHERE customer_id = $1", survivor
    )

    result = await merge_customers(stores.pool, survivor, [merged], T0 + HOUR)

    assert result == Merged(episodes_moved=1, episodes_dropped=1, known_exits=1, fires=0, deliveries=1)
    assert await episode_states(stores.pool, survivor) == {
        f"{orders}/o-1": "fired:fired",
        f"{orders}/o-2": "waiting:",
    }
    for table in TABLES:
        assert await count(stores.pool, table, merged) == 0, table
    assert await count(stores.pool, "triggers_known_exits", survivor) == 1
    assert await count(stores.pool, "triggers_deliveries", survivor) == 2
    sequence_after = await stores.pool.fetchval(
        "SELECT fire_sequence FROM triggers_customer_fires WHERE customer_id = $1", survivor
    )
    assert sequence_after > sequence_before
    # Repeated (a redelivered change): nothing left to move.
    assert await merge_customers(stores.pool, survivor, [merged], T0 + HOUR) == Merged(0, 0, 0, 0, 0)


async def test_a_merge_keeps_the_waiting_cart_over_a_closed_one_and_the_later_of_two_waiting(
    stores: Stores,
) -> None:
    cart = await new_trigger(stores)
    survivor, merged, third = unique("s"), unique("m"), unique("t")
    await open_episode(stores, cart, survivor, at=T0)
    [fired] = await fire_due(stores, T0 + HOUR + timedelta(seconds=5))  # the survivor's cart fired
    assert fired.outcome == CommitOutcome.COMMITTED
    await open_episode(stores, cart, merged, at=T0 + 2 * HOUR)
    await open_episode(stores, cart, third, at=T0 + 2 * HOUR + timedelta(minutes=1))

    result = await merge_customers(stores.pool, survivor, [merged, third], T0 + 2 * HOUR)

    assert (result.episodes_moved, result.episodes_dropped, result.fires) == (1, 2, 0)
    row = await episode_row(stores.pool, survivor, cart)
    assert (row["state"], row["last_entry_at"]) == ("waiting", T0 + 2 * HOUR + timedelta(minutes=1))
    # The survivor's fire stays: the cooldown still counts from it at the next fire.
    assert await count(stores.pool, "triggers_fires", survivor) == 1


async def test_a_merge_voids_a_claim_on_a_moved_episode_and_makes_it_due_at_once(stores: Stores) -> None:
    cart = await new_trigger(stores)
    survivor, merged = unique("s"), unique("m")
    await open_episode(stores, cart, merged, at=T0)
    due = T0 + HOUR + timedelta(seconds=5)
    [claimed] = await stores.episodes.claim_due(due, 10, owner="a")

    await merge_customers(stores.pool, survivor, [merged], due)

    decision = DueDecision(DueAction.WAIT, Reason.NOT_DUE, wake_at=due + HOUR)
    assert await stores.episodes.commit_decision(claimed, decision, now=due) == CommitOutcome.EPISODE_CHANGED
    row = await episode_row(stores.pool, survivor, cart)
    assert (row["state"], row["due_at"], row["claimed_by"]) == ("waiting", due, None)
    [again] = await stores.episodes.claim_due(due, 10, owner="b")
    assert again.customer_id == survivor


# ---- the engine --------------------------------------------------------------------------------


async def test_a_change_that_merges_customers_moves_their_episodes_and_the_fire_goes_to_the_survivor(
    stores: Stores,
    store_url: str,
    box: SecretBox,
    log_config: JetStreamSettings,
    publisher: JetStreamEventLog,
) -> None:
    receiver = await Receiver([new_signing_secret()]).start()
    try:
        trigger_id = await cart_trigger(stores, receiver)
        anonymous, known = unique("anon"), unique("known")
        profiles, clock = Profiles(), MovingClock(T0)
        profiles.by_id[anonymous] = cart_profile(anonymous)
        async with running_engine(
            store_url, box, log_config, owner="a", profiles=profiles, renderer=Renderer(), clock=clock
        ) as replica:
            await publish(publisher, change(anonymous, cart_added(T0)))
            await eventually_true(lambda: replica.engine.consumer.stats.changes == 1)
            # The anonymous visitor logs in: the merge's change names the anonymous customer.
            del profiles.by_id[anonymous]
            profiles.by_id[known] = cart_profile(known, version=2)
            merging = change(
                known, cart_added(T0 + timedelta(minutes=10)), merged=(anonymous,), profile_version=2
            )
            await publish(publisher, merging)
            await publish(publisher, merging)  # redelivered
            await eventually_true(lambda: replica.engine.consumer.stats.changes == 3)
            assert await episode_states(stores.pool, anonymous) == {}
            row = await episode_row(stores.pool, known, trigger_id)
            # Moved (opened at T0), then restarted by the entry of the merge's change.
            assert (row["state"], row["opened_at"], row["fire_at"]) == (
                "waiting",
                T0,
                T0 + timedelta(minutes=70),
            )
            clock.now = T0 + timedelta(minutes=70, seconds=5)
            await eventually_true(lambda: len(receiver.requests) == 1)
            await nothing_more_on_the_way(stores, replica, trigger_id, clock.now)
        [request] = receiver.requests
        assert orjson.loads(request.body)["data"]["profile"] == f"profiles/{known}"
    finally:
        await receiver.stop()


async def test_an_erasure_notice_removes_everything_and_nothing_is_sent_after_it(
    stores: Stores,
    store_url: str,
    box: SecretBox,
    log_config: JetStreamSettings,
    publisher: JetStreamEventLog,
) -> None:
    # Every first attempt fails: both customers' deliveries wait in the dispatcher for a retry.
    receiver = await Receiver([new_signing_secret()], statuses(503, 503, 204)).start()
    try:
        first_id = await cart_trigger(stores, receiver)
        first = await stores.triggers.get(first_id)
        [destination] = first.delivery.destinations
        later = builtin.cart_abandoned([destination], delay=timedelta(hours=3))
        await stores.triggers.create(unique("later"), later)
        erased, kept = unique("erased"), unique("kept")
        profiles, clock = Profiles(), MovingClock(T0)
        for customer in (erased, kept):
            profiles.by_id[customer] = cart_profile(customer)
        async with running_engine(
            store_url, box, log_config, owner="a", profiles=profiles, renderer=Renderer(), clock=clock
        ) as replica:
            engine = replica.engine
            # An order before the carts: ends nothing, but is a known exit of theirs.
            await publish(
                publisher,
                change(erased, order(T0 - HOUR)),
                change(erased, cart_added(T0)),
                change(kept, cart_added(T0)),
            )
            await eventually_true(lambda: engine.consumer.stats.changes == 3)
            clock.now = DUE
            await eventually_true(lambda: len(receiver.requests) == 2)

            async def retries_scheduled() -> bool:
                scheduled = await stores.pool.fetchval(
                    "SELECT count(*) FROM triggers_deliveries WHERE attempts = 1 AND next_attempt_time > $1",
                    DUE,
                )
                return bool(scheduled == 2)

            await eventually_true(retries_scheduled)
            assert engine.dispatcher.pending(destination) == 2  # held for their retries
            for table in TABLES:
                assert await count(stores.pool, table, erased) > 0, table

            notice = profile_pb2.ErasureNotice(customer_id=erased, identifier_hashes=[b"\x01" * 32])
            notice.erase_time.FromDatetime(DUE)
            await publisher.publish_erasure(unique("erasure"), notice.SerializeToString())
            await eventually_true(lambda: engine.erasures_handled == 1)

            for table in TABLES:
                assert await count(stores.pool, table, erased) == 0, table
            assert await count(stores.pool, "triggers_episodes", kept) == 2
            # The retries fall due, and the later trigger's wait ends: only the kept customer's go out.
            clock.now = DUE + 3 * HOUR
            await eventually_true(lambda: len(receiver.requests) >= 4)
            await nothing_more_on_the_way(stores, replica, first_id, clock.now)
        after_erasure = [orjson.loads(r.body)["data"]["profile"] for r in receiver.requests[2:]]
        assert after_erasure == [f"profiles/{kept}", f"profiles/{kept}"]
    finally:
        await receiver.stop()
