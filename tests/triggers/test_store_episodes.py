"""Episodes on a real PostgreSQL: the event consumer's conditional writes, known exits, and the
durable timers: claims by concurrent firers, a lease that outlives its firer, the fire's one
transaction against exits, and the fence on a customer's fires."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest

from sendtime.ingest.v1 import ingest_pb2
from sendtime.triggers.v1 import triggers_pb2
from tests.conftest import repo_root
from tests.triggers.store_support import (
    DUE,
    HOUR,
    T0,
    Stores,
    count,
    decide,
    episode_row,
    fire_due,
    new_subscription,
    new_trigger,
    new_webhook,
    open_episode,
    replica,
    settle,
)
from triggers import builtin
from triggers.episode_store import (
    DEFAULT_LEASE,
    CommitOutcome,
    FireResult,
    NewDelivery,
    Timers,
)
from triggers.episodes import DueAction, Episode, EpisodeState, EventAction, IncomingEvent, Reason, on_event
from triggers.secret_box import SecretBox
from triggers.store import MAX_KNOWN_EXITS, NotFound
from triggers.trigger_validation import validate_trigger


def checkout(at_minutes: int) -> IncomingEvent:
    """A checkout_started (an exit of the cart reminder) that occurred ``at_minutes`` after T0."""
    occurred = T0 + timedelta(minutes=at_minutes)
    event = ingest_pb2.Event(checkout_started=ingest_pb2.CheckoutStarted(checkout_id="co-1"))
    event.occurred_at.FromDatetime(occurred)
    return IncomingEvent.of(event)


# ---- the event consumer ---------------------------------------------------------------------------


async def test_an_episode_is_written_only_over_the_version_read(stores: Stores) -> None:
    trigger_id = await new_trigger(stores)
    opened = await open_episode(stores, trigger_id, "c1")
    context = await stores.episodes.event_context("c1", trigger_id, "")
    assert context.episode is not None and context.episode.episode == opened
    assert (context.last_fire_time, context.known_exits) == (None, ())

    # A second open of the same key loses to the first.
    again = await stores.episodes.save_episode("c1", trigger_id, opened, version=None, due_at=DUE)
    assert again is None

    restarted = Episode("", EpisodeState.WAITING, T0, T0 + timedelta(minutes=10), T0 + timedelta(minutes=70))
    version = context.episode.version
    saved = await stores.episodes.save_episode(
        "c1", trigger_id, restarted, version=version, due_at=restarted.fire_at + timedelta(seconds=5)
    )
    assert saved is not None and saved.version == version + 1 and saved.episode == restarted
    # A decision taken on the old version does not apply.
    stale = await stores.episodes.save_episode("c1", trigger_id, opened, version=version, due_at=DUE)
    assert stale is None
    assert (await episode_row(stores.pool, "c1", trigger_id))["fire_at"] == restarted.fire_at

    exited = Episode("", EpisodeState.EXITED, T0, restarted.last_entry_at, restarted.fire_at, T0 + HOUR)
    closed = await stores.episodes.save_episode(
        "c1", trigger_id, exited, version=saved.version, due_at=None, reason=Reason.EXITED
    )
    assert closed is not None and closed.close_reason == "exited"
    assert (await episode_row(stores.pool, "c1", trigger_id))["due_at"] is None
    with pytest.raises(ValueError):
        await stores.episodes.save_episode("c1", trigger_id, opened, version=closed.version, due_at=None)

    # A new episode replaces the closed one, over its version.
    later = Episode("", EpisodeState.WAITING, T0 + 3 * HOUR, T0 + 3 * HOUR, T0 + 4 * HOUR)
    reopened = await stores.episodes.save_episode(
        "c1", trigger_id, later, version=closed.version, due_at=later.fire_at
    )
    assert reopened is not None and reopened.close_reason == ""


async def test_known_exits_are_kept_per_key_and_bounded(stores: Stores) -> None:
    trigger_id = await new_trigger(stores, builtin.browse_abandoned(["destinations/d"]))
    for minute in range(MAX_KNOWN_EXITS + 4):
        await stores.episodes.record_exit("c1", trigger_id, T0 + timedelta(minutes=minute), keys=["sku-1"])
    await stores.episodes.record_exit("c1", trigger_id, T0 + timedelta(minutes=2), keys=["sku-1"])  # known
    await stores.episodes.record_exit("c1", trigger_id, T0 - HOUR, any_key=True)  # an order: every key
    await stores.episodes.record_exit("c1", trigger_id, T0, keys=["sku-2"])

    sku_1 = (await stores.episodes.event_context("c1", trigger_id, "sku-1")).known_exits
    newest = [T0 + timedelta(minutes=m) for m in range(4, MAX_KNOWN_EXITS + 4)]
    assert sku_1 == (T0 - HOUR, *newest)
    assert (await stores.episodes.event_context("c1", trigger_id, "sku-2")).known_exits == (T0 - HOUR, T0)
    assert (await stores.episodes.event_context("c2", trigger_id, "sku-1")).known_exits == ()
    with pytest.raises(NotFound):
        await stores.episodes.record_exit("c1", "no-such-trigger", T0, any_key=True)


async def test_an_exit_that_arrived_first_keeps_the_late_entry_from_opening(stores: Stores) -> None:
    """The store gives on_event what it needs: an exit at 10 min is known when the entry from
    T0 arrives after it."""
    trigger_id = await new_trigger(stores)
    definition = validate_trigger(await stores.triggers.get(trigger_id))
    await stores.episodes.record_exit("c1", trigger_id, T0 + timedelta(minutes=10), any_key=True)
    entry_event = ingest_pb2.Event(cart_item_added=ingest_pb2.CartItemAdded(sku="sku-1"))
    entry_event.occurred_at.FromDatetime(T0)
    context = await stores.episodes.event_context("c1", trigger_id, "")
    decision = on_event(
        definition,
        IncomingEvent.of(entry_event),
        None,
        last_fire_time=context.last_fire_time,
        known_exits=context.known_exits,
    )
    assert decision.reason == Reason.EXITED_AFTER_ENTRY


# ---- claims ----------------------------------------------------------------------------------------


async def test_timers_count_the_episodes_waiting_and_those_overdue(stores: Stores) -> None:
    """What the timer gauges show (triggers.metrics): parked episodes never fall due, a claimed
    one counts until settled, a fired one no more."""
    trigger_id, paused_id = await new_trigger(stores), await new_trigger(stores)
    await open_episode(stores, trigger_id, "c1")
    await open_episode(stores, trigger_id, "c2")
    await open_episode(stores, trigger_id, "c3", at=T0 + 2 * HOUR)
    await open_episode(stores, paused_id, "c4")
    minute = timedelta(minutes=1)
    assert await stores.episodes.timers(T0, overdue_after=minute) == Timers(pending=4, overdue=0)
    assert await stores.episodes.timers(DUE + minute, overdue_after=minute) == Timers(pending=4, overdue=0)
    late = DUE + 2 * minute
    assert await stores.episodes.timers(late, overdue_after=minute) == Timers(pending=4, overdue=3)

    # Claimed: due at the lease's end.
    [claimed] = await stores.episodes.claim_due(late, 1, owner=stores.owner)
    assert await stores.episodes.timers(late, overdue_after=minute) == Timers(pending=4, overdue=2)
    await stores.triggers.pause(paused_id)
    await settle(stores, claimed, late)
    await fire_due(stores, late)  # the other fires; c4's trigger is paused: parked
    assert await stores.episodes.timers(late, overdue_after=minute) == Timers(pending=1, overdue=0)


async def test_a_due_episode_is_claimed_once_with_its_trigger(stores: Stores) -> None:
    trigger_id = await new_trigger(stores)
    opened = await open_episode(stores, trigger_id, "c1")
    assert await stores.episodes.claim_due(DUE - timedelta(microseconds=1), 10, owner="a") == []
    [claimed] = await stores.episodes.claim_due(DUE, 10, owner="a")
    assert (claimed.customer_id, claimed.trigger_id, claimed.episode) == ("c1", trigger_id, opened)
    assert claimed.trigger == await stores.triggers.get(trigger_id)
    assert claimed.lease_until == DUE + DEFAULT_LEASE
    row = await episode_row(stores.pool, "c1", trigger_id)
    assert (row["claimed_by"], row["due_at"], row["version"]) == ("a", claimed.lease_until, claimed.version)
    # Held for the lease: nobody claims it, not even the holder.
    assert (
        await stores.episodes.claim_due(claimed.lease_until - timedelta(microseconds=1), 10, owner="b") == []
    )


async def test_two_replicas_claiming_at_once_never_claim_the_same_episode(
    stores: Stores, store_url: str, box: SecretBox
) -> None:
    trigger_id = await new_trigger(stores)
    async with replica(store_url, box, "b") as other:
        for round_ in range(25):
            customers = [f"r{round_}-c{n}" for n in range(12)]
            for customer in customers:
                await open_episode(stores, trigger_id, customer)
            now = DUE + timedelta(days=round_)  # past every lease of earlier rounds: all fired or claimable
            limit = random.randint(4, 9)
            claims_a, claims_b = await asyncio.gather(
                stores.episodes.claim_due(now, limit, owner="a"),
                other.episodes.claim_due(now, limit, owner="b"),
            )
            a = {c.customer_id for c in claims_a}
            b = {c.customer_id for c in claims_b}
            assert not a & b, f"round {round_}: both claimed {a & b}"
            assert len(a) == len(claims_a) and len(b) == len(claims_b)
            # Settle them all (fire), so the next round starts from nothing due.
            for claimed, owner in [(c, stores) for c in claims_a] + [(c, other) for c in claims_b]:
                assert isinstance(await settle(owner, claimed, now), FireResult)
            for claimed in await stores.episodes.claim_due(now, 100, owner="a"):
                await settle(stores, claimed, now)
    fired = await stores.pool.fetchval(
        "SELECT count(*) FROM triggers_episodes WHERE trigger_id = $1 AND state = 'fired'", trigger_id
    )
    assert fired == await stores.pool.fetchval("SELECT count(*) FROM triggers_fires") == 25 * 12


async def test_an_episode_whose_firer_died_is_claimed_again_after_the_lease_and_fires_once(
    stores: Stores,
) -> None:
    destinations = [(await new_webhook(stores))[0], await new_subscription(stores)]
    trigger_id = await new_trigger(stores, destinations=destinations)
    await open_episode(stores, trigger_id, "c1")
    [dead] = await stores.episodes.claim_due(DUE, 10, owner="a")  # a dies: never commits

    assert await stores.episodes.claim_due(dead.lease_until - timedelta(seconds=1), 10, owner="b") == []
    [taken] = await stores.episodes.claim_due(dead.lease_until, 10, owner="b")
    assert taken.version > dead.version and taken.episode == dead.episode

    # a comes back to life and commits its fire: too late, b's claim came between.
    late = await settle(stores, dead, DUE)
    assert late == FireResult(CommitOutcome.EPISODE_CHANGED)
    result = await settle(stores, taken, dead.lease_until)
    assert isinstance(result, FireResult) and result.outcome == CommitOutcome.COMMITTED
    assert sorted(d.destination for d in result.deliveries) == sorted(destinations)
    assert await count(stores.pool, "triggers_fires", "c1") == 1
    assert await count(stores.pool, "triggers_deliveries", "c1") == 2
    assert await stores.episodes.claim_due(T0 + timedelta(days=30), 10, owner="c") == []


async def test_a_slow_firer_past_its_lease_still_commits_when_nobody_claimed_meanwhile(
    stores: Stores,
) -> None:
    trigger_id = await new_trigger(stores)
    await open_episode(stores, trigger_id, "c1")
    [claimed] = await stores.episodes.claim_due(DUE, 10, owner="a")
    result = await settle(stores, claimed, claimed.lease_until + HOUR)
    assert isinstance(result, FireResult) and result.outcome == CommitOutcome.COMMITTED


_KILLED_FIRER = textwrap.dedent(
    """
    import asyncio, sys
    from datetime import datetime, timedelta
    import asyncpg
    from triggers.episode_store import EpisodeStore, NewDelivery
    from triggers.episodes import on_due
    from triggers.trigger_validation import validate_trigger

    async def main(url: str, due: str) -> None:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
        store = EpisodeStore(pool)
        now = datetime.fromisoformat(due)
        [claimed] = await store.claim_due(now, 1, owner="killed")
        since = now - timedelta(days=90)
        facts = await store.fire_facts(claimed.customer_id, claimed.trigger_id, since=since)
        profile = {"cart": {"items": [{"sku": "a"}]}}
        decision = on_due(validate_trigger(claimed.trigger), claimed.episode, now=now, profile=profile)
        destinations = list(claimed.trigger.delivery.destinations)
        async with pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            made = await store._fire_in(
                conn, claimed, decision.episode, facts,
                [NewDelivery(d, {"n": 1}) for d in destinations], now, timedelta(minutes=2),
            )
            print(f"fired {len(made)} uncommitted", flush=True)
            await asyncio.sleep(3600)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


