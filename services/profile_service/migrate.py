"""Forward-only schema migrations, applied at start-up.

Each ``migrations/NNNN_name.sql`` runs once, in its own transaction, in file-name order; the
applied ones are recorded in ``schema_migrations``. An advisory lock lets several replicas start
at once without racing each other.
"""

from __future__ import annotations

import logging
from pathlib import Path

import asyncpg

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_LOCK_KEY = 0x5E2D_7140  # arbitrary, fixed: one migration run at a time per database


async def migrate(pool: asyncpg.Pool, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply the migrations not yet applied; returns their names.

    Raises:
        asyncpg.PostgresError: a migration failed (it is rolled back; later ones are not run).
    """
    applied_now: list[str] = []
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
            for path in sorted(directory.glob("*.sql")):
                if path.stem in done:
                    continue
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", path.stem)
                log.info("migration applied", extra={"migration": path.stem})
                applied_now.append(path.stem)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now
