"""Wiring of the triggers service: PostgreSQL (migrated: triggers, destinations, episodes,
deliveries), the event log (NATS), the clients of the profile and render services, and the gRPC
server (TriggerService, DestinationService, DeliveryService) with its HTTP face.

The engine (the profile change consumer, the firer, the dispatcher pump, erasures) runs beside
the server: ``TriggersApp`` starts it after the gRPC server and closes it before the clients and
the pool it uses; the servicers tell it of every stored change to a trigger or destination.

Ready while the store answers, the engine's loops run and its consumer of the profile changes
answers (docs/operations.md#health). Profile and render being down is not a reason: the API
still serves, and the engine retries fires later.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial

import asyncpg
import grpc
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from sendtime.triggers.v1 import triggers_pb2, triggers_pb2_grpc
from sendtime_common.auth.server_auth import ServerAuth, create_server_auth
from sendtime_common.config import ConfigError
from sendtime_common.consumer_lag import watch_backlog
from sendtime_common.database import STORE_ERRORS, close_pool, create_pool
from sendtime_common.event_log import EventLog, JetStreamEventLog
from sendtime_common.grpc_server import GrpcServer
from sendtime_common.metrics import sample_every
from sendtime_common.readiness import task_running
from sendtime_common.shutdown import CANCEL_WAIT_S, FINISH_S, bounded, finish_or_cancel
from triggers.clients import GrpcMessageRenderer, GrpcProfileReader, ProfileChannel, RenderChannel
from triggers.delivery_servicer import DeliveryServicer
from triggers.delivery_store import DeliveryStore
from triggers.dependencies import MessageRenderer, ProfileReader
from triggers.destination_servicer import DestinationServicer
from triggers.destination_store import DestinationStore
from triggers.engine import EngineSettings, TriggersEngine, default_owner
from triggers.episode_store import EpisodeStore, Timers
from triggers.metrics import OVERDUE_AFTER, TIMERS_OVERDUE, TIMERS_PENDING
from triggers.settings import Settings
from triggers.ssrf import UrlPolicy
from triggers.store import migrate_store
from triggers.trigger_servicer import TriggerServicer
from triggers.trigger_store import TriggerStore

# A count over the claims' index: cheap, but not worth a query per scrape.
TIMERS_READ_EVERY_S = 15.0

SERVICE_NAMES = [
    triggers_pb2.DESCRIPTOR.services_by_name[name].full_name
    for name in ("TriggerService", "DestinationService", "DeliveryService")
]


@dataclass(slots=True)
class TriggersApp:
    grpc: GrpcServer
    pool: asyncpg.Pool
    event_log: EventLog
    auth: ServerAuth
    profile_channel: ProfileChannel
    render_channel: RenderChannel
    # What the engine reads profiles and renders fires with (triggers.dependencies).
    profiles: ProfileReader
    renderer: MessageRenderer
    resolver: AbstractResolver
    deliveries: DeliveryServicer
    # Runs the triggers beside the API (triggers.engine).
    engine: TriggersEngine
    changes_consumer: str = "triggers-changes"  # the engine's durable consumer of profile changes
    _watching: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        await self.grpc.start()
        await self.start_background()

    async def start_background(self) -> None:
        """Follow key changes, watch the client certificates, then start the engine."""
        self.auth.start()
        self._watching = [
            asyncio.create_task(self.profile_channel.watch(), name="profile-channel-tls"),
            asyncio.create_task(self.render_channel.watch(), name="render-channel-tls"),
        ]
        if isinstance(self.event_log, JetStreamEventLog):
            read = partial(self.event_log.backlog, self.changes_consumer, profile_changes=True)
            watching = watch_backlog(self.changes_consumer, read)
            self._watching.append(asyncio.create_task(watching, name="changes-backlog"))
        self._watching.append(asyncio.create_task(self._watch_timers(), name="timers"))
        await self.engine.start()
        # Watched once the engine runs: its consumer exists from then on.
        loops = [task_running(task) for task in self.engine.loops]
        # Every loop asked (a list, not a generator): each logs how it ended.
        self.grpc.readiness.watch("engine", lambda: all([running() for running in loops]))
        if isinstance(self.event_log, JetStreamEventLog):
            consuming = partial(self.event_log.usable, self.changes_consumer, profile_changes=True)
            self.grpc.readiness.watch("profile changes", consuming)

    async def _watch_timers(self) -> None:
        """Keep the timer gauges current (triggers.metrics) until cancelled."""

        def record(timers: Timers) -> None:
            TIMERS_PENDING.set(timers.pending)
            TIMERS_OVERDUE.set(timers.overdue)

        episodes = EpisodeStore(self.pool)

        async def read() -> Timers:
            return await episodes.timers(datetime.now(UTC), overdue_after=OVERDUE_AFTER)

        await sample_every(
            TIMERS_READ_EVERY_S,
            read,
            record,
            unavailable=STORE_ERRORS,
            what="the trigger timers",
        )

    async def close(self) -> None:
        """After the drain: the engine finishes its work in hand, then the clients close side by
        side, then the pool; each step bounded (sendtime_common.shutdown)."""
        for task in self._watching:
            task.cancel()
        await asyncio.gather(
            bounded("engine", self.engine.close(), FINISH_S + CANCEL_WAIT_S),
            finish_or_cancel("client TLS watches", self._watching, CANCEL_WAIT_S),
        )
        await asyncio.gather(
            bounded("event log", self.event_log.close(), FINISH_S + CANCEL_WAIT_S),
            bounded("profile channel", self.profile_channel.close()),
            bounded("render channel", self.render_channel.close()),
            bounded("resolver", self.resolver.close()),
            self.auth.close(),
        )
        await close_pool(self.pool)

    async def stop(self, grace_s: float) -> None:
        """End the subscription streams, drain calls, then close what they use: within
        ``grace_s`` plus STOP_MARGIN_S."""
        self.deliveries.end_streams()
        await self.grpc.stop(grace_s)
        await self.close()


async def store_answers(pool: asyncpg.Pool) -> bool:
    """A readiness check: PostgreSQL answers through the pool (raises when it does not)."""
    return bool(await pool.fetchval("SELECT 1") == 1)


def engine_settings(settings: Settings, owner: str) -> EngineSettings:
    """The engine's settings from the service's (``owner``: this replica's name in claims and
    leases)."""
    return EngineSettings(
        owner=owner,
        changes_durable_name=settings.changes_consumer_name,
        fire_concurrency=settings.fire_concurrency,
        claim_limit=min(EngineSettings().claim_limit, settings.fire_concurrency),
        poll_interval_s=settings.poll_interval_s,
        claim_lease=timedelta(seconds=settings.claim_lease_s),
        delivery_lease=timedelta(seconds=settings.delivery_lease_s),
        replica_ttl=timedelta(seconds=settings.replica_ttl_s),
        heartbeat_interval=timedelta(seconds=settings.replica_ttl_s / 5),
        trigger_refresh_s=settings.trigger_refresh_s,
    )


def _check_credentials(settings: Settings) -> None:
    """Raises: ConfigError: a dependency the service calls has no credential, or the sealing key
    is missing."""
    for callee, variable, key, tls in (
        ("profile", "PROFILE_SERVICE", settings.profile_api_key, settings.profile_tls),
        ("render", "RENDER_SERVICE", settings.render_api_key, settings.render_tls),
    ):
        if not key and not tls.cert_file:
            raise ConfigError(
                f"triggers calls the {callee} service with a credential of its own: set {variable}_API_KEY "
                f"(or {variable}_API_KEY_FILE) to a key with only the scope "
                f"{'profiles.read' if callee == 'profile' else 'render'}, or give it a client certificate "
                f"({variable}_CERT_FILE, {variable}_KEY_FILE) that the {callee} service maps to that scope"
            )
    if settings.secret_box is None:
        raise ConfigError(
            "triggers seals webhooks' signing secrets with TRIGGERS_SECRET_KEYS (or "
            "TRIGGERS_SECRET_KEYS_FILE): comma-separated base64 keys of 32 bytes, the current one first "
            "(head -c 32 /dev/urandom | base64)"
        )


async def create_app(settings: Settings) -> TriggersApp:
    """Connect to PostgreSQL (applying migrations) and NATS; build the server, not yet started.
    The channels to profile and render connect lazily: the API serves while they are down.

    Raises:
        sendtime_common.config.ConfigError: a credential or the sealing key is missing.
        OSError, asyncpg.PostgresError: PostgreSQL cannot be reached or a migration failed.
        sendtime_common.event_log.EventLogUnavailable: NATS cannot be reached.
    """
    _check_credentials(settings)
    settings.tls.check()
    settings.identifier_hasher.check_configured()
    assert settings.secret_box is not None  # checked above
    pool = await create_pool(
        settings.database_url,
        min_size=2,
        max_size=settings.database_pool_size,
        random_page_cost=settings.database_random_page_cost,
    )
    await migrate_store(pool)
    auth = await create_server_auth(
        pool, "triggers", SERVICE_NAMES, settings.auth, settings.identifier_hasher, settings.redis_url
    )
    event_log = await JetStreamEventLog.connect(settings.event_log)
    traced = aio_client_interceptors()  # type: ignore[no-untyped-call]
    profile_channel = ProfileChannel(
        settings.profile_target, settings.profile_api_key, settings.profile_tls, traced
    )
    render_channel = RenderChannel(
        settings.render_target, settings.render_api_key, settings.render_tls, traced
    )
    profiles = GrpcProfileReader(profile_channel, settings.profile_deadline_s)
    renderer = GrpcMessageRenderer(render_channel, profiles, settings.render_deadline_s)
    triggers = TriggerStore(pool)
    destinations = DestinationStore(pool, settings.secret_box)
    deliveries = DeliveryStore(pool, owner=default_owner())

    resolver = DefaultResolver()
    engine = TriggersEngine(
        pool=pool,
        event_log=event_log,
        profiles=profiles,
        renderer=renderer,
        secret_box=settings.secret_box,
        url_policy=UrlPolicy(settings.webhook_allow),
        settings=engine_settings(settings, deliveries.owner),
        resolver=resolver,
    )
    trigger_servicer = TriggerServicer(triggers, destinations, on_triggers_changed=engine.on_triggers_changed)
    destination_servicer = DestinationServicer(
        destinations,
        UrlPolicy(settings.webhook_allow),
        resolver,
        on_destinations_changed=engine.on_destinations_changed,
    )
    delivery_servicer = DeliveryServicer(deliveries, destinations, poll_s=settings.subscription_poll_s)

    def register(server: grpc.aio.Server) -> None:
        triggers_pb2_grpc.add_TriggerServiceServicer_to_server(trigger_servicer, server)
        triggers_pb2_grpc.add_DestinationServiceServicer_to_server(destination_servicer, server)
        triggers_pb2_grpc.add_DeliveryServiceServicer_to_server(delivery_servicer, server)

    server = GrpcServer(
        settings.address,
        SERVICE_NAMES,
        register,
        auth.interceptor,
        tls=settings.tls,
        health_address=settings.health_address,
        metrics_address=settings.metrics_address,
        limits=settings.limits,
        readiness=settings.readiness,
    )
    # Every call of the API and every step of the engine goes through the store.
    server.readiness.watch("store", partial(store_answers, pool))
    if settings.http_address:
        server.serve_http(settings.http_address, grace_s=settings.shutdown_grace_s)
    return TriggersApp(
        grpc=server,
        pool=pool,
        event_log=event_log,
        auth=auth,
        profile_channel=profile_channel,
        render_channel=render_channel,
        profiles=profiles,
        renderer=renderer,
        resolver=resolver,
        deliveries=delivery_servicer,
        engine=engine,
        changes_consumer=settings.changes_consumer_name,
    )
