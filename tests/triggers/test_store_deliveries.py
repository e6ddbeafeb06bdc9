"""Deliveries on a real PostgreSQL: ListDeliveries pages, GetDelivery, Redeliver, the
dispatchers' leases (what a restarted replica takes up), subscriptions and their acks, and a
customer's erasure."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from sendtime.triggers.v1 import triggers_pb2
from sendtime_common.paging import InvalidPageToken
from tests.triggers.store_support import (
    DUE,
    HOUR,
    T0,
    Stores,
    count,
    fire_due,
    insert_delivery,
    new_subscription,
    new_trigger,
    new_webhook,
    open_episode,
    replica,
)
from triggers.delivery_log import AttemptRecord, DestinationHealth
from triggers.delivery_store import DEFAULT_LEASE, DeliveryStore, parse_delivery_name
from triggers.episode_store import CommitOutcome, FireResult
from triggers.retry_schedule import FailureReason
from triggers.secret_box import SecretBox
from triggers.store import FIRE_HISTORY, NotFound, erase_customer, purge_history

PENDING = triggers_pb2.DELIVERY_STATE_PENDING
DELIVERED = triggers_pb2.DELIVERY_STATE_DELIVERED
FAILED = triggers_pb2.DELIVERY_STATE_FAILED


async def test_deliveries_are_listed_newest_first_in_pages(stores: Stores) -> None:
    destination, _ = await new_webhook(stores)
    other, _ = await new_webhook(stores)
    names = [
        await insert_delivery(stores.pool, destination, created_at=T0 + timedelta(minutes=n))
        for n in range(7)
    ]
    names.append(
        await insert_delivery(stores.pool, destination, created_at=T0 + timedelta(minutes=6))
    )  # a tie
    await insert_delivery(stores.pool, other)
    await stores.deliveries.mark_delivered(names[2])
    await stores.deliveries.mark_failed(names[4], FailureReason.GONE)
    destination_id = destination.removeprefix("destinations/")

    seen: list[str] = []
    token = ""
    while True:
        page, token = await stores.deliveries.list(destination_id, page_size=3, page_token=token)
        seen.extend(d.name for d in page)
        if not token:
            break
    assert seen == [names[7], names[6], names[5], names[4], names[3], names[2], names[1], names[0]]

    pending, token = await stores.deliveries.list(destination_id, state=PENDING, page_size=10, page_token="")
    assert [d.name for d in pending] == [names[i] for i in (7, 6, 5, 3, 1, 0)] and token == ""
    failed, _ = await stores.deliveries.list(destination_id, state=FAILED, page_size=10, page_token="")
    assert [d.name for d in failed] == [names[4]]

    _, token = await stores.deliveries.list(destination_id, page_size=1, page_token="")
    with pytest.raises(InvalidPageToken):  # issued for another state
        await stores.deliveries.list(destination_id, state=PENDING, page_size=1, page_token=token)
    with pytest.raises(InvalidPageToken):  # and another destination
        await stores.deliveries.list(other.removeprefix("destinations/"), page_size=1, page_token=token)
    assert await stores.deliveries.list("no-such-destination", page_size=5, page_token="") == ([], "")


async def test_a_delivery_is_read_with_its_attempts_and_redelivered_with_its_webhook_id(
    stores: Stores,
) -> None:
    destination, _ = await new_webhook(stores)
    trigger_id = await new_trigger(stores, destinations=[destination])
    await open_episode(stores, trigger_id, "c1")
    [fired] = await fire_due(stores, DUE)
    [made] = fired.deliveries
    log = stores.deliveries
    await log.record_attempt(
        made.name, destination, AttemptRecord(DUE, timedelta(seconds=10), 0, "timed out")
    )
    await log.record_attempt(
        made.name, destination, AttemptRecord(DUE + HOUR, timedelta(milliseconds=5), 410)
    )
    await log.mark_failed(made.name, FailureReason.GONE)

    got = await log.get(parse_delivery_name(made.name))
    assert (got.name, got.webhook_id, got.state) == (made.name, made.webhook_id, FAILED)
    assert got.trigger == f"triggers/{trigger_id}" and got.profile == "profiles/c1"
    assert [(a.http_status, a.error) for a in got.attempts] == [(0, "timed out"), (410, "")]
    assert not got.HasField("next_attempt_time")
    assert got.payload == made.payload

    again = await log.redeliver(parse_delivery_name(made.name), DUE + 2 * HOUR)
    assert (again.state, again.webhook_id, len(again.attempts)) == (PENDING, made.webhook_id, 2)
    assert again.next_attempt_time.ToDatetime().replace(tzinfo=T0.tzinfo) == DUE + 2 * HOUR
    assert await log.take_due(DUE + 2 * HOUR, horizon=timedelta(0), limit=10) == [again]
    with pytest.raises(NotFound):
        await log.get(10**12)
    with pytest.raises(NotFound):
        await log.redeliver(10**12, DUE)


async def test_the_firing_replica_holds_its_deliveries_until_its_lease_ends(
    stores: Stores, store_url: str, box: SecretBox
) -> None:
    """What survives a restart: replica a fired, then died holding the delivery; b takes it
    once a's lease ended, with the attempts made so far."""
    destination, _ = await new_webhook(stores)
    trigger_id = await new_trigger(stores, destinations=[destination])
    await open_episode(stores, trigger_id, "c1")
    [fired] = await fire_due(stores, DUE)
    [made] = fired.deliveries
    await stores.deliveries.record_attempt(made.name, destination, AttemptRecord(DUE, timedelta(0), 503))
    retry_at = DUE + timedelta(seconds=5)
    await stores.deliveries.schedule_next(made.name, retry_at)

    async with replica(store_url, box, "b") as other:
        assert await other.deliveries.take_due(retry_at, horizon=HOUR, limit=10) == []  # a holds it
        [taken] = await other.deliveries.take_due(retry_at + DEFAULT_LEASE, horizon=HOUR, limit=10)
        assert (taken.name, taken.webhook_id, len(taken.attempts)) == (made.name, made.webhook_id, 1)
        assert taken.next_attempt_time.ToDatetime().replace(tzinfo=T0.tzinfo) == retry_at
        owner = await stores.pool.fetchval(
            "SELECT claimed_by FROM triggers_deliveries WHERE id = $1", parse_delivery_name(made.name)
        )
        assert owner == "b"
        # b's lease runs from now, the next attempt being past.
        assert (
            await stores.deliveries.take_due(
                retry_at + DEFAULT_LEASE + timedelta(seconds=1), horizon=HOUR, limit=10
            )
            == []
        )


