"""A claim the firer could not settle nor release (PostgreSQL away just then) is released again
as soon as PostgreSQL answers, not left to its lease (60 s). Real store; the firer's loop."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime, timedelta

from sendtime.triggers.v1 import triggers_pb2
from tests.triggers.engine_support import MovingClock, Profiles, Renderer, eventually_true
from tests.triggers.store_support import DUE, Stores, episode_row, new_trigger, open_episode
from triggers.definitions import TriggerCache
from triggers.episode_store import ClaimedEpisode, EpisodeStore
from triggers.firer import Firer, FirerSettings
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


async def _no_deliveries(deliveries: Sequence[triggers_pb2.Delivery], body: bytes) -> None:
    raise AssertionError("nothing fires while the profile service is down")


async def test_a_claim_whose_release_failed_is_released_once_postgresql_answers(stores: Stores) -> None:
    trigger_id = await new_trigger(stores)
    await open_episode(stores, trigger_id, "c1")
    episodes = ReleasesFailing(stores.pool)
    profiles = Profiles()
    profiles.down = True  # the settle fails: the claim is released with a backoff of 1 s
    settings = FirerSettings(owner="a", poll_interval_s=0.02)
    firer = Firer(
        episodes=episodes,
        triggers=TriggerCache(TriggerStore(stores.pool)),
        profiles=profiles,
        renderer=Renderer(),
        hand_off=_no_deliveries,
        clock=MovingClock(DUE),
        settings=settings,
    )
    loop = asyncio.create_task(firer.run())
    try:
        await eventually_true(lambda: episodes.attempts >= 1)
        row = await episode_row(stores.pool, "c1", trigger_id)
        assert row["claimed_by"] == "a" and row["due_at"] == DUE + settings.lease  # still claimed

        episodes.failing = False

        async def released() -> bool:
            return (await episode_row(stores.pool, "c1", trigger_id))["claimed_by"] is None

        await eventually_true(released)
        row = await episode_row(stores.pool, "c1", trigger_id)
        assert row["state"] == "waiting"
        assert row["due_at"] == DUE + timedelta(seconds=1)  # the backoff asked for
    finally:
        firer.stop()
        await loop
