"""``make bench-ingest``: how fast ingest acknowledges events, how fast profile merges them, and
how fresh profiles stay under that load, next to floors measured in the same run.

The bench starts a private stack (bench_common.BenchStack: NATS with ``sync_interval: always``,
Redis, a fresh database, ingest and profile as their own processes), then:

1. floors: a raw pipelined JetStream publish rate from nats-py (a stream configured like
   ingest's, the same payloads and headers, ``--in-flight`` publishes awaited per window), an
   empty grpc.aio unary call and an empty message on grpc.aio streams (same streams and window
   as the load);
2. full speed: ``--events`` events over ``--streams`` concurrent ``IngestService/StreamEvents``
   calls, each keeping ``--in-flight`` events unanswered; spread over ``--customers`` customers,
   mixed product_viewed / cart_item_added / identify. This is ingest's ceiling, held against the
   raw JetStream floor. Meanwhile a sampler sends marker events (identify, ``bench_marker=<n>``,
   ``occurred_at`` now) with SendEvents and reads the marker customers' profiles
   (BatchGetProfiles, GetProfile's reader) until each marker shows: freshness is occurred ->
   visible. Then it waits until the ``profile-merger`` consumer has nothing pending;
3. full speed in batches: ``--batch-events`` events in ``IngestService/SendEvents`` calls of
   ``--batch-size``, ``--streams`` senders each with one call at a time (as a bulk producer or
   a webhook relay sends), held against the goal of 20,000 acked events/s; the sampler and
   the drain as above;
4. at the goal load: as many events again as at full speed, offered at the rate the goal
   names (half the raw JetStream floor; ``--rate`` sets another), with the same sampler and
   drain. The merge goal and the freshness goal are read here: at full speed on one 2-core
   machine, ingest and the load generator take the CPU the merger needs, which says nothing
   about either alone;
5. checks that every accepted event is in PostgreSQL.

It prints a table of each measure against its floor and goal, and the CPU each process used in
each phase. A missed goal is reported, not an error: the exit code is 0 unless the bench broke.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import nats
from bench_common import (
    BenchError,
    BenchStack,
    CallFloor,
    CpuMeter,
    Row,
    StreamFloor,
    add_output_arguments,
    fmt_ms,
    fmt_rate,
    machine_info,
    measure_empty_stream,
    measure_empty_unary,
    percentile,
    render_cpu,
    render_table,
    report_warnings,
    run_bench_main,
    say,
    source_info,
    timestamp_from_ns,
    verdict,
)
from google.protobuf import field_mask_pb2, struct_pb2
from google.type import money_pb2
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

import suite
from ingest.settings import Settings as IngestSettings
from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime_common.event_log import MSG_ID_HEADER, JetStreamSettings

STREAM_EVENTS = "/sendtime.ingest.v1.IngestService/StreamEvents"
SEND_EVENTS = "/sendtime.ingest.v1.IngestService/SendEvents"
MAX_BATCH_SIZE = IngestSettings().max_batch_size  # the bench runs ingest with its defaults
CONSUMER = "profile-merger"
RAW_STREAM = "BENCH_RAW"
ACCEPTED = ingest_pb2.EVENT_OUTCOME_ACCEPTED
# A W3C traceparent as ingest writes into every message (same header bytes in the raw floor).
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
MARKER_CUSTOMERS = 20
POLL_INTERVAL_S = 0.02
MARKER_TIMEOUT_S = 120.0
WARMUP_EVENTS = 1000
PACE_TICK_S = 0.005
# A drain shorter than this has no CPU figures worth printing.
MIN_PHASE_S = 0.5
# No merge for this long while events are pending means the merger is stuck or dead.
MERGER_STALL_S = 60.0


GOAL_ACKED_VS_RAW = 0.5
GOAL_SEND_EVENTS_ACKED_PER_S = 20_000  # issue 21's, as it states it: an absolute rate
GOAL_MERGED_VS_ACKED = 0.95
GOAL_FRESHNESS_P99_S = 1.0


# --- the events --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Load:
    """Pre-serialized requests per stream (so the load generator spends little CPU while
    measuring): a StreamEventsRequest per event, or with ``batch_size`` a SendEventsRequest per
    that many events; and the event payloads for the raw JetStream floor."""

    per_stream: list[list[bytes]]
    ids_per_stream: list[list[str]]
    raw_payloads: list[bytes]
    types: Counter[str]
    mean_event_bytes: float
    end_ns: int  # after the last event's occurred_at
    tag: str
    batch_size: int | None = None

    @property
    def total(self) -> int:
        return sum(len(ids) for ids in self.ids_per_stream)


def make_load(
    run_id: str,
    tag: str,
    events: int,
    customers: int,
    streams: int,
    seed: int = 7,
    start_ns: int | None = None,
    batch_size: int | None = None,
) -> Load:
    """``events`` events: 50% product_viewed, 30% cart_item_added, 20% identify (with an email,
    so that stitching has work), each for a random one of ``customers``. A customer's events all
    go through one stream, in occurred_at order, as a partitioned producer would send them
    (with ``batch_size``, in SendEvents calls of that many). They occur 1 µs apart from
    ``start_ns`` (default: a second ago)."""
    rng = random.Random(seed)
    base_ns = time.time_ns() - 1_000_000_000 if start_ns is None else start_ns
    events_per_stream: list[list[ingest_pb2.Event]] = [[] for _ in range(streams)]
    ids: list[list[str]] = [[] for _ in range(streams)]
    raw: list[bytes] = []
    types: Counter[str] = Counter()
    total_bytes = 0
    for i in range(events):
        customer = rng.randrange(customers)
        user_id = f"bench-{run_id}-u{customer}"
        event = ingest_pb2.Event(
            event_id=f"bench-{run_id}-{tag}-{i}",
            occurred_at=timestamp_from_ns(base_ns + i * 1000),
            customer=ingest_pb2.CustomerIdentifiers(user_id=user_id),
        )
        sku = f"SKU-{rng.randrange(200):03d}"
        price = money_pb2.Money(currency_code="EUR", units=rng.randrange(5, 200), nanos=990_000_000)
        roll = rng.random()
        if roll < 0.5:
            event.source = ingest_pb2.EVENT_SOURCE_WEB
            event.product_viewed.CopyFrom(
                ingest_pb2.ProductViewed(
                    sku=sku,
                    name=f"Product {sku}",
                    price=price,
                    category="shoes/running",
                    url=f"https://shop.example.com/p/{sku}",
                )
            )
        elif roll < 0.8:
            event.source = ingest_pb2.EVENT_SOURCE_WEB
            event.cart_item_added.CopyFrom(
                ingest_pb2.CartItemAdded(sku=sku, name=f"Product {sku}", quantity=1, unit_price=price)
            )
        else:
            event.source = ingest_pb2.EVENT_SOURCE_CRM
            event.customer.email = f"{user_id}@example.com"
            traits = struct_pb2.Struct()
            traits.update({"first_name": f"Name{customer}", "plan": rng.choice(["free", "pro"]), "visits": i})
            event.identify.traits.CopyFrom(traits)
        types[str(event.WhichOneof("payload"))] += 1
        events_per_stream[customer % streams].append(event)
        ids[customer % streams].append(event.event_id)
        # What ingest publishes: the event as received, stamped with received_at.
        stamped = ingest_pb2.Event()
        stamped.CopyFrom(event)
        stamped.received_at.CopyFrom(timestamp_from_ns(time.time_ns()))
        payload = stamped.SerializeToString(deterministic=True)
        raw.append(payload)
        total_bytes += len(payload)
    per_stream = [_requests(stream_events, batch_size) for stream_events in events_per_stream]
    mean_bytes = total_bytes / max(1, events)
    return Load(per_stream, ids, raw, types, mean_bytes, base_ns + events * 1000, tag, batch_size)


def _requests(events: Sequence[ingest_pb2.Event], batch_size: int | None) -> list[bytes]:
    """A StreamEventsRequest per event, or a SendEventsRequest per ``batch_size`` events."""
    if batch_size is None:
        return [ingest_pb2.StreamEventsRequest(event=e).SerializeToString() for e in events]
    return [
        ingest_pb2.SendEventsRequest(events=events[i : i + batch_size]).SerializeToString()
        for i in range(0, len(events), batch_size)
    ]


# --- floors ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RawFloor:
    window: int
    messages: int
    seconds: float
    duplicates: int

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


async def measure_raw_jetstream(
    stack_env: Mapping[str, str], payloads: Sequence[bytes], window: int, duration_s: float
) -> RawFloor:
    """Publish ``payloads`` (cycled) to a stream configured like ingest's (file storage, Msg-Id,
    same duplicate window, discard new) in windows of ``window`` concurrent publishes, each
    window awaited before the next, for ``duration_s``. The stream is deleted afterwards."""
    settings = JetStreamSettings.from_env(stack_env)
    client = await nats.connect(settings.servers, name="sendtime-bench")
    try:
        js = client.jetstream(timeout=settings.publish_timeout_s)
        await js.add_stream(
            StreamConfig(
                name=RAW_STREAM,
                subjects=["bench.raw.>"],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                num_replicas=settings.replicas,  # as ingest's stream, on a cluster too
                duplicate_window=settings.duplicate_window_s,
                max_age=settings.max_age_s,
                max_bytes=settings.max_bytes,
                discard=DiscardPolicy.NEW,
            )
        )
        sent = duplicates = 0

        async def window_of(start: int) -> None:
            nonlocal duplicates
            acks = await asyncio.gather(
                *(
                    js.publish(
                        "bench.raw.product_viewed",
                        payloads[(start + k) % len(payloads)],
                        headers={"traceparent": TRACEPARENT, MSG_ID_HEADER: f"raw-{start + k}"},
                        stream=RAW_STREAM,
                    )
                    for k in range(window)
                )
            )
            duplicates += sum(1 for ack in acks if ack.duplicate)

        await window_of(-window)  # warm up (ids never reused below)
        started = time.perf_counter()
        while time.perf_counter() - started < duration_s:
            await window_of(sent)
            sent += window
        seconds = time.perf_counter() - started
        await js.delete_stream(RAW_STREAM)
    finally:
        await client.close()
    return RawFloor(window=window, messages=sent, seconds=seconds, duplicates=duplicates)


# --- the load ----------------------------------------------------------------------------------


@dataclass
class StreamResult:
    outcomes: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    first_problem: str = ""

    def count(self, event_result: ingest_pb2.EventResult) -> None:
        """One event's outcome; the first one not ACCEPTED is kept as the problem to report."""
        self.outcomes[event_result.outcome] += 1
        if event_result.outcome != ACCEPTED and not self.first_problem:
            name = ingest_pb2.EventOutcome.Name(event_result.outcome)
            self.first_problem = f"{name}: {event_result.status.message}"


