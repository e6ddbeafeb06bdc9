"""Where render gets a customer's profile, within the time the caller left it.

In order: a cached profile young enough for the template (``max_data_age``); the live profile
from the profile service (concurrent renders for one customer share one lookup, and the lookups
of concurrent renders go out as one BatchGetProfiles call; a circuit breaker stops waiting on a
service that keeps failing); when the live one cannot be had in time, the
last known good profile (kept in process and in Redis, with its age). Never raises for a failed
lookup: the answer says what it got and why.

Copies are keyed by the identifier's keyed hash (``sendtime_common.identifiers.IdentifierHasher``),
so Redis keys name no one, and an erasure notice from the profile service (hashes only) finds every
copy of the erased person to drop, in process and in Redis.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
from cachetools import LRUCache, TTLCache
from circuitbreaker import CircuitBreaker, CircuitBreakerError
from opentelemetry import trace
from redis.asyncio import Redis
from redis.exceptions import RedisError

from render.metrics import watch_breaker
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime_common.batching import MicroBatcher
from sendtime_common.event_log import RetryLater
from sendtime_common.identifier_proto import PROTO_TO_KIND
from sendtime_common.identifiers import IdentifierHasher
from sendtime_common.shutdown import RELEASE_S, bounded, finish_or_cancel

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

LKG_KEY_PREFIX = "sendtime:render:lkg:"
LKG_REDIS_WAIT_S = 0.02  # a last-known-good read must leave time to render
LKG_REFRESH_AFTER_S = 60.0  # re-write the Redis copy at most this often per customer
JUST_ERASED_S = 60.0  # far longer than any lookup under way when the notice came
LOOKUP_BATCH = 100  # live lookups of concurrent renders per BatchGetProfiles call
# One call in flight: the lookups that arrive meanwhile wait for it and go out together (with
# more in flight, each lookup went out alone and the batching bought nothing).
LOOKUP_BATCHES = 1
# A batch waits no longer than this, even for a caller with a longer deadline, so that a hung
# profile service holds the next batch (and the count towards opening the circuit) back at most
# this long; renders fall back within their own deadlines meanwhile.
LOOKUP_TIMEOUT_MAX_S = 1.0


@dataclass(frozen=True, slots=True)
class _Lookup:
    """One render's live lookup, waiting to go out in a batch."""

    identifier: profile_pb2.Identifier
    deadline: float  # time.monotonic()
    caller: trace.SpanContext  # the render's span, so the batch's span can name it


class Source(enum.Enum):
    LIVE = "live"
    CACHE = "cache"
    LAST_KNOWN_GOOD = "last_known_good"
    NONE = "none"


class Failure(enum.Enum):
    NOT_FOUND = "not_found"
    ERASED = "erased"
    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"
    CIRCUIT_OPEN = "circuit_open"


@dataclass(frozen=True, slots=True)
class ProfileLookup:
    """A profile (or none), where it came from, when it was fetched, and what went wrong."""

    profile: profile_pb2.Profile | None
    source: Source
    fetched_at: float = 0.0  # time.time() of the fetch from the profile service
    failure: Failure | None = None


class _Missing(Exception):
    """NOT_FOUND from the profile service: an answer, not a failure of the service."""

    def __init__(self, erased: bool) -> None:
        super().__init__("erased" if erased else "not found")
        self.erased = erased


def _is_service_failure(exc_type: type[BaseException], exc: BaseException) -> bool:
    """What counts against the circuit: the service failing or too slow, not a missing profile."""
    return issubclass(exc_type, (grpc.aio.AioRpcError, asyncio.TimeoutError))


@dataclass(frozen=True, slots=True)
class FetcherSettings:
    breaker_failures: int = 5
    breaker_recovery_s: float = 5.0
    local_entries: int = 100_000
    lkg_ttl_s: int = 7 * 24 * 3600
    hasher: IdentifierHasher = field(default_factory=IdentifierHasher.unkeyed)  # names the copies


