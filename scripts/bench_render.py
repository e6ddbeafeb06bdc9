"""``make bench-render``: Render latency and throughput at 64 concurrent calls with warm caches,
RenderBatch renders/s, and renders with the profile service stopped, next to floors measured in
the same run.

The bench starts a private stack (bench_common.BenchStack: NATS with ``sync_interval: always``,
Redis, a fresh database, profile, ingest and render as their own processes), then:

1. load: ``--customers`` customers with carts (an identify, 1 or 2 cart additions) through
   ``IngestService/SendEvents``, until the profile merger and render's catalog consumer have
   nothing pending. The load is only the setup here, so the bench ANALYZEs the fresh database
   once ingest has acknowledged everything (``--no-analyze`` leaves it to autovacuum): without
   statistics the merger's "who owns these identifiers" query keeps a plan that scans
   ``identifiers`` sequentially for every event, and merging takes ~45% longer. Every customer
   is then read once (BatchGetProfiles), as sends would: the merger keeps only profiles someone
   reads in the profile service's Redis cache in full, and the floors read that cache. Then an
   abandoned-cart template (subject, HTML and text, a loop over the cart items, the ``money``
   filter, fallback values, ``required_data``) is created and published with
   ``TemplateService/CreateTemplate``;
2. floors: an empty grpc.aio unary call, and the ideal path: a grpc.aio server of its own (a
   process started by this bench, like the empty server, without interceptors) whose handler
   makes one Redis GET of the profile service's cache entry (``<version>:<Profile bytes>``),
   parses it and renders the SAME template with render's own ``TemplateCompiler``,
   ``message_to_context`` and ``render_context``: only the service overhead differs. Also an
   in-process batch floor: this process renders every customer from Redis (MGET of 500) with
   the same code, no gRPC at all;
3. ``RenderService/RenderBatch`` for every customer (after a batch of 500 to warm up): renders/s,
   beside the in-process floor;
4. ``RenderService/Render`` by ``template_name`` at ``--concurrency`` (64) calls, each with a 1 s
   deadline, warm (render's template, compiled-template and last-known-good caches, profile's
   Redis cache), beside the ideal path at the same concurrency; then one at a time, beside both
   floors. Then TLS beside plaintext: two more render services started before the floors,
   alike but for TLS (one plaintext, one serving a certificate from a CA made for the run),
   both calling the same profile service (``--tls-profile``: the TLS one calls a profile service
   that serves TLS), each given an untimed RenderBatch for its caches and a warmed-up
   connection, get the same Render calls, taking turns in short segments
   (bench_profile.measure_alternating): the TLS p50 over the plaintext p50 at 64 concurrent,
   goal at most 1.10. Then metrics beside none: two more render services, alike but for an
   empty ``RENDER_METRICS_ADDRESS`` on one (no metrics kept), the same way: throughput with
   metrics over throughput without at 64 concurrent, goal at least 0.97;
5. fault: SIGTERM the profile service, wait for it to exit, then ``--fault-renders`` renders at
   ``--concurrency`` with a 150 ms deadline each (a tenth of them for customers render has
   never seen): each must answer in time with a fallback (last known good profile, or the
   template's fallback values / a skip, with ``fallback_reason`` set).

Every call to a service carries the bench's API key (in its metadata, as ``bearer_auth`` would
add it); render calls profile with its own. It prints a table of each measure against its
floors and goal, and the CPU each process used in each phase. A missed goal is reported, not an
error: the exit code is 0 unless the bench broke. Defaults take about 145 s on a 2-core machine
(about 55 s of it loading and merging 25,000 events).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as redis
from bench_common import (
    PLAINTEXT,
    BenchError,
    BenchStack,
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
    render_cpu,
    render_table,
    report_warnings,
    run_bench_main,
    say,
    serve_until_signalled,
    source_info,
    verdict,
)
from bench_profile import (
    MERGER,
    SEND_BATCH,
    Measured,
    Side,
    alternate_with_cpu,
    batches_of,
    check_merged,
    customer_events,
    load_customers,
    measure,
    ms,
    ratio_halves,
    read_every_customer,
    user_id_of,
)
from google.protobuf import struct_pb2

import devstack
import suite
from profile_service.cache import cache_key, decode_entry
from render.context import message_to_context, render_context, struct_to_dict
from render.profiles import LKG_REFRESH_AFTER_S
from render.templates import CompiledTemplate, TemplateCompiler, render_part
from sendtime.profile.v1 import profile_pb2
from sendtime.render.v1 import render_pb2, render_pb2_grpc
from sendtime_common.identifier_proto import PROTO_TO_KIND
from sendtime_common.tls import channel as open_channel

RENDER = "/sendtime.render.v1.RenderService/Render"
RENDER_BATCH = "/sendtime.render.v1.RenderService/RenderBatch"
IDEAL_SERVICE = "sendtime.bench.Ideal"
IDEAL = f"/{IDEAL_SERVICE}/Render"
CATALOG = "render-catalog"
TEMPLATE_ID = "abandoned-cart"
TEMPLATE_NAME = f"templates/{TEMPLATE_ID}"
DEADLINE_S = 1.0
FAULT_DEADLINE_S = 0.150
FAULT_UNKNOWN_SHARE = 0.1
Metadata = tuple[tuple[str, str], ...]
IDEAL_CHUNK = 500  # customers per MGET in the in-process batch floor (RenderBatch's chunk)
VARIABLES: dict[str, Any] = {"discount_code": "COMEBACK10"}

GOAL_RENDER_VS_IDEAL = 2.0
GOAL_TLS_VS_PLAINTEXT = 1.10  # Render p50 over TLS / in plaintext, both with a key, in the same run
GOAL_METRICS_RATE = 0.97  # Render throughput with Prometheus metrics / without, in the same run
# Segments of the plaintext / TLS alternation (bench_profile.measure_alternating): at 64
# concurrent, the first wave of each segment finds no queue and is not counted.
SEGMENT_N_S = 1.25
SETTLE_N_S = 0.2
SEGMENT_ONE_S = 0.25

FALLBACK_VALUES: dict[str, Any] = {
    "profile": {"traits": {"first_name": "there"}},
    "shop": {"name": "Trailhead Outfitters", "url": "https://shop.example.com"},
}
TEMPLATE = render_pb2.Template(
    subject=(
        "{{ profile.traits.first_name }}, your {{ profile.cart.items.first.name }}"
        "{% assign more = profile.cart.items | size | minus: 1 %}"
        "{% if more > 0 %} and {{ more }} more{% endif %}"
        " {% if more > 0 %}are{% else %}is{% endif %} waiting"
    ),
    html="""<!doctype html>