async def test_a_firer_killed_mid_fire_leaves_the_episode_waiting_and_it_fires_once(
    stores: Stores, store_url: str
) -> None:
    """kill -9 of a firer inside its fire's transaction: nothing of the fire stays; once the
    lease ends another firer fires the episode, once."""
    destinations = [(await new_webhook(stores))[0], (await new_webhook(stores))[0]]
    trigger_id = await new_trigger(stores, destinations=destinations)
    await open_episode(stores, trigger_id, "c1")
    root = repo_root()
    paths = (root / "gen/python", root / "libs", root / "services")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in paths)}
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED_FIRER, store_url, DUE.isoformat()],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), timeout=30)
        assert line.strip() == "fired 2 uncommitted"
        # Inside its transaction the episode is FIRED; outside, nothing shows yet.
        assert (await episode_row(stores.pool, "c1", trigger_id))["claimed_by"] == "killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()

    async def rolled_back() -> bool:
        # The server notices the dead connection and rolls its transaction back.
        return not await stores.pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND state LIKE 'idle in transaction%'"
        )

    for _ in range(200):
        if await rolled_back():
            break
        await asyncio.sleep(0.02)
    row = await episode_row(stores.pool, "c1", trigger_id)
    assert (row["state"], row["claimed_by"]) == ("waiting", "killed")
    assert await count(stores.pool, "triggers_fires", "c1") == 0
    assert await count(stores.pool, "triggers_deliveries", "c1") == 0

    assert await fire_due(stores, DUE + timedelta(seconds=30)) == []  # still leased
    [result] = await fire_due(stores, row["due_at"])
    assert result.outcome == CommitOutcome.COMMITTED and len(result.deliveries) == 2
    assert await count(stores.pool, "triggers_fires", "c1") == 1
    assert await count(stores.pool, "triggers_deliveries", "c1") == 2


