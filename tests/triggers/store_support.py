"""The triggers store on a real PostgreSQL: a fresh migrated database, the stores on it, and a
small firer that claims, decides with the pure rules and commits, as the service will."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from sendtime.triggers.v1 import triggers_pb2
from sendtime_common.database import create_pool
from tests.conftest import empty_database
from triggers import builtin
from triggers.delivery_store import DeliveryStore
from triggers.destination_store import DestinationStore
from triggers.episode_store import (
    ClaimedEpisode,
    CommitOutcome,
    EpisodeStore,
    FireResult,
    NewDelivery,
)
from triggers.episodes import DueAction, DueDecision, Episode, EpisodeState, due_at, on_due
from triggers.secret_box import SecretBox
from triggers.signing import SigningKeys, new_signing_secret, new_webhook_id
from triggers.store import migrate_store
from triggers.trigger_store import TriggerStore
from triggers.trigger_validation import validate_trigger

T0 = datetime(2026, 12, 5, 8, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
# A profile every ready-made trigger fires for: something in the cart, nothing suppressed.
PROFILE: Mapping[str, Any] = {"cart": {"items": [{"sku": "sku-1", "quantity": 1}]}}


@asynccontextmanager
async def migrated_database(prefix: str) -> AsyncIterator[str]:
    """A fresh database ``<prefix>_<random>`` with the triggers migrations applied: its URL."""
    async with empty_database(prefix) as url:
        pool = await create_pool(url, min_size=1, max_size=1)
        try:
            await migrate_store(pool)
        finally:
            await pool.close()
        yield url


def unique(prefix: str = "t") -> str:
    """An id no other test of a shared database uses: lower case, starting with a letter."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class Stores:
    """The stores of one replica, on its own pool."""

    pool: asyncpg.Pool
    triggers: TriggerStore
    destinations: DestinationStore
    episodes: EpisodeStore
    deliveries: DeliveryStore
    box: SecretBox
    owner: str = field(default="")

    @classmethod
    def on(cls, pool: asyncpg.Pool, box: SecretBox, owner: str = "replica-a") -> Stores:
        return cls(
            pool,
            TriggerStore(pool),
            DestinationStore(pool, box),
            EpisodeStore(pool),
            DeliveryStore(pool, owner=owner),
            box,
            owner,
        )


@asynccontextmanager
async def replica(url: str, box: SecretBox, owner: str, *, max_size: int = 4) -> AsyncIterator[Stores]:
    pool = await create_pool(url, min_size=1, max_size=max_size)
    try:
        yield Stores.on(pool, box, owner)
    finally:
        await pool.close()


def webhook(url: str = "https://receiver.example.com/hooks") -> triggers_pb2.Destination:
    return triggers_pb2.Destination(display_name="Receiver", webhook=triggers_pb2.WebhookTarget(url=url))


def subscription() -> triggers_pb2.Destination:
    return triggers_pb2.Destination(display_name="Adapter", subscription=triggers_pb2.SubscriptionTarget())


async def new_webhook(stores: Stores, destination_id: str | None = None) -> tuple[str, SigningKeys]:
    """A webhook destination: its name and keys."""
    destination_id = destination_id or unique("d")
    keys = SigningKeys(new_signing_secret())
    await stores.destinations.create(destination_id, webhook(), signing_keys=keys)
    return f"destinations/{destination_id}", keys


async def new_subscription(stores: Stores) -> str:
    destination_id = unique("s")
    await stores.destinations.create(destination_id, subscription())
    return f"destinations/{destination_id}"


async def new_trigger(
    stores: Stores, trigger: triggers_pb2.Trigger | None = None, *, destinations: Sequence[str] = ()
) -> str:
    """A stored trigger (the cart reminder by default): its id."""
    trigger_id = unique("cart")
    if trigger is None:
        destinations = destinations or [(await new_webhook(stores))[0]]
        trigger = builtin.cart_abandoned(destinations)
    await stores.triggers.create(trigger_id, trigger)
    return trigger_id


