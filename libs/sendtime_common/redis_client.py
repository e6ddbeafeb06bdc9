"""Redis clients that hold a bounded number of connections.

redis-py's default pool opens a connection for every command in flight and closes none: a burst
of concurrent calls leaves as many connections open as its peak, and the next, larger burst
adds more. In a soak on a loaded machine profile's cache client went from 11 to 48 connections
in steps, and nothing bounded it short of Redis's ``maxclients`` (shared by every replica). Here a
client keeps at most ``max_connections``; a command past them waits for one to come free, at
most ``wait_s``, then fails with redis's ``ConnectionError`` (a ``RedisError``, as when Redis is
away, which every caller already handles).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as redis
from redis.asyncio.connection import BlockingConnectionPool

# Per client. A command holds its connection for a round trip (~0.1 ms on a LAN), so 32
# connections carry far more commands per second than a replica's event loop can issue.
MAX_CONNECTIONS = 32
WAIT_S = 1.0


def bounded_client(
    url: str, *, max_connections: int = MAX_CONNECTIONS, wait_s: float = WAIT_S, **connection: Any
) -> redis.Redis:
    """A client for ``url`` with at most ``max_connections``; ``connection``: redis-py's
    connection arguments (``retry``, ``socket_connect_timeout``...). Closing the client closes
    its connections."""
    pool = BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=wait_s, **connection)
    return redis.Redis.from_pool(pool)
