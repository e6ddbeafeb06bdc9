"""The rate limiter (sendtime_common.rate_limit) on a real Redis: GCRA's burst and spacing, the
retry time it gives, two limiters (two replicas) sharing one budget, a script Redis forgot,
and the per-replica fallback while Redis is down or too slow, then back to Redis."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

import devstack
from ingest.settings import Settings as IngestSettings
from profile_service.settings import Settings as ProfileSettings
from render.settings import Settings as RenderSettings
from sendtime_common import rate_limit
from sendtime_common.auth.api_keys import Scope
from sendtime_common.config import ConfigError
from sendtime_common.rate_limit import (
    DEFAULT_RATES,
    KEY_PREFIX,
    Decision,
    LocalLimiter,
    Rate,
    RateLimiter,
    RateLimitSettings,
    http_headers,
)
from tests.conftest import eventually

SCOPE = Scope.PROFILES_READ


def settings(**overrides: object) -> RateLimitSettings:
    # A timeout a loaded machine's Redis keeps: one script run cut short sends the limiter to per
    # replica decisions, which the exact counts below would not survive (the tests of a slow or
    # dead Redis set their own, or need none).
    values: dict[str, object] = {"redis_timeout_s": 2.0, "redis_retry_s": 0.1, **overrides}
    return RateLimitSettings(**values)  # type: ignore[arg-type]


@asynccontextmanager
async def limiter(redis_url: str, **overrides: object) -> AsyncIterator[RateLimiter]:
    rate_limiter = RateLimiter(settings(**overrides), "test", redis_url)
    rate_limiter.start()
    try:
        yield rate_limiter
    finally:
        await rate_limiter.close()


def caller() -> str:
    return f"apiKeys/{uuid.uuid4().hex[:12]}"


async def decide_many(rate_limiter: RateLimiter, who: str, rate: Rate, n: int) -> list[Decision]:
    return [await rate_limiter.decide(SCOPE, who, rate) for _ in range(n)]


# --- GCRA in Redis ---------------------------------------------------------------------------


async def test_a_full_burst_is_allowed_then_calls_are_refused_with_the_time_to_wait(redis_url: str) -> None:
    # One call every 2 s: the 7 calls are one burst however slow the machine (at 10 a second, a
    # loaded one could see a call come back between them).
    rate = Rate(per_second=0.5, burst=5)
    async with limiter(redis_url) as rate_limiter:
        who = caller()
        decisions = await decide_many(rate_limiter, who, rate, 7)
        assert [d.allowed for d in decisions] == [True] * 5 + [False] * 2
        assert [d.remaining for d in decisions[:5]] == [4, 3, 2, 1, 0]
        assert all(d.shared for d in decisions)
        refused = decisions[5]
        # The next call fits one emission interval (2 s) after the burst began, less the time
        # the calls took; the whole burst refills in 10 s.
        assert 0 < refused.retry_after_s <= 2
        assert refused.retry_after_s < refused.reset_after_s <= 10


async def test_after_the_burst_calls_are_spaced_at_the_rate(redis_url: str) -> None:
    # One call every 2 s: the refusals below hold unless a call is late by most of 2 s.
    rate = Rate(per_second=0.5, burst=2)
    async with limiter(redis_url) as rate_limiter:
        who = caller()
        await decide_many(rate_limiter, who, rate, 2)
        refused = await rate_limiter.decide(SCOPE, who, rate)
        assert not refused.allowed
        await asyncio.sleep(refused.retry_after_s + 0.01)
        assert (await rate_limiter.decide(SCOPE, who, rate)).allowed
        assert not (await rate_limiter.decide(SCOPE, who, rate)).allowed  # one interval, one call
        assert rate_limiter.shared  # every decision was Redis's


async def test_callers_and_scopes_have_budgets_of_their_own(redis_url: str) -> None:
    rate = Rate(per_second=0.1, burst=1)  # a call back every 10 s: none comes back meanwhile
    async with limiter(redis_url) as rate_limiter:
        first, second = caller(), caller()
        assert (await rate_limiter.decide(SCOPE, first, rate)).allowed
        assert not (await rate_limiter.decide(SCOPE, first, rate)).allowed
        assert (await rate_limiter.decide(SCOPE, second, rate)).allowed
        assert (await rate_limiter.decide(Scope.RENDER, first, rate)).allowed
        assert rate_limiter.shared


async def test_two_replicas_share_one_budget(redis_url: str) -> None:
    rate = Rate(per_second=0.1, burst=10)  # small: decided call by call; none back within 10 s
    async with limiter(redis_url, replicas=2) as one, limiter(redis_url, replicas=2) as other:
        who = caller()
        decisions = await asyncio.gather(*(replica.decide(SCOPE, who, rate) for replica in [one, other] * 10))
        assert sum(d.allowed for d in decisions) == 10
        assert all(d.shared for d in decisions) and one.shared and other.shared


async def test_two_busy_replicas_lease_calls_and_never_let_more_through_than_the_bucket_holds(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Leases are spent however long the machine stalls (their dropping has a test of its own).
    monkeypatch.setattr(rate_limit, "LEASE_TTL_S", 600.0)
    # A replica leases up to 400 / (2 x 4) = 50 calls; a call back every 10 s.
    rate = Rate(per_second=0.1, burst=400)
    async with limiter(redis_url, replicas=2) as one, limiter(redis_url, replicas=2) as other:
        who = caller()
        decided = await asyncio.gather(*(decide_many(replica, who, rate, 50) for replica in [one, other] * 8))
        allowed = sum(d.allowed for decisions in decided for d in decisions)
        # Never more than the burst (and the call it may refill meanwhile); less only by what a
        # replica leased and had no call left to spend on.
        assert 400 - 2 * 50 <= allowed <= 401
        assert one.redis_requests + other.redis_requests < 800 / 5
        assert one.shared and other.shared  # decided in Redis throughout


async def test_concurrent_decisions_share_requests_and_stay_exact(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rate_limit, "LEASE_TTL_S", 600.0)  # leases spent however slow the machine
    rate = Rate(per_second=0.01, burst=100)  # a call back every 100 s: none meanwhile
    async with limiter(redis_url) as rate_limiter:
        who = caller()
        decisions = await asyncio.gather(*(rate_limiter.decide(SCOPE, who, rate) for _ in range(300)))
        assert sum(d.allowed for d in decisions) == 100  # one replica spends every call it leased
        assert max(d.remaining for d in decisions if d.allowed) == 99
        assert rate_limiter.redis_requests < 300
        assert rate_limiter.shared and all(d.shared for d in decisions)


async def test_a_busy_bucket_goes_to_redis_a_lease_at_a_time_and_refusals_stay_in_process(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rate_limit, "LEASE_TTL_S", 600.0)  # leases spent however slow the machine
    # One replica: leases of up to 250 calls. A call back every 10 s: Redis refuses for up to 10 s,
    # longer than the 500 refusals take.
    rate = Rate(per_second=0.1, burst=1000)
    async with limiter(redis_url) as rate_limiter:
        who = caller()
        decided = await asyncio.gather(*(decide_many(rate_limiter, who, rate, 100) for _ in range(20)))
        assert 1000 <= sum(d.allowed for decisions in decided for d in decisions) <= 1001
        asked = rate_limiter.redis_requests
        assert asked < 2000 / 10
        refused = await decide_many(rate_limiter, who, rate, 500)
        assert not any(d.allowed for d in refused) and all(0 < d.retry_after_s <= 10 for d in refused)
        assert rate_limiter.redis_requests - asked <= 1  # refused until the time Redis gave
        assert rate_limiter.shared


async def test_calls_leased_and_not_spent_in_time_are_dropped(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rate_limit, "LEASE_TTL_S", 0.1)
    # A lease of the most a replica may take (1000 / 4 = 250) at every request after the first,
    # whatever call rate a slow machine measures: the 100 calls leave most of one unspent.
    monkeypatch.setattr(rate_limit, "LEASE_WINDOW_S", 1000.0)
    rate = Rate(per_second=0.1, burst=1000)
    async with limiter(redis_url) as rate_limiter:
        who = caller()
        await asyncio.gather(*(decide_many(rate_limiter, who, rate, 10) for _ in range(10)))
        asked = rate_limiter.redis_requests
        await asyncio.sleep(0.15)
        after = await rate_limiter.decide(SCOPE, who, rate)
        assert after.allowed and rate_limiter.redis_requests == asked + 1  # from Redis, not the lease
        # Redis charged the dropped calls too: fewer are left than the 101 made would leave (and
        # so calls were left in a lease, which the call above did not spend).
        assert after.remaining < 1000 - 101
        assert rate_limiter.shared


async def test_a_new_rate_for_a_bucket_takes_effect_at_once(redis_url: str) -> None:
    async with limiter(redis_url) as rate_limiter:
        who = caller()
        slow, fast = Rate(per_second=0.1, burst=1), Rate(per_second=100, burst=100)
        assert [(await rate_limiter.decide(SCOPE, who, slow)).allowed for _ in range(2)] == [True, False]
        # The 10 s the slow rate owed are cut to a burst at the new rate: one 10 ms interval.
        first = await rate_limiter.decide(SCOPE, who, fast)
        assert first.allowed or first.retry_after_s <= 0.01
        await asyncio.sleep(0.02)
        assert (await rate_limiter.decide(SCOPE, who, fast)).allowed


async def test_a_bucket_lives_in_redis_until_it_is_full_again(redis_url: str) -> None:
    # One call back every 10 s: one call spent, the bucket is full again 10 s later, which no
    # stall before the PTTL below comes near.
    rate = Rate(per_second=0.1, burst=5)
    async with limiter(redis_url) as rate_limiter, Redis.from_url(redis_url) as client:
        await client.ping()  # connected before the decision: the PTTL follows it at once
        who = caller()
        decision = await rate_limiter.decide(SCOPE, who, rate)
        assert decision.shared and decision.reset_after_s == 10
        key = f"{KEY_PREFIX}test:{SCOPE.value}:{who}"
        assert 5_000 < await client.pttl(key) <= 10_000


async def test_a_script_redis_forgot_is_loaded_again(redis_url: str) -> None:
    # One call back every 100 s: none comes back while the script is loaded again, however long
    # that takes (at 100 a second, 10 ms on a loaded machine gave one back: remaining 2).
    rate = Rate(per_second=0.01, burst=3)
    async with limiter(redis_url) as rate_limiter, Redis.from_url(redis_url) as client:
        who = caller()
        assert (await rate_limiter.decide(SCOPE, who, rate)).shared
        await client.script_flush()  # as after a restart: EVALSHA answers NOSCRIPT
        decision = await rate_limiter.decide(SCOPE, who, rate)
        assert decision.allowed and decision.shared and decision.remaining == 1
        assert rate_limiter.shared


# --- Without Redis ---------------------------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[str, int, Path]]:
    """A Redis of the test's own, to stop: (URL, port, workdir)."""
    port = devstack.free_port()
    process = devstack.start_redis(port, tmp_path / "redis")
    try:
        yield f"redis://127.0.0.1:{port}/0", port, tmp_path
    finally:
        devstack.stop_process(process)


