"""``make bench-profile``: how fast the profile service reads profiles (Redis hit, miss to
PostgreSQL, batches of 100) and merges events, next to floors measured in the same run.

The bench starts a private stack (bench_common.BenchStack: NATS with ``sync_interval: always``,
Redis, a fresh database, profile and ingest as their own processes), then:

1. a write floor: one-INSERT PostgreSQL transactions at the merger's concurrency (8), in a
   scratch table of the bench database;
2. load: ``--customers`` customers (an identify with traits and an email, two cart additions:
   3 events each) through ``IngestService/SendEvents`` in batches of 500, interleaved as a live
   stream is; merge events/s is all events / (load start -> the ``profile-merger`` consumer has
   nothing pending);
3. every customer read once (BatchGetProfiles of 500), as sends would: the merger keeps only
   profiles someone reads in Redis in full;
4. read floors: an empty grpc.aio unary call, a raw Redis GET of a real cache entry
   (redis.asyncio with hiredis, as the service), a raw Redis MGET of 100, a raw PostgreSQL
   primary-key read (asyncpg, ``SELECT state FROM customers WHERE customer_id=$1``) and one of
   100 rows, each one at a time and (where it applies) at ``--concurrency``;
5. GetProfile on a cache hit, one at a time and at ``--concurrency``, after a second read of
   every customer: as configured by default, the service serves hits from its near cache; and
   BatchGetProfiles of 100 of those customers, one call at a time, from the same copies. Then
   TLS beside plaintext: two more profile services started together, alike but for TLS (one
   plaintext, one serving a certificate from a CA made for the run), get the same hits, taking
   turns in short segments (A B B A B A A B, over and over; ``measure_alternating``), both
   connections warmed up first: the TLS p50 over the plaintext p50, goal at most 1.10. Then the
   key check alone, timed in process, and the database transactions made during those calls
   (the keys are held in memory). Then rate limits beside none: two more profile services
   started together, alike but for ``RATE_LIMITS=false`` on one, get the same hits taking turns
   the same way; and a rate-limit decision alone, timed in process against the bench's Redis,
   one at a time and at ``--concurrency``, and made per replica (the fallback). Then metrics
   beside none, the same way: two twins, alike but for an empty ``PROFILE_METRICS_ADDRESS`` on
   one (no metrics kept): the p50 with metrics over the p50 without, goal at most 1.03;
6. a second profile service with the near cache off (``PROFILE_NEAR_CACHE_ENTRIES=0``): hits
   that read Redis; misses (the customer's Redis key deleted, untimed, before each call;
   PostgreSQL's buffers are warm); and BatchGetProfiles of 100 from Redis, then cold.

Every call to a service carries the bench's API key (in its metadata, as ``bearer_auth``
would add it). Calls go out as pre-serialized bytes and answers are not parsed (one per phase is
checked), as in the empty-call floor, so the client's protobuf work is in neither. It prints a table of each
measure against its floors and the goal, and the CPU each process used in each phase. A missed
goal is reported, not an error: the exit code is 0 unless the bench broke. Defaults take about
160 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import asyncpg
import grpc
import nats
import redis.asyncio as redis
from bench_common import (
    CLOCK_TICKS,
    PLAINTEXT,
    BenchError,
    BenchStack,
    CallFailed,
    CallFloor,
    CpuMeter,
    CpuSnapshot,
    Row,
    add_output_arguments,
    fmt_rate,
    fmt_ratio,
    machine_info,
    measure_empty_unary,
    percentile,
    process_ticks,
    render_cpu,
    render_table,
    report_warnings,
    run_bench_main,
    say,
    source_info,
    timestamp_from_ns,
    verdict,
)
from google.protobuf import struct_pb2
from google.type import money_pb2

import suite
from profile_service.cache import cache_key
from profile_service.repository import create_pool
from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2
from sendtime_common.auth.access import Authenticator
from sendtime_common.auth.api_keys import Scope
from sendtime_common.auth.client import bearer_metadata
from sendtime_common.auth.key_store import KeyStore
from sendtime_common.auth.keyring import KeyRing
from sendtime_common.event_log import JetStreamSettings
from sendtime_common.identifiers import IdentifierKind
from sendtime_common.rate_limit import LocalLimiter, Rate, RateLimiter, RateLimitSettings
from sendtime_common.tls import ClientTls
from sendtime_common.tls import channel as open_channel

GET_PROFILE = "/sendtime.profile.v1.ProfileService/GetProfile"
SEND_EVENTS = "/sendtime.ingest.v1.IngestService/SendEvents"
BATCH_GET_PROFILES = "/sendtime.profile.v1.ProfileService/BatchGetProfiles"
MERGER = "profile-merger"
ACCEPTED = ingest_pb2.EVENT_OUTCOME_ACCEPTED
SEND_BATCH = 500  # events per SendEvents call (whole customers)
SENDERS = 4  # concurrent SendEvents calls
MERGE_CONCURRENCY = 8  # PROFILE_MERGE_CONCURRENCY's default: the write floor's concurrency
BATCH = 100
WARM_BATCH = 500  # customers per BatchGetProfiles call while warming the cache
CALL_TIMEOUT_S = 10.0
# A consumer whose pending count and ack floor have not moved for this long has stopped. Longer
# than JetStream's ack wait (30 s), after which an unconfirmed ack's message comes back.
STALL_S = 60.0

GOAL_HIT_VS_FLOOR = 1.5
GOAL_TLS_VS_PLAINTEXT = 1.10  # TLS p50 / plaintext p50, both with a key, in the same run
GOAL_METRICS_COST = 1.03  # hit p50 with Prometheus metrics / without, in the same run
GOAL_BATCH_VS_FLOOR = 2.0  # BatchGetProfiles(100) warm p50 / (empty call p50 + MGET 100 p50)
# Segments of the plaintext / TLS alternation, one call at a time and concurrently.
SEGMENT_ONE_S = 0.25
SEGMENT_MANY_S = 0.5
SETTLE_MANY_S = 0.02  # ~3 calls' time at 16 concurrent


# --- timing ------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    """Milliseconds with two decimals (bench_common.fmt_ms rounds to whole ms, too coarse here)."""
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:,.2f} ms"


@dataclass(frozen=True, slots=True)
class Measured:
    """Calls made back to back by ``concurrency`` callers: latencies of those that succeeded."""

    concurrency: int
    calls: int
    seconds: float
    p50_s: float
    p99_s: float
    max_s: float
    errors: dict[str, int] = field(default_factory=dict)
    latencies: tuple[float, ...] = field(default=(), repr=False, compare=False)

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else math.nan

    @classmethod
    def pooled(cls, parts: Sequence[Measured]) -> Measured:
        """One measure of the same calls made in several segments: every latency, the rate over
        the segments' time taken together."""
        latencies = [latency for part in parts for latency in part.latencies]
        errors: Counter[str] = Counter()
        for part in parts:
            errors.update(part.errors)
        return cls(
            concurrency=parts[0].concurrency,
            calls=sum(part.calls for part in parts),
            seconds=sum(part.seconds for part in parts),
            p50_s=percentile(latencies, 50),
            p99_s=percentile(latencies, 99),
            max_s=max(latencies, default=math.nan),
            errors=dict(errors),
            latencies=tuple(latencies),
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "calls": self.calls,
            "seconds": self.seconds,
            "per_s": self.rate,
            "p50_s": self.p50_s,
            "p99_s": self.p99_s,
            "max_s": self.max_s,
            "errors": self.errors,
        }


