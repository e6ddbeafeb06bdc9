"""The profile change consumer: every merged event, as the profile service announces it
(``sendtime.profile.v1.ProfileChange`` on the profile change stream), applied to every trigger.

For a change and a trigger, ``episodes.roles_of`` says what the event is to it:

- **an exit**: the exit's time is recorded (``record_exit``, whatever it ends: an entry that
  arrives later reads it as a known exit), then each episode it names (every one of the
  customer's for an exit without a key) is decided again with ``on_event``: a waiting one whose
  wait the exit falls in EXITS;
- **an entry**: the episode of its key is read with the last fire and the known exits
  (``event_context``), ``on_event`` decides, and ``save_episode`` writes what it says (open,
  restart, exit). When the decision opens an episode of a trigger with profile conditions, the
  live profile is read (``ProfileReader``) and the decision taken again with it, if the profile
  includes the event (its version at least the change's ``profile_version``); otherwise the
  conditions are checked at the fire only.

Every write is conditional on the version read; a write that finds the episode changed (a
firer's claim, another change) reads again and decides again. A change's
``merged_customer_ids`` are moved to its customer first (``store.merge_customers``).

At least once, never dropped: a change is acknowledged only after its writes committed. A
change whose writes fail (PostgreSQL down, the profile service down) is handed back to the log
(``retry_later``, backing off), and so are the later changes of the same customer in the batch.
A redelivered change decides nothing new: its entry is no later than the one the wait runs from
(``OUT_OF_ORDER``) or belongs to a closed episode, its exit time is already known, and its merge
finds nothing left to move. Changes of different customers in a batch are applied side by side;
one customer's in order.

A message that is not a ProfileChange is logged (its position and size, never its bytes) and
discarded, and counted.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import asyncpg
from google.protobuf.message import DecodeError

from sendtime.profile.v1 import profile_pb2
from sendtime_common.errors import log_unexpected, new_error_id
from sendtime_common.event_log import Delivery, EventLog, EventLogSubscription
from triggers.conditions import profile_document
from triggers.definitions import KnownTrigger, TriggerCache
from triggers.dependencies import DependencyUnavailable, ProfileReader
from triggers.episode_store import EpisodeStore
from triggers.episodes import EpisodeState, EventAction, IncomingEvent, due_at, on_event, roles_of
from triggers.store import NotFound, StoreError, merge_customers

log = logging.getLogger(__name__)

# Reads and decisions again after a write that found the episode changed; each retry follows a
# concurrent write, so a few suffice; past them the change is retried later.
_MAX_DECISIONS: Final = 8
# A profile older than the change is read again once after this, then not waited for.
_PROFILE_REREAD_S: Final = 0.05


class EpisodeBusy(Exception):
    """An episode kept changing under the consumer's writes: retry the change later."""


@dataclass(frozen=True, slots=True)
class ConsumerSettings:
    durable_name: str = "triggers-changes"
    batch_size: int = 64
    fetch_timeout_s: float = 1.0
    concurrency: int = 16  # customers of a batch applied at once
    retry_base_s: float = 0.5
    retry_max_s: float = 30.0


@dataclass
class ConsumerStats:
    changes: int = 0  # applied and acknowledged
    undecodable: int = 0
    retried: int = 0  # handed back to the log
    merges: int = 0
    decisions: collections.Counter[str] = field(default_factory=collections.Counter)  # by Reason


Clock = Callable[[], datetime]


class _LiveProfile:
    """The customer's profile for one change, read at most twice, only if a decision needs it."""

    def __init__(self, reader: ProfileReader, customer_id: str, min_version: int) -> None:
        self._reader = reader
        self._customer_id = customer_id
        self._min_version = min_version
        self._read = False
        self._document: Mapping[str, Any] | None = None

    async def document(self) -> Mapping[str, Any] | None:
        """The profile document if it includes the change's event; None otherwise.

        Raises:
            DependencyUnavailable: the profile service could not answer.
        """
        if not self._read:
            profile = await self._reader.get_profile(self._customer_id)
            if profile is not None and profile.version < self._min_version:
                await asyncio.sleep(_PROFILE_REREAD_S)
                profile = await self._reader.get_profile(self._customer_id)
            if profile is not None and profile.version >= self._min_version:
                self._document = profile_document(profile)
            self._read = True
        return self._document


