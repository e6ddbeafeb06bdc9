"""The merger: consumes events from the durable log and merges them into profiles.

Each fetch from the log is merged as one batch: one transaction (see ``merge_transaction``), one
pipelined cache write for the profiles it changed, then the acks. Three stages overlap, so that
the event loop works while a transaction waits on PostgreSQL: the next batch is fetched and
decoded, and the last one's cache write and acks go out, while this one's transaction runs.
A delivery is acked only after its transaction committed and the cache was refreshed, so a crash
at any point means a redelivery, which the event-id key turns into a no-op (the merge's profile
changes were committed with it, in ``profile_change_outbox``: a redelivery adds none and loses
none; ``profile_service.change_outbox``). When a batch cannot
be merged, its events are merged one at a time, so one event the database refuses holds back no
other.

While PostgreSQL cannot be reached at all (down, restarting, in recovery), a batch is held, as a
whole, and tried again every ``OUTAGE_RETRY_MIN_S`` doubling to ``OUTAGE_RETRY_MAX_S``: the log's
in-progress acks keep its messages, no delivery attempt is spent, and merging resumes within a
second of PostgreSQL's return, in the log's order. (Retrying each event on its own with its own
backoff, as before, sent the whole outage's events back in waves over the next 30 s, and
freshness with them: ``make chaos``, postgres-immediate.)

An event that fails on its own is judged (``profile_service.unmerged``): a transient failure
(a deadlock, a timeout) is retried with backoff for as long as it takes; a poison event (one whose
data no store can keep, or that does not decode) is set aside at once in ``unmerged_events``
with the reason, and settled for good, so it neither blocks the consumer nor loops; anything
else is retried and set aside after ``max_deliveries`` deliveries. Another event under an id
merged before (an idempotency conflict) is set aside there too, for review. A delivery's
attempt counts deliveries only: while a batch waits or merges, however slowly, the log's
subscription keeps it with in-progress acks (``sendtime_common.event_log``), which the log does
not count; a retry or a crashed merger's redelivery (within the ack wait) does.

A process merging several lanes of the stream (``merge_lanes``) fetches from each on its own,
and merges ``PROFILE_MERGE_CONCURRENCY`` batches at once across them (one by default; more helps
only where the database is far away): each lane keeps the log's order, and the process does not
run more transactions than its CPU can use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from opentelemetry import trace

from profile_service.cache import CacheUnavailable, ChangedProfile, ProfileCache, cache_key
from profile_service.merge_transaction import event_identifiers
from profile_service.metrics import (
    MERGE_BATCH_EVENTS,
    MERGE_BATCH_SECONDS,
    VISIBLE_AFTER_OCCURRED,
    VISIBLE_AFTER_STORED,
)
from profile_service.repository import MergeResult, ProfileRepository
from profile_service.unmerged import (
    FailureKind,
    StoreError,
    UnmergedStore,
    failure_kind,
    merge_failure_status,
    undecodable_status,
)
from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.database import unreachable
from sendtime_common.event_integrity import conflict_status
from sendtime_common.event_log import Delivery, EventLogSubscription
from sendtime_common.telemetry import extract_trace_context, unsampled

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

# Catalog events name a feed, not a person: merging them would make one "customer" of the whole
# catalog. They are for the catalog that recommendations keep (render, issue 6).
NOT_ABOUT_A_CUSTOMER = frozenset({"product_upserted"})

MAX_RETRY_DELAY_S = 30.0
OUTAGE_RETRY_MIN_S = 0.1  # a batch held while PostgreSQL is unreachable is tried again after...
OUTAGE_RETRY_MAX_S = 1.0  # ...doubling up to this
DEFAULT_MAX_DELIVERIES = 10  # an unknown failure's: ~2.5 minutes of backoff (1, 2, 4 ... 30 s)


@dataclass(frozen=True, slots=True)
class _Work:
    delivery: Delivery
    event: ingest_pb2.Event
    span: trace.Span


def _merge_span(delivery: Delivery, event: ingest_pb2.Event) -> trace.Span:
    """``profile.merge``, a child of the event's ingest span; in an unsampled trace, a stand-in
    with the parent's context, so that logs still carry its trace id."""
    parent = extract_trace_context(delivery.headers)
    caller = trace.get_current_span(parent).get_span_context()
    if unsampled(caller):
        return trace.NonRecordingSpan(caller)
    return tracer.start_span(
        "profile.merge",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes={"sendtime.event_id": event.event_id},
    )


