"""``make bench-http``: the send-time HTTP path as email platforms hit it (a GET with a Bearer key
on a kept-alive connection, docs/http.md), next to HTTP floors measured in the same run.

The bench starts a private stack (bench_common.BenchStack: NATS with ``sync_interval: always``,
Redis, a fresh database, profile, ingest and render as their own processes, their HTTP ports
served as deployed but in plaintext, ``ALLOW_PLAINTEXT=true``), then:

1. load: ``--customers`` customers with carts (an identify, 1 or 2 cart additions) through
   ``IngestService/SendEvents`` until the profile merger and render's catalog consumer have
   nothing pending (the database ANALYZEd once ingest has acknowledged every event, as
   bench-render does); ``templates/abandoned-cart`` (bench_render's template) created and
   published; every customer read once (BatchGetProfiles): the merger keeps a profile in Redis
   in full only once someone has read it;
2. floors, served by a process of this bench's own (``serve-floor``: an aiohttp application
   served with sendtime_common.http_server.HttpListener, with the services' TLS setting, so it
   does not share the load generator's event loop): ``GET /empty`` answers a tiny JSON object,
   ``GET /cached/{user}`` makes one Redis GET of the profile service's cache entry and answers
   it as it is (the floor the issue sets a profile hit: an HTTP handler plus a Redis GET),
   ``GET /ideal/{user}`` makes one Redis GET of the profile service's cache entry and renders
   the same template with bench_render.IdealRenderer (render's own compiler and context code)
   into canonical JSON as the gateway does: the least work a render over HTTP could do. No key
   check, no interceptor, no tracing. Also a bare Redis GET of a cache entry from this process
   (redis.asyncio with hiredis, as the services);
3. every measure uses one aiohttp ClientSession (connections kept alive, ``Authorization:
   Bearer`` with the stack's key), customers in random order. A measure and its floor take
   turns in short segments (A B B A B A A B..., bench_profile.measure_alternating, each side
   warmed up first), ``--seconds`` each in all, so that whatever else the machine does weighs on
   both alike, and each side's server process is charged its CPU per call: first the Redis GET
   floor alone; then, after a second read of every customer (the profile service then keeps
   copies in process, for 600 s here, NEAR_CACHE_TTL_S says why: a send's GetProfile is a
   hit), ``GET /v1/profiles/user_id:<u>`` beside
   the HTTP + Redis GET floor, one at a time (p50, p99) and with ``--concurrency`` callers
   (throughput, p50, p99), and one at a time beside the empty HTTP call too; then, after one
   untimed render of every customer (render's template caches and last-known-good copies
   warm), ``GET /v1/templates/abandoned-cart:render?profile=
   profiles/user_id:<u>`` beside the ideal render, at ``--concurrency`` and one at a time;
4. open loop, right after each of those two: the GET offered at half its closed-loop
   throughput at ``--concurrency``, arrivals a Poisson process (seeded), beside its floor, the
   empty HTTP call offered at the same rate with the same arrival times (what the client, the
   kernel and the machine's two cores add on their own), taking turns in segments of 1 s,
   ``--open-seconds`` each in all. Each request is sent at its scheduled time whatever is still
   in flight, and its latency is counted from that scheduled time, so a stall of the server (or
   of this process) counts in full for every request it delays (no coordinated omission): p50,
   p99, p99.9; and how late this process sent requests (dispatch lag), which is inside those
   figures. A segment's answers are all in before the next segment starts.

Any answer other than 200 is counted and then fails the bench (exit 1); so does an error of the
connection. A render answer that is not RENDERED from the LIVE profile is reported. Goals
(PASS/MISS, never a failing exit code, as the other benches): profile hit p50 one at a time at
most 1.5 x the HTTP + Redis GET floor's; render p50 at ``--concurrency`` at most 2 x the ideal
render's; the profile hit's open-loop p99 at most 5 ms (render's is reported beside it, with no
goal). Defaults take about 2 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis.asyncio as redis
from aiohttp import web
from bench_common import (
    BenchError,
    BenchStack,
    CallFailed,
    CpuMeter,
    Row,
    add_output_arguments,
    fmt_rate,
    fmt_ratio,
    machine_info,
    percentile,
    render_cpu,
    render_table,
    report_warnings,
    run_bench_main,
    say,
    source_info,
    verdict,
)
from bench_profile import (
    MERGER,
    SEGMENT_MANY_S,
    SEGMENT_ONE_S,
    SEND_BATCH,
    SETTLE_MANY_S,
    Side,
    alternate_with_cpu,
    balanced,
    batches_of,
    check_merged,
    customer_events,
    load_customers,
    measure,
    measure_redis_get,
    ms,
    read_every_customer,
    user_id_of,
)
from bench_render import (
    CATALOG,
    SEGMENT_N_S,
    SETTLE_N_S,
    TEMPLATE,
    TEMPLATE_ID,
    IdealRenderer,
    create_template,
)
from google.protobuf import json_format
from yarl import URL

import devstack
import suite
from profile_service.cache import cache_key
from sendtime.render.v1 import render_pb2
from sendtime_common.http_server import HttpListener
from sendtime_common.identifiers import IdentifierKind
from sendtime_common.runtime import gc_gen0_threshold_from_env, tune_garbage_collector
from sendtime_common.tls import TlsSettings

GOAL_PROFILE_VS_FLOOR = 1.5  # profile hit p50 / (an HTTP handler making a Redis GET) p50, one at a time
GOAL_RENDER_VS_IDEAL = 2.0  # render p50 / ideal render p50, at --concurrency
GOAL_OPEN_LOOP_P99_S = 0.005  # the profile hit's, at half its throughput at --concurrency
OPEN_LOOP_SHARE = 0.5  # of the closed-loop throughput
CALL_TIMEOUT_S = 10.0  # the client's; render answers within its own 1 s default deadline
MAX_CONNECTIONS = 1024  # the session's pool: the open loop opens as many as it has in flight
WARM_UP_S = 0.5  # at --concurrency before each closed-loop measure (--seconds if shorter)
OPEN_SEGMENT_S = 1.0  # open loop: each side's segments, taking turns
# The profile service's copies in process live 60 s by default; the warm-up puts them all in at
# once, so they would all expire together in the middle of the profile measures (~55 s) and
# turn the rest of them into misses; measured so, the open loop's p99 was 1.7 s. In a service
# copies enter one by one as customers are read, and expire as spread out. What a hit costs
# does not depend on how long copies live.
NEAR_CACHE_TTL_S = 600
EMPTY_BODY = orjson.dumps({"ok": True})
RENDERED_LIVE = "RENDERED/LIVE"


# --- the floor server --------------------------------------------------------------------------


def floor_app(client: redis.Redis, renderer: IdealRenderer) -> web.Application:
    """``GET /empty``: a tiny JSON object. ``GET /cached/{user}``: the profile service's cache
    entry for user id ``user`` (one Redis GET), answered as it is: the least a profile hit over
    HTTP can do. ``GET /ideal/{user}``: that entry rendered with the ideal path's code, answered
    as the gateway answers a RenderResponse (canonical JSON, orjson)."""

    async def empty(request: web.Request) -> web.Response:
        return web.Response(body=EMPTY_BODY, content_type="application/json")

    async def cached(request: web.Request) -> web.Response:
        entry = await client.get(cache_key(IdentifierKind.USER_ID, request.match_info["user"]))
        if entry is None:
            raise web.HTTPNotFound()
        return web.Response(body=entry, content_type="application/octet-stream")

    async def ideal(request: web.Request) -> web.Response:
        entry = await client.get(cache_key(IdentifierKind.USER_ID, request.match_info["user"]))
        response = renderer.render(entry, {})  # a GET carries no variables
        return web.Response(
            body=orjson.dumps(json_format.MessageToDict(response)), content_type="application/json"
        )

    app = web.Application()
    app.router.add_get("/empty", empty)
    app.router.add_get("/cached/{user}", cached)
    app.router.add_get("/ideal/{user}", ideal)
    return app


async def serve_floor(port: int, redis_url: str, template_path: Path) -> None:
    """Serve ``floor_app`` on 127.0.0.1:``port`` with the services' HttpListener and TLS
    setting (TLS_CERT_FILE / ALLOW_PLAINTEXT from the environment) until SIGTERM or SIGINT."""
    renderer = IdealRenderer(render_pb2.Template.FromString(template_path.read_bytes()))
    client = redis.Redis.from_url(redis_url)  # as the profile service creates its client
    listener = HttpListener(
        floor_app(client, renderer),
        f"127.0.0.1:{port}",
        tls=TlsSettings.from_env(os.environ),
        name="floor HTTP",
        grace_s=1.0,
    )
    await listener.start()
    # As the services tune theirs (sendtime_common.service): with CPython's defaults the floor
    # made a full collection of ~27 ms every few seconds at 64 concurrent (gc.callbacks
    # logged), which the services do not, and the floor's figures carried them.
    tune_garbage_collector(gc_gen0_threshold_from_env(os.environ))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await listener.stop()
        await client.aclose()


@contextlib.contextmanager
def floor_server(stack: BenchStack) -> Iterator[tuple[str, int]]:
    """Start the floor server as a process of its own, with the services' environment; its base
    URL and pid. Stopped on exit, with Ctrl-C ignored while it stops."""
    if TlsSettings.from_env(stack.env).enabled:
        raise BenchError("the bench's client speaks plaintext HTTP; the stack's services serve TLS")
    template_path = stack.workdir / "template.pb"
    template_path.write_bytes(TEMPLATE.SerializeToString())
    port = devstack.free_port()
    command = [sys.executable, str(Path(__file__).resolve()), "serve-floor", "--port", str(port)]
    command += ["--redis", stack.redis_url, "--template", str(template_path)]
    with open(stack.workdir / "floor-server.log", "ab") as log:
        process = subprocess.Popen(
            command,
            env=stack.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        devstack.wait_for_tcp("127.0.0.1", port, 15, process)
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            devstack.stop_process(process)
        finally:
            signal.signal(signal.SIGINT, previous)


# --- HTTP calls --------------------------------------------------------------------------------


def http_base(stack: BenchStack, service: suite.Service) -> str:
    return f"http://127.0.0.1:{service.http_port(stack.env)}"


def open_session(key: str) -> aiohttp.ClientSession:
    """One session for every call, as an email platform's fetcher keeps one: connections kept
    alive, the key on every request, no cookies."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, limit_per_host=MAX_CONNECTIONS),
        headers={"Authorization": f"Bearer {key}"},
        timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


