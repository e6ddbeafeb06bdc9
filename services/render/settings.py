"""Typed configuration of the render service."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from render.templates import TemplateLimits
from sendtime_common.auth.server_auth import AuthSettings
from sendtime_common.call_limits import MIB, CallLimits
from sendtime_common.config import env_bool, env_float, env_int, env_str, secret_from_env
from sendtime_common.database import DEFAULT_RANDOM_PAGE_COST
from sendtime_common.event_log import JetStreamSettings
from sendtime_common.identifiers import IdentifierHasher, hasher_from_env
from sendtime_common.readiness import ReadinessSettings
from sendtime_common.tls import ClientTls, TlsSettings

RENDER_CALL_LIMITS = CallLimits(max_receive_bytes=32 * MIB, max_send_bytes=4 * MIB)


@dataclass(frozen=True, slots=True)
class Settings:
    address: str = "[::]:50053"
    # Health only, plaintext, for kubelet\'s gRPC probes (which cannot speak TLS); empty: none.
    health_address: str = "[::]:50063"
    # Prometheus metrics (GET /metrics), plaintext and open, like health; empty: none.
    metrics_address: str = "[::]:9463"
    # The HTTP/JSON face (the contracts' google.api.http routes, same keys, scopes and limits;
    # docs/http.md); empty: none.
    http_address: str = "[::]:8083"
    # TLS (or mutual TLS) on every port but the health one; plaintext only when allowed.
    tls: TlsSettings = field(default_factory=TlsSettings)
    # Concurrent calls, queued calls and message sizes (docs/limits.md).
    # Messages: a RenderBatch of 100,000 customers with 256-character identifiers is ~26 MB; one
    # rendered customer is at most three parts of RENDER_TEMPLATE_OUTPUT_BYTES.
    limits: CallLimits = RENDER_CALL_LIMITS
    log_level: str = "INFO"
    otlp_endpoint: str = ""
    shutdown_grace_s: float = 10.0
    # How long a failing dependency is forgiven before NOT_SERVING, how often it is checked.
    readiness: ReadinessSettings = field(default_factory=ReadinessSettings)
    profile_target: str = "127.0.0.1:50052"
    # The API key render calls profile with: one that can only read profiles (profiles.read).
    profile_api_key: str = ""
    # TLS to the profile service: the CA to trust, and a client certificate for mutual TLS.
    profile_tls: ClientTls = field(default_factory=ClientTls)
    # Last-known-good profiles are kept here (and in process) for when the profile service
    # cannot answer in time; empty: in process only.
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Used when a caller sets no deadline of its own: a render must never wait without bound.
    default_deadline_s: float = 1.0
    # Kept back from the caller's deadline for rendering the fallback after a profile lookup
    # that did not answer in time (a tenth of a shorter deadline, at least 20 ms: renderer.py).
    # 20 ms left 4-38 of ~1,100 renders with 1 s deadlines late when profile stalled under load
    # on 2 cores (lookups time out together and their fallbacks queue); 100 ms none (make chaos,
    # docs/reliability.md).
    fallback_reserve_s: float = 0.1
    template_cache_size: int = 1024
    # What one template may cost (docs/limits.md).
    template_limits: TemplateLimits = field(default_factory=TemplateLimits)
    # Whether Render takes inline templates at all; when it does, the caller also needs the
    # scope templates.write (an inline template is template authoring).
    inline_templates: bool = True
    # Consecutive profile-service failures that open the circuit, and how long it stays open.
    breaker_failures: int = 5
    breaker_recovery_s: float = 5.0
    # Templates and the recommendation catalog.
    database_url: str = "postgresql://postgres@127.0.0.1:5432/sendtime"
    database_pool_size: int = 10
    database_random_page_cost: float = DEFAULT_RANDOM_PAGE_COST
    # The catalog is kept from product and order events on the event log.
    catalog_consumer_name: str = "render-catalog"
    catalog_batch_size: int = 256
    catalog_concurrency: int = 4
    recommendation_limit: int = 8
    event_log: JetStreamSettings = field(default_factory=JetStreamSettings)
    # IDENTIFIER_HASH_KEYS: how erased identifiers are named (sendtime_common.identifiers).
    identifier_hasher: IdentifierHasher = field(default_factory=IdentifierHasher.unkeyed)
    # Who may call: key checks, mutual-TLS identities, reflection (sendtime_common.auth).
    auth: AuthSettings = field(default_factory=AuthSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Read settings from environment variables; unset ones keep their local defaults.

        Raises:
            sendtime_common.config.ConfigError: a variable has an unusable value.
        """
        defaults = cls()
        return cls(
            address=env_str(env, "RENDER_ADDRESS", defaults.address),
            health_address=env.get("RENDER_HEALTH_ADDRESS", defaults.health_address).strip(),
            metrics_address=env.get("RENDER_METRICS_ADDRESS", defaults.metrics_address).strip(),
            http_address=env.get("RENDER_HTTP_ADDRESS", defaults.http_address).strip(),
            tls=TlsSettings.from_env(env),
            limits=CallLimits.from_env(env, RENDER_CALL_LIMITS),
            log_level=env_str(env, "LOG_LEVEL", defaults.log_level),
            otlp_endpoint=env_str(env, "OTEL_EXPORTER_OTLP_ENDPOINT", ""),
            shutdown_grace_s=env_float(env, "SHUTDOWN_GRACE_SECONDS", defaults.shutdown_grace_s),
            readiness=ReadinessSettings.from_env(env),
            profile_target=env_str(env, "PROFILE_SERVICE_TARGET", defaults.profile_target),
            profile_api_key=secret_from_env(env, "PROFILE_SERVICE_API_KEY"),
            profile_tls=ClientTls.from_env(env, "PROFILE_SERVICE"),
            redis_url=env.get("RENDER_REDIS_URL", env_str(env, "REDIS_URL", defaults.redis_url)).strip(),
            default_deadline_s=env_float(
                env, "RENDER_DEFAULT_DEADLINE_SECONDS", defaults.default_deadline_s, minimum=0.001
            ),
            fallback_reserve_s=env_float(env, "RENDER_FALLBACK_RESERVE_SECONDS", defaults.fallback_reserve_s),
            template_cache_size=env_int(
                env, "RENDER_TEMPLATE_CACHE_SIZE", defaults.template_cache_size, minimum=1
            ),
            template_limits=_template_limits(env),
            inline_templates=env_bool(env, "RENDER_INLINE_TEMPLATES", defaults.inline_templates),
            breaker_failures=env_int(env, "RENDER_BREAKER_FAILURES", defaults.breaker_failures, minimum=1),
            breaker_recovery_s=env_float(
                env, "RENDER_BREAKER_RECOVERY_SECONDS", defaults.breaker_recovery_s, minimum=0.1
            ),
            database_url=env_str(env, "DATABASE_URL", defaults.database_url),
            database_pool_size=env_int(env, "DATABASE_POOL_SIZE", defaults.database_pool_size, minimum=2),
            database_random_page_cost=env_float(
                env, "DATABASE_RANDOM_PAGE_COST", defaults.database_random_page_cost, minimum=0.1
            ),
            catalog_consumer_name=env_str(
                env, "RENDER_CATALOG_CONSUMER_NAME", defaults.catalog_consumer_name
            ),
            catalog_batch_size=env_int(
                env, "RENDER_CATALOG_BATCH_SIZE", defaults.catalog_batch_size, minimum=1
            ),
            catalog_concurrency=env_int(
                env, "RENDER_CATALOG_CONCURRENCY", defaults.catalog_concurrency, minimum=1
            ),
            recommendation_limit=env_int(
                env, "RENDER_RECOMMENDATION_LIMIT", defaults.recommendation_limit, minimum=1
            ),
            event_log=JetStreamSettings.from_env(env),
            identifier_hasher=hasher_from_env(env),
            auth=AuthSettings.from_env(env),
        )


