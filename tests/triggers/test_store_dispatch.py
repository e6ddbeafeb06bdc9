"""The dispatcher writing to the PostgreSQL delivery log: a fire's webhook delivery goes out
signed, a replica that dies after a failed attempt leaves it pending, and another replica takes
it up when the lease ends and finishes its schedule, with the same webhook id."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from sendtime.triggers.v1 import triggers_pb2
from tests.triggers.store_support import (
    DUE,
    HOUR,
    T0,
    Stores,
    fire_due,
    insert_delivery,
    new_trigger,
    new_webhook,
    open_episode,
    replica,
    webhook,
)
from tests.triggers.support import FakeTime, Receiver, statuses, until
from triggers.delivery import Dispatcher, DispatcherSettings, OutboundDelivery, WebhookDestination
from triggers.delivery_pump import DeliveryPump, PumpSettings
from triggers.delivery_store import DEFAULT_LEASE, parse_delivery_name
from triggers.secret_box import SecretBox
from triggers.signing import SigningKeys, new_signing_secret
from triggers.ssrf import AllowList, UrlPolicy

LOOPBACK_ALLOWED = UrlPolicy(AllowList.parse(["127.0.0.0/8", "::1"]))


async def _never(seconds: float) -> None:
    """A replica whose retries never come: it dies before them."""
    await asyncio.Event().wait()


@asynccontextmanager
async def dispatching(
    stores: Stores,
    time: FakeTime,
    *,
    retries: bool = True,
    settings: DispatcherSettings | None = None,
) -> AsyncIterator[Dispatcher]:
    dispatcher = Dispatcher(
        stores.deliveries,
        LOOPBACK_ALLOWED,
        settings or DispatcherSettings(),
        clock=time.clock,
        sleep=time.sleep if retries else _never,
        rng=random.Random(7),
    )
    await dispatcher.start()
    for destination, keys in await stores.destinations.webhooks():
        await dispatcher.set_destination(WebhookDestination.from_proto(destination, keys))
    try:
        yield dispatcher
    finally:
        await dispatcher.close()


async def test_a_delivery_left_by_a_dead_replica_is_finished_by_another(
    stores: Stores, store_url: str, box: SecretBox
) -> None:
    secret = new_signing_secret()
    receiver = await Receiver([secret], statuses(503, 204)).start()
    try:
        await stores.destinations.create("receiver", webhook(receiver.url), signing_keys=SigningKeys(secret))
        trigger_id = await new_trigger(stores, destinations=["destinations/receiver"])
        await open_episode(stores, trigger_id, "c1")
        [fired] = await fire_due(stores, DUE)
        [made] = fired.deliveries
        delivery_id = parse_delivery_name(made.name)

        # Replica a attempts it (503), records the next attempt, and dies before it.
        async with dispatching(stores, FakeTime(DUE), retries=False) as dispatcher:
            dispatcher.submit(OutboundDelivery.from_proto(made))
            await until(lambda: len(receiver.requests) == 1)
            for _ in range(250):
                pending = await stores.deliveries.get(delivery_id)
                # A new delivery is due at its fire: wait for the retry's time to be recorded.
                if pending.attempts and pending.next_attempt_time.ToDatetime(DUE.tzinfo) > DUE:
                    break
                await asyncio.sleep(0.02)
        assert pending.state == triggers_pb2.DELIVERY_STATE_PENDING and len(pending.attempts) == 1
        next_attempt = pending.next_attempt_time.ToDatetime().replace(tzinfo=DUE.tzinfo)
        assert DUE + timedelta(seconds=4) < next_attempt < DUE + timedelta(seconds=6)

        # Replica b, once a's lease ended, takes it up where it stood and delivers it.
        async with replica(store_url, box, "b") as other:
            restart = next_attempt + DEFAULT_LEASE
            assert (
                await other.deliveries.take_due(restart - timedelta(seconds=1), horizon=timedelta(0), limit=9)
                == []
            )
            [taken] = await other.deliveries.take_due(restart, horizon=timedelta(0), limit=10)
            async with dispatching(other, FakeTime(restart)) as dispatcher:
                dispatcher.submit(OutboundDelivery.from_proto(taken))
                await until(lambda: len(receiver.requests) == 2)
                for _ in range(250):
                    done = await other.deliveries.get(delivery_id)
                    if done.state != triggers_pb2.DELIVERY_STATE_PENDING:
                        break
                    await asyncio.sleep(0.02)
        assert done.state == triggers_pb2.DELIVERY_STATE_DELIVERED
        assert [a.http_status for a in done.attempts] == [503, 204]
        assert {r.headers["webhook-id"] for r in receiver.requests} == {made.webhook_id}
        assert all(r.verified[secret] for r in receiver.requests)
        health = await stores.destinations.health("receiver")
        assert health.last_success_time is not None and health.failing_since is None
    finally:
        await receiver.stop()


async def test_the_sweep_leaves_a_full_destination_s_deliveries_alone_and_takes_the_others(
    stores: Stores,
) -> None:
    """A destination whose backlog here is full refuses what the sweep would take: taking its
    due deliveries only to release them again would go round and round, and keep the others'
    from being taken."""
    full, _ = await new_webhook(stores, "full")
    other, _ = await new_webhook(stores, "other")
    time = FakeTime(DUE)
    # The full destination's due deliveries are the earliest in the log.
    waiting = [
        await insert_delivery(stores.pool, full, customer_id=f"c{n}", created_at=T0 + timedelta(seconds=n))
        for n in range(5)
    ]
    taken_up = await insert_delivery(
        stores.pool, other, customer_id="c9", created_at=T0 + timedelta(minutes=1)
    )
    async with dispatching(
        stores, time, retries=False, settings=DispatcherSettings(max_pending_per_destination=2)
    ) as dispatcher:
        for n in range(2):  # the lane holds 2, waiting for a retry that never comes here
            later = OutboundDelivery(
                f"deliveries/{900_000 + n}", full, f"msg_{n}", b"{}", next_attempt_time=DUE + HOUR
            )
            dispatcher.submit(later)
        assert dispatcher.full() == [full]
        pump = DeliveryPump(
            dispatcher=dispatcher,
            deliveries=stores.deliveries,
            destinations=stores.destinations,
            clock=time.clock,
            settings=PumpSettings(take_limit=3),
        )
        assert await pump.sweep() is False  # nothing more to take: the loop stops here
        assert pump.stats.taken == 1 and pump.stats.released == 0
        assert dispatcher.pending(other) == 1
        holders = await stores.pool.fetch(
            "SELECT id, claimed_by FROM triggers_deliveries WHERE id = ANY($1::bigint[])",
            [parse_delivery_name(name) for name in [*waiting, taken_up]],
        )
        assert {f"deliveries/{row['id']}": row["claimed_by"] for row in holders} == {
            **{name: None for name in waiting},
            taken_up: stores.deliveries.owner,
        }
