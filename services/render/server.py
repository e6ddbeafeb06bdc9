"""Wiring of the render service: PostgreSQL (migrated: templates, catalog), the profile client,
the catalog consumer and the erasure notices on the event log, the renderer, and the gRPC server
(RenderService and TemplateService)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path

import asyncpg
import grpc
from google.protobuf.message import Message
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from render.catalog import CatalogConsumer, CatalogStore
from render.profile_channel import ProfileChannel
from render.profiles import FetcherSettings, ProfileFetcher
from render.recommendations import Recommender
from render.renderer import Renderer
from render.servicer import BATCH_IDENTIFIER_BYTES, MAX_BATCH, RenderServicer
from render.settings import Settings
from render.template_servicer import TemplateServicer
from render.template_store import TemplateStore
from render.templates import TemplateCompiler
from sendtime.render.v1 import render_pb2, render_pb2_grpc
from sendtime_common.auth.server_auth import ServerAuth, create_server_auth
from sendtime_common.call_limits import MIB
from sendtime_common.config import ConfigError
from sendtime_common.consumer_lag import watch_backlog
from sendtime_common.database import close_pool, create_pool
from sendtime_common.event_log import EventLog, Following, JetStreamEventLog
from sendtime_common.grpc_server import GrpcServer
from sendtime_common.http_gateway import CachePolicy
from sendtime_common.migrate import migrate
from sendtime_common.redis_client import bounded_client
from sendtime_common.shutdown import CANCEL_WAIT_S, FINISH_S, bounded, finish_or_cancel

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SERVICE_NAMES = [
    render_pb2.DESCRIPTOR.services_by_name["RenderService"].full_name,
    render_pb2.DESCRIPTOR.services_by_name["TemplateService"].full_name,
]
RENDER = f"/{SERVICE_NAMES[0]}/Render"


def _render_etag_basis(answer: Message) -> bytes:
    """What a render's (weak) ETag hashes: what the message says and the versions it came from.
    Not its data age, which grows every second, nor where the profile came from (live, or the
    cache the template's max_data_age allows): the same message either way."""
    assert isinstance(answer, render_pb2.RenderResponse)
    same = render_pb2.RenderResponse(
        subject=answer.subject,
        html=answer.html,
        text=answer.text,
        status=answer.status,
        skip_reason=answer.skip_reason,
        fallback_reason=answer.fallback_reason,
        profile_version=answer.profile_version,
        template_version=answer.template_version,
    )
    return same.SerializeToString(deterministic=True)


# A render over HTTP may be reused for as long as its template lets data be old (max_age).
RENDER_CACHE_POLICY = CachePolicy(
    max_age_s=lambda answer: int(answer.max_age.seconds),  # type: ignore[attr-defined]
    etag_basis=_render_etag_basis,
    weak=True,
)


@dataclass(slots=True)
class RenderApp:
    grpc: GrpcServer
    profile_channel: ProfileChannel
    profiles: ProfileFetcher
    pool: asyncpg.Pool
    event_log: EventLog
    catalog: CatalogConsumer
    auth: ServerAuth
    _catalog_task: asyncio.Task[None] | None = field(default=None)
    _erasures: Following | None = field(default=None)
    _watching: asyncio.Task[None] | None = field(default=None)
    catalog_consumer: str = "render-catalog"  # the catalog's durable consumer, whose backlog it reports
    _lag: asyncio.Task[None] | None = field(default=None)

    async def start(self) -> None:
        await self.grpc.start()
        await self.start_background()

    async def start_background(self) -> None:
        """Keep the catalog from the event log, and drop erased people's profile copies as the
        profile service announces them (from the oldest notice the log keeps)."""
        self.auth.start()
        self._catalog_task = asyncio.create_task(self.catalog.run(), name="catalog")
        self._watching = asyncio.create_task(self.profile_channel.watch(), name="profile-channel-tls")
        if isinstance(self.event_log, JetStreamEventLog):
            read = partial(self.event_log.backlog, self.catalog_consumer)
            watching = watch_backlog(self.catalog_consumer, read)
            self._lag = asyncio.create_task(watching, name="catalog-backlog")
        self._erasures = await self.event_log.follow_erasures(self.profiles.on_erasure_notice)

    async def close(self) -> None:
        """After the drain: finish the catalog batch under way, close clients; each step
        bounded (sendtime_common.shutdown)."""
        self.catalog.stop()
        for task in (self._watching, self._lag):
            if task is not None:
                task.cancel()
        await asyncio.gather(
            finish_or_cancel("catalog batch in hand", [self._catalog_task]),
            finish_or_cancel("TLS watch and backlog", [self._watching, self._lag], CANCEL_WAIT_S),
            bounded("erasure notices", self._erasures.close()) if self._erasures else asyncio.sleep(0),
        )
        await asyncio.gather(
            bounded("event log", self.event_log.close(), FINISH_S + CANCEL_WAIT_S),
            self.profiles.close(),
            bounded("profile channel", self.profile_channel.close()),
            self.auth.close(),
        )
        await close_pool(self.pool)

    async def stop(self, grace_s: float) -> None:
        """Drain calls, then close what they use: within ``grace_s`` plus STOP_MARGIN_S."""
        await self.grpc.stop(grace_s)
        await self.close()


def check_message_sizes(settings: Settings) -> None:
    """Check that the largest valid RenderBatch request, and the largest rendered customer,
    fit the configured message sizes.

    Raises:
        ConfigError: one does not.
    """
    settings.limits.require_receive(
        MAX_BATCH * BATCH_IDENTIFIER_BYTES + MIB, f"a RenderBatch of {MAX_BATCH} customers"
    )
    settings.limits.require_send(
        3 * settings.template_limits.output_bytes + 64 * 1024,
        "a rendered customer (three parts of RENDER_TEMPLATE_OUTPUT_BYTES)",
    )


async def create_app(settings: Settings) -> RenderApp:
    """Connect to PostgreSQL (applying migrations) and NATS; build the server, not yet started.
    The profile channel and Redis connect lazily: render serves (with fallbacks) even while the
    profile service or Redis is down.

    Raises:
        sendtime_common.config.ConfigError: no credential to call the profile service with.
        OSError, asyncpg.PostgresError: PostgreSQL cannot be reached or a migration failed.
        sendtime_common.event_log.EventLogUnavailable: NATS cannot be reached.
    """
    if not settings.profile_api_key and not settings.profile_tls.cert_file:
        raise ConfigError(
            "render reads profiles with a credential of its own: set PROFILE_SERVICE_API_KEY (or "
            "PROFILE_SERVICE_API_KEY_FILE) to a key with only the scope profiles.read, or give it a "
            "client certificate (PROFILE_SERVICE_CERT_FILE, PROFILE_SERVICE_KEY_FILE) that the profile "
            "service's AUTH_MTLS_IDENTITIES maps to profiles.read"
        )
    # Unusable security settings stop the service before it connects to anything.
    settings.tls.check()
    settings.identifier_hasher.check_configured()
    pool = await create_pool(
        settings.database_url,
        min_size=2,
        max_size=settings.database_pool_size,
        random_page_cost=settings.database_random_page_cost,
    )
    await migrate(pool, MIGRATIONS_DIR, table="render_schema_migrations")
    auth = await create_server_auth(
        pool, "render", SERVICE_NAMES, settings.auth, settings.identifier_hasher, settings.redis_url
    )
    event_log = await JetStreamEventLog.connect(settings.event_log)
    catalog = CatalogConsumer(
        await event_log.subscribe(settings.catalog_consumer_name),
        CatalogStore(pool),
        batch_size=settings.catalog_batch_size,
        concurrency=settings.catalog_concurrency,
        processed_retention=timedelta(seconds=settings.event_log.max_age_s) + timedelta(days=1),
    )
    profile_channel = ProfileChannel(
        settings.profile_target,
        settings.profile_api_key,
        settings.profile_tls,
        aio_client_interceptors(),  # type: ignore[no-untyped-call]  # traces the lookups
    )
    profiles = ProfileFetcher(
        profile_channel.stub,
        bounded_client(settings.redis_url) if settings.redis_url else None,
        FetcherSettings(
            breaker_failures=settings.breaker_failures,
            breaker_recovery_s=settings.breaker_recovery_s,
            # A copy must not outlive the erasure notices that would drop it.
            lkg_ttl_s=min(FetcherSettings().lkg_ttl_s, int(settings.event_log.max_age_s)),
            hasher=settings.identifier_hasher,
        ),
    )
    profile_channel.on_reopen(profiles.use_stub)
    check_message_sizes(settings)
    compiler = TemplateCompiler(settings.template_cache_size, settings.template_limits)
    renderer = Renderer(
        compiler,
        profiles,
        Recommender(pool, limit_default=settings.recommendation_limit),
        fallback_reserve_s=settings.fallback_reserve_s,
        recommendation_limit=settings.recommendation_limit,
    )
    store = TemplateStore(pool, cache_size=settings.template_cache_size)
    render_servicer = RenderServicer(
        renderer,
        store,
        default_deadline_s=settings.default_deadline_s,
        inline_templates=settings.inline_templates,
    )
    template_servicer = TemplateServicer(
        store, compiler, renderer, default_deadline_s=settings.default_deadline_s
    )

    def register(server: grpc.aio.Server) -> None:
        render_pb2_grpc.add_RenderServiceServicer_to_server(render_servicer, server)
        render_pb2_grpc.add_TemplateServiceServicer_to_server(template_servicer, server)

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
    # No readiness conditions: ready from start-up to shutdown. Render answers with fallbacks
    # while the profile service is slow or down (the breaker, last-known-good copies) and
    # without Redis; the catalog consumer only freshens recommendations. Taking every replica
    # out of rotation for a shared dependency would turn degraded answers into none.
    if settings.http_address:
        server.serve_http(
            settings.http_address,
            grace_s=settings.shutdown_grace_s,
            cache_policies={RENDER: RENDER_CACHE_POLICY},
        )
    return RenderApp(
        grpc=server,
        profile_channel=profile_channel,
        profiles=profiles,
        pool=pool,
        event_log=event_log,
        catalog=catalog,
        auth=auth,
        catalog_consumer=settings.catalog_consumer_name,
    )
