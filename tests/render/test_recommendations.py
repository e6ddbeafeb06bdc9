"""The catalog consumer (real NATS, real PostgreSQL) and the recommendations read from it.

The tables live in a schema of this module's own, so they neither see nor disturb the tables
the services of the same test session migrate into the database.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import nats
import pytest
from fault_proxy import FaultProxy

from render.catalog import MAX_SKUS_FOR_PAIRS, ApplyResult, CatalogConsumer, CatalogStore
from render.profiles import ProfileLookup, Source
from render.recommendations import Recommender
from render.renderer import Renderer, RenderJob
from render.templates import TemplateCompiler
from sendtime.ingest.v1 import ingest_pb2
from sendtime.profile.v1 import profile_pb2
from sendtime.render.v1 import render_pb2
from sendtime_common.event_log import JetStreamEventLog, JetStreamSettings, OutgoingMessage
from sendtime_common.migrate import migrate
from tests.conftest import eventually
from tests.factories import event, money, order_completed, product_viewed

MIGRATION = Path(__file__).resolve().parents[2] / "services" / "render" / "migrations" / "0002_catalog.sql"
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


class QueryCounter:
    """Counts the statements the pool's connections send (asyncpg's query logger)."""

    def __init__(self) -> None:
        self.queries: list[str] = []

    def __call__(self, record: Any) -> None:
        self.queries.append(record.query)

    def statements(self) -> list[str]:
        """The queries sent, less the reset asyncpg's pool runs on every release."""
        return [q for q in self.queries if not q.startswith("SELECT pg_advisory_unlock_all()")]

    async def init(self, conn: asyncpg.Connection) -> None:
        conn.add_query_logger(self)


