"""Wiring of the sync service: PostgreSQL (migrated: connectors' state, the push ledger), the
event log (NATS: erasure notices), the channel to ingest, the connectors (SYNC_CONNECTORS_FILE)
and their scheduler, and the gRPC server (SyncService) with its HTTP face.

The scheduler runs beside the server: ``SyncApp`` starts it after the gRPC server and stops it
before the clients and the pool it uses. Ready while the store answers and the scheduler runs
(docs/operations.md#health); a provider or ingest being down is not a reason: the connector's
status says so and its runs are tried again.
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
from sendtime_common.database import close_pool, create_pool
from sendtime_common.event_log import EventLog, Following, JetStreamEventLog
from sendtime_common.grpc_server import GrpcServer
from sendtime_common.migrate import migrate
from sendtime_common.readiness import task_running
from sendtime_common.service_channel import ServiceChannel
from sendtime_common.shutdown import CANCEL_WAIT_S, FINISH_S, bounded
from sendtime_common.tls import ClientTls
from sync import metrics
from sync.connectors import PUSH_KINDS, ConnectorConfig, build_pull, open_api
from sync.ingest_sink import IngestSink
from sync.provider_http import ProviderApi
from sync.push import PushLedger
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
    scheduler: Scheduler
    ledger: PushLedger
    apis: list[ProviderApi]
    _erasures: Following | None = None
    _watching: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        await self.grpc.start()
        await self.start_background()

    async def start_background(self) -> None:
        """Follow key changes and erasure notices, watch the client certificate, then schedule."""
        self.auth.start()
        self._watching = [asyncio.create_task(self.ingest_channel.watch(), name="ingest-channel-tls")]
        self._erasures = await self.event_log.follow_erasures(self.on_erasure_notice)
        self.scheduler.start()
        loop = self.scheduler.loop
        assert loop is not None
        self.grpc.readiness.watch("scheduler", task_running(loop))

    async def on_erasure_notice(self, payload: bytes) -> None:
        """Forget what the push ledger holds of an erased person (by their customer id)."""
        notice = profile_pb2.ErasureNotice.FromString(payload)
        if notice.customer_id:
            await self.ledger.forget(notice.customer_id)

    async def close(self) -> None:
        """After the drain: the scheduler stops (runs under way are cancelled: their cursors
        hold what ingest answered), then the clients, then the pool."""
        for task in self._watching:
            task.cancel()
        await bounded("scheduler", self.scheduler.close(), FINISH_S + CANCEL_WAIT_S)
        await asyncio.gather(
            bounded("erasure notices", self._erasures.close()) if self._erasures else asyncio.sleep(0),
            bounded("event log", self.event_log.close(), FINISH_S + CANCEL_WAIT_S),
            bounded("ingest channel", self.ingest_channel.close()),
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
    """Raises: ConfigError: ingest has no credential, or a connector this version cannot run."""
    if settings.connectors and not settings.ingest_api_key and not settings.ingest_tls.cert_file:
        raise ConfigError(
            "sync hands pulled records to the ingest service with a credential of its own: set "
            "INGEST_SERVICE_API_KEY (or INGEST_SERVICE_API_KEY_FILE) to a key with only the scope "
            "events.write, or give it a client certificate (INGEST_SERVICE_CERT_FILE, "
            "INGEST_SERVICE_KEY_FILE) that ingest maps to that scope"
        )
    for index, connector in enumerate(settings.connectors):
        if connector.kind in PUSH_KINDS:
            raise ConfigError(
                f"connectors[{index}].kind: {connector.kind} pushes, and this version of the sync service "
                "runs pull connectors only (docs/connectors.md)"
            )


def _run(config: ConnectorConfig, sink: IngestSink, store: ConnectorStore, api: ProviderApi) -> Run:
    pull = build_pull(config, api)

    async def run() -> RunReport:
        report = await run_pull(config.connector_id, pull, sink, store, config.interval_s)
        state = await store.load(config.connector_id)
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
    store = ConnectorStore(pool)
    apis = {c.connector_id: open_api(c) for c in settings.connectors}
    runs = {c.connector_id: _run(c, sink, store, apis[c.connector_id]) for c in settings.connectors}
    scheduler = Scheduler(
        pool,
        store,
        runs,
        poll_interval_s=settings.poll_interval_s,
        max_runs=max(1, settings.database_pool_size // 2),
    )
    servicer = SyncServicer(settings.connectors, store, scheduler.wake)

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
        scheduler=scheduler,
        ledger=PushLedger(pool),
        apis=list(apis.values()),
    )
