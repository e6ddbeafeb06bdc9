"""The catalog that recommendations read, kept from the event log.

``CatalogConsumer`` reads render's own durable consumer of the event stream and hands each
fetched batch to ``CatalogStore.apply``, which writes it in one transaction: product upserts
(the newest ``occurred_at`` per sku wins, so a late older upsert changes nothing), co-purchase
counts and purchase popularity from orders, view popularity from product views. The ids of
the events counted go into the same transaction, so a redelivered event is counted once.
Deliveries are acked only after the commit. Other event types are acked and ignored.

Nothing stored here names a customer: the statistics are aggregates.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
from google.protobuf.message import DecodeError
from opentelemetry import trace

from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.database import STORE_ERRORS
from sendtime_common.errors import log_unexpected, new_error_id
from sendtime_common.event_log import Delivery, EventLogSubscription
from sendtime_common.telemetry import extract_trace_context

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

CATALOG_EVENT_TYPES = frozenset({"product_upserted", "order_completed", "product_viewed"})

# An order with more distinct skus than this adds no co-purchase pairs (its purchases still
# count): pairs grow with the square of the lines, and bulk orders say little about affinity.
MAX_SKUS_FOR_PAIRS = 50

MAX_RETRY_DELAY_S = 30.0
# Failures after which the same batch may well succeed: the database restarting or busy.
RETRYABLE = STORE_ERRORS
NANOS_PER_UNIT = Decimal(1_000_000_000)


@dataclass(frozen=True, slots=True)
class _Product:
    sku: str
    name: str
    price: Decimal | None
    currency: str
    category: str
    image_url: str
    url: str
    in_stock: bool
    occurred_at: datetime
    event_id: str

    @property
    def order_key(self) -> tuple[datetime, str]:
        return (self.occurred_at, self.event_id)


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What one ``apply`` changed: events counted now, and those already counted before."""

    applied: int
    duplicates: int


def _text(value: str) -> str:
    # PostgreSQL text cannot hold NUL, and ingest does not forbid it: one such character must
    # not make a whole batch fail on every redelivery.
    return value.replace("\x00", "")


def _product(event: ingest_pb2.Event) -> _Product:
    p = event.product_upserted
    price = None
    if p.HasField("price"):
        price = Decimal(p.price.units) + Decimal(p.price.nanos) / NANOS_PER_UNIT
    return _Product(
        sku=_text(p.sku),
        name=_text(p.name),
        price=price,
        currency=_text(p.price.currency_code),
        category=_text(p.category),
        image_url=_text(p.image_url),
        url=_text(p.url),
        in_stock=p.in_stock,
        occurred_at=event.occurred_at.ToDatetime(tzinfo=UTC),
        event_id=event.event_id,
    )


_CATALOG_COLUMNS = (
    "name",
    "price",
    "currency",
    "category",
    "image_url",
    "url",
    "in_stock",
    "occurred_at",
    "event_id",
)
# Whether the row being inserted carries an upsert newer than the stored one (a row with only
# counts carries none).
_NEWER = (
    "EXCLUDED.occurred_at IS NOT NULL AND (c.occurred_at IS NULL"
    " OR (EXCLUDED.occurred_at, EXCLUDED.event_id) > (c.occurred_at, c.event_id))"
)
_TAKE_NEWER = ", ".join(
    f"{c} = CASE WHEN {_NEWER} THEN EXCLUDED.{c} ELSE c.{c} END" for c in _CATALOG_COLUMNS
)
_UPSERT_PRODUCTS = f"""
INSERT INTO render_catalog_products AS c (sku, {", ".join(_CATALOG_COLUMNS)}, purchases, views)
SELECT * FROM unnest($1::text[], $2::text[], $3::numeric[], $4::text[], $5::text[], $6::text[], $7::text[],
                     $8::boolean[], $9::timestamptz[], $10::text[], $11::bigint[], $12::bigint[])
ORDER BY 1
ON CONFLICT (sku) DO UPDATE SET
    {_TAKE_NEWER},
    purchases = c.purchases + EXCLUDED.purchases,
    views = c.views + EXCLUDED.views,
    updated_at = now()
"""


@dataclass(slots=True)
class _Changes:
    """What a batch of new events changes, summed up so each table gets one statement."""

    products: dict[str, _Product] = field(default_factory=dict)  # the newest upsert per sku
    purchases: Counter[str] = field(default_factory=Counter)
    views: Counter[str] = field(default_factory=Counter)
    pairs: Counter[tuple[str, str]] = field(default_factory=Counter)
    # (sku, category as the event names it, or "" for the catalog's) → (purchases, views)
    by_category: Counter[tuple[str, str, str]] = field(default_factory=Counter)

    def add(self, event: ingest_pb2.Event) -> None:
        kind = event.WhichOneof("payload")
        if kind == "product_upserted":
            product = _product(event)
            current = self.products.get(product.sku)
            if current is None or product.order_key > current.order_key:
                self.products[product.sku] = product
        elif kind == "order_completed":
            skus = sorted({_text(line.sku) for line in event.order_completed.lines} - {""})
            self.purchases.update(skus)
            self.by_category.update((sku, "", "purchases") for sku in skus)
            if len(skus) <= MAX_SKUS_FOR_PAIRS:
                self.pairs.update(itertools.permutations(skus, 2))
        elif kind == "product_viewed" and (sku := _text(event.product_viewed.sku)):
            self.views[sku] += 1
            self.by_category[(sku, _text(event.product_viewed.category), "views")] += 1