async def test_two_dispatchers_taking_at_once_never_take_the_same_delivery(
    stores: Stores, store_url: str, box: SecretBox
) -> None:
    destination, _ = await new_webhook(stores)
    names = {
        await insert_delivery(stores.pool, destination, created_at=T0 + timedelta(seconds=n))
        for n in range(40)
    }
    async with replica(store_url, box, "b") as other:
        now = T0 + HOUR
        taken_a: set[str] = set()
        taken_b: set[str] = set()
        while True:
            a, b = await asyncio.gather(
                stores.deliveries.take_due(now, horizon=timedelta(0), limit=7),
                other.deliveries.take_due(now, horizon=timedelta(0), limit=5),
            )
            if not a and not b:
                break
            taken_a |= {d.name for d in a}
            taken_b |= {d.name for d in b}
        assert not taken_a & taken_b and taken_a | taken_b == names


async def test_a_horizon_takes_deliveries_due_soon_and_renewals_keep_them(stores: Stores) -> None:
    destination, _ = await new_webhook(stores)
    soon = await insert_delivery(stores.pool, destination, created_at=T0 + timedelta(minutes=5))
    later = await insert_delivery(stores.pool, destination, created_at=T0 + 2 * HOUR)
    taken = await stores.deliveries.take_due(T0, horizon=timedelta(minutes=10), limit=10)
    assert [d.name for d in taken] == [soon]
    other = DeliveryStore(stores.pool, owner="b")
    # Past a's lease, b would take it, unless a renews.
    late = T0 + timedelta(minutes=5) + DEFAULT_LEASE
    assert await stores.deliveries.renew_leases(late - timedelta(seconds=1), [soon]) == 1
    assert await other.take_due(late, horizon=timedelta(0), limit=10) == []
    assert await stores.deliveries.release([soon]) == 1
    assert [d.name for d in await other.take_due(late, horizon=timedelta(0), limit=10)] == [soon]
    assert await stores.deliveries.release([soon]) == 0  # b holds it now
    assert later


async def test_only_what_the_dispatcher_holds_is_renewed_a_delivery_lost_track_of_lapses(
    stores: Stores,
) -> None:
    """A fire whose commit answer was lost with the connection committed anyway: its delivery is
    leased to this replica but was never handed to its dispatcher. Renewing every lease of the
    replica kept it from any sweep for as long as the replica lived."""
    destination, _ = await new_webhook(stores)
    held = await insert_delivery(stores.pool, destination, customer_id="c1")
    lost_track_of = await insert_delivery(stores.pool, destination, customer_id="c2")
    assert len(await stores.deliveries.take_due(T0, horizon=timedelta(0), limit=10)) == 2
    late = T0 + DEFAULT_LEASE
    assert await stores.deliveries.renew_leases(late - timedelta(seconds=1), [held]) == 1
    other = DeliveryStore(stores.pool, owner="b")
    assert [d.name for d in await other.take_due(late, horizon=timedelta(0), limit=10)] == [lost_track_of]


