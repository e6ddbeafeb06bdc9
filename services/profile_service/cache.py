"""The Redis hot cache of profiles, keyed by identifier.

Redis is a cache, never the record. Each entry is ``<version>:<Profile bytes>`` and a write only
replaces an older version (a compare-and-set in a Lua script), so a slow writer holding an old
profile can never overwrite a newer one. Entries expire after a TTL. One script call writes all
of a profile's entries, so the cache wants one Redis primary (with replicas or Sentinel), not
Redis Cluster, whose slots would split a profile's keys. Any Redis failure is
reported as ``CacheUnavailable`` so callers fall back to PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from redis.asyncio import Redis
from redis.exceptions import RedisError

from sendtime.profile.v1 import profile_pb2
from sendtime_common.identifier_proto import PROTO_TO_KIND
from sendtime_common.identifiers import IdentifierKind

KEY_PREFIX = "sendtime:profile:"
# An erased identifier's entry: a version no profile reaches, so no late write can bring the
# erased profile back into the cache; its empty body reads as a miss.
ERASED_VERSION = 2**53  # exact in Lua's doubles

# KEYS = the entries of one profile (one per identifier); ARGV[1] = version, ARGV[2] = entry
# value, ARGV[3] = TTL in seconds. Returns how many entries were written.
_SET_IF_NEWER = """
local written = 0
local wanted = tonumber(ARGV[1])
for _, key in ipairs(KEYS) do
  local current = redis.call('GET', key)
  local version = current and tonumber(string.match(current, '^(%d+):'))
  if not (version and version >= wanted) then
    redis.call('SET', key, ARGV[2], 'EX', ARGV[3])
    written = written + 1
  end
end
return written
"""


class CacheUnavailable(Exception):
    """Redis could not be used; the caller should go to PostgreSQL."""


def cache_key(kind: IdentifierKind, value: str) -> str:
    return f"{KEY_PREFIX}{kind.value}:{value}"


def encode_entry(profile: profile_pb2.Profile) -> bytes:
    return b"%d:" % profile.version + profile.SerializeToString()


def decode_entry(entry: bytes) -> profile_pb2.Profile | None:
    """The cached profile; None for an erasure marker."""
    _, _, body = entry.partition(b":")
    return profile_pb2.Profile.FromString(body) if body else None


class ProfileCache:
    def __init__(self, client: Redis, ttl_s: int) -> None:
        self._client = client
        self._ttl_s = ttl_s
        self._set_if_newer = client.register_script(_SET_IF_NEWER)

    async def get_many(self, keys: Sequence[str]) -> list[profile_pb2.Profile | None]:
        """The cached profiles for ``keys`` in one MGET (None where absent).

        Raises:
            CacheUnavailable: Redis failed.
        """
        if not keys:
            return []
        try:
            entries: list[bytes | str | None] = await self._client.mget(keys)
        except RedisError as exc:
            raise CacheUnavailable(str(exc)) from exc
        # The client is created without decode_responses, so values are bytes.
        return [None if e is None else decode_entry(e.encode() if isinstance(e, str) else e) for e in entries]

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

    async def put(self, profiles: Iterable[profile_pb2.Profile]) -> None:
        """Store each profile under every one of its identifiers, unless a newer version is there.
        All writes go out in one pipelined round trip.

        Raises:
            CacheUnavailable: Redis failed.
        """
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                queued = False
                for profile in profiles:
                    keys = [cache_key(PROTO_TO_KIND[i.kind], i.value) for i in profile.identifiers]
                    if keys:
                        await self._set_if_newer(
                            keys=keys, args=[profile.version, encode_entry(profile), self._ttl_s], client=pipe
                        )
                        queued = True
                if queued:
                    await pipe.execute()
        except RedisError as exc:
            raise CacheUnavailable(str(exc)) from exc

    async def close(self) -> None:
        await self._client.aclose()
