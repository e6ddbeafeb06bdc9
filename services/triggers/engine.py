"""The triggers engine: what runs the triggers in every replica (docs/triggers-engine.md).

- the **change consumer** (change_consumer.py) applies the profile change stream to every
  trigger: episodes open, restart and exit; merged customers' episodes move;
- the **firer** (firer.py) claims due episodes, decides at the fire, renders and commits;
- the **delivery pump** (delivery_pump.py) keeps the webhook dispatcher's destinations, hands it
  the firer's deliveries, renews its leases and takes up what is due (a dead replica's too);
- the **heartbeat** (replicas.py) says this replica is alive, and hands back at once what a
  replica that stopped beating held (its claims and delivery leases), instead of when they end;
- the **erasure follower** hears every erasure notice (``ErasureNotice.customer_id``) and
  removes the customer's episodes, exits, fires and deliveries (``store.erase_customer``), and
  drops what the dispatcher holds for them.

The caller (server.py) owns the pool and the event log, and gives the engine the profile
reader and the renderer; ``start()`` and ``close()`` bracket the engine's own work.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
from aiohttp.abc import AbstractResolver
from google.protobuf.message import DecodeError

from sendtime.profile.v1 import profile_pb2
from sendtime_common.event_log import EventLog, Following, RetryLater
from sendtime_common.shutdown import FINISH_S, RELEASE_S, bounded, finish_or_cancel
from triggers.change_consumer import ChangeConsumer, ConsumerSettings
from triggers.definitions import TriggerCache
from triggers.delivery import Dispatcher, DispatcherSettings, Sleep
from triggers.delivery_pump import DeliveryPump, PumpSettings
from triggers.delivery_store import DeliveryStore
from triggers.dependencies import MessageRenderer, ProfileReader
from triggers.destination_store import DestinationStore
from triggers.episode_store import EpisodeStore
from triggers.firer import Clock, Firer, FirerSettings
from triggers.replicas import DEFAULT_INTERVAL, DEFAULT_TTL, ReplicaRegistry
from triggers.secret_box import SecretBox
from triggers.ssrf import UrlPolicy
from triggers.store import StoreError, erase_customer
from triggers.trigger_store import TriggerStore

log = logging.getLogger(__name__)


def default_owner() -> str:
    """This replica's name in claims, leases and heartbeats: the host name, the process id and
    a random part (a container restarted in the same pod has the same host name and pid, and
    must not pass for the process that died)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """Plain defaults; server.py maps the environment onto them."""

    # Unique among the running replicas: claims and delivery leases are held under it.
    owner: str = field(default_factory=default_owner)
    # The profile change stream's durable consumer, shared by the replicas (each change goes to one).
    changes_durable_name: str = "triggers-changes"
    change_batch_size: int = 64
    change_fetch_timeout_s: float = 1.0
    change_concurrency: int = 16  # customers of a batch applied side by side
    change_retry_base_s: float = 0.5  # a failed change comes back after this, doubling...
    change_retry_max_s: float = 30.0  # ...up to this
    trigger_refresh_s: float = 10.0  # the trigger definitions are read again this often
    # The firer.
    claim_limit: int = 100
    fire_concurrency: int = 64
    claim_lease: timedelta = timedelta(seconds=60)
    poll_interval_s: float = 0.5  # an idle firer looks for due episodes at least this often
    release_base: timedelta = timedelta(seconds=1)  # a fire that could not be decided, again after...
    release_max: timedelta = timedelta(seconds=60)
    # Heartbeats (triggers.replicas): a replica silent for replica_ttl is taken over at once.
    replica_ttl: timedelta = DEFAULT_TTL
    heartbeat_interval: timedelta = DEFAULT_INTERVAL
    # Deliveries.
    delivery_lease: timedelta = timedelta(minutes=1)
    delivery_sweep_s: float = 5.0
    delivery_horizon: timedelta = timedelta(seconds=10)
    delivery_take_limit: int = 500
    destinations_refresh_s: float = 30.0
    dispatcher: DispatcherSettings = field(default_factory=DispatcherSettings)