async def drive_stream(
    channel: grpc.aio.Channel,
    requests: Sequence[bytes],
    ids: Sequence[str],
    window: int,
    rate: float | None,
    metadata: tuple[tuple[str, str], ...],
) -> StreamResult:
    """One StreamEvents call with ``metadata`` (the API key): write ``requests`` keeping
    ``window`` unanswered (and, given a ``rate``, no faster than that many per second); count
    outcomes and time each event from write to result."""
    method = channel.stream_stream(STREAM_EVENTS, request_serializer=None, response_deserializer=None)
    call = method(None, metadata=metadata)  # no request iterator: the writer task below writes
    slots = asyncio.Semaphore(window)
    sent_at: dict[str, float] = {}
    result = StreamResult()

    async def write() -> None:
        started = time.perf_counter()
        for index, (request, event_id) in enumerate(zip(requests, ids, strict=True)):
            # Paced: sleep once the writes are a tick ahead of the schedule, not before each
            # write, so that the load generator's own timers do not take CPU from the services.
            if rate is not None and (ahead := started + index / rate - time.perf_counter()) > PACE_TICK_S:
                await asyncio.sleep(ahead)
            await slots.acquire()
            sent_at[event_id] = time.perf_counter()
            await call.write(request)
        await call.done_writing()

    writer = asyncio.create_task(write())
    try:
        async for raw in call:
            now = time.perf_counter()
            slots.release()
            event_result = ingest_pb2.StreamEventsResponse.FromString(raw).result
            result.count(event_result)
            started = sent_at.pop(event_result.event_id, None)
            if started is not None:
                result.latencies.append(now - started)
        await writer
    finally:
        writer.cancel()
    return result


@dataclass
class Freshness:
    """Marker samples: occurred -> acked by ingest, occurred -> visible in GetProfile."""

    acked_s: list[float] = field(default_factory=list)
    visible_s: list[float] = field(default_factory=list)
    not_visible: int = 0
    not_accepted: int = 0


class Sampler:
    """Sends a marker every ``interval_s`` while the load runs (each SendEvents call on its own,
    so a slow one does not delay the next) and, every ``POLL_INTERVAL_S``, reads the profiles of
    the marker customers that have markers not yet seen. It reads them with one
    BatchGetProfiles call (the same reader as GetProfile: Redis, then PostgreSQL for misses),
    so that the probe adds at most ~1/POLL_INTERVAL_S reads per second to the profile service
    instead of one read per marker per poll."""

    def __init__(self, run_id: str, ingest: grpc.aio.Channel, profile: grpc.aio.Channel) -> None:
        self._run_id = run_id
        self._ingest = ingest_pb2_grpc.IngestServiceStub(ingest)
        self._profiles = profile_pb2_grpc.ProfileServiceStub(profile)
        self.results = Freshness()
        self._unseen: dict[str, list[tuple[int, float]]] = {}  # user id -> (marker, occurred)
        self._sending = True

    async def run(self, stop: asyncio.Event, interval_s: float, limit: int) -> None:
        poller = asyncio.create_task(self._poll())
        sends: set[asyncio.Task[None]] = set()
        try:
            n = 0
            while not stop.is_set() and n < limit:
                task = asyncio.create_task(self._send(n))
                sends.add(task)
                task.add_done_callback(sends.discard)
                n += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval_s)
            if sends:
                await asyncio.gather(*sends)
            self._sending = False
            await poller
        finally:
            poller.cancel()
            for task in sends:
                task.cancel()

    async def _send(self, n: int) -> None:
        user_id = f"bench-{self._run_id}-marker{n % MARKER_CUSTOMERS}"
        occurred = time.time()
        traits = struct_pb2.Struct()
        traits.update({"bench_marker": n})
        event = ingest_pb2.Event(
            event_id=f"bench-{self._run_id}-marker-{n}",
            customer=ingest_pb2.CustomerIdentifiers(user_id=user_id),
            occurred_at=timestamp_from_ns(int(occurred * 1e9)),
            source=ingest_pb2.EVENT_SOURCE_SERVER,
            identify=ingest_pb2.Identify(traits=traits),
        )
        response = await self._ingest.SendEvents(ingest_pb2.SendEventsRequest(events=[event]), timeout=30)
        if response.results[0].outcome != ACCEPTED:
            self.results.not_accepted += 1
            return
        self.results.acked_s.append(time.time() - occurred)
        self._unseen.setdefault(user_id, []).append((n, occurred))

    async def _poll(self) -> None:
        while self._sending or self._unseen:
            if self._unseen:
                users = list(self._unseen)
                response = await self._profiles.BatchGetProfiles(
                    profile_pb2.BatchGetProfilesRequest(
                        identifiers=[
                            profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_USER_ID, value=u)
                            for u in users
                        ],
                        read_mask=field_mask_pb2.FieldMask(paths=["traits"]),
                    ),
                    timeout=10,
                )
                now = time.time()
                for user_id, result in zip(users, response.results, strict=True):
                    traits = result.profile.traits
                    seen = traits["bench_marker"] if result.found and "bench_marker" in traits else None
                    waiting = []
                    for n, occurred in self._unseen[user_id]:
                        # Markers of one customer only grow, so a later one showing means this
                        # one's occurred_at is covered too.
                        if isinstance(seen, float) and seen >= n:
                            self.results.visible_s.append(now - occurred)
                        elif now - occurred > MARKER_TIMEOUT_S:
                            self.results.not_visible += 1
                        else:
                            waiting.append((n, occurred))
                    if waiting:
                        self._unseen[user_id] = waiting
                    else:
                        del self._unseen[user_id]
            await asyncio.sleep(POLL_INTERVAL_S)


@dataclass(frozen=True, slots=True)
class ConsumerPoint:
    at: float  # seconds since the load started
    acked: int  # stream sequence of the consumer's ack floor
    pending: int  # not yet delivered + delivered, not acked


async def consumer_point(js: Any, started: float) -> ConsumerPoint:
    info = await js.consumer_info(JetStreamSettings().stream, CONSUMER)
    return ConsumerPoint(
        at=time.perf_counter() - started,
        acked=int(info.ack_floor.stream_seq),
        pending=int(info.num_pending) + int(info.num_ack_pending),
    )


async def wait_merged(js: Any, started: float, stall_s: float) -> ConsumerPoint:
    """Poll the merger's consumer until nothing is pending. The ack floor is what was merged:
    the merger acks an event only after its transaction committed and Redis was refreshed.

    Raises:
        BenchError: nothing was merged for ``stall_s`` while events were pending.
    """
    point = await consumer_point(js, started)
    progress_at, fewest_pending = point.at, point.pending
    while point.pending:
        await asyncio.sleep(0.05)
        point = await consumer_point(js, started)
        if point.pending < fewest_pending:  # some event was acked, in order or not
            progress_at, fewest_pending = point.at, point.pending
        elif point.at - progress_at > stall_s:
            raise BenchError(
                f"the merger stopped: {point.pending:,} events pending and none merged for {stall_s:.0f}s"
                " (the profile service's log, below, says why once it has been stopped)"
            )
    return point