<html><body style="font-family: sans-serif">
<h1>Still thinking it over, {{ profile.traits.first_name | capitalize }}?</h1>
<p>You left these in your cart at {{ shop.name }}:</p>
<table>
  <tr><th>Item</th><th>Qty</th><th>Price</th><th>Subtotal</th></tr>
  {%- for item in profile.cart.items %}
  <tr class="{% cycle 'odd', 'even' %}">
    <td><a href="{{ shop.url }}/p/{{ item.sku | url_encode }}">{{ item.name }}</a></td>
    <td>{{ item.quantity }}</td>
    <td>{{ item.unit_price | money }}</td>
    <td>{{ item.unit_price.amount | times: item.quantity | money: item.unit_price.currency }}</td>
  </tr>
  {%- endfor %}
</table>
<p><strong>Total: {{ profile.cart.total | money }}</strong></p>
<p>Use <code>{{ vars.discount_code | upcase }}</code> at checkout for 10% off.</p>
<p><a href="{{ shop.url }}/cart">Back to your cart</a></p>
<p style="font-size: small">{{ shop.name }} &middot; <a href="{{ shop.url }}/unsubscribe">Unsubscribe</a></p>
</body></html>
""",
    text="""Hi {{ profile.traits.first_name }},

You left these in your cart at {{ shop.name }}:
{% for item in profile.cart.items -%}
- {{ item.quantity }} x {{ item.name }}, {{ item.unit_price | money }} each
{% endfor %}
Total: {{ profile.cart.total | money }}
Use {{ vars.discount_code | upcase }} at checkout for 10% off: {{ shop.url }}/cart
""",
    required_data=["profile.cart.items"],
)
TEMPLATE.fallback.update(FALLBACK_VALUES)


# --- the ideal path ----------------------------------------------------------------------------


class IdealRenderer:
    """What any render of this template must do: one Redis GET of the profile service's cache
    entry, parse it (dropping provenance, as GetProfile does), build the context and render the
    three parts, with render's own code."""

    def __init__(self, template: render_pb2.Template) -> None:
        self.compiled: CompiledTemplate = TemplateCompiler(cache_size=4).compile(
            template.subject, template.html, template.text
        )
        self.fallback = struct_to_dict(template.fallback)

    def render(self, entry: bytes | str | None, variables: Mapping[str, Any]) -> render_pb2.RenderResponse:
        raw = entry.encode() if isinstance(entry, str) else entry  # no decode_responses: bytes
        profile = decode_entry(raw) if raw else None
        response = render_pb2.RenderResponse(template_version=1)
        if profile is None:
            response.status = render_pb2.RENDER_STATUS_SKIPPED
            response.profile_source = render_pb2.PROFILE_SOURCE_NONE
            return response
        # What GetProfile answers leaves provenance out (the cache entry has it); a template never
        # sees it, and message_to_context does not take its map.
        profile.ClearField("provenance")
        context = render_context(self.fallback, message_to_context(profile), variables)
        response.status = render_pb2.RENDER_STATUS_RENDERED
        response.profile_source = render_pb2.PROFILE_SOURCE_LIVE
        response.profile_version = profile.version
        response.subject = render_part(self.compiled.subject, "subject", context).strip()
        response.html = render_part(self.compiled.html, "html", context)
        response.text = render_part(self.compiled.text, "text", context)
        return response


def entry_key(identifier: profile_pb2.Identifier) -> str:
    return cache_key(PROTO_TO_KIND[identifier.kind], identifier.value)


async def serve_ideal(port: int, redis_url: str, template_path: Path) -> None:
    """The ideal-path server: RenderRequest bytes in, RenderResponse bytes out. No interceptors,
    as the empty server: the bare cost of a gRPC call that reads Redis and renders."""
    renderer = IdealRenderer(render_pb2.Template.FromString(template_path.read_bytes()))
    client = redis.Redis.from_url(redis_url)  # as the profile service creates its client

    async def render(request_bytes: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        request = render_pb2.RenderRequest.FromString(request_bytes)
        entry = await client.get(entry_key(request.customer))
        return renderer.render(entry, struct_to_dict(request.variables)).SerializeToString()

    handler = grpc.method_handlers_generic_handler(
        IDEAL_SERVICE, {"Render": grpc.unary_unary_rpc_method_handler(render)}
    )
    try:
        await serve_until_signalled(handler, port)
    finally:
        await client.aclose()


@contextlib.contextmanager
def ideal_server(stack: BenchStack) -> Iterator[tuple[str, int]]:
    """Start the ideal-path server as a process of its own; its target and pid. It is stopped
    on exit, with Ctrl-C ignored while it stops."""
    template_path = stack.workdir / "template.pb"
    template_path.write_bytes(TEMPLATE.SerializeToString())
    port = devstack.free_port()
    with open(stack.workdir / "ideal-server.log", "ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "serve-ideal",
                "--port",
                str(port),
                "--redis",
                stack.redis_url,
                "--template",
                str(template_path),
            ],
            env=stack.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        devstack.wait_for_tcp("127.0.0.1", port, 15, process)
        yield f"127.0.0.1:{port}", process.pid
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            devstack.stop_process(process)
        finally:
            signal.signal(signal.SIGINT, previous)


async def measure_ideal_batch(redis_url: str, user_ids: Sequence[str]) -> tuple[int, float]:
    """This process renders every customer from Redis with the ideal path's code (MGET of
    IDEAL_CHUNK, parse, context, three parts, serialize): renders and seconds."""
    renderer = IdealRenderer(TEMPLATE)
    client = redis.Redis.from_url(redis_url)
    identifiers = [
        profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_USER_ID, value=u) for u in user_ids
    ]
    rendered = 0
    try:
        started = time.perf_counter()
        for start in range(0, len(identifiers), IDEAL_CHUNK):
            chunk = identifiers[start : start + IDEAL_CHUNK]
            entries = await client.mget([entry_key(i) for i in chunk])
            for entry in entries:
                response = renderer.render(entry, VARIABLES)
                response.SerializeToString()
                rendered += response.status == render_pb2.RENDER_STATUS_RENDERED
        seconds = time.perf_counter() - started
    finally:
        await client.aclose()
    if rendered != len(user_ids):
        raise BenchError(f"in-process floor: rendered {rendered} of {len(user_ids)}")
    return rendered, seconds


