"""The Redis hot cache of profiles, keyed by identifier.

Redis is a cache, never the record. Each entry is ``<version>:<Profile bytes>`` and a write only
replaces an older version (a compare-and-set in a Lua script), so a slow writer holding an old
profile can never overwrite a newer one. Entries expire after a TTL.

Only profiles someone reads are kept in full. After a merge, every entry of the profile becomes
a marker, ``<new version>:`` with no body, which reads as a miss; the profile is then written in
full only if one of its entries held a profile before (it is being read). A reader that misses
fills the entry from PostgreSQL, and that write replaces a marker of the same version, while a
reader holding an older version loses to the marker. So merges of customers nobody reads cost no
profile encoding and no memory, and no reader can see or write back anything older than the
last merge.

One script call covers all of a profile's entries, so the cache wants one Redis primary (with
replicas or Sentinel), not Redis Cluster, whose slots would split a profile's keys. Any Redis
failure is reported as ``CacheUnavailable`` so callers fall back to PostgreSQL.

In front of Redis, an optional ``NearCache`` keeps decoded profiles in process; Redis's
invalidations keep it coherent (profile_service.near_cache), and this module drops the copies
of every entry it writes as soon as the write is done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from profile_service.metrics import READ_FROM_NEAR, READ_FROM_REDIS
from profile_service.near_cache import NearCache
from sendtime.profile.v1 import profile_pb2
from sendtime_common.identifier_proto import PROTO_TO_KIND
from sendtime_common.identifiers import IdentifierKind

KEY_PREFIX = "sendtime:profile:"
# An erased identifier's entry: a version no profile reaches, so no late write can bring the
# erased profile back into the cache; its empty body reads as a miss.
ERASED_VERSION = 2**53  # exact in Lua's doubles

# Both scripts: KEYS = the entries of one profile (one per identifier); an entry is
# "<version>:<body>", the body empty for a marker.
_PARSE = """
local function parse(entry)
  if not entry then return nil, false end
  local colon = string.find(entry, ':', 1, true)
  return tonumber(string.sub(entry, 1, colon - 1)), #entry > colon
end
"""

# ARGV[1] = version, ARGV[2] = entry value, ARGV[3] = TTL in seconds. Replaces older entries and
# markers of the same version. Returns how many entries were written.
_SET_IF_NEWER = (
    _PARSE
    + """
local written = 0
local wanted = tonumber(ARGV[1])
for _, key in ipairs(KEYS) do
  local version, has_body = parse(redis.call('GET', key))
  if not (version and (version > wanted or (version == wanted and has_body))) then
    redis.call('SET', key, ARGV[2], 'EX', ARGV[3])
    written = written + 1
  end
end
return written
"""
)

# ARGV[1] = the profile's new version, ARGV[2] = TTL in seconds. Turns every older entry into a
# marker of the new version. Returns 1 when one of them held a profile (it is read), else 0.
_MARK_CHANGED = (
    _PARSE
    + """
local read = 0
local wanted = tonumber(ARGV[1])
for _, key in ipairs(KEYS) do
  local version, has_body = parse(redis.call('GET', key))
  if not (version and version >= wanted) then
    if has_body then read = 1 end
    redis.call('SET', key, ARGV[1] .. ':', 'EX', ARGV[2])
  end
