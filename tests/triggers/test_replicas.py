"""Heartbeats and take-overs (triggers.replicas) on the real store: what a replica that stopped
beating held (claimed episodes, leased deliveries) is handed back at once, what a live one holds
is not, and a replica back from a PostgreSQL outage does not take from the others."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
from fault_proxy import FaultProxy

from sendtime_common.database import create_pool
from tests.triggers.store_support import (
    DUE,
    Stores,
    episode_row,
    fire_due,
    new_trigger,
    open_episode,
    replica,
    settle,
)
from tests.triggers.support import until
from triggers.delivery_store import parse_delivery_name
from triggers.episode_store import ClaimedEpisode, CommitOutcome, FireResult
from triggers.replicas import ReplicaRegistry
from triggers.secret_box import SecretBox
from triggers.store import StoreError

# A heartbeat ttl a test can wait out; a beat late by half of it (a loaded machine) ends a streak.
SHORT = timedelta(seconds=1)
BEAT = timedelta(seconds=0.1)
# The ttl of a replica that is to take over: its streak ends only at a beat more than 2 s after
# the one before, which a loaded machine does not reach (SHORT's 0.5 s it does), so its first
# streak, or the next, lets it take over.
STEADY = timedelta(seconds=4)
# Long enough for a few such streaks (the wait ends as soon as the condition holds).
TAKE_OVER_WAIT_S = 30


@asynccontextmanager
async def heartbeat(stores: Stores, ttl: timedelta = SHORT) -> AsyncIterator[ReplicaRegistry]:
    """``stores``' replica beating in the background until the block ends (then it stops beating,
    as a killed replica does: its row stays)."""
    registry = ReplicaRegistry(stores.pool, owner=stores.owner, ttl=ttl, interval=min(BEAT, ttl / 2))
    await registry.beat()
    task = asyncio.create_task(registry.run(lambda: DUE))
    try:
        yield registry
    finally:
        registry.stop()
        await task


async def holding_a_claim_and_a_delivery(stores: Stores) -> tuple[str, ClaimedEpisode, str]:
    """``stores``' replica holds a claim of a due episode (customer c2) and a delivery of a fire
    it committed (customer c1): the trigger, the claim and the delivery's name."""
    trigger_id = await new_trigger(stores)
    await open_episode(stores, trigger_id, "c1")
    [fired] = await fire_due(stores, DUE)
    [delivery] = fired.deliveries
    await open_episode(stores, trigger_id, "c2")
    [claimed] = await stores.episodes.claim_due(DUE, 10, owner=stores.owner)
    assert claimed.customer_id == "c2"
    holder = await stores.pool.fetchval(
        "SELECT claimed_by FROM triggers_deliveries WHERE id = $1", parse_delivery_name(delivery.name)
    )
    assert holder == stores.owner
    return trigger_id, claimed, delivery.name


async def test_what_a_replica_that_stopped_beating_held_is_handed_back_at_once(
    stores: Stores, store_url: str, box: SecretBox
) -> None:
    trigger_id, claim, delivery = await holding_a_claim_and_a_delivery(stores)
    customer = claim.customer_id
    async with heartbeat(stores):
        pass  # replica a beat, then died: its row stays, its claim and lease run on (60 s, 2 min)
    async with replica(store_url, box, "replica-b") as b, heartbeat(b, STEADY) as b_beating:
        await until(lambda: b_beating.taken_over == 1, TAKE_OVER_WAIT_S)

        # Due now for anyone, not when the lease ends; the version moved on past a's claim.
        row = await episode_row(b.pool, customer, trigger_id)
        assert row["claimed_by"] is None and row["due_at"] == DUE
        [reclaimed] = await b.episodes.claim_due(DUE, 10, owner=b.owner)
        assert (reclaimed.customer_id, reclaimed.version) == (customer, claim.version + 2)
        [taken] = await b.deliveries.take_due(DUE, horizon=timedelta(0), limit=10)
        assert taken.name == delivery
    lapsed = "SELECT count(*) FROM triggers_replicas WHERE owner = 'replica-a'"
    assert await stores.pool.fetchval(lapsed) == 0


async def test_a_late_commit_of_the_replica_taken_over_changes_nothing(
    stores: Stores, store_url: str, box: SecretBox
) -> None:
    """A replica taken over while it was only paused: its claim is no longer its own."""
    trigger_id = await new_trigger(stores)
    await open_episode(stores, trigger_id, "c2")
    [claimed] = await stores.episodes.claim_due(DUE, 10, owner=stores.owner)
    async with heartbeat(stores):
        pass
    async with replica(store_url, box, "replica-b") as b, heartbeat(b, STEADY) as b_beating:
        await until(lambda: b_beating.taken_over == 1, TAKE_OVER_WAIT_S)
    late = await settle(stores, claimed, DUE)  # it decides to fire, and commits
    assert isinstance(late, FireResult) and late.outcome == CommitOutcome.EPISODE_CHANGED
    assert not await stores.episodes.release(claimed, due_at=DUE)
    assert (await episode_row(stores.pool, "c2", trigger_id))["state"] == "waiting"
    assert await stores.pool.fetchval("SELECT count(*) FROM triggers_fires") == 0


