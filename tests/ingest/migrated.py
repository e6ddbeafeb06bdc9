"""A fresh database with ingest's migrations applied, and a pool set up as ingest sets up its own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from ingest.server import MIGRATIONS_DIR
from sendtime_common.database import DEFAULT_RANDOM_PAGE_COST, create_pool
from sendtime_common.migrate import migrate
from tests.conftest import empty_database


@asynccontextmanager
async def migrated_pool(
    prefix: str, *, max_size: int = 1, random_page_cost: float = DEFAULT_RANDOM_PAGE_COST
) -> AsyncIterator[asyncpg.Pool]:
    """A pool of up to ``max_size`` connections to a fresh database ``<prefix>_<random>``,
    migrated; the database is dropped on exit."""
    async with empty_database(prefix) as url:
        pool = await create_pool(url, min_size=1, max_size=max_size, random_page_cost=random_page_cost)
        try:
            await migrate(pool, MIGRATIONS_DIR, table="ingest_schema_migrations")
            yield pool
        finally:
            await pool.close()
