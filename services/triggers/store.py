"""The triggers service's PostgreSQL storage: its migrations, what its stores share, and what
spans them (a customer's erasure, purging old history). docs/triggers-storage.md describes the
tables and the protocols.

- ``trigger_store.py``: triggers (CRUD, AIP-158 pages, etags, pause and resume);
- ``destination_store.py``: destinations, their sealed signing secrets and their health;
- ``episode_store.py``: episodes, known exits and fires: what the event consumer and the
  firers read and write, the claims of due episodes and the fire's one transaction;
- ``delivery_store.py``: deliveries and attempts: the PostgreSQL ``DeliveryLog``, the
  dispatchers' leases, the service's reads, Redeliver, subscriptions.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

import asyncpg

from sendtime_common.database import STORE_ERRORS
from sendtime_common.migrate import migrate

# The newest exit times kept per (customer, trigger, exit key): enough for any entry that can
# still open an episode (docs/triggers-storage.md). Here so that merges unite them the same way.
MAX_KNOWN_EXITS: Final = 16

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"
MIGRATIONS_TABLE: Final = "triggers_schema_migrations"

StoreError = STORE_ERRORS
"""What a store call raises when PostgreSQL is unreachable or fails."""

# The longest frequency-cap window and cooldown a trigger may have (trigger_validation): fires
# older than this decide nothing.
FIRE_HISTORY: Final = timedelta(days=90)
# The longest wait (delay.until_event_time) plus the 24 h an entry may arrive after its fire
# time: an exit older than this cannot fall in the wait of an entry still to come.
EXIT_HISTORY: Final = timedelta(days=366 + 1)


class NotFound(LookupError):
    """No such trigger, destination or delivery (the message names it)."""


class AlreadyExists(Exception):
    """The id is taken (the message names it)."""


class EtagMismatch(Exception):
    """The etag given is not the stored one: the resource changed since it was read."""


def new_etag() -> str:
    """A fresh etag: random, so a resource deleted and made again does not match an old one."""
    return secrets.token_hex(8)


async def migrate_store(pool: asyncpg.Pool) -> list[str]:
    """Apply the triggers service's migrations not yet applied; their names.

    Raises:
        asyncpg.PostgresError: a migration failed.
    """
    return await migrate(pool, MIGRATIONS_DIR, MIGRATIONS_TABLE)


@dataclass(frozen=True, slots=True)
class Erased:
    """What a customer's erasure removed."""

    episodes: int
    known_exits: int
    fires: int
    deliveries: int  # with their attempts; pending ones too


async def erase_customer(pool: asyncpg.Pool, customer_id: str) -> Erased:
    """Remove everything the service keeps about a customer, in one transaction: episodes
    (waiting ones too: nothing fires for them), known exits, fires and deliveries (their
    payloads are personal data) with their attempts. A firer that claimed one of the episodes
    finds it gone at its commit and fires nothing.

    Deliveries a dispatcher holds in memory are not recalled by this (the caller tells the
    dispatchers); their later records find nothing to update.
    """
    async with pool.acquire() as conn, conn.transaction():
        episodes = await conn.execute("DELETE FROM triggers_episodes WHERE customer_id = $1", customer_id)
        exits = await conn.execute("DELETE FROM triggers_known_exits WHERE customer_id = $1", customer_id)
        fires = await conn.execute("DELETE FROM triggers_fires WHERE customer_id = $1", customer_id)
        await conn.execute("DELETE FROM triggers_customer_fires WHERE customer_id = $1", customer_id)
        deliveries = await conn.execute("DELETE FROM triggers_deliveries WHERE customer_id = $1", customer_id)
    return Erased(_count(episodes), _count(exits), _count(fires), _count(deliveries))


@dataclass(frozen=True, slots=True)
class Merged:
    """What a merge of customers moved to the surviving one."""

    episodes_moved: int
    episodes_dropped: int  # the losers of a key both customers had (see merge_customers)
    known_exits: int
    fires: int
    deliveries: int


