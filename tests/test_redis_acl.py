"""The Redis ACL users (scripts/redis_acl.py) on a real Redis: the profile user can do all the
hot cache and its near cache need, and nothing dangerous; render's user can keep its last known
good copies and touch nothing else; each service's user runs its rate limiter on its own
buckets, and ingest's user can do nothing else."""

from __future__ import annotations

import secrets
from urllib.parse import urlsplit

import pytest
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, ResponseError

import redis_acl
from profile_service.cache import cache_key
from render.profiles import LKG_KEY_PREFIX
from sendtime_common.auth.api_keys import Scope
from sendtime_common.identifiers import IdentifierKind
from sendtime_common.rate_limit import Rate, RateLimiter, RateLimitSettings
from tests.profile_service.test_near_cache import listening, stop
from tests.profile_service.test_profile_service import cached_profile

PASSWORDS = {service: secrets.token_urlsafe(16) for service in redis_acl.SERVICES}


def as_user(redis_url: str, service: str) -> str:
    parts = urlsplit(redis_url)
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{redis_acl.user_name(service)}:{PASSWORDS[service]}@{host}").geturl()


@pytest.fixture(scope="module")
async def users(redis_url: str) -> str:
    await redis_acl.setup_users(redis_url, PASSWORDS)
    return redis_url


async def test_the_profile_user_runs_the_cache_and_the_near_cache(users: str, unique: str) -> None:
    near_cache = await listening(as_user(users, "profile"))  # CLIENT TRACKING, SUBSCRIBE: allowed
    try:
        key = cache_key(IdentifierKind.USER_ID, f"acl-{unique}")
        await near_cache.cache.put([cached_profile(f"acl-{unique}", 1, "old")])  # the Lua scripts
        assert [p.version for p in await near_cache.cache.get_many([key]) if p] == [1]
        await near_cache.cache.erase([key])
    finally:
        await stop(near_cache)


@pytest.mark.parametrize(
    ("service", "command"),
    [
        ("profile", ("FLUSHALL",)),
        ("profile", ("KEYS", "*")),
        ("profile", ("CONFIG", "GET", "*")),
        ("profile", ("GET", f"{LKG_KEY_PREFIX}x")),
        ("render", ("GET", "sendtime:profile:user_id:x")),
        ("render", ("SET", "sendtime:profile:user_id:x", "1")),
        ("render", ("EVAL", "return 1", "0")),
        ("render", ("FLUSHDB",)),
        ("render", ("GET", "sendtime:ratelimit:ingest:events.write:apiKeys/x")),
        ("ingest", ("GET", "sendtime:profile:user_id:x")),
        ("ingest", ("GET", f"{LKG_KEY_PREFIX}x")),
        ("ingest", ("SET", "sendtime:ratelimit:profile:profiles.read:apiKeys/x", "1")),
        ("ingest", ("DEL", "sendtime:ratelimit:ingest:events.write:apiKeys/x")),
        ("ingest", ("EVAL", "return 1", "0")),
        ("ingest", ("KEYS", "*")),
        ("ingest", ("FLUSHALL",)),
        ("profile", ("GET", "sendtime:ratelimit:render:render:apiKeys/x")),
        ("triggers", ("GET", "sendtime:profile:user_id:x")),
        ("triggers", ("SET", "sendtime:ratelimit:ingest:events.write:apiKeys/x", "1")),
        ("triggers", ("KEYS", "*")),
    ],
)
async def test_each_user_is_refused_what_its_service_does_not_do(
    users: str, service: str, command: tuple[str, ...]
) -> None:
    async with Redis.from_url(as_user(users, service)) as client:
        with pytest.raises((NoPermissionError, ResponseError), match="(?i)noperm|no permissions"):
            await client.execute_command(*command)  # type: ignore[no-untyped-call]


async def test_the_render_user_keeps_its_copies(users: str, unique: str) -> None:
    async with Redis.from_url(as_user(users, "render")) as client:
        await client.set(f"{LKG_KEY_PREFIX}{unique}", b"copy", ex=60)
        assert await client.get(f"{LKG_KEY_PREFIX}{unique}") == b"copy"
        await client.delete(f"{LKG_KEY_PREFIX}{unique}")


@pytest.mark.parametrize("service", redis_acl.SERVICES)
async def test_each_user_runs_its_rate_limiter_in_redis(users: str, service: str, unique: str) -> None:
    # A timeout a loaded machine's Redis keeps (the first decision connects, authenticates, gets
    # NOSCRIPT and loads the script): a missing permission still fails at once (NOPERM, a
    # RedisError), and the limiter then falls back for good (no retry within the test).
    settings = RateLimitSettings(redis_timeout_s=5, redis_retry_s=60)
    limiter = RateLimiter(settings, service, as_user(users, service))
    try:
        async with Redis.from_url(users) as admin:
            await admin.script_flush()  # the first decision loads the script (SCRIPT LOAD)
        rate = Rate(per_second=0.1, burst=2)  # a call back every 10 s: the third call is refused
        decisions = [await limiter.decide(Scope.RENDER, f"apiKeys/{unique}", rate) for _ in range(3)]
        assert [(d.allowed, d.shared) for d in decisions] == [(True, True), (True, True), (False, True)]
        assert limiter.shared  # no permission was missing: it never fell back
    finally:
        await limiter.close()


async def test_a_wrong_password_is_refused(users: str) -> None:
    parts = urlsplit(users)
    wrong = parts._replace(netloc=f"sendtime-render:wrong@{parts.netloc}").geturl()
    async with Redis.from_url(wrong) as client:
        with pytest.raises(Exception, match="(?i)invalid username-password|WRONGPASS"):
            await client.ping()
