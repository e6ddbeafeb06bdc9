"""One transaction that merges a batch of events into profiles.

It reads everything the batch needs in a fixed number of statements (locks, seen event ids,
tombstones, owners of the identifiers, the customers' rows), applies the events in order in
memory — identity first (new customers, merges, limits), then each touched profile's state —
and writes the outcome back with one statement per table. A customer touched by many events of
the batch is decoded, encoded and saved once; a merge or a late event replays that customer's
whole history once, at the end. Each event merged also leaves its profile change in
``profile_change_outbox`` (one statement for the batch), published once this commits
(``profile_service.change_outbox``).

Serialization: advisory locks on the batch's identifiers (taken in sorted order, so batches on
several replicas cannot deadlock on them) and row locks on the customers; a customer moved or
deleted by another transaction meanwhile raises ``MergeConflict`` and the caller starts over.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeAlias

import asyncpg
import asyncpg.pool
import orjson
from cachetools import LRUCache

from profile_service.identity import IdentityLimits, best_identifier
from profile_service.merge_rules import MergeRules
from profile_service.state import ProfileState, apply_event, from_json, replay, to_json
from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.event_integrity import conflicts, fingerprint
from sendtime_common.identifier_proto import IdentifierKey
from sendtime_common.identifiers import IdentifierHasher, IdentifierKind, identifiers_of

log = logging.getLogger(__name__)

# What the pool lends; inside the caller's transaction.
Connection: TypeAlias = "asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"

# New customers are created after every customer already stored (their created_at is this
# transaction's start), so they sort last; among themselves by id, as the database orders them.
_NEWEST = datetime.max.replace(tzinfo=UTC)


class MergeConflict(Exception):
    """Another transaction moved or removed a customer we were about to update: start over."""


def event_identifiers(event: ingest_pb2.Event) -> list[IdentifierKey]:
    """The identifiers an event ties to one customer, sorted: its customer's, and for an alias
    the other ones too (which is what links them; they may be of the same kind)."""
    found = set(identifiers_of(event.customer).items())
    if event.WhichOneof("payload") == "alias":
        found |= set(identifiers_of(event.alias.other).items())
    return sorted(found)


async def lock_identifiers(conn: Connection, keys: Sequence[IdentifierKey]) -> None:
    """Transaction-scoped advisory locks on ``keys``, in one order everywhere."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(h) FROM"
        " (SELECT hashtextextended(k, 0) AS h FROM unnest($1::text[]) AS k ORDER BY k) AS keys",
        [f"{kind.value}:{value}" for kind, value in keys],
    )


@dataclass(eq=False, slots=True)
class _Customer:
    """A customer as this transaction sees it."""

    customer_id: uuid.UUID
    created_at: datetime
    keys: set[IdentifierKey]
    stored: bool  # has a row already (else created by this batch)
    version: int = 0
    state_json: Any = None  # as stored; decoded on first use
    state: ProfileState | None = None
    events: list[ingest_pb2.Event] = field(default_factory=list)  # of this batch
    touched: bool = False
    needs_replay: bool = False
    absorbed_into: _Customer | None = None

    @property
    def seniority(self) -> tuple[datetime, uuid.UUID]:
        """Oldest first: the survivor of a merge."""
        return (self.created_at, self.customer_id)

    def final(self) -> _Customer:
        """The customer this one ended up as, after the batch's merges."""
        customer = self
        while customer.absorbed_into is not None:
            customer = customer.absorbed_into
        return customer

    def current_state(self) -> ProfileState:
        if self.state is None:
            self.state = ProfileState() if self.state_json is None else from_json(self.state_json)
        return self.state


@dataclass(frozen=True, slots=True)
class EventOutcome:
    """What merging one event of the batch did; customers are final (after the batch's merges)."""

    customer_id: uuid.UUID | None  # None: dropped as a late event of an erased person, or a conflict
    duplicate: bool = False
    merged_customer_ids: tuple[uuid.UUID, ...] = ()
    conflict: bool = False  # another event was merged under its id: not merged