async def test_a_live_replica_keeps_what_it_holds(stores: Stores, store_url: str, box: SecretBox) -> None:
    trigger_id, claim, _ = await holding_a_claim_and_a_delivery(stores)
    customer = claim.customer_id
    async with (
        replica(store_url, box, "replica-b") as b,
        heartbeat(stores, ttl=timedelta(minutes=1)),  # never late, however loaded the machine
        heartbeat(b, STEADY) as b_beating,
    ):
        await until(lambda: b_beating.may_take_over, TAKE_OVER_WAIT_S)
        # b has looked at least once more since it may take over: a was alive every time.
        looked = await b_beating.take_over(DUE)
        assert looked.replicas == () and b_beating.taken_over == 0
        assert (await episode_row(b.pool, customer, trigger_id))["claimed_by"] == "replica-a"
        assert await b.deliveries.take_due(DUE, horizon=timedelta(0), limit=10) == []


async def test_a_replica_never_takes_over_itself(stores: Stores) -> None:
    """Even when its own row lapsed (its heartbeat was late on a loaded machine)."""
    await holding_a_claim_and_a_delivery(stores)
    registry = ReplicaRegistry(stores.pool, owner=stores.owner, ttl=SHORT, interval=BEAT)
    await registry.beat()
    await stores.pool.execute("UPDATE triggers_replicas SET alive_until = now() - interval '1 hour'")
    taken = await registry.take_over(DUE)
    assert taken.replicas == () and taken.episodes == 0 and taken.deliveries == 0


async def test_a_replica_back_from_a_postgresql_outage_waits_a_ttl_before_taking_over(
    stores: Stores, store_url: str, tmp_path: Path
) -> None:
    """Its connections to PostgreSQL reset by a proxy: the heartbeat fails, and once it works
    again the replica waits a whole ttl (the others' chance to write theirs) before taking over."""
    address = urlsplit(store_url)
    assert address.hostname is not None and address.port is not None
    with FaultProxy.start({"postgres": (address.hostname, address.port)}, tmp_path) as proxy:
        proxied = address._replace(netloc=f"postgres@127.0.0.1:{proxy.port('postgres')}").geturl()
        pool = await create_pool(proxied, min_size=1, max_size=1)
        try:
            registry = ReplicaRegistry(pool, owner="replica-b", ttl=SHORT, interval=BEAT)
            await registry.beat()
            await until(lambda: registry.may_take_over)
            proxy.reset("postgres")
            with pytest.raises(StoreError):
                await registry.beat()
            assert not registry.may_take_over
            await registry.beat()  # on a new connection
            assert not registry.may_take_over
            await until(lambda: registry.may_take_over)
        finally:
            await pool.close()


async def test_a_gap_in_its_own_heartbeats_starts_the_streak_again(stores: Stores) -> None:
    """All replicas paused alike (a frozen VM): the first one back must give the others a ttl."""
    registry = ReplicaRegistry(stores.pool, owner="replica-b", ttl=SHORT, interval=BEAT)
    await registry.beat()
    await asyncio.sleep(SHORT.total_seconds() * 1.1)  # paused past the ttl, PostgreSQL fine
    assert registry.may_take_over  # by the streak alone...
    await registry.beat()
    assert not registry.may_take_over  # ...but the beat after the gap starts it again


async def test_a_replica_that_leaves_hands_back_what_it_holds(
    stores: Stores, store_url: str, box: SecretBox
) -> None:
    trigger_id, claim, delivery = await holding_a_claim_and_a_delivery(stores)
    registry = ReplicaRegistry(stores.pool, owner=stores.owner, ttl=timedelta(minutes=1), interval=BEAT)
    await registry.beat()
    handed = await registry.leave(DUE)
    assert (handed.episodes, handed.deliveries) == (1, 1)
    assert await stores.pool.fetchval("SELECT count(*) FROM triggers_replicas") == 0
    async with replica(store_url, box, "replica-b") as b:
        [reclaimed] = await b.episodes.claim_due(DUE, 10, owner=b.owner)
        assert reclaimed.customer_id == claim.customer_id
        [taken] = await b.deliveries.take_due(DUE, horizon=timedelta(0), limit=10)
        assert taken.name == delivery


def test_the_heartbeat_comes_at_least_twice_per_ttl(store_pool: asyncpg.Pool) -> None:
    with pytest.raises(ValueError, match="half the ttl"):
        ReplicaRegistry(store_pool, owner="x", ttl=timedelta(seconds=1), interval=timedelta(seconds=0.6))
