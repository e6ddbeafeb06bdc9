"""``make soak``: the services under a steady mixed load for a long time (30 minutes by default),
at half the maximum rate; their memory, open files, asyncio tasks and database pools must stay
flat, and each call's p99 stable (docs/reliability.md).

The soak starts a private stack (bench_common.BenchStack: NATS, Redis, a fresh database, and
profile, ingest and render as processes with their metrics ports), loads customers and
publishes a template, then:

1. calibrates: a closed loop of the mixed load (SendEvents of one product view, GetProfile, and
   Render of the stored template, in turn, for the loaded customers) at ``--concurrency`` for
   ``--calibrate-s``: the maximum rate this machine answers;
2. runs an open loop (Poisson arrivals, latency from each call's scheduled time) at half of it,
   or ``--rate``, for ``--duration-s``;
3. samples each service every ``--sample-s`` (and once before the load): its RSS and open file
   descriptors (psutil; and the descriptors by kind: connections to each dependency, callers',
   pipes...), its ``sendtime_asyncio_tasks`` and ``sendtime_db_pool_connections``
   from its metrics port; and per window, each call's p50, p99 and errors.

Verdicts (``flatness``): after ``--warmup-windows``, the mean of the last third of a quantity's
samples may exceed the mean of the first third by at most its allowance (``LIMITS``: the larger
of an absolute and a relative amount); the p99 of each call likewise (``P99_LIMIT``); and no call
may fail. The report prints each series over time and each verdict; it exits 3 when a verdict
fails (1 when the soak could not run).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import random
import sys
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import grpc
import psutil
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
    run_bench_main,
    say,
    source_info,
    timestamp_from_ns,
)
from bench_profile import (
    GET_PROFILE,
    MERGER,
    PRODUCTS,
    SEND_BATCH,
    SEND_EVENTS,
    batches_of,
    customer_events,
    get_request,
    load_customers,
    measure,
    read_every_customer,
    user_id_of,
)
from bench_render import CATALOG, RENDER, create_template, describe, render_request, user_identifier
from google.type import money_pb2
from prometheus_client.parser import text_string_to_metric_families

import suite
from sendtime.ingest.v1 import ingest_pb2
from sendtime.render.v1 import render_pb2

# Triggers is not started: it needs keys and a secret of its own that BenchStack does not make.
SERVICES = (suite.PROFILE, suite.INGEST, suite.RENDER)
KINDS = ("SendEvents", "GetProfile", "Render")  # the i-th call of the mix is KINDS[i % 3]
CALL_TIMEOUT_S = 5.0
LOAD_SHARE = 0.5  # of the calibrated maximum rate
EXIT_VERDICT_FAILED = 3


# --- verdicts (pure) ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Allowance:
    """How much a quantity may grow from the first third of a soak to the last: the larger of
    ``absolute`` (in the quantity's unit) and ``relative`` (a share of the first third's mean)."""

    absolute: float
    relative: float

    def of(self, first: float) -> float:
        return max(self.absolute, self.relative * abs(first))


MIB = 1024 * 1024
# Per process. RSS: a Python process's heap settles after its first minutes; a leak of 1 kB a
# call at a few hundred calls/s is megabytes a minute. Tasks and pool in use are instantaneous
# counts under load, so a few either way is noise, not a trend.
LIMITS: Mapping[str, Allowance] = {
    "rss_bytes": Allowance(16 * MIB, 0.10),
    "open_fds": Allowance(8, 0.10),
    "asyncio_tasks": Allowance(10, 0.20),
    "db_pool_in_use": Allowance(3, 0.50),
    "db_pool_open": Allowance(2, 0.0),
}
P99_LIMIT = Allowance(0.005, 0.50)  # seconds; a shared 2-core machine's p99 is noisy


@dataclass(frozen=True, slots=True)
class Flatness:
    """A series' verdict: ``flat`` is None when fewer than 3 samples follow the warm-up."""

    samples: int
    first: float  # mean of the first third of the samples after the warm-up
    last: float  # mean of the last third
    allowed: float
    flat: bool | None

    @property
    def growth(self) -> float:
        return self.last - self.first


