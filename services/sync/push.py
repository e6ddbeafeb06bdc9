"""Pushing traits to an email platform: what one customer's push is, what became of it, and the
ledger that keeps a push from being made twice.

A ``PushItem`` is one customer's selected traits at one profile version, for one destination.
Destinations take items in batches and answer per item (``ItemResult``): PUSHED, REFUSED (the
provider refused that item; sending it again would not change that) or RETRY (the batch did
not get through; the item stays pending). A batch that gets no answer at all raises
``ProviderUnavailable`` and every item in it stays pending.

The ledger (``sync_push_ledger``) records, per destination and customer, the newest version
pushed and a digest of the values pushed. Items at or below that version are settled and never
sent again, and so are newer ones with the same values (a change to a trait the destination
does not take): they are recorded as UNCHANGED. A pusher killed after the provider applied a
batch but before the ledger recorded it sends that batch once more, with the same values: the
provider's upsert makes the effect the same (one user, each attribute set to the value it had),
which is what "once" can mean over an API without idempotency keys.

The pending marks (``sync_push_pending``) are the work: one per destination and customer changed
since their last push, with the newest change's profile version and the oldest change's time.
The profile change stream sets them (sync.changes); a push run (sync.pusher) reads them in
customer order, and deletes each one that the version it pushed reaches.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import asyncpg
import orjson


@dataclass(frozen=True, slots=True)
class PushItem:
    customer_key: str  # the customer id (what an erasure notice names)
    attributes: Mapping[str, Any]  # trait -> value, as the destination will hold them
    version: int  # the profile version the attributes are from: newer pushes win
    external_id: str = ""  # the store's user id, the destination's external id where it has one
    email: str = ""

    def digest(self) -> bytes:
        """What the destination would hold after this push, hashed: equal digests, same push."""
        document = {"attributes": self.attributes, "external_id": self.external_id, "email": self.email}
        return hashlib.sha256(orjson.dumps(document, option=orjson.OPT_SORT_KEYS)).digest()


class ItemOutcome(enum.StrEnum):
    PUSHED = "pushed"
    REFUSED = "refused"
    RETRY = "retry"
    UNCHANGED = "unchanged"  # not sent: the destination holds these values already


@dataclass(frozen=True, slots=True)
class ItemResult:
    item: PushItem
    outcome: ItemOutcome
    reason: str = ""  # the provider's error kind for a refusal; never the values


class Destination(Protocol):
    """A provider's users or contacts, as a push connector writes them."""

    # True: the provider keys people by email address (Mailchimp, SendGrid): a customer without
    # one is not pushable there (skipped, not refused, so refusals count the provider's alone).
    keyed_by_email: bool

    async def push(self, items: Sequence[PushItem]) -> list[ItemResult]:
        """One result per item (one item per customer).

        Raises:
            ProviderUnavailable: no answer worth having (the items not answered stay pending).
            ProviderRefused: the key or the request itself was refused.
        """
        ...


def newest_per_customer(items: Iterable[PushItem]) -> list[PushItem]:
    """One item per customer, the newest version's (a batch never carries two versions of a
    customer: the provider's order of applying them is not ours to rely on)."""
    newest: dict[str, PushItem] = {}
    for item in items:
        kept = newest.get(item.customer_key)
        if kept is None or item.version > kept.version:
            newest[item.customer_key] = item
    return list(newest.values())


def batches(items: Sequence[PushItem], size: int) -> list[list[PushItem]]:
    return [list(items[start : start + size]) for start in range(0, len(items), size)]