async def measure(
    call: Callable[[int], Awaitable[object]],
    *,
    concurrency: int,
    duration_s: float,
    prepare: Callable[[int], Awaitable[object]] | None = None,
    max_calls: int | None = None,
    settle_s: float = 0.0,
) -> Measured:
    """``concurrency`` callers each awaiting ``call(i)`` back to back (``i`` counts calls across
    callers) for ``duration_s`` or ``max_calls`` calls. ``prepare(i)`` runs before a call and is
    not timed (the rate then includes it). gRPC errors are counted by code, not raised. Calls
    begun in the first ``settle_s`` are made but not counted: the first wave of concurrent
    callers finds no queue, and would lower the p50 of a short measure."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    counter = itertools.count()
    count_from = time.perf_counter() + settle_s
    stop_at = time.perf_counter() + duration_s

    async def caller() -> None:
        while time.perf_counter() < stop_at:
            i = next(counter)
            if max_calls is not None and i >= max_calls:
                return
            if prepare is not None:
                await prepare(i)
            started = time.perf_counter()
            try:
                await call(i)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
                continue
            except CallFailed as exc:
                errors[exc.reason] += 1
                continue
            if started >= count_from:
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    seconds = time.perf_counter() - max(started, count_from)
    return Measured(
        concurrency=concurrency,
        calls=len(latencies),
        seconds=seconds,
        p50_s=percentile(latencies, 50),
        p99_s=percentile(latencies, 99),
        max_s=max(latencies, default=math.nan),
        errors=dict(errors),
        latencies=tuple(latencies),
    )


def _fail_on_errors(name: str, measured: Measured) -> None:
    if measured.errors:
        raise BenchError(f"{name}: calls failed: {measured.errors}")


@dataclass(frozen=True, slots=True)
class Side:
    """One side of an alternated measure: its segments pooled, and each segment."""

    measured: Measured
    segments: tuple[Measured, ...]
    server_cpu_per_call_s: float = math.nan  # the CPU its server used per call, where known

    def halves(self) -> tuple[Measured, Measured]:
        """The segments of the first and of the second half of the measure, each pooled."""
        middle = len(self.segments) // 2
        return Measured.pooled(self.segments[:middle]), Measured.pooled(self.segments[middle:])

    def as_json(self) -> dict[str, Any]:
        first, second = self.halves()
        return {
            **self.measured.as_json(),
            "segments": len(self.segments),
            "half_p50_s": [first.p50_s, second.p50_s],
            "server_cpu_per_call_s": self.server_cpu_per_call_s,
        }


def balanced(sides: int) -> list[int]:
    """One cycle of an alternated measure's segments: A B B A B A A B for two sides. Each side
    has the same sum of positions (a steady drift of the machine weighs the same on every side),
    and as many of its segments follow the other side's as follow its own (a segment's first
    calls find its server idle)."""
    mirrored = [*range(sides), *reversed(range(sides))]
    return [*mirrored, *(sides - 1 - index for index in mirrored)]


async def measure_alternating(
    calls: Sequence[Callable[[int], Awaitable[object]]],
    *,
    concurrency: int,
    duration_s: float,
    segment_s: float,
    settle_s: float = 0.0,
) -> list[Side]:
    """Each of ``calls`` measured as ``measure`` does, for about twice ``duration_s`` each in
    all, in segments of ``segment_s`` taking turns in ``balanced`` cycles (the sides never run at
    the same time); a ``Side`` for each. ``settle_s`` as for ``measure``, in each segment.

    Short segments, many of them: the speed of this 2-core machine moves in steps that last
    seconds (where the scheduler puts the processes, what else runs), and segments of seconds
    take such a step on one side only. Two plaintext profile services alike, compared with
    GetProfile hits one at a time over 8 runs, differed with a standard deviation of 6-7% in
    segments of 3 s (one A B B A) and of 2-3.5% in segments of 0.25 s
    (docs/benchmarks-profile-render.md, experiment F)."""
    order = balanced(len(calls))
    cycles = max(1, round(2 * duration_s * len(calls) / (segment_s * len(order))))
    segments: list[list[Measured]] = [[] for _ in calls]
    for _ in range(cycles):
        for index in order:
            measured = await measure(
                calls[index], concurrency=concurrency, duration_s=segment_s, settle_s=settle_s
            )
            segments[index].append(measured)
    return [Side(Measured.pooled(parts), tuple(parts)) for parts in segments]


def _cpu_seconds(pid: int) -> float:
    ticks = process_ticks(pid)
    return math.nan if ticks is None else ticks / CLOCK_TICKS


async def alternate_with_cpu(
    calls: Sequence[Callable[[int], Awaitable[object]]],
    server_pids: Sequence[int],
    meter: CpuMeter,
    *,
    concurrency: int,
    duration_s: float,
    segment_s: float,
    settle_s: float = 0.0,
) -> tuple[list[Side], CpuSnapshot, CpuSnapshot]:
    """``measure_alternating``, each side's server (the process ``server_pids`` names, serving
    that side only) charged its CPU per call (counted calls: a little high with ``settle_s``);
    and the CPU snapshots around it."""
    start = meter.snapshot()
    before = [_cpu_seconds(pid) for pid in server_pids]
    sides = await measure_alternating(
        calls, concurrency=concurrency, duration_s=duration_s, segment_s=segment_s, settle_s=settle_s
    )
    used = [_cpu_seconds(pid) - at_start for pid, at_start in zip(server_pids, before, strict=True)]
    end = meter.snapshot()
    return (
        [
            replace(side, server_cpu_per_call_s=seconds / max(1, side.measured.calls))
            for side, seconds in zip(sides, used, strict=True)
        ],
        start,
        end,
    )


def ratio_halves(plain: Side, tls: Side) -> str:
    """TLS p50 / plaintext p50 in the first and in the second half of an alternated measure."""
    halves = zip(plain.halves(), tls.halves(), strict=True)
    return " / ".join(f"{b.p50_s / a.p50_s:.2f}" for a, b in halves)


# --- loading customers through ingest ----------------------------------------------------------


def user_id_of(run_id: str, index: int) -> str:
    return f"bench-{run_id}-c{index}"


FIRST_NAMES = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Tim")
PRODUCTS = tuple(
    (f"SKU-{n:03d}", f"{adjective} {thing}", 9 + (n * 37) % 190)
    for n, (adjective, thing) in enumerate(
        itertools.product(
            ("Trail", "Road", "Summit", "Urban", "Coastal"),
            ("runner", "jacket", "backpack", "bottle", "cap", "sock pack", "headlamp", "vest"),
        )
    )
)


def customer_events(
    run_id: str, index: int, rng: random.Random, base_ns: int, *, views: int, cart_items: int
) -> list[ingest_pb2.Event]:
    """One customer's history, in occurred_at order: an identify (CRM, with an email, so that two
    identifiers are stitched), ``views`` product views and ``cart_items`` cart additions (web)."""
    user_id = user_id_of(run_id, index)
    events: list[ingest_pb2.Event] = []
    at_ns = base_ns + index * 1000

    def event(source: int, **payload: Any) -> ingest_pb2.Event:
        built = ingest_pb2.Event(
            event_id=f"bench-{run_id}-c{index}-e{len(events)}",
            occurred_at=timestamp_from_ns(at_ns + len(events)),
            customer=ingest_pb2.CustomerIdentifiers(user_id=user_id),
            source=source,  # type: ignore[arg-type]
        )
        for name, value in payload.items():
            getattr(built, name).CopyFrom(value)
        events.append(built)
        return built

    traits = struct_pb2.Struct()
    traits.update(
        {
            "first_name": FIRST_NAMES[index % len(FIRST_NAMES)],
            "last_name": f"Customer{index}",
            "city": rng.choice(["Lyon", "Leeds", "Porto", "Graz", "Turku"]),
            "plan": rng.choice(["free", "plus", "pro"]),
            "newsletter": rng.random() < 0.5,
        }
    )
    identify = event(ingest_pb2.EVENT_SOURCE_CRM, identify=ingest_pb2.Identify(traits=traits))
    identify.customer.email = f"{user_id}@example.com"
    for _ in range(views):
        sku, name, units = rng.choice(PRODUCTS)
        price = money_pb2.Money(currency_code="EUR", units=units, nanos=990_000_000)
        event(
            ingest_pb2.EVENT_SOURCE_WEB,
            product_viewed=ingest_pb2.ProductViewed(
                sku=sku, name=name, price=price, category="outdoor", url=f"https://shop.example.com/p/{sku}"
            ),
        )
    for sku, name, units in rng.sample(PRODUCTS, cart_items):
        price = money_pb2.Money(currency_code="EUR", units=units, nanos=990_000_000)
        event(
            ingest_pb2.EVENT_SOURCE_WEB,
            cart_item_added=ingest_pb2.CartItemAdded(
                sku=sku, name=name, quantity=rng.randint(1, 3), unit_price=price
            ),
        )
    return events


def batches_of(customers: Sequence[Sequence[ingest_pb2.Event]], size: int) -> list[bytes]:
    """SendEventsRequests of ``size`` events, interleaved as a live stream is: every customer's
    first event, then every customer's second one, and so on. One fetch of the merger then holds
    events of different customers, which merge side by side (a customer's own events serialize on
    its locks), and a customer's events arrive in occurred_at order, far apart."""
    ordered = [
        events[round_]
        for round_ in range(max(len(c) for c in customers))
        for events in customers
        if round_ < len(events)
    ]
    return [
        ingest_pb2.SendEventsRequest(events=ordered[i : i + size]).SerializeToString()
        for i in range(0, len(ordered), size)
    ]


@dataclass(frozen=True, slots=True)
class Loaded:
    events: int
    ingest_s: float  # load start -> the last SendEvents answered
    merged_s: float  # load start -> every consumer has nothing pending
    pending_at_ingest_end: dict[str, int]
    consumers_done_s: dict[str, float]

    @property
    def acked_rate(self) -> float:
        return self.events / self.ingest_s

    @property
    def merged_rate(self) -> float:
        return self.events / self.consumers_done_s[MERGER]


async def consumer_state(js: Any, stream: str, name: str) -> tuple[int, int]:
    """Events not yet acked by the durable consumer ``name`` (undelivered + unacked), and its ack
    floor (stream sequence)."""
    info = await js.consumer_info(stream, name)
    return int(info.num_pending) + int(info.num_ack_pending), int(info.ack_floor.stream_seq)


