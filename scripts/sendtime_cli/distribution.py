"""Where each table of the shared database would live on a distributed PostgreSQL (Citus), and
the statements that put it there (docs/scaling.md#citus).

One primary is what Sendtime runs on today; this is what keeps the schema ready to outgrow it.
tests/test_distribution.py checks the migrated schema against it: every table is placed, every
key of a distributed table includes its distribution column, foreign keys stay inside what Citus
allows, and the merge never changes a distribution column (Citus refuses that).

- **by customer**: a customer's rows, on the node of its customer; tables of one ``group`` are
  co-located (joined and kept together in one transaction per customer).
- **by own key**: looked up by something other than the customer (an identifier, an event id),
  each distributed by that key.
- **reference**: small, read everywhere, copied to every node.
- **local**: on the coordinator: queues read oldest first across all customers, counters, logs,
  migration records.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Placement(enum.Enum):
    BY_CUSTOMER = "by customer"
    BY_OWN_KEY = "by own key"
    REFERENCE = "reference"
    LOCAL = "local"


@dataclass(frozen=True)
class Table:
    placement: Placement
    column: str = ""  # the distribution column (distributed tables)
    group: str = ""  # tables of one group are co-located; the first listed anchors it


def _by_customer(column: str, group: str) -> Table:
    return Table(Placement.BY_CUSTOMER, column, group)


def _by_own_key(column: str) -> Table:
    return Table(Placement.BY_OWN_KEY, column)


REFERENCE = Table(Placement.REFERENCE)
LOCAL = Table(Placement.LOCAL)

TABLES: dict[str, Table] = {
    # profile: a customer's profile, events and identity history, by customer id
    "customers": _by_customer("customer_id", "profiles"),
    "events": _by_customer("customer_id", "profiles"),
    "merges": _by_customer("survivor_id", "profiles"),
    "blocked_merges": _by_customer("customer_id", "profiles"),
    # found by what an event names, before its customer is known
    "identifiers": _by_own_key("value"),
    "event_ids": _by_own_key("event_id"),
    "erasure_tombstones": _by_own_key("identifier_hash"),
    "profile_change_outbox": LOCAL,
    "erasure_notice_outbox": LOCAL,
    "log_erasure_outbox": LOCAL,
    "unmerged_events": LOCAL,
    "schema_migrations": LOCAL,
    # ingest: dedup records by event id and business key
    "ingest_processed_events": _by_own_key("event_id"),
    "ingest_business_keys": _by_own_key("key_value"),
    "ingest_rejected_events": LOCAL,
    "ingest_counts": LOCAL,
    "ingest_count_flushes": LOCAL,
    "ingest_schema_migrations": LOCAL,
    # triggers: a customer's episodes and fires, by its customer id (text: its own group)
    "triggers_episodes": _by_customer("customer_id", "triggers"),
    "triggers_known_exits": _by_customer("customer_id", "triggers"),
    "triggers_fires": _by_customer("customer_id", "triggers"),
    "triggers_customer_fires": _by_customer("customer_id", "triggers"),
    "triggers_triggers": REFERENCE,
    "triggers_destinations": REFERENCE,
    "triggers_deliveries": LOCAL,
    "triggers_delivery_attempts": LOCAL,
    "triggers_replicas": LOCAL,
    "triggers_schema_migrations": LOCAL,
    # sync: what was pushed for which customer, by customer key
    "sync_push_ledger": _by_customer("customer_key", "sync"),
    "sync_push_pending": _by_customer("customer_key", "sync"),
    "sync_connectors": REFERENCE,
    "sync_schema_migrations": LOCAL,
    # render: templates and the catalog, read by every render
    "render_templates": REFERENCE,
    "render_template_versions": REFERENCE,
    "render_catalog_products": REFERENCE,
    "render_co_purchases": REFERENCE,
    "render_category_popularity": REFERENCE,
    "render_catalog_processed_events": _by_own_key("event_id"),
    "render_schema_migrations": LOCAL,
    # keys and audit (sendtime_common.auth)
    "api_keys": REFERENCE,
    "api_key_generation": REFERENCE,
    "audit_events": LOCAL,
    "auth_schema_migrations": LOCAL,
}


def citus_statements() -> list[str]:
    """The statements that distribute the migrated schema from a Citus coordinator: reference
    tables first (distributed ones point at them), then each co-location group, anchored by its
    first table, then the tables kept by their own key. Local tables stay as they are; one with a
    key to a reference table (triggers_deliveries) becomes a Citus local table as that is made
    (``citus.enable_local_reference_table_foreign_keys``, on by default)."""
    statements = [
        f"SELECT create_reference_table('{name}');"
        for name, table in TABLES.items()
        if table.placement is Placement.REFERENCE
    ]
    anchors: dict[str, str] = {}
    for name, table in TABLES.items():
        if table.placement is Placement.BY_CUSTOMER:
            anchor = anchors.setdefault(table.group, name)
            colocate = "none" if anchor == name else anchor
            statements.append(
                f"SELECT create_distributed_table('{name}', '{table.column}', colocate_with => '{colocate}');"
            )
    statements += [
        f"SELECT create_distributed_table('{name}', '{table.column}', colocate_with => 'none');"
        for name, table in TABLES.items()
        if table.placement is Placement.BY_OWN_KEY
    ]
    return statements


def events_hash_partition_statements(partitions: int) -> list[str]:
    """The statements that turn the profile service's ``events`` into ``partitions`` hash
    partitions by customer, keeping its key, its key to ``customers`` and its rows (one
    transaction; the table is locked meanwhile). Not a migration: on the bench's loads one table
    merged faster (docs/scaling.md#hash-partitioning); this is for when one table's vacuum and
    index builds take too long."""
    if not 2 <= partitions <= 256:
        raise ValueError(f"partitions must be 2 to 256, got {partitions}")
    return [
        "ALTER TABLE events RENAME TO events_unpartitioned;",
        "ALTER INDEX events_pkey RENAME TO events_unpartitioned_pkey;",
        "ALTER TABLE events_unpartitioned RENAME CONSTRAINT events_customer_id_fkey"
        " TO events_unpartitioned_customer_id_fkey;",
        "CREATE TABLE events (LIKE events_unpartitioned INCLUDING DEFAULTS INCLUDING COMPRESSION)"
        " PARTITION BY HASH (customer_id);",
        *(
            f"CREATE TABLE events_p{i} PARTITION OF events"
            f" FOR VALUES WITH (MODULUS {partitions}, REMAINDER {i});"
            for i in range(partitions)
        ),
        "ALTER TABLE events ADD CONSTRAINT events_pkey PRIMARY KEY (customer_id, occurred_at, event_id);",
        "ALTER TABLE events ADD CONSTRAINT events_customer_id_fkey FOREIGN KEY (customer_id)"
        " REFERENCES customers ON DELETE CASCADE;",
        "INSERT INTO events SELECT * FROM events_unpartitioned;",
        "DROP TABLE events_unpartitioned;",
    ]
