"""The audit trail: one row in ``audit_events`` per privileged call (the RPCs whose access rule
says ``audited``, and the command line's key changes), with who called, what it acted on and
how it ended. A person is named by the keyed hash of the identifier, never its value; a key by
its id, never the key."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from google.protobuf.message import Message

from sendtime_common.database import STORE_ERRORS
from sendtime_common.identifier_proto import parse_identifier
from sendtime_common.identifiers import IdentifierHasher

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    id: int
    at: datetime
    service: str
    principal: str
    method: str
    target: str
    outcome: str


def audit_target(request: Message, field: str, hasher: IdentifierHasher) -> str:
    """What ``request`` acts on, as the audit trail names it: the ``field``'s value, or for an
    identifier ``{kind}:{keyed hash}`` (``{kind}:invalid`` for one that cannot be read)."""
    if not field:
        return ""
    value = getattr(request, field)
    if isinstance(value, Message):
        key = parse_identifier(value, field)  # type: ignore[arg-type]
        if isinstance(key, tuple):
            return f"{key[0].value}:{hasher.hash(key).hex()}"
        return "invalid"
    return str(value)[:300]


class AuditTrail:
    def __init__(self, pool: asyncpg.Pool, service: str) -> None:
        self._pool = pool
        self._service = service

    async def record(self, principal: str, method: str, target: str, outcome: str) -> None:
        """Append one record. Never raises: the call it records has already happened, so a
        database failure is logged (with the same fields) instead."""
        try:
            await self._pool.execute(
                "INSERT INTO audit_events (service, principal, method, target, outcome)"
                " VALUES ($1, $2, $3, $4, $5)",
                self._service,
                principal,
                method,
                target,
                outcome,
            )
        except STORE_ERRORS as exc:
            log.error(
                "could not append to the audit trail",
                extra={
                    "error": str(exc),
                    "audit_principal": principal,
                    "audit_method": method,
                    "audit_target": target,
                    "audit_outcome": outcome,
                },
            )

    async def page(
        self, limit: int, after: tuple[datetime, int] | None, *, method: str = "", principal: str = ""
    ) -> list[AuditRecord]:
        """Up to ``limit`` records, newest first, after the (at, id) position ``after``.

        Raises:
            OSError, asyncpg.PostgresError: the database failed.
        """
        rows = await self._pool.fetch(
            "SELECT id, at, service, principal, method, target, outcome FROM audit_events"
            " WHERE ($1::timestamptz IS NULL OR (at, id) < ($1, $2))"
            "   AND ($3 = '' OR method = $3) AND ($4 = '' OR principal = $4)"
            " ORDER BY at DESC, id DESC LIMIT $5",
            after[0] if after else None,
            after[1] if after else 0,
            method,
            principal,
            limit,
        )
        return [AuditRecord(**dict(row)) for row in rows]

    async def purge(self, before: datetime) -> int:
        """Delete records older than ``before``; how many.

        Raises:
            OSError, asyncpg.PostgresError: the database failed.
        """
        status: str = await self._pool.execute("DELETE FROM audit_events WHERE at < $1", before)
        return int(status.rpartition(" ")[2])
