"""Profiles kept in process, in front of the Redis hot cache, dropped when Redis says they changed.

A hit served from process memory costs no Redis round trip, which is most of a cache hit's time
(docs/benchmarks-profile-render.md). What makes the copies safe to serve is Redis's own
client-side-caching protocol: the ``InvalidationListener`` holds a connection that asked Redis
for invalidations of every key under the cache's prefix (``CLIENT TRACKING ... BCAST``), so
whichever replica, CLI or operator changes an entry, every replica drops its copy.

- Copies are served only while that connection is known to be up. When it fails, every copy is
  dropped and none is kept until tracking is back on, since invalidations sent meanwhile are lost.
- A read under way when its key is invalidated must not keep what it read (it may be the value
  from before the write): reads reserve their keys first, and an invalidation cancels the
  reservation. This is the race Redis's client-side-caching guide describes.
- A copy outlives a write to its entry by the time the invalidation takes to arrive (well under
  a millisecond next to Redis), or, should the connection die without a word, by the health
  check's two intervals at most; and never by more than the TTL.

The server's own writes drop its copies at once (``ProfileCache`` does that), so a replica reads
its own writes.

What else the process keeps of a profile (the HTTP answers encoded from it,
sendtime_common.answer_memo) can follow the copies: ``holds(customer_id)`` says whether a copy of
the customer is linked here, ``on_dropped`` hears the customer id of every copy that leaves (an
invalidation of its key, whether or not the copy had expired meanwhile; the bound; its age) and
``on_cleared`` that every copy was dropped. What is kept only while ``holds`` and dropped on
``on_dropped`` leaves when the copies do: an erasure, by any replica, invalidates every key of
the person.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from cachetools import TTLCache
from redis.asyncio.connection import AbstractConnection, ConnectionPool

from sendtime.profile.v1 import profile_pb2

log = logging.getLogger(__name__)

_INVALIDATIONS = "__redis__:invalidate"


class _Copies(TTLCache[str, profile_pb2.Profile]):
    """A TTLCache that says which keys it drops by itself (the bound, their age)."""

    def __init__(
        self, maxsize: int, ttl: float, timer: Callable[[], float], evicted: Callable[[str], None]
    ) -> None:
        super().__init__(maxsize, ttl, timer=timer)
        self._evicted = evicted

    def popitem(self) -> tuple[str, profile_pb2.Profile]:
        key, value = super().popitem()
        self._evicted(key)
        return key, value

    def expire(self, time: Any = None) -> list[tuple[str, profile_pb2.Profile]]:
        expired: list[tuple[str, profile_pb2.Profile]] = list(super().expire(time))
        for key, _ in expired:
            self._evicted(key)
        return expired


class NearCache:
    """Decoded profiles by cache key, bounded in number and age. Pure bookkeeping: the
    ``InvalidationListener`` drives it from Redis."""

    def __init__(
        self,
        max_entries: int,
        ttl_s: float,
        *,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError("a near cache needs room for at least one entry")
        self._entries: TTLCache[str, profile_pb2.Profile] = _Copies(max_entries, ttl_s, timer, self._unlink)
        # Whose copy each key holds, until it is invalidated or leaves: kept apart from the
        # copies, so that an invalidation names the customer of a copy that expired unseen.
        self._customer_of: dict[str, str] = {}
        self._keys_of: dict[str, set[str]] = {}
        self._reserved: dict[str, set[Reservation]] = {}
        self._tracking = False
        self._on_dropped: Callable[[str], None] = lambda customer_id: None
        self._on_cleared: Callable[[], None] = lambda: None

    def follow(self, on_dropped: Callable[[str], None], on_cleared: Callable[[], None]) -> None:
        """Tell ``on_dropped(customer_id)`` whenever a copy of that customer's profile leaves
        (invalidated, bounded out or expired), and ``on_cleared()`` when every copy was dropped
        (tracking started or stopped, Redis flushed)."""
        self._on_dropped = on_dropped
        self._on_cleared = on_cleared

    @property
    def tracking(self) -> bool:
        """Whether invalidations reach this cache, so it keeps and serves copies."""
        return self._tracking

    def __len__(self) -> int:
        return len(self._entries)

    def start_tracking(self) -> None:
        """Invalidations flow from now on; what was kept before may have missed some."""
        self._drop_all()
        self._tracking = True

    def stop_tracking(self) -> None:
        """Invalidations may be lost from now on: drop everything, keep nothing."""
        self._tracking = False
        self._drop_all()

    def holds(self, customer_id: str) -> bool:
        """Whether a copy of the customer is linked here: an invalidation of its key will say
        so through ``on_dropped``."""
        return customer_id in self._keys_of

    def get(self, key: str) -> profile_pb2.Profile | None:
        """The copy for ``key``; the caller must not modify it."""
        return self._entries.get(key)

    def reserve(self, keys: Iterable[str]) -> Reservation:
        """Reserve ``keys`` before reading them from Redis: only keys not invalidated since can be
        filled from what the read returns."""
        reservation = Reservation(self, set(keys) if self._tracking else set())
        for key in reservation.keys:
            self._reserved.setdefault(key, set()).add(reservation)
        return reservation

    def invalidate(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._entries.pop(key, None)
            self._unlink(key)
            for reservation in self._reserved.pop(key, ()):
                reservation.keys.discard(key)

    def invalidate_all(self) -> None:
        """Redis flushed its keys (or may have)."""
        self._drop_all()

    def _drop_all(self) -> None:
        self._entries.clear()
        self._customer_of.clear()
        self._keys_of.clear()
        self._on_cleared()
        for reservations in self._reserved.values():
            for reservation in reservations:
                reservation.keys.clear()
        self._reserved.clear()

    def _fill(self, key: str, profile: profile_pb2.Profile) -> None:
        customer_id = profile.customer_id
        if self._customer_of.get(key) != customer_id:
            self._unlink(key)  # another customer's copy under this key leaves
        self._entries[key] = profile
        self._customer_of[key] = customer_id
        self._keys_of.setdefault(customer_id, set()).add(key)

    def _unlink(self, key: str) -> None:
        customer_id = self._customer_of.pop(key, None)
        if customer_id is None:
            return
        keys = self._keys_of.get(customer_id)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._keys_of[customer_id]
        self._on_dropped(customer_id)

    def _release(self, reservation: Reservation) -> None:
        for key in reservation.keys:
            reservations = self._reserved.get(key)
            if reservations is not None:
                reservations.discard(reservation)
                if not reservations:
                    del self._reserved[key]
        reservation.keys.clear()


class Reservation:
    """Keys reserved by one read; use as a context manager, so it is released."""

    __slots__ = ("_cache", "keys")

    def __init__(self, cache: NearCache, keys: set[str]) -> None:
        self._cache = cache
        self.keys = keys  # those not invalidated since the reservation

    def fill(self, key: str, profile: profile_pb2.Profile) -> None:
        """Keep ``profile``, read for ``key``, unless ``key`` changed since it was reserved."""
        if key in self.keys:
            self._cache._fill(key, profile)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self._cache._release(self)


class InvalidationListener:
    """Keeps a ``NearCache`` told of every change to the keys under ``prefix``, over a Redis
    connection of its own; reconnects (dropping the copies) whenever it fails.

    The connection speaks RESP2 and redirects its own tracking to itself, then subscribes to the
    invalidation channel: one connection, so tracking and delivery fail together, and only
    commands redis-py's connection exposes. A quiet connection is pinged every
    ``health_check_s``; one that stays silent another ``health_check_s`` counts as lost.
    """

    def __init__(
        self,
        near: NearCache,
        redis_url: str,
        prefix: str,
        *,
        health_check_s: float = 1.0,
        max_backoff_s: float = 5.0,
    ) -> None:
        self._near = near
        self._prefix = prefix
        self._health_check_s = health_check_s
        self._max_backoff_s = max_backoff_s
        self._pool = ConnectionPool.from_url(
            redis_url, protocol=2, socket_connect_timeout=health_check_s, socket_timeout=health_check_s
        )
        self._tracking_on = asyncio.Event()

    async def wait_until_tracking(self) -> None:
        """Until invalidations flow (for tests and start-up checks)."""
        await self._tracking_on.wait()

    async def run(self) -> None:
        """Listen until cancelled."""
        backoff_s = 0.1
        last_refusal = ""  # why tracking could not start, as last logged
        while True:
            connection = self._pool.make_connection()  # type: ignore[no-untyped-call]  # redis-py
            try:
                await self._track(connection)
                backoff_s = 0.1
                await self._listen(connection)
            except Exception as exc:  # noqa: BLE001 - whatever broke: drop the copies, reconnect
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                was_tracking = self._near.tracking
                self._near.stop_tracking()
                self._tracking_on.clear()
                await connection.disconnect()
            if was_tracking:
                log.warning("near cache: lost Redis invalidations, reading Redis", extra={"error": reason})
                last_refusal = ""
            elif reason != last_refusal:  # Redis down, or one without tracking (before 6.0): say so once
                log.warning(
                    "near cache: cannot track Redis invalidations, keeping no copies", extra={"error": reason}
                )
                last_refusal = reason
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, self._max_backoff_s)

    async def _track(self, connection: AbstractConnection) -> None:
        await connection.connect()  # type: ignore[no-untyped-call]  # redis-py
        client_id = await self._command(connection, "CLIENT", "ID")
        await self._command(
            connection, "CLIENT", "TRACKING", "ON", "REDIRECT", client_id, "BCAST", "PREFIX", self._prefix
        )
        await self._command(connection, "SUBSCRIBE", _INVALIDATIONS)
        self._near.start_tracking()
        self._tracking_on.set()
        log.info("near cache: tracking Redis invalidations")

    async def _listen(self, connection: AbstractConnection) -> None:
        awaiting_pong = False
        while True:
            message = await connection.read_response(timeout=self._health_check_s)
            if message is None:  # quiet: is the connection still there?
                if awaiting_pong:
                    raise ConnectionError(f"no answer to PING within {self._health_check_s}s")
                await connection.send_command("PING")
                awaiting_pong = True
                continue
            kind = message[0]
            if kind == b"message":
                keys = message[2]
                if keys is None:  # FLUSHDB / FLUSHALL
                    self._near.invalidate_all()
                else:
                    self._near.invalidate(key.decode() for key in keys)
            awaiting_pong = False  # any message shows the connection is alive

    @staticmethod
    async def _command(connection: AbstractConnection, *args: Any) -> Any:
        await connection.send_command(*args)
        return await connection.read_response()

    async def close(self) -> None:
        await self._pool.aclose()
