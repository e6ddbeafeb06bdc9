"""Profile reads: the Redis hot cache first, PostgreSQL for what it lacks.

A batch costs one MGET and, for the misses, one query; what the query finds is written back to
the cache. When Redis fails, reads go to PostgreSQL and still succeed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from profile_service.cache import CacheUnavailable, ProfileCache, cache_key
from profile_service.repository import ProfileRepository
from sendtime.profile.v1 import profile_pb2
from sendtime_common.identifier_proto import IdentifierKey

log = logging.getLogger(__name__)


class ProfileReader:
    def __init__(self, repository: ProfileRepository, cache: ProfileCache) -> None:
        self._repository = repository
        self._cache = cache

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
        loaded = {
            key: record.to_proto()
            for key, record in (await self._repository.find_by_identifiers(misses)).items()
        }
        if loaded and cache_ok:
            try:
                await self._cache.put(loaded.values())
            except CacheUnavailable as exc:
                log.warning("cache refresh failed", extra={"error": str(exc)})
        return [
            hit if hit is not None else loaded.get(key) for key, hit in zip(identifiers, cached, strict=True)
        ]