async def send_all(
    target: str,
    load: Load,
    window: int,
    metadata: tuple[tuple[str, str], ...],
    rate: float | None = None,
) -> tuple[list[StreamResult], float]:
    """Run one StreamEvents call per stream of ``load``, each on its own channel (own HTTP/2
    connection, as separate producers would have), together at most ``rate`` events per second
    when given, each call presenting the key in ``metadata`` (per call, not through a client
    interceptor, whose per-message queue would weigh on the load generator); their results and
    the seconds until the last answer."""
    per_stream_rate = None if rate is None else rate / len(load.per_stream)
    async with _ready_channels(target, len(load.per_stream)) as channels:
        started = time.perf_counter()
        results = await asyncio.gather(
            *(
                drive_stream(channel, requests, ids, window, per_stream_rate, metadata)
                for channel, requests, ids in zip(channels, load.per_stream, load.ids_per_stream, strict=True)
            )
        )
        return list(results), time.perf_counter() - started


async def send_batches(
    target: str, load: Load, metadata: tuple[tuple[str, str], ...]
) -> tuple[list[StreamResult], float]:
    """Send each stream's SendEvents calls of ``load`` one after another, the streams together,
    each on its own channel (as separate producers would); per stream the outcomes and each
    call's latency, and the seconds until the last answer."""

    async def send(channel: grpc.aio.Channel, requests: Sequence[bytes]) -> StreamResult:
        method = channel.unary_unary(SEND_EVENTS, request_serializer=None, response_deserializer=None)
        result = StreamResult()
        for request in requests:
            sent_at = time.perf_counter()
            response = ingest_pb2.SendEventsResponse.FromString(
                await method(request, metadata=metadata, timeout=60)
            )
            result.latencies.append(time.perf_counter() - sent_at)
            for event_result in response.results:
                result.count(event_result)
        return result

    async with _ready_channels(target, len(load.per_stream)) as channels:
        started = time.perf_counter()
        results = await asyncio.gather(
            *(send(channel, requests) for channel, requests in zip(channels, load.per_stream, strict=True))
        )
        return list(results), time.perf_counter() - started


@contextlib.asynccontextmanager
async def _ready_channels(target: str, count: int) -> AsyncIterator[list[grpc.aio.Channel]]:
    """``count`` channels to ``target``, each its own HTTP/2 connection, connected; closed after."""
    channels = [grpc.aio.insecure_channel(target) for _ in range(count)]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), 10)
        yield channels
    finally:
        for channel in channels:
            await channel.close(None)


# --- the bench ---------------------------------------------------------------------------------


@dataclass
class Options:
    events: int
    batch_events: int
    batch_size: int
    streams: int
    in_flight: int
    customers: int
    samples: int
    sample_interval_s: float | None
    floor_seconds: float
    rate: float | None
    ingest_only: bool
    profile_replicas: int
    json_path: Path | None
    cprofile_dir: Path | None


@dataclass
class Floors:
    raw: RawFloor
    unary: CallFloor
    echo: StreamFloor
    cpu: dict[str, dict[str, float]]


@dataclass
class Merging:
    merged: int
    during_load: int
    backlog_at_load_end: int
    all_merged_s: float


async def measure_floors(stack: BenchStack, options: Options, load: Load, meter: CpuMeter) -> Floors:
    """The three floors, on this run's NATS and machine."""
    window_total = options.streams * options.in_flight
    say(f"floor 1/3: raw JetStream publish from nats-py, windows of {window_total}")
    snap = meter.snapshot()
    raw = await measure_raw_jetstream(stack.env, load.raw_payloads, window_total, options.floor_seconds)
    say(f"   {fmt_rate(raw.rate)} msg/s ({raw.messages:,} in {raw.seconds:.1f}s)")
    cpu = {"raw JetStream floor": meter.usage(snap, meter.snapshot())}
    empty_target = stack.start_empty_server()
    # One stream's window of concurrent calls: the empty server keeps gRPC core's default limit on
    # calls not yet picked up, and cancels some past ~1,000 in flight (the services raise it, see
    # GrpcServer); the rate is flat above ~64.
    concurrency = min(options.in_flight, 1000)
    say(f"floor 2/3: empty grpc.aio unary call, {concurrency} concurrent")
    snap = meter.snapshot()
    unary = await measure_empty_unary(empty_target, concurrency, options.floor_seconds)
    cpu["empty unary floor"] = meter.usage(snap, meter.snapshot())
    say(f"   {fmt_rate(unary.rate)} calls/s, p50 {fmt_ms(unary.p50_s)}")
    say(f"   one at a time: p50 {fmt_ms(unary.idle_p50_s)}")
    say(f"floor 3/3: empty grpc.aio stream messages, {options.streams} x {options.in_flight} in flight")
    snap = meter.snapshot()
    echo = await measure_empty_stream(empty_target, load.per_stream, options.in_flight, options.floor_seconds)
    cpu["empty stream floor"] = meter.usage(snap, meter.snapshot())
    say(f"   {fmt_rate(echo.rate)} msg/s ({echo.messages:,} in {echo.seconds:.1f}s)")
    return Floors(raw, unary, echo, cpu)


@dataclass
class Phase:
    """One measured load: what ingest answered, how the merger kept up, what the markers saw."""

    offered_rate: float | None  # None: as fast as ingest takes them
    streams: list[StreamResult]
    seconds: float
    merging: Merging | None
    freshness: Freshness | None
    cpu: dict[str, float]
    drain_cpu: dict[str, float] | None

    @property
    def accepted(self) -> int:
        return sum(r.outcomes[ACCEPTED] for r in self.streams)

    @property
    def markers(self) -> int:
        return 0 if self.freshness is None else len(self.freshness.acked_s)


class PhaseRunner:
    """Runs loads against the stack's ingest, sampling freshness and waiting for the merger."""

    def __init__(
        self, stack: BenchStack, options: Options, js: Any, meter: CpuMeter, seconds_per_event: float
    ) -> None:
        self._stack = stack
        self._options = options
        self._js = js
        self._meter = meter
        self._seconds_per_event = seconds_per_event  # at full speed, from the warm-up

    def _sample_interval(self, load: Load, rate: float | None) -> float:
        if self._options.sample_interval_s is not None:
            return self._options.sample_interval_s
        expected_s = load.total * self._seconds_per_event
        if rate is not None:
            expected_s = max(expected_s, load.total / rate)
        return min(0.5, max(0.01, expected_s / self._options.samples))  # spread over the load

    async def run(self, load: Load, rate: float | None) -> Phase:
        options, stack, js, meter = self._options, self._stack, self._js, self._meter
        merging_measured = not options.ingest_only
        if merging_measured:
            before = await wait_merged(js, time.perf_counter(), MERGER_STALL_S)
        interval_s = self._sample_interval(load, rate)
        pace = "as fast as ingest takes them" if rate is None else f"offered at {fmt_rate(rate)} ev/s"
        calls = (
            f"{options.in_flight} in flight"
            if load.batch_size is None
            else f"SendEvents calls of {load.batch_size}, one at a time"
        )
        say(f"   {load.total:,} events over {options.streams} streams x {calls}, {pace}")
        if merging_measured:
            say(f"   a freshness marker every {interval_s * 1000:.0f} ms, {options.samples} at most")
        ingest_target = stack.target(suite.INGEST)
        async with (
            stack.channel(ingest_target) as sample_ingest,
            stack.channel(stack.target(suite.PROFILE)) as sample_profile,
        ):
            stop_sampling = asyncio.Event()
            snap_load = meter.snapshot()
            started = time.perf_counter()
            sampler = sampling = None
            if merging_measured:
                sampler = Sampler(f"{stack.run_id}-{load.tag}", sample_ingest, sample_profile)
                sampling = asyncio.create_task(sampler.run(stop_sampling, interval_s, options.samples))
            try:
                if load.batch_size is None:
                    results, load_seconds = await send_all(
                        ingest_target, load, options.in_flight, stack.key_metadata, rate
                    )
                else:
                    results, load_seconds = await send_batches(ingest_target, load, stack.key_metadata)
            finally:
                stop_sampling.set()
            snap_loaded = meter.snapshot()
            phase = Phase(
                rate, results, load_seconds, None, None, CpuMeter.usage(snap_load, snap_loaded), None
            )
            if sampler is None or sampling is None:
                return phase
            at_load_end = await consumer_point(js, started)
            say(f"   drain: waiting for the merger ({at_load_end.pending:,} pending when the load ended)")
            try:  # the sampler keeps polling for its last markers meanwhile
                merged_point = await wait_merged(js, started, MERGER_STALL_S)
            except BaseException:
                sampling.cancel()
                raise
            snap_drained = meter.snapshot()
            if snap_drained.at - snap_loaded.at >= MIN_PHASE_S:  # else nothing was left to merge
                phase.drain_cpu = CpuMeter.usage(snap_loaded, snap_drained)
            await sampling
        phase.merging = Merging(
            merged=merged_point.acked - before.acked,
            during_load=at_load_end.acked - before.acked,
            backlog_at_load_end=at_load_end.pending,
            all_merged_s=merged_point.at,
        )
        phase.freshness = sampler.results
        return phase


async def run_bench(stack: BenchStack, options: Options) -> dict[str, Any]:
    """Floors, warm-up, the load at full speed (streamed, then in SendEvents batches), then at
    the goal load; the results as a dict."""
    meter = CpuMeter(stack.cpu_groups())
    say(f"generating {options.events:,} events for {options.customers:,} customers")
    # The warm-up first, and each load after the one before: a load's events must occur after
    # the earlier ones, or every event of a customer they touched would arrive late and make the
    # merger replay that customer's history.
    warmup = make_load(stack.run_id, "warmup", WARMUP_EVENTS, options.customers, options.streams, seed=1)
    load = make_load(
        stack.run_id, "load", options.events, options.customers, options.streams, start_ns=warmup.end_ns
    )
    say(f"   {dict(load.types)}; {load.mean_event_bytes:.0f} bytes per event as published")
    floors = await measure_floors(stack, options, load, meter)

    for n in range(2, options.profile_replicas + 1):  # more mergers on the durable consumer
        say(f"starting profile replica {n}")
        stack.start_variant(suite.PROFILE, f"profile-{n}", {})
    client = await nats.connect(JetStreamSettings.from_env(stack.env).servers, name="sendtime-bench-monitor")
    try:
        say(f"warm-up: {warmup.total:,} events" + ("" if options.ingest_only else ", then wait until merged"))
        warm_results, warm_seconds = await send_all(
            stack.target(suite.INGEST), warmup, options.in_flight, stack.key_metadata
        )
        _raise_on_problems(warm_results, "warm-up")
        runner = PhaseRunner(stack, options, client.jetstream(), meter, warm_seconds / warmup.total)
        say("load 1/3: full speed")
        full = await runner.run(load, None)
        _raise_on_problems(full.streams, "full speed")
        batch_load = make_load(
            stack.run_id,
            "batches",
            options.batch_events,
            options.customers,
            options.streams,
            seed=5,
            start_ns=load.end_ns,
            batch_size=options.batch_size,
        )
        say(f"load 2/3: full speed, SendEvents calls of {options.batch_size}")
        batched = await runner.run(batch_load, None)
        _raise_on_problems(batched.streams, "SendEvents batches")
        paced = None
        if not options.ingest_only:
            rate = options.rate if options.rate is not None else GOAL_ACKED_VS_RAW * floors.raw.rate
            paced_load = make_load(
                stack.run_id,
                "paced",
                options.events,
                options.customers,
                options.streams,
                seed=11,
                start_ns=batch_load.end_ns,
            )
            say("load 3/3: at the goal load")
            paced = await runner.run(paced_load, rate)
            _raise_on_problems(paced.streams, "goal load")
    finally:
        await client.close()
    if paced is not None:
        expected = warmup.total + sum(phase.accepted + phase.markers for phase in (full, batched, paced))
        in_database = await _count_events(stack.database_url)
        if in_database != expected:
            raise BenchError(f"{in_database} events merged into PostgreSQL, expected {expected}")
    return _results(options, load, floors, full, batched, paced)