class ProfileFetcher:
    def __init__(
        self,
        stub: profile_pb2_grpc.ProfileServiceAsyncStub,
        redis: Redis | None,
        settings: FetcherSettings = FetcherSettings(),
    ) -> None:
        self._stub = stub
        self._redis = redis
        self._settings = settings
        self._local: LRUCache[str, tuple[float, profile_pb2.Profile]] = LRUCache(settings.local_entries)
        # Per identifier: the lookup under way, and the span context of the render that began it.
        self._in_flight: dict[
            str, tuple[asyncio.Future[tuple[float, profile_pb2.Profile]], trace.SpanContext]
        ] = {}
        self._background: set[asyncio.Task[object]] = set()
        # Erased in the last minute: an answer to a lookup made before the erasure is not kept.
        self._just_erased: TTLCache[str, bool] = TTLCache(maxsize=100_000, ttl=JUST_ERASED_S)
        self.breaker = CircuitBreaker(
            failure_threshold=settings.breaker_failures,
            recovery_timeout=settings.breaker_recovery_s,
            expected_exception=_is_service_failure,
            name=f"profile-service-{id(self)}",
        )
        self._call_batch = self.breaker(self._get_batch)
        watch_breaker(lambda: bool(self.breaker.opened))
        # Lookups of concurrent renders go out together: one BatchGetProfiles instead of one
        # GetProfile each (under light load a batch is one lookup, sent on the next loop turn).
        self._lookups: MicroBatcher[_Lookup, profile_pb2.ProfileResult] = MicroBatcher(
            self._lookup_batch, max_batch=LOOKUP_BATCH, max_concurrent_batches=LOOKUP_BATCHES
        )

    async def get(
        self, identifier: profile_pb2.Identifier, *, time_left_s: float, max_age: timedelta | None
    ) -> ProfileLookup:
        key = self._key(identifier)
        cached = self._local.get(key)
        if cached is not None and max_age is not None and time.time() - cached[0] <= max_age.total_seconds():
            return ProfileLookup(cached[1], Source.CACHE, cached[0])
        # The live lookup leaves time to read the last known good copy from Redis if it fails.
        live_s = time_left_s - (LKG_REDIS_WAIT_S if self._redis is not None else 0.0)
        try:
            fetched_at, profile = await self._shared_live(key, identifier, live_s)
        except _Missing as missing:
            self._forget_missing(key, erased=missing.erased)
            return ProfileLookup(
                None, Source.NONE, failure=Failure.ERASED if missing.erased else Failure.NOT_FOUND
            )
        except CircuitBreakerError:
            return await self._last_known_good(key, Failure.CIRCUIT_OPEN)
        except TimeoutError:
            return await self._last_known_good(key, Failure.TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            failure = (
                Failure.TIMEOUT if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else Failure.UNAVAILABLE
            )
            log.warning("profile lookup failed", extra={"grpc_code": exc.code().name})
            return await self._last_known_good(key, failure)
        return ProfileLookup(profile, Source.LIVE, fetched_at)

    async def get_many(
        self, identifiers: list[profile_pb2.Identifier], *, time_left_s: float
    ) -> list[ProfileLookup]:
        """Live profiles for a batch in one BatchGetProfiles call (a campaign's customers); on
        failure, each falls back to its last known good profile."""
        try:
            if time_left_s <= 0:
                raise TimeoutError()
            response = await self._call_batch(identifiers, time_left_s)
        except CircuitBreakerError:
            return [await self._last_known_good(self._key(i), Failure.CIRCUIT_OPEN) for i in identifiers]
        except (TimeoutError, grpc.aio.AioRpcError) as exc:
            timed_out = isinstance(exc, asyncio.TimeoutError) or (
                isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            )
            failure = Failure.TIMEOUT if timed_out else Failure.UNAVAILABLE
            return [await self._last_known_good(self._key(i), failure) for i in identifiers]
        fetched_at = time.time()
        lookups = []
        for identifier, result in zip(identifiers, response.results, strict=True):
            key = self._key(identifier)
            if result.found:
                self._remember(key, fetched_at, result.profile)
                lookups.append(ProfileLookup(result.profile, Source.LIVE, fetched_at))
            else:
                failure = Failure.ERASED if result.erased else Failure.NOT_FOUND
                lookups.append(ProfileLookup(None, Source.NONE, failure=failure))
                self._forget_missing(key, erased=result.erased)
        return lookups

    def _forget_missing(self, key: str, *, erased: bool) -> None:
        """The profile service has no such customer: drop the copy in process, and the one in
        Redis too if the customer was erased (the erasure notice may not have come yet)."""
        self._local.pop(key, None)
        if erased and self._redis is not None:
            self._in_background(self._delete_lkg([key]))

    async def _get_batch(
        self, identifiers: list[profile_pb2.Identifier], timeout_s: float
    ) -> profile_pb2.BatchGetProfilesResponse:
        response: profile_pb2.BatchGetProfilesResponse = await self._stub.BatchGetProfiles(
            profile_pb2.BatchGetProfilesRequest(identifiers=identifiers), timeout=timeout_s
        )
        return response

    async def _shared_live(
        self, key: str, identifier: profile_pb2.Identifier, time_left_s: float
    ) -> tuple[float, profile_pb2.Profile]:
        """One call to the profile service per identifier at a time; the others wait for it (but
        never longer than their own time)."""
        if time_left_s <= 0:
            raise TimeoutError()
        render_span = trace.get_current_span()
        joined = self._in_flight.get(key)
        pending: asyncio.Future[tuple[float, profile_pb2.Profile]]
        if joined is None:
            pending = asyncio.ensure_future(self._get_live(key, identifier, time_left_s))
            self._in_flight[key] = (pending, render_span.get_span_context())
            pending.add_done_callback(lambda _: self._in_flight.pop(key, None))
            pending.add_done_callback(_retrieve)
        else:
            # No lookup span in this render's trace: a link to the render whose trace has it.
            pending, first_render = joined
            render_span.add_link(first_render, {"sendtime.shared": "profile lookup"})
        return await asyncio.wait_for(asyncio.shield(pending), time_left_s)

    async def _get_live(
        self, key: str, identifier: profile_pb2.Identifier, timeout_s: float
    ) -> tuple[float, profile_pb2.Profile]:
        caller = trace.get_current_span().get_span_context()
        result = await self._lookups.submit(_Lookup(identifier, time.monotonic() + timeout_s, caller))
        if not result.found:
            raise _Missing(erased=result.erased)
        fetched_at = time.time()
        self._remember(key, fetched_at, result.profile)
        return fetched_at, result.profile

    async def _lookup_batch(self, lookups: list[_Lookup]) -> list[profile_pb2.ProfileResult]:
        # As long as the most patient render will wait: each render waits only for its own time.
        timeout_s = min(LOOKUP_TIMEOUT_MAX_S, max(lookup.deadline for lookup in lookups) - time.monotonic())
        if timeout_s <= 0:
            raise TimeoutError()
        # The call's span belongs to the first render's trace and links every other render in
        # the batch, so each render's trace leads to the lookup that served it.
        first, *others = (lookup.caller for lookup in lookups)
        with tracer.start_as_current_span(
            "render.profile_lookup",
            context=trace.set_span_in_context(trace.NonRecordingSpan(first)),
            links=[trace.Link(c) for c in others if c.is_valid],
        ) as span:
            span.set_attribute("sendtime.batch_size", len(lookups))
            response = await self._call_batch([lookup.identifier for lookup in lookups], timeout_s)
        return list(response.results)

    def _key(self, identifier: profile_pb2.Identifier) -> str:
        return self._settings.hasher.hash((PROTO_TO_KIND[identifier.kind], identifier.value)).hex()

    def _remember(self, key: str, fetched_at: float, profile: profile_pb2.Profile) -> None:
        if key in self._just_erased:  # a lookup that started before the erasure came back after
            return
        previous = self._local.get(key)
        self._local[key] = (fetched_at, profile)
        if self._redis is not None and (previous is None or fetched_at - previous[0] > LKG_REFRESH_AFTER_S):
            self._in_background(self._store_lkg(key, fetched_at, profile))  # off the hot path

    def _in_background(self, work: Coroutine[Any, Any, object]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def on_erasure_notice(self, payload: bytes) -> None:
        """Drop every copy of an erased person (a ``sendtime.profile.v1.ErasureNotice``): in
        process at once, in Redis as soon as Redis takes the delete.

        Raises:
            RetryLater: Redis did not take the delete (the follower hands the notice again).
        """
        notice = profile_pb2.ErasureNotice.FromString(payload)
        keys = [h.hex() for h in notice.identifier_hashes]
        for key in keys:
            self._local.pop(key, None)
            self._just_erased[key] = True
        if self._redis is not None and keys and not await self._delete_lkg(keys):
            raise RetryLater("Redis did not delete the copies")

    async def _delete_lkg(self, keys: list[str]) -> bool:
        assert self._redis is not None
        try:
            await self._redis.delete(*(LKG_KEY_PREFIX + key for key in keys))
        except RedisError as exc:
            log.warning("could not delete an erased person's last known good copy", extra={"error": str(exc)})
            return False
        return True

    async def _store_lkg(self, key: str, fetched_at: float, profile: profile_pb2.Profile) -> None:
        assert self._redis is not None
        try:
            await self._redis.set(
                LKG_KEY_PREFIX + key, b"%d:" % int(fetched_at * 1000) + profile.SerializeToString(),
                ex=self._settings.lkg_ttl_s,
            )  # fmt: skip
        except RedisError as exc:
            log.warning("could not store last known good profile", extra={"error": str(exc)})

    async def _last_known_good(self, key: str, failure: Failure) -> ProfileLookup:
        cached = self._local.get(key)
        if cached is not None:
            return ProfileLookup(cached[1], Source.LAST_KNOWN_GOOD, cached[0], failure)
        if self._redis is not None:
            try:
                entry = await asyncio.wait_for(self._redis.get(LKG_KEY_PREFIX + key), LKG_REDIS_WAIT_S)
            except (TimeoutError, RedisError):
                entry = None
            if entry:
                raw = entry.encode() if isinstance(entry, str) else entry
                millis, _, body = raw.partition(b":")
                fetched_at = int(millis) / 1000
                profile = profile_pb2.Profile.FromString(body)
                self._local[key] = (fetched_at, profile)
                return ProfileLookup(profile, Source.LAST_KNOWN_GOOD, fetched_at, failure)
        return ProfileLookup(None, Source.NONE, failure=failure)

    def use_stub(self, stub: profile_pb2_grpc.ProfileServiceAsyncStub) -> None:
        """Make later lookups through ``stub`` (a channel reopened with renewed certificates)."""
        self._stub = stub

    async def close(self) -> None:
        """Let the copies being written to Redis finish (within RELEASE_S), then close Redis
        (within RELEASE_S)."""
        await finish_or_cancel("last known good copies being written", list(self._background), RELEASE_S)
        if self._redis is not None:
            await bounded("last known good store", self._redis.aclose())


def _retrieve(future: asyncio.Future[tuple[float, profile_pb2.Profile]]) -> None:
    """A shared lookup whose waiters all gave up must not log 'exception never retrieved'."""
    if not future.cancelled():
        future.exception()
