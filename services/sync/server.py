"""Wiring of the sync service: PostgreSQL (migrated: connectors' state, the push ledger and
pending marks), the event log (NATS: erasure notices; the profile change stream when a push
connector is configured), the channels to ingest (pulled records) and to the profile service
(live profiles to push), the connectors (SYNC_CONNECTORS_FILE) and their scheduler, and the gRPC
server (SyncService) with its HTTP face.

The scheduler and the change follower run beside the server: ``SyncApp`` starts them after the
gRPC server and stops them before the clients and the pool they use. Ready while the store
answers and the scheduler (and the follower) run (docs/operations.md#health); a provider, ingest
or the profile service being down is not a reason: the connector's status says so and its runs
are tried again.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from functools import partial

import asyncpg
import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from sendtime.ingest.v1 import ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2
from sendtime.sync.v1 import sync_pb2, sync_pb2_grpc
from sendtime_common.auth.server_auth import ServerAuth, create_server_auth
from sendtime_common.config import ConfigError
from sendtime_common.consumer_lag import watch_backlog
from sendtime_common.database import close_pool, create_pool
from sendtime_common.event_log import EventLog, Following, JetStreamEventLog
from sendtime_common.grpc_server import GrpcServer
from sendtime_common.migrate import migrate
from sendtime_common.readiness import task_running
from sendtime_common.service_channel import ServiceChannel
from sendtime_common.shutdown import CANCEL_WAIT_S, FINISH_S, bounded
from sendtime_common.tls import ClientTls
from sync import metrics
from sync.changes import DURABLE_NAME as CHANGES_CONSUMER
from sync.changes import ChangeFollower
from sync.connectors import PUSH_KINDS, ConnectorConfig, build_destination, build_pull, open_api
from sync.ingest_sink import IngestSink
from sync.profiles import LiveProfiles, ProfileChannel
from sync.provider_http import ProviderApi
from sync.push import PendingPushes, PushLedger
from sync.pusher import run_push
from sync.runner import RunReport, run_pull
from sync.scheduler import Run, Scheduler
from sync.servicer import SyncServicer
from sync.settings import Settings
from sync.status import cursor_time
from sync.store import MIGRATIONS_DIR, MIGRATIONS_TABLE, ConnectorStore

SERVICE_NAMES = [sync_pb2.DESCRIPTOR.services_by_name["SyncService"].full_name]


class IngestChannel(ServiceChannel["ingest_pb2_grpc.IngestServiceAsyncStub"]):
    def __init__(self, target: str, api_key: str, tls: ClientTls, interceptors: list[object]) -> None:
        """Raises: UnusableCertificate: the client certificate files are not usable."""
        super().__init__("ingest", target, api_key, tls, ingest_pb2_grpc.IngestServiceStub, interceptors)


@dataclass(slots=True)
class SyncApp:
    grpc: GrpcServer
    pool: asyncpg.Pool
    event_log: EventLog
    auth: ServerAuth
    ingest_channel: IngestChannel
    profile_channel: ProfileChannel
    scheduler: Scheduler
    ledger: PushLedger
    apis: list[ProviderApi]
    changes: ChangeFollower | None  # None: no push connector
    _erasures: Following | None = None
    _watching: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        await self.grpc.start()
        await self.start_background()

    async def start_background(self) -> None:
        """Follow key changes and erasure notices, watch the client certificates, follow the
        profile changes (push connectors), then schedule."""
        self.auth.start()
        self._watching = [
            asyncio.create_task(self.ingest_channel.watch(), name="ingest-channel-tls"),
            asyncio.create_task(self.profile_channel.watch(), name="profile-channel-tls"),
        ]
        self._erasures = await self.event_log.follow_erasures(self.on_erasure_notice)
        if self.changes is not None:
            self.changes.start()
            assert self.changes.task is not None
            self.grpc.readiness.watch("profile changes", task_running(self.changes.task))
            if isinstance(self.event_log, JetStreamEventLog):  # its lag, as every consumer's
                read = partial(self.event_log.backlog, CHANGES_CONSUMER, profile_changes=True)
                self._watching.append(
                    asyncio.create_task(watch_backlog(CHANGES_CONSUMER, read), name="changes-backlog")
                )
        self.scheduler.start()
        loop = self.scheduler.loop
        assert loop is not None
        self.grpc.readiness.watch("scheduler", task_running(loop))

    async def on_erasure_notice(self, payload: bytes) -> None:
        """Forget what the push ledger and pending marks hold of an erased person (by their
        customer id)."""
        notice = profile_pb2.ErasureNotice.FromString(payload)
        if notice.customer_id:
            await self.ledger.forget(notice.customer_id)

    async def close(self) -> None:
        """After the drain: the scheduler stops (runs under way are cancelled: their cursors
        hold what ingest answered), then the clients, then the pool."""
        for task in self._watching:
            task.cancel()
        await bounded("scheduler", self.scheduler.close(), FINISH_S + CANCEL_WAIT_S)
        if self.changes is not None:
            await bounded("profile changes", self.changes.close())
        await asyncio.gather(
            bounded("erasure notices", self._erasures.close()) if self._erasures else asyncio.sleep(0),
            bounded("event log", self.event_log.close(), FINISH_S + CANCEL_WAIT_S),
            bounded("ingest channel", self.ingest_channel.close()),
            bounded("profile channel", self.profile_channel.close()),
            *(bounded(f"{api.provider} API", api.aclose()) for api in self.apis),
            self.auth.close(),
            *self._watching,
            return_exceptions=True,
        )
        await close_pool(self.pool)

    async def stop(self, grace_s: float) -> None:
        await self.grpc.stop(grace_s)
        await self.close()


async def store_answers(pool: asyncpg.Pool) -> bool:
    """A readiness check: PostgreSQL answers through the pool (raises when it does not)."""
    return bool(await pool.fetchval("SELECT 1") == 1)


def _check(settings: Settings) -> None:
    """Raises: ConfigError: a connector's kind needs ingest or the profile service, and the
    sync service has no credential for it."""
    pulls = [c for c in settings.connectors if c.kind not in PUSH_KINDS]
    if pulls and not settings.ingest_api_key and not settings.ingest_tls.cert_file:
        raise ConfigError(
            "sync hands pulled records to the ingest service with a credential of its own: set "
            "INGEST_SERVICE_API_KEY (or INGEST_SERVICE_API_KEY_FILE) to a key with only the scope "
            "events.write, or give it a client certificate (INGEST_SERVICE_CERT_FILE, "
            "INGEST_SERVICE_KEY_FILE) that ingest maps to that scope"
        )
    pushes = [c for c in settings.connectors if c.kind in PUSH_KINDS]
    if pushes and not settings.profile_api_key and not settings.profile_tls.cert_file:
        raise ConfigError(
            "sync reads the live profiles it pushes from the profile service with a credential of "
            "its own: set PROFILE_SERVICE_API_KEY (or PROFILE_SERVICE_API_KEY_FILE) to a key with "
            "only the scope profiles.read, or give it a client certificate (PROFILE_SERVICE_CERT_FILE, "
            "PROFILE_SERVICE_KEY_FILE) that the profile service maps to that scope"
        )


@dataclass(frozen=True, slots=True)
class _Parts:
    """What the connectors' runs use."""

    sink: IngestSink
    store: ConnectorStore
    pending: PendingPushes
    ledger: PushLedger
    profiles: LiveProfiles


