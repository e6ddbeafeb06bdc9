"""The merger: consumes events from the durable log and merges them into profiles.

Each delivery is acked only after its transaction committed and the cache was refreshed, so a
crash at any point means a redelivery, which the event-id key turns into a no-op. Deliveries of
one fetch are merged concurrently (bounded): different customers do not wait for each other,
and the repository's locks keep one customer's updates serial.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from google.protobuf.message import DecodeError
from opentelemetry import trace

from profile_service.cache import CacheUnavailable, ProfileCache
from profile_service.repository import MergeResult, ProfileRepository, event_identifiers
from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.event_log import Delivery, EventLogSubscription
from sendtime_common.telemetry import extract_trace_context

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

# Catalog events name a feed, not a person: merging them would make one "customer" of the whole
# catalog. They are for the catalog that recommendations keep (render, issue 6).
NOT_ABOUT_A_CUSTOMER = frozenset({"product_upserted"})

MAX_RETRY_DELAY_S = 30.0


class EventMerger:
    def __init__(
        self,
        subscription: EventLogSubscription,
        repository: ProfileRepository,
        cache: ProfileCache,
        *,
        batch_size: int,
        concurrency: int,
    ) -> None:
        self._subscription = subscription
        self._repository = repository
        self._cache = cache
        self._batch_size = batch_size
        self._slots = asyncio.Semaphore(concurrency)
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        """Merge deliveries until ``stop`` is called; the current fetch is finished first."""
        try:
            await self._run()
        finally:
            await self._subscription.close()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                deliveries = await self._subscription.fetch(self._batch_size, timeout_s=1.0)
            except Exception:  # noqa: BLE001 - a broken fetch must not kill the loop; NATS reconnects
                log.exception("fetch from the event log failed")
                await asyncio.sleep(1.0)
                continue
            if deliveries:
                await asyncio.gather(*(self._merge_one(d) for d in deliveries))

    def stop(self) -> None:
        self._stopping.set()

    async def _merge_one(self, delivery: Delivery) -> None:
        async with self._slots:
            parent = extract_trace_context(delivery.headers)
            with tracer.start_as_current_span(
                "profile.merge", context=parent, kind=trace.SpanKind.CONSUMER
            ) as span:
                try:
                    await self._merge(delivery, span)
                except Exception as exc:  # noqa: BLE001 - one delivery must never stop the merger
                    # E.g. an ack the server did not confirm in time: the message comes back
                    # after the ack wait, and merging it again changes nothing.
                    log.warning(
                        "delivery not settled; it will be redelivered",
                        extra={"error": f"{type(exc).__name__}: {exc}", "attempt": delivery.attempt},
                    )
                    span.set_status(trace.StatusCode.ERROR, str(exc))

    async def _merge(self, delivery: Delivery, span: trace.Span) -> None:
        try:
            event = ingest_pb2.Event.FromString(delivery.payload)
        except DecodeError:
            # Ingest only writes valid events; an undecodable one will never merge.
            log.error("undecodable event discarded", extra={"attempt": delivery.attempt})
            await delivery.discard()
            return
        span.set_attribute("sendtime.event_id", event.event_id)
        if event.WhichOneof("payload") in NOT_ABOUT_A_CUSTOMER:
            await delivery.ack()
            return
        try:
            result = await self._repository.merge_event(event)
        except (asyncpg.PostgresError, OSError) as exc:
            delay = min(MAX_RETRY_DELAY_S, 0.5 * 2 ** min(delivery.attempt, 6))
            log.warning(
                "merge failed, will retry",
                extra={
                    "event_id": event.event_id,
                    "attempt": delivery.attempt,
                    "retry_in_s": delay,
                    "error": str(exc),
                },
            )
            span.set_status(trace.StatusCode.ERROR, str(exc))
            await delivery.retry_later(delay)
            return
        span.set_attribute("sendtime.customer_id", result.customer_id)
        span.set_attribute("sendtime.duplicate", result.duplicate)
        if result.erased:
            log.info("late event of an erased person dropped", extra={"event_id": event.event_id})
        else:
            await self._refresh_cache(event, result)
        await delivery.ack()
        log.debug("event merged", extra={"event_id": event.event_id, "customer_id": result.customer_id})

    async def _refresh_cache(self, event: ingest_pb2.Event, result: MergeResult) -> None:
        try:
            if result.profile is None:
                # A redelivery after a crash between commit and ack: the cache may have missed
                # that commit. Re-reading is cheap and the versioned write cannot regress it.
                keys = event_identifiers(event)
                found = await self._repository.find_by_identifiers(keys)
                await self._cache.put(
                    r.to_proto() for r in {r.stored.customer_id: r for r in found.values()}.values()
                )
            else:
                await self._cache.put([result.profile.to_proto()])
        except CacheUnavailable as exc:
            # The record is in PostgreSQL; readers fall back to it and re-fill the cache.
            log.warning("cache refresh failed", extra={"event_id": event.event_id, "error": str(exc)})