async def get(session: aiohttp.ClientSession, url: URL) -> bytes:
    """The body of a GET of ``url``.

    Raises:
        CallFailed: the answer was not 200 (``HTTP <status>``), or the connection failed.
    """
    try:
        async with session.get(url) as response:
            body = await response.read()
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise CallFailed(type(exc).__name__) from None
    if status != 200:
        raise CallFailed(f"HTTP {status}")
    return body


def http_caller(
    session: aiohttp.ClientSession, urls: Sequence[URL], answers: list[bytes] | None = None
) -> Callable[[int], Awaitable[None]]:
    """A ``measure`` call: GET the i-th URL (from a random offset), its body kept in ``answers``
    when given (parsed after the timing)."""
    offset = random.randrange(len(urls))

    async def one(i: int) -> None:
        body = await get(session, urls[(offset + i) % len(urls)])
        if answers is not None:
            answers.append(body)

    return one


def describe(body: bytes) -> str:
    """A render answer as ``RENDERED/LIVE``, ``SKIPPED/NONE/PROFILE_NOT_FOUND``..."""
    answer = orjson.loads(body)
    parts = [
        str(answer.get("status", "")).removeprefix("RENDER_STATUS_"),
        str(answer.get("profileSource", "")).removeprefix("PROFILE_SOURCE_"),
    ]
    if "fallbackReason" in answer:
        parts.append(str(answer["fallbackReason"]).removeprefix("FALLBACK_REASON_"))
    return "/".join(parts)