# Which of two episodes of one (trigger, key) survives a merge of their customers: the higher
# rank, then the later last entry, then the surviving customer's. A keyed trigger's FIRED
# episode outranks everything (a key fires once: two customers who each had the order are one
# person who had it once); for a trigger without a key a WAITING episode outranks a closed one
# (the cooldown, read from the fires moved with it, still holds at its fire).
_MERGE_RANK: Final = {
    True: {"fired": 3, "waiting": 2, "exited": 1, "ended": 1},  # keyed
    False: {"waiting": 3, "fired": 2, "exited": 1, "ended": 1},
}


async def merge_customers(pool: asyncpg.Pool, survivor: str, merged: Sequence[str], now: datetime) -> Merged:
    """Move what the service keeps about the ``merged`` customers (which no longer exist) to
    ``survivor``, in one transaction: episodes, known exits, fires, the fire fence and
    deliveries. Where both had an episode of a (trigger, key) only one is kept (``_MERGE_RANK``);
    the other is deleted. Every moved or kept-over episode gets a new version, so a decision
    taken before the merge fails to apply and is taken again; a claimed one is due at ``now``
    rather than at its lease's end. Known exits are united (the newest ``MAX_KNOWN_EXITS``).
    The survivor's fire sequence moves past every one of theirs, so a fire decided on facts read
    before the merge (without the merged customers' fires) gets FIRES_CHANGED. Repeating a
    merge (a redelivered change) finds nothing left to move."""
    others = sorted({m for m in merged if m and m != survivor})
    if not others:
        return Merged(0, 0, 0, 0, 0)
    everyone = [survivor, *others]
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            "SELECT customer_id, trigger_id, episode_key, state, last_entry_at FROM triggers_episodes"
            " WHERE customer_id = ANY($1::text[]) ORDER BY customer_id, trigger_id, episode_key FOR UPDATE",
            everyone,
        )
        winners: dict[tuple[str, str], Any] = {}
        for row in rows:
            slot = (row["trigger_id"], row["episode_key"])
            best = winners.get(slot)
            if best is None or _merge_order(row, survivor) > _merge_order(best, survivor):
                winners[slot] = row
        losers = [r for r in rows if winners[(r["trigger_id"], r["episode_key"])] is not r]
        moving = [r for r in winners.values() if r["customer_id"] != survivor]
        await conn.executemany(
            "DELETE FROM triggers_episodes WHERE customer_id = $1 AND trigger_id = $2 AND episode_key = $3",
            [(r["customer_id"], r["trigger_id"], r["episode_key"]) for r in losers],
        )
        await conn.executemany(
            """
            UPDATE triggers_episodes SET customer_id = $4, version = version + 1,
                due_at = CASE WHEN claimed_by IS NOT NULL THEN $5 ELSE due_at END,
                claimed_by = NULL, claimed_at = NULL, updated_at = now()
            WHERE customer_id = $1 AND trigger_id = $2 AND episode_key = $3
            """,
            [(r["customer_id"], r["trigger_id"], r["episode_key"], survivor, now) for r in moving],
        )
        exits = await conn.execute(
            """
            WITH gone AS (
                DELETE FROM triggers_known_exits WHERE customer_id = ANY($2::text[])
                RETURNING trigger_id, exit_key, occurred_at, last_occurred_at
            ), united AS (
                SELECT trigger_id, exit_key, max(last_occurred_at) AS last_occurred_at,
                    ARRAY(SELECT DISTINCT t FROM gone g2, unnest(g2.occurred_at) AS t
                          WHERE g2.trigger_id = g.trigger_id AND g2.exit_key = g.exit_key
                          ORDER BY t DESC LIMIT $3) AS occurred_at
                FROM gone g GROUP BY trigger_id, exit_key
            )
            INSERT INTO triggers_known_exits AS x
                (customer_id, trigger_id, exit_key, occurred_at, last_occurred_at)
            SELECT $1, trigger_id, exit_key, occurred_at, last_occurred_at FROM united
            ON CONFLICT (customer_id, trigger_id, exit_key) DO UPDATE SET
                occurred_at = ARRAY(
                    SELECT DISTINCT t FROM unnest(x.occurred_at || EXCLUDED.occurred_at) AS t
                    ORDER BY t DESC LIMIT $3),
                last_occurred_at = greatest(x.last_occurred_at, EXCLUDED.last_occurred_at)
            """,
            survivor,
            others,
            MAX_KNOWN_EXITS,
        )
        fires = await conn.execute(
            """
            WITH gone AS (
                DELETE FROM triggers_fires WHERE customer_id = ANY($2::text[])
                RETURNING trigger_id, fired_at, episode_key
            )
            INSERT INTO triggers_fires (customer_id, trigger_id, fired_at, episode_key)
            SELECT $1, trigger_id, fired_at, episode_key FROM gone
            ON CONFLICT DO NOTHING
            """,
            survivor,
            others,
        )
        await conn.execute(
            """
            WITH gone AS (
                DELETE FROM triggers_customer_fires WHERE customer_id = ANY($2::text[])
                RETURNING fire_sequence
            )
            INSERT INTO triggers_customer_fires AS c (customer_id, fire_sequence)
            SELECT $1, coalesce(max(fire_sequence), 0) + 1 FROM gone
            ON CONFLICT (customer_id) DO UPDATE
                SET fire_sequence = greatest(c.fire_sequence, EXCLUDED.fire_sequence) + 1
            """,
            survivor,
            others,
        )
        # A fire of theirs and one of the survivor's to one destination at the same instant for
        # the same trigger and key would be two deliveries of one fire to one person: the
        # survivor's stays.
        await conn.execute(
            """
            DELETE FROM triggers_deliveries d WHERE customer_id = ANY($2::text[]) AND EXISTS (
                SELECT 1 FROM triggers_deliveries s WHERE s.customer_id = $1 AND s.trigger_id = d.trigger_id
                  AND s.episode_key = d.episode_key AND s.fired_at = d.fired_at
                  AND s.destination_id = d.destination_id)
            """,
            survivor,
            others,
        )
        deliveries = await conn.execute(
            "UPDATE triggers_deliveries SET customer_id = $1 WHERE customer_id = ANY($2::text[])",
            survivor,
            others,
        )
    return Merged(len(moving), len(losers), _count(exits), _count(fires), _count(deliveries))