def flatness(series: Sequence[float], allowance: Allowance, *, warmup: int) -> Flatness:
    """Whether ``series`` (oldest first) stays flat once its first ``warmup`` samples are
    dropped: the last third's mean exceeds the first third's by at most ``allowance``. NaN
    samples (a window without calls of a kind) are left out. Only growth counts: a quantity
    that falls after the warm-up (a cache trimmed, a pool shrunk) is flat."""
    kept = [value for value in series[warmup:] if not math.isnan(value)]
    if len(kept) < 3:
        return Flatness(len(kept), math.nan, math.nan, math.nan, None)
    third = len(kept) // 3
    first = sum(kept[:third]) / third
    last = sum(kept[-third:]) / third
    allowed = allowance.of(first)
    return Flatness(len(kept), first, last, allowed, last - first <= allowed)


# --- the load ----------------------------------------------------------------------------------


def view_request(run_id: str, user_id: str, n: int) -> bytes:
    """A SendEvents request of one product view by ``user_id``, with an id of its own."""
    sku, name, units = PRODUCTS[n % len(PRODUCTS)]
    event = ingest_pb2.Event(
        event_id=f"soak-{run_id}-v{n}",
        occurred_at=timestamp_from_ns(time.time_ns()),
        customer=ingest_pb2.CustomerIdentifiers(user_id=user_id),
        source=ingest_pb2.EVENT_SOURCE_WEB,
        product_viewed=ingest_pb2.ProductViewed(
            sku=sku,
            name=name,
            price=money_pb2.Money(currency_code="EUR", units=units, nanos=990_000_000),
            category="outdoor",
            url=f"https://shop.example.com/p/{sku}",
        ),
    )
    return ingest_pb2.SendEventsRequest(events=[event]).SerializeToString()


