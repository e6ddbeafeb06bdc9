"""Fires committed in batches on a real PostgreSQL (EpisodeStore.commit_fires): each fire of a
batch gets the outcome it would have had alone, a destination deleted during the commit sinks
no other fire, a firer killed with a batch in flight leaves nothing half-written, and two
firers committing overlapping batches never deadlock and fire each episode once."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta

import orjson
import pytest

from tests.conftest import repo_root
from tests.triggers.store_support import (
    DUE,
    HOUR,
    T0,
    Stores,
    decide,
    episode_row,
    new_subscription,
    new_trigger,
    new_webhook,
    open_episode,
    replica,
)
from triggers import builtin
from triggers.episode_store import (
    ClaimedEpisode,
    CommitOutcome,
    FactsQuery,
    FireCommit,
    FireFacts,
    FireResult,
    NewDelivery,
)
from triggers.episodes import DueAction, EpisodeState, Reason
from triggers.secret_box import SecretBox

COMMITTED, EPISODE_CHANGED, FIRES_CHANGED = (
    CommitOutcome.COMMITTED,
    CommitOutcome.EPISODE_CHANGED,
    CommitOutcome.FIRES_CHANGED,
)


def fire_commit(claimed: ClaimedEpisode, facts: FireFacts, now: datetime = DUE) -> FireCommit:
    """The FIRE decision a firer takes on ``claimed`` with ``facts``, ready to commit."""
    decision = decide(claimed, now, facts.recent_fire_times, facts.last_fire_time)
    assert decision.action == DueAction.FIRE and decision.episode is not None, decision
    body = orjson.dumps({"trigger": claimed.trigger_id, "profile": f"profiles/{claimed.customer_id}"})
    return FireCommit(claimed, decision.episode, facts, tuple(claimed.trigger.delivery.destinations), body)


async def claim(stores: Stores, now: datetime = DUE) -> dict[tuple[str, str], ClaimedEpisode]:
    """Everything due, claimed: by (customer, trigger)."""
    return {(c.customer_id, c.trigger_id): c for c in await stores.episodes.claim_due(now, 100, owner="a")}


async def facts_of(stores: Stores, claims: Sequence[ClaimedEpisode], now: datetime = DUE) -> list[FireFacts]:
    return await stores.episodes.fire_facts_of(
        [FactsQuery(c.customer_id, c.trigger_id, now - timedelta(days=1)) for c in claims]
    )


async def written(stores: Stores, customer_id: str) -> tuple[int, list[tuple[str, str]]]:
    """The customer's fires, and their deliveries as (trigger, destination)."""
    fires = await stores.pool.fetchval(
        "SELECT count(*) FROM triggers_fires WHERE customer_id = $1", customer_id
    )
    deliveries = await stores.pool.fetch(
        "SELECT trigger_id, destination_id FROM triggers_deliveries WHERE customer_id = $1"
        " ORDER BY trigger_id, destination_id",
        customer_id,
    )
    return fires, [(r["trigger_id"], f"destinations/{r['destination_id']}") for r in deliveries]


async def fence(stores: Stores, customer_id: str) -> int | None:
    sequence: int | None = await stores.pool.fetchval(
        "SELECT fire_sequence FROM triggers_customer_fires WHERE customer_id = $1", customer_id
    )
    return sequence


