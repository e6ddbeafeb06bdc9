"""Pushing traits to an email platform: what one customer's push is, what became of it, and the
ledger that keeps a push from being made twice.

A ``PushItem`` is one customer's selected traits at one profile version, for one destination.
Destinations take items in batches and answer per item (``ItemResult``): PUSHED, REFUSED (the
provider refused that item; sending it again would not change that) or RETRY (the batch did
not get through; the item stays pending). A batch that gets no answer at all raises
``ProviderUnavailable`` and every item in it stays pending.

The ledger (``sync_push_ledger``) records, per destination and customer, the newest version
pushed. Items at or below it are settled and never sent again; a pusher killed after the
provider applied a batch but before the ledger recorded it sends that batch once more, with the
same values: the provider's upsert makes the effect the same (one user, each attribute set to
the value it had), which is what "once" can mean over an API without idempotency keys.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg


@dataclass(frozen=True, slots=True)
class PushItem:
    customer_key: str  # Sendtime's key for the customer in the ledger, e.g. "user:42"
    attributes: Mapping[str, Any]  # trait -> value, as the destination will hold them
    version: int  # the profile version the attributes are from: newer pushes win
    external_id: str = ""  # the store's user id, the destination's external id where it has one
    email: str = ""


class ItemOutcome(enum.StrEnum):
    PUSHED = "pushed"
    REFUSED = "refused"
    RETRY = "retry"


@dataclass(frozen=True, slots=True)
class ItemResult:
    item: PushItem
    outcome: ItemOutcome
    reason: str = ""  # the provider's error kind for a refusal; never the values


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

    async def unsettled(self, destination: str, items: Sequence[PushItem]) -> list[PushItem]:
        """The items newer than what the ledger holds for their customer."""
        if not items:
            return []
        rows = await self._pool.fetch(
            "SELECT customer_key, pushed_version FROM sync_push_ledger"
            " WHERE destination = $1 AND customer_key = ANY($2::text[])",
            destination,
            [item.customer_key for item in items],
        )
        pushed = {row["customer_key"]: row["pushed_version"] for row in rows}
        return [item for item in items if item.version > pushed.get(item.customer_key, -1)]

    async def record(self, destination: str, results: Iterable[ItemResult]) -> None:
        """Settle the items pushed or refused (a refusal is final: it is not retried)."""
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
        await self._pool.execute(
            "INSERT INTO sync_push_ledger (destination, customer_key, pushed_version, refused_reason)"
            " SELECT $1, k, v, r FROM unnest($2::text[], $3::bigint[], $4::text[]) AS t(k, v, r)"
            " ON CONFLICT (destination, customer_key) DO UPDATE SET"
            " pushed_version = GREATEST(sync_push_ledger.pushed_version, EXCLUDED.pushed_version),"
            " refused_reason = EXCLUDED.refused_reason, pushed_at = now()",
            destination,
            [r.item.customer_key for r in settled],
            [r.item.version for r in settled],
            [r.reason for r in settled],
        )

    async def forget(self, customer_key: str) -> int:
        """Delete what the ledger holds of an erased customer; how many rows."""
        deleted = await self._pool.execute(
            "DELETE FROM sync_push_ledger WHERE customer_key = $1", customer_key
        )
        return int(deleted.split()[-1])
