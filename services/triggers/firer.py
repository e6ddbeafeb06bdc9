"""The firer: claims due episodes and settles each one (docs/triggers-storage.md, "Durable
timers: claim, decide, commit").

One loop per replica. It claims up to ``claim_limit`` due episodes (a lease, not a lock), and
settles them side by side, at most ``concurrency`` at a time. While claims come back full it
claims again at once, so a backlog drains at the speed of the settles; otherwise it sleeps
until the earliest due time (``EpisodeStore.next_due_at``), at most ``poll_interval_s``, or
until ``wake(due_at)`` says an episode due sooner was written in this replica. An idle replica
reads one index minimum per poll interval.

Settling a claimed episode:

1. ``on_due`` without the profile first: an episode not due yet, or of a paused trigger, is
   written back (WAIT: due later, or parked) without reading anything else;
2. the live profile (``ProfileReader``; none: the person was erased or merged away, and
   ``on_due`` ends the episode ERASED) and the fires (``fire_facts``), then ``on_due``;
3. FIRE: the template, when the trigger has one, is rendered (``MessageRenderer``):
   - SKIPPED: the episode ends (``render_skipped``); a template that no longer exists ends it
     too (``template_missing``);
   - rendered on fallback data (no live profile: ``fallback_used`` or ``degraded``), or the
     render service unavailable: the claim is released, due again after a backoff. A fire is
     never sent on fallback data;
   then the fire is committed with the webhook body (``payload.fired_payload``, encoded once):
   COMMITTED hands the deliveries and that body to the dispatcher at once; FIRES_CHANGED reads
   the facts again and decides again (the render is reused); EPISODE_CHANGED drops the decision
   (an exit or an erasure won);
4. any other decision: ``commit_decision`` (DEFER, END, WAIT).

**Settles read and commit in batches.** The settles under way do not each make their own round
trips: the fire facts asked for within one turn of the event loop (and, while a batch is being
read, all those asked for meanwhile), up to ``claim_limit``, are read in one statement
(``EpisodeStore.fire_facts_of``), and the fires decided likewise go together to
``EpisodeStore.commit_fires``: one transaction and a few round trips for the batch instead of
three per fire, with each fire's outcome what ``commit_fire`` would have said.

The profile service unavailable, or PostgreSQL failing, releases the claim with a backoff
(1 s doubling to 60 s per episode); a release that fails too (PostgreSQL away) is tried again
before each claim round, so the episode is due again soon after PostgreSQL is back, not when the
lease ends (60 s); the lease is what is left if the replica dies meanwhile. A claim that failed
may have committed without its answer (the connection lost): before the next claim, the firer
gives up the claims it holds but is not settling.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Final

import orjson

from sendtime.render.v1 import render_pb2
from sendtime.triggers.v1 import triggers_pb2
from sendtime_common.batching import MicroBatcher
from sendtime_common.errors import log_unexpected, new_error_id
from triggers.conditions import profile_document
from triggers.definitions import TriggerCache
from triggers.dependencies import DependencyUnavailable, MessageRenderer, ProfileReader
from triggers.episode_store import (
    ClaimedEpisode,
    CommitOutcome,
    EpisodeStore,
    FactsQuery,
    FireCommit,
    FireFacts,
    FireResult,
)
from triggers.episodes import DueAction, DueDecision, EpisodeState, Reason, due_at, on_due
from triggers.payload import fired_payload
from triggers.store import StoreError

log = logging.getLogger(__name__)

_MAX_DECISIONS: Final = 8  # FIRES_CHANGED rounds on one claim before it is released
_MAX_BACKOFFS: Final = 10_000  # episodes whose release backoff is remembered
_MIN_WAIT_S: Final = 0.005
# Batches of fact reads, and of fire commits, under way at once: one runs while the next fills.
_BATCHES_AT_ONCE: Final = 2

Clock = Callable[[], datetime]
# Gives a fire's committed deliveries (without their payload), and their body (JSON), to this
# replica's dispatcher.
HandOff = Callable[[Sequence[triggers_pb2.Delivery], bytes], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class FirerSettings:
    owner: str = "firer"
    claim_limit: int = 100
    concurrency: int = 64
    lease: timedelta = timedelta(seconds=60)
    delivery_lease: timedelta = timedelta(minutes=1)
    poll_interval_s: float = 0.5
    release_base: timedelta = timedelta(seconds=1)
    release_max: timedelta = timedelta(seconds=60)


@dataclass
class FirerStats:
    claimed: int = 0
    fired: int = 0
    released: int = 0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)  # by Reason/outcome
    # How late each fire was past its due time (fire_at + allowed lateness), newest last.
    lateness: collections.deque[timedelta] = field(default_factory=lambda: collections.deque(maxlen=100_000))


class _Release(Exception):
    """Give the claim up: what the decision needs could not be had now."""


class Firer:
    def __init__(
        self,
        *,
        episodes: EpisodeStore,
        triggers: TriggerCache,
        profiles: ProfileReader,
        renderer: MessageRenderer,
        hand_off: HandOff,
        clock: Clock,
        settings: FirerSettings = FirerSettings(),
    ) -> None:
        """``hand_off``: gives a fire's committed deliveries to this replica's dispatcher."""
        self._episodes = episodes
        self._triggers = triggers
        self._profiles = profiles
        self._renderer = renderer
        self._hand_off = hand_off
        self._clock = clock
        self._settings = settings
        self._wake = asyncio.Event()
        self._sleeping_until: datetime | None = None
        self._stopping = False
        # The settles under way, each with its claim's episode (customer, trigger, key).
        self._settling: dict[asyncio.Task[None], tuple[str, str, str]] = {}
        self._failures: dict[tuple[str, str, str], int] = {}
        # Claims whose release failed, with the due time asked for: released again next round.
        self._unreleased: dict[tuple[str, str, str], tuple[ClaimedEpisode, datetime]] = {}
        # Whether a claim failed, so that it may have committed claims this firer never heard of
        # (those not being settled are given up before the next claim).
        self._claims_maybe_lost = False
        self._fact_reads: MicroBatcher[FactsQuery, FireFacts] = MicroBatcher(
            episodes.fire_facts_of, max_batch=settings.claim_limit, max_concurrent_batches=_BATCHES_AT_ONCE
        )
        self._fire_commits: MicroBatcher[FireCommit, FireResult] = MicroBatcher(
            self._commit_fires, max_batch=settings.claim_limit, max_concurrent_batches=_BATCHES_AT_ONCE
        )
        self.stats = FirerStats()

    def wake(self, due: datetime | None = None) -> None:
        """An episode due at ``due`` was written (None: something changed): look again now if
        the loop sleeps past it."""
        if due is None or self._sleeping_until is None or due < self._sleeping_until:
            self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Claim and settle until ``stop``; the settles under way are awaited by ``drain``."""
        s = self._settings
        batch = min(s.claim_limit, s.concurrency)
        while not self._stopping:
            free = s.concurrency - len(self._settling)
            if free < max(batch // 2, 1):
                await asyncio.wait(set(self._settling), return_when=asyncio.FIRST_COMPLETED)
                continue
            asked = min(batch, free)
            try:
                await self._release_again()
                if self._claims_maybe_lost:
                    in_hand = set(self._settling.values())
                    await self._episodes.release_claims_not_in_hand(s.owner, in_hand, self._clock())
                    self._claims_maybe_lost = False
                claimed = await self._episodes.claim_due(self._clock(), asked, owner=s.owner, lease=s.lease)
            except StoreError as exc:
                self._claims_maybe_lost = True
                log.warning("due episodes could not be claimed", extra={"error": type(exc).__name__})
                await self._sleep(s.poll_interval_s)
                continue
            except Exception as exc:  # noqa: BLE001 - a bug must not end the loop
                log_unexpected(log, "claiming due episodes failed", exc, {"error_id": new_error_id()})
                await self._sleep(s.poll_interval_s)
                continue
            self.stats.claimed += len(claimed)
            for episode in claimed:
                task = asyncio.create_task(self.settle(episode), name="trigger-fire")
                self._settling[task] = (episode.customer_id, episode.trigger_id, episode.episode.key)
                task.add_done_callback(self._settled)
            if len(claimed) == asked:
                continue  # more may be due: claim again at once
            await self._sleep_until_due()

    def _settled(self, task: asyncio.Task[None]) -> None:
        del self._settling[task]

    async def drain(self) -> None:
        """Wait for the settles under way (the caller bounds the wait)."""
        if self._settling:
            await asyncio.wait(set(self._settling))

    async def fire_due(self) -> int:
        """One round outside the loop: claim what is due now (up to the claim limit) and settle
        it; how many were claimed."""
        claimed = await self._episodes.claim_due(
            self._clock(), self._settings.claim_limit, owner=self._settings.owner, lease=self._settings.lease
        )
        self.stats.claimed += len(claimed)
        await asyncio.gather(*(self.settle(episode) for episode in claimed))
        return len(claimed)

    async def _sleep_until_due(self) -> None:
        poll_s = self._settings.poll_interval_s
        try:
            next_due = await self._episodes.next_due_at()
        except StoreError:
            next_due = None
        now = self._clock()
        # At least a moment: an episode another firer is claiming right now still looks due.
        wait_s = (
            poll_s if next_due is None else min(max((next_due - now).total_seconds(), _MIN_WAIT_S), poll_s)
        )
        self._sleeping_until = now + timedelta(seconds=wait_s)
        try:
            await self._sleep(wait_s)
        finally:
            self._sleeping_until = None

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        if seconds <= 0 or self._stopping:
            return
        try:
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        except TimeoutError:
            pass

    # ---- one claimed episode ---------------------------------------------------------------------

    async def settle(self, claimed: ClaimedEpisode) -> None:
        """Decide on a claimed episode and commit (or release) it; never raises."""
        slot = (claimed.customer_id, claimed.trigger_id, claimed.episode.key)
        try:
            await self._settle(claimed)
            self._failures.pop(slot, None)
        except (_Release, DependencyUnavailable, *StoreError) as exc:
            await self._release(claimed, slot, type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - a bug: the episode is tried again later
            log_unexpected(log, "settling a due episode failed", exc, {"error_id": new_error_id()})
            await self._release(claimed, slot, "unexpected")

    async def _release(self, claimed: ClaimedEpisode, slot: tuple[str, str, str], why: str) -> None:
        s = self._settings
        failures = self._failures.get(slot, 0)
        if len(self._failures) >= _MAX_BACKOFFS:
            self._failures.clear()
        self._failures[slot] = failures + 1
        backoff = min(s.release_base * 2**failures, s.release_max)
        log.info(
            "due episode released",
            extra={"trigger": claimed.trigger_id, "why": why, "retry_in": str(backoff)},
        )
        due_at = self._clock() + backoff
        try:
            await self._episodes.release(claimed, due_at=due_at)
        except StoreError:
            if len(self._unreleased) < _MAX_BACKOFFS:  # past that, the leases end by themselves
                self._unreleased[slot] = (claimed, due_at)
        self.stats.released += 1
        self.stats.outcomes[f"released:{why}"] += 1

    async def _release_again(self) -> None:
        """Release the claims whose release failed, one statement each, oldest first.

        Raises:
            StoreError: PostgreSQL failed again (the rest wait for the next round).
        """
        while self._unreleased:
            slot, (claimed, due_at) = next(iter(self._unreleased.items()))
            await self._episodes.release(claimed, due_at=due_at)  # False: changed since: nothing held
            del self._unreleased[slot]

    async def _settle(self, claimed: ClaimedEpisode) -> None:
        definition = self._triggers.definition_of(claimed.trigger)
        if definition is None:
            raise _Release("the stored trigger is not valid")
        paused = claimed.trigger.state == triggers_pb2.TRIGGER_STATE_PAUSED
        now = self._clock()
        early = on_due(definition, claimed.episode, now=now, profile=None, paused=paused)
        if early.action == DueAction.WAIT:
            await self._commit(claimed, early, now)
            return
        profile = await self._profiles.get_profile(claimed.customer_id)
        document = profile_document(profile) if profile is not None else None
        cap = definition.frequency_cap
        since = now - cap.window if cap is not None else now
        rendered: render_pb2.RenderResponse | None = None
        template = definition.delivery.template
        for _ in range(_MAX_DECISIONS):
            facts = await self._fact_reads.submit(FactsQuery(claimed.customer_id, claimed.trigger_id, since))
            decision = on_due(
                definition,
                claimed.episode,
                now=now,
                profile=document,
                recent_fire_times=facts.recent_fire_times,
                last_fire_time=facts.last_fire_time,
                paused=paused,
            )
            if decision.action != DueAction.FIRE:
                await self._commit(claimed, decision, now)
                return
            fired = decision.episode
            assert fired is not None and fired.closed_at is not None
            if template and rendered is None:
                outcome = await self._render(claimed, template)
                if isinstance(outcome, Reason):
                    ended = DueDecision(DueAction.END, outcome, replace(fired, state=EpisodeState.ENDED))
                    await self._commit(claimed, ended, now)
                    return
                rendered = outcome
            payload = fired_payload(
                trigger_id=claimed.trigger_id,
                customer_id=claimed.customer_id,
                episode_key=claimed.episode.key,
                fire_time=claimed.episode.fire_at,
                fired_at=fired.closed_at,
                variables=definition.delivery.variables,
                template=template,
                rendered=rendered,
            )
            body = orjson.dumps(payload)
            result = await self._fire_commits.submit(
                FireCommit(claimed, fired, facts, definition.delivery.destinations, body)
            )
            self.stats.outcomes[str(result.outcome)] += 1
            if result.outcome == CommitOutcome.FIRES_CHANGED:
                continue
            if result.outcome == CommitOutcome.COMMITTED:
                self.stats.fired += 1
                self.stats.outcomes[str(Reason.FIRED)] += 1
                self.stats.lateness.append(self._clock() - due_at(definition, claimed.episode))
                await self._hand_off(result.deliveries, body)
            return
        raise _Release("other fires of the customer kept committing first")

    async def _commit_fires(self, commits: list[FireCommit]) -> list[FireResult]:
        return await self._episodes.commit_fires(commits, delivery_lease=self._settings.delivery_lease)

    async def _render(self, claimed: ClaimedEpisode, template: str) -> render_pb2.RenderResponse | Reason:
        """The rendered message, or why the episode ends instead.

        Raises:
            _Release: rendered on fallback data (no live profile): try again later.
            DependencyUnavailable: the render service could not answer.
        """
        try:
            rendered = await self._renderer.render(
                template, claimed.customer_id, claimed.trigger.delivery.variables
            )
        except LookupError:
            log.warning("the trigger's template does not exist", extra={"trigger": claimed.trigger_id})
            return Reason.TEMPLATE_MISSING
        if rendered.status == render_pb2.RENDER_STATUS_SKIPPED:
            return Reason.RENDER_SKIPPED
        if rendered.fallback_used or rendered.degraded:
            raise _Release("rendered on fallback data")
        return rendered

    async def _commit(self, claimed: ClaimedEpisode, decision: DueDecision, now: datetime) -> None:
        if decision.action == DueAction.NONE:
            return
        outcome = await self._episodes.commit_decision(claimed, decision, now=now)
        self.stats.outcomes[str(decision.reason) if outcome == CommitOutcome.COMMITTED else str(outcome)] += 1


def lateness_percentile(stats: FirerStats, fraction: float) -> timedelta | None:
    """The ``fraction`` percentile (0.99: p99) of the fires' lateness recorded so far."""
    if not stats.lateness:
        return None
    ordered = sorted(stats.lateness)
    return ordered[min(int(fraction * len(ordered)), len(ordered) - 1)]