@pytest.fixture(scope="module")
async def schema(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """The name of a schema of its own with only the catalog migration applied."""
    schema = f"catalog_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(database_url)
    await conn.execute(f"CREATE SCHEMA {schema}")
    await conn.close()
    directory = tmp_path_factory.mktemp("catalog-migrations")
    shutil.copy(MIGRATION, directory / MIGRATION.name)
    pool = await asyncpg.create_pool(database_url, server_settings={"search_path": schema}, min_size=1)
    assert await migrate(pool, directory, table="render_schema_migrations") == ["0002_catalog"]
    await pool.close()
    yield schema


@pytest.fixture
async def counter_and_pool(
    database_url: str, schema: str
) -> AsyncIterator[tuple[QueryCounter, asyncpg.Pool]]:
    counter = QueryCounter()
    pool = await asyncpg.create_pool(
        database_url, server_settings={"search_path": schema}, min_size=1, max_size=4, init=counter.init
    )
    await pool.execute(
        "TRUNCATE render_catalog_products, render_co_purchases, render_category_popularity,"
        " render_catalog_processed_events"
    )
    yield counter, pool
    await pool.close()


@pytest.fixture
def pool(counter_and_pool: tuple[QueryCounter, asyncpg.Pool]) -> asyncpg.Pool:
    return counter_and_pool[1]


def upsert(
    sku: str,
    *,
    at: datetime = T0,
    price: str = "10.00",
    category: str = "shoes",
    in_stock: bool = True,
    name: str = "",
    event_id: str | None = None,
) -> ingest_pb2.Event:
    return event(
        event_id=event_id,
        occurred_at=at,
        source=ingest_pb2.EVENT_SOURCE_IMPORT,
        product_upserted=ingest_pb2.ProductUpserted(
            sku=sku,
            name=name or f"Product {sku}",
            price=money(price),
            category=category,
            image_url=f"https://cdn.example.com/{sku}.jpg",
            url=f"https://shop.example.com/p/{sku}",
            in_stock=in_stock,
        ),
    )


def order(*skus: str, event_id: str | None = None) -> ingest_pb2.Event:
    return event(
        event_id=event_id, user_id="u1", order_completed=order_completed(f"o-{uuid.uuid4().hex}", "10", *skus)
    )


def view(sku: str, category: str = "shoes") -> ingest_pb2.Event:
    viewed = product_viewed(sku)
    viewed.category = category
    return event(user_id="u1", product_viewed=viewed)


async def co_purchases(pool: asyncpg.Pool) -> dict[tuple[str, str], int]:
    rows = await pool.fetch("SELECT sku, other_sku, orders FROM render_co_purchases")
    return {(r["sku"], r["other_sku"]): r["orders"] for r in rows}


async def popularity(pool: asyncpg.Pool) -> dict[str, tuple[int, int]]:
    rows = await pool.fetch("SELECT sku, purchases, views FROM render_catalog_products")
    return {r["sku"]: (r["purchases"], r["views"]) for r in rows}


# --- the consumer, on a real JetStream --------------------------------------------------------


async def test_the_consumer_keeps_the_catalog_from_the_event_log(nats_url: str, pool: asyncpg.Pool) -> None:
    unique = uuid.uuid4().hex[:8]
    settings = JetStreamSettings(
        url=nats_url, stream=f"TEST_CATALOG_{unique}", subject_prefix=f"test.{unique}"
    )
    events = [
        upsert("A", at=T0 + timedelta(minutes=5), price="12.50", in_stock=False),
        upsert("B"),
        upsert("A", at=T0, price="9.99"),  # older, and arriving later: must not win
        order("A", "B", "C"),
        order("A", "B"),
        view("A"),
        view("A"),
        view("C", category="socks"),
        event(user_id="u1", identify=ingest_pb2.Identify()),  # not a catalog event
    ]
    log = await JetStreamEventLog.connect(settings)
    try:
        for e in events:
            kind = e.WhichOneof("payload")
            assert kind is not None
            await log.publish(OutgoingMessage(key=kind, message_id=e.event_id, payload=e.SerializeToString()))
        await log.publish(OutgoingMessage(key="garbage", message_id="garbage-1", payload=b"\xff\xff"))
        durable = f"render-catalog-{unique}"
        consumer = CatalogConsumer(
            await log.subscribe(durable), CatalogStore(pool), batch_size=4, concurrency=2, fetch_timeout_s=0.1
        )
        running = asyncio.create_task(consumer.run())
        client = await nats.connect(nats_url)
        try:

            async def all_applied() -> bool:
                return bool(await pool.fetchval("SELECT count(*) FROM render_catalog_processed_events") == 8)

            async def all_settled() -> bool:
                info = await client.jetstream().consumer_info(settings.stream, durable)
                return (info.num_pending, info.num_ack_pending) == (0, 0)

            await eventually(all_applied, timeout_s=30)
            # Everything acked or discarded. The acks are not confirmed (event_log.py): the server
            # takes them a little after the batch is applied, so the consumer runs until it has.
            await eventually(all_settled, timeout_s=30)
        finally:
            await client.close()
            consumer.stop()
            await asyncio.wait_for(running, 5)
    finally:
        await log.close()

    a = await pool.fetchrow(
        "SELECT price, in_stock, occurred_at FROM render_catalog_products WHERE sku = 'A'"
    )
    assert a is not None
    assert (str(a["price"]), a["in_stock"], a["occurred_at"]) == (
        "12.500000000",
        False,
        T0 + timedelta(minutes=5),
    )
    assert await co_purchases(pool) == {
        ("A", "B"): 2, ("B", "A"): 2, ("A", "C"): 1, ("C", "A"): 1, ("B", "C"): 1, ("C", "B"): 1,
    }  # fmt: skip
    assert await popularity(pool) == {"A": (2, 2), "B": (2, 0), "C": (1, 1)}


class FakeDelivery:
    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.headers: dict[str, str] = {}
        self.attempt = 1
        self.outcome = ""

    async def ack(self) -> None:
        self.outcome = "acked"

    async def retry_later(self, delay_s: float) -> None:
        self.outcome = "retry"

    async def discard(self) -> None:
        self.outcome = "discarded"


class FakeSubscription:
    def __init__(self, batch: list[FakeDelivery]) -> None:
        self.batch: list[Any] = batch
        self.closed = False

    async def fetch(self, max_messages: int, timeout_s: float) -> list[Any]:
        batch, self.batch = self.batch, []
        if not batch:
            await asyncio.sleep(timeout_s)
        return batch

    async def close(self) -> None:
        self.closed = True


async def consume_one_batch(pool: asyncpg.Pool, events: list[bytes]) -> list[str]:
    deliveries = [FakeDelivery(e) for e in events]
    subscription = FakeSubscription(deliveries)
    consumer = CatalogConsumer(
        subscription, CatalogStore(pool), batch_size=10, concurrency=1, fetch_timeout_s=0.01
    )
    running = asyncio.create_task(consumer.run())
    while any(not d.outcome for d in deliveries):
        await asyncio.sleep(0.01)
    consumer.stop()
    await running
    assert subscription.closed
    return [d.outcome for d in deliveries]


async def test_a_batch_the_database_cannot_take_comes_back_later(database_url: str, schema: str) -> None:
    broken = await asyncpg.create_pool(database_url, server_settings={"search_path": schema}, min_size=1)
    await broken.close()
    batch = [
        view("A").SerializeToString(),
        event(user_id="u", identify=ingest_pb2.Identify()).SerializeToString(),
    ]
    assert await consume_one_batch(broken, [*batch, b"\xff"]) == ["retry", "acked", "discarded"]


class FailingStore(CatalogStore):
    async def apply(self, events: Sequence[ingest_pb2.Event]) -> ApplyResult:
        raise ValueError("a bug in the store")


async def test_a_batch_that_fails_for_an_unexpected_reason_comes_back_later(pool: asyncpg.Pool) -> None:
    """Not held for the event log's longest hold (ten minutes), nor dropped: handed back at once."""
    deliveries = [FakeDelivery(view("A").SerializeToString())]
    consumer = CatalogConsumer(
        FakeSubscription(deliveries), FailingStore(pool), batch_size=10, concurrency=1, fetch_timeout_s=0.01
    )
    running = asyncio.create_task(consumer.run())
    while not deliveries[0].outcome:
        await asyncio.sleep(0.01)
    consumer.stop()
    await running
    assert deliveries[0].outcome == "retry"


async def test_a_batch_is_acked_once_written(pool: asyncpg.Pool) -> None:
    assert await consume_one_batch(pool, [view("A").SerializeToString()]) == ["acked"]
    assert await popularity(pool) == {"A": (0, 1)}


# --- the store --------------------------------------------------------------------------------


async def test_an_event_counts_once_however_often_it_is_applied(pool: asyncpg.Pool) -> None:
    store = CatalogStore(pool)
    bought = order("A", "B", event_id="order-1")
    first = await store.apply([bought, view("A")])
    again = await store.apply([bought])
    assert (first.applied, first.duplicates, again.applied, again.duplicates) == (2, 0, 0, 1)
    assert await co_purchases(pool) == {("A", "B"): 1, ("B", "A"): 1}
    assert await popularity(pool) == {"A": (1, 1), "B": (1, 0)}


async def test_a_late_older_upsert_does_not_overwrite_a_newer_one(pool: asyncpg.Pool) -> None:
    store = CatalogStore(pool)
    await store.apply([upsert("A", at=T0 + timedelta(hours=1), name="New name")])
    await store.apply([upsert("A", at=T0, name="Old name")])
    await store.apply([upsert("B", at=T0, name="Old B")])
    await store.apply([upsert("B", at=T0 + timedelta(hours=1), name="New B")])
    rows = await pool.fetch("SELECT sku, name FROM render_catalog_products ORDER BY sku")
    assert [(r["sku"], r["name"]) for r in rows] == [("A", "New name"), ("B", "New B")]


async def test_category_popularity_comes_from_views_and_the_catalog(pool: asyncpg.Pool) -> None:
    store = CatalogStore(pool)
    await store.apply([upsert("A", category="shoes"), upsert("S", category="socks")])
    await store.apply([view("A", category=""), view("S", category="socks"), order("A", "S"), order("X")])
    rows = await pool.fetch("SELECT category, purchases, views FROM render_category_popularity")
    assert {r["category"]: (r["purchases"], r["views"]) for r in rows} == {"shoes": (1, 1), "socks": (1, 1)}


async def test_a_bulk_order_counts_purchases_but_no_pairs(pool: asyncpg.Pool) -> None:
    store = CatalogStore(pool)
    await store.apply([order(*(f"S{i}" for i in range(MAX_SKUS_FOR_PAIRS + 1)))])
    assert await co_purchases(pool) == {}
    assert len(await popularity(pool)) == MAX_SKUS_FOR_PAIRS + 1


async def test_text_with_nul_characters_is_stored_without_them(pool: asyncpg.Pool) -> None:
    await CatalogStore(pool).apply([upsert("A", name="Bad\x00name")])
    assert await pool.fetchval("SELECT name FROM render_catalog_products") == "Badname"


async def test_old_event_ids_are_purged(pool: asyncpg.Pool) -> None:
    store = CatalogStore(pool)
    await store.apply([view("A"), view("B")])
    await pool.execute("UPDATE render_catalog_processed_events SET processed_at = now() - interval '9 days'")
    await store.apply([view("C")])
    assert await store.purge_processed(timedelta(days=8)) == 2
    assert await pool.fetchval("SELECT count(*) FROM render_catalog_processed_events") == 1


# --- recommendations --------------------------------------------------------------------------


def profile(cart: Sequence[str] = (), viewed: Sequence[tuple[str, str]] = ()) -> profile_pb2.Profile:
    return profile_pb2.Profile(
        cart=profile_pb2.Cart(items=[profile_pb2.CartItem(sku=s, quantity=1) for s in cart]),
        recently_viewed=[profile_pb2.ProductView(sku=s, category=c) for s, c in viewed],
    )


async def shop(store: CatalogStore) -> None:
    """Shoes CART1/CART2 in the cart; TOGETHER pairs with them; socks and hats to browse."""
    await store.apply(
        [
            upsert("CART1", price="59.90"),
            upsert("CART2"),
            upsert("TOGETHER", category="laces"),
            upsert("TOGETHER_OUT", category="laces", in_stock=False),
            upsert("BOUGHT", category="laces"),
            upsert("VIEWED", category="socks"),
            upsert("SOCK_TOP", category="socks"),
            upsert("SOCK_LOW", category="socks"),
            upsert("HAT_TOP", category="hats"),
            upsert("SHOE_POP", category="shoes"),
        ]
    )
    await store.apply(
        [
            *(order("CART1", "TOGETHER", "TOGETHER_OUT", "BOUGHT") for _ in range(2)),
            order("CART2", "CART1"),
            order("UNKNOWN", "CART1"),  # not in the catalog
            *(view("SOCK_TOP", "socks") for _ in range(5)),
            view("SOCK_LOW", "socks"),
            *(view("HAT_TOP", "hats") for _ in range(50)),
            *(view("SHOE_POP", "shoes") for _ in range(3)),
        ]
    )


async def test_recommendations_come_in_priority_order_without_excluded_products(
    counter_and_pool: tuple[QueryCounter, asyncpg.Pool],
) -> None:
    counter, pool = counter_and_pool
    await shop(CatalogStore(pool))
    recommender = Recommender(pool)
    customer = profile(cart=["CART1", "GONE"], viewed=[("VIEWED", "socks"), ("BOUGHT", "laces")])
    before = len(counter.statements())
    found = await recommender.recommend(customer, ["BOUGHT"], 20)
    await asyncio.sleep(0)  # the query logger reports on the next loop turn
    assert len(counter.statements()) - before == 1

    assert [(r["sku"], r["reason"]) for r in found] == [
        ("CART1", "cart"),  # GONE is unknown to the catalog
        ("TOGETHER", "bought_together"),  # TOGETHER_OUT is out of stock, BOUGHT bought
        ("CART2", "bought_together"),
        ("VIEWED", "recently_viewed"),
        ("SOCK_TOP", "popular_in_category"),  # socks: viewed; shoes: the cart's category
        ("SHOE_POP", "popular_in_category"),
        ("SOCK_LOW", "popular_in_category"),
        ("HAT_TOP", "popular"),
    ]
    assert found[0] == {
        "sku": "CART1",
        "name": "Product CART1",
        "price": {"amount": 59.9, "currency": "EUR"},
        "category": "shoes",
        "image_url": "https://cdn.example.com/CART1.jpg",
        "url": "https://shop.example.com/p/CART1",
        "reason": "cart",
    }
    limited = await recommender.recommend(customer, ["BOUGHT"], 3)
    assert [r["sku"] for r in limited] == ["CART1", "TOGETHER", "CART2"]


async def test_without_a_profile_recommendations_are_the_popular_products(pool: asyncpg.Pool) -> None:
    await shop(CatalogStore(pool))
    recommender = Recommender(pool, limit_default=3)
    found = await recommender.recommend(None, [])
    assert [(r["sku"], r["reason"]) for r in found] == [
        ("CART1", "popular"),  # 4 orders: 80 points
        ("HAT_TOP", "popular"),  # 50 views
        ("BOUGHT", "popular"),  # 2 orders, as TOGETHER: the sku breaks the tie
    ]
    assert await recommender.recommend(None, [], 0) == []


async def test_an_empty_catalog_recommends_nothing(pool: asyncpg.Pool) -> None:
    assert await Recommender(pool).recommend(profile(cart=["A"], viewed=[("B", "shoes")]), ["C"], 8) == []


# --- within the render's deadline ---------------------------------------------------------------


class LiveProfiles:
    """The profile service's answer, at once: the renderer then waits only for recommendations."""

    async def get(self, customer: Any, *, time_left_s: float, max_age: Any = None) -> ProfileLookup:
        return ProfileLookup(profile(cart=["A"]), Source.LIVE)


async def test_a_render_does_not_wait_for_recommendations_while_postgresql_stalls(
    database_url: str, schema: str, tmp_path: Path
) -> None:
    """Found by the fault matrix (slow-postgres, docs/reliability.md): renders came back late
    while the network to PostgreSQL stalled. The recommendations' bound was asyncio.wait_for,
    which waits for the cancelled query to end, and asyncpg gives a cancelled query's connection
    back only once the server answers the cancel: when the stall ends."""
    upstream = urlsplit(database_url)
    with FaultProxy.start(
        {"postgres": (upstream.hostname or "127.0.0.1", upstream.port or 5432)}, tmp_path
    ) as proxy:
        proxied = urlunsplit(
            upstream._replace(netloc=f"{upstream.username}@127.0.0.1:{proxy.port('postgres')}")
        )
        pool = await asyncpg.create_pool(
            proxied, server_settings={"search_path": schema}, min_size=1, max_size=2
        )
        try:
            compiler = TemplateCompiler(cache_size=4)
            renderer = Renderer(compiler, LiveProfiles(), Recommender(pool), fallback_reserve_s=0.1)  # type: ignore[arg-type]
            content = render_pb2.Template(
                subject="For you", html="{% for r in recommendations %}{{ r.sku }}{% endfor %}."
            )
            job = RenderJob(
                customer=profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_USER_ID, value="u"),
                content=content,
                compiled=compiler.compile(content.subject, content.html, content.text),
            )
            assert (await renderer.render(job, time_left_s=5.0)).status == render_pb2.RENDER_STATUS_RENDERED

            proxy.stall("postgres")
            rendering = asyncio.ensure_future(renderer.render(job, time_left_s=0.3))
            done, _ = await asyncio.wait({rendering}, timeout=10)
            assert done, "the render waited for PostgreSQL"
            answer = rendering.result()
            assert answer.status == render_pb2.RENDER_STATUS_RENDERED
            assert "recommendations" in answer.fallbacks_used  # the render went on without them
        finally:
            proxy.resume("postgres")
            await pool.close()
