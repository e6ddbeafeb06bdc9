"""Typed configuration of the profile service."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from sendtime_common.auth.server_auth import AuthSettings
from sendtime_common.call_limits import MIB, PROFILE_RESPONSE_BYTES, CallLimits
from sendtime_common.config import env_float, env_int, env_str
from sendtime_common.database import DEFAULT_RANDOM_PAGE_COST
from sendtime_common.event_log import JetStreamSettings
from sendtime_common.identifiers import IdentifierHasher, hasher_from_env
from sendtime_common.readiness import ReadinessSettings
from sendtime_common.tls import TlsSettings

PROFILE_CALL_LIMITS = CallLimits(max_receive_bytes=4 * MIB, max_send_bytes=PROFILE_RESPONSE_BYTES)


@dataclass(frozen=True, slots=True)
class Settings:
    address: str = "[::]:50052"
    # Health only, plaintext, for kubelet\'s gRPC probes (which cannot speak TLS); empty: none.
    health_address: str = "[::]:50062"
    # Prometheus metrics (GET /metrics), plaintext and open, like health; empty: none.
    metrics_address: str = "[::]:9462"
    # The HTTP/JSON face (the contracts' google.api.http routes, same keys, scopes and limits;
    # docs/http.md); empty: none.
    http_address: str = "[::]:8082"
    # Cache-Control max-age of a profile fetched over HTTP (its ETag lets a client revalidate).
    http_max_age_s: int = 0
    # TLS (or mutual TLS) on every port but the health one; plaintext only when allowed.
    tls: TlsSettings = field(default_factory=TlsSettings)
    # Concurrent calls, queued calls and message sizes (docs/limits.md).
    # Messages: the largest request is a BatchGetProfiles of 1,000 identifiers (~270 KB); the
    # largest response a BatchGetProfiles of 1,000 profiles.
    limits: CallLimits = PROFILE_CALL_LIMITS
    log_level: str = "INFO"
    otlp_endpoint: str = ""
    shutdown_grace_s: float = 10.0
    # How long a failing dependency is forgiven before NOT_SERVING, how often it is checked.
    readiness: ReadinessSettings = field(default_factory=ReadinessSettings)
    database_url: str = "postgresql://postgres@127.0.0.1:5432/sendtime"
    database_pool_size: int = 10
    database_random_page_cost: float = DEFAULT_RANDOM_PAGE_COST
    redis_url: str = "redis://127.0.0.1:6379/0"
    cache_ttl_s: int = 24 * 3600
    # Profiles kept in process in front of Redis (0: none), and for how long at most; Redis's
    # invalidations keep them current (profile_service.near_cache).
    near_cache_entries: int = 10_000
    near_cache_ttl_s: float = 60.0
    consumer_name: str = "profile-merger"
    merge_batch_size: int = 512  # see docs/benchmarks.md: 256 left the merger behind ingest
    merge_concurrency: int = 1  # batches merged at once, across lanes; see profile_service.merger
    # Deliveries after which an event that fails in an unknown way is set aside (a poison event
    # is set aside at once, a transient failure never): see profile_service.unmerged.
    merge_max_deliveries: int = 10
    # The merger's dead letters carry personal data as it was sent: kept this long, then deleted.
    dead_letter_retention_days: int = 30
    max_batch_get: int = 1000
    # Identifiers of a kind one profile may hold, e.g. "email=3,device_id=10" (others: defaults).
    identity_limits: str = ""
    # The source-priority matrix (TOML); empty: the packaged source_priority.toml.
    source_priority_file: str = ""
    # A cart idle this long is abandoned (Cart.abandoned, computed at read time).
    cart_abandoned_after_minutes: float = 60.0
    event_log: JetStreamSettings = field(default_factory=JetStreamSettings)
    # IDENTIFIER_HASH_KEYS: how erased identifiers are named (sendtime_common.identifiers).
    identifier_hasher: IdentifierHasher = field(default_factory=IdentifierHasher.unkeyed)
    # Who may call: key checks, mutual-TLS identities, reflection (sendtime_common.auth).
    auth: AuthSettings = field(default_factory=AuthSettings)
    # How long the audit trail keeps a record.
    audit_retention_days: int = 365

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Read settings from environment variables; unset ones keep their local defaults.

        Raises:
            sendtime_common.config.ConfigError: a variable has an unusable value.
        """
        defaults = cls()
        return cls(
            address=env_str(env, "PROFILE_ADDRESS", defaults.address),
            health_address=env.get("PROFILE_HEALTH_ADDRESS", defaults.health_address).strip(),
            metrics_address=env.get("PROFILE_METRICS_ADDRESS", defaults.metrics_address).strip(),
            http_address=env.get("PROFILE_HTTP_ADDRESS", defaults.http_address).strip(),
            http_max_age_s=env_int(env, "PROFILE_HTTP_MAX_AGE_SECONDS", defaults.http_max_age_s, minimum=0),
            tls=TlsSettings.from_env(env),
            limits=CallLimits.from_env(env, PROFILE_CALL_LIMITS),
            log_level=env_str(env, "LOG_LEVEL", defaults.log_level),
            otlp_endpoint=env_str(env, "OTEL_EXPORTER_OTLP_ENDPOINT", ""),
            shutdown_grace_s=env_float(env, "SHUTDOWN_GRACE_SECONDS", defaults.shutdown_grace_s),
            readiness=ReadinessSettings.from_env(env),
            database_url=env_str(env, "DATABASE_URL", defaults.database_url),
            database_pool_size=env_int(env, "DATABASE_POOL_SIZE", defaults.database_pool_size, minimum=2),
            database_random_page_cost=env_float(
                env, "DATABASE_RANDOM_PAGE_COST", defaults.database_random_page_cost, minimum=0.1
            ),
            redis_url=env_str(env, "REDIS_URL", defaults.redis_url),
            cache_ttl_s=env_int(env, "PROFILE_CACHE_TTL_SECONDS", defaults.cache_ttl_s, minimum=1),
            near_cache_entries=env_int(
                env, "PROFILE_NEAR_CACHE_ENTRIES", defaults.near_cache_entries, minimum=0
            ),
            near_cache_ttl_s=env_float(
                env, "PROFILE_NEAR_CACHE_TTL_SECONDS", defaults.near_cache_ttl_s, minimum=0.001
            ),
            consumer_name=env_str(env, "PROFILE_CONSUMER_NAME", defaults.consumer_name),
            merge_batch_size=env_int(env, "PROFILE_MERGE_BATCH_SIZE", defaults.merge_batch_size, minimum=1),
            merge_concurrency=env_int(
                env, "PROFILE_MERGE_CONCURRENCY", defaults.merge_concurrency, minimum=1
            ),
            merge_max_deliveries=env_int(
                env, "PROFILE_MERGE_MAX_DELIVERIES", defaults.merge_max_deliveries, minimum=1
            ),
            dead_letter_retention_days=env_int(
                env, "PROFILE_DEAD_LETTER_RETENTION_DAYS", defaults.dead_letter_retention_days, minimum=1
            ),
            identity_limits=env_str(env, "PROFILE_IDENTITY_LIMITS", defaults.identity_limits),
            source_priority_file=env_str(env, "PROFILE_SOURCE_PRIORITY_FILE", defaults.source_priority_file),
            cart_abandoned_after_minutes=env_float(
                env, "PROFILE_CART_ABANDONED_AFTER_MINUTES", defaults.cart_abandoned_after_minutes, minimum=1
            ),
            event_log=JetStreamSettings.from_env(env),
            identifier_hasher=hasher_from_env(env),
            auth=AuthSettings.from_env(env),
            audit_retention_days=env_int(
                env, "AUDIT_RETENTION_DAYS", defaults.audit_retention_days, minimum=1
            ),
        )