async def test_with_redis_down_each_replica_limits_its_share_and_comes_back_to_redis(
    own_redis: tuple[str, int, Path], caplog: pytest.LogCaptureFixture
) -> None:
    url, port, workdir = own_redis
    # Each of 2 replicas: a call every 10 s, bursts of 4; no call comes back during the test.
    rate = Rate(per_second=0.2, burst=8)
    caplog.set_level(logging.INFO, logger="sendtime_common.rate_limit")
    async with limiter(url, replicas=2) as rate_limiter:
        who = caller()
        assert (await rate_limiter.decide(SCOPE, who, rate)).shared
        async with Redis.from_url(url) as admin:
            await admin.shutdown(nosave=True)
        started = time.monotonic()
        decisions = await decide_many(rate_limiter, who, rate, 10)
        assert time.monotonic() - started < 2  # no retries, no waiting on a dead Redis
        # Neither an open door nor an outage: this replica's half of the burst, then refusals.
        assert [d.allowed for d in decisions] == [True] * 4 + [False] * 6
        assert not any(d.shared for d in decisions) and not rate_limiter.shared
        refused = decisions[-1]
        assert 0 < refused.retry_after_s <= 10  # its share of the rate: 1 call every 10 s

        process = devstack.start_redis(port, workdir / "redis-again")  # empty: no script, no buckets
        try:

            async def shared_again() -> bool:
                # A decision made per replica probes Redis when the retry interval is up: one
                # per poll, so a probe that fails (Redis still starting) is followed by another.
                await rate_limiter.decide(SCOPE, caller(), rate)
                return rate_limiter.shared

            await eventually(shared_again, timeout_s=15)
            back = await rate_limiter.decide(SCOPE, caller(), rate)
            assert back.shared and back.allowed and back.remaining == 7  # the whole burst again
        finally:
            devstack.stop_process(process)
    messages = [r.getMessage() for r in caplog.records if r.name == "sendtime_common.rate_limit"]
    assert sum("limiting per replica" in m for m in messages) == 1  # once, not per call
    assert sum("answers again" in m for m in messages) == 1