class TriggersEngine:
    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        event_log: EventLog,
        profiles: ProfileReader,
        renderer: MessageRenderer,
        secret_box: SecretBox,
        url_policy: UrlPolicy,
        settings: EngineSettings | None = None,
        clock: Clock = _utc_now,
        dispatcher_sleep: Sleep = asyncio.sleep,
        resolver: AbstractResolver | None = None,
    ) -> None:
        """``clock`` drives claims, decisions and the dispatcher's schedule (tests move it;
        ``dispatcher_sleep`` is how the dispatcher waits for the next retry by it);
        ``resolver`` resolves webhook hosts (default: getaddrinfo; guarded by ``url_policy``)."""
        s = settings or EngineSettings()
        self.settings = s
        self._pool = pool
        self._event_log = event_log
        self._clock = clock
        self.triggers = TriggerCache(TriggerStore(pool), refresh_interval_s=s.trigger_refresh_s)
        self.episodes = EpisodeStore(pool)
        self.deliveries = DeliveryStore(pool, owner=s.owner, lease=s.delivery_lease)
        self.destinations = DestinationStore(pool, secret_box)
        self.dispatcher = Dispatcher(
            self.deliveries, url_policy, s.dispatcher, clock=clock, sleep=dispatcher_sleep, resolver=resolver
        )
        self.pump = DeliveryPump(
            dispatcher=self.dispatcher,
            deliveries=self.deliveries,
            destinations=self.destinations,
            clock=clock,
            settings=PumpSettings(
                sweep_interval_s=s.delivery_sweep_s,
                horizon=s.delivery_horizon,
                take_limit=s.delivery_take_limit,
                destinations_refresh_s=s.destinations_refresh_s,
            ),
        )
        self.firer = Firer(
            episodes=self.episodes,
            triggers=self.triggers,
            profiles=profiles,
            renderer=renderer,
            hand_off=self.pump.hand,
            clock=clock,
            settings=FirerSettings(
                owner=s.owner,
                claim_limit=s.claim_limit,
                concurrency=s.fire_concurrency,
                lease=s.claim_lease,
                delivery_lease=s.delivery_lease,
                poll_interval_s=s.poll_interval_s,
                release_base=s.release_base,
                release_max=s.release_max,
            ),
        )
        self.replicas = ReplicaRegistry(pool, owner=s.owner, ttl=s.replica_ttl, interval=s.heartbeat_interval)
        self.consumer = ChangeConsumer(
            event_log=event_log,
            pool=pool,
            episodes=self.episodes,
            triggers=self.triggers,
            profiles=profiles,
            clock=clock,
            settings=ConsumerSettings(
                durable_name=s.changes_durable_name,
                batch_size=s.change_batch_size,
                fetch_timeout_s=s.change_fetch_timeout_s,
                concurrency=s.change_concurrency,
                retry_base_s=s.change_retry_base_s,
                retry_max_s=s.change_retry_max_s,
            ),
            on_waiting=self.firer.wake,
        )
        self.erasures_handled = 0
        self._following: Following | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Start the dispatcher with the stored destinations, subscribe to the profile changes,
        follow the erasure notices (from the oldest the log keeps), and start the loops.

        Raises:
            sendtime_common.event_log.EventLogUnavailable: the profile change stream did not
                appear in time.
            triggers.store.StoreError: PostgreSQL failed.
        """
        await self.replicas.beat()  # alive before anything is claimed under this owner
        await self.dispatcher.start()
        await self.pump.sync_destinations()
        await self.consumer.start()
        self._following = await self._event_log.follow_erasures(self.on_erasure_notice)
        self._tasks = [
            asyncio.create_task(self.consumer.run(), name="trigger-changes"),
            asyncio.create_task(self.firer.run(), name="trigger-firer"),
            asyncio.create_task(self.pump.run(), name="trigger-deliveries"),
            asyncio.create_task(self.replicas.run(self._clock), name="trigger-heartbeat"),
        ]

    @property
    def loops(self) -> list[asyncio.Task[None]]:
        """The loops (profile changes, firer, deliveries, heartbeat) once started: one that crashed or
        returned does its work no more."""
        return list(self._tasks)

    async def close(self) -> None:
        """Stop within a bound (sendtime_common.shutdown): the loops finish what they have in
        hand (a batch of changes, the fires being settled) or are cancelled. Then the
        subscriptions and the dispatcher close, and what this replica still holds (unfinished
        claims, leased deliveries) is handed back for the other replicas at once. The pool and
        the event log are the caller's."""
        self.consumer.stop()
        self.firer.stop()
        self.pump.stop()
        self.replicas.stop()
        await finish_or_cancel("triggers engine loops", self._tasks, FINISH_S)
        await bounded("fires in hand", self.firer.drain(), FINISH_S)
        await asyncio.gather(
            bounded("profile changes", self.consumer.close()),
            bounded("erasure notices", self._following.close()) if self._following else asyncio.sleep(0),
        )
        await bounded("webhook dispatcher", self.dispatcher.close(), RELEASE_S + FINISH_S)
        await bounded("claims and leases handed back", self._leave(), RELEASE_S)
        self._tasks = []

    async def _leave(self) -> None:
        try:
            handed = await self.replicas.leave(self._clock())
        except StoreError as exc:  # they end with their leases
            log.warning("claims and leases not handed back", extra={"error": type(exc).__name__})
            return
        if handed.episodes or handed.deliveries:
            log.info(
                "claims and leases handed back",
                extra={"episodes": handed.episodes, "deliveries": handed.deliveries},
            )

    def triggers_changed(self) -> None:
        """A trigger was created, updated, paused, resumed or deleted in this replica."""
        self.triggers.invalidate()
        self.firer.wake()  # a resume makes parked episodes due now

    def destinations_changed(self) -> None:
        """A destination was created, updated (enabled, disabled, rotated) or deleted here."""
        self.pump.destinations_changed()

    # The servicers' hooks (they name what changed; the engine reads everything again).

    async def on_triggers_changed(self, name: str) -> None:
        self.triggers_changed()

    async def on_destinations_changed(self, name: str) -> None:
        self.destinations_changed()

    async def on_erasure_notice(self, payload: bytes) -> None:
        """Erase what the service keeps about the notice's customer, and drop what the
        dispatcher holds for them. Notices without a customer id (older ones) name nobody
        here.

        Raises:
            RetryLater: PostgreSQL failed; the notice is handed again.
        """
        try:
            notice = profile_pb2.ErasureNotice.FromString(payload)
        except DecodeError:
            log.error("undecodable erasure notice ignored", extra={"bytes": len(payload)})
            return
        if not notice.customer_id:
            return
        # Dropped first and again after: a delivery handed over while the erasure commits is
        # either in memory now or gone from the log before it could be handed on.
        self.pump.drop_customer(notice.customer_id)
        try:
            erased = await erase_customer(self._pool, notice.customer_id)
        except StoreError as exc:
            raise RetryLater("the triggers store is unavailable") from exc
        dropped = self.pump.drop_customer(notice.customer_id)
        self.erasures_handled += 1
        if erased.episodes or erased.deliveries or dropped:
            log.info(
                "customer erased",
                extra={
                    "episodes": erased.episodes,
                    "fires": erased.fires,
                    "deliveries": erased.deliveries,
                    "held_deliveries_dropped": dropped,
                },
            )
