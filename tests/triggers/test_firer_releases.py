"""Claims the firer lost track of (a release that failed, a claim whose answer was lost) are
given up as soon as PostgreSQL answers, not left to their lease (60 s). Real store; the firer's
loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

from sendtime.triggers.v1 import triggers_pb2
from tests.triggers.engine_support import MovingClock, Profiles, Renderer, cart_profile, eventually_true
from tests.triggers.store_support import DUE, Stores, episode_row, new_trigger, open_episode
from triggers.definitions import TriggerCache
from triggers.episode_store import DEFAULT_LEASE, ClaimedEpisode, EpisodeStore
from triggers.firer import Firer, FirerSettings, HandOff
from triggers.trigger_store import TriggerStore


class ReleasesFailing(EpisodeStore):
    """The real store, whose releases fail while ``failing`` (PostgreSQL away at that moment)."""

    failing = True
    attempts = 0

    async def release(self, claimed: ClaimedEpisode, *, due_at: datetime) -> bool:
        self.attempts += 1
        if self.failing:
            raise ConnectionResetError("PostgreSQL went away (test)")
        return await super().release(claimed, due_at=due_at)


@asynccontextmanager
async def firer_running(
    stores: Stores, episodes: EpisodeStore, profiles: Profiles, hand_off: HandOff
) -> AsyncIterator[Firer]:
    """Replica a's firer loop on ``episodes``, at the due time, until the block ends."""
    firer = Firer(
        episodes=episodes,
        triggers=TriggerCache(TriggerStore(stores.pool)),
        profiles=profiles,
        renderer=Renderer(),
        hand_off=hand_off,
        clock=MovingClock(DUE),
        settings=FirerSettings(owner="a", poll_interval_s=0.02),
    )
    loop = asyncio.create_task(firer.run())
    try:
        yield firer
    finally:
        firer.stop()
        await loop


async def _no_deliveries(deliveries: Sequence[triggers_pb2.Delivery], body: bytes) -> None:
    raise AssertionError("nothing fires while the profile service is down")


async def test_a_claim_whose_release_failed_is_released_once_postgresql_answers(stores: Stores) -> None:
    trigger_id = await new_trigger(stores)
    await open_episode(stores, trigger_id, "c1")
    episodes = ReleasesFailing(stores.pool)
    profiles = Profiles()
    profiles.down = True  # the settle fails: the claim is released with a backoff of 1 s
    async with firer_running(stores, episodes, profiles, _no_deliveries):
        await eventually_true(lambda: episodes.attempts >= 1)
        row = await episode_row(stores.pool, "c1", trigger_id)
        assert row["claimed_by"] == "a" and row["due_at"] == DUE + FirerSettings().lease  # still claimed

        episodes.failing = False

        async def released() -> bool:
            return (await episode_row(stores.pool, "c1", trigger_id))["claimed_by"] is None

        await eventually_true(released)
        row = await episode_row(stores.pool, "c1", trigger_id)
        assert row["state"] == "waiting"
        assert row["due_at"] == DUE + timedelta(seconds=1)  # the backoff asked for


class ClaimAnswerLost(EpisodeStore):
    """The real store, whose first claim commits and then loses its answer with the connection
    (PostgreSQL restarting between the commit and the reply)."""

    lost = 0

    async def claim_due(
        self, now: datetime, limit: int, *, owner: str, lease: timedelta = DEFAULT_LEASE
    ) -> list[ClaimedEpisode]:
        claimed = await super().claim_due(now, limit, owner=owner, lease=lease)
        if claimed and not self.lost:
            self.lost = len(claimed)
            raise ConnectionResetError("PostgreSQL went away before the answer (test)")
        return claimed


async def test_a_claim_whose_answer_was_lost_is_given_up_before_the_next_claim(stores: Stores) -> None:
    """Not left to the claim's lease (60 s): the firer gives up the claims it holds and is not
    settling, and the episode is claimed again and fired at once."""
    trigger_id = await new_trigger(stores)
    await open_episode(stores, trigger_id, "c1")
    episodes = ClaimAnswerLost(stores.pool)
    profiles = Profiles()
    profiles.by_id["c1"] = cart_profile("c1")
    handed: list[str] = []

    async def hand_off(deliveries: Sequence[triggers_pb2.Delivery], body: bytes) -> None:
        handed.extend(d.name for d in deliveries)

    async with firer_running(stores, episodes, profiles, hand_off):
        await eventually_true(lambda: len(handed) == 1)
    assert episodes.lost == 1
    row = await episode_row(stores.pool, "c1", trigger_id)
    assert row["state"] == "fired"


async def test_the_claims_in_hand_are_kept_the_others_given_up(stores: Stores) -> None:
    trigger_id = await new_trigger(stores)
    for customer in ("c1", "c2"):
        await open_episode(stores, trigger_id, customer)
    claimed = await stores.episodes.claim_due(DUE, 10, owner="a")
    assert sorted(c.customer_id for c in claimed) == ["c1", "c2"]
    other_owner = await stores.episodes.claim_due(DUE, 10, owner="b")
    assert other_owner == []
    given_up = await stores.episodes.release_claims_not_in_hand("a", {("c1", trigger_id, "")}, DUE)
    assert given_up == 1
    kept = await episode_row(stores.pool, "c1", trigger_id)
    freed = await episode_row(stores.pool, "c2", trigger_id)
    assert kept["claimed_by"] == "a"
    assert freed["claimed_by"] is None and freed["due_at"] == DUE
    assert await stores.episodes.release_claims_not_in_hand("b", set(), DUE) == 0  # b holds none
