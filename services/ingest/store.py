"""Ingest's PostgreSQL tables: processed event ids with their fingerprints and business keys
(dedup beyond the event log's window), the dead-letter store (rejected events and idempotency
conflicts), and outcome counts. Every method is one statement for a
whole batch: the ingest hot path makes a fixed number of round trips per batch, not per event.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import asyncpg

from ingest.envelope import BusinessKey
from ingest.metrics import count_dead_letters
from sendtime_common.database import STORE_ERRORS

StoreError = STORE_ERRORS
"""What a store call raises when PostgreSQL is unreachable or fails."""

CountKey = tuple[date, int, int, int]  # (day, source, outcome, duplicate kind)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A dead letter to store: the event as received, why (a ``google.rpc.Status``), and the
    hashes of the identifiers it names (an erasure notice finds it by them)."""

    event_id: str
    source: int
    event: bytes
    status: bytes
    identifier_hashes: tuple[bytes, ...]
    # A webhook item that could not be mapped: a ``sendtime.ingest.v1.WebhookItem``.
    webhook_item: bytes | None = None


@dataclass(frozen=True, slots=True)
class StoredRejection:
    id: int
    event: bytes
    status: bytes
    rejected_at: datetime
    replayed_at: datetime | None
    webhook_item: bytes | None = None


_REJECTION_COLUMNS = "id, event, status, rejected_at, replayed_at, webhook_item"


# One primary-key probe per id, whatever the table's statistics say. ``event_id = ANY($1)``
# lets the planner scan the whole table instead, and it does for a few hundred ids while the
# table holds tens of thousands of rows and random reads look dear: 3.6 ms against 0.55 ms a
# batch of 256 at 40,000 rows, paid by every batch (docs/benchmarks.md). LIMIT 1 keeps the
# subquery from being flattened into a join the planner could turn into that same scan.
SEEN_EVENT_IDS = (
    "SELECT q.event_id, seen.fingerprint FROM unnest($1::text[]) AS q(event_id),"
    " LATERAL (SELECT p.fingerprint FROM ingest_processed_events p WHERE p.event_id = q.event_id LIMIT 1)"
    " AS seen"
)


