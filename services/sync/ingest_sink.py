"""Pulled records go to ingest as events over ``SendEvents``, as any client's do: the same
validation, deduplication by event id, and durability (an ACCEPTED event is in the event log).

A page's events go ``chunk`` at a time; each event is sent until ingest gives it a final answer:
ACCEPTED or DUPLICATE (stored, now or before), REJECTED or CONFLICT (refused, kept in ingest's
dead-letter store for review; an item-level failure: counted, and the page goes on). RETRY
answers, and calls that failed UNAVAILABLE, DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED, are sent
again under the same ids with backoff (stamina) for up to ``retry_budget_s``; then
``IngestUnavailable``, and the connector keeps its old cursor. Any other failed call (the key
refused, say) is ``IngestRefused``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import stamina

from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc

RETRIED_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
ACKNOWLEDGED = frozenset({ingest_pb2.EVENT_OUTCOME_ACCEPTED, ingest_pb2.EVENT_OUTCOME_DUPLICATE})
REFUSED = frozenset({ingest_pb2.EVENT_OUTCOME_REJECTED, ingest_pb2.EVENT_OUTCOME_CONFLICT})


class IngestUnavailable(Exception):
    """Ingest did not answer every event within the retry budget."""


class IngestRefused(Exception):
    """Ingest refused the call itself (not an event): the key, its scope, the request."""


@dataclass
class Delivered:
    """Ingest's final answers to a page's events."""

    accepted: int = 0
    duplicates: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # outcome name -> events

    @property
    def answered(self) -> int:
        return self.accepted + self.duplicates + sum(self.refused.values())


class _StillPending(Exception):
    """Some events were answered RETRY."""


def _worth_retrying(exc: Exception) -> bool:
    if isinstance(exc, _StillPending):
        return True
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in RETRIED_CODES


class IngestSink:
    def __init__(
        self,
        stub: ingest_pb2_grpc.IngestServiceAsyncStub,
        *,
        chunk: int = 500,
        call_timeout_s: float = 10.0,
        retry_budget_s: float = 60.0,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 5.0,
    ) -> None:
        if not 1 <= chunk <= 1000:
            raise ValueError(f"chunk {chunk}: 1 to 1000 (SendEvents takes at most 1000)")
        self._stub = stub
        self._chunk = chunk
        self._call_timeout_s = call_timeout_s
        self._retry_budget_s = retry_budget_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s

    def use_stub(self, stub: ingest_pb2_grpc.IngestServiceAsyncStub) -> None:
        """Call through ``stub`` from now on (the channel was reopened with renewed certificates)."""
        self._stub = stub

    async def send(self, events: Sequence[ingest_pb2.Event]) -> Delivered:
        """Every event answered finally (see the module's text).

        Raises:
            IngestUnavailable: the retry budget ran out with events still unanswered.
            IngestRefused: a call failed for a reason sending again would not change.
        """
        delivered = Delivered()
        for start in range(0, len(events), self._chunk):
            await self._send_chunk(list(events[start : start + self._chunk]), delivered)
        return delivered

    async def _send_chunk(self, events: list[ingest_pb2.Event], delivered: Delivered) -> None:
        pending = events
        try:
            async for attempt in stamina.retry_context(
                on=_worth_retrying,
                attempts=None,
                timeout=self._retry_budget_s,
                wait_initial=self._backoff_initial_s,
                wait_max=self._backoff_max_s,
            ):
                with attempt:
                    pending = await self._call(pending, delivered)
                    if pending:
                        raise _StillPending()
        except _StillPending:
            raise IngestUnavailable(
                f"{len(pending)} events answered RETRY for {self._retry_budget_s:g} s"
            ) from None
        except grpc.aio.AioRpcError as exc:
            if exc.code() in RETRIED_CODES:
                raise IngestUnavailable(
                    f"SendEvents {exc.code().name} for {self._retry_budget_s:g} s"
                ) from None
            raise IngestRefused(f"SendEvents {exc.code().name}") from None

    async def _call(self, events: list[ingest_pb2.Event], delivered: Delivered) -> list[ingest_pb2.Event]:
        """Send ``events``; count the final answers, return the events to send again."""
        response = await self._stub.SendEvents(
            ingest_pb2.SendEventsRequest(events=events), timeout=self._call_timeout_s
        )
        again = []
        for event, result in zip(events, response.results, strict=True):
            if result.outcome == ingest_pb2.EVENT_OUTCOME_ACCEPTED:
                delivered.accepted += 1
            elif result.outcome == ingest_pb2.EVENT_OUTCOME_DUPLICATE:
                delivered.duplicates += 1
            elif result.outcome in REFUSED:
                delivered.refused[ingest_pb2.EventOutcome.Name(result.outcome)] += 1
            else:  # RETRY, or an outcome this client does not know: not final
                again.append(event)
        return again