end
return read
"""
)


class CacheUnavailable(Exception):
    """Redis could not be used; the caller should go to PostgreSQL."""


@dataclass(frozen=True, slots=True)
class ChangedProfile:
    """A profile a merge changed: its new version, its entries, and how to build it in full
    (called only if someone reads it)."""

    version: int
    keys: list[str]
    build: Callable[[], profile_pb2.Profile]


def cache_key(kind: IdentifierKind, value: str) -> str:
    return f"{KEY_PREFIX}{kind.value}:{value}"


def encode_entry(profile: profile_pb2.Profile) -> bytes:
    return b"%d:" % profile.version + profile.SerializeToString()


def decode_entry(entry: bytes) -> profile_pb2.Profile | None:
    """The cached profile; None for an erasure marker."""
    _, _, body = entry.partition(b":")
    return profile_pb2.Profile.FromString(body) if body else None


class ProfileCache:
    def __init__(self, client: Redis, ttl_s: int, near: NearCache | None = None) -> None:
        self._client = client
        self._ttl_s = ttl_s
        self._near = near
        self._set_if_newer = client.register_script(_SET_IF_NEWER)
        self._mark_changed = client.register_script(_MARK_CHANGED)

    @property
    def near(self) -> NearCache | None:
        return self._near

    async def get_many(self, keys: Sequence[str]) -> list[profile_pb2.Profile | None]:
        """The cached profiles for ``keys`` (None where absent): copies held in process, and the
        rest in one MGET. The profiles returned may be shared: do not modify them.

        Raises:
            CacheUnavailable: Redis failed.
        """
        near = self._near
        if near is None:
            from_redis = await self._get_from_redis(keys)
            READ_FROM_REDIS.inc(sum(p is not None for p in from_redis))
            return from_redis
        found = [near.get(key) for key in keys]
        wanted = [i for i, profile in enumerate(found) if profile is None]
        READ_FROM_NEAR.inc(len(keys) - len(wanted))
        if not wanted:
            return found
        wanted_keys = [keys[i] for i in wanted]
        with near.reserve(wanted_keys) as reservation:
            for i, key, profile in zip(
                wanted, wanted_keys, await self._get_from_redis(wanted_keys), strict=True
            ):
                if profile is not None:
                    found[i] = profile
                    reservation.fill(key, profile)
                    READ_FROM_REDIS.inc()
        return found

    async def _get_from_redis(self, keys: Sequence[str]) -> list[profile_pb2.Profile | None]:
        if not keys:
            return []
        try:
            entries: list[bytes | str | None] = await self._client.mget(keys)
        except RedisError as exc:
            raise CacheUnavailable(str(exc)) from exc
        # The client is created without decode_responses, so values are bytes.
        return [None if e is None else decode_entry(e.encode() if isinstance(e, str) else e) for e in entries]

    def _written(self, keys: Iterable[str]) -> None:
        """Drop the copies of entries this process just wrote (or tried to), not waiting for
        Redis's invalidation: this replica reads its own writes."""
        if self._near is not None:
            self._near.invalidate(keys)

    async def erase(self, keys: Sequence[str]) -> None:
        """Replace the entries of erased identifiers with markers no profile write can replace
        (they expire with the TTL).

        Raises:
            CacheUnavailable: Redis failed.
        """
        if not keys:
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.set(key, b"%d:" % ERASED_VERSION, ex=self._ttl_s)
                await pipe.execute()
        except RedisError as exc:
            raise CacheUnavailable(str(exc)) from exc
        finally:
            self._written(keys)

    async def put(self, profiles: Iterable[profile_pb2.Profile]) -> None:
        """Store each profile under every one of its identifiers, unless a newer version is there.
        All writes go out in one pipelined round trip.

        Raises:
            CacheUnavailable: Redis failed.
        """
        written: list[str] = []
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for profile in profiles:
                    keys = [cache_key(PROTO_TO_KIND[i.kind], i.value) for i in profile.identifiers]
                    if keys:
                        await self._set_if_newer(
                            keys=keys, args=[profile.version, encode_entry(profile), self._ttl_s], client=pipe
                        )
                        written += keys
                if written:
                    await pipe.execute()
        except RedisError as exc:
            raise CacheUnavailable(str(exc)) from exc
        finally:
            self._written(written)

    async def refresh(self, changed: Sequence[ChangedProfile]) -> int:
        """After merges: mark every entry of each changed profile with its new version, then
        write in full the profiles someone reads; how many were written in full. Two pipelined
        round trips at most.

        Raises:
            CacheUnavailable: Redis failed (entries not yet marked may hold an older profile
                until the next merge or their TTL, as before this merge).
        """
        changed = [c for c in changed if c.keys]
        if not changed:
            return 0
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for c in changed:
                    await self._mark_changed(keys=c.keys, args=[c.version, self._ttl_s], client=pipe)
                read = await pipe.execute()
        except RedisError as exc:
            raise CacheUnavailable(str(exc)) from exc
        finally:
            self._written(key for c in changed for key in c.keys)
        wanted = [c for c, was_read in zip(changed, read, strict=True) if was_read]
        if wanted:
            await self.put(c.build() for c in wanted)
        return len(wanted)

    async def close(self) -> None:
        await self._client.aclose()
