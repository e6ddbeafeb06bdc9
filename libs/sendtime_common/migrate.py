"""Forward-only schema migrations, applied at start-up by each service that owns tables.

Each ``NNNN_name.sql`` in a service's migrations directory runs once, in its own transaction, in
file-name order; the applied ones are recorded in the service's own table (services may share a
database). An advisory lock per table lets several replicas start at once without racing.

(Hand-written: the established tools want SQLAlchemy or psycopg; this is the whole of what asyncpg
services need.)
"""

from __future__ import annotations

import logging
from pathlib import Path

import asyncpg

log = logging.getLogger(__name__)

_LOCK_NAMESPACE = 0x5E2D  # with the table's hash: one migration run at a time per table


async def migrate(pool: asyncpg.Pool, directory: Path, table: str) -> list[str]:
    """Apply the migrations in ``directory`` not yet recorded in ``table``; their names.

    Raises:
        asyncpg.PostgresError: a migration failed (it is rolled back; later ones are not run).
    """
    applied_now: list[str] = []
    async with pool.acquire() as conn:
        lock = (_LOCK_NAMESPACE, await conn.fetchval("SELECT hashtext($1)", table))
        await conn.execute("SELECT pg_advisory_lock($1, $2)", *lock)
        try:
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {table} ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["name"] for r in await conn.fetch(f"SELECT name FROM {table}")}
            for path in sorted(directory.glob("*.sql")):
                if path.stem in done:
                    continue
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute(f"INSERT INTO {table} (name) VALUES ($1)", path.stem)
                log.info("migration applied", extra={"migration": path.stem, "table": table})
                applied_now.append(path.stem)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1, $2)", *lock)
    return applied_now
