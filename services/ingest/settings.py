"""Typed configuration of the ingest service."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ingest.validation import CURRENCY_CODES
from ingest.webhooks import WebhookSettings
from sendtime_common.auth.server_auth import AuthSettings
from sendtime_common.call_limits import MIB, CallLimits
from sendtime_common.config import ConfigError, env_float, env_int, env_str
from sendtime_common.database import DEFAULT_RANDOM_PAGE_COST
from sendtime_common.event_log import JetStreamSettings
from sendtime_common.identifiers import IdentifierHasher, hasher_from_env
from sendtime_common.readiness import ReadinessSettings
from sendtime_common.tls import TlsSettings

INGEST_CALL_LIMITS = CallLimits(max_receive_bytes=4 * MIB, max_send_bytes=40 * MIB)


@dataclass(frozen=True, slots=True)
class Settings:
    address: str = "[::]:50051"
    # Health only, plaintext, for kubelet\'s gRPC probes (which cannot speak TLS); empty: none.
    health_address: str = "[::]:50061"
    # Prometheus metrics (GET /metrics), plaintext and open, like health; empty: none.
    metrics_address: str = "[::]:9461"
    # The HTTP/JSON face (the contracts' google.api.http routes, same keys, scopes and limits;
    # docs/http.md); empty: none.
    http_address: str = "[::]:8080"
    # TLS (or mutual TLS) on every port but the health one; plaintext only when allowed.
    tls: TlsSettings = field(default_factory=TlsSettings)
    # Concurrent calls, queued calls and message sizes (docs/limits.md).
    # Messages: a SendEvents request is at most 4 MiB (1,000 events, each at most 32 KiB, fit
    # only when the average is under 4 KiB: ingest.proto says so); a ListRejectedEvents page of
    # 1,000 rejected events of 32 KiB with their reasons needs up to 40 MiB.
    limits: CallLimits = INGEST_CALL_LIMITS
    log_level: str = "INFO"
    otlp_endpoint: str = ""
    shutdown_grace_s: float = 10.0
    # How long a failing dependency is forgiven before NOT_SERVING, how often it is checked.
    readiness: ReadinessSettings = field(default_factory=ReadinessSettings)
    database_url: str = "postgresql://postgres@127.0.0.1:5432/sendtime"
    database_pool_size: int = 10
    database_random_page_cost: float = DEFAULT_RANDOM_PAGE_COST
    # Where the rate limits of every replica are kept (RATE_LIMIT_REDIS_URL overrides).
    redis_url: str = "redis://127.0.0.1:6379/0"
    # How far in the future occurred_at may be (after skew correction: sender clocks drift).
    max_future_skew_s: float = 300.0
    # How old an event may be; older ones are outside every retention window downstream.
    max_event_age_days: int = 730
    max_event_bytes: int = 32 * 1024
    # Comma-separated; empty: any custom event name matching the documented pattern.
    custom_event_names: str = ""
    # How long a stored event id keeps catching resends (beyond the event log's own window).
    dedup_window_hours: float = 72.0
    # Dead letters carry personal data as it was sent: kept this long, then deleted.
    dead_letter_retention_days: int = 30
    # Events one StreamEvents call may have in flight before the server stops reading: a flood
    # slows the caller down instead of filling memory.
    max_in_flight_per_stream: int = 512
    # How long StreamEvents events wait for others to share their batch (the batch's database
    # round trips and its one fsync in the event log): fewer, larger batches under a paced load.
    stream_linger_ms: float = 20.0
    max_batch_size: int = 1000
    # The currency of a Segment call's amounts when the call names none (ISO 4217; empty: such
    # a call is rejected, as money without a currency).
    segment_default_currency: str = ""
    event_log: JetStreamSettings = field(default_factory=JetStreamSettings)
    # IDENTIFIER_HASH_KEYS: how erased identifiers are named (sendtime_common.identifiers).
    identifier_hasher: IdentifierHasher = field(default_factory=IdentifierHasher.unkeyed)
    # Who may call: key checks, mutual-TLS identities, reflection (sendtime_common.auth).
    auth: AuthSettings = field(default_factory=AuthSettings)
    # The HTTP listener for webhooks runs only when a provider's secret or key is set.
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Read settings from environment variables; unset ones keep their local defaults.

        Raises:
            sendtime_common.config.ConfigError: a variable has an unusable value.
        """
        defaults, webhook_defaults = cls(), WebhookSettings()
        return cls(
            address=env_str(env, "INGEST_ADDRESS", defaults.address),
            health_address=env.get("INGEST_HEALTH_ADDRESS", defaults.health_address).strip(),
            metrics_address=env.get("INGEST_METRICS_ADDRESS", defaults.metrics_address).strip(),
            http_address=env.get("INGEST_HTTP_ADDRESS", defaults.http_address).strip(),
            tls=TlsSettings.from_env(env),
            limits=CallLimits.from_env(env, INGEST_CALL_LIMITS),
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
            max_future_skew_s=env_float(env, "INGEST_MAX_FUTURE_SKEW_SECONDS", defaults.max_future_skew_s),
            max_event_age_days=env_int(
                env, "INGEST_MAX_EVENT_AGE_DAYS", defaults.max_event_age_days, minimum=1
            ),
            max_event_bytes=env_int(env, "INGEST_MAX_EVENT_BYTES", defaults.max_event_bytes, minimum=1024),
            custom_event_names=env_str(env, "INGEST_CUSTOM_EVENT_NAMES", defaults.custom_event_names),
            dedup_window_hours=env_float(
                env, "INGEST_DEDUP_WINDOW_HOURS", defaults.dedup_window_hours, minimum=1
            ),
            dead_letter_retention_days=env_int(
                env, "INGEST_DEAD_LETTER_RETENTION_DAYS", defaults.dead_letter_retention_days, minimum=1
            ),
            max_in_flight_per_stream=env_int(
                env, "INGEST_MAX_IN_FLIGHT_PER_STREAM", defaults.max_in_flight_per_stream, minimum=1
            ),
            stream_linger_ms=env_float(env, "INGEST_STREAM_LINGER_MS", defaults.stream_linger_ms),
            segment_default_currency=_currency(env, "INGEST_SEGMENT_DEFAULT_CURRENCY"),
            event_log=JetStreamSettings.from_env(env),
            identifier_hasher=hasher_from_env(env),
            auth=AuthSettings.from_env(env),
            webhooks=WebhookSettings(
                address=env_str(env, "INGEST_WEBHOOK_ADDRESS", webhook_defaults.address),
                shopify_secret=env_str(env, "SHOPIFY_WEBHOOK_SECRET", ""),
                sendgrid_public_key=env_str(env, "SENDGRID_WEBHOOK_PUBLIC_KEY", ""),
                max_body_bytes=env_int(
                    env, "INGEST_WEBHOOK_MAX_BODY_BYTES", webhook_defaults.max_body_bytes, minimum=1024
                ),
                signature_max_age_s=env_float(
                    env,
                    "INGEST_WEBHOOK_SIGNATURE_MAX_AGE_SECONDS",
                    webhook_defaults.signature_max_age_s,
                    minimum=1,
                ),
                shutdown_grace_s=env_float(env, "SHUTDOWN_GRACE_SECONDS", defaults.shutdown_grace_s),
            ),
        )


def _currency(env: Mapping[str, str], name: str) -> str:
    """An ISO 4217 currency code in use, or empty.

    Raises:
        sendtime_common.config.ConfigError: any other value.
    """
    code = env.get(name, "").strip().upper()
    if code and code not in CURRENCY_CODES:
        raise ConfigError(f"{name} must be an ISO 4217 currency code such as EUR or USD, got {code!r}")
    return code
