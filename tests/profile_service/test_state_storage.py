"""Migration 0005: customers' states are stored as json, compressed with lz4, and states that
were written as jsonb before it read back the same after it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from profile_service.state import ProfileState, from_json, replay, to_json
from tests.factories import cart_item_added, event, identify, product_viewed
from tests.profile_service.migrated import migrated_connection, migrations

STATE_MIGRATION = "0005_state_as_json_lz4.sql"
START = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)


def a_state(user_id: str) -> ProfileState:
    """A state of several KB, as an active shopper's is: past the size PostgreSQL compresses."""
    events = [event(user_id=user_id, identify=identify(first_name="Ada", tier="gold"), occurred_at=START)]
    for n in range(20):
        at = START + timedelta(minutes=n + 1)
        events.append(
            event(user_id=user_id, product_viewed=product_viewed(f"sku-{n}", f"Product {n}"), occurred_at=at)
        )
        events.append(
            event(user_id=user_id, cart_item_added=cart_item_added(f"sku-{n}", 1, "9.99"), occurred_at=at)
        )
    return replay(events)


async def test_states_stored_as_jsonb_survive_the_move_to_lz4_compressed_json() -> None:
    later = migrations(starting_at=STATE_MIGRATION)
    assert later[0].name == STATE_MIGRATION
    old_state, new_state = a_state("old"), a_state("new")

    async with migrated_connection("sendtime_state_storage", before=STATE_MIGRATION) as conn:
        old_id, new_id = uuid.uuid4(), uuid.uuid4()
        await conn.execute(
            "INSERT INTO customers (customer_id, version, state) VALUES ($1, 1, $2::jsonb)",
            old_id,
            to_json(old_state),
        )

        for migration in later:
            await conn.execute(migration.read_text())
        await conn.execute(
            "INSERT INTO customers (customer_id, version, state) VALUES ($1, 1, $2::json)",
            new_id,
            to_json(new_state),
        )

        column_type = await conn.fetchval(
            "SELECT data_type FROM information_schema.columns"
            " WHERE table_name = 'customers' AND column_name = 'state'"
        )
        assert column_type == "json"
        stored = {
            r["customer_id"]: r
            for r in await conn.fetch(
                "SELECT customer_id, state, pg_column_compression(state) AS compression,"
                " octet_length(state::text) AS size FROM customers"
            )
        }
        assert from_json(stored[old_id]["state"]) == old_state
        assert from_json(stored[new_id]["state"]) == new_state
        assert stored[new_id]["size"] > 2048  # so PostgreSQL compresses it
        assert stored[new_id]["compression"] == "lz4"
        assert stored[old_id]["compression"] == "lz4"  # the type change rewrote it
