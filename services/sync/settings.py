"""Typed configuration of the sync service."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from sendtime_common.auth.server_auth import AuthSettings
from sendtime_common.call_limits import MIB, CallLimits
from sendtime_common.config import env_float, env_int, env_str, secret_from_env
from sendtime_common.event_log import JetStreamSettings
from sendtime_common.identifiers import IdentifierHasher, hasher_from_env
from sendtime_common.readiness import ReadinessSettings
from sendtime_common.tls import ClientTls, TlsSettings
from sync.connectors import ConnectorConfig, load_connectors

# Requests name a connector; an answer is a page of at most 100 statuses.
SYNC_CALL_LIMITS = CallLimits(max_receive_bytes=64 * 1024, max_send_bytes=4 * MIB)


@dataclass(frozen=True, slots=True)
class Settings:
    address: str = "[::]:50055"
    # Health only, plaintext, for kubelet's gRPC probes (which cannot speak TLS); empty: none.
    health_address: str = "[::]:50065"
    # Prometheus metrics (GET /metrics); empty: none.
    metrics_address: str = "[::]:9465"
    # The HTTP/JSON face (the contract's google.api.http routes; docs/http.md); empty: none.
    http_address: str = "[::]:8085"
    tls: TlsSettings = field(default_factory=TlsSettings)
    limits: CallLimits = SYNC_CALL_LIMITS
    log_level: str = "INFO"
    otlp_endpoint: str = ""
    shutdown_grace_s: float = 10.0
    readiness: ReadinessSettings = field(default_factory=ReadinessSettings)
    database_url: str = "postgresql://postgres@127.0.0.1:5432/sendtime"
    database_pool_size: int = 10
    # Ingest, where pulled records go as events, with a key holding only events.write.
    ingest_target: str = "127.0.0.1:50051"
    ingest_api_key: str = ""
    ingest_tls: ClientTls = field(default_factory=ClientTls)
    ingest_deadline_s: float = 10.0
    # The profile service, read by push connectors, with a key holding only profiles.read.
    profile_target: str = "127.0.0.1:50052"
    profile_api_key: str = ""
    profile_tls: ClientTls = field(default_factory=ClientTls)
    profile_deadline_s: float = 5.0
    # SYNC_CONNECTORS_FILE: the connectors (sync.connectors); none: the service only reports.
    connectors: tuple[ConnectorConfig, ...] = ()
    # How often a replica looks for a connector that is due (RunConnector wakes its own at once).
    poll_interval_s: float = 1.0
    event_log: JetStreamSettings = field(default_factory=JetStreamSettings)
    redis_url: str = "redis://127.0.0.1:6379/0"
    identifier_hasher: IdentifierHasher = field(default_factory=IdentifierHasher.unkeyed)
    auth: AuthSettings = field(default_factory=AuthSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Read settings from environment variables; unset ones keep their local defaults.

        Raises:
            sendtime_common.config.ConfigError: a variable has an unusable value, or a connector
                is not usable (sync.connectors.parse_connectors names its field).
        """
        defaults = cls()
        return cls(
            address=env_str(env, "SYNC_ADDRESS", defaults.address),
            health_address=env.get("SYNC_HEALTH_ADDRESS", defaults.health_address).strip(),
            metrics_address=env.get("SYNC_METRICS_ADDRESS", defaults.metrics_address).strip(),
            http_address=env.get("SYNC_HTTP_ADDRESS", defaults.http_address).strip(),
            tls=TlsSettings.from_env(env),
            limits=CallLimits.from_env(env, SYNC_CALL_LIMITS),
            log_level=env_str(env, "LOG_LEVEL", defaults.log_level),
            otlp_endpoint=env_str(env, "OTEL_EXPORTER_OTLP_ENDPOINT", ""),
            shutdown_grace_s=env_float(env, "SHUTDOWN_GRACE_SECONDS", defaults.shutdown_grace_s),
            readiness=ReadinessSettings.from_env(env),
            database_url=env_str(env, "DATABASE_URL", defaults.database_url),
            database_pool_size=env_int(env, "DATABASE_POOL_SIZE", defaults.database_pool_size, minimum=3),
            ingest_target=env_str(env, "INGEST_SERVICE_TARGET", defaults.ingest_target),
            ingest_api_key=secret_from_env(env, "INGEST_SERVICE_API_KEY"),
            ingest_tls=ClientTls.from_env(env, "INGEST_SERVICE"),
            ingest_deadline_s=env_float(
                env, "SYNC_INGEST_DEADLINE_SECONDS", defaults.ingest_deadline_s, minimum=0.1
            ),
            profile_target=env_str(env, "PROFILE_SERVICE_TARGET", defaults.profile_target),
            profile_api_key=secret_from_env(env, "PROFILE_SERVICE_API_KEY"),
            profile_tls=ClientTls.from_env(env, "PROFILE_SERVICE"),
            profile_deadline_s=env_float(
                env, "SYNC_PROFILE_DEADLINE_SECONDS", defaults.profile_deadline_s, minimum=0.1
            ),
            connectors=tuple(load_connectors(env)),
            poll_interval_s=env_float(env, "SYNC_POLL_SECONDS", defaults.poll_interval_s, minimum=0.05),
            event_log=JetStreamSettings.from_env(env),
            redis_url=env_str(env, "REDIS_URL", defaults.redis_url),
            identifier_hasher=hasher_from_env(env),
            auth=AuthSettings.from_env(env),
        )
