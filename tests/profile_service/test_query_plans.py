"""The profile service's statements keep using their indexes as a new database grows: a
prepared statement's generic plan, made while the tables were empty, would otherwise scan
``identifiers`` sequentially until the next ANALYZE (the merge rate halved in a fresh bench)."""

from __future__ import annotations

from tests.profile_service.migrated import migrated_connection

OWNERS = (
    "SELECT i.customer_id FROM identifiers i WHERE i.customer_id IN (SELECT i2.customer_id"
    " FROM identifiers i2 JOIN unnest($1::text[], $2::text[]) AS q(kind, value)"
    " ON i2.kind = q.kind AND i2.value = q.value)"
)


async def test_a_statement_prepared_on_empty_tables_uses_the_index_once_they_grow() -> None:
    async with migrated_connection("sendtime_plans") as conn:
        await conn.execute(f"PREPARE owners(text[], text[]) AS {OWNERS}")
        for n in range(8):  # past the 5 custom plans after which PostgreSQL may go generic
            await conn.execute(f"EXECUTE owners(ARRAY['user_id'], ARRAY['u{n}'])")
        await conn.execute(
            "INSERT INTO customers (customer_id, version, state)"
            " SELECT gen_random_uuid(), 1, '{}' FROM generate_series(1, 20000)"
        )
        await conn.execute(
            "INSERT INTO identifiers (kind, value, customer_id)"
            " SELECT 'user_id', 'u' || row_number() OVER (), customer_id FROM customers"
        )
        explained = await conn.fetch("EXPLAIN EXECUTE owners(ARRAY['user_id'], ARRAY['u1'])")
    plan = "\n".join(r[0] for r in explained)
    assert "Seq Scan on identifiers" not in plan, plan
    assert "identifiers_pkey" in plan, plan


async def test_a_customers_events_either_way_round_are_read_through_the_one_index_by_customer() -> None:
    async with migrated_connection("sendtime_plans") as conn:
        await conn.execute(
            "INSERT INTO customers (customer_id, version, state)"
            " SELECT gen_random_uuid(), 1, '{}' FROM generate_series(1, 2000)"
        )
        await conn.execute(
            "INSERT INTO events (event_id, customer_id, event_type, occurred_at, body)"
            " SELECT 'e' || n || '-' || c.customer_id, c.customer_id, 'identify',"
            " now() - n * interval '1 minute', '\\x00' FROM customers c, generate_series(1, 10) n"
        )
        await conn.execute("ANALYZE events")
        indexes = {
            r["indexname"]
            for r in await conn.fetch("SELECT indexname FROM pg_indexes WHERE tablename = 'events'")
        }
        customer = await conn.fetchval("SELECT customer_id FROM customers LIMIT 1")
        explained = await conn.fetch(
            "EXPLAIN SELECT body FROM events WHERE customer_id = $1 ORDER BY occurred_at, event_id",
            customer,
        )
        newest_first = await conn.fetch(
            "EXPLAIN SELECT body FROM events WHERE customer_id = $1"
            " ORDER BY occurred_at DESC, event_id DESC LIMIT 5",
            customer,
        )
    # One index: its key (customer_id, occurred_at, event_id) is also the order a customer's
    # events are read in (a second one cost an index update more per event).
    assert indexes == {"events_pkey"}
    plan = "\n".join(r[0] for r in explained)
    assert "events_pkey" in plan and "Seq Scan" not in plan and "Sort" not in plan, plan
    backward = "\n".join(r[0] for r in newest_first)
    assert "Index Scan Backward using events_pkey" in backward and "Sort" not in backward, backward
