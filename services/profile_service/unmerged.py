"""The merger's dead letters ("unmerged events"), and how a failed merge is judged.

A merge that fails is one of three kinds (``failure_kind``):

- **transient**: PostgreSQL (or the way to it) is down, restarting, out of resources, or the
  transaction lost a race; also what a broken deployment raises (a missing table, a refused
  privilege). The event is not at fault: it is retried with backoff, for as long as it takes,
  and never set aside.
- **poison**: the event's own data is what fails (PostgreSQL refuses a value, the fold or the
  JSON encoding of the state raises ValueError or TypeError, the message does not decode). The
  same event would fail the same way on every delivery, so it is set aside at once, with why.
- **unknown**: anything else (a bug that only some events meet). Retried like a transient
  failure, and set aside once it has failed on ``max_deliveries`` deliveries, so that it never
  loops for ever either.

Setting aside stores the message as the log held it in ``unmerged_events`` (with its position
in the log, and the hashes of the identifiers it names, so that erasing the person deletes it),
then settles the delivery for good (``term``). ``UnmergedEventService`` lists them and replays
one. An idempotency conflict the merger finds (an event id it merged before, with another
payload) is kept here for review the same way.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Protocol

import asyncpg
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2

from profile_service.merge_transaction import MergeConflict
from profile_service.metrics import UNMERGED
from sendtime.ingest.v1 import ingest_pb2
from sendtime.profile.v1 import profile_pb2
from sendtime_common.database import STORE_ERRORS
from sendtime_common.errors import (
    ERROR_DOMAIN,
    FieldViolation,
    bad_request_status,
    details_of,
    error_info_status,
    pack_detail,
)
from sendtime_common.event_integrity import CONFLICT_REASON, conflict_status, identifier_hashes
from sendtime_common.identifiers import IdentifierHasher
from sendtime_common.paging import decode_time_position, encode_time_position
from sendtime_common.resource_names import InvalidName as InvalidName
from sendtime_common.resource_names import numeric_id
from sendtime_common.storable import unstorable_values

log = logging.getLogger(__name__)

NAME_PREFIX = "unmergedEvents/"
MAX_ERROR_TEXT = 500

StoreError = STORE_ERRORS
"""What a store call raises when PostgreSQL is unreachable or fails."""


class FailureKind(enum.StrEnum):
    TRANSIENT = "transient"
    POISON = "poison"
    UNKNOWN = "unknown"


class UnmergedReason(enum.StrEnum):
    """The ErrorInfo reason of an unmerged event's status."""

    UNDECODABLE = "EVENT_UNDECODABLE"
    UNSTORABLE = "UNSTORABLE_VALUE"
    MERGE_FAILED = "MERGE_FAILED"
    CONFLICT = CONFLICT_REASON


# Every reason's series exists from the start (at 0), so that increase() sees the first one.
for _reason in UnmergedReason:
    UNMERGED.labels(_reason.value)

# Not the event's fault: the database, the connection, a lost race, the deployment.
_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,  # connection refused or reset, timeouts
    asyncpg.InterfaceError,  # connection closed, pool closing
    asyncpg.PostgresConnectionError,  # 08
    asyncpg.InsufficientResourcesError,  # 53: disk full, out of memory, too many connections
    asyncpg.OperatorInterventionError,  # 57: shutting down, starting up, statement cancelled
    asyncpg.PostgresSystemError,  # 58: I/O error
    asyncpg.TransactionRollbackError,  # 40: serialization failure, deadlock
    asyncpg.ObjectNotInPrerequisiteStateError,  # 55: lock not available
    asyncpg.InternalServerError,  # XX
    asyncpg.SyntaxOrAccessError,  # 42: a missing table or privilege: the deployment's fault
    asyncpg.FeatureNotSupportedError,  # 0A
    asyncpg.InvalidAuthorizationSpecificationError,  # 28
    asyncpg.InvalidCatalogNameError,  # 3D
    asyncpg.InvalidSchemaNameError,  # 3F
    MergeConflict,  # raced other transactions on every attempt
)
# The event's own data: the same event fails the same way every time.
_POISON: tuple[type[BaseException], ...] = (
    asyncpg.DataError,  # 22: a value PostgreSQL refuses (NUL, out of range, bad encoding)
    asyncpg.ProgramLimitExceededError,  # 54: a value past one of PostgreSQL's limits
    ValueError,  # the fold or the encoding refuses a value (NaN, a time out of range, ...)
    TypeError,  # e.g. orjson: an integer past 64 bits
    ArithmeticError,  # decimal.InvalidOperation, OverflowError
    DecodeError,
    RecursionError,
)


def failure_kind(exc: BaseException) -> FailureKind:
    """Whether a merge that raised ``exc`` may succeed later (module docstring)."""
    if isinstance(exc, _TRANSIENT):
        return FailureKind.TRANSIENT
    if isinstance(exc, _POISON):
        return FailureKind.POISON
    return FailureKind.UNKNOWN


def undecodable_status(size: int) -> status_pb2.Status:
    return error_info_status(
        code_pb2.INVALID_ARGUMENT,
        "the message is not a sendtime.ingest.v1.Event",
        UnmergedReason.UNDECODABLE,
        {"bytes": str(size)},
    )


def unstorable_status(violations: Sequence[FieldViolation]) -> status_pb2.Status:
    """INVALID_ARGUMENT naming each value no store can keep, with the reason UNSTORABLE_VALUE."""
    status = bad_request_status("the event holds values no store can keep", violations)
    info = error_details_pb2.ErrorInfo(reason=UnmergedReason.UNSTORABLE, domain=ERROR_DOMAIN)
    status.details.append(pack_detail(info))
    return status


def merge_failure_status(event: ingest_pb2.Event, exc: BaseException, deliveries: int) -> status_pb2.Status:
    """Why ``event`` was set aside after its merge raised ``exc``: the values no store can keep
    when it holds any, else the error itself (INTERNAL, with the exception: for the operators
    who may list these, who need it to find the bug)."""
    if violations := unstorable_values(event):
        return unstorable_status(violations)
    text = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_TEXT]
    metadata = {"error": type(exc).__name__, "deliveries": str(deliveries)}
    return error_info_status(code_pb2.INTERNAL, text, UnmergedReason.MERGE_FAILED, metadata)


def event_of(payload: bytes) -> ingest_pb2.Event | None:
    """The event a stored message holds; None when it does not decode."""
    try:
        return ingest_pb2.Event.FromString(payload)
    except DecodeError:
        return None


# --- storage ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredUnmerged:
    id: int
    payload: bytes
    log_position: int | None
    delivery_count: int
    status: bytes
    created_at: datetime
    replayed_at: datetime | None


_COLUMNS = "id, payload, log_position, delivery_count, status, created_at, replayed_at"


class UnmergedStore:
    """The ``unmerged_events`` table. Every method is one statement.

    Every method raises ``StoreError`` when PostgreSQL is unreachable or fails.
    """

    def __init__(self, pool: asyncpg.Pool, hasher: IdentifierHasher, *, purge_chunk: int = 10_000) -> None:
        self._pool = pool
        self._hasher = hasher
        self._purge_chunk = purge_chunk

    async def add(
        self, payload: bytes, log_position: int | None, delivery_count: int, status: status_pb2.Status
    ) -> None:
        """Set a message aside. A message set aside before (same log position: its settling was
        lost and the log delivered it again) keeps its first row."""
        event = event_of(payload)
        hashes = list(identifier_hashes(event, self._hasher)) if event is not None else []
        inserted = await self._pool.execute(
            "INSERT INTO unmerged_events (payload, log_position, delivery_count, status, identifier_hashes)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (log_position) DO NOTHING",
            payload,
            log_position,
            delivery_count,
            status.SerializeToString(),
            hashes,
        )
        if inserted == "INSERT 0 1":
            infos = details_of(status, error_details_pb2.ErrorInfo)
            UNMERGED.labels(infos[0].reason if infos else "").inc()

    async def list(
        self, *, limit: int, after: tuple[datetime, int] | None, replayed: bool | None
    ) -> list[StoredUnmerged]:
        """Newest first, after the (created_at, id) position ``after``."""
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM unmerged_events"
            " WHERE ($1::timestamptz IS NULL OR (created_at, id) < ($1, $2))"
            "   AND ($3::boolean IS NULL OR (replayed_at IS NOT NULL) = $3)"
            " ORDER BY created_at DESC, id DESC LIMIT $4",
            after[0] if after else None,
            after[1] if after else None,
            replayed,
            limit,
        )
        return [StoredUnmerged(**dict(row)) for row in rows]

    async def get(self, unmerged_id: int) -> StoredUnmerged | None:
        row = await self._pool.fetchrow(f"SELECT {_COLUMNS} FROM unmerged_events WHERE id = $1", unmerged_id)
        return StoredUnmerged(**dict(row)) if row else None

    async def update(
        self, unmerged_id: int, *, status: status_pb2.Status | None, replayed_at: datetime | None
    ) -> StoredUnmerged | None:
        """After a replay: mark it replayed, or keep the reason it still is not merged. None when
        it is gone (erased, or its retention ran out during the replay)."""
        row = await self._pool.fetchrow(
            "UPDATE unmerged_events SET status = coalesce($2, status), replayed_at = $3"
            f" WHERE id = $1 RETURNING {_COLUMNS}",
            unmerged_id,
            status.SerializeToString() if status is not None else None,
            replayed_at,
        )
        return StoredUnmerged(**dict(row)) if row else None

    async def purge(self, older_than: datetime) -> int:
        """Delete those set aside before ``older_than``, replayed or not, in chunks (each its own
        short transaction); how many."""
        purged = 0
        while True:
            result = await self._pool.execute(
                "DELETE FROM unmerged_events WHERE id = ANY(ARRAY("
                "SELECT id FROM unmerged_events WHERE created_at < $1 LIMIT $2))",
                older_than,
                self._purge_chunk,
            )
            deleted = int(result.split()[-1])
            purged += deleted
            if deleted < self._purge_chunk:
                return purged


