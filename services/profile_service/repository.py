"""PostgreSQL storage of customers, identifiers and merged events.

``merge_event`` is the one write path. It runs in a single transaction that serializes on the
event's identifiers (advisory locks) and on the customer rows (row locks), so concurrent events
for one customer lose no update; the event id's primary key makes a redelivery change nothing.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import asyncpg
import asyncpg.pool

from profile_service.codec import StoredProfile
from profile_service.state import ProfileState, apply_event, from_json, replay, to_json
from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.identifier_proto import IdentifierKey
from sendtime_common.identifiers import IdentifierKind, identifiers_of

log = logging.getLogger(__name__)

MAX_TRANSACTION_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class MergeResult:
    """What merging one event did. ``profile`` is None for a duplicate (nothing changed)."""

    customer_id: str
    duplicate: bool
    profile: StoredProfile | None
    merged_customer_ids: tuple[str, ...] = ()


class _Conflict(Exception):
    """Another transaction moved or removed a customer we were about to update: start over."""


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(dsn: str, *, min_size: int, max_size: int) -> asyncpg.Pool:
    """A connection pool whose connections read and write jsonb as Python values.

    Raises:
        OSError, asyncpg.PostgresError: the database cannot be reached.
    """
    pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, init=_init_connection)
    assert pool is not None
    return pool


def event_identifiers(event: ingest_pb2.Event) -> list[IdentifierKey]:
    """The identifiers an event ties to one customer, sorted: its customer's, and for an alias
    the other ones too (which is what links them; they may be of the same kind)."""
    found = set(identifiers_of(event.customer).items())
    if event.WhichOneof("payload") == "alias":
        found |= set(identifiers_of(event.alias.other).items())
    return sorted(found)


class ProfileRepository:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def merge_event(self, event: ingest_pb2.Event) -> MergeResult:
        """Merge one (validated) event into its customer's profile, creating the customer or
        merging customers that the event's identifiers link.

        Raises:
            asyncpg.PostgresError, OSError: the database failed; nothing was written.
        """
        identifiers = event_identifiers(event)
        for attempt in range(1, MAX_TRANSACTION_ATTEMPTS + 1):
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    return await self._merge(conn, event, identifiers)
            except (_Conflict, asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
                if attempt == MAX_TRANSACTION_ATTEMPTS:
                    raise
                log.info("merge conflict, retrying", extra={"event_id": event.event_id, "attempt": attempt})
        raise AssertionError("unreachable")

    async def _merge(
        self,
        conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record],
        event: ingest_pb2.Event,
        identifiers: list[IdentifierKey],
    ) -> MergeResult:
        lock_keys = [f"{kind.value}:{value}" for kind, value in identifiers]
        await conn.execute(
            "SELECT pg_advisory_xact_lock(h) FROM"
            " (SELECT hashtextextended(k, 0) AS h FROM unnest($1::text[]) AS k ORDER BY k) AS keys",
            lock_keys,
        )
        existing = await conn.fetchval("SELECT customer_id FROM events WHERE event_id = $1", event.event_id)
        if existing is not None:
            return MergeResult(customer_id=str(existing), duplicate=True, profile=None)

        owners = await conn.fetch(
            "SELECT DISTINCT i.customer_id, c.created_at FROM identifiers i"
            " JOIN customers c USING (customer_id)"
            " JOIN unnest($1::text[], $2::text[]) AS q(kind, value) ON i.kind = q.kind AND i.value = q.value"
            " ORDER BY c.created_at, i.customer_id",
            [k.value for k, _ in identifiers],
            [v for _, v in identifiers],
        )
        if not owners:
            customer_id = uuid.uuid4()
            await conn.execute(
                "INSERT INTO customers (customer_id, version, state) VALUES ($1, 0, $2)",
                customer_id,
                to_json(ProfileState()),
            )
            losers: list[uuid.UUID] = []
        else:
            # The oldest customer survives a merge: deterministic, and keeps the longest history.
            customer_id = owners[0]["customer_id"]
            losers = [r["customer_id"] for r in owners[1:]]

        ids = [customer_id, *losers]
        rows = await conn.fetch(
            "SELECT customer_id, version, state FROM customers WHERE customer_id = ANY($1::uuid[])"
            " ORDER BY customer_id FOR UPDATE",
            ids,
        )
        if len(rows) != len(ids):
            raise _Conflict()
        by_id = {r["customer_id"]: r for r in rows}
        state = from_json(by_id[customer_id]["state"])
        # After a merge the survivor's version must exceed every merged one, so that cache
        # entries of the merged customers are replaced.
        version = max(r["version"] for r in rows) + 1

        if losers:
            await conn.execute(
                "UPDATE identifiers SET customer_id = $1 WHERE customer_id = ANY($2::uuid[])",
                customer_id,
                losers,
            )
            await conn.execute(
                "UPDATE events SET customer_id = $1 WHERE customer_id = ANY($2::uuid[])", customer_id, losers
            )
            await conn.execute("DELETE FROM customers WHERE customer_id = ANY($1::uuid[])", losers)
            log.info(
                "customers merged",
                extra={
                    "survivor": str(customer_id),
                    "merged": [str(x) for x in losers],
                    "event_id": event.event_id,
                },
            )
        await conn.executemany(
            "INSERT INTO identifiers (kind, value, customer_id) VALUES ($1, $2, $3)"
            " ON CONFLICT (kind, value) DO NOTHING",
            [(k.value, v, customer_id) for k, v in identifiers],
        )
        await conn.execute(
            "INSERT INTO events (event_id, customer_id, event_type, occurred_at, body)"
            " VALUES ($1, $2, $3, $4, $5)",
            event.event_id,
            customer_id,
            event.WhichOneof("payload") or "",
            event.occurred_at.ToDatetime(tzinfo=UTC),
            event.SerializeToString(deterministic=True),
        )
        if losers or not state.is_newer(event):
            # Late or merged: recompute from the whole history (which now includes this event).
            bodies = await conn.fetch("SELECT body FROM events WHERE customer_id = $1", customer_id)
            state = replay(ingest_pb2.Event.FromString(r["body"]) for r in bodies)
        else:
            state = apply_event(state, event)

        row = await conn.fetchrow(
            "UPDATE customers SET state = $2, version = $3, updated_at = now() WHERE customer_id = $1"
            " RETURNING created_at, updated_at",
            customer_id,
            to_json(state),
            version,
        )
        assert row is not None
        linked = await conn.fetch("SELECT kind, value FROM identifiers WHERE customer_id = $1", customer_id)
        stored = StoredProfile(
            customer_id=str(customer_id),
            version=version,
            identifiers=tuple((IdentifierKind(r["kind"]), r["value"]) for r in linked),
            state=state,
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )
        return MergeResult(
            customer_id=str(customer_id),
            duplicate=False,
            profile=stored,
            merged_customer_ids=tuple(str(x) for x in losers),
        )

    async def find_by_identifiers(
        self, identifiers: Sequence[IdentifierKey]
    ) -> dict[IdentifierKey, StoredProfile]:
        """The profiles owning ``identifiers``, in one query; absent ones are left out.

        Raises:
            asyncpg.PostgresError, OSError: the database failed.
        """
        if not identifiers:
            return {}
        rows = await self._pool.fetch(
            "SELECT q.kind, q.value, c.customer_id, c.version, c.state, c.created_at, c.updated_at,"
            " (SELECT array_agg(i2.kind || ':' || i2.value) FROM identifiers i2"
            "   WHERE i2.customer_id = c.customer_id) AS linked"
            " FROM unnest($1::text[], $2::text[]) AS q(kind, value)"
            " JOIN identifiers i ON i.kind = q.kind AND i.value = q.value"
            " JOIN customers c ON c.customer_id = i.customer_id",
            [k.value for k, _ in identifiers],
            [v for _, v in identifiers],
        )
        return {(IdentifierKind(r["kind"]), r["value"]): _stored(r) for r in rows}


def _stored(row: Any) -> StoredProfile:
    linked: list[tuple[IdentifierKind, str]] = []
    for item in row["linked"] or []:
        kind, _, value = item.partition(":")
        linked.append((IdentifierKind(kind), value))
    return StoredProfile(
        customer_id=str(row["customer_id"]),
        version=row["version"],
        identifiers=tuple(linked),
        state=from_json(row["state"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )
