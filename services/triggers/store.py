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
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

import asyncpg

from sendtime_common.migrate import migrate

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"
MIGRATIONS_TABLE: Final = "triggers_schema_migrations"

StoreError = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)
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
