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
   ``GET /ideal/{user}`` makes one Redis GET of the profile service's cache entry and renders
   the same template with bench_render.IdealRenderer (render's own compiler and context code)
   into canonical JSON as the gateway does: the least work a render over HTTP could do. No key
   check, no interceptor, no tracing. Also a bare Redis GET of a cache entry from this process
   (redis.asyncio with hiredis, as the services);
3. every measure uses one aiohttp ClientSession (connections kept alive, ``Authorization:
   Bearer`` with the stack's key), customers in random order, each closed-loop measure for
   ``--seconds`` one call at a time (p50, p99), then with ``--concurrency`` callers (throughput,
   p50, p99), after a short warm-up: the floors above (empty HTTP, Redis GET, ideal render);
   then, after a second read of every customer (the profile service then keeps copies in
   process: a send's GetProfile is a hit), ``GET /v1/profiles/user_id:<u>``; then, after one
   untimed render of every customer (render's template caches and last-known-good copies warm),
   ``GET /v1/templates/abandoned-cart:render?profile=profiles/user_id:<u>``;
4. open loop, right after each of those two closed-loop measures: the same GET offered at half
   its closed-loop throughput at ``--concurrency`` for ``--open-seconds``, arrivals a Poisson
   process (seeded). Each request is sent at its scheduled time whatever is still in flight,
   and its latency is counted from that scheduled time, so a stall of the server (or of this
   process) counts in full for every request it delays (no coordinated omission): p50, p99,
   p99.9; and how late this process sent requests (dispatch lag), which is inside those figures.
   Before each, its floor: the empty HTTP call offered at the same rate with the same arrival
   times, which shows what the client, the kernel and the machine's two cores add on their own.

Any answer other than 200 is counted and then fails the bench (exit 1); so does an error of the
connection. A render answer that is not RENDERED from the LIVE profile is reported. Goals
(PASS/MISS, never a failing exit code, as the other benches): profile hit p50 one at a time at
most 1.5 x the empty HTTP call's; render p50 at ``--concurrency`` at most 2 x the ideal
render's; open-loop p99 at most 5 ms for both. Defaults take about 100 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
    SEND_BATCH,
    Measured,
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
from bench_render import CATALOG, TEMPLATE, TEMPLATE_ID, IdealRenderer, create_template
from google.protobuf import json_format
from yarl import URL

import devstack
import suite
from profile_service.cache import cache_key
from sendtime.render.v1 import render_pb2
from sendtime_common.http_server import HttpListener
from sendtime_common.identifiers import IdentifierKind
from sendtime_common.tls import TlsSettings

GOAL_PROFILE_VS_EMPTY = 1.5  # profile hit p50 / empty HTTP p50, one at a time
GOAL_RENDER_VS_IDEAL = 2.0  # render p50 / ideal render p50, at --concurrency
GOAL_OPEN_LOOP_P99_S = 0.005
OPEN_LOOP_SHARE = 0.5  # of the closed-loop throughput
CALL_TIMEOUT_S = 10.0  # the client's; render answers within its own 1 s default deadline
MAX_CONNECTIONS = 1024  # the session's pool: the open loop opens as many as it has in flight
WARM_UP_S = 0.5  # at --concurrency before each closed-loop measure (--seconds if shorter)
EMPTY_BODY = orjson.dumps({"ok": True})
RENDERED_LIVE = "RENDERED/LIVE"


# --- the floor server --------------------------------------------------------------------------


def floor_app(client: redis.Redis, renderer: IdealRenderer) -> web.Application:
    """``GET /empty``: a tiny JSON object. ``GET /ideal/{user}``: the profile service's cache
    entry for user id ``user`` (one Redis GET) rendered with the ideal path's code, answered as
    the gateway answers a RenderResponse (canonical JSON, orjson)."""

    async def empty(request: web.Request) -> web.Response:
        return web.Response(body=EMPTY_BODY, content_type="application/json")

    async def ideal(request: web.Request) -> web.Response:
        entry = await client.get(cache_key(IdentifierKind.USER_ID, request.match_info["user"]))
        response = renderer.render(entry, {})  # a GET carries no variables
        return web.Response(
            body=orjson.dumps(json_format.MessageToDict(response)), content_type="application/json"
        )

    app = web.Application()
    app.router.add_get("/empty", empty)
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


@dataclass(frozen=True, slots=True)
class Closed:
    """One path measured one call at a time and with ``concurrency`` callers."""

    one: Measured
    many: Measured
    outcomes: dict[str, int] = field(default_factory=dict)  # render answers, both measures

    def as_json(self) -> dict[str, Any]:
        return {
            "one_at_a_time": self.one.as_json(),
            "concurrent": self.many.as_json(),
            "outcomes": self.outcomes,
        }


async def measure_closed(
    name: str,
    call: Callable[[int], Awaitable[None]],
    concurrency: int,
    seconds: float,
    meter: CpuMeter,
    cpu: dict[str, dict[str, float]],
    answers: list[bytes] | None = None,
) -> Closed:
    """``call`` warmed up at ``concurrency``, then one at a time and at ``concurrency`` for
    ``seconds`` each; the CPU of both in ``cpu[name]``. Failed calls fail the bench."""
    say(f"{name}: 1 at a time, then {concurrency} concurrent ({seconds:g}s each)")
    warm = await measure(call, concurrency=concurrency, duration_s=min(WARM_UP_S, seconds))
    fail_on_errors(f"{name} (warm-up)", warm.errors)
    if answers is not None:
        answers.clear()
    snap = meter.snapshot()
    one = await measure(call, concurrency=1, duration_s=seconds)
    many = await measure(call, concurrency=concurrency, duration_s=seconds)
    cpu[name] = CpuMeter.usage(snap, meter.snapshot())
    fail_on_errors(name, Counter(one.errors) + Counter(many.errors))
    outcomes = dict(Counter(describe(a) for a in answers)) if answers is not None else {}
    say(
        f"   p50 {ms(one.p50_s)} / p99 {ms(one.p99_s)} (1); p50 {ms(many.p50_s)} / p99 {ms(many.p99_s)},"
        f" {fmt_rate(many.rate)}/s ({concurrency})"
    )
    return Closed(one, many, outcomes)


@dataclass(frozen=True, slots=True)
class OpenLoop:
    """Requests offered at ``rate`` per second (Poisson arrivals) for ``seconds``: latencies
    from each request's scheduled send time to its answer, and how late each was sent."""

    rate: float
    seconds: float
    offered: int
    latencies: tuple[float, ...] = field(repr=False)
    lags: tuple[float, ...] = field(repr=False)
    finished_s: float  # first scheduled send -> last answer
    max_in_flight: int
    errors: dict[str, int]
    outcomes: dict[str, int]

    def p(self, q: float) -> float:
        return percentile(self.latencies, q)

    def as_json(self) -> dict[str, Any]:
        return {
            "offered_per_s": self.rate,
            "seconds": self.seconds,
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
            "outcomes": self.outcomes,
        }


def poisson_schedule(rate: float, seconds: float, rng: random.Random) -> list[float]:
    """Send times (seconds from the start) of a Poisson process of ``rate`` over ``seconds``."""
    times: list[float] = []
    at = rng.expovariate(rate)
    while at < seconds:
        times.append(at)
        at += rng.expovariate(rate)
    return times


async def open_loop(
    call: Callable[[int], Awaitable[None]],
    rate: float,
    seconds: float,
    rng: random.Random,
    answers: list[bytes] | None = None,
) -> OpenLoop:
    """Each request sent at its scheduled time (``poisson_schedule``) as a task of its own,
    whatever is still in flight; latency counted from the scheduled time. The count of requests
    is fixed by the schedule, so the run ends by itself."""
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
    outcomes = dict(Counter(describe(a) for a in answers)) if answers is not None else {}
    return OpenLoop(
        rate=rate,
        seconds=seconds,
        offered=len(schedule),
        latencies=tuple(latencies),
        lags=tuple(lags),
        finished_s=max(0.0, last_answer - start - (schedule[0] if schedule else 0.0)),
        max_in_flight=max_in_flight,
        errors=dict(errors),
        outcomes=outcomes,
    )


async def measure_open(
    name: str,
    call: Callable[[int], Awaitable[None]],
    rate: float,
    seconds: float,
    meter: CpuMeter,
    cpu: dict[str, dict[str, float]],
    rng: random.Random,
    answers: list[bytes] | None = None,
) -> OpenLoop:
    say(f"{name}, open loop: {fmt_rate(rate)}/s offered (Poisson arrivals) for {seconds:g}s")
    if answers is not None:
        answers.clear()
    snap = meter.snapshot()
    result = await open_loop(call, rate, seconds, rng, answers)
    cpu[f"{name}, open loop"] = CpuMeter.usage(snap, meter.snapshot())
    fail_on_errors(f"{name} (open loop)", result.errors)
    say(
        f"   p50 {ms(result.p(50))} / p99 {ms(result.p(99))} / p99.9 {ms(result.p(99.9))};"
        f" dispatch lag p99 {ms(percentile(result.lags, 99))}; at most {result.max_in_flight} in flight"
    )
    return result


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


async def run_bench(stack: BenchStack, options: Options, floor_url: str, floor_pid: int) -> dict[str, Any]:
    groups = stack.cpu_groups()
    for unused in ("service variants", "empty gRPC server (floors)"):  # this bench starts neither
        groups.pop(unused)
    groups["HTTP floor server"] = lambda: [floor_pid]
    meter = CpuMeter(groups)
    cpu: dict[str, dict[str, float]] = {}
    n = options.concurrency
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
    keys = [cache_key(IdentifierKind.USER_ID, u) for u in shuffled]
    redis_client = redis.Redis.from_url(stack.redis_url)  # as the services create theirs (hiredis)
    answers: list[bytes] = []
    try:
        async with open_session(stack.admin_key) as session:
            # Each path's measures follow its warm-up closely: the profile service's copies in
            # process live 60 s (PROFILE_NEAR_CACHE_TTL_SECONDS), render rewrites its
            # last-known-good copy of a profile at most once a minute.
            say("warm: read every customer once (BatchGetProfiles), so that the Redis entries are full")
            await read_every_customer(stack, stack.target(suite.PROFILE), user_ids)
            say("floors: the floor server's GET /empty and GET /ideal/{user}, and Redis GET from here")
            empty = await measure_closed(
                "empty HTTP", http_caller(session, empty_urls), n, options.seconds, meter, cpu
            )
            say(f"Redis GET: 1 at a time, then {n} concurrent ({options.seconds:g}s each)")
            snap = meter.snapshot()
            redis_one = await measure_redis_get(redis_client, keys, 1, options.seconds)
            redis_many = await measure_redis_get(redis_client, keys, n, options.seconds)
            cpu["Redis GET"] = CpuMeter.usage(snap, meter.snapshot())
            say(
                f"   p50 {ms(redis_one.p50_s)} (1), {ms(redis_many.p50_s)} ({n});"
                f" {fmt_rate(redis_many.rate)}/s"
            )
            redis_get_floor = Closed(redis_one, redis_many)
            ideal = await measure_closed(
                "ideal render",
                http_caller(session, ideal_urls, answers),
                n,
                options.seconds,
                meter,
                cpu,
                answers,
            )

            say("warm: read every customer again: the profile service keeps copies in process")
            await read_every_customer(stack, stack.target(suite.PROFILE), user_ids)
            first_check(orjson.loads(await get(session, profile_urls[0])), shuffled[0], profile_urls[0])
            profile = await measure_closed(
                "profile GET", http_caller(session, profile_urls), n, options.seconds, meter, cpu
            )
            empty_open_profile = await measure_open(
                "empty HTTP (floor)",
                http_caller(session, empty_urls),
                OPEN_LOOP_SHARE * profile.many.rate,
                options.open_seconds,
                meter,
                cpu,
                random.Random(23),
            )
            profile_open = await measure_open(
                "profile GET",
                http_caller(session, profile_urls),
                OPEN_LOOP_SHARE * profile.many.rate,
                options.open_seconds,
                meter,
                cpu,
                random.Random(23),
            )

            say(f"warm: render every customer once over HTTP ({n} concurrent), untimed")
            sample = await get(session, render_urls[0])
            if describe(sample) != RENDERED_LIVE:
                raise BenchError(f"the render GET did not render from the live profile: {describe(sample)}")
            warm = await measure(
                http_caller(session, render_urls), concurrency=n, duration_s=3600, max_calls=len(render_urls)
            )
            fail_on_errors("render warm-up", warm.errors)
            render = await measure_closed(
                "render GET",
                http_caller(session, render_urls, answers),
                n,
                options.seconds,
                meter,
                cpu,
                answers,
            )
            empty_open_render = await measure_open(
                "empty HTTP (floor)",
                http_caller(session, empty_urls),
                OPEN_LOOP_SHARE * render.many.rate,
                options.open_seconds,
                meter,
                cpu,
                random.Random(29),
            )
            render_open = await measure_open(
                "render GET",
                http_caller(session, render_urls, answers),
                OPEN_LOOP_SHARE * render.many.rate,
                options.open_seconds,
                meter,
                cpu,
                random.Random(29),
                answers,
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
            "seconds_per_measure": options.seconds,
            "open_loop_seconds": options.open_seconds,
            "open_loop_share_of_throughput": OPEN_LOOP_SHARE,
            "cprofile": options.cprofile_dir is not None,
            "render_answer_bytes": len(sample),
        },
        "load": {"events": events, "merged_after_s": loaded.consumers_done_s[MERGER]},
        "floors": {
            "empty_http": empty.as_json(),
            "redis_get": redis_get_floor.as_json(),
            "ideal_render": ideal.as_json(),
        },
        "profile_get": profile.as_json(),
        "render_get": render.as_json(),
        "open_loop": {
            "profile_get": profile_open.as_json(),
            "render_get": render_open.as_json(),
            "empty_http_at_profile_rate": empty_open_profile.as_json(),
            "empty_http_at_render_rate": empty_open_render.as_json(),
        },
        "goals": {
            "profile_p50_vs_empty_http": {
                "value": profile.one.p50_s / empty.one.p50_s,
                "goal": GOAL_PROFILE_VS_EMPTY,
            },
            "render_p50_vs_ideal": {
                "value": render.many.p50_s / ideal.many.p50_s,
                "goal": GOAL_RENDER_VS_IDEAL,
            },
            "open_loop_profile_p99_s": {"value": profile_open.p(99), "goal": GOAL_OPEN_LOOP_P99_S},
            "open_loop_render_p99_s": {"value": render_open.p(99), "goal": GOAL_OPEN_LOOP_P99_S},
        },
        "cpu_percent_of_one_core": cpu,
    }


def _ratio(value: float, floor: float) -> str:
    return "n/a" if not floor or math.isnan(value) or math.isnan(floor) else f"{value / floor:.2f} x"


def _outcomes(outcomes: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {count:,}" for name, count in sorted(outcomes.items(), key=lambda kv: -kv[1]))


def report(results: Mapping[str, Any]) -> str:
    options, floors = results["options"], results["floors"]
    n = options["concurrency"]
    empty1, emptyn = floors["empty_http"]["one_at_a_time"], floors["empty_http"]["concurrent"]
    redis1, redisn = floors["redis_get"]["one_at_a_time"], floors["redis_get"]["concurrent"]
    ideal1, idealn = floors["ideal_render"]["one_at_a_time"], floors["ideal_render"]["concurrent"]
    profile1, profilen = results["profile_get"]["one_at_a_time"], results["profile_get"]["concurrent"]
    render1, rendern = results["render_get"]["one_at_a_time"], results["render_get"]["concurrent"]
    profile_open, render_open = results["open_loop"]["profile_get"], results["open_loop"]["render_get"]

    def both(measured: Mapping[str, Any]) -> str:
        return f"{ms(measured['p50_s'])} / {ms(measured['p99_s'])}"

    def open_rows(
        name: str, measured: Mapping[str, Any], floor: Mapping[str, Any], closed: Mapping[str, Any]
    ) -> list[Row]:
        def tail(m: Mapping[str, Any]) -> str:
            return f"{ms(m['p50_s'])} / {ms(m['p999_s'])} / {ms(m['max_s'])}"

        def lag(m: Mapping[str, Any]) -> str:
            return f"{ms(m['dispatch_lag_p50_s'])} / {ms(m['dispatch_lag_p99_s'])}"

        return [
            Row(
                f"{name}, open loop at {fmt_rate(measured['offered_per_s'])}/s: p99",
                ms(measured["p99_s"]),
                f"empty HTTP at that rate p99 {ms(floor['p99_s'])}",
                _ratio(measured["p99_s"], floor["p99_s"]),
                f"<= {GOAL_OPEN_LOOP_P99_S * 1000:g} ms",
                verdict(measured["p99_s"] <= GOAL_OPEN_LOOP_P99_S),
            ),
            Row(
                f"  (half the {fmt_rate(closed['per_s'])}/s at {n} concurrent) p50 / p99.9 / max",
                tail(measured),
                f"empty HTTP {tail(floor)}",
                _ratio(measured["p50_s"], floor["p50_s"]),
            ),
            Row("  client's dispatch lag p50 / p99", lag(measured), f"empty HTTP {lag(floor)}"),
        ]

    profile_ratio = profile1["p50_s"] / empty1["p50_s"]
    render_ratio = rendern["p50_s"] / idealn["p50_s"]
    rows = [
        Row(
            "profile GET hit p50 (1 at a time)",
            ms(profile1["p50_s"]),
            f"empty HTTP p50 {ms(empty1['p50_s'])}",
            f"{profile_ratio:.2f} x",
            f"<= {GOAL_PROFILE_VS_EMPTY} x",
            verdict(profile_ratio <= GOAL_PROFILE_VS_EMPTY),
        ),
        Row(
            "",
            "",
            f"empty HTTP + Redis GET p50 {ms(empty1['p50_s'] + redis1['p50_s'])}",
            _ratio(profile1["p50_s"], empty1["p50_s"] + redis1["p50_s"]),
        ),
        Row(
            "  p99 (1 at a time)",
            ms(profile1["p99_s"]),
            f"empty HTTP p99 {ms(empty1['p99_s'])}",
            _ratio(profile1["p99_s"], empty1["p99_s"]),
        ),
        Row(
            f"  p50 / p99 ({n} concurrent)",
            both(profilen),
            f"empty HTTP {both(emptyn)}",
            _ratio(profilen["p50_s"], emptyn["p50_s"]),
        ),
        Row(
            f"  calls/s ({n} concurrent)",
            fmt_rate(profilen["per_s"]),
            f"empty HTTP {fmt_rate(emptyn['per_s'])}/s",
            _ratio(profilen["per_s"], emptyn["per_s"]),
        ),
        Row(
            f"render GET p50 ({n} concurrent)",
            ms(rendern["p50_s"]),
            f"ideal render p50 {ms(idealn['p50_s'])}",
            f"{render_ratio:.2f} x",
            f"<= {GOAL_RENDER_VS_IDEAL} x",
            verdict(render_ratio <= GOAL_RENDER_VS_IDEAL),
        ),
        Row(
            f"  p99 ({n} concurrent)",
            ms(rendern["p99_s"]),
            f"ideal render p99 {ms(idealn['p99_s'])}",
            _ratio(rendern["p99_s"], idealn["p99_s"]),
        ),
        Row(
            f"  renders/s ({n} concurrent)",
            fmt_rate(rendern["per_s"]),
            f"ideal render {fmt_rate(idealn['per_s'])}/s",
            _ratio(rendern["per_s"], idealn["per_s"]),
        ),
        Row(
            "  p50 / p99 (1 at a time)",
            both(render1),
            f"ideal render {both(ideal1)}",
            _ratio(render1["p50_s"], ideal1["p50_s"]),
        ),
        *open_rows("profile GET", profile_open, results["open_loop"]["empty_http_at_profile_rate"], profilen),
        *open_rows("render GET", render_open, results["open_loop"]["empty_http_at_render_rate"], rendern),
        Row("floor: empty HTTP p50 / p99 (1 at a time)", both(empty1)),
        Row(f"  p50 / p99; calls/s ({n} concurrent)", f"{both(emptyn)}; {fmt_rate(emptyn['per_s'])}"),
        Row("floor: Redis GET p50 / p99 (1 at a time)", both(redis1)),
        Row(f"  p50 / p99; calls/s ({n} concurrent)", f"{both(redisn)}; {fmt_rate(redisn['per_s'])}"),
        Row("floor: ideal render p50 / p99 (1 at a time)", both(ideal1)),
        Row(f"  p50 / p99; renders/s ({n} concurrent)", f"{both(idealn)}; {fmt_rate(idealn['per_s'])}"),
    ]
    machine = results["machine"]
    lines = [
        "",
        f"Sendtime bench-http, {results['date']}: {machine['cores']} cores ({machine['cpu_model']}),"
        f" load average {machine['load_average_1m_before']} before the run",
        f"{options['customers']:,} customers ({options['events']:,} events); render answer"
        f" {options['render_answer_bytes']:,} B; {options['seconds_per_measure']:g}s per closed-loop measure,"
        f" {options['open_loop_seconds']:g}s per open-loop one",
    ]
    lines += report_warnings(results, options["cprofile"])
    render_outcomes = Counter(results["render_get"]["outcomes"]) + Counter(render_open["outcomes"])
    not_live = sum(count for name, count in render_outcomes.items() if name != RENDERED_LIVE)
    if not_live:
        lines.append(f"WARNING: {not_live:,} render answers were not rendered from the live profile.")
    lines += [
        "",
        render_table(rows),
        "",
        "Render answers (status/profile source/fallback reason):",
        f"  closed loop: {_outcomes(results['render_get']['outcomes'])}",
        f"  open loop: {_outcomes(render_open['outcomes'])}",
        f"  ideal render: {_outcomes(floors['ideal_render']['outcomes'])}",
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
        "--seconds", type=float, default=3.0, help="seconds per closed-loop measure (default 3)"
    )
    parser.add_argument(
        "--open-seconds", type=float, default=10.0, help="seconds per open-loop measure (default 10)"
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