async def load_customers(
    stack: BenchStack,
    requests: Sequence[bytes],
    events: int,
    consumers: Sequence[str],
    timeout_s: float,
    *,
    analyze: bool = False,
) -> Loaded:
    """Send ``requests`` with SENDERS concurrent SendEvents calls (each sender on its own
    channel), then wait until each of ``consumers`` has nothing pending. Every event must be
    ACCEPTED. With ``analyze``, the database is ANALYZEd once ingest has acknowledged every
    event (a fresh database otherwise has no statistics until autovacuum gets to it: see
    docs/benchmarks-profile-render.md)."""
    settings = JetStreamSettings.from_env(stack.env)
    stream = settings.stream
    client = await nats.connect(settings.servers, name="sendtime-bench-monitor")
    js = client.jetstream()
    channels = [stack.channel(stack.target(suite.INGEST)) for _ in range(SENDERS)]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), 10)
        queue = iter(requests)
        problems: list[str] = []

        async def sender(channel: grpc.aio.Channel) -> None:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            for request in queue:
                response = await stub.SendEvents(ingest_pb2.SendEventsRequest.FromString(request), timeout=60)
                for result in response.results:
                    if result.outcome != ACCEPTED and not problems:
                        name = ingest_pb2.EventOutcome.Name(result.outcome)
                        problems.append(f"{result.event_id}: {name}: {result.status.message}")

        started = time.perf_counter()
        await asyncio.gather(*(sender(c) for c in channels))
        ingest_s = time.perf_counter() - started
        if problems:
            raise BenchError(f"load: not every event was accepted, e.g. {problems[0]}")
        pending = {name: (await consumer_state(js, stream, name))[0] for name in consumers}
        if analyze:
            conn = await asyncpg.connect(stack.database_url)
            try:
                await conn.execute("ANALYZE")
            finally:
                await conn.close()
        done: dict[str, float] = {}
        progress = {name: ((-1, -1), time.perf_counter()) for name in consumers}  # (state, when it moved)
        deadline = time.perf_counter() + timeout_s
        while len(done) < len(consumers):
            for name in consumers:
                if name in done:
                    continue
                left, acked = await consumer_state(js, stream, name)
                now = time.perf_counter()
                if left == 0:
                    done[name] = now - started
                elif (left, acked) != progress[name][0]:
                    progress[name] = ((left, acked), now)
                elif now - progress[name][1] > STALL_S:
                    raise BenchError(
                        f"consumer {name} made no progress for {STALL_S:.0f}s with {left:,} events pending"
                        f" (ack floor {acked:,}): its service stopped consuming; see its log"
                    )
            if time.perf_counter() > deadline:
                raise BenchError(f"consumers not done after {timeout_s:.0f}s: {set(consumers) - set(done)}")
            await asyncio.sleep(0.05)
        return Loaded(events, ingest_s, max(done.values()), pending, done)
    finally:
        for channel in channels:
            await channel.close(None)
        await client.close()


async def check_merged(database_url: str, events: int, customers: int) -> list[str]:
    """Every event is in PostgreSQL and every customer exists: the customer ids."""
    conn = await asyncpg.connect(database_url)
    try:
        in_database = int(await conn.fetchval("SELECT count(*) FROM events"))
        ids = [str(r["customer_id"]) for r in await conn.fetch("SELECT customer_id FROM customers")]
    finally:
        await conn.close()
    if in_database != events or len(ids) != customers:
        raise BenchError(f"merged {in_database} events of {events}, {len(ids)} customers of {customers}")
    return ids


# --- raw floors --------------------------------------------------------------------------------


async def measure_pg_write_txn(
    database_url: str, concurrency: int, duration_s: float, meter: CpuMeter, cpu: dict[str, Any]
) -> Measured:
    """One-INSERT transactions (an event-sized row, commit), ``concurrency`` at once: what one
    transaction per merged event costs at the least on this PostgreSQL."""
    pool = await asyncpg.create_pool(database_url, min_size=concurrency, max_size=concurrency)
    assert pool is not None
    body = bytes(random.Random(1).randbytes(220))
    try:
        await pool.execute("CREATE TABLE bench_write_floor (id bigint PRIMARY KEY, body bytea NOT NULL)")

        async def txn(i: int) -> None:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("INSERT INTO bench_write_floor (id, body) VALUES ($1, $2)", i, body)

        await measure(txn, concurrency=concurrency, duration_s=0.3)  # connect and warm up
        await pool.execute("TRUNCATE bench_write_floor")
        snap = meter.snapshot()
        measured = await measure(txn, concurrency=concurrency, duration_s=duration_s)
        cpu["write floor"] = CpuMeter.usage(snap, meter.snapshot())  # while the backends exist
        await pool.execute("DROP TABLE bench_write_floor")
    finally:
        await pool.close()
    return measured


@dataclass(frozen=True, slots=True)
class ReadFloors:
    empty_1: CallFloor
    empty_n: CallFloor
    redis_get_1: Measured
    redis_get_n: Measured
    redis_mget_100: Measured
    pg_read_1: Measured
    pg_read_n: Measured
    pg_read_100: Measured
    entry_bytes: int

    def as_json(self) -> dict[str, Any]:
        def call(floor: CallFloor) -> dict[str, Any]:
            return {
                "concurrency": floor.concurrency,
                "calls": floor.calls,
                "per_s": floor.rate,
                "p50_s": floor.p50_s,
                "p99_s": floor.p99_s,
                "idle_p50_s": floor.idle_p50_s,
            }

        return {
            "empty_unary_1": call(self.empty_1),
            "empty_unary_n": call(self.empty_n),
            "redis_get_1": self.redis_get_1.as_json(),
            "redis_get_n": self.redis_get_n.as_json(),
            "redis_mget_100": self.redis_mget_100.as_json(),
            "pg_pk_read_1": self.pg_read_1.as_json(),
            "pg_pk_read_n": self.pg_read_n.as_json(),
            "pg_pk_read_100": self.pg_read_100.as_json(),
            "cache_entry_bytes": self.entry_bytes,
        }


async def measure_redis_get(
    client: redis.Redis, keys: Sequence[str], concurrency: int, duration_s: float
) -> Measured:
    async def get(i: int) -> None:
        if await client.get(keys[i % len(keys)]) is None:
            raise BenchError(f"Redis floor: no entry at {keys[i % len(keys)]}")

    await measure(get, concurrency=concurrency, duration_s=0.2)
    return await measure(get, concurrency=concurrency, duration_s=duration_s)


async def measure_redis_mget(
    client: redis.Redis, keys: Sequence[str], size: int, duration_s: float
) -> Measured:
    groups = [keys[i : i + size] for i in range(0, len(keys) - size + 1, size)]

    async def mget(i: int) -> None:
        await client.mget(groups[i % len(groups)])

    await measure(mget, concurrency=1, duration_s=0.2)
    return await measure(mget, concurrency=1, duration_s=duration_s)


async def measure_pg_read(
    pool: asyncpg.Pool, customer_ids: Sequence[str], concurrency: int, duration_s: float
) -> Measured:
    """``SELECT state FROM customers WHERE customer_id=$1``, through a pool whose connections
    decode json as the profile service's do."""

    async def read(i: int) -> None:
        state = await pool.fetchval(
            "SELECT state FROM customers WHERE customer_id = $1::uuid", customer_ids[i % len(customer_ids)]
        )
        if state is None:
            raise BenchError("PostgreSQL floor: a customer is missing")

    await measure(read, concurrency=concurrency, duration_s=0.2)
    return await measure(read, concurrency=concurrency, duration_s=duration_s)


async def measure_pg_read_many(
    pool: asyncpg.Pool, customer_ids: Sequence[str], size: int, duration_s: float
) -> Measured:
    groups = [list(customer_ids[i : i + size]) for i in range(0, len(customer_ids) - size + 1, size)]

    async def read(i: int) -> None:
        await pool.fetch(
            "SELECT state FROM customers WHERE customer_id = ANY($1::uuid[])", groups[i % len(groups)]
        )

    await measure(read, concurrency=1, duration_s=0.2)
    return await measure(read, concurrency=1, duration_s=duration_s)


async def measure_read_floors(
    stack: BenchStack,
    options: Options,
    user_ids: Sequence[str],
    customer_ids: Sequence[str],
    meter: CpuMeter,
    cpu: dict[str, Any],
) -> ReadFloors:
    empty_target = stack.start_empty_server()
    n, seconds = options.concurrency, options.floor_seconds
    say(f"floor: empty grpc.aio unary call, 1 at a time and {n} concurrent")
    snap = meter.snapshot()
    empty_1 = await measure_empty_unary(empty_target, 1, seconds)
    empty_n = await measure_empty_unary(empty_target, n, seconds)
    cpu["empty-call floor"] = CpuMeter.usage(snap, meter.snapshot())
    say(f"   p50 {ms(empty_1.p50_s)} (1), {ms(empty_n.p50_s)} ({n}); {fmt_rate(empty_n.rate)} calls/s at {n}")
    keys = [cache_key(IdentifierKind.USER_ID, u) for u in user_ids]
    client = redis.Redis.from_url(stack.redis_url)  # as the service creates its client (hiredis)
    try:
        entry = await client.get(keys[0])
        if entry is None:
            raise BenchError(f"no cache entry at {keys[0]}: the merger did not fill the cache")
        say(f"floor: raw Redis GET of a cache entry ({len(entry):,} B), 1 and {n} concurrent; MGET of 100")
        snap = meter.snapshot()
        redis_1 = await measure_redis_get(client, keys, 1, seconds)
        redis_n = await measure_redis_get(client, keys, n, seconds)
        mget = await measure_redis_mget(client, keys, BATCH, seconds)
        cpu["Redis floors"] = CpuMeter.usage(snap, meter.snapshot())
        say(f"   GET p50 {ms(redis_1.p50_s)} (1), {ms(redis_n.p50_s)} ({n}); MGET 100 p50 {ms(mget.p50_s)}")
    finally:
        await client.aclose()
    pool = await create_pool(stack.database_url, min_size=n, max_size=n)
    try:
        say(f"floor: raw PostgreSQL primary-key read (asyncpg), 1 and {n} concurrent; 100 rows")
        snap = meter.snapshot()
        pg_1 = await measure_pg_read(pool, customer_ids, 1, seconds)
        pg_n = await measure_pg_read(pool, customer_ids, n, seconds)
        pg_100 = await measure_pg_read_many(pool, customer_ids, BATCH, seconds)
        cpu["PostgreSQL floors"] = CpuMeter.usage(snap, meter.snapshot())
        say(f"   p50 {ms(pg_1.p50_s)} (1), {ms(pg_n.p50_s)} ({n}); 100 rows p50 {ms(pg_100.p50_s)}")
    finally:
        await pool.close()
    return ReadFloors(empty_1, empty_n, redis_1, redis_n, mget, pg_1, pg_n, pg_100, len(entry))