# --- the API's view -----------------------------------------------------------------------------


class AlreadyReplayed(Exception):
    """It was replayed before; it is kept for the record only."""


def parse_name(name: str) -> int:
    """The id in ``unmergedEvents/{id}``.

    Raises:
        InvalidName: the name has another shape.
    """
    return numeric_id(name, NAME_PREFIX)


def to_proto(row: StoredUnmerged) -> profile_pb2.UnmergedEvent:
    proto = profile_pb2.UnmergedEvent(
        name=f"{NAME_PREFIX}{row.id}",
        status=status_pb2.Status.FromString(row.status),
        state=(
            profile_pb2.UNMERGED_EVENT_STATE_REPLAYED
            if row.replayed_at
            else profile_pb2.UNMERGED_EVENT_STATE_PENDING
        ),
        log_position=row.log_position or 0,
        delivery_count=row.delivery_count,
    )
    event = event_of(row.payload)
    if event is not None:
        proto.event.CopyFrom(event)
    proto.create_time.FromDatetime(row.created_at)
    if row.replayed_at:
        proto.replay_time.FromDatetime(row.replayed_at)
    return proto


async def list_page(
    store: UnmergedStore, *, page_size: int, page_token: str, state: int
) -> tuple[list[profile_pb2.UnmergedEvent], str]:
    """One page, newest first, and the token for the next ('' on the last page).

    Raises:
        sendtime_common.paging.InvalidPageToken: a token from another listing.
        StoreError: PostgreSQL failed.
    """
    filters = {"state": state}
    after = decode_time_position(page_token, filters, int) if page_token else None
    replayed = (
        None
        if state == profile_pb2.UNMERGED_EVENT_STATE_UNSPECIFIED
        else state == profile_pb2.UNMERGED_EVENT_STATE_REPLAYED
    )
    rows = await store.list(limit=page_size + 1, after=after, replayed=replayed)
    page, more = rows[:page_size], len(rows) > page_size
    token = encode_time_position(page[-1].created_at, page[-1].id, filters) if more else ""
    return [to_proto(r) for r in page], token


@dataclass(frozen=True, slots=True)
class Replayed:
    """What a replay did: the unmerged event after it, and the customer it was merged into
    ('' when it was not merged)."""

    unmerged: profile_pb2.UnmergedEvent
    customer_id: str


class Merging(Protocol):
    """What a replay needs of the merger (``EventMerger.merge_now``)."""

    async def merge_now(self, event: ingest_pb2.Event, position: int | None) -> tuple[str, bool]:
        """Merge ``event`` now; its customer id, and whether it was an idempotency conflict (then
        nothing was merged)."""
        ...


async def replay(store: UnmergedStore, merging: Merging, unmerged_id: int) -> Replayed | None:
    """Merge an unmerged event again, as stored; None when there is no such one.

    Merged (or merged already): it is marked replayed. Refused again (undecodable, a value no
    store can keep, the merge failing, a conflict): it stays pending with the new reason.

    Raises:
        AlreadyReplayed: it was replayed before.
        StoreError: PostgreSQL failed (a merge that failed as transient too); nothing changed.
    """
    row = await store.get(unmerged_id)
    if row is None:
        return None
    if row.replayed_at is not None:
        raise AlreadyReplayed(f"{NAME_PREFIX}{unmerged_id} was replayed at {row.replayed_at}")
    event = event_of(row.payload)
    customer_id = ""
    status: status_pb2.Status | None
    if event is None:
        status = undecodable_status(len(row.payload))
    elif violations := unstorable_values(event):
        status = unstorable_status(violations)
    else:
        try:
            customer_id, conflict = await merging.merge_now(event, row.log_position)
        except Exception as exc:  # noqa: BLE001 - judged below; transient ones reach the caller
            if failure_kind(exc) is FailureKind.TRANSIENT:
                raise _unavailable(exc) from exc
            status = merge_failure_status(event, exc, row.delivery_count)
        else:
            status = conflict_status(event.event_id) if conflict else None
    if status is None:
        replayed_at = datetime.now(UTC)
        updated = await store.update(unmerged_id, status=None, replayed_at=replayed_at)
        return Replayed(to_proto(updated or replace(row, replayed_at=replayed_at)), customer_id)
    log.info("replayed event still not merged", extra={"unmerged_id": unmerged_id})
    updated = await store.update(unmerged_id, status=status, replayed_at=None)
    return Replayed(to_proto(updated or replace(row, status=status.SerializeToString())), "")


def _unavailable(exc: BaseException) -> BaseException:
    """A transient failure as the store error it is (OSError for the rest)."""
    return exc if isinstance(exc, StoreError) else OSError(f"{type(exc).__name__}: {exc}")