async def test_a_disabled_destinations_deliveries_wait(stores: Stores) -> None:
    destination, _ = await new_webhook(stores)
    delivery = await insert_delivery(stores.pool, destination)
    await stores.deliveries.disable_destination(destination, "the receiver answered 410 Gone")
    assert await stores.deliveries.take_due(T0 + HOUR, horizon=timedelta(0), limit=10) == []
    stored = await stores.destinations.get(destination.removeprefix("destinations/"))
    stored.state = triggers_pb2.DESTINATION_STATE_ENABLED
    await stores.destinations.update(stored.name.removeprefix("destinations/"), stored)
    assert [d.name for d in await stores.deliveries.take_due(T0 + HOUR, horizon=timedelta(0), limit=10)] == [
        delivery
    ]


async def test_records_for_a_delivery_that_is_gone_change_nothing(stores: Stores) -> None:
    destination, _ = await new_webhook(stores, "d")
    delivery = await insert_delivery(stores.pool, destination, customer_id="erased")
    await erase_customer(stores.pool, "erased")
    log = stores.deliveries
    health = await log.record_attempt(delivery, destination, AttemptRecord(T0, timedelta(0), 503))
    assert health == DestinationHealth(None, T0)
    await log.schedule_next(delivery, T0 + HOUR)
    await log.mark_delivered(delivery)
    await log.mark_failed(delivery, FailureReason.ATTEMPTS_EXHAUSTED)
    assert await stores.pool.fetchval("SELECT count(*) FROM triggers_delivery_attempts") == 0
    await stores.destinations.delete("d")
    assert await log.record_attempt(delivery, destination, AttemptRecord(T0, timedelta(0), 204)) == (
        DestinationHealth(T0, None)
    )


# ---- subscriptions -------------------------------------------------------------------------------


async def test_a_subscription_sends_in_order_and_again_after_the_ack_deadline(
    stores: Stores, store_url: str, box: SecretBox
) -> None:
    stream = await new_subscription(stores)
    stream_id = stream.removeprefix("destinations/")
    names = [
        await insert_delivery(stores.pool, stream, created_at=T0 + timedelta(seconds=n)) for n in range(5)
    ]
    ack = timedelta(seconds=30)
    log = stores.deliveries

    first = await log.take_for_subscription(stream_id, T0 + HOUR, ack_timeout=ack, limit=3)
    assert [d.name for d in first] == names[:3]
    assert first[0].next_attempt_time.ToDatetime().replace(tzinfo=T0.tzinfo) == T0 + HOUR + ack
    async with replica(store_url, box, "b") as other:  # another stream of the same subscription
        second = await other.deliveries.take_for_subscription(stream_id, T0 + HOUR, ack_timeout=ack, limit=10)
    assert [d.name for d in second] == names[3:]
    assert await log.take_for_subscription(stream_id, T0 + HOUR + ack / 2, ack_timeout=ack, limit=10) == []

    ids = [parse_delivery_name(n) for n in names]
    assert await log.acknowledge(stream_id, ids[:2] + [10**12]) == 2
    assert await log.acknowledge(stream_id, ids[:2]) == 0  # already
    again = await log.take_for_subscription(stream_id, T0 + HOUR + ack, ack_timeout=ack, limit=10)
    assert [d.name for d in again] == names[2:]  # not acknowledged in time: sent again, in order
    assert (await log.get(ids[0])).state == DELIVERED
    send_count = await stores.pool.fetchval(
        "SELECT send_count FROM triggers_deliveries WHERE id = $1", ids[2]
    )
    assert send_count == 2


async def test_acknowledging_another_destinations_deliveries_does_nothing(stores: Stores) -> None:
    stream = await new_subscription(stores)
    other_stream = await new_subscription(stores)
    delivery = await insert_delivery(stores.pool, other_stream)
    assert (
        await stores.deliveries.acknowledge(
            stream.removeprefix("destinations/"), [parse_delivery_name(delivery)]
        )
        == 0
    )


async def test_a_disabled_subscription_sends_nothing(stores: Stores) -> None:
    stream = await new_subscription(stores)
    stream_id = stream.removeprefix("destinations/")
    await insert_delivery(stores.pool, stream)
    stored = await stores.destinations.get(stream_id)
    stored.state = triggers_pb2.DESTINATION_STATE_DISABLED
    await stores.destinations.update(stream_id, stored)
    ack = timedelta(seconds=30)
    assert (
        await stores.deliveries.take_for_subscription(stream_id, T0 + HOUR, ack_timeout=ack, limit=10) == []
    )