class Mix:
    """The mixed load: call ``i`` is KINDS[i % 3] for customer ``i // 3`` (round the pool). A
    call that fails, or answers without doing its work (an event not accepted, a render not
    RENDERED), raises CallFailed with the reason."""

    def __init__(self, stack: BenchStack, channels: Mapping[str, grpc.aio.Channel], user_ids: Sequence[str]):
        self._run_id = stack.run_id
        self._events = itertools.count()  # event ids across the calibration and the soak: each new
        self._metadata = stack.key_metadata
        self._user_ids = list(user_ids)
        self._gets = [get_request(u) for u in user_ids]
        self._renders = [render_request(user_identifier(u)) for u in user_ids]
        raw: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}
        self._send = channels["ingest"].unary_unary(SEND_EVENTS, **raw)
        self._get = channels["profile"].unary_unary(GET_PROFILE, **raw)
        self._render = channels["render"].unary_unary(RENDER, **raw)

    async def __call__(self, i: int) -> None:
        customer = (i // len(KINDS)) % len(self._user_ids)
        kind = KINDS[i % len(KINDS)]
        try:
            if kind == "SendEvents":
                request = view_request(self._run_id, self._user_ids[customer], next(self._events))
                answer = await self._send(request, timeout=CALL_TIMEOUT_S, metadata=self._metadata)
                outcome = ingest_pb2.SendEventsResponse.FromString(answer).results[0].outcome
                if outcome != ingest_pb2.EVENT_OUTCOME_ACCEPTED:
                    raise CallFailed(ingest_pb2.EventOutcome.Name(outcome))
            elif kind == "GetProfile":
                await self._get(self._gets[customer], timeout=CALL_TIMEOUT_S, metadata=self._metadata)
            else:
                answer = await self._render(
                    self._renders[customer], timeout=CALL_TIMEOUT_S, metadata=self._metadata
                )
                rendered = render_pb2.RenderResponse.FromString(answer)
                if rendered.status != render_pb2.RENDER_STATUS_RENDERED:
                    raise CallFailed(describe(rendered))
        except grpc.aio.AioRpcError as exc:
            raise CallFailed(exc.code().name) from None


@dataclass(slots=True)
class Window:
    """The calls scheduled in one sampling window, by kind: latencies (from the scheduled time)
    of those answered, and failures by reason."""

    latencies: dict[str, array[float]] = field(default_factory=lambda: {k: array("d") for k in KINDS})
    errors: dict[str, Counter[str]] = field(default_factory=lambda: {k: Counter() for k in KINDS})

    def as_json(self) -> dict[str, Any]:
        return {
            kind: {
                "calls": len(self.latencies[kind]) + sum(self.errors[kind].values()),
                "p50_s": percentile(self.latencies[kind], 50),
                "p99_s": percentile(self.latencies[kind], 99),
                "errors": dict(self.errors[kind]),
            }
            for kind in KINDS
        }


async def open_loop_windows(
    call: Callable[[int], Awaitable[None]],
    rate: float,
    duration_s: float,
    window_s: float,
    rng: random.Random,
    at_window_end: Callable[[int], Awaitable[None]],
) -> list[Window]:
    """Calls at Poisson arrivals of ``rate`` for ``duration_s``, each a task of its own whatever
    is in flight, counted in the window of its scheduled time; ``at_window_end(k)`` runs (beside
    the load) when window k's time is over. Returns once every call is answered."""
    windows = [Window() for _ in range(math.ceil(duration_s / window_s))]
    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter() + 0.01

    async def one(i: int, scheduled: float, window: Window) -> None:
        kind = KINDS[i % len(KINDS)]
        try:
            await call(i)
        except CallFailed as exc:
            window.errors[kind][exc.reason] += 1
            return
        window.latencies[kind].append(time.perf_counter() - scheduled)

    async def sampler() -> None:
        for k in range(len(windows)):
            delay = start + min(duration_s, (k + 1) * window_s) - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await at_window_end(k)

    sampling = asyncio.create_task(sampler())
    i, offset = 0, rng.expovariate(rate)
    while offset < duration_s:
        scheduled = start + offset
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(i, scheduled, windows[int(offset // window_s)]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
        offset += rng.expovariate(rate)
    await asyncio.gather(*tasks)
    await sampling
    return windows


# --- sampling the processes --------------------------------------------------------------------


FD_KINDS = ("postgres", "redis", "nats", "services", "inbound", "listening", "other sockets", "not sockets")


def fds_by_kind(pid: int, peers: Mapping[int, str]) -> dict[str, int]:
    """A process's open file descriptors by what they are: a TCP connection to a dependency or to
    another service (``peers``: port -> name), one a caller opened to it, a listening socket,
    another socket, or no socket (pipes, event fds, files). A rising count of open fds is read
    through this: a pool that grew under a burst shows in one kind, a leak per call in another."""
    process = psutil.Process(pid)
    connections = process.net_connections(kind="inet")
    listening = {c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN}
    kinds = dict.fromkeys(FD_KINDS, 0)
    for connection in connections:
        if connection.status == psutil.CONN_LISTEN:
            kind = "listening"
        elif connection.raddr and connection.raddr.port in peers:
            kind = peers[connection.raddr.port]
        elif connection.laddr.port in listening:
            kind = "inbound"
        else:
            kind = "other sockets"
        kinds[kind] += 1
    kinds["not sockets"] = process.num_fds() - len(connections)
    return kinds


def from_metrics(text: str) -> dict[str, float]:
    """The soak's quantities in a service's metrics (NaN for one it does not serve)."""
    found = {"asyncio_tasks": math.nan, "db_pool_in_use": math.nan, "db_pool_open": math.nan}
    idle = math.nan
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "sendtime_asyncio_tasks":
                found["asyncio_tasks"] = sample.value
            elif sample.name == "sendtime_db_pool_connections":
                if sample.labels.get("state") == "in_use":
                    found["db_pool_in_use"] = sample.value
                elif sample.labels.get("state") == "idle":
                    idle = sample.value
    found["db_pool_open"] = found["db_pool_in_use"] + idle
    return found


class Sampler:
    """Each service's quantities at a point in time, into ``samples`` (one dict per sample)."""

    def __init__(self, stack: BenchStack, session: aiohttp.ClientSession) -> None:
        self._session = session
        self._started = time.perf_counter()
        self._targets = [
            (
                item.service.name,
                item.process.pid,
                f"http://127.0.0.1:{item.service.metrics_port(stack.env)}/metrics",
            )
            for item in stack.running
        ]
        database_port = urlsplit(stack.database_url).port or 5432
        self._peers = {database_port: "postgres", stack.redis_port: "redis", stack.nats_port: "nats"}
        self._peers.update({item.service.port(stack.env): "services" for item in stack.running})
        self.samples: list[dict[str, Any]] = []

    def restart_clock(self) -> None:
        self._started = time.perf_counter()

    async def sample(self) -> None:
        at = time.perf_counter() - self._started
        services: dict[str, dict[str, float]] = {}
        fds: dict[str, dict[str, int]] = {}
        for name, pid, url in self._targets:
            async with self._session.get(url) as answer:
                if answer.status != 200:
                    raise BenchError(f"{name}'s metrics port answered {answer.status}")
                text = await answer.text()
            process = psutil.Process(pid)
            services[name] = {
                "rss_bytes": float(process.memory_info().rss),
                "open_fds": float(process.num_fds()),
                **from_metrics(text),
            }
            fds[name] = fds_by_kind(pid, self._peers)
        self.samples.append({"at_s": round(at, 1), "services": services, "fds_by_kind": fds})


# --- the soak ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    customers: int
    concurrency: int
    calibrate_s: float
    rate: float | None
    duration_s: float
    sample_s: float
    warmup_windows: int
    json_path: Path | None
    cprofile_dir: Path | None


def verdicts(
    samples: Sequence[Mapping[str, Any]], windows: Sequence[Mapping[str, Any]], warmup: int
) -> dict[str, Any]:
    """Each quantity's verdict per service, each call's p99 verdict, and the error count, from
    the samples taken at the end of each window (the sample before the load is left out)."""
    during = samples[1:]
    quantities: dict[str, dict[str, Any]] = {}
    for service in during[0]["services"] if during else {}:
        for quantity, allowance in LIMITS.items():
            series = [s["services"][service][quantity] for s in during]
            quantities[f"{service} {quantity}"] = {
                **asdict(flatness(series, allowance, warmup=warmup)),
                **asdict(allowance),
            }
    p99 = {
        kind: {
            **asdict(flatness([w["calls"][kind]["p99_s"] for w in windows], P99_LIMIT, warmup=warmup)),
            **asdict(P99_LIMIT),
        }
        for kind in KINDS
    }
    errors = sum(sum(w["calls"][kind]["errors"].values()) for w in windows for kind in KINDS)
    failed = [name for name, v in {**quantities, **p99}.items() if v["flat"] is False]
    if errors:
        failed.append("errors")
    return {"flat": quantities, "p99_stable": p99, "errors": errors, "failed": failed, "passed": not failed}


async def run_soak(stack: BenchStack, options: Options) -> dict[str, Any]:
    meter = CpuMeter(
        {
            name: pids
            for name, pids in stack.cpu_groups().items()
            if name not in ("service variants", "empty gRPC server (floors)")
        }
    )
    rng = random.Random(19)
    base_ns = time.time_ns() - 3_600_000_000_000
    customers = [
        customer_events(stack.run_id, i, rng, base_ns, views=1, cart_items=1)
        for i in range(options.customers)
    ]
    events = sum(len(c) for c in customers)
    user_ids = [user_id_of(stack.run_id, i) for i in range(options.customers)]
    say(f"load: {options.customers:,} customers, {events:,} events; then wait until merged")
    await load_customers(
        stack, batches_of(customers, SEND_BATCH), events, [MERGER, CATALOG], timeout_s=600, analyze=True
    )
    await create_template(stack, stack.target(suite.RENDER))
    await read_every_customer(stack, stack.target(suite.PROFILE), user_ids)

    channels = {s.name: stack.channel(stack.target(s)) for s in (suite.INGEST, suite.PROFILE, suite.RENDER)}
    headers = {"Authorization": f"Bearer {stack.admin_key}"}
    try:
        async with aiohttp.ClientSession(headers=headers) as session:
            mix = Mix(stack, channels, user_ids)
            say(
                f"calibrate: the mix in a closed loop, {options.concurrency} concurrent,"
                f" {options.calibrate_s:g}s"
            )
            snap = meter.snapshot()
            calibration = await measure(mix, concurrency=options.concurrency, duration_s=options.calibrate_s)
            calibrate_cpu = CpuMeter.usage(snap, meter.snapshot())
            if calibration.errors:
                raise BenchError(f"calibration: calls failed: {calibration.errors}")
            rate = options.rate or LOAD_SHARE * calibration.rate
            say(f"   {fmt_rate(calibration.rate)} calls/s at most; the soak offers {fmt_rate(rate)}/s")

            sampler = Sampler(stack, session)
            await sampler.sample()  # before the load
            sampler.restart_clock()
            say(f"soak: {options.duration_s:g}s, a sample every {options.sample_s:g}s")

            async def at_window_end(k: int) -> None:
                await sampler.sample()
                sample = sampler.samples[-1]
                each = ", ".join(
                    f"{name} {q['rss_bytes'] / MIB:.0f} MiB {q['open_fds']:.0f} fds"
                    f" {q['asyncio_tasks']:.0f} tasks"
                    for name, q in sample["services"].items()
                )
                say(f"   {sample['at_s']:>7.1f}s: {each}")

            snap = meter.snapshot()
            windows = await open_loop_windows(
                mix, rate, options.duration_s, options.sample_s, random.Random(23), at_window_end
            )
            soak_cpu = CpuMeter.usage(snap, meter.snapshot())
    finally:
        for channel in channels.values():
            await channel.close(None)

    by_window = [
        {"until_s": round(min(options.duration_s, (k + 1) * options.sample_s), 1), "calls": w.as_json()}
        for k, w in enumerate(windows)
    ]
    return {
        "bench": "soak",
        "machine": machine_info(),
        "source": source_info(),
        "options": {k: v for k, v in asdict(options).items() if k not in ("json_path", "cprofile_dir")},
        "calibration": {**calibration.as_json(), "load_share": LOAD_SHARE},
        "rate_per_s": rate,
        "samples": sampler.samples,
        "windows": by_window,
        "verdicts": verdicts(sampler.samples, by_window, options.warmup_windows),
        "cpu_percent_of_one_core": {"calibration": calibrate_cpu, "soak": soak_cpu},
    }


# --- the report --------------------------------------------------------------------------------

QUANTITIES = {
    "rss_bytes": ("RSS (MiB)", lambda v: f"{v / MIB:.1f}"),
    "open_fds": ("open file descriptors", lambda v: f"{v:.0f}"),
    "asyncio_tasks": ("asyncio tasks", lambda v: f"{v:.0f}"),
    "db_pool_in_use": ("database pool in use", lambda v: f"{v:.0f}"),
    "db_pool_open": ("database pool open", lambda v: f"{v:.0f}"),
}


def _cell(value: float, show: Callable[[float], str]) -> str:
    return "n/a" if math.isnan(value) else show(value)


def _series_table(samples: Sequence[Mapping[str, Any]], quantity: str) -> str:
    title, show = QUANTITIES[quantity]
    services = list(samples[0]["services"])
    lines = [f"{title}, by service", "       t  " + "  ".join(f"{s:>9}" for s in services)]
    for sample in samples:
        cells = "  ".join(f"{_cell(sample['services'][s][quantity], show):>9}" for s in services)
        lines.append(f"{sample['at_s']:>7.0f}s  {cells}")
    return "\n".join(lines)


def _fd_kinds_table(samples: Sequence[Mapping[str, Any]], service: str) -> str:
    lines = [
        f"{service}'s open file descriptors by kind",
        "       t  " + "  ".join(f"{kind:>13}" for kind in FD_KINDS),
    ]
    for sample in samples:
        counts = sample["fds_by_kind"][service]
        lines.append(f"{sample['at_s']:>7.0f}s  " + "  ".join(f"{counts[kind]:>13}" for kind in FD_KINDS))
    return "\n".join(lines)


def _latency_table(windows: Sequence[Mapping[str, Any]]) -> str:
    header = "   until  " + "  ".join(f"{k + ' p50/p99 ms, errors':>32}" for k in KINDS)
    lines = ["each call's latency (from its scheduled time) by window", header]
    for window in windows:
        cells = []
        for kind in KINDS:
            calls = window["calls"][kind]
            p50, p99 = (_cell(calls[p], lambda v: f"{v * 1000:.1f}") for p in ("p50_s", "p99_s"))
            cells.append(f"{calls['calls']:>6} calls {p50:>7}/{p99:>7} {sum(calls['errors'].values()):>4}")
        lines.append(f"{window['until_s']:>7.0f}s  " + "  ".join(f"{c:>32}" for c in cells))
    return "\n".join(lines)


def _verdict_row(name: str, v: Mapping[str, Any], show: Callable[[float], str]) -> Row:
    flat = v["flat"]
    if flat is None:
        return Row(name, f"{v['samples']} samples after the warm-up", goal="3 at least", verdict="n/a")
    growth = v["last"] - v["first"]
    return Row(
        name,
        f"{show(v['first'])} -> {show(v['last'])}",
        ratio=f"{'+' if growth >= 0 else '-'}{show(abs(growth))}",
        goal=f"<= +{show(v['allowed'])} (the larger of {show(v['absolute'])} and {v['relative']:.0%})",
        verdict="PASS" if flat else "FAIL",
    )


def report(results: Mapping[str, Any]) -> str:
    verdict = results["verdicts"]
    calibration = results["calibration"]
    options = results["options"]
    rows = []
    for name, v in verdict["flat"].items():
        service, quantity = name.split()
        title, show = QUANTITIES[quantity]
        rows.append(_verdict_row(f"{service} {title}", v, show))
    rows += [
        _verdict_row(f"{kind} p99", v, lambda s: f"{s * 1000:.1f} ms")
        for kind, v in verdict["p99_stable"].items()
    ]
    rows.append(
        Row("calls failed", str(verdict["errors"]), goal="0", verdict="FAIL" if verdict["errors"] else "PASS")
    )
    parts = [
        f"Soak: {options['duration_s']:g}s at {fmt_rate(results['rate_per_s'])} calls/s"
        f" ({calibration['load_share']:.0%} of the {fmt_rate(calibration['per_s'])}/s the mix reached"
        f" at {calibration['concurrency']} concurrent), a sample every {options['sample_s']:g}s,"
        f" the first {options['warmup_windows']} window(s) a warm-up.",
        "",
        *(_series_table(results["samples"], q) + "\n" for q in QUANTITIES),
        *(_fd_kinds_table(results["samples"], s) + "\n" for s in results["samples"][0]["services"]),
        _latency_table(results["windows"]),
        "",
        "CPU (% of one core)",
        render_cpu(results["cpu_percent_of_one_core"]),
        "",
        "Verdicts: each quantity's mean over the first third of the samples after the warm-up,"
        " then over the last third",
        render_table(rows),
        "",
        "PASS: every quantity flat, every p99 stable, no errors"
        if verdict["passed"]
        else f"FAIL: {', '.join(verdict['failed'])}",
    ]
    return "\n".join(parts)


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="soak.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=1800.0, help="the soak's length (default 1800)")
    parser.add_argument("--sample-s", type=float, default=60.0, help="seconds between samples (default 60)")
    parser.add_argument(
        "--rate", type=float, default=None, help="calls/s to offer (default: half the calibrated maximum)"
    )
    parser.add_argument("--customers", type=int, default=1000, help="customers loaded first (default 1000)")
    parser.add_argument(
        "--concurrency", type=int, default=32, help="concurrent calls when calibrating (default 32)"
    )
    parser.add_argument("--calibrate-s", type=float, default=10.0, help="calibration's length (default 10)")
    parser.add_argument(
        "--warmup-windows", type=int, default=1, help="windows left out of the verdicts (default 1)"
    )
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if min(args.duration_s, args.sample_s, args.calibrate_s) <= 0 or (
        args.rate is not None and args.rate <= 0
    ):
        parser.error("--duration-s, --sample-s, --calibrate-s and --rate must be positive")
    if args.customers < 1 or args.concurrency < 1 or args.warmup_windows < 0:
        parser.error("--customers and --concurrency must be at least 1, --warmup-windows at least 0")
    if args.sample_s > args.duration_s:
        parser.error("--sample-s must not exceed --duration-s")
    return Options(
        customers=args.customers,
        concurrency=args.concurrency,
        calibrate_s=args.calibrate_s,
        rate=args.rate,
        duration_s=args.duration_s,
        sample_s=args.sample_s,
        warmup_windows=args.warmup_windows,
        json_path=args.json,
        cprofile_dir=args.cprofile,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    outcome: dict[str, Any] = {}

    def run(stack: BenchStack) -> dict[str, Any]:
        outcome.update(asyncio.run(run_soak(stack, options)))
        return outcome

    code = run_bench_main(
        "soak",
        SERVICES,
        cprofile_dir=options.cprofile_dir,
        json_path=options.json_path,
        measure=run,
        report=report,
    )
    if code == 0 and not outcome["verdicts"]["passed"]:
        return EXIT_VERDICT_FAILED
    return code


if __name__ == "__main__":
    sys.exit(main())
