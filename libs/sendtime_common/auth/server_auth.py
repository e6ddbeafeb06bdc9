"""What every service sets up to check its callers: the key tables (migrated), the key ring that
follows them, the audit trail, the rate limiter, and the interceptor built from the access rules
of the services it hosts."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import asyncpg

from sendtime_common.auth.access import AccessInterceptor, Authenticator, access_rules, parse_mtls_identities
from sendtime_common.auth.api_keys import Scope
from sendtime_common.auth.audit import AuditTrail
from sendtime_common.auth.key_store import KeyStore
from sendtime_common.auth.keyring import KeyRing
from sendtime_common.config import ConfigError, env_bool, env_float, env_str
from sendtime_common.identifiers import IdentifierHasher
from sendtime_common.rate_limit import RateLimiter, RateLimitSettings
from sendtime_common.shutdown import bounded, finish_or_cancel


@dataclass(frozen=True, slots=True)
class AuthSettings:
    # How often a replica looks for key changes (a revoked key stops working within this, plus
    # the time a call takes).
    keys_refresh_s: float = 1.0
    # Let reflection answer without credentials (grpcurl then needs no key to list services).
    reflection_open: bool = False
    # Client-certificate identities (subject alternative names) and their scopes, honoured on a
    # port that verifies client certificates (mutual TLS).
    mtls_identities: Mapping[str, frozenset[Scope]] = field(default_factory=dict)
    # How often each credential may call, per scope (sendtime_common.rate_limit).
    rate_limits: RateLimitSettings = field(default_factory=RateLimitSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AuthSettings:
        """AUTH_KEYS_REFRESH_SECONDS, AUTH_REFLECTION_OPEN, AUTH_MTLS_IDENTITIES and the
        RATE_LIMIT* variables (RateLimitSettings.from_env).

        Raises:
            ConfigError: a variable has an unusable value.
        """
        defaults = cls()
        try:
            identities = parse_mtls_identities(env_str(env, "AUTH_MTLS_IDENTITIES", ""))
        except ValueError as exc:
            raise ConfigError(f"AUTH_MTLS_IDENTITIES: {exc}") from None
        return cls(
            keys_refresh_s=env_float(env, "AUTH_KEYS_REFRESH_SECONDS", defaults.keys_refresh_s, minimum=0.05),
            reflection_open=env_bool(env, "AUTH_REFLECTION_OPEN", defaults.reflection_open),
            mtls_identities=identities,
            rate_limits=RateLimitSettings.from_env(env),
        )


@dataclass(slots=True)
class ServerAuth:
    keys: KeyStore
    keyring: KeyRing
    audit: AuditTrail
    interceptor: AccessInterceptor
    limiter: RateLimiter | None = None  # None: rate limits off
    _following: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Follow key changes (and record keys' last use) in the background."""
        self._following = asyncio.create_task(self.keyring.run(), name="key-ring")
        if self.limiter is not None:
            self.limiter.start()

    async def close(self) -> None:
        """Stop following, writing the last uses first (within FINISH_S), and close the
        limiter's connections (within RELEASE_S), side by side."""
        self.keyring.stop()
        await asyncio.gather(
            finish_or_cancel("key ring", [self._following]),
            bounded("rate limiter", self.limiter.close()) if self.limiter is not None else asyncio.sleep(0),
        )


async def create_server_auth(
    pool: asyncpg.Pool,
    service: str,
    service_names: Iterable[str],
    settings: AuthSettings,
    hasher: IdentifierHasher,
    redis_url: str = "",
) -> ServerAuth:
    """Migrate the key and audit tables, load the keys, and build the interceptor for the
    services ``service_names`` (every method of which must declare an access rule). Rate limits
    are shared in the Redis at ``settings.rate_limits.redis_url``, else at ``redis_url`` (the
    service's own); with neither, they are kept per replica.

    Raises:
        sendtime_common.auth.access.MissingAccessRule: a method declares no access rule.
        OSError, asyncpg.PostgresError: the database failed.
    """
    rules = access_rules(service_names)
    keys = KeyStore(pool)
    await keys.migrate()
    keyring = KeyRing(keys, refresh_s=settings.keys_refresh_s)
    await keyring.load()
    audit = AuditTrail(pool, service)
    limits = settings.rate_limits
    limiter = RateLimiter(limits, service, limits.redis_url or redis_url) if limits.enabled else None
    interceptor = AccessInterceptor(
        rules,
        Authenticator(keyring, settings.mtls_identities),
        audit,
        hasher,
        reflection_open=settings.reflection_open,
        limiter=limiter,
    )
    return ServerAuth(keys, keyring, audit, interceptor, limiter)