def _raise_on_problems(results: Sequence[StreamResult], phase: str) -> None:
    problems = [r.first_problem for r in results if r.first_problem]
    if problems:
        raise BenchError(f"{phase}: not every event was accepted, e.g. {problems[0]}")


async def _count_events(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM events"))
    finally:
        await conn.close()


def _results(
    options: Options, load: Load, floors: Floors, full: Phase, batched: Phase, paced: Phase | None
) -> dict[str, Any]:
    """Everything measured, as plain data (what --json writes and ``report`` prints)."""
    raw, unary, echo = floors.raw, floors.unary, floors.echo
    full_results, batch_results = _phase_results(full), _phase_results(batched)
    acked_rate = full_results["ingest"]["acked_events_per_s"]
    cpu = {**floors.cpu, "full speed": full.cpu}
    if full.drain_cpu is not None:
        cpu["full drain"] = full.drain_cpu
    cpu["SendEvents batches"] = batched.cpu
    if batched.drain_cpu is not None:
        cpu["batches drain"] = batched.drain_cpu
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "source": source_info(),
        "options": {
            "events_per_load": options.events,
            "batch_events": options.batch_events,
            "batch_size": options.batch_size,
            "streams": options.streams,
            "in_flight_per_stream": options.in_flight,
            "customers": options.customers,
            "rate": options.rate,
            "ingest_only": options.ingest_only,
            "profile_replicas": options.profile_replicas,
            "cprofile": options.cprofile_dir is not None,
            "event_types": dict(load.types),
            "mean_event_bytes": round(load.mean_event_bytes, 1),
        },
        "floors": {
            "raw_jetstream_msgs_per_s": raw.rate,
            "raw_jetstream_window": raw.window,
            "raw_jetstream_duplicates": raw.duplicates,
            "empty_unary_calls_per_s": unary.rate,
            "empty_unary_concurrency": unary.concurrency,
            "empty_unary_p50_s": unary.p50_s,
            "empty_unary_p99_s": unary.p99_s,
            "empty_unary_idle_p50_s": unary.idle_p50_s,
            "empty_stream_msgs_per_s": echo.rate,
        },
        "full_speed": full_results,
        "full_speed_batches": batch_results,
        "at_goal_load": None,
        "goals": {
            "acked_vs_raw_jetstream": {"value": acked_rate / raw.rate, "goal": GOAL_ACKED_VS_RAW},
            "send_events_acked_per_s": {
                "value": batch_results["ingest"]["acked_events_per_s"],
                "goal": GOAL_SEND_EVENTS_ACKED_PER_S,
            },
        },
        "cpu_percent_of_one_core": cpu,
    }
    per_event = _cpu_per_event(floors.cpu, raw, unary, echo)
    per_event.update(_phase_cpu_per_event("full speed", full, full_results))
    per_event.update(_phase_cpu_per_event("SendEvents batches", batched, batch_results))
    if paced is not None:
        paced_results = _phase_results(paced)
        results["at_goal_load"] = paced_results
        cpu["goal load"] = paced.cpu
        if paced.drain_cpu is not None:
            cpu["goal drain"] = paced.drain_cpu
        per_event.update(_phase_cpu_per_event("goal load", paced, paced_results))
        merge, fresh = paced_results["merge"], paced_results["freshness"]
        results["goals"]["merged_vs_acked"] = {
            "value": merge["merged_events_per_s"] / paced_results["ingest"]["acked_events_per_s"],
            "goal": GOAL_MERGED_VS_ACKED,
        }
        results["goals"]["freshness_p99_s"] = {"value": fresh["p99_s"], "goal": GOAL_FRESHNESS_P99_S}
    results["cpu_us_per_event"] = per_event
    return results


def _phase_results(phase: Phase) -> dict[str, Any]:
    outcomes: Counter[int] = Counter()
    for stream in phase.streams:
        outcomes.update(stream.outcomes)
    latencies = [x for stream in phase.streams for x in stream.latencies]
    results: dict[str, Any] = {
        "offered_events_per_s": phase.offered_rate,
        "ingest": {
            "accepted": phase.accepted,
            "outcomes": {ingest_pb2.EventOutcome.Name(k): v for k, v in outcomes.items()},  # type: ignore[arg-type]
            "seconds": phase.seconds,
            "acked_events_per_s": phase.accepted / phase.seconds,
            "ack_latency_p50_s": percentile(latencies, 50),
            "ack_latency_p99_s": percentile(latencies, 99),
        },
        "merge": None,
        "freshness": None,
    }
    merging = phase.merging
    if merging is not None:
        drain_s = merging.all_merged_s - phase.seconds
        results["merge"] = {
            "merged": merging.merged,
            "merged_events_per_s": merging.merged / merging.all_merged_s,
            "merged_events_per_s_during_load": merging.during_load / phase.seconds,
            "merged_events_per_s_after_load": (
                (merging.merged - merging.during_load) / drain_s if drain_s > 0.05 else math.nan
            ),
            "backlog_at_load_end": merging.backlog_at_load_end,
            "all_merged_after_s": merging.all_merged_s,
        }
    fresh = phase.freshness
    if fresh is not None:
        p99 = percentile(fresh.visible_s, 99)
        if fresh.not_visible > 0.01 * max(1, len(fresh.acked_s)):  # unseen markers are slower than any seen
            p99 = math.inf
        results["freshness"] = {
            "samples": len(fresh.visible_s),
            "not_visible": fresh.not_visible,
            "not_visible_within_s": MARKER_TIMEOUT_S,
            "not_accepted": fresh.not_accepted,
            "p50_s": percentile(fresh.visible_s, 50),
            "p99_s": p99,
            "max_s": max(fresh.visible_s, default=math.nan),
            "acked_p50_s": percentile(fresh.acked_s, 50),
            "acked_p99_s": percentile(fresh.acked_s, 99),
        }
    return results