# ---- exits against fires ---------------------------------------------------------------------------


async def _exit_now(stores: Stores, trigger_id: str, customer_id: str, minutes: int) -> EventAction:
    """What the consumer does with a checkout at ``minutes``: read, decide, write over the
    version read; again on a conflict (as it will, on the next read)."""
    definition = validate_trigger(await stores.triggers.get(trigger_id))
    event = checkout(minutes)
    while True:
        [stored] = await stores.episodes.episodes(customer_id, trigger_id)
        decision = on_event(definition, event, stored.episode)
        if decision.action != EventAction.EXIT:
            return decision.action
        assert decision.episode is not None
        written = await stores.episodes.save_episode(
            customer_id,
            trigger_id,
            decision.episode,
            version=stored.version,
            due_at=None,
            reason=decision.reason,
        )
        if written is not None:
            return decision.action


async def test_an_exit_committed_before_the_fire_wins(stores: Stores) -> None:
    trigger_id = await new_trigger(stores)
    await open_episode(stores, trigger_id, "c1")
    [claimed] = await stores.episodes.claim_due(DUE, 10, owner="a")
    # The checkout at 59 min arrives while the fire is being decided.
    assert await _exit_now(stores, trigger_id, "c1", 59) == EventAction.EXIT
    assert await settle(stores, claimed, DUE) == FireResult(CommitOutcome.EPISODE_CHANGED)
    row = await episode_row(stores.pool, "c1", trigger_id)
    assert (row["state"], row["close_reason"], row["claimed_by"]) == ("exited", "exited", None)
    assert await count(stores.pool, "triggers_fires", "c1") == 0
    assert await count(stores.pool, "triggers_deliveries", "c1") == 0