async def test_a_redis_too_slow_to_answer_is_not_waited_for(own_redis: tuple[str, int, Path]) -> None:
    url, _, _ = own_redis
    rate = Rate(per_second=100, burst=100)
    # 0.5 s: a loaded machine's Redis answers within it (at 0.05 s the first call, which must be
    # answered, was not), and a decision that waited on the 3 s pause would take 3 s.
    async with limiter(url, redis_timeout_s=0.5) as rate_limiter, Redis.from_url(url) as admin:
        who = caller()
        assert (await rate_limiter.decide(SCOPE, who, rate)).shared
        await admin.client_pause(3000)  # Redis holds every other client's commands for 3 s
        started = time.monotonic()
        decision = await rate_limiter.decide(SCOPE, who, rate)
        assert time.monotonic() - started < 2
        assert decision.allowed and not decision.shared


async def test_with_no_redis_at_all_limits_are_per_replica(caplog: pytest.LogCaptureFixture) -> None:
    rate = Rate(per_second=1, burst=3)
    async with limiter("", replicas=3) as rate_limiter:
        who = caller()
        decisions = await decide_many(rate_limiter, who, rate, 2)
        assert [d.allowed for d in decisions] == [True, False]
        assert not rate_limiter.shared
    assert any("per replica" in r.getMessage() for r in caplog.records)