# --- renders -----------------------------------------------------------------------------------


def render_request(identifier: profile_pb2.Identifier) -> bytes:
    variables = struct_pb2.Struct()
    variables.update(VARIABLES)
    return render_pb2.RenderRequest(
        customer=identifier, template_name=TEMPLATE_NAME, variables=variables
    ).SerializeToString()


def user_identifier(user_id: str) -> profile_pb2.Identifier:
    return profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_USER_ID, value=user_id)


def describe(response: render_pb2.RenderResponse) -> str:
    """e.g. ``RENDERED/LIVE`` or ``SKIPPED/NONE/PROFILE_UNAVAILABLE``."""
    parts = [
        render_pb2.RenderStatus.Name(response.status).removeprefix("RENDER_STATUS_"),
        render_pb2.ProfileSource.Name(response.profile_source).removeprefix("PROFILE_SOURCE_"),
    ]
    if response.fallback_reason:
        parts.append(
            render_pb2.FallbackReason.Name(response.fallback_reason).removeprefix("FALLBACK_REASON_")
        )
    return "/".join(parts)


@dataclass(frozen=True, slots=True)
class Renders:
    measured: Measured
    outcomes: dict[str, int]

    def as_json(self) -> dict[str, Any]:
        return {**self.measured.as_json(), "outcomes": self.outcomes}


def render_caller(
    channel: grpc.aio.Channel,
    method: str,
    requests: Sequence[bytes],
    metadata: Metadata | None,
    answers: list[bytes],
) -> Callable[[int], Awaitable[None]]:
    """A ``measure`` call: ``method`` for the i-th request (from a random offset) with a DEADLINE_S
    deadline, its answer kept in ``answers`` (not parsed while timing)."""
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    offset = random.randrange(len(requests))

    async def one(i: int) -> None:
        answers.append(
            await call(requests[(offset + i) % len(requests)], timeout=DEADLINE_S, metadata=metadata)
        )

    return one


def outcomes_of(answers: Sequence[bytes]) -> dict[str, int]:
    return dict(Counter(describe(render_pb2.RenderResponse.FromString(a)) for a in answers))


async def measure_renders(
    channel: grpc.aio.Channel,
    method: str,
    requests: Sequence[bytes],
    concurrency: int,
    seconds: float,
    metadata: Metadata | None = None,
) -> Renders:
    """``method`` at ``concurrency`` for ``seconds``, each call with a DEADLINE_S deadline; every
    answer is kept (not parsed while timing) and described afterwards."""
    answers: list[bytes] = []
    one = render_caller(channel, method, requests, metadata, answers)
    measured = await measure(one, concurrency=concurrency, duration_s=seconds)
    return Renders(measured, outcomes_of(answers))


@dataclass(frozen=True, slots=True)
class RenderSides:
    """Render on the render service (plaintext, A) and on its TLS twin (B), taking turns, and
    the CPU snapshots around the measure."""

    plain: Renders
    tls: Renders
    sides: list[Side]
    start: CpuSnapshot
    end: CpuSnapshot

    def as_json(self, index: int) -> dict[str, Any]:
        renders = (self.plain, self.tls)[index]
        return {**self.sides[index].as_json(), "outcomes": renders.outcomes}


async def compare_renders(
    channels: Sequence[grpc.aio.Channel],
    server_pids: Sequence[int],
    requests: Sequence[bytes],
    metadata: Metadata,
    concurrency: int,
    seconds: float,
    meter: CpuMeter,
    segment_s: float,
    settle_s: float = 0.0,
) -> RenderSides:
    """Render on each channel (plaintext, then TLS), ``2 x seconds`` each in all, in segments of
    ``segment_s`` taking turns (bench_profile.measure_alternating); each side's render process
    (``server_pids``) charged its CPU per render."""
    answers: list[list[bytes]] = [[] for _ in channels]
    calls = [
        render_caller(channel, RENDER, requests, metadata, kept)
        for channel, kept in zip(channels, answers, strict=True)
    ]
    sides, start, end = await alternate_with_cpu(
        calls,
        server_pids,
        meter,
        concurrency=concurrency,
        duration_s=seconds,
        segment_s=segment_s,
        settle_s=settle_s,
    )
    plain, tls = (
        Renders(side.measured, outcomes_of(kept)) for side, kept in zip(sides, answers, strict=True)
    )
    return RenderSides(plain, tls, sides, start, end)


async def warm_twins(
    channels: Sequence[grpc.aio.Channel],
    user_ids: Sequence[str],
    requests: Sequence[bytes],
    metadata: Metadata,
    concurrency: int,
) -> None:
    """Before twins take turns: an untimed RenderBatch of every customer on each (its caches),
    then a second of Render at ``concurrency`` on each (its connection, a TLS handshake)."""
    for channel in channels:
        await render_batch(channel, user_ids, metadata)
    for channel in channels:
        warm = await measure_renders(channel, RENDER, requests, concurrency, 1.0, metadata)
        if warm.measured.calls == 0:
            raise BenchError(f"a twin: no call succeeded during the warm-up: {warm.measured.errors}")


async def compare_metrics(
    stack: BenchStack,
    user_ids: Sequence[str],
    requests: Sequence[bytes],
    metadata: Metadata,
    concurrency: int,
    seconds: float,
    meter: CpuMeter,
) -> RenderSides:
    """What Prometheus metrics cost Render's throughput: two more render services, both
    plaintext, one keeping metrics (as by default, A), one with no metrics port, which keeps
    none (B); each gets an untimed RenderBatch for its caches and a warm-up, then they take
    turns at ``concurrency`` (``compare_renders``). Stopped after."""
    say("metrics beside none: two more render services, one with no metrics port (RENDER_METRICS_ADDRESS=)")
    labels = ("render-metered", "render-unmetered")
    targets = (
        stack.start_variant(suite.RENDER, labels[0], {}),
        stack.start_variant(suite.RENDER, labels[1], {suite.RENDER.metrics_address_variable: ""}),
    )
    try:
        async with (
            open_channel(targets[0], PLAINTEXT) as metered,
            open_channel(targets[1], PLAINTEXT) as unmetered,
        ):
            await warm_twins((metered, unmetered), user_ids, requests, metadata, concurrency)
            compared = await compare_renders(
                [metered, unmetered],
                (stack.pid_of(labels[0]), stack.pid_of(labels[1])),
                requests,
                metadata,
                concurrency,
                seconds,
                meter,
                SEGMENT_N_S,
                SETTLE_N_S,
            )
    finally:
        for label in labels:
            stack.stop_variant(label)
    with_metrics, without = (side.measured for side in compared.sides)
    say(
        f"   {fmt_rate(with_metrics.rate)} renders/s with metrics, {fmt_rate(without.rate)} without;"
        f" p50 {ms(with_metrics.p50_s)} / {ms(without.p50_s)}"
    )
    return compared