def fail_on_errors(name: str, errors: Mapping[str, int]) -> None:
    if errors:
        raise BenchError(f"{name}: calls failed: {dict(errors)}")


def outcomes_of(answers: Sequence[bytes]) -> dict[str, int]:
    return dict(Counter(describe(a) for a in answers))


@dataclass(frozen=True, slots=True)
class Pair:
    """A floor and a measure taking turns in short segments (bench_profile.measure_alternating),
    at one concurrency: the machine's other work weighs on both alike."""

    floor: Side
    measured: Side

    @property
    def ratio(self) -> float:
        """The measure's p50 over the floor's."""
        return self.measured.measured.p50_s / self.floor.measured.p50_s

    def ratio_by_half(self) -> list[float]:
        halves = zip(self.floor.halves(), self.measured.halves(), strict=True)
        return [measured.p50_s / floor.p50_s for floor, measured in halves]

    def as_json(self) -> dict[str, Any]:
        return {
            "floor": self.floor.as_json(),
            "measured": self.measured.as_json(),
            "p50_ratio": self.ratio,
            "p50_ratio_by_half": self.ratio_by_half(),
        }


async def compare(
    names: tuple[str, str],
    calls: tuple[Callable[[int], Awaitable[None]], Callable[[int], Awaitable[None]]],
    pids: tuple[int, int],
    meter: CpuMeter,
    cpu: dict[str, dict[str, float]],
    *,
    concurrency: int,
    seconds: float,
    segment_s: float,
    settle_s: float = 0.0,
) -> Pair:
    """The floor ``calls[0]`` and the measure ``calls[1]`` (served by the processes ``pids``, each
    charged its CPU per call), each warmed up, then taking turns in segments of at most
    ``segment_s``, ``seconds`` each in all. Failed calls fail the bench."""
    segment_s = min(segment_s, seconds / 4)  # a cycle, A B B A B A A B, has 4 of each side
    settle_s = min(settle_s, segment_s / 4)
    for name, call in zip(names, calls, strict=True):
        warm = await measure(call, concurrency=concurrency, duration_s=min(WARM_UP_S, seconds))
        fail_on_errors(f"{name} (warm-up)", warm.errors)
    say(
        f"{names[1]} and {names[0]} taking turns, {concurrency} at a time ({segment_s:g}s segments,"
        f" {seconds:g}s each in all)"
    )
    sides, start, end = await alternate_with_cpu(
        list(calls),
        list(pids),
        meter,
        concurrency=concurrency,
        duration_s=seconds / 2,  # each side gets about twice this
        segment_s=segment_s,
        settle_s=settle_s,
    )
    cpu[f"{names[1]} | {names[0]} x{concurrency}"] = CpuMeter.usage(start, end)
    for name, side in zip(names, sides, strict=True):
        fail_on_errors(name, side.measured.errors)
    pair = Pair(*sides)
    floor, measured = pair.floor.measured, pair.measured.measured
    say(
        f"   p50 {ms(measured.p50_s)} / p99 {ms(measured.p99_s)}, {fmt_rate(measured.rate)}/s; {names[0]}"
        f" p50 {ms(floor.p50_s)} / p99 {ms(floor.p99_s)}, {fmt_rate(floor.rate)}/s: p50 {pair.ratio:.2f} x"
    )
    return pair