def _template_limits(env: Mapping[str, str]) -> TemplateLimits:
    """RENDER_TEMPLATE_MAX_SOURCE_BYTES, _LOOP_ITERATIONS, _OUTPUT_BYTES, _CONTEXT_DEPTH,
    _LOCAL_BYTES and _RENDER_MS.

    Raises:
        sendtime_common.config.ConfigError: a value is not a positive integer.
    """
    d = TemplateLimits()
    return TemplateLimits(
        max_source_bytes=env_int(env, "RENDER_TEMPLATE_MAX_SOURCE_BYTES", d.max_source_bytes, minimum=1),
        loop_iterations=env_int(env, "RENDER_TEMPLATE_LOOP_ITERATIONS", d.loop_iterations, minimum=1),
        output_bytes=env_int(env, "RENDER_TEMPLATE_OUTPUT_BYTES", d.output_bytes, minimum=1),
        context_depth=env_int(env, "RENDER_TEMPLATE_CONTEXT_DEPTH", d.context_depth, minimum=1),
        local_namespace_bytes=env_int(env, "RENDER_TEMPLATE_LOCAL_BYTES", d.local_namespace_bytes, minimum=1),
        render_time_s=env_int(env, "RENDER_TEMPLATE_RENDER_MS", round(d.render_time_s * 1000), minimum=1)
        / 1000,
    )
