"""The connectors' durable state in PostgreSQL (``sync_connectors``, migrations/0001_sync.sql):
each one's cursor and how its runs went, which ``GetConnectorStatus`` reports."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
MIGRATIONS_TABLE = "sync_schema_migrations"


@dataclass(frozen=True, slots=True)
class ConnectorState:
    connector_id: str
    cursor: Any  # the connector's own JSON; None before its first page
    cursor_saved_at: datetime | None
    last_run_started_at: datetime | None
    last_success_at: datetime | None
    last_failure_at: datetime | None
    last_error: str
    consecutive_failures: int
    records_total: int
    events_total: int
    rejected_total: int
    next_run_at: datetime | None
    items_pushed_total: int
    items_refused_total: int


class ConnectorStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def load(self, connector_id: str) -> ConnectorState:
        """The connector's state (a fresh one, stored, the first time)."""
        row = await self._pool.fetchrow(
            "INSERT INTO sync_connectors (connector_id) VALUES ($1)"
            " ON CONFLICT (connector_id) DO UPDATE SET connector_id = EXCLUDED.connector_id"
            " RETURNING *",
            connector_id,
        )
        assert row is not None
        return _state(row)

    async def ensure(self, connector_ids: list[str]) -> None:
        """Store a fresh state for each of ``connector_ids`` that has none (a new connector)."""
        await self._pool.execute(
            "INSERT INTO sync_connectors (connector_id) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
            connector_ids,
        )

    async def load_many(self, connector_ids: list[str]) -> dict[str, ConnectorState]:
        """The states of ``connector_ids`` (fresh ones stored for those without)."""
        await self.ensure(connector_ids)
        rows = await self._pool.fetch(
            "SELECT * FROM sync_connectors WHERE connector_id = ANY($1::text[])", connector_ids
        )
        return {row["connector_id"]: _state(row) for row in rows}

    async def due(self, connector_ids: list[str]) -> list[str]:
        """Those of ``connector_ids`` (``ensure``d) whose next run is now or past, or not set."""
        rows = await self._pool.fetch(
            "SELECT connector_id FROM sync_connectors WHERE connector_id = ANY($1::text[])"
            " AND (next_run_at IS NULL OR next_run_at <= now()) ORDER BY connector_id",
            connector_ids,
        )
        return [r["connector_id"] for r in rows]

    async def make_due(self, connector_id: str) -> None:
        """Due now (RunConnector): the next replica to look takes it up."""
        await self._pool.execute(
            "INSERT INTO sync_connectors (connector_id, next_run_at) VALUES ($1, now())"
            " ON CONFLICT (connector_id) DO UPDATE SET next_run_at = now()",
            connector_id,
        )

    async def run_started(self, connector_id: str) -> None:
        await self._pool.execute(
            "UPDATE sync_connectors SET last_run_started_at = now() WHERE connector_id = $1", connector_id
        )

    async def page_done(
        self, connector_id: str, cursor: Any, records: int, events: int, rejected: int
    ) -> None:
        """Keep ``cursor``: every event of the page that reached it has ingest's answer."""
        await self._pool.execute(
            "UPDATE sync_connectors SET cursor = $2::jsonb, cursor_saved_at = now(),"
            " records_total = records_total + $3, events_total = events_total + $4,"
            " rejected_total = rejected_total + $5 WHERE connector_id = $1",
            connector_id,
            orjson.dumps(cursor).decode(),
            records,
            events,
            rejected,
        )

    async def push_page_done(self, connector_id: str, pushed: int, refused: int) -> None:
        """Count a push page's customers the provider took and refused."""
        await self._pool.execute(
            "UPDATE sync_connectors SET items_pushed_total = items_pushed_total + $2,"
            " items_refused_total = items_refused_total + $3 WHERE connector_id = $1",
            connector_id,
            pushed,
            refused,
        )

    async def run_succeeded(self, connector_id: str, next_run_at: datetime) -> None:
        await self._pool.execute(
            "UPDATE sync_connectors SET last_success_at = now(), consecutive_failures = 0,"
            " next_run_at = $2 WHERE connector_id = $1",
            connector_id,
            next_run_at,
        )

    async def run_failed(self, connector_id: str, error: str, next_run_at: datetime) -> None:
        """``error`` is shown to operators: a kind and a provider's error code, never personal data."""
        await self._pool.execute(
            "UPDATE sync_connectors SET last_failure_at = now(), last_error = $2,"
            " consecutive_failures = consecutive_failures + 1, next_run_at = $3 WHERE connector_id = $1",
            connector_id,
            error[:500],
            next_run_at,
        )


def _state(row: asyncpg.Record) -> ConnectorState:
    cursor = row["cursor"]
    return ConnectorState(
        connector_id=row["connector_id"],
        cursor=None if cursor is None else orjson.loads(cursor),
        cursor_saved_at=row["cursor_saved_at"],
        last_run_started_at=row["last_run_started_at"],
        last_success_at=row["last_success_at"],
        last_failure_at=row["last_failure_at"],
        last_error=row["last_error"],
        consecutive_failures=row["consecutive_failures"],
        records_total=row["records_total"],
        events_total=row["events_total"],
        rejected_total=row["rejected_total"],
        next_run_at=row["next_run_at"],
        items_pushed_total=row["items_pushed_total"],
        items_refused_total=row["items_refused_total"],
    )