class ChangeConsumer:
    def __init__(
        self,
        *,
        event_log: EventLog,
        pool: asyncpg.Pool,
        episodes: EpisodeStore,
        triggers: TriggerCache,
        profiles: ProfileReader,
        clock: Clock,
        settings: ConsumerSettings = ConsumerSettings(),
        on_waiting: Callable[[datetime], None] = lambda due: None,
    ) -> None:
        """``on_waiting(due_at)``: an episode now waits until ``due_at`` (the firer wakes for it)."""
        self._event_log = event_log
        self._pool = pool
        self._episodes = episodes
        self._triggers = triggers
        self._profiles = profiles
        self._clock = clock
        self._settings = settings
        self._on_waiting = on_waiting
        self._subscription: EventLogSubscription | None = None
        self._stopping = False
        self.stats = ConsumerStats()

    async def start(self) -> None:
        """Subscribe (the durable consumer resumes after the last acknowledged change).

        Raises:
            sendtime_common.event_log.EventLogUnavailable: the stream did not appear in time.
        """
        self._subscription = await self._event_log.subscribe_profile_changes(self._settings.durable_name)

    async def run(self) -> None:
        """Fetch and apply changes until ``stop``; the batch in hand is finished first."""
        assert self._subscription is not None, "start() first"
        while not self._stopping:
            try:
                batch = await self._subscription.fetch(
                    self._settings.batch_size, self._settings.fetch_timeout_s
                )
            except Exception as exc:  # noqa: BLE001 - NATS away: the client reconnects; try again
                log.warning("profile changes could not be fetched", extra={"error": type(exc).__name__})
                await asyncio.sleep(self._settings.retry_base_s)
                continue
            if batch:
                await self.apply_batch(batch)

    def stop(self) -> None:
        self._stopping = True

    async def close(self) -> None:
        if self._subscription is not None:
            await self._subscription.close()

    async def apply_batch(self, batch: Sequence[Delivery]) -> None:
        """Apply a fetched batch: each customer's changes in order, customers side by side. A
        change that merges customers is ordered with the merged customers' changes too (their
        earlier changes first, so none lands under a merged id after the merge moved it)."""
        decoded: list[tuple[Delivery, profile_pb2.ProfileChange]] = []
        for delivery in batch:
            try:
                decoded.append((delivery, profile_pb2.ProfileChange.FromString(delivery.payload)))
            except DecodeError:
                self.stats.undecodable += 1
                log.error(
                    "undecodable profile change discarded",
                    extra={"position": delivery.position, "bytes": len(delivery.payload)},
                )
                await delivery.discard()
        limit = asyncio.Semaphore(self._settings.concurrency)

        async def apply_in_order(changes: list[tuple[Delivery, profile_pb2.ProfileChange]]) -> None:
            async with limit:
                for i, (delivery, change) in enumerate(changes):
                    if not await self._apply_one(delivery, change):
                        # The customer's later changes wait for this one.
                        for later, _ in changes[i + 1 :]:
                            await self._retry_later(later)
                        return

        await asyncio.gather(*(apply_in_order(group) for group in customer_groups(decoded)))

    async def _apply_one(self, delivery: Delivery, change: profile_pb2.ProfileChange) -> bool:
        """Apply and acknowledge; False when handed back to the log."""
        try:
            await self.apply(change)
        except (DependencyUnavailable, EpisodeBusy, *StoreError) as exc:
            log.warning(
                "profile change will be applied again",
                extra={"error": type(exc).__name__, "attempt": delivery.attempt},
            )
            await self._retry_later(delivery)
            return False
        except Exception as exc:  # noqa: BLE001 - a bug: never drop the change, keep it for later
            log_unexpected(log, "profile change failed", exc, {"error_id": new_error_id()})
            await self._retry_later(delivery)
            return False
        await delivery.ack()
        self.stats.changes += 1
        return True

    async def _retry_later(self, delivery: Delivery) -> None:
        s = self._settings
        self.stats.retried += 1
        delay_s = min(s.retry_base_s * 2 ** max(delivery.attempt - 1, 0), s.retry_max_s)
        try:
            await delivery.retry_later(delay_s)
        except Exception as exc:  # noqa: BLE001 - unacked, it comes back after the ack wait anyway
            log.warning("profile change not handed back", extra={"error": type(exc).__name__})

    async def apply(self, change: profile_pb2.ProfileChange) -> None:
        """Apply one change to every trigger (a merge first).

        Raises:
            DependencyUnavailable: the profile was needed and could not be read.
            EpisodeBusy: an episode kept changing under the writes.
            triggers.store.StoreError: PostgreSQL failed.
        """
        customer_id = change.customer_id
        if not customer_id:
            return
        if change.merged_customer_ids:
            await merge_customers(self._pool, customer_id, list(change.merged_customer_ids), self._clock())
            self.stats.merges += 1
        if not change.HasField("event"):
            return
        event = IncomingEvent.of(change.event)
        profile = _LiveProfile(self._profiles, customer_id, change.profile_version)
        for known in await self._triggers.all():
            roles = roles_of(known.definition, event)
            if not roles.entry and not roles.is_exit:
                continue
            try:
                decided: set[str] = set()
                if roles.is_exit:
                    await self._episodes.record_exit(
                        customer_id,
                        known.trigger_id,
                        event.occurred_at,
                        keys=roles.exit_keys,
                        any_key=roles.exits_any,
                    )
                    keys = None if roles.exits_any else roles.exit_keys
                    for stored in await self._episodes.episodes(customer_id, known.trigger_id, keys):
                        if stored.episode.state in (EpisodeState.WAITING, EpisodeState.FIRED):
                            await self._decide(known, event, customer_id, stored.episode.key, profile)
                            decided.add(stored.episode.key)
                if roles.entry and roles.entry_key is not None and roles.entry_key not in decided:
                    await self._decide(known, event, customer_id, roles.entry_key, profile)
            except NotFound:
                continue  # the trigger was deleted meanwhile: nothing of it to keep

    async def _decide(
        self, known: KnownTrigger, event: IncomingEvent, customer_id: str, key: str, profile: _LiveProfile
    ) -> None:
        definition = known.definition
        for _ in range(_MAX_DECISIONS):
            context = await self._episodes.event_context(customer_id, known.trigger_id, key)
            stored = context.episode
            held = stored.episode if stored is not None else None
            decision = on_event(
                definition,
                event,
                held,
                last_fire_time=context.last_fire_time,
                known_exits=context.known_exits,
                paused=known.paused,
            )
            if decision.action == EventAction.OPEN and definition.profile_conditions:
                document = await profile.document()
                if document is not None:
                    decision = on_event(
                        definition,
                        event,
                        held,
                        last_fire_time=context.last_fire_time,
                        known_exits=context.known_exits,
                        profile=document,
                        paused=known.paused,
                    )
            self.stats.decisions[str(decision.reason)] += 1
            if decision.action not in (EventAction.OPEN, EventAction.RESTART, EventAction.EXIT):
                return
            episode = decision.episode
            assert episode is not None  # these actions carry the episode to store
            waiting_until = due_at(definition, episode) if episode.state == EpisodeState.WAITING else None
            saved = await self._episodes.save_episode(
                customer_id,
                known.trigger_id,
                episode,
                version=stored.version if stored is not None else None,
                due_at=waiting_until,
                reason=decision.reason,
            )
            if saved is not None:
                if waiting_until is not None:
                    self._on_waiting(waiting_until)
                return
            self.stats.decisions["conflict"] += 1
        raise EpisodeBusy(f"{known.trigger_id}: the episode kept changing")


def customer_groups(
    changes: Sequence[tuple[Delivery, profile_pb2.ProfileChange]],
) -> list[list[tuple[Delivery, profile_pb2.ProfileChange]]]:
    """``changes`` split into groups that share no customer (its id or a merged one), each in
    the batch's order: groups can be applied side by side, a group in order."""
    parent: dict[str, str] = {}

    def root(customer_id: str) -> str:
        parent.setdefault(customer_id, customer_id)
        while parent[customer_id] != customer_id:
            parent[customer_id] = parent[parent[customer_id]]
            customer_id = parent[customer_id]
        return customer_id

    for _, change in changes:
        for merged in change.merged_customer_ids:
            parent[root(merged)] = root(change.customer_id)
    groups: dict[str, list[tuple[Delivery, profile_pb2.ProfileChange]]] = {}
    for item in changes:
        groups.setdefault(root(item[1].customer_id), []).append(item)
    return list(groups.values())
