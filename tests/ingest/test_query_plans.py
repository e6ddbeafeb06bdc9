"""Ingest's dedup lookup probes the primary key however large the table has grown since it was
last analyzed: with ``event_id = ANY($1)`` PostgreSQL scanned all of ``ingest_processed_events``
for every batch while it held tens of thousands of rows (docs/benchmarks.md)."""

from __future__ import annotations

import asyncpg

from ingest.server import MIGRATIONS_DIR
from ingest.store import SEEN_EVENT_IDS, IngestStore
from sendtime_common.migrate import migrate
from tests.conftest import empty_database


async def test_seen_ids_are_found_through_the_primary_key_in_a_grown_unanalyzed_table() -> None:
    async with empty_database("sendtime_ingest_plans") as url:
        async with asyncpg.create_pool(url, min_size=1, max_size=1) as pool:
            await migrate(pool, MIGRATIONS_DIR, table="ingest_schema_migrations")
            await pool.execute(
                "INSERT INTO ingest_processed_events (event_id, received_at)"
                " SELECT 'evt-' || n, now() FROM generate_series(1, 40000) n"
            )
            wanted = [f"evt-{n}" for n in range(1, 513, 2)] + [f"new-{n}" for n in range(256)]
            plan = "\n".join(r[0] for r in await pool.fetch(f"EXPLAIN {SEEN_EVENT_IDS}", wanted))
            seen = await IngestStore(pool).seen_event_ids(wanted)
    assert "Seq Scan on ingest_processed_events" not in plan, plan
    assert "ingest_processed_events_pkey" in plan, plan
    assert seen == {f"evt-{n}" for n in range(1, 513, 2)}