@pytest.mark.parametrize("destination_deleted", [False, True], ids=["one-transaction", "deleted-meanwhile"])
async def test_each_fire_of_a_mixed_batch_gets_its_own_outcome_and_nothing_is_half_written(
    stores: Stores, destination_deleted: bool
) -> None:
    kept, _ = await new_webhook(stores)
    gone, _ = await new_webhook(stores)
    first = await new_trigger(stores, destinations=[kept])
    second = await new_trigger(stores, destinations=[kept])
    both = await new_trigger(stores, destinations=[kept, gone])
    await open_episode(stores, first, "c-ok")
    await open_episode(stores, first, "c-exited")
    for trigger_id in (first, second):
        await open_episode(stores, trigger_id, "c-overtaken")
        await open_episode(stores, trigger_id, "c-twice")
    await open_episode(stores, both, "c-gone")
    claims = await claim(stores)
    facts = dict(zip(claims, await facts_of(stores, list(claims.values())), strict=True))

    # An exit of c-exited commits after the claim: its fire is void.
    exiting = claims["c-exited", first]
    exited = replace(exiting.episode, state=EpisodeState.EXITED, closed_at=DUE)
    assert await stores.episodes.save_episode(
        "c-exited", first, exited, version=exiting.version, due_at=None, reason=Reason.EXITED
    )
    # Another fire of c-overtaken commits after its facts were read: they are stale.
    overtaking = fire_commit(claims["c-overtaken", second], facts["c-overtaken", second])
    alone = await stores.episodes.commit_fire(
        overtaking.claimed, overtaking.fired, overtaking.facts, [NewDelivery(kept, {"n": 1})]
    )
    assert alone.outcome == COMMITTED

    batch = [
        ("c-ok", first),
        ("c-exited", first),
        ("c-overtaken", first),
        ("c-twice", second),  # both of c-twice's fires decided on the same facts: the first wins
        ("c-twice", first),
        ("c-gone", both),
    ]
    commits = [fire_commit(claims[slot], facts[slot]) for slot in batch]
    if destination_deleted:
        results = await _commit_while_deleting(stores, commits, gone)
    else:
        results = await stores.episodes.commit_fires(commits)

    assert [r.outcome for r in results] == [
        COMMITTED,
        EPISODE_CHANGED,
        FIRES_CHANGED,
        COMMITTED,
        FIRES_CHANGED,
        COMMITTED,
    ]
    made = {slot: sorted(d.destination for d in r.deliveries) for slot, r in zip(batch, results, strict=True)}
    destinations_of_gone = [kept] if destination_deleted else sorted([kept, gone])
    assert made == {
        ("c-ok", first): [kept],
        ("c-exited", first): [],
        ("c-overtaken", first): [],
        ("c-twice", second): [kept],
        ("c-twice", first): [],
        ("c-gone", both): destinations_of_gone,
    }
    # Without their payload (the firer has the body), each a new pending delivery.
    for result in results:
        for delivery in result.deliveries:
            assert not delivery.HasField("payload") and delivery.webhook_id.startswith("msg_")

    # What the rows say, customer by customer: a committed fire whole, the others not at all.
    states = {
        (customer, trigger): (await episode_row(stores.pool, customer, trigger))["state"]
        for customer, trigger in [*batch, ("c-overtaken", second)]
    }
    assert states == {
        ("c-ok", first): "fired",
        ("c-exited", first): "exited",
        ("c-overtaken", first): "waiting",
        ("c-overtaken", second): "fired",
        ("c-twice", second): "fired",
        ("c-twice", first): "waiting",
        ("c-gone", both): "fired",
    }
    assert await written(stores, "c-ok") == (1, [(first, kept)])
    assert await written(stores, "c-exited") == (0, [])
    assert await written(stores, "c-overtaken") == (1, [(second, kept)])
    assert await written(stores, "c-twice") == (1, [(second, kept)])
    assert await written(stores, "c-gone") == (1, [(both, d) for d in destinations_of_gone])
    assert [await fence(stores, c) for c in ("c-ok", "c-exited", "c-overtaken", "c-twice", "c-gone")] == [
        1,
        None,
        1,
        1,
        1,
    ]
    # The one whose facts were stale is decided again on fresh ones, on the same claim.
    [fresh] = await facts_of(stores, [claims["c-twice", first]])
    [again] = await stores.episodes.commit_fires([fire_commit(claims["c-twice", first], fresh)])
    assert again.outcome == COMMITTED and await fence(stores, "c-twice") == 2


async def _commit_while_deleting(
    stores: Stores, commits: list[FireCommit], destination: str
) -> list[FireResult]:
    """Commit the batch while another transaction deletes ``destination``: the batch reads it
    still there, makes its delivery, and its foreign key check waits for the delete, then fails."""
    async with stores.pool.acquire() as deleter:
        deleting = deleter.transaction()
        await deleting.start()
        await deleter.execute(
            "DELETE FROM triggers_destinations WHERE id = $1", destination.removeprefix("destinations/")
        )
        batch = asyncio.create_task(stores.episodes.commit_fires(commits))
        for _ in range(500):
            blocked = await stores.pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if blocked or batch.done():
                break
            await asyncio.sleep(0.01)
        assert blocked, "the batch never waited for the delete"
        await deleting.commit()
    return await batch


