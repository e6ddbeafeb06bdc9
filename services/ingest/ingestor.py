"""The ingest pipeline: stamp, validate, deduplicate, store durably, report one outcome per event.

A second event under a stored event's id is a DUPLICATE when it is the same event (the same
fingerprint: ``sendtime_common.event_integrity``), and a CONFLICT when it is another one: it is
then kept in the dead-letter store for review, never counted as a duplicate and dropped. The
fingerprint comes from ingest's record of stored ids, from the first event of a batch holding
both, or, when the event log caught the resend in its duplicate window first, from the first
event as the log holds it (read back by its position: rare, one read per such resend).

For a batch of events it makes a fixed number of round trips: one PostgreSQL query for ids seen
before, one to claim business keys, pipelined publishes to the event log, one write recording
what was stored (and one for dead letters). ``StreamEvents`` feeds single events through a
micro-batcher, so a stream gets the same batching. Batches run side by side, but publish in the
order they were formed, so a customer's events sent in order reach the log in order (the
profile merger replays a customer's history for every event that arrives late).

An event is ACCEPTED only once the event log has confirmed it. When the log, or the dedup
store, cannot answer, the outcome is RETRY with the reason, never a false ACCEPTED; rejected
events are answered REJECTED only once they are in the dead-letter store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from opentelemetry import trace

from ingest.envelope import BusinessKey, business_key, event_type, stamp
from ingest.metrics import count_outcomes
from ingest.stats import OutcomeCounters
from ingest.store import IngestStore, Rejection, StoreError
from ingest.validation import ValidationRules, validate_event
from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.batching import MicroBatcher, Turns
from sendtime_common.errors import bad_request_status, retry_status
from sendtime_common.event_integrity import conflict_status, conflicts, fingerprint, identifier_hashes
from sendtime_common.event_log import (
    EventLog,
    EventLogFull,
    EventLogUnavailable,
    OutgoingMessage,
    PublishReceipt,
)
from sendtime_common.identifiers import IdentifierHasher, identifiers_of, routing_key
from sendtime_common.telemetry import inject_trace_headers, unsampled

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

RETRY_AFTER_UNAVAILABLE_S = 1.0
RETRY_AFTER_FULL_S = 30.0
STREAM_BATCH_SIZE = 256
STREAM_CONCURRENT_BATCHES = 4

ACCEPTED = ingest_pb2.EVENT_OUTCOME_ACCEPTED
DUPLICATE = ingest_pb2.EVENT_OUTCOME_DUPLICATE
REJECTED = ingest_pb2.EVENT_OUTCOME_REJECTED
RETRY = ingest_pb2.EVENT_OUTCOME_RETRY
CONFLICT = ingest_pb2.EVENT_OUTCOME_CONFLICT
DUPLICATE_IN_LOG_WINDOW = ingest_pb2.DUPLICATE_KIND_EVENT_LOG_WINDOW
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class _Work:
    """One event on its way through a batch."""

    event: ingest_pb2.Event  # stamped and normalized
    result: ingest_pb2.EventResult | None = None
    duplicate_kind: int = ingest_pb2.DUPLICATE_KIND_UNSPECIFIED
    key: BusinessKey | None = None
    fingerprint: bytes | None = None  # of a valid event
    dead_letter: Rejection | None = None  # what the dead-letter store keeps of it, if anything
    first_copy_at: int | None = None  # a log-window duplicate: where the log holds the first

    def finish(self, outcome: int, kind: int = ingest_pb2.DUPLICATE_KIND_UNSPECIFIED) -> None:
        self.result = ingest_pb2.EventResult(event_id=self.event.event_id, outcome=outcome)  # type: ignore[arg-type]
        self.duplicate_kind = kind


class Ingestor:
    """Validates events, keeps the valid ones once in the event log and the invalid ones in the
    dead-letter store."""

    def __init__(
        self,
        event_log: EventLog,
        store: IngestStore,
        counters: OutcomeCounters,
        *,
        rules: ValidationRules,
        claim_stale_after: timedelta = timedelta(seconds=60),
        hasher: IdentifierHasher | None = None,
        stream_linger: timedelta = timedelta(0),
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._event_log = event_log
        self._store = store
        self._counters = counters
        self._rules = rules
        self._claim_stale_after = claim_stale_after
        self._hasher = hasher or IdentifierHasher.unkeyed()  # names a dead letter's people
        self._clock = clock
        self._publish_turns = Turns()
        self._stream_batcher: MicroBatcher[ingest_pb2.Event, ingest_pb2.EventResult] = MicroBatcher(
            self.ingest_batch,
            max_batch=STREAM_BATCH_SIZE,
            max_concurrent_batches=STREAM_CONCURRENT_BATCHES,
            linger_s=stream_linger.total_seconds(),
        )

    async def ingest(self, event: ingest_pb2.Event) -> ingest_pb2.EventResult:
        """The outcome for one event. Never raises for a bad event or an unavailable dependency."""
        (result,) = await self.ingest_batch([event])
        return result

    async def ingest_batch(
        self, events: list[ingest_pb2.Event], *, dead_letter: bool = True
    ) -> list[ingest_pb2.EventResult]:
        """Outcomes in input order. ``dead_letter=False`` (a replay of a dead letter) answers
        REJECTED or CONFLICT without storing the event again."""
        turn = self._publish_turns.ticket()
        try:
            return await self._ingest_batch(events, dead_letter, turn)
        finally:
            self._publish_turns.done(turn)

    async def _ingest_batch(
        self, events: list[ingest_pb2.Event], dead_letter: bool, turn: int
    ) -> list[ingest_pb2.EventResult]:
        received_at = self._clock()
        work = [_Work(_normalized(stamp(e, received_at))) for e in events]
        self._validate(work, received_at)
        self._mark_repeats_within_batch(work)
        try:
            await self._deduplicate(work)
        except StoreError as exc:
            log.warning("dedup store unavailable", extra={"error": str(exc)})
            self._retry_all(work, "the dedup store is unavailable", "DEDUP_STORE_UNAVAILABLE")
            return self._report(work, received_at)
        claims = {w.key: w.event.event_id for w in work if w.result is None and w.key is not None}
        kept = [w for w in work if w.dead_letter is not None] if dead_letter else []
        await self._publish_turns.wait(turn)
        storing = asyncio.ensure_future(self._store_dead_letters(kept, received_at)) if kept else None
        published = [w for w in work if w.result is None]
        await self._publish(published, turn)
        found_in_log = await self._compare_with_first_copies(published)
        if storing is not None:
            await storing
        if found_in_log and dead_letter:
            await self._store_dead_letters(found_in_log, received_at)
        await self._record(work, claims, received_at)
        return self._report(work, received_at)

    def _validate(self, work: list[_Work], now: datetime) -> None:
        for w in work:
            violations = validate_event(w.event, now, self._rules)
            if violations:
                status = bad_request_status("the event is invalid", violations)
                w.result = ingest_pb2.EventResult(event_id=w.event.event_id, outcome=REJECTED, status=status)
                w.dead_letter = self._rejection(w.event, status)
            else:
                w.key = business_key(w.event)
                w.fingerprint = fingerprint(w.event)

    def _rejection(self, event: ingest_pb2.Event, status: status_pb2.Status) -> Rejection:
        return Rejection(
            event.event_id,
            event.source,
            event.SerializeToString(),
            status.SerializeToString(),
            identifier_hashes(event, self._hasher),
        )

    def _conflict(self, w: _Work) -> None:
        """Another event under a stored event's id: answered CONFLICT, kept for review."""
        status = conflict_status(w.event.event_id)
        w.result = ingest_pb2.EventResult(event_id=w.event.event_id, outcome=CONFLICT, status=status)
        w.duplicate_kind = ingest_pb2.DUPLICATE_KIND_UNSPECIFIED
        w.dead_letter = self._rejection(w.event, status)
        log.warning("idempotency conflict", extra={"event_id": w.event.event_id})

    def _mark_repeats_within_batch(self, work: list[_Work]) -> None:
        first: dict[str, bytes | None] = {}  # event id -> the fingerprint of its first event
        keys: set[BusinessKey] = set()
        for w in work:
            if w.result is not None:
                continue
            if w.event.event_id in first:
                if conflicts(first[w.event.event_id], w.fingerprint):
                    self._conflict(w)
                else:
                    w.finish(DUPLICATE, ingest_pb2.DUPLICATE_KIND_EVENT_ID)
            elif w.key is not None and w.key in keys:
                w.finish(DUPLICATE, ingest_pb2.DUPLICATE_KIND_BUSINESS_KEY)
            first.setdefault(w.event.event_id, w.fingerprint)
            if w.key is not None:
                keys.add(w.key)

    async def _deduplicate(self, work: list[_Work]) -> None:
        """Ids stored before (DUPLICATE, or CONFLICT when the event differs), then business keys
        owned by other events (DUPLICATE)."""
        open_work = [w for w in work if w.result is None]
        if not open_work:
            return
        seen = await self._store.seen_event_ids([w.event.event_id for w in open_work])
        for w in open_work:
            if w.event.event_id in seen:
                if conflicts(seen[w.event.event_id], w.fingerprint):
                    self._conflict(w)
                else:
                    w.finish(DUPLICATE, ingest_pb2.DUPLICATE_KIND_EVENT_ID)
        claims = {w.key: w.event.event_id for w in work if w.result is None and w.key is not None}
        owners = await self._store.claim_business_keys(claims, self._claim_stale_after)
        for w in work:
            if w.result is None and w.key is not None:
                owner = owners.get(w.key)
                if owner is None:
                    w.result = _retry(
                        w.event, grpc.StatusCode.UNAVAILABLE, "a concurrent event holds this business key",
                        "BUSINESS_KEY_CONTENDED", RETRY_AFTER_UNAVAILABLE_S,
                    )  # fmt: skip
                elif owner != w.event.event_id:
                    w.finish(DUPLICATE, ingest_pb2.DUPLICATE_KIND_BUSINESS_KEY)

    async def _publish(self, work: list[_Work], turn: int) -> None:
        """Publish ``work`` as one batch, letting the next batch go once these are sent; each
        event's outcome is what the log answered."""
        spans = self._event_spans(work)
        # Unsampled, every event carries the call's trace context: worked out once, shared (the
        # event log copies a message's headers before adding its own).
        call_headers = inject_trace_headers({})
        messages = [
            OutgoingMessage(
                key=w.event.WhichOneof("payload") or "",  # validated: there is one
                message_id=w.event.event_id,
                payload=w.event.SerializeToString(deterministic=True),
                headers=call_headers if span is None else inject_trace_headers({}, span),
                partition_key=routing_key(w.event.customer),
            )
            for w, span in zip(work, spans, strict=True)
        ]
        confirmations = await self._event_log.publish_batch(messages)
        self._publish_turns.done(turn)  # these are on the connection: the next batch's go after them
        failures: list[EventLogUnavailable | EventLogFull] = []
        for w, span, outcome in zip(work, spans, await confirmations, strict=True):
            if isinstance(outcome, PublishReceipt):
                if outcome.duplicate:
                    w.finish(DUPLICATE, DUPLICATE_IN_LOG_WINDOW)
                    w.first_copy_at = outcome.sequence
                else:
                    w.finish(ACCEPTED)
            elif isinstance(outcome, EventLogFull):
                failures.append(outcome)
                w.result = _retry(
                    w.event, grpc.StatusCode.RESOURCE_EXHAUSTED, "the event log is full", "EVENT_LOG_FULL",
                    RETRY_AFTER_FULL_S,
                )  # fmt: skip
            else:
                failures.append(outcome)
                w.result = _retry(
                    w.event, grpc.StatusCode.UNAVAILABLE, "the event log is unavailable",
                    "EVENT_LOG_UNAVAILABLE", RETRY_AFTER_UNAVAILABLE_S,
                )  # fmt: skip
            if span is not None:
                assert w.result is not None
                span.set_attribute("sendtime.outcome", ingest_pb2.EventOutcome.Name(w.result.outcome))
                span.end()
        if failures:
            log.warning(
                "event log did not store events", extra={"events": len(failures), "error": str(failures[0])}
            )

    @staticmethod
    def _event_spans(work: list[_Work]) -> list[trace.Span | None]:
        """A span per event, whose context the event carries to the merge; none in an unsampled
        call, where the event carries the call's trace id on instead."""
        if unsampled(trace.get_current_span().get_span_context()):
            return [None] * len(work)
        return [
            tracer.start_span(
                "ingest.event",
                attributes={
                    "sendtime.event_id": w.event.event_id,
                    "sendtime.event_type": event_type(w.event),
                },
            )
            for w in work
        ]

    async def _compare_with_first_copies(self, published: list[_Work]) -> list[_Work]:
        """For each event the log caught in its duplicate window: read the first event under its
        id back from the log and compare. The same event stays DUPLICATE; another one becomes a
        CONFLICT (returned, for the dead-letter store); RETRY when the log cannot be read."""
        caught = [
            (w, w.first_copy_at)
            for w in published
            if w.duplicate_kind == DUPLICATE_IN_LOG_WINDOW and w.first_copy_at is not None and w.fingerprint
        ]
        if not caught:
            return []
        firsts = await asyncio.gather(
            *(self._event_log.read(position) for _, position in caught), return_exceptions=True
        )
        found: list[_Work] = []
        for (w, _), first in zip(caught, firsts, strict=True):
            if isinstance(first, EventLogUnavailable):
                w.result = _retry(
                    w.event, grpc.StatusCode.UNAVAILABLE, "the event log is unavailable",
                    "EVENT_LOG_UNAVAILABLE", RETRY_AFTER_UNAVAILABLE_S,
                )  # fmt: skip
                w.duplicate_kind = ingest_pb2.DUPLICATE_KIND_UNSPECIFIED
            elif isinstance(first, BaseException):
                raise first
            elif first is not None and conflicts(_fingerprint_of(first), w.fingerprint):
                self._conflict(w)
                found.append(w)
        return found

    async def _store_dead_letters(self, kept: list[_Work], at: datetime) -> None:
        """Keep the rejected and conflicting events; if the store cannot, they are answered RETRY:
        never REJECTED or CONFLICT without the record."""
        try:
            await self._store.add_rejections([w.dead_letter for w in kept if w.dead_letter is not None], at)
        except StoreError as exc:
            log.warning("dead-letter store unavailable", extra={"error": str(exc)})
            for w in kept:
                w.result = _retry(
                    w.event, grpc.StatusCode.UNAVAILABLE, "the dead-letter store is unavailable",
                    "DEAD_LETTER_STORE_UNAVAILABLE", RETRY_AFTER_UNAVAILABLE_S,
                )  # fmt: skip

    async def _record(self, work: list[_Work], claims: dict[BusinessKey, str], received_at: datetime) -> None:
        """Remember what the event log stored (for dedup beyond its window); give back the
        business keys of events that could not be stored."""
        stored = [
            w
            for w in work
            if w.result is not None
            and (
                w.result.outcome == ACCEPTED or w.duplicate_kind == ingest_pb2.DUPLICATE_KIND_EVENT_LOG_WINDOW
            )
        ]
        stored_keys = {w.key for w in stored if w.key is not None and w.key in claims}
        # A claim under the id of an event the log holds already (a resend it caught, a conflict
        # among them) is the first copy's: its own batch confirms or releases it.
        held = {w.key for w in work if w.first_copy_at is not None}
        unstored = {k: event_id for k, event_id in claims.items() if k not in stored_keys and k not in held}
        try:
            await self._store.record_stored(
                [(w.event.event_id, w.fingerprint) for w in stored],
                list(stored_keys),
                received_at,
            )
            await self._store.release_business_keys(unstored)
        except StoreError as exc:
            # The events are safe in the event log; only dedup of a late resend is weakened
            # (the profile service still drops it by event id).
            log.warning("could not record stored event ids", extra={"error": str(exc), "count": len(stored)})

    def _retry_all(self, work: list[_Work], message: str, reason: str) -> None:
        for w in work:
            w.result = _retry(
                w.event, grpc.StatusCode.UNAVAILABLE, message, reason, RETRY_AFTER_UNAVAILABLE_S
            )

    def _report(self, work: list[_Work], received_at: datetime) -> list[ingest_pb2.EventResult]:
        answered = [(w.event.source, w.result, w.duplicate_kind) for w in work if w.result is not None]
        assert len(answered) == len(work), "every event has an outcome"
        self._counters.add_all(received_at.date(), answered)
        count_outcomes(answered)
        return [result for _, result, _ in answered]

    async def ingest_stream(
        self, events: AsyncIterable[ingest_pb2.Event], max_in_flight: int
    ) -> AsyncIterator[ingest_pb2.EventResult]:
        """Outcomes as each event completes. At most ``max_in_flight`` events are in progress:
        beyond that, the next event is not read, which pushes back on the sender through gRPC
        flow control. Events in flight are batched with those of other streams."""
        slots = asyncio.Semaphore(max_in_flight)
        results: asyncio.Queue[ingest_pb2.EventResult | BaseException | None] = asyncio.Queue()
        in_progress: set[asyncio.Task[None]] = set()

        async def handle(event: ingest_pb2.Event) -> None:
            try:
                results.put_nowait(await self._stream_batcher.submit(event))
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
    """Identifiers in canonical form, so every consumer sees the same values. (Invalid ones are
    left as they are: validation rejects the event.)"""
    customers = [event.customer]
    if event.WhichOneof("payload") == "alias":  # reading event.alias otherwise would be harmless,
        customers.append(event.alias.other)  # but writing to it would turn the event into an alias
    for customer in customers:
        try:
            for kind, value in identifiers_of(customer).items():
                setattr(customer, kind, value)  # a StrEnum member is its field's name
        except ValueError:
            pass
    return event


def _fingerprint_of(payload: bytes) -> bytes | None:
    """The fingerprint of an event as the log holds it; None when it does not decode (then
    there is nothing to compare with, and the resend stays a duplicate)."""
    try:
        return fingerprint(ingest_pb2.Event.FromString(payload))
    except DecodeError:
        return None


def _retry(
    event: ingest_pb2.Event, code: grpc.StatusCode, message: str, reason: str, after_s: float
) -> ingest_pb2.EventResult:
    return ingest_pb2.EventResult(
        event_id=event.event_id,
        outcome=RETRY,
        status=retry_status(code, message, reason, after_s),
    )