# --- the profile reads -------------------------------------------------------------------------


async def read_every_customer(
    stack: BenchStack, target: str, user_ids: Sequence[str], tls: ClientTls = PLAINTEXT
) -> None:
    """Read each customer once. The merger keeps a profile in Redis in full only once someone
    has read it (other entries are version markers), so the first read makes a Redis hit a hit;
    the next keeps a copy in the service's near cache."""
    async with stack.channel(target, tls) as channel:
        batch_get = channel.unary_unary(
            BATCH_GET_PROFILES, request_serializer=None, response_deserializer=None
        )
        for start in range(0, len(user_ids), WARM_BATCH):
            await batch_get(batch_request(user_ids[start : start + WARM_BATCH]), timeout=CALL_TIMEOUT_S)


def get_request(user_id: str) -> bytes:
    identifier = profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_USER_ID, value=user_id)
    return profile_pb2.GetProfileRequest(identifier=identifier).SerializeToString()


def batch_request(user_ids: Sequence[str]) -> bytes:
    return profile_pb2.BatchGetProfilesRequest(
        identifiers=[
            profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_USER_ID, value=u) for u in user_ids
        ]
    ).SerializeToString()


@dataclass(frozen=True, slots=True)
class Auth:
    """What checking the key costs: in process, and in database reads during the hit measures."""

    authenticate_s: float  # one Authenticator.authenticate of a known key, in this process
    calls: int  # GetProfile calls made during the hit measures (both sides)
    database_transactions: int  # in the bench database meanwhile, by every process

    def as_json(self) -> dict[str, Any]:
        return {
            "authenticate_s": self.authenticate_s,
            "calls_during_hit_measures": self.calls,
            "database_transactions_during_hit_measures": self.database_transactions,
        }


@dataclass(frozen=True, slots=True)
class RateLimitCost:
    """What rate limits cost a hit: the twin with them (the default) beside the twin without,
    taking turns; and one decision timed in this process."""

    limited_1: Side
    unlimited_1: Side
    limited_n: Side
    unlimited_n: Side
    decisions: dict[str, float]  # time_rate_limit_decisions

    def as_json(self) -> dict[str, Any]:
        return {
            "get_profile_hit_limited_1": self.limited_1.as_json(),
            "get_profile_hit_unlimited_1": self.unlimited_1.as_json(),
            "get_profile_hit_limited_n": self.limited_n.as_json(),
            "get_profile_hit_unlimited_n": self.unlimited_n.as_json(),
            **self.decisions,
        }


@dataclass(frozen=True, slots=True)
class TwinCost:
    """Hits on a twin with a feature (A, as by default) beside a twin without it (B), taking
    turns, one at a time and at --concurrency."""

    with_1: Side
    without_1: Side
    with_n: Side
    without_n: Side

    def as_json(self) -> dict[str, Any]:
        return {
            "get_profile_hit_with_1": self.with_1.as_json(),
            "get_profile_hit_without_1": self.without_1.as_json(),
            "get_profile_hit_with_n": self.with_n.as_json(),
            "get_profile_hit_without_n": self.without_n.as_json(),
        }


@dataclass(frozen=True, slots=True)
class Reads:
    hit_1: Measured  # the service as configured by default: hits served from the near cache
    hit_n: Measured
    twin_hit_1: Side  # the same on two twins started after the merge, plaintext and TLS
    tls_hit_1: Side
    twin_hit_n: Side
    tls_hit_n: Side
    redis_hit_1: Measured  # a profile service with the near cache off: every hit reads Redis
    redis_hit_n: Measured
    miss_1: Measured
    miss_n: Measured
    batch_warm_near: Measured  # the service as configured: its copies in process answer
    batch_warm: Measured  # the near cache off: every batch reads Redis (MGET)
    batch_cold: Measured
    response_bytes: int
    auth: Auth
    rate_limits: RateLimitCost
    metrics: TwinCost

    def as_json(self) -> dict[str, Any]:
        return {
            "get_profile_hit_1": self.hit_1.as_json(),
            "get_profile_hit_n": self.hit_n.as_json(),
            "get_profile_hit_twin_1": self.twin_hit_1.as_json(),
            "get_profile_hit_tls_1": self.tls_hit_1.as_json(),
            "get_profile_hit_twin_n": self.twin_hit_n.as_json(),
            "get_profile_hit_tls_n": self.tls_hit_n.as_json(),
            "get_profile_redis_hit_1": self.redis_hit_1.as_json(),
            "get_profile_redis_hit_n": self.redis_hit_n.as_json(),
            "get_profile_miss_1": self.miss_1.as_json(),
            "get_profile_miss_n": self.miss_n.as_json(),
            "batch_get_100_warm_near": self.batch_warm_near.as_json(),
            "batch_get_100_warm": self.batch_warm.as_json(),
            "batch_get_100_cold": self.batch_cold.as_json(),
            "get_profile_response_bytes": self.response_bytes,
            "auth": self.auth.as_json(),
            "rate_limits": self.rate_limits.as_json(),
            "metrics": self.metrics.as_json(),
        }


async def database_transactions(database_url: str) -> int:
    """Transactions committed or rolled back in the database so far, as PostgreSQL's statistics
    have them (each backend reports within a second or so of its last transaction)."""
    conn = await asyncpg.connect(database_url)
    try:
        count: int = await conn.fetchval(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
        )
    finally:
        await conn.close()
    return count