@dataclass(frozen=True, slots=True)
class Batch:
    customers: int
    seconds: float
    first_answer_s: float
    outcomes: dict[str, int]
    errors: int

    @property
    def rate(self) -> float:
        return self.customers / self.seconds

    def as_json(self) -> dict[str, Any]:
        return {
            "customers": self.customers,
            "seconds": self.seconds,
            "renders_per_s": self.rate,
            "first_answer_s": self.first_answer_s,
            "outcomes": self.outcomes,
            "errors": self.errors,
        }


async def render_batch(channel: grpc.aio.Channel, user_ids: Sequence[str], metadata: Metadata) -> Batch:
    """One RenderBatch call for ``user_ids``: from the call to its last answer."""
    variables = struct_pb2.Struct()
    variables.update(VARIABLES)
    request = render_pb2.RenderBatchRequest(
        customers=[user_identifier(u) for u in user_ids], template_name=TEMPLATE_NAME, variables=variables
    ).SerializeToString()
    method = channel.unary_stream(RENDER_BATCH, request_serializer=None, response_deserializer=None)
    answers: list[bytes] = []
    first = math.nan
    started = time.perf_counter()
    async for answer in method(request, timeout=600, metadata=metadata):
        if not answers:
            first = time.perf_counter() - started
        answers.append(answer)
    seconds = time.perf_counter() - started
    outcomes: Counter[str] = Counter()
    errors = 0
    for answer in answers:
        item = render_pb2.RenderBatchResponse.FromString(answer)
        if item.HasField("error"):
            errors += 1
        else:
            outcomes[describe(item.result)] += 1
    if len(answers) != len(user_ids):
        raise BenchError(f"RenderBatch answered {len(answers)} of {len(user_ids)} customers")
    return Batch(len(user_ids), seconds, first, dict(outcomes), errors)


@dataclass(frozen=True, slots=True)
class Fault:
    renders: int
    deadline_s: float
    fallback_in_time: int
    outcomes: dict[str, int]  # answers by status/source/reason, and errors by code
    p50_s: float
    p99_s: float
    max_s: float
    profile_exit_code: int | None

    def as_json(self) -> dict[str, Any]:
        return {
            "renders": self.renders,
            "deadline_s": self.deadline_s,
            "fallback_in_time": self.fallback_in_time,
            "outcomes": self.outcomes,
            "p50_s": self.p50_s,
            "p99_s": self.p99_s,
            "max_s": self.max_s,
            "profile_exit_code": self.profile_exit_code,
        }


FALLBACK_SOURCES = frozenset({render_pb2.PROFILE_SOURCE_LAST_KNOWN_GOOD, render_pb2.PROFILE_SOURCE_NONE})
ANSWERED = frozenset({render_pb2.RENDER_STATUS_RENDERED, render_pb2.RENDER_STATUS_SKIPPED})