async def test_a_subscription_delivery_from_a_fire_is_sent_at_once(stores: Stores) -> None:
    stream = await new_subscription(stores)
    trigger_id = await new_trigger(stores, destinations=[stream])
    await open_episode(stores, trigger_id, "c1")
    [fired] = await fire_due(stores, DUE)
    taken = await stores.deliveries.take_for_subscription(
        stream.removeprefix("destinations/"), DUE, ack_timeout=timedelta(seconds=30), limit=10
    )
    assert [d.name for d in taken] == [d.name for d in fired.deliveries]
    # Webhook sweeps never take a subscription's deliveries.
    assert await stores.deliveries.take_due(DUE + HOUR, horizon=HOUR, limit=10) == []


# ---- erasure and history ---------------------------------------------------------------------------


async def test_erasing_a_customer_removes_their_episodes_exits_fires_and_deliveries(stores: Stores) -> None:
    destination, _ = await new_webhook(stores)
    trigger_id = await new_trigger(stores, destinations=[destination])
    for customer in ("erased", "kept"):
        await open_episode(stores, trigger_id, customer)
        await stores.episodes.record_exit(customer, trigger_id, T0 - HOUR, any_key=True)
    [fired, _] = await fire_due(stores, DUE)
    erased_delivery = next(d for r in [fired] for d in r.deliveries)
    await stores.deliveries.record_attempt(
        erased_delivery.name, destination, AttemptRecord(DUE, timedelta(0), 503)
    )
    await open_episode(stores, trigger_id, "erased", at=T0 + 24 * HOUR)  # waiting again
    [claimed] = [
        c for c in await stores.episodes.claim_due(T0 + 30 * HOUR, 10, owner="a") if c.customer_id == "erased"
    ]

    erased = await erase_customer(stores.pool, "erased")
    assert (erased.episodes, erased.known_exits, erased.fires, erased.deliveries) == (1, 1, 1, 1)
    for table in ("triggers_episodes", "triggers_known_exits", "triggers_fires", "triggers_deliveries"):
        assert await count(stores.pool, table, "erased") == 0
        assert await count(stores.pool, table, "kept") == 1
    assert await stores.pool.fetchval("SELECT count(*) FROM triggers_delivery_attempts") == 0
    assert await count(stores.pool, "triggers_customer_fires", "erased") == 0
    # A firer that claimed the customer's episode before the erasure fires nothing.
    from tests.triggers.store_support import settle

    assert await settle(stores, claimed, T0 + 30 * HOUR) == FireResult(CommitOutcome.EPISODE_CHANGED)
    assert await count(stores.pool, "triggers_deliveries", "erased") == 0


async def test_old_fires_and_exits_are_purged(stores: Stores) -> None:
    trigger_id = await new_trigger(stores)
    await stores.pool.execute(
        "INSERT INTO triggers_fires (customer_id, trigger_id, fired_at, episode_key)"
        " VALUES ('c1', $1, $2, ''), ('c1', $1, $3, '')",
        trigger_id,
        T0,
        T0 + 10 * HOUR,
    )
    await stores.episodes.record_exit("c1", trigger_id, T0, any_key=True)
    purged = await purge_history(stores.pool, T0 + FIRE_HISTORY + HOUR)
    assert (purged.fires, purged.known_exits) == (1, 0)
    purged = await purge_history(stores.pool, T0 + timedelta(days=400))
    assert (purged.fires, purged.known_exits) == (1, 1)


async def test_a_2xx_attempt_s_record_ends_the_delivery_and_its_mark_delivered_writes_nothing_more(
    stores: Stores,
) -> None:
    destination, _ = await new_webhook(stores)
    delivered_name = await insert_delivery(stores.pool, destination)
    retried_name = await insert_delivery(stores.pool, destination)
    log = stores.deliveries
    await log.record_attempt(retried_name, destination, AttemptRecord(T0, timedelta(milliseconds=5), 503))
    await log.record_attempt(delivered_name, destination, AttemptRecord(T0, timedelta(milliseconds=5), 204))
    done = await log.get(parse_delivery_name(delivered_name))
    assert done.state == triggers_pb2.DELIVERY_STATE_DELIVERED and not done.HasField("next_attempt_time")
    assert (await log.get(parse_delivery_name(retried_name))).state == triggers_pb2.DELIVERY_STATE_PENDING
    await stores.pool.execute("UPDATE triggers_deliveries SET failure_reason = 'untouched'")
    await log.mark_delivered(delivered_name)  # no statement: the record did it
    await log.mark_delivered(retried_name)  # a statement, as before
    reasons = {
        row["id"]: row["failure_reason"]
        for row in await stores.pool.fetch("SELECT id, failure_reason FROM triggers_deliveries")
    }
    assert reasons == {
        parse_delivery_name(delivered_name): "untouched",
        parse_delivery_name(retried_name): "",
    }