async def test_an_exit_read_before_the_claim_is_decided_again_and_still_wins(stores: Stores) -> None:
    trigger_id = await new_trigger(stores)
    await open_episode(stores, trigger_id, "c1")
    [before_claim] = await stores.episodes.episodes("c1", trigger_id)
    [claimed] = await stores.episodes.claim_due(DUE, 10, owner="a")
    definition = validate_trigger(claimed.trigger)
    decision = on_event(definition, checkout(59), before_claim.episode)
    assert decision.episode is not None
    stale = await stores.episodes.save_episode(
        "c1", trigger_id, decision.episode, version=before_claim.version, due_at=None, reason=decision.reason
    )
    assert stale is None  # the claim came between: read again
    assert await _exit_now(stores, trigger_id, "c1", 59) == EventAction.EXIT
    assert await settle(stores, claimed, DUE) == FireResult(CommitOutcome.EPISODE_CHANGED)


async def test_a_fire_committed_before_the_exit_stands_and_the_exit_is_late(stores: Stores) -> None:
    trigger_id = await new_trigger(stores)
    await open_episode(stores, trigger_id, "c1")
    [read_by_consumer] = await stores.episodes.episodes("c1", trigger_id)
    [result] = await fire_due(stores, DUE)
    assert result.outcome == CommitOutcome.COMMITTED
    definition = validate_trigger(await stores.triggers.get(trigger_id))
    decision = on_event(definition, checkout(59), read_by_consumer.episode)
    assert decision.episode is not None
    lost = await stores.episodes.save_episode(
        "c1",
        trigger_id,
        decision.episode,
        version=read_by_consumer.version,
        due_at=None,
        reason=decision.reason,
    )
    assert lost is None
    assert await _exit_now(stores, trigger_id, "c1", 59) == EventAction.LATE_EXIT
    assert (await episode_row(stores.pool, "c1", trigger_id))["state"] == "fired"
    assert await count(stores.pool, "triggers_deliveries", "c1") == 1


