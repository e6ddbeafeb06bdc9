"""PostgreSQL connection pools as every service sets them up."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Protocol

import asyncpg
from prometheus_client import Gauge

from sendtime_common.shutdown import RELEASE_S

log = logging.getLogger(__name__)


class ConnectionSetup(Protocol):
    async def __call__(self, connection: asyncpg.Connection, /) -> None: ...


async def _keep_session(connection: asyncpg.Connection) -> None:
    """What a released connection is reset with: nothing beyond asyncpg's own rollback of an
    unfinished transaction. The default also sends ``SELECT pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL`` on every release, a round trip per pooled query, to undo session
    state these services never leave behind: they set nothing per session, listen to nothing,
    and take advisory locks per transaction (the migration runner unlocks its own)."""


# What a call to PostgreSQL raises when PostgreSQL is unreachable or refuses: each service's
# StoreError. asyncpg's InternalClientError ("cannot switch to state ...") is what a connection
# whose server went away in the middle of a statement sometimes raises instead of a connection
# error (MagicStack/asyncpg#1069; seen once per PostgreSQL restart under load).
STORE_ERRORS = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)

# PostgreSQL itself away (down, restarting, in recovery, unreachable), as opposed to a statement
# it refused: whatever the work, it fails alike until PostgreSQL is back.
_UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,  # connection refused or reset, the pool's connect or acquire timing out
    asyncpg.InterfaceError,  # the connection closed under the call
    asyncpg.InternalClientError,  # the same, seen from asyncpg's protocol state (above)
    asyncpg.PostgresConnectionError,  # 08
    asyncpg.AdminShutdownError,  # 57P01
    asyncpg.CrashShutdownError,  # 57P02
    asyncpg.CannotConnectNowError,  # 57P03: starting up, in recovery
)


def unreachable(exc: BaseException) -> bool:
    """Whether a call that raised ``exc`` failed because PostgreSQL could not be reached at
    all, not because of what was asked (a statement timeout or a deadlock is not this)."""
    return isinstance(exc, _UNREACHABLE)


# The SSD setting PostgreSQL's documentation suggests, for data that is mostly cached: with the
# default of 4, a batch of a few hundred key lookups into a table of 10^4-10^5 rows is planned
# as a scan of the whole table (hash join), ~10 times slower than probing the primary key.
DEFAULT_RANDOM_PAGE_COST = 1.1


async def create_pool(
    dsn: str,
    *,
    min_size: int,
    max_size: int,
    random_page_cost: float = DEFAULT_RANDOM_PAGE_COST,
    init: ConnectionSetup | None = None,
    server_settings: Mapping[str, str] | None = None,
) -> asyncpg.Pool:
    """A pool of ``min_size`` to ``max_size`` connections, each set up by ``init`` when opened,
    with ``server_settings`` and the planner's ``random_page_cost`` for its whole session.

    Raises:
        OSError, asyncpg.PostgresError: the database cannot be reached.
    """
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=init,
        server_settings={"random_page_cost": str(random_page_cost), **(server_settings or {})},
        reset=_keep_session,
    )
    assert pool is not None
    _watch_pool(pool)
    return pool


POOL_CONNECTIONS = Gauge(
    "sendtime_db_pool_connections",
    "The service's PostgreSQL pool: connections in use, open and idle, and its maximum.",
    ["state"],
)


def _watch_pool(pool: asyncpg.Pool) -> None:
    """Report ``pool``'s connections at each scrape (the service's one pool)."""
    POOL_CONNECTIONS.labels("in_use").set_function(lambda: pool.get_size() - pool.get_idle_size())
    POOL_CONNECTIONS.labels("idle").set_function(pool.get_idle_size)
    POOL_CONNECTIONS.labels("max").set_function(pool.get_max_size)


async def close_pool(pool: asyncpg.Pool, timeout_s: float = RELEASE_S) -> None:
    """Close ``pool``, waiting at most ``timeout_s`` for connections still in use; then
    terminate them. asyncpg's ``Pool.close()`` alone waits, without a bound, until every
    connection is released: one held by a request that never ends (a handler left running
    after its client went away) would keep a service from ever exiting."""
    try:
        async with asyncio.timeout(timeout_s):
            await pool.close()
    except TimeoutError:
        log.warning("database connections still in use at shutdown: terminated", extra={"after_s": timeout_s})
    except Exception as exc:  # noqa: BLE001 - a failed close terminates (below); the shutdown goes on
        log.warning("closing the database pool failed", extra={"error": f"{type(exc).__name__}: {exc}"})
    pool.terminate()  # nothing when the close completed; else (timeout, an error) every connection
