"""Ingest's batched statements probe primary keys however large the tables have grown since they
were last analyzed. With ``event_id = ANY($1)`` PostgreSQL scanned all of
``ingest_processed_events`` for every batch while it held tens of thousands of rows, and with
the default ``random_page_cost`` the business-key joins did the same (docs/benchmarks.md)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from ingest.store import SEEN_EVENT_IDS, IngestStore
from tests.ingest.migrated import migrated_pool


async def test_seen_ids_are_found_through_the_primary_key_in_a_grown_unanalyzed_table() -> None:
    # PostgreSQL's default random_page_cost: the statement's shape alone keeps it on the index.
    async with migrated_pool("sendtime_ingest_plans", random_page_cost=4.0) as pool:
        await pool.execute(
            "INSERT INTO ingest_processed_events (event_id, received_at)"
            " SELECT 'evt-' || n, now() FROM generate_series(1, 40000) n"
        )
        wanted = [f"evt-{n}" for n in range(1, 513, 2)] + [f"new-{n}" for n in range(256)]
        plan = "\n".join(r[0] for r in await pool.fetch(f"EXPLAIN {SEEN_EVENT_IDS}", wanted))
        seen = await IngestStore(pool).seen_event_ids(wanted)
    assert "Seq Scan on ingest_processed_events" not in plan, plan
    assert "ingest_processed_events_pkey" in plan, plan
    assert seen == {f"evt-{n}": None for n in range(1, 513, 2)}


async def test_business_key_statements_probe_the_primary_key_in_a_grown_unanalyzed_table() -> None:
    async with migrated_pool("sendtime_ingest_plans") as pool:  # planned as the service plans
        await pool.execute(
            "INSERT INTO ingest_business_keys (key_kind, key_value, event_id, claimed_at, stored)"
            " SELECT 'order', 'o' || n, 'evt-' || n, now(), true FROM generate_series(1, 40000) n"
        )
        statements: list[tuple[str, tuple[Any, ...]]] = []
        async with pool.acquire() as conn:  # the pool's only connection: it logs them all
            conn.add_query_logger(lambda q: statements.append((q.query, q.args)))
        store = IngestStore(pool)
        # 256 claims, a third of them for orders already seen
        claims = {("order", f"o{n}" if n % 3 == 0 else f"new-{n}"): f"new-{n}" for n in range(1, 257)}
        owners = await store.claim_business_keys(claims, timedelta(seconds=60))
        new = {key: event_id for key, event_id in claims.items() if owners[key] == event_id}
        stored = list(new)[: len(new) // 2]
        await store.record_stored([(new[key], None) for key in stored], stored, datetime.now(UTC))
        await store.release_business_keys({key: new[key] for key in list(new)[len(new) // 2 :]})
        # Before the EXPLAINs below are logged too; without asyncpg's one-time introspection of
        # the bytea[] type (the fingerprints recorded with the ids).
        ran = [(q, a) for q, a in statements if "ingest_business_keys" in q]
        async with pool.acquire() as conn:
            plans = ["\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {q}", *a)) for q, a in ran]
    assert len(plans) == 3, ran  # claim, record, release
    for plan in plans:
        assert "Seq Scan on ingest_business_keys" not in plan, plan
        assert "ingest_business_keys_pkey" in plan, plan
    assert len(owners) == 256 and len(new) == 256 - 256 // 3