def _run(config: ConnectorConfig, parts: _Parts, api: ProviderApi) -> Run:
    """A run of the connector, counted in the metrics."""
    if config.kind in PUSH_KINDS:
        destination = build_destination(config, api)
        names = list(config.options["traits"])

        async def push() -> RunReport:
            report = await run_push(
                config.connector_id,
                destination,
                names,
                parts.pending,
                parts.ledger,
                parts.profiles,
                parts.store,
                config.interval_s,
            )
            metrics.record_run(report, None)
            waiting = await parts.pending.summary([config.connector_id])
            metrics.record_lag(config.connector_id, waiting[config.connector_id].oldest)
            return report

        return push
    pull = build_pull(config, api)

    async def run() -> RunReport:
        report = await run_pull(config.connector_id, pull, parts.sink, parts.store, config.interval_s)
        state = await parts.store.load(config.connector_id)
        metrics.record_run(report, cursor_time(config.kind, state.cursor))
        return report

    return run


async def create_app(settings: Settings) -> SyncApp:
    """Connect to PostgreSQL (applying migrations) and NATS; build the server, not yet started.
    The channel to ingest connects lazily: the API serves while ingest is down.

    Raises:
        sendtime_common.config.ConfigError: a credential is missing, or a connector cannot run.
        OSError, asyncpg.PostgresError: PostgreSQL cannot be reached or a migration failed.
        sendtime_common.event_log.EventLogUnavailable: NATS cannot be reached.
    """
    _check(settings)
    settings.tls.check()
    settings.identifier_hasher.check_configured()
    pool = await create_pool(settings.database_url, min_size=2, max_size=settings.database_pool_size)
    await migrate(pool, MIGRATIONS_DIR, MIGRATIONS_TABLE)
    auth = await create_server_auth(
        pool, "sync", SERVICE_NAMES, settings.auth, settings.identifier_hasher, settings.redis_url
    )
    event_log = await JetStreamEventLog.connect(settings.event_log)
    traced = aio_client_interceptors()  # type: ignore[no-untyped-call]
    ingest_channel = IngestChannel(
        settings.ingest_target, settings.ingest_api_key, settings.ingest_tls, traced
    )
    sink = IngestSink(ingest_channel.stub, call_timeout_s=settings.ingest_deadline_s)
    ingest_channel.on_reopen(sink.use_stub)
    profile_channel = ProfileChannel(
        settings.profile_target, settings.profile_api_key, settings.profile_tls, traced
    )
    store = ConnectorStore(pool)
    pending = PendingPushes(pool)
    ledger = PushLedger(pool)
    parts = _Parts(sink, store, pending, ledger, LiveProfiles(profile_channel, settings.profile_deadline_s))
    apis = {c.connector_id: open_api(c) for c in settings.connectors}
    runs = {c.connector_id: _run(c, parts, apis[c.connector_id]) for c in settings.connectors}
    destinations = [c.connector_id for c in settings.connectors if c.kind in PUSH_KINDS]
    changes = ChangeFollower(event_log, pending, destinations) if destinations else None
    scheduler = Scheduler(
        pool,
        store,
        runs,
        poll_interval_s=settings.poll_interval_s,
        max_runs=max(1, settings.database_pool_size // 2),
    )
    servicer = SyncServicer(settings.connectors, store, pending, scheduler.wake)

    def register(server: grpc.aio.Server) -> None:
        sync_pb2_grpc.add_SyncServiceServicer_to_server(servicer, server)

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
    server.readiness.watch("store", partial(store_answers, pool))
    if settings.http_address:
        server.serve_http(settings.http_address, grace_s=settings.shutdown_grace_s)
    return SyncApp(
        grpc=server,
        pool=pool,
        event_log=event_log,
        auth=auth,
        ingest_channel=ingest_channel,
        profile_channel=profile_channel,
        scheduler=scheduler,
        ledger=ledger,
        apis=list(apis.values()),
        changes=changes,
    )