async def test_exits_and_fires_racing_never_both_win(stores: Stores, store_url: str, box: SecretBox) -> None:
    trigger_id = await new_trigger(stores)
    async with replica(store_url, box, "b") as consumer:
        outcomes = set()
        for round_ in range(30):
            customer = f"c{round_}"
            await open_episode(stores, trigger_id, customer)
            [claimed] = await stores.episodes.claim_due(DUE, 10, owner="a")
            fired, exited = await asyncio.gather(
                settle(stores, claimed, DUE), _exit_now(consumer, trigger_id, customer, 59)
            )
            assert isinstance(fired, FireResult)
            state = (await episode_row(stores.pool, customer, trigger_id))["state"]
            deliveries = await count(stores.pool, "triggers_deliveries", customer)
            if fired.outcome == CommitOutcome.COMMITTED:
                assert (exited, state, deliveries) == (EventAction.LATE_EXIT, "fired", 1)
            else:
                assert (exited, state, deliveries) == (EventAction.EXIT, "exited", 0)
            outcomes.add(fired.outcome)
    assert outcomes  # which wins is up to the scheduler; both are tested above


# ---- fires: exactly once, and the fence on a customer's fires ------------------------------------


async def test_two_firers_running_together_make_each_fires_deliveries_exactly_once(
    stores: Stores, store_url: str, box: SecretBox
) -> None:
    destinations = [(await new_webhook(stores))[0], await new_subscription(stores)]
    trigger_id = await new_trigger(stores, destinations=destinations)
    customers = [f"c{n}" for n in range(60)]
    for n, customer in enumerate(customers):
        await open_episode(stores, trigger_id, customer, at=T0 + timedelta(seconds=n))
    now = T0 + 2 * HOUR
    async with replica(store_url, box, "b") as other:

        async def firer(replica_stores: Stores) -> int:
            committed = 0
            while results := await fire_due(replica_stores, now, limit=random.randint(1, 7)):
                committed += sum(r.outcome == CommitOutcome.COMMITTED for r in results)
            return committed

        a, b = await asyncio.gather(firer(stores), firer(other))
    assert a + b == len(customers) and a and b
    per_episode = await stores.pool.fetch(
        "SELECT customer_id, count(*) AS deliveries, count(DISTINCT destination_id) AS destinations,"
        " count(DISTINCT webhook_id) AS ids FROM triggers_deliveries GROUP BY customer_id"
    )
    assert len(per_episode) == len(customers)
    assert all((r["deliveries"], r["destinations"], r["ids"]) == (2, 2, 2) for r in per_episode)
    assert await stores.pool.fetchval("SELECT count(*) FROM triggers_fires") == len(customers)