def _us(percent_of_core: float, per_second: float) -> float:
    """CPU microseconds per item, from a process's CPU share and the rate it handled items at."""
    return percent_of_core / 100 / per_second * 1e6 if per_second > 0 else math.nan


def _cpu_per_event(
    cpu: dict[str, dict[str, float]], raw: RawFloor, unary: CallFloor, echo: StreamFloor
) -> dict[str, float]:
    """What one message costs each process at the floors (see docs/benchmarks.md)."""
    return {
        "nats-server, per raw publish (floor)": _us(cpu["raw JetStream floor"]["nats-server"], raw.rate),
        "nats-py client, per raw publish (floor)": _us(
            cpu["raw JetStream floor"]["bench (load generator)"], raw.rate
        ),
        "empty server, per unary call (floor)": _us(
            cpu["empty unary floor"]["empty gRPC server (floors)"], unary.rate
        ),
        "empty server, per stream message (floor)": _us(
            cpu["empty stream floor"]["empty gRPC server (floors)"], echo.rate
        ),
    }


def _phase_cpu_per_event(name: str, phase: Phase, results: dict[str, Any]) -> dict[str, float]:
    """What one event cost each process during a load, and during its drain (merger alone)."""
    acked_rate = results["ingest"]["acked_events_per_s"]
    per_event = {
        f"ingest service, per acked event ({name})": _us(phase.cpu["ingest service"], acked_rate),
        f"nats-server, per acked event ({name})": _us(phase.cpu["nats-server"], acked_rate),
        f"load generator, per acked event ({name})": _us(phase.cpu["bench (load generator)"], acked_rate),
    }
    merge = results["merge"]
    drain_rate = math.nan if merge is None else merge["merged_events_per_s_after_load"]
    if phase.drain_cpu is not None and drain_rate > 0:
        per_event[f"profile service, per merged event ({name} drain)"] = _us(
            phase.drain_cpu["profile service"], drain_rate
        )
        per_event[f"postgres backends, per merged event ({name} drain)"] = _us(
            phase.drain_cpu["postgres backends (bench db)"], drain_rate
        )
    return per_event


def report(results: dict[str, Any]) -> str:
    """The table and the CPU breakdown, as printed."""
    floors, full, paced = results["floors"], results["full_speed"], results["at_goal_load"]
    batches, batch_size = results["full_speed_batches"], results["options"]["batch_size"]
    batch_acked = batches["ingest"]["acked_events_per_s"]
    raw_rate, acked = floors["raw_jetstream_msgs_per_s"], full["ingest"]["acked_events_per_s"]
    acked_ratio = acked / raw_rate
    rows = [
        Row("full speed, as fast as ingest takes them", ""),
        Row(
            "  acked ingest (StreamEvents)",
            f"{fmt_rate(acked)} ev/s",
            f"raw JetStream {fmt_rate(raw_rate)} msg/s",
            f"{acked_ratio:.2f} x",
            f">= {GOAL_ACKED_VS_RAW} x",
            verdict(acked_ratio >= GOAL_ACKED_VS_RAW),
        ),
        Row(
            "",
            "",
            f"empty gRPC stream msgs {fmt_rate(floors['empty_stream_msgs_per_s'])}/s",
            f"{acked / floors['empty_stream_msgs_per_s']:.2f} x",
        ),
        Row(
            "",
            "",
            f"empty unary calls {fmt_rate(floors['empty_unary_calls_per_s'])}/s",
            f"{acked / floors['empty_unary_calls_per_s']:.2f} x",
        ),
        *_phase_rows(full, floors, goals=False),
        Row(f"full speed, SendEvents calls of {batch_size}", ""),
        Row(
            f"  acked ingest (SendEvents x {batch_size})",
            f"{fmt_rate(batch_acked)} ev/s",
            f"raw JetStream {fmt_rate(raw_rate)} msg/s",
            f"{batch_acked / raw_rate:.2f} x",
            f">= {GOAL_SEND_EVENTS_ACKED_PER_S:,} ev/s",
            verdict(batch_acked >= GOAL_SEND_EVENTS_ACKED_PER_S),
        ),
        *_phase_rows(batches, floors, goals=False, latency="call latency p50 / p99"),
    ]
    if paced is None:
        rows.append(Row("merged, freshness", "not measured (--ingest-only)"))
    else:
        offered = paced["offered_events_per_s"]
        rows += [
            Row(
                f"at the goal load, {fmt_rate(offered)} ev/s offered",
                "",
                "",
                f"{offered / raw_rate:.2f} x raw" if results["options"]["rate"] is None else "(--rate)",
            ),
            Row(
                "  acked ingest (StreamEvents)",
                f"{fmt_rate(paced['ingest']['acked_events_per_s'])} ev/s",
                f"offered {fmt_rate(offered)} ev/s",
                f"{paced['ingest']['acked_events_per_s'] / offered:.2f} x",
            ),
            *_phase_rows(paced, floors, goals=True),
        ]
    machine, options = results["machine"], results["options"]
    width = max(map(len, results["cpu_us_per_event"]))
    summary = (
        f"2 loads of {options['events_per_load']:,} events over {options['streams']} streams"
        f" x {options['in_flight_per_stream']} in flight, {options['batch_events']:,} in SendEvents calls"
        f" of {batch_size}, {options['customers']:,} customers, {options['mean_event_bytes']:.0f} B/event"
        " as published"
    )
    lines = [
        "",
        f"Sendtime bench-ingest, {results['date']}: {machine['cores']} cores ({machine['cpu_model']}),"
        f" load average {machine['load_average_1m_before']} before the run",
        summary,
    ]
    lines += report_warnings(results, options["cprofile"])
    lines += [
        "",
        render_table(rows),
        "",
        f"CPU, % of one core ({machine['cores']} cores:"
        f" {100 * (machine['cores'] or 1)}% is the whole machine):",
        render_cpu(results["cpu_percent_of_one_core"]),
        "",
        "CPU per message, µs:",
        *(f"  {name:<{width}} {value:>8,.0f}" for name, value in results["cpu_us_per_event"].items()),
        "",
        "Goals are reported, not enforced: the exit code is 0 unless the bench itself failed.",
    ]
    return "\n".join(lines)


