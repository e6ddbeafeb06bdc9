"""Wiring of the profile service: PostgreSQL (migrated), Redis, the event log, the merger and its
dead letters, the profile-change and erasure-notice publishers and the gRPC server. Ready while
the merger runs and its consumer in the event log answers (docs/operations.md#health)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import asyncpg
import grpc
from google.protobuf.message import Message

from profile_service.access_servicers import AuditServicer, KeyServicer
from profile_service.cache import KEY_PREFIX, ProfileCache
from profile_service.change_outbox import ProfileChangeOutbox
from profile_service.customer_data import CustomerData
from profile_service.erasure_outbox import ErasureOutbox
from profile_service.identity import IdentityLimits, InvalidLimits
from profile_service.merge_lanes import MergeLanes, lanes_of
from profile_service.merge_rules import DEFAULT_RULES, MergeRulesError, load_merge_rules
from profile_service.merger import EventMerger
from profile_service.near_cache import InvalidationListener, NearCache
from profile_service.reader import ProfileReader
from profile_service.repository import ProfileRepository, create_pool
from profile_service.servicer import ProfileServicer, UnmergedEventServicer
from profile_service.settings import Settings
from profile_service.unmerged import StoreError, UnmergedStore
from sendtime.auth.v1 import auth_pb2, auth_pb2_grpc
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime_common.answer_memo import AnswerMemo
from sendtime_common.auth.server_auth import ServerAuth, create_server_auth
from sendtime_common.config import ConfigError
from sendtime_common.consumer_lag import forget_backlog, watch_backlog
from sendtime_common.database import close_pool
from sendtime_common.event_log import EventLog, EventLogSubscription, JetStreamEventLog, partition_consumer
from sendtime_common.grpc_server import GrpcServer
from sendtime_common.http_gateway import CachePolicy
from sendtime_common.migrate import migrate
from sendtime_common.readiness import task_running
from sendtime_common.redis_client import bounded_client
from sendtime_common.shutdown import CANCEL_WAIT_S, FINISH_S, bounded, finish_or_cancel

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SERVICE_NAME = profile_pb2.DESCRIPTOR.services_by_name["ProfileService"].full_name
# The profile service also hosts the merger's dead letters, key management and the audit trail.
SERVICE_NAMES = [
    SERVICE_NAME,
    profile_pb2.DESCRIPTOR.services_by_name["UnmergedEventService"].full_name,
    auth_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name,
    auth_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
]
PURGE_INTERVAL_S = 3600.0
GET_PROFILE = f"/{SERVICE_NAME}/GetProfile"


def profile_answer_memo(near: NearCache, max_entries: int, ttl_s: float) -> AnswerMemo:
    """The profiles' HTTP answers, encoded, by what they hold. They follow the near cache's
    copies: an answer is kept only while a copy of its customer is (``near.holds``), and leaves
    when one of the customer's copies does (any write or erasure of the customer's entries, by
    any replica, invalidates them), or when every copy does; an erasure here also forgets the
    person at once (``CustomerData``'s ``forget``)."""

    def owner(answer: Message) -> str | None:
        assert isinstance(answer, profile_pb2.GetProfileResponse)
        customer_id = answer.profile.customer_id
        return customer_id if near.holds(customer_id) else None

    answers = AnswerMemo(max_entries, ttl_s, owner=owner)
    near.follow(on_dropped=answers.forget, on_cleared=answers.clear)
    return answers


def profile_cache_policy(max_age_s: int) -> CachePolicy:
    """A profile over HTTP: its ETag changes with what the answer holds (a version bump, or a
    field computed at read time such as an abandoned cart), max-age is a setting."""
    return CachePolicy(
        max_age_s=lambda answer: max_age_s,
        etag_basis=lambda answer: answer.SerializeToString(deterministic=True),
    )


@dataclass(slots=True)
class ProfileApp:
    grpc: GrpcServer
    merger: EventMerger
    lanes: MergeLanes
    pool: asyncpg.Pool
    cache: ProfileCache
    event_log: EventLog
    erasure_outbox: ErasureOutbox
    change_outbox: ProfileChangeOutbox
    auth: ServerAuth
    audit_retention: timedelta
    unmerged: UnmergedStore
    dead_letter_retention: timedelta
    invalidations: InvalidationListener | None = None  # None: no near cache
    answers: AnswerMemo | None = None  # the HTTP answers kept encoded; None: no near cache
    consumer_name: str = "profile-merger"  # the merger's durable consumer, whose backlog it reports
    _background: list[asyncio.Task[None]] = field(default_factory=list)
    _relaying: asyncio.Task[None] | None = None
    _listening: asyncio.Task[None] | None = None
    _purging: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Serve gRPC, and start merging events, publishing profile changes and erasure notices
        and following the near cache's invalidations."""
        await self.grpc.start()
        await self.start_background()

    async def start_background(self) -> None:
        self.auth.start()
        merging = asyncio.create_task(self.lanes.run(), name="merger")
        self._background = [merging, asyncio.create_task(self.erasure_outbox.run(), name="erasure-outbox")]
        # A merger that crashed or returned merges nothing more: not ready (never restarted
        # for it, though: liveness follows only the process).
        self.grpc.readiness.watch("merger", task_running(merging))
        self._relaying = asyncio.create_task(self.change_outbox.run(), name="profile-change-outbox")
        self._purging = asyncio.create_task(self._purge_expired(), name="purge-expired")
        if self.invalidations is not None:  # the near cache keeps copies once they flow
            self._listening = asyncio.create_task(self.invalidations.run(), name="near-cache-invalidations")

    async def close(self) -> None:
        """After the drain: finish the merges under way and the notices being published, publish
        the changes of the last merges, then close connections; each step bounded
        (sendtime_common.shutdown)."""
        self.lanes.stop()
        self.erasure_outbox.stop()
        for task in (self._purging, self._listening):
            if task is not None:
                task.cancel()
        await asyncio.gather(
            finish_or_cancel("merges and erasure notices in hand", self._background),
            finish_or_cancel("purge and invalidations", [self._purging, self._listening], CANCEL_WAIT_S),
        )
        if self._relaying is not None:
            self.change_outbox.stop()  # after the merger: one more round for its last batch
            await finish_or_cancel("profile changes of the last merges", [self._relaying])
        await asyncio.gather(
            self.auth.close(),
            bounded("near cache", self.invalidations.close()) if self.invalidations else asyncio.sleep(0),
            bounded("event log", self.event_log.close(), FINISH_S + CANCEL_WAIT_S),
            bounded("profile cache", self.cache.close()),
        )
        await close_pool(self.pool)

    async def stop(self, grace_s: float) -> None:
        """Drain, then close: within ``grace_s`` plus STOP_MARGIN_S."""
        await self.grpc.stop(grace_s)
        await self.close()

    async def _purge_expired(self) -> None:
        """Hourly (and at start): audit records and the merger's dead letters past retention."""
        while True:
            now = datetime.now(UTC)
            try:
                purged = await self.auth.audit.purge(now - self.audit_retention)
                log.info("purged expired audit records", extra={"audit_records": purged})
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("could not purge expired audit records", extra={"error": str(exc)})
            try:
                purged = await self.unmerged.purge(now - self.dead_letter_retention)
                log.info("purged expired unmerged events", extra={"unmerged_events": purged})
            except StoreError as exc:
                log.warning("could not purge expired unmerged events", extra={"error": str(exc)})
            await asyncio.sleep(PURGE_INTERVAL_S)


def merge_lanes(settings: Settings, merger: EventMerger, event_log: JetStreamEventLog) -> MergeLanes:
    """The lanes of the event stream this replica shares with the others (``merge_lanes``),
    each merged from a subscription of its durable consumer (in the log's order), its backlog
    reported while owned."""
    consumer = settings.consumer_name

    async def subscribe(lane: int) -> EventLogSubscription:
        return await event_log.subscribe(partition_consumer(consumer, lane), lane=lane)

    async def watch(lane: int) -> None:
        durable = partition_consumer(consumer, lane)
        try:
            await watch_backlog(durable, partial(event_log.backlog, durable))
        finally:
            forget_backlog(durable)  # another replica reports it now

    group = f"{consumer}:{event_log.event_stream_id}"
    connect = partial(lanes_connection, settings.database_url)
    return MergeLanes(merger, group, lanes_of(event_log.event_partitions), subscribe, connect, watch=watch)


async def lanes_connection(database_url: str, application_name: str) -> asyncpg.Connection:
    """The merge lanes' own connection, whose session holds their locks. With TCP keepalives, so
    that PostgreSQL drops the locks of a replica cut off by the network within about 25 s (10 s
    idle, then 3 probes 5 s apart), as it does at once for one that died; a replica's own
    statements on it are bounded too (``merge_lanes.STATEMENT_TIMEOUT_S``)."""
    return await asyncpg.connect(
        database_url,
        server_settings={
            "application_name": application_name,
            "tcp_keepalives_idle": "10",
            "tcp_keepalives_interval": "5",
            "tcp_keepalives_count": "3",
        },
        timeout=5,
    )


async def create_app(settings: Settings) -> ProfileApp:
    """Connect to PostgreSQL (applying migrations), Redis and NATS; build the server, not started.

    Raises:
        sendtime_common.config.ConfigError: PROFILE_IDENTITY_LIMITS is unusable.
        OSError, asyncpg.PostgresError: PostgreSQL cannot be reached or a migration failed.
        sendtime_common.event_log.EventLogUnavailable: NATS cannot be reached.
    """
    try:
        limits = IdentityLimits.parse(settings.identity_limits)
    except InvalidLimits as exc:
        raise ConfigError(f"PROFILE_IDENTITY_LIMITS: {exc}") from None
    try:
        rules = (
            load_merge_rules(settings.source_priority_file)
            if settings.source_priority_file
            else DEFAULT_RULES
        )
    except MergeRulesError as exc:
        raise ConfigError(f"PROFILE_SOURCE_PRIORITY_FILE: {exc}") from None
    # Unusable security settings stop the service before it connects to anything.
    settings.tls.check()
    settings.identifier_hasher.check_configured()
    pool = await create_pool(
        settings.database_url,
        min_size=2,
        max_size=settings.database_pool_size,
        random_page_cost=settings.database_random_page_cost,
    )
    await migrate(pool, MIGRATIONS_DIR, table="schema_migrations")
    auth = await create_server_auth(
        pool, "profile", SERVICE_NAMES, settings.auth, settings.identifier_hasher, settings.redis_url
    )
    near, invalidations, answers = None, None, None
    if settings.near_cache_entries:
        near = NearCache(settings.near_cache_entries, settings.near_cache_ttl_s)
        # The HTTP answers encoded from profiles are kept as the copies are (as many, as long),
        # and leave with them.
        answers = profile_answer_memo(near, settings.near_cache_entries, settings.near_cache_ttl_s)
        invalidations = InvalidationListener(near, settings.redis_url, KEY_PREFIX)
    cache = ProfileCache(bounded_client(settings.redis_url), ttl_s=settings.cache_ttl_s, near=near)
    event_log = await JetStreamEventLog.connect(settings.event_log)
    repository = ProfileRepository(pool, limits, rules, settings.identifier_hasher)
    unmerged = UnmergedStore(pool, settings.identifier_hasher)
    change_outbox = ProfileChangeOutbox(pool, event_log)
    merger = EventMerger(
        [],  # the lanes' subscriptions, given as lanes are taken
        repository,
        cache,
        unmerged,
        batch_size=settings.merge_batch_size,
        max_deliveries=settings.merge_max_deliveries,
        on_merged=change_outbox.wake,
        transactions=settings.merge_concurrency,
    )
    lanes = merge_lanes(settings, merger, event_log)
    erasure_outbox = ErasureOutbox(pool, event_log)
    servicer = ProfileServicer(
        ProfileReader(
            repository,
            cache,
            cart_abandoned_after=timedelta(minutes=settings.cart_abandoned_after_minutes),
            read_time_copies=settings.near_cache_entries,  # one for each copy held in process
        ),
        CustomerData(
            repository,
            cache,
            on_erased=erasure_outbox.wake,
            forget=answers.forget if answers is not None else lambda customer_id: None,
        ),
        repository,
        max_batch_get=settings.max_batch_get,
    )
    key_servicer, audit_servicer = KeyServicer(auth.keys), AuditServicer(auth.audit)
    unmerged_servicer = UnmergedEventServicer(unmerged, merger)

    def register(server: grpc.aio.Server) -> None:
        profile_pb2_grpc.add_ProfileServiceServicer_to_server(servicer, server)
        profile_pb2_grpc.add_UnmergedEventServiceServicer_to_server(unmerged_servicer, server)
        auth_pb2_grpc.add_KeyServiceServicer_to_server(key_servicer, server)
        auth_pb2_grpc.add_AuditServiceServicer_to_server(audit_servicer, server)

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
    # The merger cannot consume without the event log: profiles would go stale unseen. (The
    # stream, not a lane's consumer: a replica that owns no lane yet is as ready.)
    server.readiness.watch("event log", event_log.usable)
    if settings.http_address:
        server.serve_http(
            settings.http_address,
            grace_s=settings.shutdown_grace_s,
            cache_policies={GET_PROFILE: profile_cache_policy(settings.http_max_age_s)},
            answer_memos={GET_PROFILE: answers} if answers is not None else None,
        )
    return ProfileApp(
        grpc=server,
        merger=merger,
        lanes=lanes,
        pool=pool,
        cache=cache,
        event_log=event_log,
        erasure_outbox=erasure_outbox,
        change_outbox=change_outbox,
        auth=auth,
        audit_retention=timedelta(days=settings.audit_retention_days),
        unmerged=unmerged,
        dead_letter_retention=timedelta(days=settings.dead_letter_retention_days),
        invalidations=invalidations,
        answers=answers,
        consumer_name=settings.consumer_name,
    )