async def test_a_fire_made_on_stale_facts_does_not_commit_so_the_cap_holds(stores: Stores) -> None:
    """Two triggers under a cap of one fire a day, both due for one customer: decided on the
    same facts, only one fire commits; the other, decided again, ends capped."""
    destination = (await new_webhook(stores))[0]
    capped = builtin.cart_abandoned([destination])
    capped.frequency_cap.max_fires = 1
    capped.frequency_cap.window.FromTimedelta(timedelta(days=1))
    first = await new_trigger(stores, capped)
    second = await new_trigger(stores, capped)
    await open_episode(stores, first, "c1")
    await open_episode(stores, second, "c1")
    claims = await stores.episodes.claim_due(DUE, 10, owner="a")
    facts = await stores.episodes.fire_facts("c1", first, since=DUE - timedelta(days=1))
    assert len(claims) == 2 and facts.sequence == 0
    decisions = [decide(c, DUE, facts.recent_fire_times, facts.last_fire_time) for c in claims]
    assert [d.action for d in decisions] == [DueAction.FIRE, DueAction.FIRE]
    results = await asyncio.gather(
        *(
            stores.episodes.commit_fire(c, d.episode, facts, [NewDelivery(destination, {})])
            for c, d in zip(claims, decisions, strict=True)
            if d.episode is not None
        )
    )
    assert sorted(r.outcome for r in results) == [CommitOutcome.COMMITTED, CommitOutcome.FIRES_CHANGED]
    loser = claims[[r.outcome for r in results].index(CommitOutcome.FIRES_CHANGED)]
    assert await settle(stores, loser, DUE) == CommitOutcome.COMMITTED
    row = await episode_row(stores.pool, "c1", loser.trigger_id)
    assert (row["state"], row["close_reason"]) == ("ended", "frequency_cap")
    assert await count(stores.pool, "triggers_deliveries", "c1") == 1
    assert (await stores.episodes.fire_facts("c1", first, since=T0)).sequence == 1