async def fault_run(
    channel: grpc.aio.Channel,
    requests: Sequence[bytes],
    concurrency: int,
    deadline_s: float,
    metadata: Metadata,
) -> tuple[int, Counter[str], list[float]]:
    """Each request once, ``concurrency`` at a time, with ``deadline_s`` each: how many answered
    with a fallback in time, outcomes, and every call's latency (answered or not)."""
    call = channel.unary_unary(RENDER, request_serializer=None, response_deserializer=None)
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    good = 0
    queue = iter(requests)

    async def caller() -> None:
        nonlocal good
        for request in queue:
            started = time.perf_counter()
            try:
                answer = await call(request, timeout=deadline_s, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                latencies.append(time.perf_counter() - started)
                outcomes[f"error {exc.code().name}"] += 1
                continue
            latency = time.perf_counter() - started
            latencies.append(latency)
            response = render_pb2.RenderResponse.FromString(answer)
            outcomes[describe(response)] += 1
            fell_back = bool(response.fallback_reason) or response.profile_source in FALLBACK_SOURCES
            if response.status in ANSWERED and fell_back and latency <= deadline_s:
                good += 1

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return good, outcomes, latencies


async def stop_profile(stack: BenchStack) -> int | None:
    """SIGTERM the profile service and wait until it has exited; its exit code."""
    process = next(r.process for r in stack.running if r.service.name == suite.PROFILE.name)
    process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while process.poll() is None:
        if time.monotonic() > deadline:
            raise BenchError("the profile service did not exit within 30s of SIGTERM")
        await asyncio.sleep(0.05)
    return process.returncode


# --- the bench ---------------------------------------------------------------------------------


@dataclass
class Options:
    customers: int
    concurrency: int
    seconds: float
    floor_seconds: float
    fault_renders: int
    analyze: bool
    tls_profile: bool
    json_path: Path | None
    cprofile_dir: Path | None


async def create_template(stack: BenchStack, target: str) -> int:
    async with stack.channel(target) as channel:
        stub = render_pb2_grpc.TemplateServiceStub(channel)
        response = await stub.CreateTemplate(
            render_pb2.CreateTemplateRequest(
                template_id=TEMPLATE_ID, display_name="Abandoned cart", content=TEMPLATE, publish=True
            ),
            timeout=10,
        )
    return int(response.template.published_version)


async def start_twins(stack: BenchStack, options: Options, user_ids: Sequence[str]) -> tuple[str, str]:
    """Start two more render services on the same database, Redis and NATS, alike but for TLS:
    one in plaintext, one that serves TLS (a certificate from a CA made for this run); their
    targets. Both call the same profile service, in plaintext with render's key; with
    ``--tls-profile`` the TLS one calls a profile service that serves TLS instead (started and
    warmed up here), so that its whole chain is TLS."""
    overrides = dict(stack.tls.server_env)
    if options.tls_profile:
        say("a profile service serving TLS, for the TLS render service to call (--tls-profile)")
        profile_target = stack.start_variant(suite.PROFILE, "profile-tls", stack.tls.server_env)
        await read_every_customer(stack, profile_target, user_ids, stack.tls.client)  # copies in process
        overrides.update(
            PROFILE_SERVICE_TARGET=profile_target,
            PROFILE_SERVICE_PLAINTEXT="false",
            PROFILE_SERVICE_CA_FILE=stack.tls.client.ca_file,
        )
    say("two more render services, one in plaintext, one serving TLS (a CA made for this run)")
    return (
        stack.start_variant(suite.RENDER, "render-twin", {}),
        stack.start_variant(suite.RENDER, "render-tls", overrides),
    )


def _call_floor(floor: CallFloor) -> dict[str, Any]:
    return {
        "concurrency": floor.concurrency,
        "calls": floor.calls,
        "per_s": floor.rate,
        "p50_s": floor.p50_s,
        "p99_s": floor.p99_s,
        "idle_p50_s": floor.idle_p50_s,
    }


async def run_bench(stack: BenchStack, options: Options, ideal_target: str, ideal_pid: int) -> dict[str, Any]:
    groups = stack.cpu_groups()
    groups["ideal-path server (floor)"] = lambda: [ideal_pid]
    meter = CpuMeter(groups)
    cpu: dict[str, dict[str, float]] = {}
    n = options.concurrency
    rng = random.Random(13)
    base_ns = time.time_ns() - 3 * 3_600_000_000_000  # carts idle for hours: abandoned
    customers = [
        customer_events(stack.run_id, i, rng, base_ns, views=0, cart_items=1 + i % 2)
        for i in range(options.customers)
    ]
    events = sum(len(c) for c in customers)
    requests = batches_of(customers, SEND_BATCH)
    user_ids = [user_id_of(stack.run_id, i) for i in range(options.customers)]

    say(f"load: {options.customers:,} customers with carts, {events:,} events; then wait until merged")
    snap = meter.snapshot()
    loaded = await load_customers(
        stack, requests, events, [MERGER, CATALOG], timeout_s=900, analyze=options.analyze
    )
    cpu["load + merge"] = CpuMeter.usage(snap, meter.snapshot())
    say(
        f"   acked in {loaded.ingest_s:.1f}s; merged after {loaded.consumers_done_s[MERGER]:.1f}s"
        f" ({fmt_rate(loaded.merged_rate)} ev/s); catalog consumer done after"
        f" {loaded.consumers_done_s[CATALOG]:.1f}s"
    )
    await check_merged(stack.database_url, events, options.customers)
    say("warm: read every customer once from the profile service (BatchGetProfiles), as sends would")
    await read_every_customer(stack, stack.target(suite.PROFILE), user_ids)
    version = await create_template(stack, stack.target(suite.RENDER))
    say(f"template {TEMPLATE_NAME} version {version} published")
    twin_target, tls_target = await start_twins(stack, options, user_ids)

    shuffled = user_ids[:]
    random.Random(5).shuffle(shuffled)
    render_requests = [render_request(user_identifier(u)) for u in shuffled]
    metadata = stack.key_metadata
    async with (
        open_channel(stack.target(suite.RENDER), PLAINTEXT) as render_channel,
        open_channel(ideal_target, PLAINTEXT) as ideal_channel,
        open_channel(twin_target, PLAINTEXT) as twin_channel,
        open_channel(tls_target, stack.tls.client) as tls_channel,
    ):
        say(f"warm-up: Render and the ideal path, {n} concurrent, 1s each")
        for channel, method in ((render_channel, RENDER), (ideal_channel, IDEAL)):
            warm = await measure_renders(channel, method, render_requests, n, 1.0, metadata)
            if warm.measured.calls == 0:
                raise BenchError(f"{method}: no call succeeded during the warm-up: {warm.measured.errors}")
        sample = render_pb2.RenderResponse.FromString(
            await render_channel.unary_unary(RENDER, request_serializer=None, response_deserializer=None)(
                render_requests[0], timeout=DEADLINE_S, metadata=metadata
            )
        )
        if sample.status != render_pb2.RENDER_STATUS_RENDERED:
            raise BenchError(f"Render did not render: {describe(sample)} {sample.skip_detail}")
        html_bytes = len(sample.html.encode())

        empty_target = stack.start_empty_server()
        say(f"floor: empty grpc.aio unary call, 1 at a time and {n} concurrent")
        snap = meter.snapshot()
        empty_1 = await measure_empty_unary(empty_target, 1, options.floor_seconds)
        empty_n = await measure_empty_unary(empty_target, n, options.floor_seconds)
        cpu["empty-call floor"] = CpuMeter.usage(snap, meter.snapshot())
        say(f"   p50 {ms(empty_1.p50_s)} (1), {ms(empty_n.p50_s)} ({n}); {fmt_rate(empty_n.rate)} calls/s")

        say(f"floor: this process renders all {len(user_ids):,} customers from Redis (MGET {IDEAL_CHUNK})")
        snap = meter.snapshot()
        ideal_batch_renders, ideal_batch_s = await measure_ideal_batch(stack.redis_url, user_ids)
        cpu["in-process floor"] = CpuMeter.usage(snap, meter.snapshot())
        say(f"   {fmt_rate(ideal_batch_renders / ideal_batch_s)} renders/s")
        # RenderBatch first: a campaign's first pass, which also leaves every customer's profile in
        # render's caches (last known good, stored under a minute ago), so that the Render
        # measures after it see warm caches for whichever customer they pick.
        say(f"RenderBatch: {len(user_ids):,} customers in one call (after one of {IDEAL_CHUNK} to warm up)")
        await render_batch(render_channel, user_ids[:IDEAL_CHUNK], metadata)
        snap = meter.snapshot()
        batch = await render_batch(render_channel, user_ids, metadata)
        cpu["RenderBatch"] = CpuMeter.usage(snap, meter.snapshot())
        say(f"   {fmt_rate(batch.rate)} renders/s ({batch.seconds:.1f}s)")

        say(f"Render, {n} concurrent, {options.seconds:.0f}s (deadline {DEADLINE_S:.0f}s each)")
        snap = meter.snapshot()
        render_n = await measure_renders(
            render_channel, RENDER, render_requests, n, options.seconds, metadata
        )
        cpu[f"Render x{n}"] = CpuMeter.usage(snap, meter.snapshot())
        say(f"   p50 {ms(render_n.measured.p50_s)}, {fmt_rate(render_n.measured.rate)} renders/s")
        say(f"floor: the ideal path, {n} concurrent, {options.seconds:.0f}s")
        snap = meter.snapshot()
        ideal_n = await measure_renders(ideal_channel, IDEAL, render_requests, n, options.seconds)
        cpu[f"ideal x{n}"] = CpuMeter.usage(snap, meter.snapshot())
        say(f"   p50 {ms(ideal_n.measured.p50_s)}, {fmt_rate(ideal_n.measured.rate)} renders/s")
        say(f"Render and the ideal path one at a time, {options.floor_seconds:.0f}s each")
        render_1 = await measure_renders(
            render_channel, RENDER, render_requests, 1, options.floor_seconds, metadata
        )
        ideal_1 = await measure_renders(ideal_channel, IDEAL, render_requests, 1, options.floor_seconds)
        say(f"   p50 {ms(render_1.measured.p50_s)} Render, {ms(ideal_1.measured.p50_s)} ideal")

        # TLS beside plaintext, on the two twins: each gets the same untimed RenderBatch for its
        # caches, and a warmed-up connection (TLS: the handshake), before they take turns.
        say("TLS beside plaintext: RenderBatch on each twin, untimed, to fill its caches; warm-up")
        twins_batched = time.monotonic()
        await warm_twins((twin_channel, tls_channel), user_ids, render_requests, metadata, n)
        twin_pids = (stack.pid_of("render-twin"), stack.pid_of("render-tls"))
        say(
            f"Render on the twins, {n} concurrent: plaintext (A) and TLS (B) taking turns (A B B A B A A"
            f" B, {SEGMENT_N_S}s segments, the first {SETTLE_N_S}s of each not counted),"
            f" {2 * options.seconds:.0f}s each in all"
        )
        compared_n = await compare_renders(
            [twin_channel, tls_channel],
            twin_pids,
            render_requests,
            metadata,
            n,
            options.seconds,
            meter,
            SEGMENT_N_S,
            SETTLE_N_S,
        )
        twin_n, tls_n = compared_n.plain, compared_n.tls
        cpu[f"Render x{n}, twins (plaintext, TLS)"] = CpuMeter.usage(compared_n.start, compared_n.end)
        say(
            f"   p50 {ms(twin_n.measured.p50_s)} plaintext, {ms(tls_n.measured.p50_s)} TLS;"
            f" {fmt_rate(twin_n.measured.rate)} / {fmt_rate(tls_n.measured.rate)} renders/s"
            f" (TLS / plaintext p50 by half: {ratio_halves(*compared_n.sides)})"
        )
        say(f"   one at a time ({SEGMENT_ONE_S}s segments), {2 * options.floor_seconds:.0f}s each in all")
        compared_1 = await compare_renders(
            [twin_channel, tls_channel],
            twin_pids,
            render_requests,
            metadata,
            1,
            options.floor_seconds,
            meter,
            SEGMENT_ONE_S,
        )
        twin_1, tls_1 = compared_1.plain, compared_1.tls
        caches_age_s = time.monotonic() - twins_batched
        say(f"   p50 {ms(twin_1.measured.p50_s)} plaintext, {ms(tls_1.measured.p50_s)} TLS")
        for label in ("render-twin", "render-tls", "profile-tls"):
            stack.stop_variant(label)
        metered_n = await compare_metrics(
            stack, user_ids, render_requests, metadata, n, options.seconds, meter
        )
        cpu[f"Render x{n}, twins (metrics, none)"] = CpuMeter.usage(metered_n.start, metered_n.end)

        say("fault: SIGTERM the profile service and wait until it has exited")
        exit_code = await stop_profile(stack)
        unknown = int(options.fault_renders * FAULT_UNKNOWN_SHARE)
        fault_requests = [
            render_requests[i % len(render_requests)] for i in range(options.fault_renders - unknown)
        ]
        fault_requests += [
            render_request(user_identifier(f"bench-{stack.run_id}-never-seen-{i}")) for i in range(unknown)
        ]
        random.Random(3).shuffle(fault_requests)
        say(
            f"   {options.fault_renders} renders ({unknown} for customers never seen), {n} concurrent,"
            f" {FAULT_DEADLINE_S * 1000:.0f} ms deadline each"
        )
        snap = meter.snapshot()
        good, outcomes, latencies = await fault_run(
            render_channel, fault_requests, n, FAULT_DEADLINE_S, metadata
        )
        cpu["fault"] = CpuMeter.usage(snap, meter.snapshot())
        say(
            f"   {good}/{len(fault_requests)} answered with a fallback"
            f" within {FAULT_DEADLINE_S * 1000:.0f} ms"
        )
    fault = Fault(
        renders=len(fault_requests),
        deadline_s=FAULT_DEADLINE_S,
        fallback_in_time=good,
        outcomes=dict(outcomes),
        p50_s=percentile(latencies, 50),
        p99_s=percentile(latencies, 99),
        max_s=max(latencies, default=math.nan),
        profile_exit_code=exit_code,
    )
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "source": source_info(),
        "options": {
            "customers": options.customers,
            "events": events,
            "concurrency": n,
            "seconds_per_measure": options.seconds,
            "floor_seconds": options.floor_seconds,
            "deadline_s": DEADLINE_S,
            "fault_renders": options.fault_renders,
            "analyze_during_load": options.analyze,
            "cprofile": options.cprofile_dir is not None,
            "html_bytes": html_bytes,
        },
        "load": {
            "events": events,
            "ingest_s": loaded.ingest_s,
            "merged_after_s": loaded.consumers_done_s[MERGER],
            "merged_events_per_s": loaded.merged_rate,
            "catalog_done_after_s": loaded.consumers_done_s[CATALOG],
        },
        "floors": {
            "empty_unary_1": _call_floor(empty_1),
            "empty_unary_n": _call_floor(empty_n),
            "ideal_n": ideal_n.as_json(),
            "ideal_1": ideal_1.as_json(),
            "in_process_batch": {
                "renders": ideal_batch_renders,
                "seconds": ideal_batch_s,
                "renders_per_s": ideal_batch_renders / ideal_batch_s,
            },
        },
        "render_n": render_n.as_json(),
        "render_1": render_1.as_json(),
        "render_twin_n": compared_n.as_json(0),
        "render_tls_n": compared_n.as_json(1),
        "render_twin_1": compared_1.as_json(0),
        "render_tls_1": compared_1.as_json(1),
        "tls": {
            "render_tls_calls_profile": "a TLS profile service"
            if options.tls_profile
            else "the same profile service, plaintext",
            "seconds_from_twins_render_batch_to_last_measure": caches_age_s,
        },
        "render_metered_n": metered_n.as_json(0),
        "render_unmetered_n": metered_n.as_json(1),
        "render_batch": batch.as_json(),
        "fault": fault.as_json(),
        "goals": {
            "render_p50_vs_ideal": {
                "value": render_n.measured.p50_s / ideal_n.measured.p50_s,
                "goal": GOAL_RENDER_VS_IDEAL,
            },
            "tls_render_p50_vs_plaintext": {  # the twins taking turns, 64 concurrent
                "value": tls_n.measured.p50_s / twin_n.measured.p50_s,
                "goal": GOAL_TLS_VS_PLAINTEXT,
            },
            "tls_render_p99_vs_plaintext": {"value": tls_n.measured.p99_s / twin_n.measured.p99_s},
            "metered_render_rate_vs_unmetered": {  # the twins taking turns, at --concurrency
                "value": metered_n.sides[0].measured.rate / metered_n.sides[1].measured.rate,
                "goal": GOAL_METRICS_RATE,
            },
            "fault_fallback_in_time": {"value": good, "goal": len(fault_requests)},
        },
        "cpu_percent_of_one_core": cpu,
    }


