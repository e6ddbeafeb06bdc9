"""The schema stays ready for a database distributed by customer (Citus; docs/scaling.md#citus):
checked on every service's migrated tables against ``sendtime_cli.distribution``, by the rules
Citus enforces when a table is distributed (no Citus server here: these are its documented
limits, checked on PostgreSQL's catalog, and its refusal to change a distribution column,
emulated with triggers while the merge runs)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from profile_service.merge_transaction import _MOVED_BY_CUSTOMER
from profile_service.repository import ProfileRepository
from sendtime.ingest.v1 import ingest_pb2
from sendtime_cli.database import SERVICES, SERVICES_DIR
from sendtime_cli.distribution import TABLES, Placement, citus_statements, events_hash_partition_statements
from sendtime_common.auth.key_store import MIGRATIONS_DIR as AUTH_MIGRATIONS_DIR
from sendtime_common.auth.key_store import MIGRATIONS_TABLE as AUTH_MIGRATIONS_TABLE
from sendtime_common.identifiers import IdentifierKind
from sendtime_common.migrate import migrate
from tests.conftest import empty_database, repo_root
from tests.factories import event, identify
from tests.profile_service.migrated import migrated_pool

DISTRIBUTED = {
    name: t for name, t in TABLES.items() if t.placement in (Placement.BY_CUSTOMER, Placement.BY_OWN_KEY)
}

# Every key of a table: primary keys, unique constraints and unique indexes, by their columns.
_KEYS = """
SELECT c.relname AS table_name, i.indexrelid::regclass::text AS key_name,
       array_agg(a.attname ORDER BY a.attname) AS columns
FROM pg_index i
JOIN pg_class c ON c.oid = i.indrelid
JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'public'
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY(i.indkey)
WHERE i.indisunique
GROUP BY 1, 2
"""
_FOREIGN_KEYS = """
SELECT k.conname, src.relname AS source, dst.relname AS target,
       (SELECT array_agg(a.attname ORDER BY n) FROM unnest(k.conkey) WITH ORDINALITY AS u(attnum, n)
        JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.attnum) AS source_columns,
       (SELECT array_agg(a.attname ORDER BY n) FROM unnest(k.confkey) WITH ORDINALITY AS u(attnum, n)
        JOIN pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = u.attnum) AS target_columns
FROM pg_constraint k
JOIN pg_class src ON src.oid = k.conrelid
JOIN pg_class dst ON dst.oid = k.confrelid
JOIN pg_namespace n ON n.oid = src.relnamespace AND n.nspname = 'public'
WHERE k.contype = 'f'
"""


@pytest.fixture(scope="module")
async def schema() -> AsyncIterator[str]:
    """A database with every service's migrations (and the key tables) applied: its URL."""
    async with empty_database("sendtime_distribution") as url:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
        try:
            for package, table in SERVICES.values():
                await migrate(pool, SERVICES_DIR / package / "migrations", table)
            await migrate(pool, AUTH_MIGRATIONS_DIR, AUTH_MIGRATIONS_TABLE)
        finally:
            await pool.close()
        yield url


