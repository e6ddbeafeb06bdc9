"""Typed configuration of the triggers service."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from sendtime_common.auth.server_auth import AuthSettings
from sendtime_common.call_limits import MIB, CallLimits
from sendtime_common.config import ConfigError, env_float, env_int, env_str, secret_from_env
from sendtime_common.database import DEFAULT_RANDOM_PAGE_COST
from sendtime_common.event_log import JetStreamSettings
from sendtime_common.identifiers import IdentifierHasher, hasher_from_env
from sendtime_common.readiness import ReadinessSettings
from sendtime_common.tls import ClientTls, TlsSettings
from triggers.secret_box import SecretBox
from triggers.ssrf import AllowList

# Requests are definitions (a trigger's variables are at most 16 KiB); answers can be a page of
# up to 1,000 deliveries, each holding the rendered message it sent.
TRIGGERS_CALL_LIMITS = CallLimits(max_receive_bytes=4 * MIB, max_send_bytes=64 * MIB)


@dataclass(frozen=True, slots=True)
class Settings:
    address: str = "[::]:50054"
    # Health only, plaintext, for kubelet's gRPC probes (which cannot speak TLS); empty: none.
    health_address: str = "[::]:50064"
    # Prometheus metrics (GET /metrics), plaintext and open, like health; empty: none.
    metrics_address: str = "[::]:9464"
    # The HTTP/JSON face (the contracts' google.api.http routes; docs/http.md); empty: none.
    http_address: str = "[::]:8084"
    # TLS (or mutual TLS) on every port but the health one; plaintext only when allowed.
    tls: TlsSettings = field(default_factory=TlsSettings)
    limits: CallLimits = TRIGGERS_CALL_LIMITS
    log_level: str = "INFO"
    otlp_endpoint: str = ""
    shutdown_grace_s: float = 10.0
    # How long a failing dependency is forgiven before NOT_SERVING, how often it is checked.
    readiness: ReadinessSettings = field(default_factory=ReadinessSettings)
    database_url: str = "postgresql://postgres@127.0.0.1:5432/sendtime"
    database_pool_size: int = 10
    database_random_page_cost: float = DEFAULT_RANDOM_PAGE_COST
    # The profile service, read at fire time, with a key that can only read profiles.
    profile_target: str = "127.0.0.1:50052"
    profile_api_key: str = ""
    profile_tls: ClientTls = field(default_factory=ClientTls)
    profile_deadline_s: float = 2.0
    # The render service, which renders a fire's template, with a key holding only `render`.
    render_target: str = "127.0.0.1:50053"
    render_api_key: str = ""
    render_tls: ClientTls = field(default_factory=ClientTls)
    render_deadline_s: float = 5.0
    # TRIGGERS_SECRET_KEYS: what webhooks' signing secrets are sealed with (secret_box); None:
    # not configured, and the service refuses to start.
    secret_box: SecretBox | None = field(default=None, repr=False)
    # Hosts and networks webhooks may reach although they are not public (ssrf.AllowList).
    webhook_allow: AllowList = field(default_factory=AllowList)
    # How often an open SubscribeDeliveries stream looks for deliveries to send.
    subscription_poll_s: float = 0.25
    # The profile change stream is read through this durable consumer (the engine's).
    changes_consumer_name: str = "triggers-changes"
    # The firer: due episodes claimed and settled at once, and how often an idle replica looks
    # for due ones (it also wakes at the earliest due time it knows of).
    fire_concurrency: int = 64
    poll_interval_s: float = 0.5
    # How long a replica holds a claimed episode, or a delivery it attempts, before another
    # replica may take it up (one that hangs: one that died is taken over after replica_ttl_s).
    claim_lease_s: float = 60.0
    delivery_lease_s: float = 60.0
    # A replica whose heartbeat (written every fifth of this) is this old is taken over: what
    # it held is handed to the others at once (triggers.replicas).
    replica_ttl_s: float = 5.0
    # Trigger definitions changed in another replica are seen within this long.
    trigger_refresh_s: float = 10.0
    event_log: JetStreamSettings = field(default_factory=JetStreamSettings)
    # Where the callers' rate limits are shared by every replica.
    redis_url: str = "redis://127.0.0.1:6379/0"
    # IDENTIFIER_HASH_KEYS: how erased identifiers and audit targets are named.
    identifier_hasher: IdentifierHasher = field(default_factory=IdentifierHasher.unkeyed)
    auth: AuthSettings = field(default_factory=AuthSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Read settings from environment variables; unset ones keep their local defaults.

        Raises:
            sendtime_common.config.ConfigError: a variable has an unusable value.
        """
        defaults = cls()
        return cls(
            address=env_str(env, "TRIGGERS_ADDRESS", defaults.address),
            health_address=env.get("TRIGGERS_HEALTH_ADDRESS", defaults.health_address).strip(),
            metrics_address=env.get("TRIGGERS_METRICS_ADDRESS", defaults.metrics_address).strip(),
            http_address=env.get("TRIGGERS_HTTP_ADDRESS", defaults.http_address).strip(),
            tls=TlsSettings.from_env(env),
            limits=CallLimits.from_env(env, TRIGGERS_CALL_LIMITS),
            log_level=env_str(env, "LOG_LEVEL", defaults.log_level),
            otlp_endpoint=env_str(env, "OTEL_EXPORTER_OTLP_ENDPOINT", ""),
            shutdown_grace_s=env_float(env, "SHUTDOWN_GRACE_SECONDS", defaults.shutdown_grace_s),
            readiness=ReadinessSettings.from_env(env),
            database_url=env_str(env, "DATABASE_URL", defaults.database_url),
            database_pool_size=env_int(env, "DATABASE_POOL_SIZE", defaults.database_pool_size, minimum=2),
            database_random_page_cost=env_float(
                env, "DATABASE_RANDOM_PAGE_COST", defaults.database_random_page_cost, minimum=0.1
            ),
            profile_target=env_str(env, "PROFILE_SERVICE_TARGET", defaults.profile_target),
            profile_api_key=secret_from_env(env, "PROFILE_SERVICE_API_KEY"),
            profile_tls=ClientTls.from_env(env, "PROFILE_SERVICE"),
            profile_deadline_s=env_float(
                env, "TRIGGERS_PROFILE_DEADLINE_SECONDS", defaults.profile_deadline_s, minimum=0.01
            ),
            render_target=env_str(env, "RENDER_SERVICE_TARGET", defaults.render_target),
            render_api_key=secret_from_env(env, "RENDER_SERVICE_API_KEY"),
            render_tls=ClientTls.from_env(env, "RENDER_SERVICE"),
            render_deadline_s=env_float(
                env, "TRIGGERS_RENDER_DEADLINE_SECONDS", defaults.render_deadline_s, minimum=0.01
            ),
            secret_box=_secret_box(secret_from_env(env, "TRIGGERS_SECRET_KEYS")),
            webhook_allow=_allow_list(env_str(env, "TRIGGERS_WEBHOOK_ALLOW", "")),
            subscription_poll_s=env_float(
                env, "TRIGGERS_SUBSCRIPTION_POLL_SECONDS", defaults.subscription_poll_s, minimum=0.01
            ),
            changes_consumer_name=env_str(
                env, "TRIGGERS_CHANGES_CONSUMER_NAME", defaults.changes_consumer_name
            ),
            fire_concurrency=env_int(env, "TRIGGERS_FIRE_CONCURRENCY", defaults.fire_concurrency, minimum=1),
            poll_interval_s=env_float(env, "TRIGGERS_POLL_SECONDS", defaults.poll_interval_s, minimum=0.01),
            claim_lease_s=env_float(env, "TRIGGERS_CLAIM_LEASE_SECONDS", defaults.claim_lease_s, minimum=5),
            delivery_lease_s=env_float(
                env, "TRIGGERS_DELIVERY_LEASE_SECONDS", defaults.delivery_lease_s, minimum=35
            ),
            replica_ttl_s=env_float(env, "TRIGGERS_REPLICA_TTL_SECONDS", defaults.replica_ttl_s, minimum=1),
            trigger_refresh_s=env_float(
                env, "TRIGGERS_REFRESH_SECONDS", defaults.trigger_refresh_s, minimum=0.1
            ),
            event_log=JetStreamSettings.from_env(env),
            redis_url=env_str(env, "REDIS_URL", defaults.redis_url),
            identifier_hasher=hasher_from_env(env),
            auth=AuthSettings.from_env(env),
        )


def _secret_box(keys: str) -> SecretBox | None:
    """Raises: ConfigError: keys that are not base64 of 32 bytes (by position, never the key)."""
    if not keys:
        return None
    try:
        return SecretBox.parse(keys)
    except ValueError as exc:
        raise ConfigError(f"TRIGGERS_SECRET_KEYS: {exc}") from None


def _allow_list(entries: str) -> AllowList:
    """Raises: ConfigError: an entry is not a host name, an address or a network."""
    try:
        return AllowList.parse(entries.split(","))
    except ValueError as exc:
        raise ConfigError(f"TRIGGERS_WEBHOOK_ALLOW: {exc}") from None