def _phase_rows(
    phase: dict[str, Any],
    floors: dict[str, Any],
    *,
    goals: bool,
    latency: str = "ack latency p50 / p99 (stream)",
) -> list[Row]:
    """Ack latency, merge and freshness of one load; with ``goals``, held against them."""
    ingest, merge, fresh = phase["ingest"], phase["merge"], phase["freshness"]
    rows = [
        Row(
            f"  {latency}",
            f"{fmt_ms(ingest['ack_latency_p50_s'])} / {fmt_ms(ingest['ack_latency_p99_s'])}",
            f"empty call p50 {fmt_ms(floors['empty_unary_p50_s'])}"
            f" at {floors['empty_unary_concurrency']} concurrent",
        )
    ]
    if merge is None or fresh is None:
        return rows
    merged_ratio = merge["merged_events_per_s"] / ingest["acked_events_per_s"]
    p99 = fresh["p99_s"]
    return rows + [
        Row(
            "  merged (load start -> all merged)",
            f"{fmt_rate(merge['merged_events_per_s'])} ev/s",
            f"acked {fmt_rate(ingest['acked_events_per_s'])} ev/s",
            f"{merged_ratio:.2f} x",
            f">= {GOAL_MERGED_VS_ACKED} x" if goals else "",
            verdict(merged_ratio >= GOAL_MERGED_VS_ACKED) if goals else "",
        ),
        Row("    merged while ingest ran", f"{fmt_rate(merge['merged_events_per_s_during_load'])} ev/s"),
        Row(
            "    merged after ingest ended",
            f"{fmt_rate(merge['merged_events_per_s_after_load'])} ev/s",
            f"{merge['backlog_at_load_end']:,} pending at the end",
        ),
        Row(
            "  freshness p50 (occurred -> visible)",
            fmt_ms(fresh["p50_s"]),
            f"empty call p50 {fmt_ms(floors['empty_unary_idle_p50_s'])} one at a time",
        ),
        Row(
            "  freshness p99",
            fmt_ms(p99) if math.isfinite(p99) else f"> {MARKER_TIMEOUT_S:.0f} s",
            f"{fresh['samples']} samples, {fresh['not_visible']} not visible within {MARKER_TIMEOUT_S:.0f}s",
            "",
            f"< {GOAL_FRESHNESS_P99_S * 1000:.0f} ms" if goals else "",
            verdict(p99 < GOAL_FRESHNESS_P99_S) if goals else "",
        ),
        Row(
            "    marker acked p50 / p99 (SendEvents)",
            f"{fmt_ms(fresh['acked_p50_s'])} / {fmt_ms(fresh['acked_p99_s'])}",
        ),
    ]


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="bench_ingest.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--events", type=int, default=12_000, help="events in each of the two loads (default 12000)"
    )
    parser.add_argument(
        "--batch-events",
        type=int,
        default=36_000,
        help="events of the SendEvents load (default 36000: it runs ~5x faster than the stream load)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=500, help="events per SendEvents call (default 500)"
    )
    parser.add_argument(
        "--streams",
        type=int,
        default=4,
        help="concurrent StreamEvents calls, and concurrent SendEvents senders (default 4)",
    )
    parser.add_argument(
        "--in-flight",
        type=int,
        default=512,
        help="unanswered events per stream (default 512, ingest's limit)",
    )
    parser.add_argument("--customers", type=int, default=2000, help="distinct customers (default 2000)")
    parser.add_argument("--samples", type=int, default=200, help="freshness samples at most (default 200)")
    parser.add_argument(
        "--sample-interval",
        type=float,
        default=None,
        help="seconds between freshness markers (default: the expected load time / --samples)",
    )
    parser.add_argument("--floor-seconds", type=float, default=3.0, help="seconds per floor (default 3)")
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="the second load's rate, events/s (default: the goal load, half the raw JetStream floor)",
    )
    parser.add_argument(
        "--ingest-only",
        action="store_true",
        help="run ingest without the profile service (full speed only; no merge, no freshness):"
        " ingest's own ceiling",
    )
    parser.add_argument(
        "--profile-replicas",
        type=int,
        default=1,
        help="profile service processes sharing the merger's durable consumer (default 1)",
    )
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    counts = (args.events, args.batch_events, args.batch_size, args.streams, args.in_flight, args.customers)
    if min(*counts, args.samples, args.profile_replicas) < 1:
        parser.error(
            "--events, --batch-events, --batch-size, --streams, --in-flight, --customers, --samples and"
            " --profile-replicas must be positive"
        )
    if args.batch_size > MAX_BATCH_SIZE:
        parser.error(f"--batch-size must be at most {MAX_BATCH_SIZE}, ingest's limit per call")
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate must be positive")
    return Options(
        events=args.events,
        batch_events=args.batch_events,
        batch_size=args.batch_size,
        streams=args.streams,
        in_flight=args.in_flight,
        customers=args.customers,
        samples=args.samples,
        sample_interval_s=args.sample_interval,
        floor_seconds=args.floor_seconds,
        rate=args.rate,
        ingest_only=args.ingest_only,
        profile_replicas=args.profile_replicas,
        json_path=args.json,
        cprofile_dir=args.cprofile,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    services = [suite.INGEST] if options.ingest_only else [suite.PROFILE, suite.INGEST]
    return run_bench_main(
        "bench-ingest",
        services,
        cprofile_dir=options.cprofile_dir,
        json_path=options.json_path,
        measure=lambda stack: asyncio.run(run_bench(stack, options)),
        report=report,
    )


if __name__ == "__main__":
    sys.exit(main())