@dataclass(frozen=True, slots=True)
class OpenLoop:
    """Requests offered at ``rate`` per second (Poisson arrivals) for ``seconds`` in all: latencies
    from each request's scheduled send time to its answer, and how late each was sent."""

    rate: float
    seconds: float
    offered: int
    latencies: tuple[float, ...] = field(repr=False)
    lags: tuple[float, ...] = field(repr=False)
    finished_s: float  # first scheduled send -> last answer (summed over segments)
    max_in_flight: int
    errors: dict[str, int]
    segments: int = 1

    def p(self, q: float) -> float:
        return percentile(self.latencies, q)

    @classmethod
    def pooled(cls, parts: Sequence[OpenLoop]) -> OpenLoop:
        errors: Counter[str] = Counter()
        for part in parts:
            errors.update(part.errors)
        return cls(
            rate=parts[0].rate,
            seconds=sum(p.seconds for p in parts),
            offered=sum(p.offered for p in parts),
            latencies=tuple(latency for p in parts for latency in p.latencies),
            lags=tuple(lag for p in parts for lag in p.lags),
            finished_s=sum(p.finished_s for p in parts),
            max_in_flight=max(p.max_in_flight for p in parts),
            errors=dict(errors),
            segments=len(parts),
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "offered_per_s": self.rate,
            "seconds": self.seconds,
            "segments": self.segments,
            "offered": self.offered,
            "answered": len(self.latencies),
            "answered_per_s": len(self.latencies) / self.finished_s if self.finished_s > 0 else math.nan,
            "p50_s": self.p(50),
            "p99_s": self.p(99),
            "p999_s": self.p(99.9),
            "max_s": max(self.latencies, default=math.nan),
            "dispatch_lag_p50_s": percentile(self.lags, 50),
            "dispatch_lag_p99_s": percentile(self.lags, 99),
            "max_in_flight": self.max_in_flight,
            "errors": self.errors,
        }


