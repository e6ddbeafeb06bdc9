"""Wiring of the ingest service: PostgreSQL (migrated), the event log, the ingestor, the gRPC
server (its callers' rate limits kept in Redis), and the background work (counts flushed each
second, expired records purged hourly, erased people's dead letters deleted). Ready while the
event log is usable (docs/operations.md#health)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
from aiohttp import web

from ingest.dead_letters import DeadLetters
from ingest.ingestor import Ingestor
from ingest.retention import Retention, purge_expired
from ingest.segment_routes import SegmentRoutes
from ingest.servicer import IngestServicer
from ingest.settings import Settings
from ingest.stats import OutcomeCounters
from ingest.store import IngestStore, StoreError
from ingest.validation import ValidationRules
from ingest.webhooks import WebhookServer
from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime_common.auth.server_auth import ServerAuth, create_server_auth
from sendtime_common.config import ConfigError
from sendtime_common.database import close_pool, create_pool
from sendtime_common.event_log import EventLog, Following, JetStreamEventLog
from sendtime_common.grpc_server import GrpcServer
from sendtime_common.http_gateway import InProcessCalls
from sendtime_common.migrate import migrate
from sendtime_common.shutdown import CANCEL_WAIT_S, FINISH_S, bounded, finish_or_cancel

log = logging.getLogger(__name__)

SERVICE_NAME = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
COUNTS_FLUSH_INTERVAL_S = 1.0
PURGE_INTERVAL_S = 3600.0


@dataclass(slots=True)
class IngestApp:
    grpc: GrpcServer
    event_log: EventLog
    ingestor: Ingestor
    store: IngestStore
    counters: OutcomeCounters
    pool: asyncpg.Pool
    retention: Retention
    dead_letters: DeadLetters
    auth: ServerAuth
    webhooks: WebhookServer | None = None
    _background: list[asyncio.Task[None]] = field(default_factory=list)
    _erasures: Following | None = None

    async def start(self) -> None:
        await self.grpc.start()
        await self.start_background()

    async def start_background(self) -> None:
        """What runs beside the gRPC server: the webhook listener (when configured), the
        periodic work, and deleting erased people's dead letters as the profile service
        announces them."""
        if self.webhooks is not None:
            await self.webhooks.start()
        self.auth.start()
        self._background = [
            asyncio.create_task(self._flush_counts(), name="flush-counts"),
            asyncio.create_task(self._purge_expired(), name="purge-expired"),
        ]
        self._erasures = await self.event_log.follow_erasures(self.dead_letters.on_erasure_notice)

    async def close(self) -> None:
        """After the drain: stop the webhooks (if ``stop`` has not) and the background work,
        write the last counts, close the event log (in-flight publishes finish first) and the
        pool; each step bounded (sendtime_common.shutdown)."""
        if self.webhooks is not None:
            await self.webhooks.stop(CANCEL_WAIT_S)
        for task in self._background:
            task.cancel()
        await finish_or_cancel("periodic work", self._background, CANCEL_WAIT_S)
        await asyncio.gather(
            bounded("erasure notices", self._erasures.close()) if self._erasures else asyncio.sleep(0),
            bounded("last counts", self.counters.flush(self.store), FINISH_S),
        )
        await asyncio.gather(
            self.auth.close(),
            bounded("event log", self.event_log.close(), FINISH_S + CANCEL_WAIT_S),
        )
        await close_pool(self.pool)

    async def stop(self, grace_s: float) -> None:
        """Drain the gRPC and HTTP ports and the webhooks side by side, then close: within
        ``grace_s`` plus STOP_MARGIN_S."""
        await asyncio.gather(
            self.grpc.stop(grace_s),
            self.webhooks.stop(grace_s) if self.webhooks is not None else asyncio.sleep(0),
        )
        await self.close()

    async def _flush_counts(self) -> None:
        while True:
            await asyncio.sleep(COUNTS_FLUSH_INTERVAL_S)
            await self.counters.flush(self.store)

    async def _purge_expired(self) -> None:
        while True:
            try:
                purged = await purge_expired(self.store, self.retention, datetime.now(UTC))
                log.info("purged expired records", extra=asdict(purged))
            except StoreError as exc:
                log.warning("could not purge expired records", extra={"error": str(exc)})
            await asyncio.sleep(PURGE_INTERVAL_S)


async def create_app(settings: Settings, event_log: EventLog | None = None) -> IngestApp:
    """Connect to PostgreSQL (applying migrations) and the event log (unless one is given);
    build the server, not yet started.

    Raises:
        OSError, asyncpg.PostgresError: PostgreSQL cannot be reached or a migration failed.
        sendtime_common.event_log.EventLogUnavailable: NATS could not be reached.
        sendtime_common.config.ConfigError: a webhook secret or key is unusable.
    """
    # Unusable security settings stop the service before it connects to anything.
    settings.tls.check()
    settings.identifier_hasher.check_configured()
    pool = await create_pool(
        settings.database_url,
        min_size=2,
        max_size=settings.database_pool_size,
        random_page_cost=settings.database_random_page_cost,
    )
    await migrate(pool, MIGRATIONS_DIR, table="ingest_schema_migrations")
    auth = await create_server_auth(
        pool, "ingest", [SERVICE_NAME], settings.auth, settings.identifier_hasher, settings.redis_url
    )
    if event_log is None:
        event_log = await JetStreamEventLog.connect(settings.event_log)
    store, counters = IngestStore(pool), OutcomeCounters()
    names = {n.strip() for n in settings.custom_event_names.split(",") if n.strip()}
    ingestor = Ingestor(
        event_log,
        store,
        counters,
        rules=ValidationRules(
            max_future_skew=timedelta(seconds=settings.max_future_skew_s),
            max_age=timedelta(days=settings.max_event_age_days),
            max_event_bytes=settings.max_event_bytes,
            custom_event_names=frozenset(names) if names else None,
        ),
        claim_stale_after=timedelta(seconds=2 * settings.event_log.publish_timeout_s),
        hasher=settings.identifier_hasher,
        stream_linger=timedelta(milliseconds=settings.stream_linger_ms),
    )
    dead_letters = DeadLetters(store, ingestor, settings.identifier_hasher)
    servicer = IngestServicer(
        ingestor,
        dead_letters,
        store,
        counters,
        max_batch_size=settings.max_batch_size,
        max_in_flight_per_stream=settings.max_in_flight_per_stream,
    )
    server = GrpcServer(
        settings.address,
        [SERVICE_NAME],
        lambda s: ingest_pb2_grpc.add_IngestServiceServicer_to_server(servicer, s),
        auth.interceptor,
        tls=settings.tls,
        health_address=settings.health_address,
        metrics_address=settings.metrics_address,
        limits=settings.limits,
        readiness=settings.readiness,
    )
    if isinstance(event_log, JetStreamEventLog):
        # Without the event log ingest cannot acknowledge an event durably: every call would
        # answer UNAVAILABLE, so callers are better sent to a replica whose connection works.
        server.readiness.watch("event log", event_log.usable)
    if settings.http_address:

        def add_segment_routes(app: web.Application, calls: InProcessCalls) -> None:
            SegmentRoutes(
                calls,
                ingestor,
                max_events_per_batch=settings.max_batch_size,
                default_currency=settings.segment_default_currency,
            ).add_to(app)

        server.serve_http(
            settings.http_address, grace_s=settings.shutdown_grace_s, add_routes=add_segment_routes
        )
    webhooks = None
    if settings.webhooks.shopify_secret or settings.webhooks.sendgrid_public_key:
        try:
            webhooks = WebhookServer(
                ingestor,
                settings.webhooks,
                tls=settings.tls,
                quarantine=dead_letters,
                metered=bool(settings.metrics_address),
            )
        except ValueError as exc:
            await event_log.close()
            await pool.close()
            raise ConfigError(f"webhooks: {exc}") from None
    return IngestApp(
        grpc=server,
        event_log=event_log,
        ingestor=ingestor,
        store=store,
        counters=counters,
        pool=pool,
        retention=Retention.from_settings(settings),
        dead_letters=dead_letters,
        auth=auth,
        webhooks=webhooks,
    )
