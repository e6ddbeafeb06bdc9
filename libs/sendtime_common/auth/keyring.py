"""The keys a replica accepts, held in memory so that checking a key costs no database read.

Every ``refresh_s`` (1 s by default) the ring reads a one-row generation number that every key
change bumps in its own transaction, and reloads the keys when it moved: a key revoked on any
replica, or by ``sendtime keys``, stops working everywhere within about a second. Expiry needs
no reload (each check compares the time). A well-formed key the ring does not know makes it look
again (at most every ``miss_refresh_s``, 0.25 s), so a key made a moment ago works everywhere
right away, while a flood of made-up keys costs at most that one small read per interval.

A key that passed the full check (checksum, stored hash) is remembered as presented until the
keys are next reloaded, so a caller's following calls cost a dictionary lookup rather than the
checksum and a SHA-256 (~15 µs a call in a loaded server); revocation and expiry are still
checked on every call.

When PostgreSQL cannot be reached the ring keeps the keys it has: calls go on, and a revocation
is seen once the database is back.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sendtime_common.auth.api_keys import MalformedKey, Scope, key_id_of, key_resource_name, matches
from sendtime_common.auth.key_store import KeyEntry, KeyStore
from sendtime_common.database import STORE_ERRORS
from sendtime_common.errors import log_unexpected, new_error_id
from sendtime_common.rate_limit import Rate

log = logging.getLogger(__name__)


class AuthFailure(enum.StrEnum):
    """Why a call was not authenticated: the ``ErrorInfo.reason`` callers get."""

    MISSING = "CREDENTIALS_MISSING"
    MALFORMED = "API_KEY_MALFORMED"
    UNKNOWN = "API_KEY_UNKNOWN"
    EXPIRED = "API_KEY_EXPIRED"
    REVOKED = "API_KEY_REVOKED"


class Unauthenticated(Exception):
    """The call's credentials are missing or not good; ``reason`` says which."""

    def __init__(self, reason: AuthFailure, message: str, key_id: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.key_id = key_id


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, and what they may do. ``name`` is what the audit trail and logs keep:
    ``apiKeys/{key_id}``, ``mtls:{identity}`` or ``cli:{user}``. ``rate_limits``: the key's own
    rate per scope, in place of the scope's default."""

    name: str
    scopes: frozenset[Scope]
    key_id: str = ""
    rate_limits: Mapping[Scope, Rate] = field(default_factory=dict, hash=False)


def _now() -> datetime:
    return datetime.now(UTC)


class KeyRing:
    def __init__(
        self,
        store: KeyStore,
        *,
        refresh_s: float = 1.0,
        miss_refresh_s: float = 0.25,
        use_flush_s: float = 30.0,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self._store = store
        self._refresh_s = refresh_s
        self._miss_refresh_s = miss_refresh_s
        self._use_flush_s = use_flush_s
        self._clock = clock
        self._entries: dict[str, tuple[KeyEntry, Principal]] = {}
        # Keys as presented that matched one of ``_entries``; at most one per entry.
        self._verified: dict[str, tuple[KeyEntry, Principal]] = {}
        self._generation: int | None = None
        self._last_miss_refresh = float("-inf")
        self._last_refresh_started = float("-inf")
        self._refreshing: asyncio.Future[None] | None = None
        self._uses: dict[str, datetime] = {}
        self._stopped = asyncio.Event()

    async def load(self) -> None:
        """Read the keys (at start).

        Raises:
            OSError, asyncpg.PostgresError: the database cannot be read.
        """
        await self._reload()

    async def run(self) -> None:
        """Follow key changes and record keys' last use until ``stop``."""
        next_flush = time.monotonic() + self._use_flush_s
        while not self._stopped.is_set():
            try:
                await asyncio.wait_for(self._stopped.wait(), self._refresh_s)
            except TimeoutError:
                pass
            try:
                await self.refresh()
                if time.monotonic() >= next_flush or self._stopped.is_set():
                    next_flush = time.monotonic() + self._use_flush_s
                    await self.flush_uses()
            except STORE_ERRORS as exc:
                log.warning(
                    "could not refresh the API keys; keeping the ones held", extra={"error": str(exc)}
                )
            except Exception as exc:  # noqa: BLE001 - a bug must not end the refreshes for good
                log_unexpected(log, "refreshing the API keys failed", exc, {"error_id": new_error_id()})

    def stop(self) -> None:
        self._stopped.set()

    async def refresh(self) -> None:
        """Reload the keys if any changed since the last load."""
        self._last_refresh_started = time.monotonic()
        if await self._store.generation() != self._generation:
            await self._reload()

    async def _reload(self) -> None:
        generation, entries = await self._store.entries(self._clock())
        self._entries = {
            entry.key_id: (
                entry,
                Principal(key_resource_name(entry.key_id), entry.scopes, entry.key_id, entry.rate_limits),
            )
            for entry in entries
        }
        self._verified = {}
        self._generation = generation

    async def flush_uses(self) -> None:
        """Write the keys' last use (kept in memory between flushes)."""
        uses, self._uses = self._uses, {}
        try:
            await self._store.record_use(uses)
        except BaseException:
            for key_id, at in uses.items():  # try again next time
                self._uses[key_id] = max(at, self._uses.get(key_id, at))
            raise

    async def verify(self, key: str) -> Principal:
        """The principal ``key`` stands for.

        Raises:
            Unauthenticated: the key is malformed, unknown, revoked or expired.
        """
        found = self._verified.get(key)
        if found is None:
            found = await self._match(key)
            self._verified[key] = found
        entry, principal = found
        key_id = entry.key_id
        now = self._clock()
        if entry.revoked_at is not None and entry.revoked_at <= now:
            raise Unauthenticated(AuthFailure.REVOKED, "the API key was revoked", key_id)
        if entry.expires_at is not None and entry.expires_at <= now:
            raise Unauthenticated(AuthFailure.EXPIRED, "the API key has expired", key_id)
        self._uses[key_id] = now
        return principal

    async def _match(self, key: str) -> tuple[KeyEntry, Principal]:
        """The entry whose stored hash ``key`` matches, looking for new keys if none has its id.

        Raises:
            Unauthenticated: the key is malformed or unknown.
        """
        try:
            key_id = key_id_of(key)
        except MalformedKey as exc:
            raise Unauthenticated(AuthFailure.MALFORMED, f"the API key {exc}") from None
        found = self._entries.get(key_id)
        if found is None:
            await self._refresh_for_miss()
            found = self._entries.get(key_id)
        if found is None or not matches(key, found[0].secret_hash):
            raise Unauthenticated(AuthFailure.UNKNOWN, "the API key is not known")
        return found

    async def _refresh_for_miss(self) -> None:
        """Wait for a look at the keys that starts after this call: at most one per
        ``miss_refresh_s``, shared by every caller that missed meanwhile."""
        asked = time.monotonic()
        while self._last_refresh_started < asked:
            if self._refreshing is None:
                delay = self._last_miss_refresh + self._miss_refresh_s - time.monotonic()
                self._refreshing = asyncio.ensure_future(self._refresh_after(max(0.0, delay)))
                self._refreshing.add_done_callback(self._refreshed)
            await asyncio.shield(self._refreshing)

    def _refreshed(self, _: asyncio.Future[None]) -> None:
        self._refreshing = None

    async def _refresh_after(self, delay_s: float) -> None:
        if delay_s:
            await asyncio.sleep(delay_s)
        self._last_miss_refresh = time.monotonic()
        try:
            await self.refresh()
        except STORE_ERRORS as exc:
            log.warning("could not look for new API keys", extra={"error": str(exc)})