async def test_the_cooldown_across_keys_holds_when_two_keys_fire_together(stores: Stores) -> None:
    destination = (await new_webhook(stores))[0]
    trigger_id = await new_trigger(stores, builtin.browse_abandoned([destination]))
    for sku in ("sku-1", "sku-2"):
        await open_episode(stores, trigger_id, "c1", key=sku)
    due = T0 + 2 * HOUR + timedelta(seconds=5)
    claims = await stores.episodes.claim_due(due, 10, owner="a")
    results = await asyncio.gather(*(settle(stores, c, due) for c in claims))
    fired = [r for r in results if isinstance(r, FireResult)]
    assert [r.outcome for r in fired] == [CommitOutcome.COMMITTED]
    assert [r for r in results if not isinstance(r, FireResult)] == [CommitOutcome.COMMITTED]  # the end
    states = sorted(
        (r["state"], r["close_reason"])
        for r in await stores.pool.fetch("SELECT state, close_reason FROM triggers_episodes")
    )
    assert states == [("ended", "cooldown"), ("fired", "fired")]
    assert await count(stores.pool, "triggers_fires", "c1") == 1


# ---- deferrals, pauses, deletes -----------------------------------------------------------------


async def test_quiet_hours_move_the_fire_time_and_the_episode_fires_after_them(stores: Stores) -> None:
    quiet = builtin.cart_abandoned([(await new_webhook(stores))[0]])
    quiet.quiet_hours.CopyFrom(triggers_pb2.QuietHours(start_hour=8, end_hour=12, default_time_zone="UTC"))
    trigger_id = await new_trigger(stores, quiet)
    await open_episode(stores, trigger_id, "c1")  # fires at 09:00 UTC: quiet until 12:00
    [claimed] = await stores.episodes.claim_due(DUE, 10, owner="a")
    assert await settle(stores, claimed, DUE) == CommitOutcome.COMMITTED
    row = await episode_row(stores.pool, "c1", trigger_id)
    noon = T0.replace(hour=12)
    assert (row["state"], row["fire_at"], row["due_at"], row["claimed_by"]) == (
        "waiting",
        noon,
        noon + timedelta(seconds=5),
        None,
    )
    assert await fire_due(stores, noon) == []
    [result] = await fire_due(stores, noon + timedelta(seconds=5))
    assert result.outcome == CommitOutcome.COMMITTED


async def test_an_emptied_cart_ends_the_episode(stores: Stores) -> None:
    trigger_id = await new_trigger(stores)
    await open_episode(stores, trigger_id, "c1")
    [claimed] = await stores.episodes.claim_due(DUE, 10, owner="a")
    definition = validate_trigger(claimed.trigger)
    from triggers.episodes import on_due

    decision = on_due(definition, claimed.episode, now=DUE, profile={"cart": {}})
    assert await stores.episodes.commit_decision(claimed, decision, now=DUE) == CommitOutcome.COMMITTED
    row = await episode_row(stores.pool, "c1", trigger_id)
    assert (row["state"], row["close_reason"], row["closed_at"]) == ("ended", "profile_conditions", DUE)
    # Committed once: the same claim applies nothing more.
    assert await stores.episodes.commit_decision(claimed, decision, now=DUE) == CommitOutcome.EPISODE_CHANGED
    with pytest.raises(ValueError):
        await stores.episodes.commit_decision(claimed, decide(claimed, DUE, (), None), now=DUE)


