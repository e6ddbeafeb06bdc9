"""Rate limits per caller and scope: GCRA in Redis, shared by every replica, with a per-replica
fallback while Redis does not answer.

Each credential (an API key by its id, a client certificate by its identity) gets a budget per
scope, ``rate`` calls a second with bursts of up to ``burst``, kept as a GCRA (generic cell rate
algorithm) bucket: one number per bucket, its theoretical arrival time (TAT), in
``sendtime:ratelimit:<service>:<scope>:<principal>``. Redis decides with one Lua script run
(``register_script``: EVALSHA, and SCRIPT LOAD again after a Redis restart's NOSCRIPT) that reads
Redis's own clock (``TIME``), so replicas with drifting clocks agree. Requests of concurrent
calls share a script run (``MicroBatcher``).

A call makes at most one round trip, and on a busy bucket none: a replica asks Redis for as
many calls as are waiting, plus, where the burst is large enough, about ``LEASE_WINDOW_S`` of
the calls it has been seeing (at most ``burst / (replicas x LEASE_SHARE)``), and spends those
in process. Each granted call was charged in Redis first, so replicas together never let more
through than the bucket holds; calls a replica leased and did not spend within ``LEASE_TTL_S``
are dropped, never spent late. After Redis refuses, the replica refuses that bucket's calls
itself until the time Redis gave. Awaiting any socket inside a grpc.aio call costs the server
~150-200 µs of CPU (measured: docs/limits.md), which a call per round trip would pay.

When Redis fails or takes longer than ``redis_timeout_s``, the limiter decides in process, each
replica allowing ``rate / replicas`` with bursts of ``burst / replicas``: neither an open door nor
an outage. It logs once when it switches, probes Redis every ``redis_retry_s`` (one script run
that decides nothing), and logs once again when it is back.

``http_headers`` turns a decision into the fields of an HTTP answer (RFC 9110 ``Retry-After`` and
the IETF draft's ``RateLimit-Policy`` and ``RateLimit``), for the HTTP face.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from sendtime_common.auth.api_keys import Scope
from sendtime_common.batching import MicroBatcher
from sendtime_common.config import ConfigError, env_bool, env_float, env_int, env_str
from sendtime_common.redis_client import bounded_client

log = logging.getLogger(__name__)

KEY_PREFIX = "sendtime:ratelimit:"
RATE_LIMITED = "RATE_LIMITED"  # the ErrorInfo reason callers get
# Decisions per script run, and script runs in flight at once (each holds a connection).
MAX_BATCH = 256
MAX_CONCURRENT_BATCHES = 8
# Buckets each limiter keeps in process before it drops the idle ones.
LOCAL_BUCKETS_SWEPT_AT = 10_000
# A lease covers about this much of the calls a replica has been seeing on a bucket, ...
LEASE_WINDOW_S = 0.05
# ... at most burst / (replicas x LEASE_SHARE) calls beyond those waiting (0 for small bursts:
# those buckets are decided call by call), and is dropped if not spent within LEASE_TTL_S.
LEASE_SHARE = 4
LEASE_TTL_S = 1.0
# The shortest span the calls seen are counted over: a few calls arriving at once do not make
# a rate of thousands a second.
LEASE_MIN_SPAN_S = 0.005

# KEYS: one bucket per request, a key may come more than once; ARGV: each request's emission
# interval (µs between calls at the rate), burst and the calls it asks for, in turn. A bucket
# holds its TAT in µs of Redis's clock and expires when it is full again. A request is granted
# as many of the calls it asks for as fit now (maybe fewer, maybe none). Returns four integers
# per request: calls granted, calls left in the burst, µs until the next call would fit (when
# none was granted), µs until the bucket is full again. With no KEYS it decides nothing: the
# recovery probe.
_GCRA = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local out = {}
for i, key in ipairs(KEYS) do
  local emission = tonumber(ARGV[3 * i - 2])
  local tolerance = emission * tonumber(ARGV[3 * i - 1])
  local tat = math.max(tonumber(redis.call('GET', key)) or now, now)
  if tat > now + tolerance then
    -- owed under another rate: keep at most a burst's worth, so a new rate applies at once
    tat = now + tolerance
    redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil(tolerance / 1000))
  end
  local fit = math.floor((tolerance - (tat - now)) / emission)
  local granted = math.max(0, math.min(tonumber(ARGV[3 * i]), fit))
  local n = #out
  if granted == 0 then
    out[n + 1] = 0
    out[n + 2] = 0
    out[n + 3] = tat + emission - tolerance - now
    out[n + 4] = tat - now
  else
    local new_tat = tat + granted * emission
    redis.call('SET', key, string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
    out[n + 1] = granted
    out[n + 2] = fit - granted
    out[n + 3] = 0
    out[n + 4] = new_tat - now
  end
end
return out
"""

