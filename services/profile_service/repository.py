"""PostgreSQL storage of customers, identifiers, merged events, merge records and erasures.

``merge_events`` is the one write path for events: one transaction per batch (see
``merge_transaction``) that serializes on the events' identifiers (advisory locks) and on the
customer rows (row locks), so concurrent events for one customer lose no update; the event id's
primary key makes a redelivery change nothing. ``delete_customer`` erases a person and leaves
hashed tombstones that drop the person's late events.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import asyncpg.pool
import orjson

from profile_service.codec import StoredProfile, to_proto
from profile_service.identity import IdentityLimits
from profile_service.merge_rules import DEFAULT_RULES, MergeRules
from profile_service.merge_transaction import BatchMerge, DecodedStates, MergeConflict, lock_identifiers
from profile_service.state import ProfileState, from_json, replay, to_json
from sendtime.ingest.v1 import ingest_pb2
from sendtime.profile.v1 import profile_pb2
from sendtime_common import database
from sendtime_common.identifier_proto import IdentifierKey
from sendtime_common.identifiers import IdentifierHasher, IdentifierKind

log = logging.getLogger(__name__)

MAX_TRANSACTION_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class MergeRow:
    other_customer_id: str
    event_id: str
    at: datetime
    reason: str = ""  # set for a refused merge


@dataclass(frozen=True, slots=True)
class ProfileRecord:
    """A customer as stored, with its identity history."""

    stored: StoredProfile
    merges: tuple[MergeRow, ...] = ()
    blocked_merges: tuple[MergeRow, ...] = ()

    def to_proto(self) -> profile_pb2.Profile:
        profile = to_proto(self.stored)
        for row in self.merges:
            record = profile.merges.add(merged_customer_id=row.other_customer_id, event_id=row.event_id)
            record.merge_time.FromDatetime(row.at)
        for row in self.blocked_merges:
            blocked = profile.blocked_merges.add(
                other_customer_id=row.other_customer_id, event_id=row.event_id, reason=row.reason
            )
            blocked.block_time.FromDatetime(row.at)
        return profile


@dataclass(frozen=True, slots=True)
class MergeResult:
    """What merging one event did. ``profile`` is None when nothing changed: a duplicate, a
    late event of an erased person (``erased``), or another event under an id merged before
    (``conflict``: an idempotency conflict; the event was not merged)."""

    customer_id: str
    duplicate: bool
    profile: ProfileRecord | None
    merged_customer_ids: tuple[str, ...] = ()
    erased: bool = False
    conflict: bool = False


@dataclass(frozen=True, slots=True)
class ErasedCustomer:
    customer_id: str
    identifiers: tuple[IdentifierKey, ...]
    events_deleted: int


async def _init_connection(conn: asyncpg.Connection) -> None:
    # orjson: a profile's state is encoded and decoded on every merge, several times faster so.
    # The state column is json since migration 0005; jsonb stays for what reads older columns.
    for json_type in ("json", "jsonb"):
        await conn.set_type_codec(json_type, encoder=_json_text, decoder=orjson.loads, schema="pg_catalog")


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


async def create_pool(
    dsn: str, *, min_size: int, max_size: int, random_page_cost: float = database.DEFAULT_RANDOM_PAGE_COST
) -> asyncpg.Pool:
    """A connection pool whose connections read and write json and jsonb as Python values.

    Raises:
        OSError, asyncpg.PostgresError: the database cannot be reached.
    """
    return await database.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        random_page_cost=random_page_cost,
        init=_init_connection,
        # Plan each execution for its arguments. Otherwise a prepared statement's generic plan,
        # chosen while a new database's tables were nearly empty, keeps scanning ``identifiers``
        # sequentially as it grows (until an ANALYZE): the merge rate halved in a fresh bench.
        # Planning costs tens of microseconds per statement; statements here are few per batch.
        server_settings={"plan_cache_mode": "force_custom_plan"},
    )


class ProfileRepository:
    def __init__(
        self,
        pool: asyncpg.Pool,
        limits: IdentityLimits | None = None,
        rules: MergeRules = DEFAULT_RULES,
        hasher: IdentifierHasher | None = None,
    ) -> None:
        self._pool = pool
        self._limits = limits or IdentityLimits()
        self._rules = rules
        self._hasher = hasher or IdentifierHasher.unkeyed()
        self._decoded = DecodedStates()

    async def merge_event(self, event: ingest_pb2.Event) -> MergeResult:
        """Merge one (validated) event; see ``merge_events``.

        Raises:
            asyncpg.PostgresError, OSError: the database failed; nothing was written.
        """
        (result,) = await self.merge_events([event])
        return result

    async def merge_events(
        self, events: Sequence[ingest_pb2.Event], positions: Sequence[int | None] | None = None
    ) -> list[MergeResult]:
        """Merge (validated) events, in the given order, into their customers' profiles in one
        transaction: creating customers, merging customers that an event's identifiers link, and
        saving each touched profile once. One result per event, in order. ``positions``: each
        event's position in the event log, kept so that an erasure can remove it from the log.

        Raises:
            asyncpg.PostgresError, OSError: the database failed; nothing was written.
        """
        if not events:
            return []
        for attempt in range(1, MAX_TRANSACTION_ATTEMPTS + 1):
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    batch = BatchMerge(conn, self._limits, self._rules, self._hasher, self._decoded)
                    outcome = await batch.run(events, positions)
                    records = await self._records(conn, list(outcome.changed), outcome.changed)
                break
            except (MergeConflict, asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
                if attempt == MAX_TRANSACTION_ATTEMPTS:
                    raise
                log.info("merge conflict, retrying", extra={"events": len(events), "attempt": attempt})
        for customer_id, state in outcome.changed.items():  # committed
            if (record := records.get(customer_id)) is not None:
                self._decoded.remember(customer_id, record.stored.version, state)
        return [
            MergeResult(
                customer_id="" if o.customer_id is None else str(o.customer_id),
                duplicate=o.duplicate,
                profile=None if o.duplicate or o.customer_id is None else records.get(o.customer_id),
                merged_customer_ids=tuple(str(x) for x in o.merged_customer_ids),
                erased=o.customer_id is None and not o.conflict and not o.duplicate,
                conflict=o.conflict,
            )
            for o in outcome.events
        ]

    async def find_by_identifiers(
        self, identifiers: Sequence[IdentifierKey]
    ) -> dict[IdentifierKey, ProfileRecord]:
        """The profiles owning ``identifiers``, in one query; absent ones are left out.

        Raises:
            asyncpg.PostgresError, OSError: the database failed.
        """
        if not identifiers:
            return {}
        rows = await self._pool.fetch(
            _PROFILE_COLUMNS + ", c.state, q.kind AS q_kind, q.value AS q_value"
            " FROM unnest($1::text[], $2::text[]) AS q(kind, value)"
            " JOIN identifiers i ON i.kind = q.kind AND i.value = q.value"
            " JOIN customers c ON c.customer_id = i.customer_id",
            [k.value for k, _ in identifiers],
            [v for _, v in identifiers],
        )
        return {(IdentifierKind(r["q_kind"]), r["q_value"]): _record(r, from_json(r["state"])) for r in rows}

    async def find_by_customer_id(self, customer_id: uuid.UUID) -> ProfileRecord | None:
        """The profile of ``customer_id`` (None when no customer has it: never one, erased, or
        merged into another), in one query.

        Raises:
            asyncpg.PostgresError, OSError: the database failed.
        """
        row = await self._pool.fetchrow(
            _PROFILE_COLUMNS + ", c.state FROM customers c WHERE c.customer_id = $1", customer_id
        )
        return None if row is None else _record(row, from_json(row["state"]))

    async def find_by_customer_ids(self, customer_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, ProfileRecord]:
        """The profiles of ``customer_ids``, in one query; absent ones are left out.

        Raises:
            asyncpg.PostgresError, OSError: the database failed.
        """
        if not customer_ids:
            return {}
        rows = await self._pool.fetch(
            _PROFILE_COLUMNS + ", c.state FROM customers c WHERE c.customer_id = ANY($1::uuid[])",
            list(customer_ids),
        )
        return {r["customer_id"]: _record(r, from_json(r["state"])) for r in rows}

    async def _records(
        self,
        conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record],
        customer_ids: Sequence[uuid.UUID],
        states: Mapping[uuid.UUID, ProfileState] | None = None,
    ) -> dict[uuid.UUID, ProfileRecord]:
        """The records of ``customer_ids``; with ``states`` (what this transaction just saved),
        their states are not read back and decoded again."""
        if states is None:
            rows = await conn.fetch(
                _PROFILE_COLUMNS + ", c.state FROM customers c WHERE c.customer_id = ANY($1::uuid[])",
                list(customer_ids),
            )
            return {r["customer_id"]: _record(r, from_json(r["state"])) for r in rows}
        rows = await conn.fetch(
            _PROFILE_COLUMNS + " FROM customers c WHERE c.customer_id = ANY($1::uuid[])", list(customer_ids)
        )
        return {r["customer_id"]: _record(r, states[r["customer_id"]]) for r in rows}

    async def erased_among(self, keys: Sequence[IdentifierKey]) -> set[IdentifierKey]:
        """Which of ``keys`` belonged to an erased person (one query)."""
        if not keys:
            return set()
        by_hash = {h: key for key in keys for h in self._hasher.all_hashes(key)}
        rows = await self._pool.fetch(
            "SELECT identifier_hash FROM erasure_tombstones WHERE identifier_hash = ANY($1::bytea[])",
            list(by_hash),
        )
        return {by_hash[bytes(r["identifier_hash"])] for r in rows}

    async def customer_ids(self, after: uuid.UUID | None, limit: int) -> list[uuid.UUID]:
        """Customer ids in id order after ``after``: for walking every customer."""
        rows = await self._pool.fetch(
            "SELECT customer_id FROM customers WHERE $1::uuid IS NULL OR customer_id > $1"
            " ORDER BY customer_id LIMIT $2",
            after,
            limit,
        )
        return [r["customer_id"] for r in rows]

    async def rebuild(self, customer_id: uuid.UUID) -> ProfileRecord | None:
        """Recompute a customer's state from its whole history; the record when it differed from
        the stored one (then saved under a new version), None when it was already right (or the
        customer is gone)."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT version, state FROM customers WHERE customer_id = $1 FOR UPDATE", customer_id
            )
            if row is None:
                return None
            bodies = await conn.fetch("SELECT body FROM events WHERE customer_id = $1", customer_id)
            rebuilt = to_json(
                replay((ingest_pb2.Event.FromString(r["body"]) for r in bodies), rules=self._rules)
            )
            if rebuilt == row["state"]:
                return None
            await conn.execute(
                "UPDATE customers SET state = $2, version = version + 1, updated_at = now()"
                " WHERE customer_id = $1",
                customer_id,
                rebuilt,
            )
            return (await self._records(conn, [customer_id]))[customer_id]

    async def customer_id_of(self, key: IdentifierKey) -> uuid.UUID | None:
        """The customer an identifier belongs to, if any."""
        found: uuid.UUID | None = await self._pool.fetchval(
            "SELECT customer_id FROM identifiers WHERE kind = $1 AND value = $2", key[0].value, key[1]
        )
        return found

    async def list_events(
        self,
        customer_id: uuid.UUID,
        *,
        event_types: Sequence[str],
        start: datetime | None,
        end: datetime | None,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[tuple[datetime, ingest_pb2.Event]]:
        """The customer's events, newest occurred_at first, after the position ``after``."""
        rows = await self._pool.fetch(
            "SELECT occurred_at, body FROM events WHERE customer_id = $1"
            " AND (cardinality($2::text[]) = 0 OR event_type = ANY($2::text[]))"
            " AND ($3::timestamptz IS NULL OR occurred_at >= $3)"
            " AND ($4::timestamptz IS NULL OR occurred_at < $4)"
            " AND ($5::timestamptz IS NULL OR (occurred_at, event_id) < ($5, $6))"
            " ORDER BY occurred_at DESC, event_id DESC LIMIT $7",
            customer_id,
            list(event_types),
            start,
            end,
            after[0] if after else None,
            after[1] if after else None,
            limit,
        )
        return [(r["occurred_at"], ingest_pb2.Event.FromString(r["body"])) for r in rows]

    async def export(self, customer_id: uuid.UUID) -> tuple[ProfileRecord, list[ingest_pb2.Event]] | None:
        """Everything held on a customer: the profile with its identity history, and every event
        (oldest first). None when there is no such customer."""
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            records = await self._records(conn, [customer_id])
            if not records:
                return None
            rows = await conn.fetch(
                "SELECT body FROM events WHERE customer_id = $1 ORDER BY occurred_at, event_id", customer_id
            )
        return records[customer_id], [ingest_pb2.Event.FromString(r["body"]) for r in rows]

    async def delete_customer(self, key: IdentifierKey) -> ErasedCustomer | None:
        """Erase the customer ``key`` belongs to: identifiers, events, merge records, profile and
        profile changes not yet published, leaving a hashed tombstone per identifier and an
        erasure notice to publish. None when no customer has ``key``."""
        async with self._pool.acquire() as conn, conn.transaction():
            customer_id = await conn.fetchval(
                "SELECT customer_id FROM identifiers WHERE kind = $1 AND value = $2", key[0].value, key[1]
            )
            if customer_id is None:
                return None
            await conn.execute("SELECT 1 FROM customers WHERE customer_id = $1 FOR UPDATE", customer_id)
            rows = await conn.fetch("SELECT kind, value FROM identifiers WHERE customer_id = $1", customer_id)
            keys = tuple((IdentifierKind(r["kind"]), r["value"]) for r in rows)
            # Serialize with merges of this person's events: they lock the same identifiers.
            await lock_identifiers(conn, keys)
            await conn.executemany(
                "INSERT INTO erasure_tombstones (identifier_hash, erased_at) VALUES ($1, now())"
                " ON CONFLICT (identifier_hash) DO UPDATE SET erased_at = now()",
                [(self._hasher.hash(k),) for k in keys],
            )
            # Published by profile_service.erasure_outbox once this commits. Under every key, so
            # copies named under a key being rotated out are found too.
            await conn.execute(
                "INSERT INTO erasure_notice_outbox (identifier_hashes, erased_at, customer_id)"
                " VALUES ($1, now(), $2)",
                [h for k in keys for h in self._hasher.all_hashes(k)],
                str(customer_id),
            )
            # Their profile changes not yet published go too, under their customer id or one merged
            # into it (an unpublished change keeps the id its merge left); one being published now
            # holds its row, so this waits for it. Published ones leave the stream with its max
            # age (docs/profiles.md#profile-change-notices).
            await conn.execute(
                "DELETE FROM profile_change_outbox WHERE customer_id = $1 OR customer_id IN"
                " (SELECT merged_customer_id FROM merges WHERE survivor_id = $1)",
                customer_id,
            )
            # Their raw copies in the event log go too (profile_service.erasure_outbox).
            await conn.execute(
                "INSERT INTO log_erasure_outbox (log_position) SELECT log_position FROM events"
                " WHERE customer_id = $1 AND log_position IS NOT NULL ON CONFLICT DO NOTHING",
                customer_id,
            )
            deleted = await conn.fetch(
                "DELETE FROM events WHERE customer_id = $1 RETURNING event_id", customer_id
            )
            # Their ids go too: a late copy of an event is then dropped by the tombstones, where a
            # kept id would name an event of nobody's and count as a conflict.
            await conn.execute(
                "DELETE FROM event_ids WHERE event_id = ANY($1::text[])", [r["event_id"] for r in deleted]
            )
            await conn.execute("DELETE FROM identifiers WHERE customer_id = $1", customer_id)
            await conn.execute("DELETE FROM customers WHERE customer_id = $1", customer_id)
            # The merger's dead letters naming the person go too, with their copies in the log.
            await conn.execute(
                "WITH gone AS (DELETE FROM unmerged_events WHERE identifier_hashes && $1::bytea[]"
                " RETURNING log_position)"
                " INSERT INTO log_erasure_outbox (log_position)"
                " SELECT log_position FROM gone WHERE log_position IS NOT NULL ON CONFLICT DO NOTHING",
                [h for k in keys for h in self._hasher.all_hashes(k)],
            )
        return ErasedCustomer(str(customer_id), keys, len(deleted))


# One row per customer: its state, identifiers and identity history, aggregated in subqueries so
# that a batch of profiles is one query.
_PROFILE_COLUMNS = (
    "SELECT c.customer_id, c.version, c.created_at, c.updated_at,"
    " (SELECT array_agg(i2.kind || ':' || i2.value) FROM identifiers i2"
    "   WHERE i2.customer_id = c.customer_id) AS linked,"
    " (SELECT json_agg(json_build_array(m.merged_customer_id, m.event_id, m.merged_at) ORDER BY m.merged_at)"
    "   FROM merges m WHERE m.survivor_id = c.customer_id) AS merges,"
    " (SELECT json_agg(json_build_array(b.other_customer_id, b.event_id, b.blocked_at, b.reason)"
    "   ORDER BY b.blocked_at) FROM blocked_merges b WHERE b.customer_id = c.customer_id) AS blocked"
)


def _record(row: Any, state: ProfileState) -> ProfileRecord:
    linked: list[tuple[IdentifierKind, str]] = []
    for item in row["linked"] or []:
        kind, _, value = item.partition(":")
        linked.append((IdentifierKind(kind), value))
    stored = StoredProfile(
        customer_id=str(row["customer_id"]),
        version=row["version"],
        identifiers=tuple(sorted(linked)),
        state=state,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )
    return ProfileRecord(
        stored,
        merges=tuple(_merge_row(m) for m in _json_list(row["merges"])),
        blocked_merges=tuple(_merge_row(b) for b in _json_list(row["blocked"])),
    )


def _json_list(value: Any) -> list[Any]:
    if value is None:
        return []
    parsed: list[Any] = orjson.loads(value) if isinstance(value, str) else value
    return parsed


def _merge_row(item: list[Any]) -> MergeRow:
    other, event_id, at, *reason = item
    return MergeRow(other or "", event_id, datetime.fromisoformat(at), reason[0] if reason else "")