def _merge_order(row: Any, survivor: str) -> tuple[int, datetime, bool]:
    rank = _MERGE_RANK[row["episode_key"] != ""][row["state"]]
    return rank, row["last_entry_at"], row["customer_id"] == survivor


@dataclass(frozen=True, slots=True)
class Purged:
    fires: int
    known_exits: int


async def purge_history(pool: asyncpg.Pool, now: datetime, *, limit: int = 10_000) -> Purged:
    """Remove up to ``limit`` fires older than ``FIRE_HISTORY`` and rows of known exits whose
    newest is older than ``EXIT_HISTORY``: nothing reads them any more. Call it again while it
    removes ``limit``."""
    fires = await pool.execute(
        "DELETE FROM triggers_fires WHERE ctid = ANY(ARRAY("
        " SELECT ctid FROM triggers_fires WHERE fired_at < $1 LIMIT $2))",
        now - FIRE_HISTORY,
        limit,
    )
    exits = await pool.execute(
        "DELETE FROM triggers_known_exits WHERE ctid = ANY(ARRAY("
        " SELECT ctid FROM triggers_known_exits WHERE last_occurred_at < $1 LIMIT $2))",
        now - EXIT_HISTORY,
        limit,
    )
    return Purged(_count(fires), _count(exits))


def _count(status: str) -> int:
    """The row count of a command status such as ``DELETE 3``."""
    return int(status.rpartition(" ")[2])