def test_the_local_limiter_runs_gcra_on_the_replicas_share() -> None:
    now = [100.0]
    local = LocalLimiter(replicas=2, clock=lambda: now[0])
    rate = Rate(per_second=10, burst=6)  # each of 2 replicas: 5/s, bursts of 3
    assert [local.decide("k", rate).allowed for _ in range(4)] == [True, True, True, False]
    refused = local.decide("k", rate)
    assert refused.retry_after_s == pytest.approx(0.2)
    now[0] += 0.2
    assert local.decide("k", rate).allowed
    assert local.decide("other", rate).remaining == 2
    now[0] += 10
    assert local.decide("k", rate).remaining == 2  # full again
    slow = Rate(per_second=0.2, burst=2)  # each replica: 0.1/s: 10 s a call
    assert [local.decide("s", slow).allowed for _ in range(2)] == [True, False]
    assert local.decide("s", rate).retry_after_s == pytest.approx(0.2)  # owed at the slow rate: cut


# --- Settings and HTTP -----------------------------------------------------------------------


def test_rates_are_read_per_scope_from_the_environment() -> None:
    read = RateLimitSettings.from_env(
        {
            "RATE_LIMIT_PROFILES_READ": "5000/s burst 10000",
            "RATE_LIMIT_KEYS_MANAGE": "60/min",
            "RATE_LIMIT_AUDIT_READ": "off",
            "RATE_LIMIT_REPLICAS": "3",
            "RATE_LIMIT_REDIS_TIMEOUT_MS": "20",
        }
    )
    assert read.rates[Scope.PROFILES_READ] == Rate(5000, 10000)
    assert read.rates[Scope.KEYS_MANAGE] == Rate(1, 60)
    assert Scope.AUDIT_READ not in read.rates
    assert read.rates[Scope.RENDER] == DEFAULT_RATES[Scope.RENDER]
    assert (read.replicas, read.redis_timeout_s, read.enabled) == (3, 0.02, True)
    assert not RateLimitSettings.from_env({"RATE_LIMITS": "off"}).enabled
    assert set(RateLimitSettings().rates) == set(Scope)  # every scope limited by default


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"RATE_LIMIT_RENDER": "fast"}, "RATE_LIMIT_RENDER: 'fast' is not a rate"),
        ({"RATE_LIMIT_RENDER": "0/s"}, "RATE_LIMIT_RENDER: a rate needs"),
        ({"RATE_LIMIT_RENDER": "10/s burst 0"}, "RATE_LIMIT_RENDER: a rate needs"),
        ({"RATE_LIMIT_REPLICAS": "0"}, "RATE_LIMIT_REPLICAS must be at least 1"),
        ({"RATE_LIMITS": "sometimes"}, "RATE_LIMITS must be true or false"),
    ],
)
def test_an_unusable_rate_setting_is_refused_at_start_naming_it(
    variables: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        RateLimitSettings.from_env(variables)


def test_a_rate_reads_back_as_it_is_written() -> None:
    assert str(Rate.parse("5000/s burst 10000")) == "5000/s burst 10000"
    assert str(Rate.parse("30/min")) == "30/min burst 30"
    assert Rate.parse("7200/h").per_second == 2


def test_a_refused_decision_becomes_429_header_fields() -> None:
    rate = Rate(per_second=10, burst=50)
    refused = Decision(allowed=False, remaining=0, retry_after_s=0.12, reset_after_s=4.9, shared=True)
    assert http_headers(Scope.EVENTS_WRITE, rate, refused) == [
        ("RateLimit-Policy", '"events.write";q=50;w=5'),
        ("RateLimit", '"events.write";r=0;t=5'),
        ("Retry-After", "1"),
    ]
    allowed = Decision(allowed=True, remaining=49, retry_after_s=0, reset_after_s=0.1, shared=True)
    assert http_headers(Scope.EVENTS_WRITE, rate, allowed) == [
        ("RateLimit-Policy", '"events.write";q=50;w=5'),
        ("RateLimit", '"events.write";r=49;t=1'),
    ]


@pytest.mark.parametrize("settings_class", [IngestSettings, ProfileSettings, RenderSettings])
def test_every_service_reads_its_rate_limits_at_start(settings_class: Any) -> None:
    read = settings_class.from_env({"RATE_LIMIT_REPLICAS": "3", "RATE_LIMIT_EVENTS_WRITE": "10/s"})
    assert read.auth.rate_limits.replicas == 3
    assert read.auth.rate_limits.rates[Scope.EVENTS_WRITE] == Rate(10, 10)
    with pytest.raises(ConfigError, match="RATE_LIMIT_RENDER"):
        settings_class.from_env({"RATE_LIMIT_RENDER": "fast"})
    assert (
        IngestSettings.from_env({"REDIS_URL": "redis://limits:6379/0"}).redis_url == "redis://limits:6379/0"
    )