# ---- a firer killed with a batch in flight ----------------------------------------------------------

_KILLED_BATCH_FIRER = textwrap.dedent(
    """
    import asyncio, sys
    from datetime import datetime, timedelta
    import asyncpg
    from triggers.episode_store import EpisodeStore, FactsQuery, FireCommit
    from triggers.episodes import on_due
    from triggers.trigger_validation import validate_trigger

    async def main(url: str, due: str) -> None:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
        store = EpisodeStore(pool)
        now = datetime.fromisoformat(due)
        claimed = await store.claim_due(now, 100, owner="killed")
        facts = await store.fire_facts_of(
            [FactsQuery(c.customer_id, c.trigger_id, now - timedelta(days=1)) for c in claimed]
        )
        profile = {"cart": {"items": [{"sku": "a"}]}}
        commits = []
        for c, f in zip(claimed, facts):
            decision = on_due(validate_trigger(c.trigger), c.episode, now=now, profile=profile)
            destinations = tuple(c.trigger.delivery.destinations)
            commits.append(FireCommit(c, decision.episode, f, destinations, b'{"n": 1}'))
        done = await store.commit_fires(commits[:10])
        print(f"committed {sum(r.outcome == 'committed' for r in done)}", flush=True)
        async with pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            in_flight = await store._fires_in(conn, commits[10:20], timedelta(minutes=2))
            print(f"in flight {sum(r.outcome == 'committed' for r in in_flight)}", flush=True)
            await asyncio.sleep(3600)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


async def test_a_firer_killed_with_a_batch_in_flight_leaves_each_episode_fired_once_or_waiting(
    stores: Stores, store_url: str
) -> None:
    """kill -9 of a firer inside a batch's transaction: the batches it committed before stand,
    the one in flight leaves nothing, and after the lease another firer fires every episode
    left waiting, so that each fires exactly once, with one delivery per destination."""
    destinations = [(await new_webhook(stores))[0], await new_subscription(stores)]
    trigger_id = await new_trigger(stores, destinations=destinations)
    customers = [f"c{n:02}" for n in range(30)]
    for n, customer in enumerate(customers):
        await open_episode(stores, trigger_id, customer, at=T0 + timedelta(milliseconds=n))
    root = repo_root()
    paths = (root / "gen/python", root / "libs", root / "services")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in paths)}
    now = T0 + 2 * HOUR
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED_BATCH_FIRER, store_url, now.isoformat()],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = [
            await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), timeout=30) for _ in range(2)
        ]
        assert [line.strip() for line in lines] == ["committed 10", "in flight 10"]
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
    await _wait_for_rollbacks(stores)

    rows = await stores.pool.fetch(
        "SELECT e.customer_id, e.state, e.claimed_by, e.due_at,"
        " (SELECT count(*) FROM triggers_fires f WHERE f.customer_id = e.customer_id) AS fires,"
        " (SELECT count(*) FROM triggers_deliveries d WHERE d.customer_id = e.customer_id) AS deliveries"
        " FROM triggers_episodes e ORDER BY e.customer_id"
    )
    fired = [r for r in rows if r["state"] == "fired"]
    waiting = [r for r in rows if r["state"] == "waiting"]
    assert len(fired) == 10 and all(
        (r["fires"], r["deliveries"], r["claimed_by"]) == (1, 2, None) for r in fired
    )
    assert len(waiting) == 20
    assert all((r["fires"], r["deliveries"], r["claimed_by"]) == (0, 0, "killed") for r in waiting)

    lease_end = max(r["due_at"] for r in waiting)
    assert await stores.episodes.claim_due(lease_end - timedelta(seconds=1), 100, owner="b") == []
    assert await fire_in_batches(stores, lease_end) == 20
    per_customer = await stores.pool.fetch(
        "SELECT customer_id, count(*) AS deliveries, count(DISTINCT destination_id) AS destinations"
        " FROM triggers_deliveries GROUP BY customer_id ORDER BY customer_id"
    )
    assert [(r["customer_id"], r["deliveries"], r["destinations"]) for r in per_customer] == [
        (customer, 2, 2) for customer in customers
    ]
    assert await stores.pool.fetchval("SELECT count(*) FROM triggers_fires") == 30
    assert await stores.pool.fetchval("SELECT count(*) FROM triggers_episodes WHERE state <> 'fired'") == 0


async def _wait_for_rollbacks(stores: Stores) -> None:
    """Until the server noticed the dead connection and rolled its transaction back."""
    for _ in range(200):
        idle_in_transaction = await stores.pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND state LIKE 'idle in transaction%'"
        )
        if not idle_in_transaction:
            return
        await asyncio.sleep(0.02)


async def fire_in_batches(stores: Stores, now: datetime, *, limit: int = 100, shuffle: bool = False) -> int:
    """A batch firer's rounds until nothing is due: claim, read the facts of the claims at once,
    commit their fires in one batch; those whose facts went stale are decided again. How many
    fires it committed."""
    committed = 0
    while claims := await stores.episodes.claim_due(now, limit, owner=stores.owner):
        while claims:
            if shuffle:
                random.shuffle(claims)
            results = await stores.episodes.commit_fires(
                [
                    fire_commit(c, f, now)
                    for c, f in zip(claims, await facts_of(stores, claims, now), strict=True)
                ]
            )
            committed += sum(r.outcome == COMMITTED for r in results)
            claims = [c for c, r in zip(claims, results, strict=True) if r.outcome == FIRES_CHANGED]
    return committed


# ---- two firers, overlapping batches ------------------------------------------------------------------


async def test_two_firers_committing_overlapping_batches_never_deadlock_and_fire_each_episode_once(
    stores: Stores, store_url: str, box: SecretBox, caplog: pytest.LogCaptureFixture
) -> None:
    """Three triggers for each of 40 customers: the batches of two firers hold episodes of the
    same customers (their fire fences) at once, in shuffled orders; a third firer whose claims
    were taken over commits them too (the same episodes). Nothing deadlocks, and each episode
    fires once, with one delivery per destination."""
    caplog.set_level(logging.INFO, logger="triggers.episode_store")
    destinations = [(await new_webhook(stores))[0], await new_subscription(stores)]
    trigger_ids = [await new_trigger(stores, builtin.cart_abandoned(destinations)) for _ in range(3)]
    customers = [f"c{n:02}" for n in range(40)]
    for customer in customers:
        for trigger_id in trigger_ids:
            await open_episode(
                stores, trigger_id, customer, at=T0 + timedelta(milliseconds=random.randint(0, 999))
            )
    now = T0 + 2 * HOUR
    # A firer whose lease of every episode ended at once: its claims are stale when it commits.
    stale = await stores.episodes.claim_due(now, 1000, owner="stale", lease=timedelta(0))
    assert len(stale) == 120

    # It decided long ago (nothing had fired), and commits now, in shuffled batches.
    stale_commits = [
        fire_commit(c, f, now) for c, f in zip(stale, await facts_of(stores, stale, now), strict=True)
    ]
    random.shuffle(stale_commits)

    async def stale_firer() -> int:
        committed = 0
        for start in range(0, len(stale_commits), 20):
            results = await stores.episodes.commit_fires(stale_commits[start : start + 20])
            committed += sum(r.outcome == COMMITTED for r in results)
        return committed

    async with replica(store_url, box, "b") as other:
        a, b, c = await asyncio.gather(
            fire_in_batches(stores, now, limit=random.randint(8, 25), shuffle=True),
            fire_in_batches(other, now, limit=random.randint(8, 25), shuffle=True),
            stale_firer(),
        )
    assert a + b + c == 120
    # (A batch that lost the race to insert a customer's first fence row is tried again, but
    # none ever deadlocked.)
    rollbacks = [r.__dict__["why"] for r in caplog.records if r.name == "triggers.episode_store"]
    assert "DeadlockDetectedError" not in rollbacks
    per_episode = await stores.pool.fetch(
        "SELECT count(*) AS deliveries, count(DISTINCT destination_id) AS destinations"
        " FROM triggers_deliveries GROUP BY customer_id, trigger_id"
    )
    assert len(per_episode) == 120
    assert all((r["deliveries"], r["destinations"]) == (2, 2) for r in per_episode)
    assert await stores.pool.fetchval("SELECT count(*) FROM triggers_fires") == 120
    assert await stores.pool.fetchval("SELECT count(*) FROM triggers_episodes WHERE state = 'fired'") == 120
    assert [await fence(stores, customer) for customer in customers] == [3] * 40
