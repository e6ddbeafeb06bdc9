"""Profile change notices: each merged event leaves one change in the outbox, in the merge's
transaction, with the customer it was stitched to (and the customers merged into it); none for
duplicates, conflicts or erased late events; an erasure deletes a person's pending changes.
Real PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from profile_service.repository import ProfileRepository, create_pool
from profile_service.server import MIGRATIONS_DIR
from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.identifiers import IdentifierKind
from sendtime_common.migrate import migrate
from tests.conftest import empty_database
from tests.factories import event, identify, timestamp


@pytest.fixture
async def database_url() -> AsyncIterator[str]:
    """A database of its own: no relay but the test's publishes its outbox."""
    async with empty_database("sendtime_changes") as url:
        yield url


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on it, migrated."""
    made = await create_pool(database_url, min_size=1, max_size=4)
    try:
        await migrate(made, MIGRATIONS_DIR, table="schema_migrations")
        yield made
    finally:
        await made.close()


async def outbox(pool: asyncpg.Pool) -> list[tuple[str, str | None, list[str]]]:
    """The changes waiting: customer id, event id, merged customer ids; oldest first."""
    rows = await pool.fetch(
        "SELECT customer_id, event_id, merged_customer_ids FROM profile_change_outbox ORDER BY id"
    )
    return [(str(r["customer_id"]), r["event_id"], [str(m) for m in r["merged_customer_ids"]]) for r in rows]


async def test_duplicates_conflicts_and_late_events_of_an_erased_person_leave_no_change(
    pool: asyncpg.Pool, unique: str
) -> None:
    repository = ProfileRepository(pool)
    first = event(user_id=f"u-{unique}", identify=identify(first_name="Ada"))
    (merged,) = await repository.merge_events([first])
    assert await outbox(pool) == [(merged.customer_id, first.event_id, [])]
    version = await pool.fetchval("SELECT profile_version FROM profile_change_outbox")
    assert merged.profile is not None and version == merged.profile.stored.version

    # Redelivered after a crash between the commit and the ack: its change came with the commit.
    again, conflict, copy = await repository.merge_events(
        [
            first,
            event(event_id=first.event_id, user_id=f"u-{unique}", identify=identify(first_name="Eve")),
            first,
        ]
    )
    assert again.duplicate and conflict.conflict and copy.duplicate
    assert len(await outbox(pool)) == 1

    # One batch: an event, the same one again, and its conflicting twin: one change.
    fresh = event(user_id=f"u-{unique}", identify=identify(step=2))
    twin = event(event_id=fresh.event_id, user_id=f"u-{unique}", identify=identify(step=3))
    results = await repository.merge_events([fresh, fresh, twin])
    assert [(r.duplicate, r.conflict) for r in results] == [(False, False), (True, False), (False, True)]
    assert [event_id for _, event_id, _ in await outbox(pool)] == [first.event_id, fresh.event_id]

    await repository.delete_customer((IdentifierKind.USER_ID, f"u-{unique}"))
    late = event(user_id=f"u-{unique}", identify=identify(first_name="Ada"))
    late.occurred_at.CopyFrom(timestamp(datetime.now(UTC) - timedelta(minutes=5)))
    (dropped,) = await repository.merge_events([late])
    assert dropped.erased
    assert await outbox(pool) == []  # the erasure took the others, the late one left none


async def test_a_stitch_inside_one_batch_names_the_merged_customer_and_every_change_the_survivor(
    pool: asyncpg.Pool, unique: str
) -> None:
    repository = ProfileRepository(pool)
    (older,) = await repository.merge_events([event(anonymous_id=f"a-{unique}", identify=identify(a=1))])
    (newer,) = await repository.merge_events([event(user_id=f"u-{unique}", identify=identify(b=1))])
    await pool.execute("DELETE FROM profile_change_outbox")
    before = event(user_id=f"u-{unique}", identify=identify(b=2))  # to the account, merged next
    alias = event(
        user_id=f"u-{unique}",
        alias=ingest_pb2.Alias(other=ingest_pb2.CustomerIdentifiers(anonymous_id=f"a-{unique}")),
    )
    results = await repository.merge_events([before, alias])
    assert {r.customer_id for r in results} == {older.customer_id}
    assert await outbox(pool) == [
        (older.customer_id, before.event_id, []),
        (older.customer_id, alias.event_id, [newer.customer_id]),
    ]
    versions = await pool.fetch("SELECT profile_version FROM profile_change_outbox")
    final = await pool.fetchval(
        "SELECT version FROM customers WHERE customer_id = $1", uuid.UUID(older.customer_id)
    )
    assert {r["profile_version"] for r in versions} == {final}  # one commit, one version


async def test_an_erasure_deletes_the_person_s_pending_changes_under_every_id_they_had(
    pool: asyncpg.Pool, unique: str
) -> None:
    repository = ProfileRepository(pool)
    await repository.merge_events([event(anonymous_id=f"a-{unique}", identify=identify(a=1))])
    await repository.merge_events([event(user_id=f"u-{unique}", identify=identify(b=1))])
    await repository.merge_events(
        [
            event(
                user_id=f"u-{unique}",
                alias=ingest_pb2.Alias(other=ingest_pb2.CustomerIdentifiers(anonymous_id=f"a-{unique}")),
            )
        ]
    )
    other = event(user_id=f"other-{unique}", identify=identify(c=1))
    await repository.merge_events([other])
    assert len({customer for customer, _, _ in await outbox(pool)}) == 3  # visitor, account, other

    await repository.delete_customer((IdentifierKind.ANONYMOUS_ID, f"a-{unique}"))
    assert [event_id for _, event_id, _ in await outbox(pool)] == [other.event_id]