async def _fetch(url: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()


async def test_every_table_has_a_place(schema: str) -> None:
    rows = await _fetch(
        schema,
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition",
    )
    assert {r["relname"] for r in rows} == set(TABLES)


async def test_every_key_of_a_distributed_table_includes_its_distribution_column(schema: str) -> None:
    keys = await _fetch(schema, _KEYS)
    missing = [
        (r["table_name"], r["key_name"], r["columns"])
        for r in keys
        if r["table_name"] in DISTRIBUTED and DISTRIBUTED[r["table_name"]].column not in r["columns"]
    ]
    assert missing == []
    keyed = {r["table_name"] for r in keys}
    assert {"customers", "events", "identifiers", "event_ids"} <= keyed  # the check saw them


async def test_foreign_keys_stay_within_what_citus_allows(schema: str) -> None:
    refused = []
    for fk in await _fetch(schema, _FOREIGN_KEYS):
        source, target = TABLES[fk["source"]], TABLES[fk["target"]]
        if target.placement is Placement.REFERENCE:
            allowed = True  # from anywhere: reference tables are on every node
        elif source.placement is Placement.LOCAL:
            allowed = target.placement is Placement.LOCAL
        elif source.placement is Placement.BY_CUSTOMER:
            # to a co-located table, through the distribution columns of both
            allowed = (
                target.placement is Placement.BY_CUSTOMER
                and source.group == target.group
                and list(zip(fk["source_columns"], fk["target_columns"], strict=True)).count(
                    (source.column, target.column)
                )
                == 1
            )
        else:
            allowed = False  # a table kept by its own key, or a reference table, to anything else
        if not allowed:
            refused.append(fk["conname"])
    assert refused == []


async def test_the_tables_of_a_co_location_group_share_their_column_type(schema: str) -> None:
    types = {
        (r["relname"], r["attname"]): r["type"]
        for r in await _fetch(
            schema,
            "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod) AS type"
            " FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'public' WHERE a.attnum > 0",
        )
    }
    groups: dict[str, set[str]] = {}
    for name, table in DISTRIBUTED.items():
        assert (name, table.column) in types, f"{name} has no column {table.column}"
        if table.placement is Placement.BY_CUSTOMER:
            groups.setdefault(table.group, set()).add(types[name, table.column])
    assert groups == {"profiles": {"uuid"}, "triggers": {"text"}, "sync": {"text"}}


async def test_a_merge_of_customers_moves_every_column_of_the_rows_it_moves(schema: str) -> None:
    columns = {
        table: {r["attname"] for r in await _fetch(schema, _columns_of(table))}
        for table, _, _ in _MOVED_BY_CUSTOMER
    }
    for table, column, others in _MOVED_BY_CUSTOMER:
        assert {column, *others.split(", ")} == columns[table], table


def _columns_of(table: str) -> str:
    return (
        "SELECT a.attname FROM pg_attribute a WHERE a.attnum > 0 AND NOT a.attisdropped"
        f" AND a.attrelid = 'public.{table}'::regclass"
    )


async def test_merging_linking_and_erasing_people_never_changes_a_distribution_column(unique: str) -> None:
    """As Citus would refuse: a trigger on each distributed table's column fails the statement."""
    async with migrated_pool("sendtime_distribution_merge") as pool:
        await pool.execute(
            "CREATE FUNCTION refuse_moving_a_row() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN RAISE EXCEPTION 'the distribution column of % changed', TG_TABLE_NAME; END $$"
        )
        profile_tables = ("customers", "events", "merges", "blocked_merges", "identifiers", "event_ids")
        for name in profile_tables:
            column = TABLES[name].column
            await pool.execute(
                f"CREATE TRIGGER refuse_moving_{name} BEFORE UPDATE OF {column} ON {name} FOR EACH ROW"
                f" WHEN (OLD.{column} IS DISTINCT FROM NEW.{column})"
                " EXECUTE FUNCTION refuse_moving_a_row()"
            )
        repository = ProfileRepository(pool)
        ada, anon = f"ada-{unique}", f"anon-{unique}"
        await repository.merge_events([event(user_id=ada, identify=identify(a=1))])
        await repository.merge_events([event(anonymous_id=anon, identify=identify(b=2))])
        alias = ingest_pb2.Alias(other=ingest_pb2.CustomerIdentifiers(anonymous_id=anon))
        (linked,) = await repository.merge_events([event(user_id=ada, alias=alias)])
        assert len(linked.merged_customer_ids) == 1  # the two were merged: their rows moved
        survivor = await pool.fetchval("SELECT customer_id FROM customers")
        moved = await pool.fetchval("SELECT count(*) FROM events WHERE customer_id = $1", survivor)
        assert moved == 3 and await pool.fetchval("SELECT count(*) FROM merges") == 1
        erased = await repository.delete_customer((IdentifierKind.USER_ID, ada))
        assert erased is not None and erased.events_deleted == 3
        assert await pool.fetchval("SELECT count(*) FROM event_ids") == 0


async def test_events_hash_partitioned_by_customer_keep_their_rows_and_the_merge_works_on_them(
    unique: str,
) -> None:
    async with migrated_pool("sendtime_partitioned") as pool:
        repository = ProfileRepository(pool)
        people = [f"p{n}-{unique}" for n in range(40)]
        before = [event(anonymous_id=who, identify=identify(n=1)) for who in people]
        await repository.merge_events(before)
        async with pool.acquire() as conn, conn.transaction():
            for statement in events_hash_partition_statements(4):
                await conn.execute(statement)

        partitions = await pool.fetch(
            "SELECT tableoid::regclass::text AS partition, count(*) FROM events GROUP BY 1 ORDER BY 1"
        )
        assert [r["partition"] for r in partitions] == [f"events_p{i}" for i in range(4)]
        assert sum(r["count"] for r in partitions) == len(people)
        # A redelivery is still a duplicate; new events, a link of two people and an erasure work.
        (again,) = await repository.merge_events([before[0]])
        assert again.duplicate
        alias = ingest_pb2.Alias(other=ingest_pb2.CustomerIdentifiers(anonymous_id=people[1]))
        (linked,) = await repository.merge_events([event(anonymous_id=people[0], alias=alias)])
        assert len(linked.merged_customer_ids) == 1
        erased = await repository.delete_customer((IdentifierKind.ANONYMOUS_ID, people[0]))
        assert erased is not None and erased.events_deleted == 3
        assert await pool.fetchval("SELECT count(*) FROM events") == len(people) - 2


def test_the_scaling_guide_lists_the_statements_that_distribute_and_partition_the_schema() -> None:
    guide = (repo_root() / "docs" / "scaling.md").read_text()
    assert "\n".join(citus_statements()) in guide
    assert "\n".join(events_hash_partition_statements(8)) in guide