async def open_episode(
    stores: Stores, trigger_id: str, customer_id: str, *, at: datetime = T0, key: str = ""
) -> Episode:
    """A waiting episode opened by an entry at ``at`` (the trigger's wait), as the consumer
    stores it (over a closed one of the key)."""
    trigger = await stores.triggers.get(trigger_id)
    definition = validate_trigger(trigger)
    fire_at = at + (definition.wait.after or timedelta(0))
    episode = Episode(key, EpisodeState.WAITING, at, at, fire_at)
    closed = await stores.episodes.episodes(customer_id, trigger_id, [key])
    stored = await stores.episodes.save_episode(
        customer_id,
        trigger_id,
        episode,
        version=closed[0].version if closed else None,
        due_at=due_at(definition, episode),
    )
    assert stored is not None
    return episode


DUE = T0 + HOUR + timedelta(seconds=5)  # the episode opened at T0 falls due


def decide(
    claimed: ClaimedEpisode, now: datetime, facts_recent: Sequence[datetime], last: datetime | None
) -> DueDecision:
    definition = validate_trigger(claimed.trigger)
    return on_due(
        definition,
        claimed.episode,
        now=now,
        profile=PROFILE,
        recent_fire_times=facts_recent,
        last_fire_time=last,
        paused=claimed.trigger.state == triggers_pb2.TRIGGER_STATE_PAUSED,
    )


async def settle(stores: Stores, claimed: ClaimedEpisode, now: datetime) -> CommitOutcome | FireResult:
    """Decide on a claimed episode and commit, as a firer does: read the fires, decide, commit;
    again while other fires of the customer get in first."""
    definition = validate_trigger(claimed.trigger)
    window = definition.frequency_cap.window if definition.frequency_cap else timedelta(days=90)
    while True:
        facts = await stores.episodes.fire_facts(claimed.customer_id, claimed.trigger_id, since=now - window)
        decision = decide(claimed, now, facts.recent_fire_times, facts.last_fire_time)
        if decision.action == DueAction.FIRE:
            assert decision.episode is not None
            payload = {"trigger": claimed.trigger.name, "profile": f"profiles/{claimed.customer_id}"}
            deliveries = [NewDelivery(d, payload) for d in definition.delivery.destinations]
            result = await stores.episodes.commit_fire(claimed, decision.episode, facts, deliveries)
            if result.outcome == CommitOutcome.FIRES_CHANGED:
                continue
            return result
        return await stores.episodes.commit_decision(claimed, decision, now=now)


async def fire_due(stores: Stores, now: datetime, *, limit: int = 100) -> list[FireResult]:
    """One firer's round: claim what is due at ``now`` and settle each; the fires it committed
    or lost."""
    results = []
    for claimed in await stores.episodes.claim_due(now, limit, owner=stores.owner):
        outcome = await settle(stores, claimed, now)
        if isinstance(outcome, FireResult):
            results.append(outcome)
    return results


async def episode_row(pool: asyncpg.Pool, customer_id: str, trigger_id: str, key: str = "") -> asyncpg.Record:
    row = await pool.fetchrow(
        "SELECT * FROM triggers_episodes WHERE customer_id = $1 AND trigger_id = $2 AND episode_key = $3",
        customer_id,
        trigger_id,
        key,
    )
    assert row is not None
    return row


async def count(pool: asyncpg.Pool, table: str, customer_id: str) -> int:
    return int(await pool.fetchval(f"SELECT count(*) FROM {table} WHERE customer_id = $1", customer_id))


async def insert_delivery(
    pool: asyncpg.Pool,
    destination: str,
    *,
    customer_id: str = "c1",
    trigger_id: str = "t",
    created_at: datetime = T0,
    payload: str = '{"n": 1}',
) -> str:
    """A pending delivery to ``destination`` made directly, without a fire: its name."""
    delivery_id = await pool.fetchval(
        """
        INSERT INTO triggers_deliveries (destination_id, kind, webhook_id, trigger_id, customer_id,
            episode_key, fired_at, state, payload, next_attempt_time, available_at, created_at)
        SELECT id, kind, $2, $3, $4, $2, $5, 1, $6::jsonb, $5, $5, $5 FROM triggers_destinations WHERE id = $1
        RETURNING id
        """,
        destination.removeprefix("destinations/"),
        new_webhook_id(created_at),
        trigger_id,
        customer_id,
        created_at,
        payload,
    )
    assert delivery_id is not None, f"{destination} does not exist"
    return f"deliveries/{delivery_id}"