class _Held:
    """A batch held while PostgreSQL cannot be reached: its waits, and one log line at each end
    of the outage (not one per try)."""

    def __init__(self, events: int, exc: Exception) -> None:
        self._since = time.monotonic()
        self._tries = 0
        log.warning(
            "PostgreSQL unreachable: the batch is held and tried again until it answers",
            extra={"events": events, "error": f"{type(exc).__name__}: {exc}"},
        )

    def next_wait_s(self) -> float:
        self._tries += 1
        return min(OUTAGE_RETRY_MAX_S, OUTAGE_RETRY_MIN_S * 2.0 ** (self._tries - 1))

    def merged(self) -> None:
        log.info(
            "PostgreSQL answers again: the held batch merged",
            extra={"tries": self._tries + 1, "held_s": round(time.monotonic() - self._since, 3)},
        )


class EventMerger:
    def __init__(
        self,
        subscriptions: Sequence[EventLogSubscription],
        repository: ProfileRepository,
        cache: ProfileCache,
        unmerged: UnmergedStore,
        *,
        batch_size: int,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        on_merged: Callable[[], None] = lambda: None,
        transactions: int | None = None,
    ) -> None:
        """One merge loop per subscription, each fetching from its own: nats-py's fetches on one
        pull subscription share its queue and take each other's messages and status replies,
        so two loops on one subscription stalled each other for the fetch timeout (1 s) and
        merged ~640 events/s instead of ~6,000. ``on_merged`` is called after each commit that
        merged an event, once the cache is refreshed (to publish its profile changes now).
        ``transactions``: how many merge transactions may run at once across all the loops
        (None: one per loop). A process merging several lanes runs one at a time by default:
        two transactions at once compete for the same CPU and halved the merge rate
        (docs/benchmarks.md), and each holds an advisory lock per identifier of its batch in
        PostgreSQL's shared lock table (max_locks_per_transaction x connections)."""
        self._subscriptions = list(subscriptions)
        self._repository = repository
        self._cache = cache
        self._unmerged = unmerged
        self._batch_size = batch_size
        self._max_deliveries = max_deliveries
        self._on_merged = on_merged
        self._stopping = asyncio.Event()
        self._transactions = asyncio.Semaphore(transactions) if transactions else None

    async def run(self) -> None:
        """Merge deliveries until ``stop`` is called; the current fetch is finished first."""
        await self.merge_from(self._subscriptions, asyncio.Event())

    async def merge_from(self, subscriptions: Sequence[EventLogSubscription], until: asyncio.Event) -> None:
        """Merge deliveries from ``subscriptions`` (one lane of the stream: ``merge_lanes``) until
        ``until`` is set or ``stop`` is called, finishing the batch in hand; then close them."""
        try:
            await asyncio.gather(*(self._fetch_and_merge(s, until) for s in subscriptions))
        finally:
            for subscription in subscriptions:
                await subscription.close()

    async def _fetch_and_merge(self, subscription: EventLogSubscription, until: asyncio.Event) -> None:
        # A pipeline: the next batch is fetched and decoded, and the last one's cache write and
        # acks go out, while one merges.
        fetching = asyncio.create_task(self._fetch(subscription))
        finishing: asyncio.Task[None] | None = None
        try:
            while True:
                work = await fetching
                # Stopping: merge what was fetched (also a fetch made while the last batch
                # merged), fetch no more.
                stopping = self._stopping.is_set() or until.is_set()
                if not stopping:
                    fetching = asyncio.create_task(self._fetch(subscription))
                if work:
                    finish = await self._merge_batch(work)
                    if finishing is not None:
                        await finishing  # one batch finishing at a time: cache writes in commit order
                    finishing = asyncio.create_task(finish) if finish is not None else None
                if stopping:
                    return
        finally:
            if not fetching.done():  # only when the merge itself failed
                fetching.cancel()
            if finishing is not None:
                await finishing

    async def _fetch(self, subscription: EventLogSubscription) -> list[_Work]:
        try:
            deliveries = await subscription.fetch(self._batch_size, timeout_s=1.0)
        except Exception:  # noqa: BLE001 - a broken fetch must not kill the loop; NATS reconnects
            log.exception("fetch from the event log failed")
            await asyncio.sleep(1.0)
            return []
        return await self._decode(deliveries)

    def stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def wait_stopping(self) -> None:
        """Return once ``stop`` is called."""
        await self._stopping.wait()

    async def _decode(self, deliveries: Sequence[Delivery]) -> list[_Work]:
        """The deliveries to merge; the others are settled here."""
        work: list[_Work] = []
        for delivery in deliveries:
            try:
                event = ingest_pb2.Event.FromString(delivery.payload)
            except DecodeError:
                # Ingest only writes valid events; an undecodable one will never merge.
                await self._set_aside(delivery, None, undecodable_status(len(delivery.payload)))
                continue
            if event.WhichOneof("payload") in NOT_ABOUT_A_CUSTOMER:
                await _settle(delivery.ack())
                continue
            work.append(_Work(delivery, event, _merge_span(delivery, event)))
        return work

    async def _merge_batch(self, work: Sequence[_Work]) -> Coroutine[Any, Any, None] | None:
        """Merge a batch; returns, to be awaited, the cache write and the acks of what it
        committed. Held while PostgreSQL cannot be reached (module docstring)."""
        held: _Held | None = None
        while True:
            started = time.perf_counter()
            try:
                async with self._one_of_the_transactions():
                    results = await self._repository.merge_events(
                        [w.event for w in work], [w.delivery.position for w in work]
                    )
                break
            except Exception as exc:  # noqa: BLE001 - held, or retried event by event
                if not unreachable(exc) or self._stopping.is_set():
                    await self._merge_one_by_one(work, exc)
                    return None
                held = held or _Held(len(work), exc)
                await self._wait_or_stop(held.next_wait_s())
        MERGE_BATCH_SECONDS.observe(time.perf_counter() - started)
        MERGE_BATCH_EVENTS.observe(len(work))
        if held is not None:
            held.merged()
        return self._finish(work, results)

    def _one_of_the_transactions(self) -> contextlib.AbstractAsyncContextManager[object]:
        return self._transactions if self._transactions is not None else contextlib.nullcontext()

    async def _wait_or_stop(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        except TimeoutError:
            pass

    async def _merge_one_by_one(self, work: Sequence[_Work], exc: Exception) -> None:
        """After the batch failed with ``exc``: each event on its own, so that one the database
        refuses holds back no other."""
        if len(work) == 1:
            await self._failed(work[0], exc)
            return
        log.warning(
            "batch merge failed, merging its events one at a time",
            extra={"events": len(work), "error": f"{type(exc).__name__}: {exc}"},
        )
        for item in work:
            await self._merge_batch_of_one(item)

    async def _finish(self, work: Sequence[_Work], results: Sequence[MergeResult]) -> None:
        await self._refresh_cache([w.event for w in work], results)
        _observe_freshness(work, results)
        self._merged(results)
        await asyncio.gather(
            *(self._settle_merged(item, result) for item, result in zip(work, results, strict=True))
        )

    async def _merge_batch_of_one(self, item: _Work) -> None:
        try:
            async with self._one_of_the_transactions():
                (result,) = await self._repository.merge_events([item.event], [item.delivery.position])
        except Exception as exc:  # noqa: BLE001 - one event must never stop the merger
            await self._failed(item, exc)
            return
        await self._refresh_cache([item.event], [result])
        _observe_freshness([item], [result])
        self._merged([result])
        await self._settle_merged(item, result)

    async def merge_now(self, event: ingest_pb2.Event, position: int | None) -> tuple[str, bool]:
        """Merge one event now, outside the log's deliveries (a replay of an unmerged event),
        and refresh the cache; its customer id, and whether it was an idempotency conflict.

        Raises:
            Exception: whatever the merge raised; nothing was written.
        """
        (result,) = await self._repository.merge_events([event], [position])
        await self._refresh_cache([event], [result])
        self._merged([result])
        return result.customer_id, result.conflict

    def _merged(self, results: Sequence[MergeResult]) -> None:
        """After a commit and its cache refresh: an event merged has a profile change to
        publish, which a consumer reading the profile at once should find in the cache too."""
        if any(r.profile is not None for r in results):
            self._on_merged()

    async def _settle_merged(self, item: _Work, result: MergeResult) -> None:
        if result.conflict:
            log.warning("idempotency conflict set aside", extra={"event_id": item.event.event_id})
            await self._set_aside(item.delivery, item, conflict_status(item.event.event_id))
        else:
            await self._ack(item, result)

    async def _failed(self, item: _Work, exc: Exception) -> None:
        """An event failed on its own: retried later, or set aside (module docstring)."""
        kind = failure_kind(exc)
        attempt = item.delivery.attempt
        if kind is FailureKind.POISON or (kind is FailureKind.UNKNOWN and attempt >= self._max_deliveries):
            log.error(
                "merge failed, event set aside",
                extra={"event_id": item.event.event_id, "attempt": attempt, "error": type(exc).__name__},
            )
            await self._set_aside(item.delivery, item, merge_failure_status(item.event, exc, attempt))
        else:
            await self._retry_later(item, exc)

    async def _set_aside(self, delivery: Delivery, item: _Work | None, status: status_pb2.Status) -> None:
        """Keep the delivery's message in ``unmerged_events`` with why, then settle it for good;
        when that store cannot be written, the delivery comes back later instead."""
        try:
            await self._unmerged.add(delivery.payload, delivery.position, delivery.attempt, status)
        except StoreError as exc:
            log.warning(
                "could not set an event aside; it will be delivered again",
                extra={"attempt": delivery.attempt, "error": f"{type(exc).__name__}: {exc}"},
            )
            await _settle(delivery.retry_later(_retry_delay(delivery.attempt)))
        else:
            await _settle(delivery.discard())
        if item is not None:
            item.span.set_status(trace.StatusCode.ERROR, status.message)
            item.span.end()

    async def _retry_later(self, item: _Work, exc: Exception) -> None:
        delay = _retry_delay(item.delivery.attempt)
        log.warning(
            "merge failed, will retry",
            extra={
                "event_id": item.event.event_id,
                "attempt": item.delivery.attempt,
                "retry_in_s": delay,
                "error": f"{type(exc).__name__}: {exc}",
            },
        )
        item.span.set_status(trace.StatusCode.ERROR, str(exc))
        await _settle(item.delivery.retry_later(delay))
        item.span.end()

    async def _ack(self, item: _Work, result: MergeResult) -> None:
        span = item.span
        span.set_attribute("sendtime.customer_id", result.customer_id)
        span.set_attribute("sendtime.duplicate", result.duplicate)
        if result.erased:
            log.info("late event of an erased person dropped", extra={"event_id": item.event.event_id})
        if not await _settle(item.delivery.ack()):
            span.set_status(trace.StatusCode.ERROR, "ack not confirmed")
        span.end()
        log.debug("event merged", extra={"event_id": item.event.event_id, "customer_id": result.customer_id})

    async def _refresh_cache(
        self, events: Sequence[ingest_pb2.Event], results: Sequence[MergeResult]
    ) -> None:
        try:
            await self._refresh(events, results)
        except Exception:  # noqa: BLE001 - committed: the events are merged whatever the cache says
            # Had it propagated, it would have ended the merge loop for good (as a profile that
            # could not be encoded did): the entries are marked stale, so readers go to PostgreSQL.
            log.exception("cache refresh failed", extra={"events": len(events)})

    async def _refresh(self, events: Sequence[ingest_pb2.Event], results: Sequence[MergeResult]) -> None:
        profiles = {r.profile.stored.customer_id: r.profile for r in results if r.profile is not None}
        # A redelivery after a crash between commit and ack: the cache may have missed that
        # commit. Re-reading is cheap and the versioned write cannot regress it.
        redelivered = [
            key
            for event, r in zip(events, results, strict=True)
            if r.duplicate and r.profile is None
            for key in event_identifiers(event)
        ]
        try:
            if redelivered:
                found = await self._repository.find_by_identifiers(redelivered)
                for record in found.values():
                    profiles.setdefault(record.stored.customer_id, record)
            await self._cache.refresh(
                [
                    ChangedProfile(
                        record.stored.version,
                        [cache_key(kind, value) for kind, value in record.stored.identifiers],
                        record.to_proto,
                    )
                    for record in profiles.values()
                ]
            )
        except CacheUnavailable as exc:
            # The record is in PostgreSQL; readers fall back to it and re-fill the cache.
            log.warning("cache refresh failed", extra={"events": len(events), "error": str(exc)})


def _retry_delay(attempt: int) -> float:
    return min(MAX_RETRY_DELAY_S, 0.5 * 2.0 ** min(attempt, 6))


async def _settle(settling: Awaitable[None]) -> bool:
    """Ack, nak or term a delivery; False when the log did not confirm it in time (the message
    then comes back after the ack wait, and merging it again changes nothing)."""
    try:
        await settling
    except Exception as exc:  # noqa: BLE001 - one delivery must never stop the merger
        log.warning(
            "delivery not settled; it will be redelivered", extra={"error": f"{type(exc).__name__}: {exc}"}
        )
        return False
    return True


def _observe_freshness(work: Sequence[_Work], results: Sequence[MergeResult]) -> None:
    """How old each merged event was when its merge became readable (committed, the cache
    refreshed): from the log's storing it, and from when it occurred."""
    now = time.time()
    for item, result in zip(work, results, strict=True):
        if result.conflict:
            continue
        stored_at = item.delivery.stored_at_s
        if stored_at is not None:
            VISIBLE_AFTER_STORED.observe(max(0.0, now - stored_at))
        if item.event.HasField("occurred_at"):
            VISIBLE_AFTER_OCCURRED.observe(max(0.0, now - item.event.occurred_at.ToNanoseconds() / 1e9))