class PushLedger:
    """``sync_push_ledger``: the newest version pushed per destination and customer."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def unsettled(
        self, destination: str, items: Sequence[PushItem]
    ) -> tuple[list[PushItem], list[PushItem]]:
        """Of the items newer than what the ledger holds for their customer: those to push, and
        those whose values the destination holds already (to record as UNCHANGED)."""
        if not items:
            return [], []
        rows = await self._pool.fetch(
            "SELECT customer_key, pushed_version, attributes_digest FROM sync_push_ledger"
            " WHERE destination = $1 AND customer_key = ANY($2::text[])",
            destination,
            [item.customer_key for item in items],
        )
        pushed = {row["customer_key"]: (row["pushed_version"], row["attributes_digest"]) for row in rows}
        to_push: list[PushItem] = []
        unchanged: list[PushItem] = []
        for item in items:
            version, digest = pushed.get(item.customer_key, (-1, None))
            if item.version <= version:
                continue
            (unchanged if digest is not None and digest == item.digest() else to_push).append(item)
        return to_push, unchanged

    async def record(self, destination: str, results: Iterable[ItemResult]) -> None:
        """Settle the items pushed, unchanged or refused (a refusal is final for those values:
        the customer is pushed again once they change)."""
        newest: dict[str, ItemResult] = {}
        for result in results:
            if result.outcome == ItemOutcome.RETRY:
                continue
            kept = newest.get(result.item.customer_key)
            if kept is None or result.item.version > kept.item.version:
                newest[result.item.customer_key] = result
        settled = list(newest.values())
        if not settled:
            return
        # A result older than the row (recorded late) moves nothing back.
        await self._pool.execute(
            "INSERT INTO sync_push_ledger"
            " (destination, customer_key, pushed_version, refused_reason, attributes_digest)"
            " SELECT $1, k, v, r, d FROM unnest($2::text[], $3::bigint[], $4::text[], $5::bytea[])"
            " AS t(k, v, r, d)"
            " ON CONFLICT (destination, customer_key) DO UPDATE SET"
            " pushed_version = EXCLUDED.pushed_version, refused_reason = EXCLUDED.refused_reason,"
            " attributes_digest = EXCLUDED.attributes_digest, pushed_at = now()"
            " WHERE sync_push_ledger.pushed_version < EXCLUDED.pushed_version",
            destination,
            [r.item.customer_key for r in settled],
            [r.item.version for r in settled],
            [r.reason for r in settled],
            [r.item.digest() for r in settled],
        )

    async def forget(self, customer_key: str) -> int:
        """Delete what the ledger and the pending marks hold of an erased customer; how many
        rows."""
        async with self._pool.acquire() as connection, connection.transaction():
            ledger = await connection.execute(
                "DELETE FROM sync_push_ledger WHERE customer_key = $1", customer_key
            )
            pending = await connection.execute(
                "DELETE FROM sync_push_pending WHERE customer_key = $1", customer_key
            )
        return int(ledger.split()[-1]) + int(pending.split()[-1])


@dataclass(frozen=True, slots=True)
class Change:
    """A customer's profile changed (a ProfileChange, as a pending mark needs it)."""

    customer_key: str
    profile_version: int
    changed_at: datetime


@dataclass(frozen=True, slots=True)
class PendingMark:
    customer_key: str
    profile_version: int


@dataclass(frozen=True, slots=True)
class PendingSummary:
    count: int
    oldest: datetime | None  # the oldest change not yet pushed


class PendingPushes:
    """``sync_push_pending``: the customers each destination has still to be sent."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def mark(self, destinations: Sequence[str], changes: Sequence[Change]) -> None:
        """Mark each changed customer pending for every destination: one statement, keeping
        the newest version and the oldest time per customer."""
        if not destinations or not changes:
            return
        newest: dict[str, Change] = {}
        for change in changes:
            kept = newest.get(change.customer_key)
            if kept is None:
                newest[change.customer_key] = change
            else:
                newest[change.customer_key] = Change(
                    change.customer_key,
                    max(kept.profile_version, change.profile_version),
                    min(kept.changed_at, change.changed_at),
                )
        marks = sorted(newest.values(), key=lambda c: c.customer_key)  # one lock order for all
        await self._pool.execute(
            "INSERT INTO sync_push_pending (destination, customer_key, profile_version, changed_at)"
            " SELECT d, k, v, t FROM unnest($1::text[]) AS dest(d),"
            " unnest($2::text[], $3::bigint[], $4::timestamptz[]) AS c(k, v, t)"
            " ORDER BY d, k"
            " ON CONFLICT (destination, customer_key) DO UPDATE SET"
            " profile_version = GREATEST(sync_push_pending.profile_version, EXCLUDED.profile_version),"
            " changed_at = LEAST(sync_push_pending.changed_at, EXCLUDED.changed_at)",
            list(destinations),
            [m.customer_key for m in marks],
            [m.profile_version for m in marks],
            [m.changed_at for m in marks],
        )

    async def page(self, destination: str, after_key: str, limit: int) -> list[PendingMark]:
        """Up to ``limit`` marks of ``destination``, in customer order, after ``after_key``."""
        rows = await self._pool.fetch(
            "SELECT customer_key, profile_version FROM sync_push_pending"
            " WHERE destination = $1 AND customer_key > $2 ORDER BY customer_key LIMIT $3",
            destination,
            after_key,
            limit,
        )
        return [PendingMark(row["customer_key"], row["profile_version"]) for row in rows]

    async def settle(self, destination: str, settled: Mapping[str, int]) -> None:
        """Delete the marks of the customers in ``settled`` (customer key -> the version pushed
        or found) that it reaches; a mark a newer change moved on stays for the next run."""
        if not settled:
            return
        await self._pool.execute(
            "DELETE FROM sync_push_pending p USING unnest($2::text[], $3::bigint[]) AS s(k, v)"
            " WHERE p.destination = $1 AND p.customer_key = s.k AND p.profile_version <= s.v",
            destination,
            list(settled),
            list(settled.values()),
        )

    async def summary(self, destinations: Sequence[str]) -> dict[str, PendingSummary]:
        """How many customers wait for each destination, and since when."""
        rows = await self._pool.fetch(
            "SELECT destination, count(*) AS n, min(changed_at) AS oldest FROM sync_push_pending"
            " WHERE destination = ANY($1::text[]) GROUP BY destination",
            list(destinations),
        )
        found = {row["destination"]: PendingSummary(row["n"], row["oldest"]) for row in rows}
        return {d: found.get(d, PendingSummary(0, None)) for d in destinations}