def poisson_schedule(rate: float, seconds: float, rng: random.Random) -> list[float]:
    """Send times (seconds from the start) of a Poisson process of ``rate`` over ``seconds``."""
    times: list[float] = []
    at = rng.expovariate(rate)
    while at < seconds:
        times.append(at)
        at += rng.expovariate(rate)
    return times


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """This process's cycle collector off for the block, after a full collection.

    An open loop charges every request with any stall of its sender. Measured with the
    collector's default thresholds, the bench's own full collections (~35 ms each, over the
    latencies it keeps) landed in its open-loop segments every ~10 s and made the p99 of
    whichever side was running then, the floor's as well; a segment is short enough to run
    without a collection."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def open_loop(
    call: Callable[[int], Awaitable[None]], rate: float, seconds: float, rng: random.Random
) -> OpenLoop:
    """Each request sent at its scheduled time (``poisson_schedule``) as a task of its own,
    whatever is still in flight; latency counted from the scheduled time. The count of requests
    is fixed by the schedule, so the run ends by itself, once the last answer is in."""
    schedule = poisson_schedule(rate, seconds, rng)
    latencies: list[float] = []
    lags: list[float] = []
    errors: Counter[str] = Counter()
    in_flight = 0
    max_in_flight = 0
    last_answer = 0.0

    async def one(i: int, scheduled: float) -> None:
        nonlocal in_flight, max_in_flight, last_answer
        lags.append(time.perf_counter() - scheduled)
        in_flight += 1
        max_in_flight = max(max_in_flight, in_flight)
        try:
            await call(i)
        except CallFailed as exc:
            errors[exc.reason] += 1
            return
        finally:
            in_flight -= 1
        last_answer = time.perf_counter()
        latencies.append(last_answer - scheduled)

    tasks: set[asyncio.Task[None]] = set()
    with collector_paused():
        start = time.perf_counter() + 0.01
        for i, offset in enumerate(schedule):
            scheduled = start + offset
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(i, scheduled))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    return OpenLoop(
        rate=rate,
        seconds=seconds,
        offered=len(schedule),
        latencies=tuple(latencies),
        lags=tuple(lags),
        finished_s=max(0.0, last_answer - start - (schedule[0] if schedule else 0.0)),
        max_in_flight=max_in_flight,
        errors=dict(errors),
    )


async def open_alternating(
    calls: Sequence[Callable[[int], Awaitable[None]]], rate: float, seconds: float, seed: int
) -> list[OpenLoop]:
    """``open_loop`` of each of ``calls`` at ``rate``, about ``seconds`` each in all, in segments
    of at most OPEN_SEGMENT_S taking turns (``balanced``: A B B A B A A B); the k-th segment of
    each side in a cycle has the same arrival times. A segment's answers are all in before the
    next segment starts."""
    order = balanced(len(calls))
    per_cycle = len(order) // len(calls)  # segments of each side in a cycle
    segment_s = min(OPEN_SEGMENT_S, seconds / per_cycle)
    cycles = max(1, round(seconds / (segment_s * per_cycle)))
    parts: list[list[OpenLoop]] = [[] for _ in calls]
    for cycle in range(cycles):
        seen = Counter[int]()
        for index in order:
            rng = random.Random(f"{seed}-{cycle}-{seen[index]}")
            seen[index] += 1
            parts[index].append(await open_loop(calls[index], rate, segment_s, rng))
    return [OpenLoop.pooled(side) for side in parts]


async def compare_open(
    names: tuple[str, str],
    calls: tuple[Callable[[int], Awaitable[None]], Callable[[int], Awaitable[None]]],
    rate: float,
    seconds: float,
    seed: int,
    meter: CpuMeter,
    cpu: dict[str, dict[str, float]],
) -> tuple[OpenLoop, OpenLoop]:
    """The floor ``calls[0]`` and the measure ``calls[1]`` in an open loop at ``rate``, taking
    turns (``open_alternating``). Failed calls fail the bench."""
    say(
        f"open loop: {names[1]} and {names[0]} taking turns, {fmt_rate(rate)}/s offered (Poisson"
        f" arrivals), {seconds:g}s each in all"
    )
    snap = meter.snapshot()
    floor, measured = await open_alternating(calls, rate, seconds, seed)
    cpu[f"{names[1]} | {names[0]}, open loop"] = CpuMeter.usage(snap, meter.snapshot())
    for name, side in zip(names, (floor, measured), strict=True):
        fail_on_errors(f"{name} (open loop)", side.errors)
    for name, side in ((names[1], measured), (names[0], floor)):
        say(
            f"   {name}: p50 {ms(side.p(50))} / p99 {ms(side.p(99))} / p99.9 {ms(side.p(99.9))};"
            f" dispatch lag p99 {ms(percentile(side.lags, 99))}; at most {side.max_in_flight} in flight"
        )
    return floor, measured


# --- the bench ---------------------------------------------------------------------------------


@dataclass
class Options:
    customers: int
    concurrency: int
    seconds: float
    open_seconds: float
    json_path: Path | None
    cprofile_dir: Path | None


def first_check(answer: Mapping[str, Any], user_id: str, url: URL) -> None:
    """The profile GET answered the customer asked about."""
    if user_id not in {i.get("value") for i in answer.get("profile", {}).get("identifiers", [])}:
        raise BenchError(f"GET {url.path} answered another customer")


def service_pid(stack: BenchStack, service: suite.Service) -> int:
    return next(r.process.pid for r in stack.running if r.service.name == service.name)


async def run_bench(stack: BenchStack, options: Options, floor_url: str, floor_pid: int) -> dict[str, Any]:
    groups = stack.cpu_groups()
    for unused in ("service variants", "empty gRPC server (floors)"):  # this bench starts neither
        groups.pop(unused)
    groups["HTTP floor server"] = lambda: [floor_pid]
    meter = CpuMeter(groups)
    cpu: dict[str, dict[str, float]] = {}
    n, seconds = options.concurrency, options.seconds
    rng = random.Random(17)
    base_ns = time.time_ns() - 3 * 3_600_000_000_000  # carts idle for hours: abandoned
    customers = [
        customer_events(stack.run_id, i, rng, base_ns, views=0, cart_items=1 + i % 2)
        for i in range(options.customers)
    ]
    events = sum(len(c) for c in customers)
    user_ids = [user_id_of(stack.run_id, i) for i in range(options.customers)]

    say(f"load: {options.customers:,} customers with carts, {events:,} events; then wait until merged")
    snap = meter.snapshot()
    loaded = await load_customers(
        stack, batches_of(customers, SEND_BATCH), events, [MERGER, CATALOG], timeout_s=900, analyze=True
    )
    cpu["load + merge"] = CpuMeter.usage(snap, meter.snapshot())
    say(f"   merged after {loaded.consumers_done_s[MERGER]:.1f}s ({fmt_rate(loaded.merged_rate)} ev/s)")
    await check_merged(stack.database_url, events, options.customers)
    version = await create_template(stack, stack.target(suite.RENDER))
    say(f"template templates/{TEMPLATE_ID} version {version} published")

    shuffled = user_ids[:]
    random.Random(5).shuffle(shuffled)
    profile_base, render_base = http_base(stack, suite.PROFILE), http_base(stack, suite.RENDER)
    empty_urls = [URL(f"{floor_url}/empty")]
    profile_urls = [URL(f"{profile_base}/v1/profiles/user_id:{u}") for u in shuffled]
    render_urls = [
        URL(f"{render_base}/v1/templates/{TEMPLATE_ID}:render?profile=profiles/user_id:{u}") for u in shuffled
    ]
    ideal_urls = [URL(f"{floor_url}/ideal/{u}") for u in shuffled]
    cached_urls = [URL(f"{floor_url}/cached/{u}") for u in shuffled]
    keys = [cache_key(IdentifierKind.USER_ID, u) for u in shuffled]
    profile_pid, render_pid = service_pid(stack, suite.PROFILE), service_pid(stack, suite.RENDER)
    redis_client = redis.Redis.from_url(stack.redis_url)  # as the services create theirs (hiredis)
    render_answers: list[bytes] = []

    def one_at_a_time(
        names: tuple[str, str],
        calls: tuple[Callable[[int], Awaitable[None]], Callable[[int], Awaitable[None]]],
        pids: tuple[int, int],
    ) -> Awaitable[Pair]:
        return compare(
            names, calls, pids, meter, cpu, concurrency=1, seconds=seconds, segment_s=SEGMENT_ONE_S
        )

    ideal_answers: list[bytes] = []
    try:
        async with open_session(stack.admin_key) as session:
            empty = http_caller(session, empty_urls)
            say("warm: read every customer once (BatchGetProfiles), so that the Redis entries are full")
            await read_every_customer(stack, stack.target(suite.PROFILE), user_ids)
            say(f"floor: Redis GET of a cache entry from this process, 1 at a time and {n} concurrent")
            snap = meter.snapshot()
            redis_1 = await measure_redis_get(redis_client, keys, 1, seconds)
            redis_n = await measure_redis_get(redis_client, keys, n, seconds)
            cpu["Redis GET"] = CpuMeter.usage(snap, meter.snapshot())
            say(f"   p50 {ms(redis_1.p50_s)} (1), {ms(redis_n.p50_s)} ({n}); {fmt_rate(redis_n.rate)}/s")

            # Each path's measures follow its warm-up closely: render rewrites its last-known-good
            # copy of a profile at most once a minute. The profile service's copies in process
            # outlive the profile measures (NEAR_CACHE_TTL_S).
            say("warm: read every customer again: the profile service keeps copies in process")
            await read_every_customer(stack, stack.target(suite.PROFILE), user_ids)
            first_check(orjson.loads(await get(session, profile_urls[0])), shuffled[0], profile_urls[0])
            profile_get = http_caller(session, profile_urls)
            pids = (floor_pid, profile_pid)
            names = ("HTTP + Redis GET", "profile GET")
            profile_calls = (http_caller(session, cached_urls), profile_get)
            profile_1 = await one_at_a_time(names, profile_calls, pids)
            profile_1_empty = await one_at_a_time(("empty HTTP", "profile GET"), (empty, profile_get), pids)
            profile_n = await compare(
                names,
                profile_calls,
                pids,
                meter,
                cpu,
                concurrency=n,
                seconds=seconds,
                segment_s=SEGMENT_MANY_S,
                settle_s=SETTLE_MANY_S,
            )
            profile_rate = OPEN_LOOP_SHARE * profile_n.measured.measured.rate
            profile_open = await compare_open(
                ("empty HTTP", "profile GET"),
                (empty, profile_get),
                profile_rate,
                options.open_seconds,
                23,
                meter,
                cpu,
            )

            say(f"warm: render every customer once over HTTP ({n} concurrent), untimed")
            sample = await get(session, render_urls[0])
            if describe(sample) != RENDERED_LIVE:
                raise BenchError(f"the render GET did not render from the live profile: {describe(sample)}")
            warm = await measure(
                http_caller(session, render_urls), concurrency=n, duration_s=3600, max_calls=len(render_urls)
            )
            fail_on_errors("render warm-up", warm.errors)
            names = ("ideal render", "render GET")
            render_calls = (
                http_caller(session, ideal_urls, ideal_answers),
                http_caller(session, render_urls, render_answers),
            )
            pids = (floor_pid, render_pid)
            render_n = await compare(
                names,
                render_calls,
                pids,
                meter,
                cpu,
                concurrency=n,
                seconds=seconds,
                segment_s=SEGMENT_N_S,
                settle_s=SETTLE_N_S,
            )
            render_1 = await one_at_a_time(names, render_calls, pids)
            render_rate = OPEN_LOOP_SHARE * render_n.measured.measured.rate
            render_open = await compare_open(
                ("empty HTTP", "render GET"),
                (empty, render_calls[1]),
                render_rate,
                options.open_seconds,
                29,
                meter,
                cpu,
            )
    finally:
        await redis_client.aclose()

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "source": source_info(),
        "options": {
            "customers": options.customers,
            "events": events,
            "concurrency": n,
            "seconds_per_measure": seconds,
            "open_loop_seconds": options.open_seconds,
            "open_loop_share_of_throughput": OPEN_LOOP_SHARE,
            "cprofile": options.cprofile_dir is not None,
            "render_answer_bytes": len(sample),
        },
        "load": {"events": events, "merged_after_s": loaded.consumers_done_s[MERGER]},
        "redis_get": {"one_at_a_time": redis_1.as_json(), "concurrent": redis_n.as_json()},
        "profile_get": {
            "one_at_a_time": profile_1.as_json(),
            "one_at_a_time_vs_empty_http": profile_1_empty.as_json(),
            "concurrent": profile_n.as_json(),
        },
        "render_get": {
            "one_at_a_time": render_1.as_json(),
            "concurrent": render_n.as_json(),
            "outcomes": outcomes_of(render_answers),
            "ideal_outcomes": outcomes_of(ideal_answers),
        },
        "open_loop": {
            "profile_get": {"floor": profile_open[0].as_json(), "measured": profile_open[1].as_json()},
            "render_get": {"floor": render_open[0].as_json(), "measured": render_open[1].as_json()},
        },
        "goals": {
            "profile_p50_vs_http_redis_get": {"value": profile_1.ratio, "goal": GOAL_PROFILE_VS_FLOOR},
            "render_p50_vs_ideal": {"value": render_n.ratio, "goal": GOAL_RENDER_VS_IDEAL},
            "open_loop_profile_p99_s": {"value": profile_open[1].p(99), "goal": GOAL_OPEN_LOOP_P99_S},
        },
        "cpu_percent_of_one_core": cpu,
    }


def _outcomes(outcomes: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {count:,}" for name, count in sorted(outcomes.items(), key=lambda kv: -kv[1]))


def _both(measured: Mapping[str, Any]) -> str:
    return f"{ms(measured['p50_s'])} / {ms(measured['p99_s'])}"


def _us(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1e6:,.0f} us"


def _pair_rows(
    label: str, unit: str, floor_name: str, pair: Mapping[str, Any], goal: tuple[str, bool] | None
) -> list[Row]:
    """The rows of one ``Pair`` (as JSON): p50 (with the goal when given), p99, rate, CPU."""
    floor, measured = pair["floor"], pair["measured"]
    return [
        Row(
            f"{label} p50",
            ms(measured["p50_s"]),
            f"{floor_name} p50 {ms(floor['p50_s'])} (taking turns)",
            f"{pair['p50_ratio']:.2f} x",
            *((goal[0], verdict(goal[1])) if goal else ()),
        ),
        Row(
            "  p99",
            ms(measured["p99_s"]),
            f"{floor_name} p99 {ms(floor['p99_s'])}",
            fmt_ratio(measured["p99_s"], floor["p99_s"]),
        ),
        Row(
            f"  {unit}/s",
            fmt_rate(measured["per_s"]),
            f"{floor_name} {fmt_rate(floor['per_s'])}/s",
            fmt_ratio(measured["per_s"], floor["per_s"]),
        ),
        Row(
            "  server process CPU per call",
            _us(measured["server_cpu_per_call_s"]),
            f"{floor_name} {_us(floor['server_cpu_per_call_s'])}",
            fmt_ratio(measured["server_cpu_per_call_s"], floor["server_cpu_per_call_s"]),
        ),
    ]


def _open_rows(label: str, pair: Mapping[str, Any], rate_of: str, *, goal: bool) -> list[Row]:
    floor, measured = pair["floor"], pair["measured"]

    def tail(m: Mapping[str, Any]) -> str:
        return f"{ms(m['p50_s'])} / {ms(m['p999_s'])} / {ms(m['max_s'])}"

    def lag(m: Mapping[str, Any]) -> str:
        return f"{ms(m['dispatch_lag_p50_s'])} / {ms(m['dispatch_lag_p99_s'])}"

    return [
        Row(
            f"{label}, open loop at {fmt_rate(measured['offered_per_s'])}/s: p99",
            ms(measured["p99_s"]),
            f"empty HTTP at that rate p99 {ms(floor['p99_s'])} (taking turns)",
            fmt_ratio(measured["p99_s"], floor["p99_s"]),
            *(
                (f"<= {GOAL_OPEN_LOOP_P99_S * 1000:g} ms", verdict(measured["p99_s"] <= GOAL_OPEN_LOOP_P99_S))
                if goal
                else ()
            ),
        ),
        Row(
            f"  ({rate_of}) p50 / p99.9 / max",
            tail(measured),
            f"empty HTTP {tail(floor)}",
            fmt_ratio(measured["p50_s"], floor["p50_s"]),
        ),
        Row("  client's dispatch lag p50 / p99", lag(measured), f"empty HTTP {lag(floor)}"),
    ]


def report(results: Mapping[str, Any]) -> str:
    options = results["options"]
    n = options["concurrency"]
    redis1, redisn = results["redis_get"]["one_at_a_time"], results["redis_get"]["concurrent"]
    profile1, profilen = results["profile_get"]["one_at_a_time"], results["profile_get"]["concurrent"]
    profile1_empty = results["profile_get"]["one_at_a_time_vs_empty_http"]
    render = results["render_get"]
    render1, rendern = render["one_at_a_time"], render["concurrent"]
    profile_open, render_open = results["open_loop"]["profile_get"], results["open_loop"]["render_get"]
    rows = [
        *_pair_rows(
            "profile GET hit (1 at a time)",
            "calls",
            "HTTP + Redis GET",
            profile1,
            (f"<= {GOAL_PROFILE_VS_FLOOR} x", profile1["p50_ratio"] <= GOAL_PROFILE_VS_FLOOR),
        ),
        *_pair_rows("  the same", "calls", "empty HTTP", profile1_empty, None)[:1],
        *_pair_rows(f"profile GET hit ({n} concurrent)", "calls", "HTTP + Redis GET", profilen, None),
        *_pair_rows(
            f"render GET ({n} concurrent)",
            "renders",
            "ideal render",
            rendern,
            (f"<= {GOAL_RENDER_VS_IDEAL} x", rendern["p50_ratio"] <= GOAL_RENDER_VS_IDEAL),
        ),
        *_pair_rows("render GET (1 at a time)", "renders", "ideal render", render1, None),
        *_open_rows(
            "profile GET",
            profile_open,
            f"half the {fmt_rate(profilen['measured']['per_s'])}/s at {n}",
            goal=True,
        ),
        *_open_rows(
            "render GET",
            render_open,
            f"half the {fmt_rate(rendern['measured']['per_s'])}/s at {n}",
            goal=False,
        ),
        Row("floor: Redis GET p50 / p99 (1 at a time)", _both(redis1)),
        Row(f"  p50 / p99; calls/s ({n} concurrent)", f"{_both(redisn)}; {fmt_rate(redisn['per_s'])}"),
    ]
    machine = results["machine"]
    lines = [
        "",
        f"Sendtime bench-http, {results['date']}: {machine['cores']} cores ({machine['cpu_model']}),"
        f" load average {machine['load_average_1m_before']} before the run",
        f"{options['customers']:,} customers ({options['events']:,} events); render answer"
        f" {options['render_answer_bytes']:,} B; {options['seconds_per_measure']:g}s per closed-loop"
        f" measure, {options['open_loop_seconds']:g}s per open-loop one (each side, taking turns)",
    ]
    lines += report_warnings(results, options["cprofile"])
    render_outcomes = Counter(render["outcomes"])
    not_live = sum(count for name, count in render_outcomes.items() if name != RENDERED_LIVE)
    if not_live:
        lines.append(f"WARNING: {not_live:,} render answers were not rendered from the live profile.")

    def halves(pair: Mapping[str, Any]) -> str:
        return " / ".join(f"{r:.2f}" for r in pair["p50_ratio_by_half"])

    lines += [
        "",
        render_table(rows),
        "",
        "p50 ratio to the floor in the first / second half of the turns: profile GET"
        f" {halves(profile1)} (1, beside HTTP + Redis GET), {halves(profile1_empty)} (1, beside empty"
        f" HTTP), {halves(profilen)} ({n}); render GET {halves(rendern)} ({n}),"
        f" {halves(render1)} (1). Server CPU per call is the serving process's own: a render's"
        " profile lookup also costs the profile service.",
        "",
        "Render answers (status/profile source/fallback reason):",
        f"  render GET, closed loop: {_outcomes(render['outcomes'])}",
        f"  ideal render: {_outcomes(render['ideal_outcomes'])}",
        "",
        f"CPU, % of one core ({machine['cores']} cores:"
        f" {100 * (machine['cores'] or 1)}% is the whole machine):",
        render_cpu(results["cpu_percent_of_one_core"]),
        "",
        "Goals are reported, not enforced: the exit code is 0 unless the bench itself failed"
        " (any answer but 200 fails it).",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_http.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve-floor", help="serve the HTTP floors (the bench starts it itself)")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--redis", required=True)
    serve.add_argument("--template", type=Path, required=True)
    parser.add_argument(
        "--customers", type=int, default=3000, help="customers with carts, 2.5 events each (default 3000)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=64, help="concurrent calls in the throughput measures (default 64)"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=4.0,
        help="seconds per closed-loop measure, each side of it (default 4)",
    )
    parser.add_argument(
        "--open-seconds",
        type=float,
        default=10.0,
        help="seconds per open-loop measure, each side of it (default 10)",
    )
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.command is None and (
        args.customers < 1 or args.concurrency < 1 or min(args.seconds, args.open_seconds) <= 0
    ):
        parser.error("--customers and --concurrency must be at least 1; the seconds positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "serve-floor":
        asyncio.run(serve_floor(args.port, args.redis, args.template))
        return 0
    os.environ.setdefault("PROFILE_NEAR_CACHE_TTL_SECONDS", str(NEAR_CACHE_TTL_S))  # the stack's
    options = Options(
        customers=args.customers,
        concurrency=args.concurrency,
        seconds=args.seconds,
        open_seconds=args.open_seconds,
        json_path=args.json,
        cprofile_dir=args.cprofile,
    )

    def run(stack: BenchStack) -> dict[str, Any]:
        with floor_server(stack) as (floor_url, floor_pid):
            return asyncio.run(run_bench(stack, options, floor_url, floor_pid))

    return run_bench_main(
        "bench-http",
        [suite.PROFILE, suite.INGEST, suite.RENDER],
        cprofile_dir=options.cprofile_dir,
        json_path=options.json_path,
        measure=run,
        report=report,
    )


if __name__ == "__main__":
    sys.exit(main())