_UNITS = {"s": 1.0, "min": 60.0, "h": 3600.0}
_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*/\s*(s|min|h)(?:\s+burst\s+(\d+))?")


@dataclass(frozen=True, slots=True)
class Rate:
    """``per_second`` calls a second on average, up to ``burst`` at once."""

    per_second: float
    burst: int

    def __post_init__(self) -> None:
        if not (self.per_second > 0 and math.isfinite(self.per_second)) or self.burst < 1:
            raise ValueError("a rate needs calls per second above 0 and a burst of at least 1")

    @classmethod
    def parse(cls, text: str) -> Rate:
        """``5000/s``, ``60/min`` or ``100/h``, optionally followed by ``burst N``; without a
        burst, the calls of one period (``60/min``: 60).

        Raises:
            ValueError: not of that form, or a rate of 0.
        """
        match = _RATE.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"{text!r} is not a rate such as '5000/s', '60/min burst 20' or 'off'")
        count, unit, burst = float(match[1]), match[2], match[3]
        return cls(count / _UNITS[unit], int(burst) if burst else max(1, math.ceil(count)))

    @property
    def emission_us(self) -> int:
        """µs between two calls at the rate."""
        return max(1, round(1_000_000 / self.per_second))

    def __str__(self) -> str:
        count = f"{self.per_second:g}/s" if self.per_second >= 1 else f"{self.per_second * 60:g}/min"
        return f"{count} burst {self.burst}"

    def divided(self, parts: int) -> Rate:
        """This rate shared by ``parts`` replicas: each one's part (a burst of at least 1)."""
        return Rate(self.per_second / parts, max(1, self.burst // parts))


# Per credential and scope. High where one caller legitimately calls often (reading profiles,
# sending events, rendering), low where a call is an operator's (keys, audit, exports).
DEFAULT_RATES: Mapping[Scope, Rate] = {
    Scope.EVENTS_WRITE: Rate(2000, 4000),
    Scope.PROFILES_READ: Rate(10_000, 20_000),
    Scope.PROFILES_EXPORT: Rate(10, 50),
    Scope.PROFILES_ERASE: Rate(50, 200),
    Scope.TEMPLATES_READ: Rate(100, 200),
    Scope.TEMPLATES_WRITE: Rate(20, 100),
    Scope.RENDER: Rate(2000, 4000),
    Scope.DEAD_LETTERS_MANAGE: Rate(20, 100),
    Scope.KEYS_MANAGE: Rate(5, 50),
    Scope.AUDIT_READ: Rate(10, 50),
    Scope.STATS_READ: Rate(20, 100),
    Scope.TRIGGERS_READ: Rate(100, 200),
    Scope.TRIGGERS_WRITE: Rate(20, 100),
    Scope.DESTINATIONS_MANAGE: Rate(20, 100),
    Scope.DELIVERIES_READ: Rate(100, 200),
    # An adapter acknowledges deliveries in batches: a call per batch, not per delivery.
    Scope.DELIVERIES_SUBSCRIBE: Rate(200, 400),
    # One Prometheus key scrapes every replica of every service (the rate is per key, across
    # them all): 100 targets every 5 s by two Prometheus servers is 40/s.
    Scope.METRICS_READ: Rate(100, 200),
    # An operator's dashboard or a script: a connector's status now and then, a run on demand.
    Scope.SYNC_READ: Rate(20, 100),
    Scope.SYNC_WRITE: Rate(5, 20),
}


def scope_variable(scope: Scope) -> str:
    """The variable that sets ``scope``'s rate: ``RATE_LIMIT_PROFILES_READ``."""
    return f"RATE_LIMIT_{scope.name}"


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    enabled: bool = True
    # Each scope's rate per credential; a scope missing here (set to "off") is not limited.
    rates: Mapping[Scope, Rate] = field(default_factory=lambda: dict(DEFAULT_RATES))
    # Empty: the Redis the service uses anyway (each server passes its own).
    redis_url: str = ""
    # Replicas sharing the rates while Redis does not answer: each allows its share.
    replicas: int = 1
    redis_timeout_s: float = 0.05
    redis_retry_s: float = 1.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RateLimitSettings:
        """RATE_LIMITS (on/off), RATE_LIMIT_<SCOPE> (e.g. RATE_LIMIT_PROFILES_READ=5000/s burst
        10000, or off), RATE_LIMIT_REDIS_URL, RATE_LIMIT_REPLICAS, RATE_LIMIT_REDIS_TIMEOUT_MS and
        RATE_LIMIT_REDIS_RETRY_SECONDS.

        Raises:
            ConfigError: a variable has an unusable value.
        """
        defaults = cls()
        rates = dict(DEFAULT_RATES)
        for scope in Scope:
            name = scope_variable(scope)
            text = env_str(env, name, "")
            if not text:
                continue
            if text.lower() == "off":
                del rates[scope]
                continue
            try:
                rates[scope] = Rate.parse(text)
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from None
        return cls(
            enabled=env_bool(env, "RATE_LIMITS", defaults.enabled),
            rates=rates,
            redis_url=env_str(env, "RATE_LIMIT_REDIS_URL", defaults.redis_url),
            replicas=env_int(env, "RATE_LIMIT_REPLICAS", defaults.replicas, minimum=1),
            redis_timeout_s=env_int(
                env, "RATE_LIMIT_REDIS_TIMEOUT_MS", round(defaults.redis_timeout_s * 1000), minimum=1
            )
            / 1000,
            redis_retry_s=env_float(
                env, "RATE_LIMIT_REDIS_RETRY_SECONDS", defaults.redis_retry_s, minimum=0.05
            ),
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """One call's answer. ``remaining``: calls left in the burst; ``retry_after_s``: until the
    next call would be allowed (0 when this one is); ``reset_after_s``: until the budget is full
    again; ``shared``: decided in Redis for every replica (False: by this replica alone)."""

    allowed: bool
    remaining: int
    retry_after_s: float
    reset_after_s: float
    shared: bool


class LocalLimiter:
    """The same GCRA in process, on this replica's clock, each rate divided by ``replicas``."""

    def __init__(self, replicas: int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        self._replicas = replicas
        self._clock = clock
        self._tats: dict[str, float] = {}
        self._parts: dict[Rate, Rate] = {}
        self._sweep_at = LOCAL_BUCKETS_SWEPT_AT

    def decide(self, key: str, rate: Rate) -> Decision:
        part = self._parts.get(rate)
        if part is None:
            part = self._parts[rate] = rate.divided(self._replicas)
        now = self._clock()
        emission = 1 / part.per_second
        tolerance = emission * part.burst
        tat = max(self._tats.get(key, now), now)
        if tat > now + tolerance:  # owed under another rate, as the script does
            tat = self._tats[key] = now + tolerance
        new_tat = tat + emission
        if new_tat - now > tolerance + 1e-9:  # float slack: the burst-th call of a full bucket
            return Decision(False, 0, new_tat - tolerance - now, tat - now, shared=False)
        if len(self._tats) >= self._sweep_at:  # drop the full buckets
            self._tats = {k: t for k, t in self._tats.items() if t > now}
            self._sweep_at = max(LOCAL_BUCKETS_SWEPT_AT, 2 * len(self._tats))
        self._tats[key] = new_tat
        remaining = math.floor((tolerance - (new_tat - now)) / emission + 1e-9)
        return Decision(True, remaining, 0.0, new_tat - now, shared=False)


@dataclass(frozen=True, slots=True)
class _Ask:
    key: str
    rate: Rate
    calls: int  # how many the replica asks for: calls waiting, and a lease


@dataclass(frozen=True, slots=True)
class _Grant:
    calls: int  # 0: refused
    remaining: int
    retry_after_s: float
    reset_after_s: float


@dataclass(slots=True)
class _Bucket:
    """This replica's part of one shared bucket, at one rate."""

    rate: Rate
    leased: int = 0  # calls granted by Redis, not spent yet
    lease_ends: float = 0.0
    refused_until: float = 0.0  # Redis said no call fits before then
    remaining: int = 0  # in the burst, at Redis's last answer (for the caller's information)
    full_at: float = 0.0  # when the bucket is full again, at Redis's last answer
    waiting: int = 0  # calls waiting for the request in flight
    asking: asyncio.Future[None] | None = None  # a request to Redis in flight
    calls: int = 0  # calls seen since the last request
    asked_at: float = 0.0


class RateLimiter:
    """Decides calls in Redis when it answers, else per replica (``LocalLimiter``)."""

    def __init__(self, settings: RateLimitSettings, service: str, redis_url: str) -> None:
        """``redis_url`` empty: per replica only (a warning at start)."""
        self._settings = settings
        self._prefix = f"{KEY_PREFIX}{service}:"
        self._local = LocalLimiter(settings.replicas)
        self._client: redis.Redis | None = None
        if redis_url:
            # No retries and short connects: a decision that cannot be made in Redis at once is
            # made in process instead.
            self._client = bounded_client(
                redis_url,
                wait_s=settings.redis_timeout_s,
                retry=Retry(NoBackoff(), 0),
                socket_connect_timeout=settings.redis_timeout_s,
            )
            self._script = self._client.register_script(_GCRA)
        self._shared = self._client is not None
        self._buckets: dict[str, _Bucket] = {}
        self._sweep_at = LOCAL_BUCKETS_SWEPT_AT
        self._running = 0  # script runs in flight
        self._next_probe = 0.0
        self._probing: asyncio.Task[None] | None = None
        self._batcher: MicroBatcher[_Ask, _Grant | None] = MicroBatcher(
            self._ask_redis, max_batch=MAX_BATCH, max_concurrent_batches=MAX_CONCURRENT_BATCHES
        )
        self.redis_requests = 0  # requests sent to Redis (one per bucket per script run)

    @property
    def settings(self) -> RateLimitSettings:
        return self._settings

    @property
    def shared(self) -> bool:
        """Whether decisions are being made in Redis (else on this replica alone)."""
        return self._shared

    def rate(self, scope: Scope) -> Rate | None:
        """``scope``'s configured rate; None: not limited."""
        return self._settings.rates.get(scope)

    def start(self) -> None:
        if self._client is None:
            log.warning(
                "rate limits are kept per replica: no Redis to share them in",
                extra={"replicas": self._settings.replicas},
            )

    async def close(self) -> None:
        if self._probing is not None:
            self._probing.cancel()
            await asyncio.gather(self._probing, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    async def decide(self, scope: Scope, principal: str, rate: Rate) -> Decision:
        """Whether ``principal`` may make one more call of ``scope`` at ``rate``. Never raises
        for want of Redis: it decides in process then."""
        key = f"{self._prefix}{scope.value}:{principal}"
        if not self._shared:
            self._probe_when_due()
            return self._local.decide(key, rate)
        bucket = self._buckets.get(key)
        if bucket is None or (bucket.rate is not rate and bucket.rate != rate):
            bucket = self._bucket(key, rate)  # what it knew of another rate no longer holds
        bucket.calls += 1
        while True:
            now = time.monotonic()
            full_in = max(0.0, bucket.full_at - now)
            if now < bucket.refused_until:
                return Decision(False, 0, bucket.refused_until - now, full_in, shared=True)
            if bucket.leased and now < bucket.lease_ends:
                bucket.leased -= 1
                return Decision(True, bucket.remaining + bucket.leased, 0.0, full_in, shared=True)
            if bucket.asking is None:
                return await self._ask(key, bucket, rate, now)
            bucket.waiting += 1
            try:
                await asyncio.shield(bucket.asking)
            finally:
                bucket.waiting -= 1
            if not self._shared:  # Redis failed meanwhile
                return self._local.decide(key, rate)

    def _bucket(self, key: str, rate: Rate) -> _Bucket:
        if len(self._buckets) >= self._sweep_at:  # drop the idle ones
            now = time.monotonic()
            self._buckets = {
                k: b
                for k, b in self._buckets.items()
                if b.asking is not None or max(b.lease_ends, b.refused_until, b.full_at) > now
            }
            self._sweep_at = max(LOCAL_BUCKETS_SWEPT_AT, 2 * len(self._buckets))
        bucket = self._buckets[key] = _Bucket(rate)
        return bucket

    async def _ask(self, key: str, bucket: _Bucket, rate: Rate, now: float) -> Decision:
        """Ask Redis for this call, the calls waiting on this bucket, and a lease; decide this
        call from the answer (the others take what is left when it comes)."""
        seen = bucket.calls / max(now - bucket.asked_at, LEASE_MIN_SPAN_S)  # calls a second here
        lease = min(int(seen * LEASE_WINDOW_S), rate.burst // (self._settings.replicas * LEASE_SHARE))
        bucket.calls, bucket.asked_at = 0, now
        asking = bucket.asking = asyncio.get_running_loop().create_future()
        ask = _Ask(key, rate, 1 + bucket.waiting + lease)
        try:
            if self._running:  # join the next script run
                grant = await self._batcher.submit(ask)
            else:  # nothing in flight: go at once, in this task, not a loop turn or two later
                (grant,) = await self._ask_redis([ask])
        finally:
            bucket.asking = None
            asking.set_result(None)
        if grant is None:  # Redis failed: this replica decides alone for now
            return self._local.decide(key, rate)
        now = time.monotonic()
        bucket.remaining, bucket.full_at = grant.remaining, now + grant.reset_after_s
        if not grant.calls:
            bucket.refused_until = now + grant.retry_after_s
            return Decision(False, 0, grant.retry_after_s, grant.reset_after_s, shared=True)
        bucket.leased, bucket.lease_ends = grant.calls - 1, now + LEASE_TTL_S
        return Decision(True, grant.remaining + bucket.leased, 0.0, grant.reset_after_s, shared=True)

    async def _ask_redis(self, asks: list[_Ask]) -> Sequence[_Grant | None]:
        """One script run for ``asks``: each one's grant; None each when Redis failed."""
        arguments: list[int] = []
        for ask in asks:
            arguments += (ask.rate.emission_us, ask.rate.burst, ask.calls)
        self._running += 1
        self.redis_requests += len(asks)
        try:
            async with asyncio.timeout(self._settings.redis_timeout_s):
                answer = await self._script([ask.key for ask in asks], arguments)
        except (RedisError, OSError, TimeoutError) as exc:
            self._fall_back(exc)
            return [None] * len(asks)
        finally:
            self._running -= 1
        return [
            _Grant(
                calls=int(answer[i]),
                remaining=int(answer[i + 1]),
                retry_after_s=int(answer[i + 2]) / 1e6,
                reset_after_s=int(answer[i + 3]) / 1e6,
            )
            for i in range(0, len(answer), 4)
        ]

    def _fall_back(self, exc: BaseException) -> None:
        """Decide per replica from now on (Redis failed); say so once."""
        if not self._shared:
            return  # a batch sent before the switch
        self._shared = False
        self._next_probe = time.monotonic() + self._settings.redis_retry_s
        log.warning(
            "rate limits: Redis failed or was too slow, limiting per replica until it answers",
            extra={
                "error": str(exc) or type(exc).__name__,
                "replicas": self._settings.replicas,
                "timeout_ms": round(self._settings.redis_timeout_s * 1000),
            },
        )

    def _probe_when_due(self) -> None:
        if self._probing is not None or self._client is None or time.monotonic() < self._next_probe:
            return
        self._probing = asyncio.get_running_loop().create_task(self._probe(), name="rate-limit-probe")

    async def _probe(self) -> None:
        """One script run that decides nothing: when it answers, decisions go back to Redis."""
        try:
            async with asyncio.timeout(self._settings.redis_timeout_s):
                await self._script([], [])
        except (RedisError, OSError, TimeoutError):
            self._next_probe = time.monotonic() + self._settings.redis_retry_s
        else:
            self._shared = True
            log.info("rate limits: Redis answers again, limits are shared by every replica")
        finally:
            self._probing = None


def http_headers(scope: Scope, rate: Rate, decision: Decision) -> list[tuple[str, str]]:
    """The HTTP header fields of ``decision`` (answered 429 when it is not allowed): the
    policy and the budget left, as draft-ietf-httpapi-ratelimit-headers defines
    ``RateLimit-Policy`` and ``RateLimit`` (structured fields, RFC 9651), named after the scope,
    and when the call is refused ``Retry-After`` (RFC 9110, whole seconds, at least 1).

    The policy's quota ``q`` is the burst and its window ``w`` the seconds in which the rate
    refills a whole burst; ``r`` is the calls left, ``t`` the seconds until the budget is full.
    """
    window = max(1, math.ceil(rate.burst / rate.per_second))
    name = f'"{scope.value}"'
    fields = [
        ("RateLimit-Policy", f"{name};q={rate.burst};w={window}"),
        ("RateLimit", f"{name};r={decision.remaining};t={math.ceil(decision.reset_after_s)}"),
    ]
    if not decision.allowed:
        fields.append(("Retry-After", str(max(1, math.ceil(decision.retry_after_s)))))
    return fields