class CatalogStore:
    """The catalog tables (``migrations/0002_catalog.sql``)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def apply(self, events: Sequence[ingest_pb2.Event]) -> ApplyResult:
        """Fold catalog events into the tables, in one transaction; events of other types and
        events already applied (by id) are skipped.

        Raises:
            asyncpg.PostgresError, asyncpg.InterfaceError, OSError: nothing was written; apply
                the same events again.
        """
        by_id = {e.event_id: e for e in events if e.WhichOneof("payload") in CATALOG_EVENT_TYPES}
        if not by_id:
            return ApplyResult(0, 0)
        # Each statement takes its row locks in sorted key order and each table is written by
        # one statement, so concurrent batches cannot deadlock on each other.
        async with self._pool.acquire() as conn, conn.transaction():
            fresh_ids = await conn.fetch(
                "INSERT INTO render_catalog_processed_events (event_id)"
                " SELECT id FROM unnest($1::text[]) AS t(id) ORDER BY id"
                " ON CONFLICT DO NOTHING RETURNING event_id",
                sorted(by_id),
            )
            changes = _Changes()
            for row in fresh_ids:
                changes.add(by_id[row["event_id"]])
            await self._write_products(conn, changes)
            await self._write_pairs(conn, changes)
            await self._write_categories(conn, changes)
        return ApplyResult(applied=len(fresh_ids), duplicates=len(by_id) - len(fresh_ids))

    async def purge_processed(self, older_than: timedelta) -> int:
        """Forget event ids counted before ``older_than`` ago: once the event log no longer holds
        an event, it cannot be redelivered. The number forgotten."""
        status = await self._pool.execute(
            "DELETE FROM render_catalog_processed_events WHERE processed_at < now() - $1::interval",
            older_than,
        )
        return int(status.rsplit(" ", 1)[-1])

    @staticmethod
    async def _write_products(
        conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record], changes: _Changes
    ) -> None:
        skus = sorted(changes.products.keys() | changes.purchases.keys() | changes.views.keys())
        if not skus:
            return
        # A sku with counts but no upsert in this batch carries no catalog values (NULL
        # occurred_at): the stored ones stay, or a counts-only row is created.
        products = [changes.products.get(sku) for sku in skus]
        await conn.execute(
            _UPSERT_PRODUCTS,
            skus,
            [p.name if p else "" for p in products],
            [p.price if p else None for p in products],
            [p.currency if p else "" for p in products],
            [p.category if p else "" for p in products],
            [p.image_url if p else "" for p in products],
            [p.url if p else "" for p in products],
            [p.in_stock if p else False for p in products],
            [p.occurred_at if p else None for p in products],
            [p.event_id if p else None for p in products],
            [changes.purchases[sku] for sku in skus],
            [changes.views[sku] for sku in skus],
        )

    @staticmethod
    async def _write_pairs(conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record], changes: _Changes) -> None:
        if not changes.pairs:
            return
        keys = sorted(changes.pairs)
        await conn.execute(
            """
            INSERT INTO render_co_purchases AS c (sku, other_sku, orders)
            SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[]) ORDER BY 1, 2
            ON CONFLICT (sku, other_sku) DO UPDATE SET orders = c.orders + EXCLUDED.orders
            """,
            [a for a, _ in keys],
            [b for _, b in keys],
            [changes.pairs[k] for k in keys],
        )

    @staticmethod
    async def _write_categories(
        conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record], changes: _Changes
    ) -> None:
        if not changes.by_category:
            return
        keys = sorted(changes.by_category)
        # Runs after _write_products: an order line's category is the catalog's as of this batch.
        await conn.execute(
            """
            INSERT INTO render_category_popularity AS s (category, purchases, views)
            SELECT coalesce(nullif(t.category, ''), p.category),
                   coalesce(sum(t.n) FILTER (WHERE t.kind = 'purchases'), 0),
                   coalesce(sum(t.n) FILTER (WHERE t.kind = 'views'), 0)
            FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) AS t(sku, category, kind, n)
            LEFT JOIN render_catalog_products p USING (sku)
            WHERE coalesce(nullif(t.category, ''), p.category, '') <> ''
            GROUP BY 1 ORDER BY 1
            ON CONFLICT (category) DO UPDATE SET
                purchases = s.purchases + EXCLUDED.purchases, views = s.views + EXCLUDED.views
            """,
            [k[0] for k in keys],
            [k[1] for k in keys],
            [k[2] for k in keys],
            [changes.by_category[k] for k in keys],
        )


class CatalogConsumer:
    """Feeds the event log's catalog events into a ``CatalogStore``, a fetched batch at a time,
    from a durable subscription of render's own ("render-catalog"), independent of the profile
    merger's.

    Up to ``concurrency`` batches are written at once (the next fetch does not wait for the
    previous write): counts add up in any order, and upserts compare ``occurred_at``.
    """

    def __init__(
        self,
        subscription: EventLogSubscription,
        store: CatalogStore,
        *,
        batch_size: int,
        concurrency: int,
        processed_retention: timedelta = timedelta(days=8),
        purge_interval_s: float = 3600.0,
        fetch_timeout_s: float = 1.0,
    ) -> None:
        """``processed_retention`` must exceed the event log's retention (NATS_MAX_AGE_SECONDS):
        an event id forgotten while the event can still be redelivered would count twice."""
        self._subscription = subscription
        self._store = store
        self._batch_size = batch_size
        self._slots = asyncio.Semaphore(concurrency)
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._processed_retention = processed_retention
        self._purge_interval_s = purge_interval_s
        self._next_purge = time.monotonic() + purge_interval_s
        self._fetch_timeout_s = fetch_timeout_s

    async def run(self) -> None:
        """Consume until ``stop`` is called; batches being written are finished first."""
        try:
            await self._run()
        finally:
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._subscription.close()

    def stop(self) -> None:
        self._stopping.set()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            await self._maybe_purge()
            await self._slots.acquire()
            try:
                deliveries = await self._subscription.fetch(self._batch_size, timeout_s=self._fetch_timeout_s)
            except Exception:  # noqa: BLE001 - a broken fetch must not kill the loop; NATS reconnects
                self._slots.release()
                log.exception("fetch from the event log failed")
                await asyncio.sleep(1.0)
                continue
            if not deliveries:
                self._slots.release()
                continue
            task = asyncio.create_task(self._process(deliveries))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _maybe_purge(self) -> None:
        if time.monotonic() < self._next_purge:
            return
        self._next_purge = time.monotonic() + self._purge_interval_s
        try:
            purged = await self._store.purge_processed(self._processed_retention)
        except RETRYABLE as exc:
            log.warning("purging processed catalog event ids failed", extra={"error": str(exc)})
            return
        log.info("processed catalog event ids purged", extra={"count": purged})

    async def _process(self, deliveries: Sequence[Delivery]) -> None:
        # One span per batch, linked to the trace of each event in it.
        contexts = (
            trace.get_current_span(extract_trace_context(d.headers)).get_span_context() for d in deliveries
        )
        links = [trace.Link(c) for c in contexts if c.is_valid]
        try:
            with tracer.start_as_current_span(
                "render.catalog.apply", kind=trace.SpanKind.CONSUMER, links=links
            ) as span:
                span.set_attribute("sendtime.batch_size", len(deliveries))
                await self._apply(deliveries, span)
        except Exception:  # noqa: BLE001 - e.g. an ack lost with the connection: the log redelivers
            log.exception("catalog batch failed")
        finally:
            self._slots.release()

    async def _apply(self, deliveries: Sequence[Delivery], span: trace.Span) -> None:
        events: list[ingest_pb2.Event] = []
        to_ack: list[Delivery] = []
        settled: list[Delivery] = []
        for delivery in deliveries:
            try:
                event = ingest_pb2.Event.FromString(delivery.payload)
                event.occurred_at.ToDatetime()  # out of range only if ingest was bypassed
            except (DecodeError, ValueError, OverflowError):
                # Ingest only writes valid events; an undecodable one will never apply.
                log.error("undecodable event discarded", extra={"attempt": delivery.attempt})
                await delivery.discard()
                continue
            if event.WhichOneof("payload") in CATALOG_EVENT_TYPES:
                events.append(event)
                to_ack.append(delivery)
            else:
                settled.append(delivery)
        # Unrelated events need no write: ack them now rather than hold them to a failing batch.
        await asyncio.gather(*(d.ack() for d in settled))
        if not events:
            return
        try:
            result = await self._store.apply(events)
        except Exception as exc:  # noqa: BLE001 - a bug too is retried: never dropped, never held for long
            delay = min(MAX_RETRY_DELAY_S, 0.5 * 2 ** min(max(d.attempt for d in to_ack), 6))
            extra: dict[str, Any] = {"events": len(events), "retry_in_s": delay}
            if isinstance(exc, RETRYABLE):
                log.warning("catalog batch failed, will retry", extra={**extra, "error": str(exc)})
            else:
                extra["error_id"] = new_error_id()
                log_unexpected(log, "catalog batch failed, will retry", exc, extra)
            span.set_status(trace.StatusCode.ERROR, type(exc).__name__)
            await asyncio.gather(*(d.retry_later(delay) for d in to_ack))
            return
        span.set_attribute("sendtime.applied", result.applied)
        span.set_attribute("sendtime.duplicates", result.duplicates)
        await asyncio.gather(*(d.ack() for d in to_ack))
        log.debug("catalog batch applied", extra={"applied": result.applied, "duplicates": result.duplicates})
