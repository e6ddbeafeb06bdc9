"""An event id is unique across customers, though events are kept by customer (migration 0010):
``event_ids`` holds every merged event's id, and the merge finds a merged event under the
customers owning its identifiers. A redelivery is a no-op wherever its person's events went
since; another event under a merged id is a conflict, whoever it names."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from profile_service.change_outbox import _READ, change_message
from profile_service.repository import ProfileRepository
from sendtime.ingest.v1 import ingest_pb2
from sendtime.profile.v1 import profile_pb2
from sendtime_common.event_integrity import DERIVED_ID_PREFIX
from sendtime_common.identifiers import IdentifierKind
from tests.conftest import empty_database
from tests.factories import event, identify
from tests.profile_service.migrated import migrated_pool, migrations


@pytest.fixture
async def pool() -> AsyncIterator[asyncpg.Pool]:
    """A database of the test's own, migrated: its counts are the test's."""
    async with migrated_pool("sendtime_event_ids") as made:
        yield made


async def _ids(pool: asyncpg.Pool) -> set[str]:
    return {r["event_id"] for r in await pool.fetch("SELECT event_id FROM event_ids")}


async def test_another_event_under_an_id_merged_for_someone_else_is_a_conflict(
    pool: asyncpg.Pool, unique: str
) -> None:
    repository = ProfileRepository(pool)
    first = event(event_id=f"e-{unique}", user_id=f"ada-{unique}", identify=identify(tier="gold"))
    (merged,) = await repository.merge_events([first])
    other = event(event_id=f"e-{unique}", user_id=f"eve-{unique}", identify=identify(tier="bronze"))
    (outcome,) = await repository.merge_events([other])
    assert outcome.conflict and not outcome.duplicate and not outcome.erased and outcome.customer_id == ""
    assert not await repository.find_by_identifiers([(IdentifierKind.USER_ID, f"eve-{unique}")])
    assert await pool.fetchval("SELECT count(*) FROM events") == 1
    assert merged.customer_id == str(await pool.fetchval("SELECT customer_id FROM events"))


async def test_a_redelivery_after_its_person_was_merged_into_another_is_a_duplicate_of_the_survivor(
    pool: asyncpg.Pool, unique: str
) -> None:
    repository = ProfileRepository(pool)
    older = event(user_id=f"ada-{unique}", identify=identify(a=1))
    newer = event(anonymous_id=f"anon-{unique}", identify=identify(b=2))
    (survivor,) = await repository.merge_events([older])
    (absorbed,) = await repository.merge_events([newer])
    link = event(
        user_id=f"ada-{unique}",
        alias=ingest_pb2.Alias(other=ingest_pb2.CustomerIdentifiers(anonymous_id=f"anon-{unique}")),
    )
    (linked,) = await repository.merge_events([link])
    assert linked.merged_customer_ids == (absorbed.customer_id,)

    (again,) = await repository.merge_events([newer])  # its events moved to the survivor
    assert again.duplicate and again.customer_id == survivor.customer_id and not again.conflict
    assert await pool.fetchval("SELECT count(*) FROM events") == 3

    # Their profile changes, not yet published, still carry their events, moved or not.
    async with pool.acquire() as conn, conn.transaction():
        changes = [change_message(row) for row in await conn.fetch(_READ, 10)]
    published = [profile_pb2.ProfileChange.FromString(c.payload) for c in changes]
    assert [(c.customer_id, c.event) for c in published] == [
        (survivor.customer_id, older),
        (absorbed.customer_id, newer),
        (survivor.customer_id, link),
    ]


async def test_a_redelivery_after_its_person_was_erased_is_dropped_and_their_ids_are_gone(
    pool: asyncpg.Pool, unique: str
) -> None:
    repository = ProfileRepository(pool)
    kept = event(user_id=f"eve-{unique}", identify=identify(a=1))
    erased = [event(user_id=f"ada-{unique}", identify=identify(step=n)) for n in range(3)]
    await repository.merge_events([kept, *erased])
    gone = await repository.delete_customer((IdentifierKind.USER_ID, f"ada-{unique}"))
    assert gone is not None and gone.events_deleted == 3
    assert await _ids(pool) == {kept.event_id}
    assert not await pool.fetchval("SELECT count(*) FROM identifiers WHERE value = $1", f"ada-{unique}")

    (late,) = await repository.merge_events([erased[0]])  # sent before the erasure, delivered after
    assert late.erased and not late.conflict and not late.duplicate
    assert not await repository.find_by_identifiers([(IdentifierKind.USER_ID, f"ada-{unique}")])


async def test_an_id_derived_from_the_content_conflicts_with_nothing(pool: asyncpg.Pool, unique: str) -> None:
    repository = ProfileRepository(pool)
    derived = f"{DERIVED_ID_PREFIX}{unique}"
    await repository.merge_events([event(event_id=derived, user_id=f"ada-{unique}", identify=identify(a=1))])
    (outcome,) = await repository.merge_events(
        [event(event_id=derived, user_id=f"eve-{unique}", identify=identify(a=2))]
    )
    assert outcome.duplicate and not outcome.conflict and not outcome.erased
    assert not await repository.find_by_identifiers([(IdentifierKind.USER_ID, f"eve-{unique}")])


async def test_the_migration_keeps_every_merged_id_and_keys_events_by_customer(unique: str) -> None:
    async with empty_database("sendtime_event_ids_migration") as url:
        conn = await asyncpg.connect(url)
        try:
            for migration in migrations(before="0010"):
                await conn.execute(migration.read_text())
            customer = uuid.uuid4()
            await conn.execute(
                "INSERT INTO customers (customer_id, version, state) VALUES ($1, 1, '{}')", customer
            )
            await conn.execute(
                "INSERT INTO events (event_id, customer_id, event_type, occurred_at, body, log_position)"
                " SELECT 'e' || n, $1, 'identify', now(), '\\x0a01' || n::text::bytea, n"
                " FROM generate_series(1, 50) n",
                customer,
            )
            # A change not yet published: it gets its event, as the relay read it before.
            await conn.execute(
                "INSERT INTO profile_change_outbox (customer_id, event_id, profile_version)"
                " VALUES ($1, 'e7', 7), ($1, NULL, 8)",
                customer,
            )
            for migration in migrations(starting_at="0010"):
                await conn.execute(migration.read_text())
            assert await conn.fetchval("SELECT count(*) FROM event_ids") == 50
            outbox = await conn.fetch(
                "SELECT event_type, body, log_position FROM profile_change_outbox ORDER BY id"
            )
            assert [tuple(r) for r in outbox] == [("identify", b"\x0a\x017", 7), (None, None, None)]
            key = await conn.fetchval(
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'events_pkey'"
            )
            assert key == "PRIMARY KEY (customer_id, occurred_at, event_id)"
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.execute("INSERT INTO event_ids (event_id) VALUES ('e1')")
        finally:
            await conn.close()
