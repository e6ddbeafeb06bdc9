"""A fresh database with the profile service's migrations applied, on one connection."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg

from profile_service.repository import create_pool
from profile_service.server import MIGRATIONS_DIR
from sendtime_common.migrate import migrate
from tests.conftest import empty_database


def migrations(*, before: str | None = None, starting_at: str | None = None) -> list[Path]:
    """The profile service's migrations in order, optionally only those named before, or from,
    one of them (e.g. ``"0005_state_as_json_lz4.sql"``)."""
    return [
        path
        for path in sorted(MIGRATIONS_DIR.glob("*.sql"))
        if (before is None or path.name < before) and (starting_at is None or path.name >= starting_at)
    ]


@asynccontextmanager
async def migrated_connection(
    prefix: str, *, before: str | None = None
) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy[asyncpg.Record]]:
    """One connection (prepared statements live on it), from a pool set up as the service sets
    up its own, to a fresh database with the migrations applied (only those before ``before``)."""
    async with empty_database(prefix) as url:
        pool = await create_pool(url, min_size=1, max_size=1)
        try:
            async with pool.acquire() as conn:
                for migration in migrations(before=before):
                    await conn.execute(migration.read_text())
                yield conn
        finally:
            await pool.close()


@asynccontextmanager
async def migrated_pool(prefix: str, *, max_size: int = 2) -> AsyncIterator[asyncpg.Pool]:
    """A pool set up as the service sets up its own, of up to ``max_size`` connections, to a
    fresh database ``<prefix>_<random>`` migrated as the service migrates it; dropped on exit."""
    async with empty_database(prefix) as url:
        pool = await create_pool(url, min_size=1, max_size=max_size)
        try:
            await migrate(pool, MIGRATIONS_DIR, table="schema_migrations")
            yield pool
        finally:
            await pool.close()
