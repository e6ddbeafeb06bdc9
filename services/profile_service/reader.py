"""Profile reads: the Redis hot cache first, PostgreSQL for what it lacks.

A batch costs one MGET and, for the misses, one query; what the query finds is written back to
the cache. Concurrent reads that miss on the same identifier share one query (a send-time burst
for one customer must not become a burst of database reads). When Redis fails, reads go to
PostgreSQL and still succeed.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from cachetools import LRUCache

from profile_service.cache import CacheUnavailable, ProfileCache, cache_key
from profile_service.codec import as_of, as_of_until, micros
from profile_service.metrics import READ_FROM_DATABASE, READ_MISSING
from profile_service.repository import ProfileRepository
from sendtime.profile.v1 import profile_pb2
from sendtime_common.identifier_proto import IdentifierKey

log = logging.getLogger(__name__)

_Loaded = dict[IdentifierKey, profile_pb2.Profile]


class _ReadTimeCopies:
    """The read-time copy (``as_of``) last made of each profile the cache holds in process,
    with the span of read times it holds for, so that a hot profile read again and again (a
    send, a batch of renders) is not copied and recomputed on every read: ~5 µs a profile,
    half of what BatchGetProfiles spent per profile on a warm read.

    Keyed by the cached object itself (its ``id``, the object kept with the entry so the id
    cannot be reused while the entry lives): a profile changed in the cache is a new object.
    Bounded, least recently used first out. The copies are shared: callers must not modify
    what the reader returns (they copy it into their answers)."""

    def __init__(self, max_entries: int) -> None:
        # (the cached profile, from, until, its read-time copy) by the cached profile's id
        self._copies: LRUCache[int, tuple[profile_pb2.Profile, int, int, profile_pb2.Profile]] | None = (
            LRUCache(max_entries) if max_entries else None
        )

    def read_at(
        self, profile: profile_pb2.Profile, now_us: int, cart_abandoned_after: timedelta
    ) -> profile_pb2.Profile:
        if self._copies is None:
            return as_of_until(profile, now_us, cart_abandoned_after=cart_abandoned_after)[0]
        key = id(profile)
        kept = self._copies.get(key)
        if kept is not None and kept[0] is profile and kept[1] <= now_us < kept[2]:
            return kept[3]
        copy, until = as_of_until(profile, now_us, cart_abandoned_after=cart_abandoned_after)
        self._copies[key] = (profile, now_us, until, copy)
        return copy


class ProfileReader:
    def __init__(
        self,
        repository: ProfileRepository,
        cache: ProfileCache,
        *,
        cart_abandoned_after: timedelta = timedelta(hours=1),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        read_time_copies: int = 0,
    ) -> None:
        """``read_time_copies``: how many read-time copies of cached profiles to keep (the
        cache's copies in process: ``_ReadTimeCopies``); 0 keeps none."""
        self._repository = repository
        self._cache = cache
        self._cart_abandoned_after = cart_abandoned_after
        self._clock = clock
        self._in_flight: dict[IdentifierKey, asyncio.Future[profile_pb2.Profile | None]] = {}
        self._copies = _ReadTimeCopies(read_time_copies)

    async def get_many(self, identifiers: Sequence[IdentifierKey]) -> list[profile_pb2.Profile | None]:
        """The profile for each identifier, in order (None where no customer has it).

        Raises:
            asyncpg.PostgresError, OSError: PostgreSQL failed for a cache miss.
        """
        cache_ok = True
        try:
            cached = await self._cache.get_many([cache_key(kind, value) for kind, value in identifiers])
        except CacheUnavailable as exc:
            log.warning("cache unavailable, reading from PostgreSQL", extra={"error": str(exc)})
            cached, cache_ok = [None] * len(identifiers), False

        misses = list(dict.fromkeys(i for i, hit in zip(identifiers, cached, strict=True) if hit is None))
        loaded = await self._load(misses, refill_cache=cache_ok) if misses else {}
        if misses:
            from_database = sum(loaded.get(key) is not None for key in misses)
            READ_FROM_DATABASE.inc(from_database)
            READ_MISSING.inc(len(misses) - from_database)
        now_us = micros(self._clock())
        after = self._cart_abandoned_after

        # Fields that depend on the time of the read (abandoned cart, 30-day counts) are set for
        # this read's time, never cached with the profile; what the cache holds in process keeps
        # its read-time copy while that copy holds (``_ReadTimeCopies``).
        def at_read_time(key: IdentifierKey, hit: profile_pb2.Profile | None) -> profile_pb2.Profile | None:
            if hit is not None:
                return self._copies.read_at(hit, now_us, after)
            record = loaded.get(key)
            return None if record is None else as_of_until(record, now_us, cart_abandoned_after=after)[0]

        return [at_read_time(key, hit) for key, hit in zip(identifiers, cached, strict=True)]

    async def get_by_customer_id(self, customer_id: uuid.UUID) -> profile_pb2.Profile | None:
        """The profile of ``customer_id``, from PostgreSQL (the cache is keyed by identifier:
        send-time reads name a customer by an identifier).

        Raises:
            asyncpg.PostgresError, OSError: PostgreSQL failed.
        """
        record = await self._repository.find_by_customer_id(customer_id)
        if record is None:
            return None
        return as_of(record.to_proto(), self._clock(), cart_abandoned_after=self._cart_abandoned_after)

    async def get_by_customer_ids(
        self, customer_ids: Sequence[uuid.UUID]
    ) -> list[profile_pb2.Profile | None]:
        """The profile of each customer id, in order (None where no customer has it), in one
        query (as ``get_by_customer_id``, from PostgreSQL).

        Raises:
            asyncpg.PostgresError, OSError: PostgreSQL failed.
        """
        found = await self._repository.find_by_customer_ids(list(dict.fromkeys(customer_ids)))
        now = self._clock()
        return [
            None
            if (record := found.get(c)) is None
            else as_of(record.to_proto(), now, cart_abandoned_after=self._cart_abandoned_after)
            for c in customer_ids
        ]

    async def _load(self, keys: list[IdentifierKey], *, refill_cache: bool) -> _Loaded:
        """Read ``keys`` from PostgreSQL, joining reads of the same keys already under way."""
        joined = {key: self._in_flight[key] for key in keys if key in self._in_flight}
        mine = [key for key in keys if key not in joined]
        loop = asyncio.get_running_loop()
        promised: dict[IdentifierKey, asyncio.Future[profile_pb2.Profile | None]] = {
            key: loop.create_future() for key in mine
        }
        self._in_flight.update(promised)
        loaded: _Loaded = {}
        try:
            if mine:
                found = await self._repository.find_by_identifiers(mine)
                loaded = {key: record.to_proto() for key, record in found.items()}
            for key, future in promised.items():
                future.set_result(loaded.get(key))
        except asyncio.CancelledError:
            for future in promised.values():
                future.cancel()  # those who joined read for themselves (below)
            raise
        except Exception as exc:
            for future in promised.values():
                future.set_exception(exc)
                future.exception()  # retrieved here: a read nobody joined must not log a warning
            raise
        finally:
            for key in mine:
                del self._in_flight[key]
        if loaded and refill_cache:
            try:
                await self._cache.put(loaded.values())
            except CacheUnavailable as exc:
                log.warning("cache refresh failed", extra={"error": str(exc)})
        for key, future in joined.items():
            try:
                # shield: one caller giving up must not cancel the read the others wait for
                profile = await asyncio.shield(future)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                profile = (await self._load([key], refill_cache=refill_cache)).get(key)  # its reader left
            if profile is not None:
                loaded[key] = profile
        return loaded