async def time_authentication(database_url: str, key: str, calls: int = 20_000) -> float:
    """Seconds per ``Authenticator.authenticate`` of ``key`` (an API key the ring holds) with
    the metadata a call carries, in this process: what the access check spends on the key."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        keyring = KeyRing(KeyStore(pool))
        await keyring.load()
        authenticator = Authenticator(keyring)
        metadata = (("user-agent", f"grpc-python-asyncio/{grpc.__version__}"), *bearer_metadata(key))
        context = cast(grpc.aio.ServicerContext[Any, Any], None)  # read only for mutual TLS
        await authenticator.authenticate(metadata, context)
        started = time.perf_counter()
        for _ in range(calls):
            await authenticator.authenticate(metadata, context)
        return (time.perf_counter() - started) / calls
    finally:
        await pool.close()


async def time_rate_limit_decisions(redis_url: str, concurrency: int) -> dict[str, float]:
    """Rate-limit decisions timed in this process against ``redis_url``, with a RateLimiter as
    the services make and budgets never exhausted: a bucket decided in Redis call by call (a
    burst too small to lease from: the p50 latency, and the CPU per decision one at a time and
    at ``concurrency``); a busy bucket, whose calls are leased (CPU per decision); and a
    decision made per replica (the fallback)."""
    limiter = RateLimiter(RateLimitSettings(), "bench", redis_url)
    scope, each_call, leased = Scope.PROFILES_READ, Rate(1_000_000, 3), Rate(1_000_000, 1_000_000_000)

    async def decide(n: int, rate: Rate) -> None:
        for i in range(n):
            if not (await limiter.decide(scope, f"bench-{i % 10}", rate)).shared:
                raise BenchError("the rate limiter could not use the bench's Redis")

    try:
        latencies = []
        for i in range(5_000):
            started = time.perf_counter()
            await limiter.decide(scope, f"bench-{i % 10}", each_call)
            latencies.append(time.perf_counter() - started)
        timed: dict[str, float] = {"decision_1_p50_s": percentile(latencies, 50)}
        for name, rate, callers, calls in (
            ("decision_1_cpu_s", each_call, 1, 5_000),
            ("decision_n_cpu_s", each_call, concurrency, 20_000),
            ("leased_decision_n_cpu_s", leased, concurrency, 100_000),
        ):
            started_cpu = time.process_time()
            await asyncio.gather(*(decide(calls // callers, rate) for _ in range(callers)))
            timed[name] = (time.process_time() - started_cpu) / (calls // callers * callers)
    finally:
        await limiter.close()
    local = LocalLimiter()
    started = time.perf_counter()
    for i in range(100_000):
        local.decide(f"bench-{i % 10}", each_call)
    timed["local_decision_s"] = (time.perf_counter() - started) / 100_000
    return timed


async def compare_twins(
    stack: BenchStack,
    options: Options,
    user_ids: Sequence[str],
    meter: CpuMeter,
    cpu: dict[str, Any],
    twins: Sequence[tuple[str, Mapping[str, str]]],
    what: str,
) -> tuple[list[Side], list[Side]]:
    """GetProfile hits on two more profile services, labelled and configured as ``twins``
    (A, B), both plaintext, with the same key, taking turns as compare_hits does: one at a
    time, then at --concurrency. ``what`` names the difference in the output."""
    n, seconds = options.concurrency, options.seconds
    labels = [label for label, _ in twins]
    say(f"two more profile services, alike but for {what}: {', '.join(labels)}")
    targets = [stack.start_variant(suite.PROFILE, label, overrides) for label, overrides in twins]
    try:
        for target in targets:
            await read_every_customer(stack, target, user_ids)
        pids = (stack.pid_of(labels[0]), stack.pid_of(labels[1]))
        requests = [get_request(u) for u in user_ids]
        metadata = stack.key_metadata
        async with (
            open_channel(targets[0], PLAINTEXT) as channel_a,
            open_channel(targets[1], PLAINTEXT) as channel_b,
        ):
            gets = [
                c.unary_unary(GET_PROFILE, request_serializer=None, response_deserializer=None)
                for c in (channel_a, channel_b)
            ]

            def caller(get: Any) -> Callable[[int], Awaitable[None]]:
                async def get_one(i: int) -> None:
                    await get(requests[i % len(requests)], timeout=CALL_TIMEOUT_S, metadata=metadata)

                return get_one

            for get in gets:
                await first_answer(get, requests[0], user_ids[0], metadata)
            calls = [caller(get) for get in gets]
            for call in calls:
                await measure(call, concurrency=n, duration_s=0.5)  # connect, warm up
            say(
                f"GetProfile hit, {labels[0]} (A) and {labels[1]} (B) taking turns: 1 at a time,"
                f" then {n} concurrent"
            )
            one, start, _ = await alternate_with_cpu(
                calls, pids, meter, concurrency=1, duration_s=seconds, segment_s=SEGMENT_ONE_S
            )
            many, _, end = await alternate_with_cpu(
                calls,
                pids,
                meter,
                concurrency=n,
                duration_s=seconds,
                segment_s=SEGMENT_MANY_S,
                settle_s=SETTLE_MANY_S,
            )
        cpu[f"GetProfile hit, twins ({what})"] = CpuMeter.usage(start, end)
    finally:
        for label in labels:
            stack.stop_variant(label)
    for side in (*one, *many):
        _fail_on_errors(f"GetProfile hit, {what}", side.measured)
    say(
        f"   p50 {ms(one[0].measured.p50_s)} A, {ms(one[1].measured.p50_s)} B (1);"
        f" {ms(many[0].measured.p50_s)} A, {ms(many[1].measured.p50_s)} B ({n})"
    )
    return one, many


async def compare_metrics(
    stack: BenchStack, options: Options, user_ids: Sequence[str], meter: CpuMeter, cpu: dict[str, Any]
) -> TwinCost:
    """What Prometheus metrics cost a hit: a twin keeping them (as by default, A) beside one
    with no metrics port, which keeps none (B) (``compare_twins``)."""
    twins: list[tuple[str, Mapping[str, str]]] = [
        ("profile-metered", {}),
        ("profile-unmetered", {suite.PROFILE.metrics_address_variable: ""}),
    ]
    one, many = await compare_twins(stack, options, user_ids, meter, cpu, twins, "metrics")
    return TwinCost(one[0], one[1], many[0], many[1])


async def compare_rate_limits(
    stack: BenchStack, options: Options, user_ids: Sequence[str], meter: CpuMeter, cpu: dict[str, Any]
) -> RateLimitCost:
    """GetProfile hits on a twin with rate limits (as by default, A) and one without (B)
    (``compare_twins``); then a decision alone."""
    twins: list[tuple[str, Mapping[str, str]]] = [
        ("profile-limited", {}),
        ("profile-unlimited", {"RATE_LIMITS": "false"}),
    ]
    one, many = await compare_twins(stack, options, user_ids, meter, cpu, twins, "rate limits")
    n = options.concurrency
    say("rate-limit decisions alone, timed in this process against the bench's Redis")
    timed = await time_rate_limit_decisions(stack.redis_url, n)
    say(
        f"   call by call: p50 {timed['decision_1_p50_s'] * 1e6:.0f} us, CPU"
        f" {timed['decision_1_cpu_s'] * 1e6:.0f} us (1 at a time), {timed['decision_n_cpu_s'] * 1e6:.1f} us"
        f" ({n}); leased: {timed['leased_decision_n_cpu_s'] * 1e6:.1f} us CPU ({n}); per replica"
        f" {timed['local_decision_s'] * 1e6:.1f} us"
    )
    return RateLimitCost(one[0], one[1], many[0], many[1], timed)


async def measure_hits(
    target: str,
    metadata: tuple[tuple[str, str], ...],
    options: Options,
    user_ids: Sequence[str],
    meter: CpuMeter,
    cpu: dict[str, Any],
    name: str,
) -> tuple[Measured, Measured, int]:
    """GetProfile of customers whose profiles are cached, 1 at a time and concurrently; and the
    size of an answer."""
    n, seconds = options.concurrency, options.seconds
    requests = [get_request(u) for u in user_ids]
    async with open_channel(target, PLAINTEXT) as channel:
        get = channel.unary_unary(GET_PROFILE, request_serializer=None, response_deserializer=None)

        async def get_one(i: int) -> None:
            await get(requests[i % len(requests)], timeout=CALL_TIMEOUT_S, metadata=metadata)

        first = await first_answer(get, requests[0], user_ids[0], metadata)
        await measure(get_one, concurrency=n, duration_s=0.5)  # warm up
        say(f"{name}: 1 at a time, then {n} concurrent ({seconds:.0f}s each)")
        snap = meter.snapshot()
        hit_1 = await measure(get_one, concurrency=1, duration_s=seconds)
        hit_n = await measure(get_one, concurrency=n, duration_s=seconds)
        cpu[name] = CpuMeter.usage(snap, meter.snapshot())
    say(f"   p50 {ms(hit_1.p50_s)} (1), {ms(hit_n.p50_s)} ({n}); {fmt_rate(hit_n.rate)} calls/s")
    _fail_on_errors(name, hit_1)
    _fail_on_errors(name, hit_n)
    return hit_1, hit_n, first.ByteSize()


async def measure_warm_batches(
    target: str, metadata: tuple[tuple[str, str], ...], options: Options, user_ids: Sequence[str]
) -> Measured:
    """BatchGetProfiles of 100 cached customers, one call at a time, from the service as
    configured: the copies it keeps in process answer, as they answer its hits."""
    batch_requests = [
        batch_request(user_ids[i : i + BATCH]) for i in range(0, len(user_ids) - BATCH + 1, BATCH)
    ]
    async with open_channel(target, PLAINTEXT) as channel:
        batch_get = channel.unary_unary(
            BATCH_GET_PROFILES, request_serializer=None, response_deserializer=None
        )

        async def get_batch(i: int) -> None:
            await batch_get(
                batch_requests[i % len(batch_requests)], timeout=CALL_TIMEOUT_S, metadata=metadata
            )

        say(f"BatchGetProfiles of {BATCH}, warm, from the copies in process ({options.seconds:.0f}s)")
        await measure(get_batch, concurrency=1, duration_s=0.5)  # warm up
        warm = await measure(get_batch, concurrency=1, duration_s=options.seconds)
    say(f"   p50 {ms(warm.p50_s)}")
    _fail_on_errors("BatchGetProfiles", warm)
    return warm


async def first_answer(
    get: Any, request: bytes, user_id: str, metadata: tuple[tuple[str, str], ...]
) -> profile_pb2.GetProfileResponse:
    """One GetProfile, checked to answer the customer asked about."""
    first = profile_pb2.GetProfileResponse.FromString(
        await get(request, timeout=CALL_TIMEOUT_S, metadata=metadata)
    )
    if user_id not in {i.value for i in first.profile.identifiers}:
        raise BenchError("GetProfile answered another customer")
    return first


async def compare_hits(
    stack: BenchStack,
    targets: tuple[str, str],
    pids: tuple[int, int],
    options: Options,
    user_ids: Sequence[str],
    meter: CpuMeter,
    cpu: dict[str, Any],
) -> tuple[list[Side], list[Side], Auth]:
    """GetProfile hits on the plaintext twin (A) and on the TLS twin (B) of the profile service,
    with the same key, one at a time and then concurrently, each side ``2 x --seconds`` in all,
    in short segments taking turns (``measure_alternating``). Each connection is opened and
    warmed up first, so no handshake is timed. The sides at 1 and at n, and what authentication
    cost."""
    n, seconds = options.concurrency, options.seconds
    requests = [get_request(u) for u in user_ids]
    metadata = stack.key_metadata
    async with (
        open_channel(targets[0], PLAINTEXT) as plain,
        open_channel(targets[1], stack.tls.client) as secure,
    ):
        gets = [
            c.unary_unary(GET_PROFILE, request_serializer=None, response_deserializer=None)
            for c in (plain, secure)
        ]

        def caller(get: Any) -> Callable[[int], Awaitable[None]]:
            async def get_one(i: int) -> None:
                await get(requests[i % len(requests)], timeout=CALL_TIMEOUT_S, metadata=metadata)

            return get_one

        answers = [await first_answer(get, requests[0], user_ids[0], metadata) for get in gets]
        if answers[0].profile.identifiers != answers[1].profile.identifiers:
            raise BenchError("the TLS profile service answered another profile")
        calls = [caller(get) for get in gets]
        for call in calls:
            await measure(call, concurrency=n, duration_s=0.5)  # connect (TLS: the handshake), warm up
        transactions_before = await database_transactions(stack.database_url)
        say(
            f"GetProfile hit on the twins, plaintext (A) and TLS (B) taking turns (A B B A B A A B,"
            f" {SEGMENT_ONE_S}s segments, {2 * seconds:.0f}s each in all): 1 at a time"
        )
        one, start, _ = await alternate_with_cpu(
            calls, pids, meter, concurrency=1, duration_s=seconds, segment_s=SEGMENT_ONE_S
        )
        say(
            f"   p50 {ms(one[0].measured.p50_s)} plaintext, {ms(one[1].measured.p50_s)} TLS"
            f" (TLS / plaintext by half: {ratio_halves(*one)})"
        )
        say(f"   the same, {n} concurrent ({SEGMENT_MANY_S}s segments)")
        many, _, end = await alternate_with_cpu(
            calls,
            pids,
            meter,
            concurrency=n,
            duration_s=seconds,
            segment_s=SEGMENT_MANY_S,
            settle_s=SETTLE_MANY_S,
        )
        say(
            f"   p50 {ms(many[0].measured.p50_s)} plaintext, {ms(many[1].measured.p50_s)} TLS;"
            f" {fmt_rate(many[0].measured.rate)} / {fmt_rate(many[1].measured.rate)} calls/s"
        )
        await asyncio.sleep(1.5)  # let every backend report its transactions
        transactions = await database_transactions(stack.database_url) - transactions_before
    cpu["GetProfile hit, twins (plaintext, TLS)"] = CpuMeter.usage(start, end)
    for side in (*one, *many):
        _fail_on_errors("GetProfile hit", side.measured)
    calls_made = sum(side.measured.calls for side in (*one, *many))
    say("authentication: Authenticator.authenticate of the key, timed in this process")
    authenticate_s = await time_authentication(stack.database_url, stack.admin_key)
    say(
        f"   {authenticate_s * 1e6:.1f} us a call; {transactions:,} database transactions during the"
        f" {calls_made:,} GetProfile calls above (every process's)"
    )
    return one, many, Auth(authenticate_s, calls_made, transactions)


async def measure_reads(
    stack: BenchStack, options: Options, user_ids: Sequence[str], meter: CpuMeter, cpu: dict[str, Any]
) -> Reads:
    n, seconds = options.concurrency, options.seconds
    metadata = stack.key_metadata
    say("warm: read every customer again, so the profile service keeps copies in process")
    await read_every_customer(stack, stack.target(suite.PROFILE), user_ids)
    hit_1, hit_n, response_bytes = await measure_hits(
        stack.target(suite.PROFILE), metadata, options, user_ids, meter, cpu, "GetProfile hit"
    )
    batch_warm_near = await measure_warm_batches(stack.target(suite.PROFILE), metadata, options, user_ids)

    # TLS beside plaintext: two twins of the service, started together once everything is
    # merged (their mergers, on the same durable consumer, find nothing to do), alike but for
    # TLS. Not the service above: the process that merged the load differs from a fresh one by
    # a few per cent on its own (experiment F). The first read left full Redis entries, so one
    # read leaves each twin its copies in process.
    say("two more profile services, one in plaintext, one serving TLS (a CA made for this run)")
    twins = (
        stack.start_variant(suite.PROFILE, "profile-twin", {}),
        stack.start_variant(suite.PROFILE, "profile-tls", stack.tls.server_env),
    )
    await read_every_customer(stack, twins[0], user_ids)
    await read_every_customer(stack, twins[1], user_ids, stack.tls.client)
    pids = (stack.pid_of("profile-twin"), stack.pid_of("profile-tls"))
    one, many, auth = await compare_hits(stack, twins, pids, options, user_ids, meter, cpu)
    for label in ("profile-twin", "profile-tls"):
        stack.stop_variant(label)  # the measures below are as before: one variant, no TLS
    rate_limits = await compare_rate_limits(stack, options, user_ids, meter, cpu)
    metrics = await compare_metrics(stack, options, user_ids, meter, cpu)

    # Misses and batches delete Redis entries before calls; a service without copies in process
    # measures them without racing Redis's invalidation, and gives the hit that reads Redis.
    say("a second profile service with the near cache off (PROFILE_NEAR_CACHE_ENTRIES=0)")
    target = stack.start_variant(suite.PROFILE, "profile-no-near-cache", {"PROFILE_NEAR_CACHE_ENTRIES": "0"})
    redis_hit_1, redis_hit_n, _ = await measure_hits(
        target, metadata, options, user_ids, meter, cpu, "GetProfile hit, from Redis"
    )
    requests = [get_request(u) for u in user_ids]
    keys = [cache_key(IdentifierKind.USER_ID, u) for u in user_ids]
    groups = [list(user_ids[i : i + BATCH]) for i in range(0, len(user_ids) - BATCH + 1, BATCH)]
    batch_requests = [batch_request(g) for g in groups]
    batch_keys = [[cache_key(IdentifierKind.USER_ID, u) for u in g] for g in groups]
    client = redis.Redis.from_url(stack.redis_url)
    try:
        async with open_channel(target, PLAINTEXT) as channel:
            get = channel.unary_unary(GET_PROFILE, request_serializer=None, response_deserializer=None)
            batch_get = channel.unary_unary(
                BATCH_GET_PROFILES, request_serializer=None, response_deserializer=None
            )

            async def get_one(i: int) -> None:
                await get(requests[i % len(requests)], timeout=CALL_TIMEOUT_S, metadata=metadata)

            async def forget_one(i: int) -> None:
                await client.delete(keys[i % len(keys)])

            async def get_batch(i: int) -> None:
                await batch_get(
                    batch_requests[i % len(batch_requests)], timeout=CALL_TIMEOUT_S, metadata=metadata
                )

            async def forget_batch(i: int) -> None:
                await client.delete(*batch_keys[i % len(batch_keys)])

            say("GetProfile, cache miss (the key deleted before each call, untimed)")
            snap = meter.snapshot()
            miss_1 = await measure(get_one, concurrency=1, duration_s=seconds, prepare=forget_one)
            miss_n = await measure(get_one, concurrency=n, duration_s=seconds, prepare=forget_one)
            cpu["GetProfile miss"] = CpuMeter.usage(snap, meter.snapshot())
            say(f"   p50 {ms(miss_1.p50_s)} (1), {ms(miss_n.p50_s)} ({n})")
            say(f"BatchGetProfiles of {BATCH}: warm, then cold (its {BATCH} keys deleted before each call)")
            response = profile_pb2.BatchGetProfilesResponse.FromString(
                await batch_get(batch_requests[0], timeout=CALL_TIMEOUT_S, metadata=metadata)
            )
            if sum(r.found for r in response.results) != BATCH:
                raise BenchError("BatchGetProfiles did not find every customer")
            snap = meter.snapshot()
            warm = await measure(get_batch, concurrency=1, duration_s=seconds)
            cold = await measure(get_batch, concurrency=1, duration_s=seconds, prepare=forget_batch)
            cpu["BatchGetProfiles"] = CpuMeter.usage(snap, meter.snapshot())
            say(f"   p50 {ms(warm.p50_s)} warm, {ms(cold.p50_s)} cold")
    finally:
        await client.aclose()
    for name, measured in (
        ("GetProfile miss", miss_1),
        ("GetProfile miss", miss_n),
        ("BatchGetProfiles", warm),
        ("BatchGetProfiles", cold),
    ):
        _fail_on_errors(name, measured)
    return Reads(
        hit_1,
        hit_n,
        one[0],
        one[1],
        many[0],
        many[1],
        redis_hit_1,
        redis_hit_n,
        miss_1,
        miss_n,
        batch_warm_near,
        warm,
        cold,
        response_bytes,
        auth,
        rate_limits,
        metrics,
    )


# --- the bench ---------------------------------------------------------------------------------


@dataclass
class Options:
    customers: int
    concurrency: int
    seconds: float
    floor_seconds: float
    json_path: Path | None
    cprofile_dir: Path | None


async def run_bench(stack: BenchStack, options: Options) -> dict[str, Any]:
    meter = CpuMeter(stack.cpu_groups())
    cpu: dict[str, dict[str, float]] = {}
    rng = random.Random(11)
    base_ns = time.time_ns() - 3_600_000_000_000
    customers = [
        customer_events(stack.run_id, i, rng, base_ns, views=0, cart_items=2)
        for i in range(options.customers)
    ]
    events = sum(len(c) for c in customers)
    requests = batches_of(customers, SEND_BATCH)
    user_ids = [user_id_of(stack.run_id, i) for i in range(options.customers)]

    say(f"floor: one-INSERT PostgreSQL transactions, {MERGE_CONCURRENCY} concurrent")
    write = await measure_pg_write_txn(
        stack.database_url, MERGE_CONCURRENCY, options.floor_seconds, meter, cpu
    )
    say(f"   {fmt_rate(write.rate)} transactions/s, p50 {ms(write.p50_s)}")

    say(
        f"load: {options.customers:,} customers, {events:,} events in {len(requests)} SendEvents calls"
        f" ({SENDERS} at a time); then wait until merged"
    )
    snap = meter.snapshot()
    loaded = await load_customers(stack, requests, events, [MERGER], timeout_s=900)
    cpu["load + merge"] = CpuMeter.usage(snap, meter.snapshot())
    say(
        f"   acked in {loaded.ingest_s:.1f}s ({fmt_rate(loaded.acked_rate)} ev/s); all merged after"
        f" {loaded.merged_s:.1f}s ({fmt_rate(loaded.merged_rate)} ev/s)"
    )
    customer_ids = await check_merged(stack.database_url, events, options.customers)
    shuffled = user_ids[:]
    random.Random(5).shuffle(shuffled)
    say("warm: read every customer once (BatchGetProfiles), as sends would")
    await read_every_customer(stack, stack.target(suite.PROFILE), user_ids)

    floors = await measure_read_floors(stack, options, shuffled, customer_ids, meter, cpu)
    reads = await measure_reads(stack, options, shuffled, meter, cpu)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "source": source_info(),
        "options": {
            "customers": options.customers,
            "events": events,
            "events_per_customer": events / options.customers,
            "concurrency": options.concurrency,
            "seconds_per_measure": options.seconds,
            "floor_seconds": options.floor_seconds,
            "cprofile": options.cprofile_dir is not None,
        },
        "floors": {**floors.as_json(), "pg_write_txn": write.as_json()},
        "merge": {
            "events": events,
            "ingest_s": loaded.ingest_s,
            "acked_events_per_s": loaded.acked_rate,
            "pending_at_ingest_end": loaded.pending_at_ingest_end[MERGER],
            "all_merged_after_s": loaded.merged_s,
            "merged_events_per_s": loaded.merged_rate,
        },
        "reads": reads.as_json(),
        "goals": {
            "hit_p50_vs_empty_plus_redis": {
                "value": reads.hit_1.p50_s / (floors.empty_1.p50_s + floors.redis_get_1.p50_s),
                "goal": GOAL_HIT_VS_FLOOR,
            },
            "tls_hit_p50_vs_plaintext": {  # the same run, taking turns
                "value": reads.tls_hit_1.measured.p50_s / reads.twin_hit_1.measured.p50_s,
                "goal": GOAL_TLS_VS_PLAINTEXT,
            },
            "tls_hit_p99_vs_plaintext": {  # informational
                "value": reads.tls_hit_1.measured.p99_s / reads.twin_hit_1.measured.p99_s,
            },
            "redis_hit_p50_vs_empty_plus_redis": {  # the near cache off
                "value": reads.redis_hit_1.p50_s / (floors.empty_1.p50_s + floors.redis_get_1.p50_s),
                "goal": GOAL_HIT_VS_FLOOR,
            },
            "metered_hit_p50_vs_unmetered": {  # the same run, taking turns
                "value": reads.metrics.with_1.measured.p50_s / reads.metrics.without_1.measured.p50_s,
                "goal": GOAL_METRICS_COST,
            },
        },
        "cpu_percent_of_one_core": cpu,
    }


def report(results: Mapping[str, Any]) -> str:
    floors, reads, merge = results["floors"], results["reads"], results["merge"]
    n = results["options"]["concurrency"]
    e1, en = floors["empty_unary_1"], floors["empty_unary_n"]
    r1, rn = floors["redis_get_1"], floors["redis_get_n"]
    p1, pn = floors["pg_pk_read_1"], floors["pg_pk_read_n"]
    mget, pg100, write = floors["redis_mget_100"], floors["pg_pk_read_100"], floors["pg_write_txn"]
    hit1, hitn = reads["get_profile_hit_1"], reads["get_profile_hit_n"]
    twin1, tls1 = reads["get_profile_hit_twin_1"], reads["get_profile_hit_tls_1"]
    twinn, tlsn, auth = reads["get_profile_hit_twin_n"], reads["get_profile_hit_tls_n"], reads["auth"]
    limits = reads["rate_limits"]
    limited1, unlimited1 = limits["get_profile_hit_limited_1"], limits["get_profile_hit_unlimited_1"]
    limitedn, unlimitedn = limits["get_profile_hit_limited_n"], limits["get_profile_hit_unlimited_n"]
    metered = reads["metrics"]
    metered1, unmetered1 = metered["get_profile_hit_with_1"], metered["get_profile_hit_without_1"]
    meteredn, unmeteredn = metered["get_profile_hit_with_n"], metered["get_profile_hit_without_n"]
    redis1, redisn = reads["get_profile_redis_hit_1"], reads["get_profile_redis_hit_n"]
    miss1, missn = reads["get_profile_miss_1"], reads["get_profile_miss_n"]
    warm, cold = reads["batch_get_100_warm"], reads["batch_get_100_cold"]
    warm_near = reads["batch_get_100_warm_near"]

    def both(p50: float, p99: float) -> str:
        return f"{ms(p50)} / {ms(p99)}"

    def floor_sum(label: str, *parts: tuple[str, float]) -> tuple[str, float]:
        total = sum(v for _, v in parts)
        return f"{label} {' + '.join(f'{name} {ms(v)}' for name, v in parts)} = {ms(total)}", total

    hit_floor, hit_floor_s = floor_sum("", ("empty call", e1["p50_s"]), ("Redis GET", r1["p50_s"]))
    hit_ratio = hit1["p50_s"] / hit_floor_s
    tls_ratio = tls1["p50_s"] / twin1["p50_s"]
    hit99_floor, hit99_s = floor_sum("", ("empty", e1["p99_s"]), ("GET", r1["p99_s"]))
    hitn_floor, hitn_s = floor_sum("", ("empty", en["p50_s"]), ("GET", rn["p50_s"]))
    miss_floor, miss_s = floor_sum("", ("empty", e1["p50_s"]), ("GET", r1["p50_s"]), ("PG read", p1["p50_s"]))
    missn_floor, missn_s = floor_sum("", ("empty", en["p50_s"]), ("GET", rn["p50_s"]), ("PG", pn["p50_s"]))
    warm_floor, warm_s = floor_sum("", ("empty", e1["p50_s"]), ("MGET 100", mget["p50_s"]))
    cold_floor, cold_s = floor_sum(
        "", ("empty", e1["p50_s"]), ("MGET 100", mget["p50_s"]), ("PG 100 rows", pg100["p50_s"])
    )
    rows = [
        Row(
            "GetProfile hit p50 (1 at a time)",
            ms(hit1["p50_s"]),
            hit_floor.strip(),
            f"{hit_ratio:.2f} x",
            f"<= {GOAL_HIT_VS_FLOOR} x",
            verdict(hit_ratio <= GOAL_HIT_VS_FLOOR),
        ),
        Row(
            "  hit p99 (1 at a time)",
            ms(hit1["p99_s"]),
            hit99_floor.strip(),
            fmt_ratio(hit1["p99_s"], hit99_s),
        ),
        Row(
            "GetProfile hit p50 over TLS (1 at a time)",
            ms(tls1["p50_s"]),
            f"plaintext twin p50 {ms(twin1['p50_s'])} (taking turns)",
            f"{tls_ratio:.2f} x",
            f"<= {GOAL_TLS_VS_PLAINTEXT:.2f} x",
            verdict(tls_ratio <= GOAL_TLS_VS_PLAINTEXT),
        ),
        Row(
            "  TLS hit p99 (1 at a time)",
            ms(tls1["p99_s"]),
            f"plaintext twin p99 {ms(twin1['p99_s'])}",
            fmt_ratio(tls1["p99_s"], twin1["p99_s"]),
        ),
        Row(
            f"  TLS hit p50 / p99 ({n} concurrent)",
            both(tlsn["p50_s"], tlsn["p99_s"]),
            f"plaintext twin {both(twinn['p50_s'], twinn['p99_s'])}",
            fmt_ratio(tlsn["p50_s"], twinn["p50_s"]),
        ),
        Row(
            f"  TLS hit calls/s ({n} concurrent)",
            fmt_rate(tlsn["per_s"]),
            f"plaintext twin {fmt_rate(twinn['per_s'])}",
            fmt_ratio(tlsn["per_s"], twinn["per_s"]),
        ),
        Row(
            "GetProfile hit p50 with rate limits (1 at a time)",
            ms(limited1["p50_s"]),
            f"twin without p50 {ms(unlimited1['p50_s'])} (taking turns)",
            fmt_ratio(limited1["p50_s"], unlimited1["p50_s"]),
        ),
        Row(
            f"  with rate limits: p50 / p99; calls/s ({n} concurrent)",
            f"{both(limitedn['p50_s'], limitedn['p99_s'])}; {fmt_rate(limitedn['per_s'])}",
            f"twin without {both(unlimitedn['p50_s'], unlimitedn['p99_s'])}; {fmt_rate(unlimitedn['per_s'])}",
            fmt_ratio(limitedn["p50_s"], unlimitedn["p50_s"]),
        ),
        Row(
            "GetProfile hit p50 with metrics (1 at a time)",
            ms(metered1["p50_s"]),
            f"twin without p50 {ms(unmetered1['p50_s'])} (taking turns)",
            f"{metered1['p50_s'] / unmetered1['p50_s']:.2f} x",
            f"<= {GOAL_METRICS_COST:.2f} x",
            verdict(metered1["p50_s"] / unmetered1["p50_s"] <= GOAL_METRICS_COST),
        ),
        Row(
            "  with metrics: server CPU per hit (1 at a time)",
            f"{metered1['server_cpu_per_call_s'] * 1e6:.0f} us",
            f"twin without {unmetered1['server_cpu_per_call_s'] * 1e6:.0f} us",
            fmt_ratio(metered1["server_cpu_per_call_s"], unmetered1["server_cpu_per_call_s"]),
        ),
        Row(
            f"  with metrics: p50 / p99; calls/s ({n} concurrent)",
            f"{both(meteredn['p50_s'], meteredn['p99_s'])}; {fmt_rate(meteredn['per_s'])}",
            f"twin without {both(unmeteredn['p50_s'], unmeteredn['p99_s'])}; {fmt_rate(unmeteredn['per_s'])}",
            fmt_ratio(meteredn["per_s"], unmeteredn["per_s"]),
        ),
        Row(
            "  hit from Redis, near cache off: p50 (1)",
            ms(redis1["p50_s"]),
            hit_floor.strip(),
            fmt_ratio(redis1["p50_s"], hit_floor_s),
            f"<= {GOAL_HIT_VS_FLOOR} x",
            verdict(redis1["p50_s"] / hit_floor_s <= GOAL_HIT_VS_FLOOR),
        ),
        Row(
            f"  hit from Redis, near cache off: p50 / p99 ({n})",
            both(redisn["p50_s"], redisn["p99_s"]),
            hitn_floor.strip(),
            fmt_ratio(redisn["p50_s"], hitn_s),
        ),
        Row(
            "  hit calls/s (1 at a time)",
            fmt_rate(hit1["per_s"]),
            f"empty calls/s {fmt_rate(e1['per_s'])}",
            fmt_ratio(hit1["per_s"], e1["per_s"]),
        ),
        Row(
            f"GetProfile hit p50 / p99 ({n} concurrent)",
            both(hitn["p50_s"], hitn["p99_s"]),
            hitn_floor.strip(),
            fmt_ratio(hitn["p50_s"], hitn_s),
        ),
        Row(
            f"  hit calls/s ({n} concurrent)",
            fmt_rate(hitn["per_s"]),
            f"empty calls/s {fmt_rate(en['per_s'])}; Redis GETs/s {fmt_rate(rn['per_s'])}",
            fmt_ratio(hitn["per_s"], en["per_s"]),
        ),
        Row(
            "GetProfile miss p50 / p99 (1 at a time)",
            both(miss1["p50_s"], miss1["p99_s"]),
            miss_floor.strip(),
            fmt_ratio(miss1["p50_s"], miss_s),
        ),
        Row(
            f"GetProfile miss p50 / p99 ({n} concurrent)",
            both(missn["p50_s"], missn["p99_s"]),
            missn_floor.strip(),
            fmt_ratio(missn["p50_s"], missn_s),
        ),
        Row(
            f"BatchGetProfiles({BATCH}) warm p50",
            ms(warm_near["p50_s"]),
            warm_floor.strip(),
            f"{warm_near['p50_s'] / warm_s:.2f} x",
            f"<= {GOAL_BATCH_VS_FLOOR} x",
            verdict(warm_near["p50_s"] / warm_s <= GOAL_BATCH_VS_FLOOR),
        ),
        Row(
            "  p99; profiles/s (1 batch at a time)",
            f"{ms(warm_near['p99_s'])}; {fmt_rate(warm_near['per_s'] * BATCH)}",
            f"MGET 100: {fmt_rate(mget['per_s'] * BATCH)} keys/s",
            fmt_ratio(warm_near["per_s"], mget["per_s"]),
        ),
        Row(
            "  from Redis, near cache off: p50 / p99",
            both(warm["p50_s"], warm["p99_s"]),
            warm_floor.strip(),
            fmt_ratio(warm["p50_s"], warm_s),
        ),
        Row(
            f"BatchGetProfiles({BATCH}) cold p50 / p99",
            both(cold["p50_s"], cold["p99_s"]),
            cold_floor.strip(),
            fmt_ratio(cold["p50_s"], cold_s),
        ),
        Row(
            "merge (load start -> all merged)",
            f"{fmt_rate(merge['merged_events_per_s'])} ev/s",
            f"raw PG 1-INSERT txns ({write['concurrency']} concurrent) {fmt_rate(write['per_s'])}/s",
            fmt_ratio(merge["merged_events_per_s"], write["per_s"]),
        ),
        Row(
            "  ingest acked (SendEvents x 500)",
            f"{fmt_rate(merge['acked_events_per_s'])} ev/s",
            f"{merge['pending_at_ingest_end']:,} unmerged when ingest finished",
        ),
    ]
    machine, options = results["machine"], results["options"]
    lines = [
        "",
        f"Sendtime bench-profile, {results['date']}: {machine['cores']} cores ({machine['cpu_model']}),"
        f" load average {machine['load_average_1m_before']} before the run",
        f"{options['customers']:,} customers ({options['events']:,} events) merged in"
        f" {merge['all_merged_after_s']:.1f}s; cache entry {floors['cache_entry_bytes']:,} B,"
        f" GetProfile answer {reads['get_profile_response_bytes']:,} B; {options['seconds_per_measure']:.0f}s"
        f" per measure, {options['floor_seconds']:.0f}s per floor",
    ]
    lines += report_warnings(results, options["cprofile"])
    halves = " / ".join(
        f"{tls_half / plain_half:.2f}"
        for plain_half, tls_half in zip(twin1["half_p50_s"], tls1["half_p50_s"], strict=True)
    )

    def us(seconds: float) -> str:
        return f"{seconds * 1e6:.0f}"

    lines += [
        "",
        render_table(rows),
        "",
        f"GetProfile hit on the twins, plaintext and TLS taking turns in {twin1['segments']} segments each:"
        f" TLS p50 / plaintext p50 in the first / second half {halves}; server CPU per call, plaintext /"
        f" TLS: {us(twin1['server_cpu_per_call_s'])} / {us(tls1['server_cpu_per_call_s'])} us (1 at a"
        f" time), {us(twinn['server_cpu_per_call_s'])} / {us(tlsn['server_cpu_per_call_s'])} us ({n}"
        " concurrent)",
        f"Rate limits: server CPU per hit with / without: {us(limited1['server_cpu_per_call_s'])} /"
        f" {us(unlimited1['server_cpu_per_call_s'])} us (1 at a time),"
        f" {us(limitedn['server_cpu_per_call_s'])} / {us(unlimitedn['server_cpu_per_call_s'])} us"
        f" ({n} concurrent). Decisions in process: call by call in Redis p50"
        f" {us(limits['decision_1_p50_s'])} us and {us(limits['decision_1_cpu_s'])} us CPU one at a time,"
        f" {limits['decision_n_cpu_s'] * 1e6:.1f} us CPU at {n}; leased (a busy bucket)"
        f" {limits['leased_decision_n_cpu_s'] * 1e6:.1f} us CPU at {n}; per replica"
        f" {limits['local_decision_s'] * 1e6:.1f} us.",
        f"Authentication: the hit p50, key checked, is {hit_ratio:.2f} x (empty call + Redis GET); the empty"
        " server has no interceptor at all.",
        f"  Authenticator.authenticate of a known key: {auth['authenticate_s'] * 1e6:.1f} us in process;"
        f" {auth['database_transactions_during_hit_measures']:,} database transactions (every process)"
        f" during the {auth['calls_during_hit_measures']:,} GetProfile calls of the hit measures.",
        "",
        f"CPU, % of one core ({machine['cores']} cores:"
        f" {100 * (machine['cores'] or 1)}% is the whole machine):",
        render_cpu(results["cpu_percent_of_one_core"]),
        "",
        "Goals are reported, not enforced: the exit code is 0 unless the bench itself failed.",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="bench_profile.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--customers", type=int, default=5000, help="customers loaded, 3 events each (default 5000)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=16, help="concurrent calls in the concurrent measures (default 16)"
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per measure (default 3)")
    parser.add_argument("--floor-seconds", type=float, default=2.0, help="seconds per floor (default 2)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.customers < 2 * BATCH or args.concurrency < 1 or min(args.seconds, args.floor_seconds) <= 0:
        parser.error(f"--customers must be at least {2 * BATCH}; --concurrency and the seconds positive")
    return Options(
        customers=args.customers,
        concurrency=args.concurrency,
        seconds=args.seconds,
        floor_seconds=args.floor_seconds,
        json_path=args.json,
        cprofile_dir=args.cprofile,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    return run_bench_main(
        "bench-profile",
        [suite.PROFILE, suite.INGEST],
        cprofile_dir=options.cprofile_dir,
        json_path=options.json_path,
        measure=lambda stack: asyncio.run(run_bench(stack, options)),
        report=report,
    )


if __name__ == "__main__":
    sys.exit(main())
