"""API keys in PostgreSQL (``api_keys``): made, listed, rotated and revoked by KeyService and
``sendtime keys``, read by every replica's key ring."""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import asyncpg

from sendtime_common.auth.api_keys import MalformedKey, Scope, key_id_of, matches, new_key
from sendtime_common.migrate import migrate
from sendtime_common.rate_limit import Rate

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
MIGRATIONS_TABLE = "auth_schema_migrations"
# Ended keys the ring still knows, so that a caller hears "revoked" or "expired" rather than
# "unknown" for a while after.
ENDED_KEYS_KEPT = timedelta(days=7)


class KeyState(enum.StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """A key's record; never the key."""

    key_id: str
    display_name: str
    scopes: frozenset[Scope]
    creator: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    rotated_from: str | None
    # Its own rate per scope, in place of the scope's default (at most one per scope it holds).
    rate_limits: Mapping[Scope, Rate] = field(default_factory=dict, hash=False)

    def state(self, now: datetime) -> KeyState:
        if self.revoked_at is not None and self.revoked_at <= now:
            return KeyState.REVOKED
        if self.expires_at is not None and self.expires_at <= now:
            return KeyState.EXPIRED
        return KeyState.ACTIVE


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """What a replica keeps in memory to check a key without a database read."""

    key_id: str
    secret_hash: bytes
    scopes: frozenset[Scope]
    expires_at: datetime | None
    revoked_at: datetime | None
    rate_limits: Mapping[Scope, Rate] = field(default_factory=dict, hash=False)


class KeyNotFound(LookupError):
    """No key has that id."""


class KeyNotActive(ValueError):
    """The key is revoked or expired (it cannot be rotated)."""


def _scopes(names: Iterable[str]) -> frozenset[Scope]:
    # A scope name this version does not know (written by a newer one) grants nothing here.
    return frozenset(Scope(name) for name in names if name in Scope._value2member_map_)


def _rate_limits(stored: str) -> dict[Scope, Rate]:
    """A key's rate limits as stored (jsonb); a scope this version does not know is left out."""
    limits = {}
    for name, rate in json.loads(stored).items():
        if name in Scope._value2member_map_:
            limits[Scope(name)] = Rate(float(rate["per_second"]), int(rate["burst"]))
    return limits


def _stored(limits: Mapping[Scope, Rate]) -> str:
    return json.dumps(
        {scope.value: {"per_second": rate.per_second, "burst": rate.burst} for scope, rate in limits.items()}
    )


def _record(row: asyncpg.Record) -> ApiKeyRecord:
    return ApiKeyRecord(
        key_id=row["key_id"],
        display_name=row["display_name"],
        scopes=_scopes(row["scopes"]),
        creator=row["creator"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        last_used_at=row["last_used_at"],
        rotated_from=row["rotated_from"],
        rate_limits=_rate_limits(row["rate_limits"]),
    )


_COLUMNS = (
    "key_id, display_name, scopes, creator, created_at, expires_at, revoked_at, last_used_at, rotated_from,"
    " rate_limits::text AS rate_limits"  # as text: some pools decode jsonb, some do not
)
_BUMP_GENERATION = "UPDATE api_key_generation SET generation = generation + 1"


class KeyStore:
    """Every method may raise OSError or asyncpg.PostgresError when the database fails."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def migrate(self) -> None:
        """Create the key and audit tables where they are missing."""
        await migrate(self._pool, MIGRATIONS_DIR, table=MIGRATIONS_TABLE)

    async def create(
        self,
        display_name: str,
        scopes: Iterable[Scope],
        creator: str,
        expires_at: datetime | None = None,
        rate_limits: Mapping[Scope, Rate] | None = None,
    ) -> tuple[ApiKeyRecord, str]:
        """Make a key; its record and the key itself (to be shown once, never stored)."""
        async with self._pool.acquire() as conn, conn.transaction():
            return await self._insert(
                conn, display_name, scopes, creator, expires_at, None, rate_limits or {}
            )

    async def _insert(
        self,
        conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
        display_name: str,
        scopes: Iterable[Scope],
        creator: str,
        expires_at: datetime | None,
        rotated_from: str | None,
        rate_limits: Mapping[Scope, Rate],
    ) -> tuple[ApiKeyRecord, str]:
        issued = new_key()
        row = await conn.fetchrow(
            "INSERT INTO api_keys (key_id, secret_hash, display_name, scopes, creator, expires_at,"
            " rotated_from, rate_limits) VALUES ($1, $2, $3, $4, $5, $6, $7, $8::text::jsonb)"
            f" RETURNING {_COLUMNS}",
            issued.key_id,
            issued.secret_hash,
            display_name,
            sorted(scope.value for scope in scopes),
            creator,
            expires_at,
            rotated_from,
            _stored(rate_limits),
        )
        await conn.execute(_BUMP_GENERATION)
        assert row is not None
        return _record(row), issued.key

    async def find(self, key: str) -> ApiKeyRecord | None:
        """The record of ``key`` itself (one database read; services use the key ring instead);
        None when it is malformed or not a key of this database."""
        try:
            key_id = key_id_of(key)
        except MalformedKey:
            return None
        row = await self._pool.fetchrow(
            f"SELECT secret_hash, {_COLUMNS} FROM api_keys WHERE key_id = $1", key_id
        )
        return None if row is None or not matches(key, bytes(row["secret_hash"])) else _record(row)

    async def get(self, key_id: str) -> ApiKeyRecord | None:
        row = await self._pool.fetchrow(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = $1", key_id)
        return None if row is None else _record(row)

    async def page(
        self,
        limit: int,
        after: tuple[datetime, str] | None,
        *,
        include_inactive: bool,
        now: datetime,
    ) -> list[ApiKeyRecord]:
        """Up to ``limit`` records, newest first, after the (created_at, key_id) ``after``."""
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM api_keys"
            " WHERE ($1::timestamptz IS NULL OR (created_at, key_id) < ($1, $2))"
            "   AND ($3 OR coalesce(least(revoked_at, expires_at), 'infinity') > $4)"
            " ORDER BY created_at DESC, key_id DESC LIMIT $5",
            after[0] if after else None,
            after[1] if after else "",
            include_inactive,
            now,
            limit,
        )
        return [_record(row) for row in rows]

    async def rotate(
        self, key_id: str, grace: timedelta, creator: str, now: datetime
    ) -> tuple[ApiKeyRecord, str, ApiKeyRecord]:
        """A new key with the old one's name, scopes, rate limits and expiry; the old one ends
        ``grace`` from now (revoked at once for no grace). (new record, new key, old record).

        Raises:
            KeyNotFound: no such key.
            KeyNotActive: it is revoked or expired already.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = $1 FOR UPDATE", key_id)
            if row is None:
                raise KeyNotFound(key_id)
            old = _record(row)
            if old.state(now) is not KeyState.ACTIVE:
                raise KeyNotActive(f"the key is {old.state(now).value}")
            new, key = await self._insert(
                conn, old.display_name, old.scopes, creator, old.expires_at, key_id, old.rate_limits
            )
            if grace > timedelta(0):
                ends = now + grace
                row = await conn.fetchrow(
                    f"UPDATE api_keys SET expires_at = least(expires_at, $2) WHERE key_id = $1"
                    f" RETURNING {_COLUMNS}",
                    key_id,
                    ends,
                )
            else:
                row = await conn.fetchrow(
                    f"UPDATE api_keys SET revoked_at = $2 WHERE key_id = $1 RETURNING {_COLUMNS}", key_id, now
                )
            assert row is not None
            return new, key, _record(row)

    async def revoke(self, key_id: str, now: datetime) -> ApiKeyRecord:
        """Revoke a key now; one revoked already keeps its first revocation time.

        Raises:
            KeyNotFound: no such key.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"UPDATE api_keys SET revoked_at = coalesce(revoked_at, $2) WHERE key_id = $1"
                f" RETURNING {_COLUMNS}",
                key_id,
                now,
            )
            if row is None:
                raise KeyNotFound(key_id)
            await conn.execute(_BUMP_GENERATION)
        return _record(row)

    async def set_rate_limits(self, key_id: str, rate_limits: Mapping[Scope, Rate]) -> ApiKeyRecord:
        """Replace a key's own rate limits (empty: its scopes' defaults again); every replica
        reloads the keys.

        Raises:
            KeyNotFound: no such key.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"UPDATE api_keys SET rate_limits = $2::text::jsonb WHERE key_id = $1 RETURNING {_COLUMNS}",
                key_id,
                _stored(rate_limits),
            )
            if row is None:
                raise KeyNotFound(key_id)
            await conn.execute(_BUMP_GENERATION)
        return _record(row)

    async def generation(self) -> int:
        """A number that changes whenever a key is made, rotated or revoked."""
        value: int = await self._pool.fetchval("SELECT generation FROM api_key_generation")
        return value

    async def entries(self, now: datetime) -> tuple[int, list[KeyEntry]]:
        """The generation and the keys a replica must know: active ones, and ones that ended
        within ENDED_KEYS_KEPT. One snapshot, so the two agree."""
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            generation = await conn.fetchval("SELECT generation FROM api_key_generation")
            rows = await conn.fetch(
                "SELECT key_id, secret_hash, scopes, expires_at, revoked_at, rate_limits::text AS rate_limits"
                " FROM api_keys"
                " WHERE coalesce(least(revoked_at, expires_at), 'infinity') > $1",
                now - ENDED_KEYS_KEPT,
            )
        return generation, [
            KeyEntry(
                key_id=row["key_id"],
                secret_hash=bytes(row["secret_hash"]),
                scopes=_scopes(row["scopes"]),
                expires_at=row["expires_at"],
                revoked_at=row["revoked_at"],
                rate_limits=_rate_limits(row["rate_limits"]),
            )
            for row in rows
        ]

    async def record_use(self, uses: Mapping[str, datetime]) -> None:
        """Move keys' last use forward (never back)."""
        if not uses:
            return
        ids: Sequence[str] = list(uses)
        await self._pool.execute(
            "UPDATE api_keys AS k SET last_used_at = greatest(k.last_used_at, u.at)"
            " FROM unnest($1::text[], $2::timestamptz[]) AS u (id, at) WHERE k.key_id = u.id",
            ids,
            [uses[key_id] for key_id in ids],
        )