async def test_a_paused_triggers_due_episodes_are_parked_until_it_resumes(stores: Stores) -> None:
    trigger_id = await new_trigger(stores)
    await open_episode(stores, trigger_id, "c1")
    await open_episode(stores, trigger_id, "c2", at=T0 + 2 * HOUR)  # not due while paused
    await stores.triggers.pause(trigger_id)
    assert await fire_due(stores, DUE) == []
    assert (await episode_row(stores.pool, "c1", trigger_id))["due_at"].year == 9999  # parked
    assert await fire_due(stores, T0 + 4 * HOUR) == []  # c2 falls due, and is parked too
    assert await stores.episodes.claim_due(T0 + timedelta(days=300), 10, owner="a") == []
    _, woken = await stores.triggers.resume(trigger_id, T0 + timedelta(days=1))
    assert woken == 2
    results = await fire_due(stores, T0 + timedelta(days=1))
    assert [r.outcome for r in results] == [CommitOutcome.COMMITTED] * 2


async def test_a_park_decided_before_a_resume_does_not_park(stores: Stores) -> None:
    trigger_id = await new_trigger(stores)
    await open_episode(stores, trigger_id, "c1")
    await stores.triggers.pause(trigger_id)
    [claimed] = await stores.episodes.claim_due(DUE, 10, owner="a")
    decision = decide(claimed, DUE, (), None)
    assert (decision.action, decision.reason, decision.wake_at) == (DueAction.WAIT, Reason.PAUSED, None)
    _, woken = await stores.triggers.resume(trigger_id, DUE)
    assert woken == 0  # nothing parked yet
    assert await stores.episodes.commit_decision(claimed, decision, now=DUE) == CommitOutcome.COMMITTED
    assert (await episode_row(stores.pool, "c1", trigger_id))["due_at"] == DUE  # not parked: due again
    [result] = await fire_due(stores, DUE)
    assert result.outcome == CommitOutcome.COMMITTED


async def test_a_trigger_deleted_while_its_episode_is_claimed_fires_nothing(stores: Stores) -> None:
    trigger_id = await new_trigger(stores)
    await open_episode(stores, trigger_id, "c1")
    [claimed] = await stores.episodes.claim_due(DUE, 10, owner="a")
    assert await stores.triggers.delete(trigger_id) == 1
    assert await settle(stores, claimed, DUE) == FireResult(CommitOutcome.EPISODE_CHANGED)
    assert await count(stores.pool, "triggers_deliveries", "c1") == 0


async def test_a_fire_makes_no_delivery_for_a_destination_deleted_meanwhile(stores: Stores) -> None:
    kept, _ = await new_webhook(stores)
    gone, _ = await new_webhook(stores)
    trigger_id = await new_trigger(stores, destinations=[kept, gone])
    await open_episode(stores, trigger_id, "c1")
    await stores.destinations.delete(gone.removeprefix("destinations/"))
    [result] = await fire_due(stores, DUE)
    assert [d.destination for d in result.deliveries] == [kept]


async def test_the_firer_holds_its_webhook_deliveries_and_subscriptions_are_free(stores: Stores) -> None:
    hook, _ = await new_webhook(stores)
    stream = await new_subscription(stores)
    trigger_id = await new_trigger(stores, destinations=[hook, stream])
    await open_episode(stores, trigger_id, "c1")
    [result] = await fire_due(stores, DUE)
    rows = {
        r["kind"]: r
        for r in await stores.pool.fetch(
            "SELECT kind, claimed_by, available_at, payload FROM triggers_deliveries"
        )
    }
    assert rows["webhook"]["claimed_by"] == "replica-a" and rows["webhook"]["available_at"] > DUE
    assert rows["subscription"]["claimed_by"] is None and rows["subscription"]["available_at"] == DUE
    [delivery] = [d for d in result.deliveries if d.destination == hook]
    assert delivery.webhook_id.startswith("msg_") and delivery.profile == "profiles/c1"
    assert delivery.state == triggers_pb2.DELIVERY_STATE_PENDING
    assert delivery.create_time.ToDatetime().replace(tzinfo=T0.tzinfo) == DUE
    assert dict(delivery.payload) == {"trigger": f"triggers/{trigger_id}", "profile": "profiles/c1"}
