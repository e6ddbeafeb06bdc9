"""The ingest pipeline for one event: validate, normalize, store durably, report the outcome.

An event is ACCEPTED only once the event log has confirmed it; when the log cannot confirm, the
outcome is RETRY with the reason, never a false ACCEPTED.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import grpc
from opentelemetry import trace

from ingest.validation import validate_event
from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.errors import bad_request_status, retry_status
from sendtime_common.event_log import EventLog, EventLogFull, EventLogUnavailable, OutgoingMessage
from sendtime_common.identifiers import identifiers_of
from sendtime_common.telemetry import inject_trace_headers

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

RETRY_AFTER_UNAVAILABLE_S = 1.0
RETRY_AFTER_FULL_S = 30.0


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Ingestor:
    """Validates events and stores the valid ones in the event log."""

    def __init__(
        self,
        event_log: EventLog,
        *,
        max_future_skew: timedelta,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._event_log = event_log
        self._max_future_skew = max_future_skew
        self._clock = clock

    async def ingest(self, event: ingest_pb2.Event) -> ingest_pb2.EventResult:
        """The outcome for one event. Never raises for a bad event or an unavailable log."""
        with tracer.start_as_current_span("ingest.event") as span:
            span.set_attribute("sendtime.event_id", event.event_id)
            result = await self._ingest(event)
            span.set_attribute("sendtime.outcome", ingest_pb2.EventOutcome.Name(result.outcome))
            return result

    async def _ingest(self, event: ingest_pb2.Event) -> ingest_pb2.EventResult:
        violations = validate_event(event, self._clock(), self._max_future_skew)
        if violations:
            return ingest_pb2.EventResult(
                event_id=event.event_id,
                outcome=ingest_pb2.EVENT_OUTCOME_REJECTED,
                status=bad_request_status("the event is invalid", violations),
            )
        normalized = _normalized(event)
        payload_type = event.WhichOneof("payload")
        assert payload_type is not None  # validated above
        message = OutgoingMessage(
            key=payload_type,
            message_id=event.event_id,
            payload=normalized.SerializeToString(deterministic=True),
            headers=inject_trace_headers({}),
        )
        try:
            receipt = await self._event_log.publish(message)
        except EventLogFull as exc:
            log.warning("event log full", extra={"event_id": event.event_id, "error": str(exc)})
            return _retry(
                event,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "the event log is full",
                "EVENT_LOG_FULL",
                RETRY_AFTER_FULL_S,
            )
        except EventLogUnavailable as exc:
            log.warning("event log unavailable", extra={"event_id": event.event_id, "error": str(exc)})
            return _retry(
                event,
                grpc.StatusCode.UNAVAILABLE,
                "the event log is unavailable",
                "EVENT_LOG_UNAVAILABLE",
                RETRY_AFTER_UNAVAILABLE_S,
            )
        outcome = (
            ingest_pb2.EVENT_OUTCOME_DUPLICATE if receipt.duplicate else ingest_pb2.EVENT_OUTCOME_ACCEPTED
        )
        return ingest_pb2.EventResult(event_id=event.event_id, outcome=outcome)

    async def ingest_batch(self, events: list[ingest_pb2.Event]) -> list[ingest_pb2.EventResult]:
        """Outcomes in input order; the events are stored concurrently (pipelined publishes)."""
        return list(await asyncio.gather(*(self.ingest(e) for e in events)))

    async def ingest_stream(
        self, events: AsyncIterable[ingest_pb2.Event], max_in_flight: int
    ) -> AsyncIterator[ingest_pb2.EventResult]:
        """Outcomes as each event completes. At most ``max_in_flight`` events are in progress:
        beyond that, the next event is not read, which pushes back on the sender through gRPC
        flow control."""
        slots = asyncio.Semaphore(max_in_flight)
        results: asyncio.Queue[ingest_pb2.EventResult | BaseException | None] = asyncio.Queue()
        in_progress: set[asyncio.Task[None]] = set()

        async def handle(event: ingest_pb2.Event) -> None:
            try:
                results.put_nowait(await self.ingest(event))
            finally:
                slots.release()

        async def read_all() -> None:
            try:
                async for event in events:
                    await slots.acquire()
                    task = asyncio.create_task(handle(event))
                    in_progress.add(task)
                    task.add_done_callback(in_progress.discard)
                if in_progress:
                    await asyncio.gather(*in_progress)
                results.put_nowait(None)
            except BaseException as exc:  # surfaced to the caller below, then re-raised
                results.put_nowait(exc)
                raise

        reader = asyncio.create_task(read_all())
        try:
            while (item := await results.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            reader.cancel()
            for task in list(in_progress):
                task.cancel()


def _normalized(event: ingest_pb2.Event) -> ingest_pb2.Event:
    """A copy with identifiers in canonical form, so every consumer sees the same values."""
    copy = ingest_pb2.Event()
    copy.CopyFrom(event)
    for kind, value in identifiers_of(event.customer).items():
        setattr(copy.customer, kind.value, value)
    return copy


def _retry(
    event: ingest_pb2.Event, code: grpc.StatusCode, message: str, reason: str, after_s: float
) -> ingest_pb2.EventResult:
    return ingest_pb2.EventResult(
        event_id=event.event_id,
        outcome=ingest_pb2.EVENT_OUTCOME_RETRY,
        status=retry_status(code, message, reason, after_s),
    )
