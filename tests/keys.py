"""API keys for tests: made in a test database the way `sendtime keys create` makes them."""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg

from sendtime_common.auth.api_keys import ALL_SCOPES, Scope
from sendtime_common.auth.key_store import KeyStore


async def issue_key(
    database_url: str, scopes: Iterable[Scope] = ALL_SCOPES, display_name: str = "test"
) -> str:
    """A new key with ``scopes`` (all by default) in the database at ``database_url``, whose key
    tables are created first if missing."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        store = KeyStore(pool)
        await store.migrate()
        _, key = await store.create(display_name, scopes, "cli:tests")
        return key
    finally:
        await pool.close()
