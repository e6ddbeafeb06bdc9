"""sendtime_common.redis_client: a client's connections are bounded, and a command that cannot
get one in time fails as a Redis failure does (callers already handle those)."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as redis
from redis.exceptions import RedisError

from sendtime_common.redis_client import bounded_client


async def connections_of(url: str, name: str) -> int:
    admin = redis.Redis.from_url(url)
    try:
        clients = await admin.client_list()
    finally:
        await admin.aclose()
    return sum(1 for c in clients if c.get("name") == name)


async def test_a_burst_of_commands_shares_the_bounded_connections(redis_url: str) -> None:
    client = bounded_client(redis_url, max_connections=4, wait_s=10, client_name="bounded-burst")
    unbounded = redis.Redis.from_url(redis_url, client_name="unbounded-burst")
    try:
        answers = await asyncio.gather(*(client.eval("redis.call('ping') return 1", 0) for _ in range(200)))
        # Each holds its connection until Redis gives up on the list (~0.1 s), 12 at once.
        await asyncio.gather(*(unbounded.blpop(["nothing-here"], timeout=0.02) for _ in range(12)))
        await asyncio.gather(*(client.blpop(["nothing-here"], timeout=0.02) for _ in range(12)))
        assert answers == [1] * 200
        assert await connections_of(redis_url, "bounded-burst") <= 4
        assert await connections_of(redis_url, "unbounded-burst") == 12  # redis-py's default pool
    finally:
        await client.aclose()
        await unbounded.aclose()
    assert await connections_of(redis_url, "bounded-burst") == 0  # closed with the client


async def test_a_command_that_waits_too_long_for_a_connection_fails_as_redis_errors_do(
    redis_url: str,
) -> None:
    client = bounded_client(redis_url, max_connections=1, wait_s=0.05)
    try:
        holding = asyncio.ensure_future(client.blpop(["nothing-here"], timeout=2))
        await asyncio.sleep(0.2)  # the one connection is taken
        with pytest.raises(RedisError, match="No connection available"):
            await client.get("k")
        holding.cancel()
    finally:
        await client.aclose()
