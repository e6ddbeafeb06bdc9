"""gRPC handlers of IngestService: decode, hand to the Ingestor or the dead letters, encode."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from datetime import UTC
from typing import Any, NoReturn

import grpc

from ingest.dead_letters import AlreadyReplayed, DeadLetters, InvalidName, parse_name
from ingest.ingestor import Ingestor
from ingest.stats import OutcomeCounters, stats_response
from ingest.store import IngestStore, StoreError
from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime_common.errors import FieldViolation, abort_invalid, abort_with, not_found_status, retry_status
from sendtime_common.paging import InvalidPageToken, page_size


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(
        self,
        ingestor: Ingestor,
        dead_letters: DeadLetters,
        store: IngestStore,
        counters: OutcomeCounters,
        *,
        max_batch_size: int,
        max_in_flight_per_stream: int,
    ) -> None:
        self._ingestor = ingestor
        self._dead_letters = dead_letters
        self._store = store
        self._counters = counters
        self._max_batch_size = max_batch_size
        self._max_in_flight = max_in_flight_per_stream

    async def SendEvents(
        self, request: ingest_pb2.SendEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.SendEventsResponse:
        count = len(request.events)
        if not 1 <= count <= self._max_batch_size:
            await abort_invalid(
                context,
                "events: wrong number of events",
                [FieldViolation("events", f"must hold 1 to {self._max_batch_size} events, got {count}")],
            )
        results = await self._ingestor.ingest_batch(list(request.events))
        return ingest_pb2.SendEventsResponse(results=results)

    async def StreamEvents(
        self,
        request_iterator: AsyncIterable[ingest_pb2.StreamEventsRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[ingest_pb2.StreamEventsResponse]:
        async def events() -> AsyncIterator[ingest_pb2.Event]:
            async for request in request_iterator:
                yield request.event

        async for result in self._ingestor.ingest_stream(events(), self._max_in_flight):
            yield ingest_pb2.StreamEventsResponse(result=result)

    async def ListRejectedEvents(
        self, request: ingest_pb2.ListRejectedEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.ListRejectedEventsResponse:
        violations = []
        if request.page_size < 0:
            violations.append(FieldViolation("page_size", "must not be negative"))
        if request.state not in ingest_pb2.RejectedEventState.values():
            violations.append(FieldViolation("state", f"unknown value {request.state}"))
        if request.source not in ingest_pb2.EventSource.values():
            violations.append(FieldViolation("source", f"unknown value {request.source}"))
        if violations:
            await abort_invalid(context, "invalid ListRejectedEvents request", violations)
        try:
            rejected, token = await self._dead_letters.list(
                page_size=page_size(request.page_size),
                page_token=request.page_token,
                state=request.state,
                source=request.source,
            )
        except InvalidPageToken as exc:
            await abort_invalid(context, "invalid page token", [FieldViolation("page_token", str(exc))])
        except StoreError:
            await _abort_store_unavailable(context)
        return ingest_pb2.ListRejectedEventsResponse(rejected_events=rejected, next_page_token=token)

    async def ReplayRejectedEvent(
        self, request: ingest_pb2.ReplayRejectedEventRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.ReplayRejectedEventResponse:
        try:
            rejection_id = parse_name(request.name)
        except InvalidName as exc:
            await abort_invalid(context, "invalid name", [FieldViolation("name", str(exc))])
        corrected = request.corrected_event if request.HasField("corrected_event") else None
        try:
            replayed = await self._dead_letters.replay(rejection_id, corrected)
        except AlreadyReplayed as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except StoreError:
            await _abort_store_unavailable(context)
        if replayed is None:
            await abort_with(
                context,
                not_found_status(f"no {request.name}", "REJECTED_EVENT_NOT_FOUND", {"name": request.name}),
            )
        result, rejected = replayed
        return ingest_pb2.ReplayRejectedEventResponse(result=result, rejected_event=rejected)

    async def GetIngestStats(
        self, request: ingest_pb2.GetIngestStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.GetIngestStatsResponse:
        since = request.start_time.ToDatetime(tzinfo=UTC).date() if request.HasField("start_time") else None
        await self._counters.flush(self._store)  # include this replica's latest counts
        try:
            totals, first_day = await self._store.counts(since)
        except StoreError:
            await _abort_store_unavailable(context)
        return stats_response(totals, first_day)


async def _abort_store_unavailable(context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
    await abort_with(
        context,
        retry_status(
            grpc.StatusCode.UNAVAILABLE, "ingest's database is unavailable", "DATABASE_UNAVAILABLE", 1.0
        ),
    )