class IngestStore:
    def __init__(self, pool: asyncpg.Pool, *, purge_chunk: int = 10_000) -> None:
        self._pool = pool
        self._purge_chunk = purge_chunk

    async def seen_event_ids(self, event_ids: Sequence[str]) -> dict[str, bytes | None]:
        """Which of these ids were stored in the event log before (within the dedup window), each
        with the fingerprint of the event stored (None when unknown)."""
        rows = await self._pool.fetch(SEEN_EVENT_IDS, list(event_ids))
        return {row["event_id"]: row["fingerprint"] for row in rows}

    async def claim_business_keys(
        self, claims: Mapping[BusinessKey, str], stale_after: timedelta
    ) -> dict[BusinessKey, str]:
        """Claim each business key for its event id; the event id that owns each key afterwards
        (a key missing from the answer was released by its owner meanwhile: retry later).

        A key is owned by the first event to claim it. A claim not yet confirmed as stored
        after ``stale_after`` was abandoned (its publish failed and the release failed too) and
        goes to the new claimant.
        """
        if not claims:
            return {}
        keys = list(claims)
        rows = await self._pool.fetch(
            """
            WITH wanted AS (
                SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) AS w(key_kind, key_value, event_id)
            ), claimed AS (
                INSERT INTO ingest_business_keys AS k (key_kind, key_value, event_id, claimed_at)
                SELECT key_kind, key_value, event_id, now() FROM wanted
                ON CONFLICT (key_kind, key_value) DO UPDATE
                    SET event_id = EXCLUDED.event_id, claimed_at = now()
                    WHERE NOT k.stored AND k.claimed_at < now() - $4::interval
                RETURNING key_kind, key_value, event_id
            )
            SELECT key_kind, key_value, event_id FROM claimed
            UNION ALL
            SELECT k.key_kind, k.key_value, k.event_id
            FROM ingest_business_keys k JOIN wanted w USING (key_kind, key_value)
            WHERE NOT EXISTS (
                SELECT 1 FROM claimed c WHERE c.key_kind = k.key_kind AND c.key_value = k.key_value
            )
            """,
            [k[0] for k in keys],
            [k[1] for k in keys],
            [claims[k] for k in keys],
            stale_after,
        )
        owners = {(row["key_kind"], row["key_value"]): row["event_id"] for row in rows}
        missing = [k for k in keys if k not in owners]
        if missing:  # claimed by a transaction that committed after this statement's snapshot
            rows = await self._pool.fetch(
                "SELECT k.key_kind, k.key_value, k.event_id FROM ingest_business_keys k"
                " JOIN unnest($1::text[], $2::text[]) AS m(key_kind, key_value) USING (key_kind, key_value)",
                [k[0] for k in missing],
                [k[1] for k in missing],
            )
            owners.update({(row["key_kind"], row["key_value"]): row["event_id"] for row in rows})
        return owners

    async def record_stored(
        self,
        events: Sequence[tuple[str, bytes | None]],
        keys: Sequence[BusinessKey],
        received_at: datetime,
    ) -> None:
        """Remember the ids (each with its event's fingerprint) stored in the event log and
        confirm their business keys, atomically: one statement (a data-modifying CTE runs
        whether or not the rest reads it), one round trip."""
        if not events and not keys:
            return
        await self._pool.execute(
            "WITH recorded AS ("
            " INSERT INTO ingest_processed_events (event_id, fingerprint, received_at)"
            " SELECT e, f, $3 FROM unnest($1::text[], $2::bytea[]) AS s(e, f) ON CONFLICT DO NOTHING)"
            " UPDATE ingest_business_keys k SET stored = true"
            " FROM unnest($4::text[], $5::text[]) AS s(key_kind, key_value)"
            " WHERE k.key_kind = s.key_kind AND k.key_value = s.key_value",
            [event_id for event_id, _ in events],
            [fingerprint for _, fingerprint in events],
            received_at,
            [k[0] for k in keys],
            [k[1] for k in keys],
        )

    async def release_business_keys(self, claims: Mapping[BusinessKey, str]) -> None:
        """Give up claims whose events could not be stored, so a retry can claim them again."""
        if not claims:
            return
        keys = list(claims)
        await self._pool.execute(
            "DELETE FROM ingest_business_keys k"
            " USING unnest($1::text[], $2::text[], $3::text[]) AS r(key_kind, key_value, event_id)"
            " WHERE k.key_kind = r.key_kind AND k.key_value = r.key_value AND k.event_id = r.event_id"
            " AND NOT k.stored",
            [k[0] for k in keys],
            [k[1] for k in keys],
            [claims[k] for k in keys],
        )

    async def add_rejections(self, rejections: Sequence[Rejection], at: datetime) -> None:
        """Store dead letters, rejected ``at``."""
        if not rejections:
            return
        # executemany, not unnest: each row has an array of its own (asyncpg pipelines the rows).
        await self._pool.executemany(
            "INSERT INTO ingest_rejected_events (event_id, source, event, status, identifier_hashes,"
            " rejected_at) VALUES ($1, $2, $3, $4, $5, $6)",
            [(r.event_id, r.source, r.event, r.status, list(r.identifier_hashes), at) for r in rejections],
        )
        count_dead_letters((r.source for r in rejections), "event")

    async def add_webhook_items(self, rejections: Sequence[Rejection], at: datetime) -> None:
        """Store webhook items that could not be mapped, rejected ``at``; one already stored (a
        redelivery: the same digest for its event id) is left as it is."""
        if not rejections:
            return
        await self._pool.executemany(
            "INSERT INTO ingest_rejected_events (event_id, source, event, status, identifier_hashes,"
            " rejected_at, webhook_item) VALUES ($1, $2, $3, $4, $5, $6, $7)"
            " ON CONFLICT (event_id) WHERE webhook_item IS NOT NULL DO NOTHING",
            [
                (r.event_id, r.source, r.event, r.status, list(r.identifier_hashes), at, r.webhook_item)
                for r in rejections
            ],
        )
        count_dead_letters((r.source for r in rejections), "webhook_item")

    async def delete_rejections_of(self, identifier_hashes: Sequence[bytes]) -> int:
        """Delete the dead letters naming any of these identifiers (an erased person's); how many."""
        result = await self._pool.execute(
            "DELETE FROM ingest_rejected_events WHERE identifier_hashes && $1::bytea[]",
            list(identifier_hashes),
        )
        return int(result.split()[-1])

    async def list_rejections(
        self, *, limit: int, after: tuple[datetime, int] | None, replayed: bool | None, source: int | None
    ) -> list[StoredRejection]:
        """Dead letters newest first, after the (rejected_at, id) position ``after``."""
        rows = await self._pool.fetch(
            f"""
            SELECT {_REJECTION_COLUMNS} FROM ingest_rejected_events
            WHERE ($1::timestamptz IS NULL OR (rejected_at, id) < ($1, $2))
              AND ($3::boolean IS NULL OR (replayed_at IS NOT NULL) = $3)
              AND ($4::int IS NULL OR source = $4)
            ORDER BY rejected_at DESC, id DESC
            LIMIT $5
            """,
            after[0] if after else None,
            after[1] if after else None,
            replayed,
            source,
            limit,
        )
        return [StoredRejection(**dict(row)) for row in rows]

    async def get_rejection(self, rejection_id: int) -> StoredRejection | None:
        row = await self._pool.fetchrow(
            f"SELECT {_REJECTION_COLUMNS} FROM ingest_rejected_events WHERE id = $1",
            rejection_id,
        )
        return StoredRejection(**dict(row)) if row else None

    async def update_rejection(
        self, rejection_id: int, *, status: bytes | None, replayed_at: datetime | None
    ) -> StoredRejection | None:
        """After a replay: mark it replayed, or store the reasons it is still rejected. None
        when it is gone (its retention ran out during the replay)."""
        row = await self._pool.fetchrow(
            "UPDATE ingest_rejected_events SET status = coalesce($2, status), replayed_at = $3"
            f" WHERE id = $1 RETURNING {_REJECTION_COLUMNS}",
            rejection_id,
            status,
            replayed_at,
        )
        return StoredRejection(**dict(row)) if row else None

    async def add_counts(self, counts: Mapping[CountKey, int], flush_id: uuid.UUID) -> None:
        """Add ``counts`` to the totals, once per ``flush_id``: a retry of a write that did commit
        adds nothing."""
        if not counts:
            return
        keys = list(counts)
        async with self._pool.acquire() as conn, conn.transaction():
            first = await conn.execute(
                "INSERT INTO ingest_count_flushes (flush_id) VALUES ($1) ON CONFLICT DO NOTHING", flush_id
            )
            if first == "INSERT 0 0":
                return
            await conn.execute(
                """
            INSERT INTO ingest_counts AS c (day, source, outcome, duplicate_kind, count)
            SELECT * FROM unnest($1::date[], $2::int[], $3::int[], $4::int[], $5::bigint[])
            ON CONFLICT (day, source, outcome, duplicate_kind) DO UPDATE SET count = c.count + EXCLUDED.count
            """,
                [k[0] for k in keys],
                [k[1] for k in keys],
                [k[2] for k in keys],
                [k[3] for k in keys],
                [counts[k] for k in keys],
            )

    async def counts(self, since: date | None) -> tuple[dict[tuple[int, int, int], int], date | None]:
        """Totals per (source, outcome, duplicate kind) from ``since`` on, and the first day."""
        rows = await self._pool.fetch(
            "SELECT source, outcome, duplicate_kind, sum(count) AS count, min(day) AS first_day"
            " FROM ingest_counts WHERE $1::date IS NULL OR day >= $1"
            " GROUP BY source, outcome, duplicate_kind",
            since,
        )
        first = min((row["first_day"] for row in rows), default=None)
        return {(r["source"], r["outcome"], r["duplicate_kind"]): int(r["count"]) for r in rows}, first

    async def purge_processed(self, older_than: datetime) -> int:
        """Forget processed ids received before ``older_than`` (the dedup window); how many."""
        return await self._purge("ingest_processed_events", "received_at", older_than)

    async def purge_business_keys(self, older_than: datetime) -> int:
        """Forget business keys claimed before ``older_than``; how many."""
        return await self._purge("ingest_business_keys", "claimed_at", older_than)

    async def purge_rejections(self, older_than: datetime) -> int:
        """Delete dead letters rejected before ``older_than``, replayed or not; how many."""
        return await self._purge("ingest_rejected_events", "rejected_at", older_than)

    async def purge_count_flushes(self, older_than: datetime) -> int:
        """Forget the ids of count writes made before ``older_than``; how many."""
        return await self._purge("ingest_count_flushes", "flushed_at", older_than)

    async def _purge(self, table: str, column: str, older_than: datetime) -> int:
        # In chunks, each its own short transaction: a day's backlog of millions of rows must
        # not become one long transaction holding locks and bloating the table while it runs.
        statement = (  # table and column are this module's constants, never input
            f"DELETE FROM {table} WHERE ctid = ANY(ARRAY("
            f"SELECT ctid FROM {table} WHERE {column} < $1 LIMIT $2))"
        )
        purged = 0
        while True:
            result = await self._pool.execute(statement, older_than, self._purge_chunk)
            deleted = int(result.split()[-1])
            purged += deleted
            if deleted < self._purge_chunk:
                return purged