def _outcomes(outcomes: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {count:,}" for name, count in sorted(outcomes.items(), key=lambda kv: -kv[1]))


def report(results: Mapping[str, Any]) -> str:
    floors, options = results["floors"], results["options"]
    n = options["concurrency"]
    e1, en = floors["empty_unary_1"], floors["empty_unary_n"]
    ideal_n, ideal_1, in_process = floors["ideal_n"], floors["ideal_1"], floors["in_process_batch"]
    render_n, render_1, batch, fault = (
        results["render_n"],
        results["render_1"],
        results["render_batch"],
        results["fault"],
    )
    ratio = render_n["p50_s"] / ideal_n["p50_s"]
    twin_n, tls_n = results["render_twin_n"], results["render_tls_n"]
    twin_1, tls_1, tls = results["render_twin_1"], results["render_tls_1"], results["tls"]
    tls_ratio = tls_n["p50_s"] / twin_n["p50_s"]
    metered, unmetered = results["render_metered_n"], results["render_unmetered_n"]
    metered_ratio = metered["per_s"] / unmetered["per_s"]
    all_answered = fault["fallback_in_time"] == fault["renders"]
    errors_n = sum(render_n["errors"].values())
    rows = [
        Row(
            f"Render p50 ({n} concurrent, warm)",
            ms(render_n["p50_s"]),
            f"ideal path p50 {ms(ideal_n['p50_s'])}",
            f"{ratio:.2f} x",
            f"<= {GOAL_RENDER_VS_IDEAL} x",
            verdict(ratio <= GOAL_RENDER_VS_IDEAL),
        ),
        Row("", "", f"empty call p50 {ms(en['p50_s'])}", fmt_ratio(render_n["p50_s"], en["p50_s"])),
        Row(
            f"Render p50 over TLS ({n} concurrent, warm)",
            ms(tls_n["p50_s"]),
            f"plaintext twin p50 {ms(twin_n['p50_s'])} (taking turns)",
            f"{tls_ratio:.2f} x",
            f"<= {GOAL_TLS_VS_PLAINTEXT:.2f} x",
            verdict(tls_ratio <= GOAL_TLS_VS_PLAINTEXT),
        ),
        Row(
            f"  TLS Render p99 ({n} concurrent)",
            ms(tls_n["p99_s"]),
            f"plaintext twin p99 {ms(twin_n['p99_s'])}",
            fmt_ratio(tls_n["p99_s"], twin_n["p99_s"]),
        ),
        Row(
            f"  TLS Render throughput ({n} concurrent)",
            f"{fmt_rate(tls_n['per_s'])} renders/s",
            f"plaintext twin {fmt_rate(twin_n['per_s'])}/s",
            fmt_ratio(tls_n["per_s"], twin_n["per_s"]),
        ),
        Row(
            f"Render throughput with metrics ({n} concurrent)",
            f"{fmt_rate(metered['per_s'])} renders/s",
            f"twin without {fmt_rate(unmetered['per_s'])}/s (taking turns)",
            f"{metered_ratio:.2f} x",
            f">= {GOAL_METRICS_RATE:.2f} x",
            verdict(metered_ratio >= GOAL_METRICS_RATE),
        ),
        Row(
            "  with metrics: p50; server CPU per render",
            f"{ms(metered['p50_s'])}; {metered['server_cpu_per_call_s'] * 1e6:.0f} us",
            f"twin without {ms(unmetered['p50_s'])}; {unmetered['server_cpu_per_call_s'] * 1e6:.0f} us",
            fmt_ratio(metered["server_cpu_per_call_s"], unmetered["server_cpu_per_call_s"]),
        ),
        Row(
            "  TLS Render p50 / p99 (1 at a time)",
            f"{ms(tls_1['p50_s'])} / {ms(tls_1['p99_s'])}",
            f"plaintext twin {ms(twin_1['p50_s'])} / {ms(twin_1['p99_s'])}",
            fmt_ratio(tls_1["p50_s"], twin_1["p50_s"]),
        ),
        Row(
            f"  Render p99 ({n} concurrent)",
            ms(render_n["p99_s"]),
            f"ideal path p99 {ms(ideal_n['p99_s'])}",
            fmt_ratio(render_n["p99_s"], ideal_n["p99_s"]),
        ),
        Row(
            f"  Render throughput ({n} concurrent)",
            f"{fmt_rate(render_n['per_s'])} renders/s",
            f"ideal path {fmt_rate(ideal_n['per_s'])}/s",
            fmt_ratio(render_n["per_s"], ideal_n["per_s"]),
        ),
        Row("", "", f"empty calls {fmt_rate(en['per_s'])}/s", fmt_ratio(render_n["per_s"], en["per_s"])),
        Row(
            "Render p50 / p99 (1 at a time)",
            f"{ms(render_1['p50_s'])} / {ms(render_1['p99_s'])}",
            f"ideal path {ms(ideal_1['p50_s'])} / {ms(ideal_1['p99_s'])}",
            fmt_ratio(render_1["p50_s"], ideal_1["p50_s"]),
        ),
        Row(
            "",
            "",
            f"empty call {ms(e1['p50_s'])} / {ms(e1['p99_s'])}",
            fmt_ratio(render_1["p50_s"], e1["p50_s"]),
        ),
        Row(
            f"RenderBatch ({batch['customers']:,} customers)",
            f"{fmt_rate(batch['renders_per_s'])} renders/s",
            f"in-process ideal batch {fmt_rate(in_process['renders_per_s'])}/s",
            fmt_ratio(batch["renders_per_s"], in_process["renders_per_s"]),
        ),
        Row(
            "",
            "",
            f"ideal path x{n} {fmt_rate(ideal_n['per_s'])}/s",
            fmt_ratio(batch["renders_per_s"], ideal_n["per_s"]),
        ),
        Row(
            f"Profile service stopped: fallback within {fault['deadline_s'] * 1000:.0f} ms",
            f"{fault['fallback_in_time']}/{fault['renders']}",
            "",
            "",
            "all",
            verdict(all_answered),
        ),
        Row(
            "  latency p50 / p99 / max", f"{ms(fault['p50_s'])} / {ms(fault['p99_s'])} / {ms(fault['max_s'])}"
        ),
    ]
    machine, load = results["machine"], results["load"]
    lines = [
        "",
        f"Sendtime bench-render, {results['date']}: {machine['cores']} cores ({machine['cpu_model']}),"
        f" load average {machine['load_average_1m_before']} before the run",
        f"{options['customers']:,} customers ({load['events']:,} events) merged in"
        f" {load['merged_after_s']:.1f}s ({fmt_rate(load['merged_events_per_s'])} ev/s"
        f"{', ANALYZE during the load' if options['analyze_during_load'] else ''});"
        f" template HTML {options['html_bytes']:,} B; {options['seconds_per_measure']:.0f}s per measure,"
        f" deadline {options['deadline_s']:.0f}s per Render",
    ]
    lines += report_warnings(results, options["cprofile"])
    caches_age_s = tls["seconds_from_twins_render_batch_to_last_measure"]
    if caches_age_s > LKG_REFRESH_AFTER_S:
        lines.append(
            f"WARNING: the twins' Render measures ended {caches_age_s:.0f}s after their RenderBatch, past"
            f" render's {LKG_REFRESH_AFTER_S:.0f}s: later renders rewrote last-known-good copies."
        )
    halves = " / ".join(
        f"{tls_half / plain_half:.2f}"
        for plain_half, tls_half in zip(twin_n["half_p50_s"], tls_n["half_p50_s"], strict=True)
    )
    errors_tls = sum(twin_n["errors"].values()) + sum(tls_n["errors"].values())
    lines += [
        "",
        render_table(rows),
        "",
        f"Render at {n} concurrent on the twins, plaintext and TLS taking turns in {twin_n['segments']}"
        f" segments each: TLS p50 / plaintext p50 in the first / second half {halves}; CPU per render"
        f" of the plaintext twin {twin_n['server_cpu_per_call_s'] * 1e6:.0f} us, of the TLS one"
        f" {tls_n['server_cpu_per_call_s'] * 1e6:.0f} us; the TLS twin calls"
        f" {tls['render_tls_calls_profile']}.",
        "",
        "Answers (status/profile source/fallback reason):",
        f"  Render x{n}: {_outcomes(render_n['outcomes'])}"
        + (f"; errors {render_n['errors']}" if errors_n else ""),
        f"  Render x{n} on the twins: plaintext {_outcomes(twin_n['outcomes'])}; TLS"
        f" {_outcomes(tls_n['outcomes'])}"
        + (f"; errors {twin_n['errors']} {tls_n['errors']}" if errors_tls else ""),
        f"  RenderBatch: {_outcomes(batch['outcomes'])}"
        + (f"; {batch['errors']} errors" if batch["errors"] else ""),
        f"  profile service stopped: {_outcomes(fault['outcomes'])}",
        "",
        f"CPU, % of one core ({machine['cores']} cores:"
        f" {100 * (machine['cores'] or 1)}% is the whole machine):",
        render_cpu(results["cpu_percent_of_one_core"]),
        "",
        "Goals are reported, not enforced: the exit code is 0 unless the bench itself failed.",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_render.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve-ideal", help="serve the ideal path (the bench starts it itself)")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--redis", required=True)
    serve.add_argument("--template", type=Path, required=True)
    parser.add_argument(
        "--customers", type=int, default=10_000, help="customers with carts, 2.5 events each (default 10000)"
    )
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent Render calls (default 64)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per measure (default 5)")
    parser.add_argument("--floor-seconds", type=float, default=2.0, help="seconds per floor (default 2)")
    parser.add_argument(
        "--fault-renders",
        type=int,
        default=500,
        help="renders with the profile service stopped (default 500)",
    )
    parser.add_argument(
        "--no-analyze",
        action="store_true",
        help="do not ANALYZE the database during the load (slower setup; see the module docstring)",
    )
    parser.add_argument(
        "--tls-profile",
        action="store_true",
        help="the TLS render service calls a second profile service that serves TLS (the whole chain"
        " in TLS), not the plaintext one",
    )
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.command is None and (
        args.customers < IDEAL_CHUNK
        or min(args.concurrency, args.fault_renders) < 1
        or min(args.seconds, args.floor_seconds) <= 0
    ):
        parser.error(f"--customers must be at least {IDEAL_CHUNK}; the other numbers positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "serve-ideal":
        asyncio.run(serve_ideal(args.port, args.redis, args.template))
        return 0
    options = Options(
        customers=args.customers,
        concurrency=args.concurrency,
        seconds=args.seconds,
        floor_seconds=args.floor_seconds,
        fault_renders=args.fault_renders,
        analyze=not args.no_analyze,
        tls_profile=args.tls_profile,
        json_path=args.json,
        cprofile_dir=args.cprofile,
    )

    def measure(stack: BenchStack) -> dict[str, Any]:
        with ideal_server(stack) as (ideal_target, ideal_pid):
            return asyncio.run(run_bench(stack, options, ideal_target, ideal_pid))

    return run_bench_main(
        "bench-render",
        [suite.PROFILE, suite.INGEST, suite.RENDER],
        cprofile_dir=options.cprofile_dir,
        json_path=options.json_path,
        measure=measure,
        report=report,
    )


if __name__ == "__main__":
    sys.exit(main())
