"""gRPC handlers of IngestService: decode, hand to the Ingestor, encode."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import grpc

from ingest.ingestor import Ingestor
from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime_common.errors import FieldViolation, abort_invalid


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, ingestor: Ingestor, *, max_batch_size: int, max_in_flight_per_stream: int) -> None:
        self._ingestor = ingestor
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