@dataclass(frozen=True, slots=True)
class _Pending:
    customer: _Customer | uuid.UUID | None  # None: erased, or a conflict
    duplicate: bool = False
    losers: tuple[uuid.UUID, ...] = ()
    conflict: bool = False


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    events: list[EventOutcome]
    changed: dict[uuid.UUID, ProfileState]  # the profiles this batch saved


class DecodedStates:
    """Customers' states as this process last saved them, by customer id and version, so a
    customer merged again soon (a session's events arrive over minutes) skips decoding its stored
    JSON, a tenth of the merger's CPU in bench-ingest. Safe because a state is immutable, a
    version is saved once, and the JSON round trip is exact (test_state checks it): a copy under
    the row's version is what decoding the row would give. Another replica's write is a version
    this one has not seen, so it is decoded."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self._states: LRUCache[uuid.UUID, tuple[int, ProfileState]] = LRUCache(max(max_entries, 1))

    def get(self, customer_id: uuid.UUID, version: int) -> ProfileState | None:
        kept = self._states.get(customer_id)
        return kept[1] if kept is not None and kept[0] == version else None

    def remember(self, customer_id: uuid.UUID, version: int, state: ProfileState) -> None:
        """Call only once the transaction that saved ``state`` under ``version`` committed."""
        self._states[customer_id] = (version, state)


# The tables a merge of customers moves to the survivor, with their customer column and the rest.
_MOVED_BY_CUSTOMER = (
    ("events", "customer_id", "event_id, event_type, occurred_at, body, merged_at, log_position"),
    ("merges", "survivor_id", "merged_customer_id, event_id, merged_at"),
    ("blocked_merges", "customer_id", "other_customer_id, event_id, reason, blocked_at"),
)


class BatchMerge:
    """Merges one batch of events on ``conn``, inside the caller's transaction."""

    def __init__(
        self,
        conn: Connection,
        limits: IdentityLimits,
        rules: MergeRules,
        hasher: IdentifierHasher,
        decoded: DecodedStates | None = None,
    ) -> None:
        self._conn = conn
        self._decoded = decoded or DecodedStates(1)
        self._limits = limits
        self._rules = rules
        self._hasher = hasher
        self._owner_of: dict[IdentifierKey, _Customer] = {}
        self._customers: dict[uuid.UUID, _Customer] = {}
        self._new_identifiers: list[tuple[IdentifierKey, _Customer]] = []
        self._new_events: list[tuple[ingest_pb2.Event, datetime, _Customer]] = []
        self._merges: list[tuple[_Customer, uuid.UUID, str]] = []  # survivor, merged, event id
        self._blocked: list[tuple[_Customer, uuid.UUID | None, str, str]] = []  # + other, event, reason
        self._positions: dict[str, int] = {}  # event id -> its position in the event log
        self._erased_positions: list[int] = []  # late events of erased people: to erase from the log
        self._bodies: dict[str, bytes] = {}  # event id -> the event serialized, as stored

    async def run(
        self, events: Sequence[ingest_pb2.Event], positions: Sequence[int | None] | None = None
    ) -> BatchOutcome:
        """Merge ``events``; ``positions`` (each one's position in the event log, when known)
        are kept with the stored events, so that erasing a person erases them from the log too."""
        if positions is not None:
            self._positions = {e.event_id: p for e, p in zip(events, positions, strict=True) if p is not None}
        keys_of = [event_identifiers(e) for e in events]
        all_keys = sorted(set(itertools.chain.from_iterable(keys_of)))
        await lock_identifiers(self._conn, all_keys)
        known = await self._known_event_ids([e.event_id for e in events])
        erased_at = await self._tombstones(all_keys)
        await self._load_owners(all_keys)
        stored_events = await self._stored_events(known) if known else {}

        placed: dict[str, tuple[_Customer, ingest_pb2.Event]] = {}  # event id -> customer, event
        outcomes: list[_Pending] = []
        for event, keys in zip(events, keys_of, strict=True):
            # The same id again: a redelivery (or a resend past ingest's record) changes nothing;
            # another event under it is an idempotency conflict, left for the caller to keep.
            if event.event_id in stored_events:
                customer_id, body = stored_events[event.event_id]
                if conflicts(fingerprint(ingest_pb2.Event.FromString(body)), fingerprint(event)):
                    outcomes.append(_Pending(None, conflict=True))
                else:
                    outcomes.append(_Pending(customer_id, duplicate=True))
                continue
            if event.event_id in known:
                # Merged, but into none of the customers this event's identifiers belong to: the
                # event stored under the id named other people, so it was another event. (A stored
                # event's customer keeps at least one of its identifiers: the merge places an
                # event with an owner of one, merges move identifiers with events, and an erasure
                # deletes the ids with the events.) An id derived from the content conflicts
                # with nothing, as in ``conflicts``.
                if fingerprint(event) is None:
                    outcomes.append(_Pending(None, duplicate=True))
                else:
                    outcomes.append(_Pending(None, conflict=True))
                continue
            if event.event_id in placed:
                customer, first = placed[event.event_id]
                if conflicts(fingerprint(first), fingerprint(event)):
                    outcomes.append(_Pending(None, conflict=True))
                else:
                    outcomes.append(_Pending(customer, duplicate=True))
                continue
            occurred_at = event.occurred_at.ToDatetime(tzinfo=UTC)
            erased = max((erased_at[k] for k in keys if k in erased_at), default=None)
            if erased is not None and occurred_at < erased:
                outcomes.append(_Pending(None))
                if event.event_id in self._positions:
                    self._erased_positions.append(self._positions[event.event_id])
                continue
            customer, losers = self._place(event, keys, occurred_at)
            placed[event.event_id] = (customer, event)
            outcomes.append(_Pending(customer, losers=tuple(c.customer_id for c in losers)))

        changed = await self._write()
        await self._write_changes(events, outcomes)
        return BatchOutcome([self._outcome(p) for p in outcomes], changed)

    def _outcome(self, pending: _Pending) -> EventOutcome:
        who = pending.customer
        if isinstance(who, uuid.UUID):  # stored before this batch; maybe merged away by it
            who = self._customers.get(who, who)
        customer_id = who.final().customer_id if isinstance(who, _Customer) else who
        return EventOutcome(customer_id, pending.duplicate, pending.losers, pending.conflict)

    # --- reads ---------------------------------------------------------------------------------

    async def _known_event_ids(self, event_ids: list[str]) -> set[str]:
        """The batch's ids merged before (redeliveries, mostly): ``event_ids`` keeps every merged
        event's id, across customers."""
        rows = await self._conn.fetch(
            "SELECT event_id FROM event_ids WHERE event_id = ANY($1::text[])", event_ids
        )
        return {r["event_id"] for r in rows}

    async def _stored_events(self, event_ids: set[str]) -> dict[str, tuple[uuid.UUID, bytes]]:
        """Of the ids merged before, those merged into a customer owning the batch's identifiers
        (loaded): their customers and events. Read by customer, as a database distributed by
        customer finds them."""
        rows = await self._conn.fetch(
            "SELECT event_id, customer_id, body FROM events"
            " WHERE customer_id = ANY($1::uuid[]) AND event_id = ANY($2::text[])",
            list(self._customers),
            list(event_ids),
        )
        return {r["event_id"]: (r["customer_id"], r["body"]) for r in rows}

    async def _tombstones(self, keys: list[IdentifierKey]) -> dict[IdentifierKey, datetime]:
        by_hash = {h: key for key in keys for h in self._hasher.all_hashes(key)}
        rows = await self._conn.fetch(
            "SELECT identifier_hash, erased_at FROM erasure_tombstones"
            " WHERE identifier_hash = ANY($1::bytea[])",
            list(by_hash),
        )
        erased_at: dict[IdentifierKey, datetime] = {}
        for r in rows:  # one tombstone per key the identifier was erased under: the latest counts
            key = by_hash[bytes(r["identifier_hash"])]
            erased_at[key] = max(r["erased_at"], erased_at.get(key, r["erased_at"]))
        return erased_at

    async def _load_owners(self, keys: list[IdentifierKey]) -> None:
        """The customers owning any of ``keys``, with all their identifiers, row-locked."""
        owned = await self._conn.fetch(
            "SELECT i.kind, i.value, i.customer_id FROM identifiers i"
            " WHERE i.customer_id IN (SELECT i2.customer_id FROM identifiers i2"
            "   JOIN unnest($1::text[], $2::text[]) AS q(kind, value)"
            "   ON i2.kind = q.kind AND i2.value = q.value)",
            [k.value for k, _ in keys],
            [v for _, v in keys],
        )
        linked: dict[uuid.UUID, set[IdentifierKey]] = {}
        for r in owned:
            linked.setdefault(r["customer_id"], set()).add((IdentifierKind(r["kind"]), r["value"]))
        if not linked:
            return
        rows = await self._conn.fetch(
            "SELECT customer_id, version, created_at FROM customers"
            " WHERE customer_id = ANY($1::uuid[]) ORDER BY customer_id FOR UPDATE",
            list(linked),
        )
        if len(rows) != len(linked):
            raise MergeConflict()
        decoded = {r["customer_id"]: self._decoded.get(r["customer_id"], r["version"]) for r in rows}
        # Only the states this process does not hold decoded are read (they are locked now, so
        # they are the versions just read): a state is ~4 KB, most of what this read would move.
        missing = [customer_id for customer_id, state in decoded.items() if state is None]
        stored_json: dict[uuid.UUID, Any] = {}
        if missing:
            for r in await self._conn.fetch(
                "SELECT customer_id, state FROM customers WHERE customer_id = ANY($1::uuid[])", missing
            ):
                stored_json[r["customer_id"]] = r["state"]
        for r in rows:
            customer = _Customer(
                r["customer_id"],
                r["created_at"],
                linked[r["customer_id"]],
                stored=True,
                version=r["version"],
                state_json=stored_json.get(r["customer_id"]),
                state=decoded[r["customer_id"]],
            )
            self._customers[customer.customer_id] = customer
            for key in customer.keys:
                self._owner_of[key] = customer

    # --- identity and state, in memory --------------------------------------------------------

    def _place(
        self, event: ingest_pb2.Event, keys: list[IdentifierKey], occurred_at: datetime
    ) -> tuple[_Customer, tuple[_Customer, ...]]:
        """Find or create the event's customer, merging the customers it links (within the
        limits), add its new identifiers, and fold it into the state. Returns the customer and
        the customers merged into it."""
        linked = sorted(
            {id(c): c for k in keys if (c := self._owner_of.get(k))}.values(), key=lambda c: c.seniority
        )
        losers: tuple[_Customer, ...] = ()
        if not linked:
            customer = _Customer(uuid.uuid4(), _NEWEST, set(), stored=False)
            self._customers[customer.customer_id] = customer
        else:
            # The oldest customer survives a merge: deterministic, and keeps the longest history.
            customer, *others = linked
            if others:
                reason = self._limits.violation(set(keys).union(*(c.keys for c in linked)))
                if reason is None:
                    losers = tuple(others)
                    self._absorb(customer, losers, event.event_id)
                else:
                    # Refused: the event joins the customer of its most specific identifier.
                    customer = self._owner_of[best_identifier(k for k in keys if k in self._owner_of)]
                    self._blocked.extend(
                        (customer, other.customer_id, event.event_id, reason)
                        for other in linked
                        if other is not customer
                    )
                    log.info(
                        "merge refused by identity limits",
                        extra={"customer_id": str(customer.customer_id), "event_id": event.event_id},
                    )

        # New identifiers join the customer up to the limits; past them they are refused.
        for key in keys:
            if key in self._owner_of:
                continue
            reason = self._limits.violation(customer.keys | {key})
            if reason is None:
                customer.keys.add(key)
                self._owner_of[key] = customer
                self._new_identifiers.append((key, customer))
            else:
                self._blocked.append((customer, None, event.event_id, reason))

        self._new_events.append((event, occurred_at, customer))
        customer.events.append(event)
        customer.version += 1
        customer.touched = True
        if losers:
            customer.needs_replay = True
        elif not customer.needs_replay:
            state = customer.current_state()
            if state.is_newer(event):
                customer.state = apply_event(state, event, rules=self._rules)
            else:  # late: recompute from the whole history at the end
                customer.needs_replay = True
        return customer, losers

    def _absorb(self, survivor: _Customer, losers: tuple[_Customer, ...], event_id: str) -> None:
        # The survivor's version must exceed every merged one, so that cache entries of the merged
        # customers are replaced.
        survivor.version = max(survivor.version, *(c.version for c in losers))
        for loser in losers:
            loser.absorbed_into = survivor
            survivor.keys |= loser.keys
            for key in loser.keys:
                self._owner_of[key] = survivor
            survivor.events.extend(loser.events)
            survivor.touched = True
            self._merges.append((survivor, loser.customer_id, event_id))
        log.info(
            "customers merged",
            extra={
                "survivor": str(survivor.customer_id),
                "merged": [str(c.customer_id) for c in losers],
                "event_id": event_id,
            },
        )

    # --- writes ------------------------------------------------------------------------------

    async def _write(self) -> dict[uuid.UUID, ProfileState]:
        """Write the batch's outcome; returns the customers whose profile changed."""
        conn = self._conn
        finals = [c for c in self._customers.values() if c.absorbed_into is None and c.touched]
        created = [c for c in finals if not c.stored]
        for customer in created:
            if customer.needs_replay:  # its whole history is in this batch
                customer.state = replay(customer.events, rules=self._rules)
        if created:
            await conn.execute(
                "INSERT INTO customers (customer_id, version, state)"
                " SELECT id, v, s::json FROM unnest($1::uuid[], $2::bigint[], $3::text[]) AS n(id, v, s)",
                [c.customer_id for c in created],
                [c.version for c in created],
                [orjson.dumps(to_json(c.current_state())).decode() for c in created],
            )

        gone = [c for c in self._customers.values() if c.absorbed_into is not None and c.stored]
        if gone:
            moves = ([c.customer_id for c in gone], [c.final().customer_id for c in gone])
            await conn.execute(
                "UPDATE identifiers t SET customer_id = m.survivor"
                " FROM unnest($1::uuid[], $2::uuid[]) AS m(loser, survivor) WHERE t.customer_id = m.loser",
                *moves,
            )
            # Rows kept by customer move by delete and insert: a database distributed by customer
            # keeps them on their customer's node and never changes that column in place.
            for table, column, others in _MOVED_BY_CUSTOMER:
                await conn.execute(
                    f"WITH moved AS (DELETE FROM {table} t"
                    " USING unnest($1::uuid[], $2::uuid[]) AS m(loser, survivor)"
                    f" WHERE t.{column} = m.loser RETURNING m.survivor, {others})"
                    f" INSERT INTO {table} ({column}, {others}) SELECT survivor, {others} FROM moved",
                    *moves,
                )
            await conn.execute("DELETE FROM customers WHERE customer_id = ANY($1::uuid[])", moves[0])

        if self._new_identifiers:
            await conn.execute(
                "INSERT INTO identifiers (kind, value, customer_id)"
                " SELECT * FROM unnest($1::text[], $2::text[], $3::uuid[])"
                " ON CONFLICT (kind, value) DO NOTHING",
                [k.value for (k, _), _ in self._new_identifiers],
                [v for (_, v), _ in self._new_identifiers],
                [c.final().customer_id for _, c in self._new_identifiers],
            )
        if self._new_events:
            # Unique across customers: an event under a merged id that a concurrent batch merged
            # (its identifiers locked apart from these) fails this batch, redelivered to find it.
            await conn.execute(
                "INSERT INTO event_ids (event_id) SELECT unnest($1::text[])",
                [e.event_id for e, _, _ in self._new_events],
            )
            await conn.execute(
                "INSERT INTO events (event_id, customer_id, event_type, occurred_at, body, log_position)"
                " SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::timestamptz[], $5::bytea[],"
                " $6::bigint[])",
                [e.event_id for e, _, _ in self._new_events],
                [c.final().customer_id for _, _, c in self._new_events],
                [e.WhichOneof("payload") or "" for e, _, _ in self._new_events],
                [at for _, at, _ in self._new_events],
                [self._body(e) for e, _, _ in self._new_events],
                [self._positions.get(e.event_id) for e, _, _ in self._new_events],
            )
        if self._erased_positions:  # erased from the log by profile_service.erasure_outbox
            await conn.execute(
                "INSERT INTO log_erasure_outbox (log_position) SELECT unnest($1::bigint[])"
                " ON CONFLICT DO NOTHING",
                self._erased_positions,
            )
        if self._merges:
            await conn.execute(
                "INSERT INTO merges (survivor_id, merged_customer_id, event_id)"
                " SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[])",
                [s.final().customer_id for s, _, _ in self._merges],
                [m for _, m, _ in self._merges],
                [e for _, _, e in self._merges],
            )
        if self._blocked:
            await conn.execute(
                "INSERT INTO blocked_merges (customer_id, other_customer_id, event_id, reason)"
                " SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[])",
                [c.final().customer_id for c, _, _, _ in self._blocked],
                [other for _, other, _, _ in self._blocked],
                [e for _, _, e, _ in self._blocked],
                [reason for _, _, _, reason in self._blocked],
            )

        updated = [c for c in finals if c.stored]
        replayed = [c for c in updated if c.needs_replay]
        if replayed:
            # Late or merged: recompute from the whole history (which now includes this batch).
            rows = await conn.fetch(
                "SELECT customer_id, body FROM events WHERE customer_id = ANY($1::uuid[])",
                [c.customer_id for c in replayed],
            )
            history: dict[uuid.UUID, list[ingest_pb2.Event]] = {}
            for r in rows:
                history.setdefault(r["customer_id"], []).append(ingest_pb2.Event.FromString(r["body"]))
            for customer in replayed:
                customer.state = replay(history.get(customer.customer_id, ()), rules=self._rules)
        if updated:
            await conn.execute(
                "UPDATE customers c SET state = u.s::json, version = u.v, updated_at = now()"
                " FROM unnest($1::uuid[], $2::bigint[], $3::text[]) AS u(id, v, s)"
                " WHERE c.customer_id = u.id",
                [c.customer_id for c in updated],
                [c.version for c in updated],
                [orjson.dumps(to_json(c.current_state())).decode() for c in updated],
            )
        return {c.customer_id: c.current_state() for c in finals}

    async def _write_changes(self, events: Sequence[ingest_pb2.Event], outcomes: Sequence[_Pending]) -> None:
        """A profile change per event merged, in the batch's order (their ids, the changes'
        sequence, follow it): the customer and version the batch left, and the customers the
        event merged into it. None for a duplicate, a conflict or a late event of an erased
        person: a duplicate redelivered after a crash between the commit and the ack has its
        change from the commit already, in this table or on the stream."""
        merged = [
            (event, pending.customer.final(), pending.losers)
            for event, pending in zip(events, outcomes, strict=True)
            if isinstance(pending.customer, _Customer) and not pending.duplicate
        ]
        if not merged:
            return
        # With its event as stored, so that the relay reads the outbox alone (a later merge may
        # move the event to another customer before the change is published).
        await self._conn.execute(
            "INSERT INTO profile_change_outbox (customer_id, event_id, profile_version, merged_customer_ids,"
            " event_type, body, log_position)"
            " SELECT c, e, v, string_to_array(m, ',')::uuid[], t, b, p FROM"
            " unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::bytea[], $7::bigint[])"
            " WITH ORDINALITY AS n(c, e, v, m, t, b, p, i)"
            " ORDER BY i",
            [customer.customer_id for _, customer, _ in merged],
            [event.event_id for event, _, _ in merged],
            [customer.version for _, customer, _ in merged],
            [",".join(str(loser) for loser in losers) for _, _, losers in merged],
            [event.WhichOneof("payload") or "" for event, _, _ in merged],
            [self._body(event) for event, _, _ in merged],
            [self._positions.get(event.event_id) for event, _, _ in merged],
        )

    def _body(self, event: ingest_pb2.Event) -> bytes:
        """``event`` as stored (in ``events`` and with its change), serialized once."""
        body = self._bodies.get(event.event_id)
        if body is None:
            body = self._bodies[event.event_id] = event.SerializeToString(deterministic=True)
        return body
