"""SyncService's handlers: decode the request, read or change the store, answer (AIP-193
errors: INVALID_ARGUMENT with field violations, NOT_FOUND with an ErrorInfo naming the
connector, UNAVAILABLE with a RetryInfo when PostgreSQL fails)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import grpc

from sendtime.sync.v1 import sync_pb2, sync_pb2_grpc
from sendtime_common.database import STORE_ERRORS
from sendtime_common.errors import FieldViolation, abort_invalid, abort_with, not_found_status, retry_status
from sendtime_common.paging import InvalidPageToken, decode_id_position, encode_id_position, page_size
from sync.connectors import PUSH_KINDS, ConnectorConfig
from sync.push import PendingPushes
from sync.status import NAME_PREFIX, connector_status
from sync.store import ConnectorStore

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1.0


class SyncServicer(sync_pb2_grpc.SyncServiceServicer):
    def __init__(
        self,
        connectors: Sequence[ConnectorConfig],
        store: ConnectorStore,
        pending: PendingPushes,
        wake: Callable[[], None],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._connectors = {c.connector_id: c for c in connectors}
        self._store = store
        self._pending = pending
        self._wake = wake
        self._clock = clock

    async def GetConnectorStatus(
        self, request: sync_pb2.GetConnectorStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sync_pb2.GetConnectorStatusResponse:
        connector = await self._connector(context, request.name, "GetConnectorStatus")
        async with _store_answering(context):
            (status,) = await self._statuses([connector.connector_id])
        return sync_pb2.GetConnectorStatusResponse(status=status)

    async def ListConnectorStatuses(
        self, request: sync_pb2.ListConnectorStatusesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sync_pb2.ListConnectorStatusesResponse:
        violations = []
        try:
            size = page_size(request.page_size)
        except ValueError as exc:
            violations.append(FieldViolation("page_size", str(exc)))
        try:
            after = decode_id_position(request.page_token, {})
        except InvalidPageToken as exc:
            violations.append(FieldViolation("page_token", str(exc)))
        if violations:
            await abort_invalid(context, "invalid ListConnectorStatuses request", violations)
        ids = [c for c in sorted(self._connectors) if after is None or c > after]
        page = ids[:size]
        async with _store_answering(context):
            statuses = await self._statuses(page)
        token = encode_id_position(page[-1], {}) if len(ids) > size else ""
        return sync_pb2.ListConnectorStatusesResponse(statuses=statuses, next_page_token=token)

    async def RunConnector(
        self, request: sync_pb2.RunConnectorRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sync_pb2.RunConnectorResponse:
        connector = await self._connector(context, request.name, "RunConnector")
        async with _store_answering(context):
            await self._store.make_due(connector.connector_id)
            (status,) = await self._statuses([connector.connector_id])
        self._wake()
        return sync_pb2.RunConnectorResponse(status=status)

    async def _statuses(self, connector_ids: list[str]) -> list[sync_pb2.ConnectorStatus]:
        """The connectors' statuses, in order (a push's with its pending customers)."""
        states = await self._store.load_many(connector_ids)
        pushes = [c for c in connector_ids if self._connectors[c].kind in PUSH_KINDS]
        waiting = await self._pending.summary(pushes) if pushes else {}
        now = self._clock()
        return [connector_status(self._connectors[c], states[c], now, waiting.get(c)) for c in connector_ids]

    async def _connector(
        self, context: grpc.aio.ServicerContext[Any, Any], name: str, method: str
    ) -> ConnectorConfig:
        if not name.startswith(NAME_PREFIX) or not name[len(NAME_PREFIX) :]:
            await abort_invalid(
                context,
                f"invalid {method} request",
                [FieldViolation("name", "required: connectors/{connector_id}")],
            )
        connector = self._connectors.get(name[len(NAME_PREFIX) :])
        if connector is None:
            await abort_with(
                context,
                not_found_status(f"no connector {name} is configured", "CONNECTOR_NOT_FOUND", {"name": name}),
            )
        assert connector is not None
        return connector


@asynccontextmanager
async def _store_answering(context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
    """PostgreSQL failing: UNAVAILABLE with a RetryInfo."""
    try:
        yield
    except STORE_ERRORS as exc:
        log.warning("the store did not answer", extra={"error": type(exc).__name__})
        await abort_with(
            context,
            retry_status(
                grpc.StatusCode.UNAVAILABLE,
                "the sync database is unavailable",
                "DATABASE_UNAVAILABLE",
                RETRY_AFTER_S,
            ),
        )
