"""``make chaos``: faults injected one at a time into the whole suite under a steady mixed load,
each run followed by a reconciliation of what the load generator was told against what the
system holds (docs/reliability.md; issue 19).

The harness starts a private stack (``ChaosStack``): its own PostgreSQL cluster (so that it may
restart it), NATS (``sync_interval: always``), Redis, and the four services as processes. The
services reach PostgreSQL, NATS and Redis, and render reaches profile, through a fault proxy
(scripts/fault_proxy.py, a process of its own) that can add latency or stall a route. One
trigger is set up: the ready-made order-completed one, delivering to a webhook receiver (a
process of its own) that records each delivery's ``webhook-id`` and episode key and answers
after ``--receiver-delay-s``, so that deliveries are in flight at any moment.

The load, throughout each run:

- **ingest**: an open loop (Poisson arrivals) of SendEvents calls of ``--batch`` events (product
  views, cart additions, orders with a fresh order id) for ``--customers`` customers, at half
  the calibrated end-to-end maximum: acknowledged and merged (``--ingest-rate`` to set it). A
  call that fails, or an event answered
  RETRY, is sent again with the same event ids until it is acknowledged, as a client must;
- **renders**: ``--render-callers`` callers (64), each rendering a stored template for a
  random customer with a ``--render-deadline-s`` deadline, then pausing ``--render-pause-s``;
- **freshness probes**: every ``--probe-interval-s`` an identify event sets the probe
  customer's ``probe_seq`` trait; a watcher reads the probe's profile every 20 ms. A probe's
  freshness is from its scheduled send to the moment profile serves it (or a later probe);
- **trigger fires**: each acknowledged order is an episode of the order-completed trigger.

The faults (``FAULTS``) come in three kinds: process (kill -9 at a busy moment, then started
again), dependency (PostgreSQL restarted, Redis emptied) and network (a route slow or stalled).
A run: the load for ``--before-s``, the fault, the load for ``--after-s`` more (and on until
freshness is back, up to ``--recovery-limit-s``), then the load stops and everything in flight
settles (retries until acknowledged). The reconciliation, then:

- **lost**: an acknowledged event that is not in profile's event history once the merger is
  idle, and an acknowledged order whose episode did not reach the receiver within
  ``SETTLE_TIMEOUT_S`` (counted again with every delivery at the end);
- **duplicated**: an extra copy of an event in the JetStream events stream, and an order whose
  episode reached the receiver under more than one ``webhook-id`` (a retry must reuse it);
- **profiles**: each touched customer's stored state must equal ``replay`` (the merge's pure
  fold, services/profile_service/state.py) of the events acknowledged for it, as sent;
- **renders**: late (DEADLINE_EXCEEDED at the caller) or INTERNAL/UNKNOWN; fallbacks are fine.
  Beside each late render: whether the harness's own event loop was held up for
  ``CALLER_STALL_S`` or more meanwhile, and who had the cores (CPU per process each second);
- **recovery**: from the fault (the kill, or the end of a held fault: a stall, latency, a cut
  off) to the first of a second's worth of probes in a row that were all fresh (under 1 s).
  Goal: under 5 s after any single process fault.

It ends with one line: ``chaos: <faults> faults, <runs> runs, lost <n>, duplicated <n>, late
renders <n>, worst recovery <s> s`` (``never`` when a run did not recover), and exits 3 when an
invariant broke (lost, duplicated, a profile unlike its replay, INTERNAL/UNKNOWN), 4 when none
did but a goal in seconds was missed (a late render, a process fault's recovery: a machine with
no core to spare misses those too), and 1 when the harness could not run.
"""

from __future__ import annotations

import os

# The harness forks (pg_ctl as the postgres user, from a thread) while gRPC's threads run; gRPC's
# fork handlers then fail in the child, which never uses gRPC.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import argparse  # noqa: E402 - after the environment above, as grpc reads it on import
import asyncio
import base64
import gc
import itertools
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import grpc
import nats
import orjson
import psutil
import redis.asyncio as aioredis
from aiohttp import web
from bench_common import (
    BenchError,
    BenchStack,
    CpuMeter,
    CpuSnapshot,
    fmt_rate,
    machine_info,
    say,
    serve_http_until_sigterm,
    sigterm_as_sigint,
    source_info,
    timestamp_from_ns,
)
from bench_profile import GET_PROFILE, MERGER, SEND_EVENTS
from bench_render import RENDER as RENDER_METHOD
from bench_render import create_template, render_request, user_identifier
from fault_proxy import FaultProxy
from google.protobuf import duration_pb2, struct_pb2
from google.type import money_pb2
from nats.aio.client import Client as NatsClient
from nats.js.api import ConsumerConfig, DeliverPolicy

import devstack
import suite
from profile_service.state import replay, to_json
from sendtime.ingest.v1 import ingest_pb2
from sendtime.profile.v1 import profile_pb2
from sendtime.triggers.v1 import triggers_pb2, triggers_pb2_grpc
from sendtime_common.event_log import MSG_ID_HEADER, JetStreamSettings
from triggers import builtin

TRIGGER_ID = "chaos-orders"
DESTINATION_ID = "chaos-receiver"
PROBE_USER = "chaos-probe"
PROBE_TRAIT = "probe_seq"
FRESHNESS_GOAL_S = 1.0
RECOVERY_GOAL_S = 5.0
BAD_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
SETTLE_TIMEOUT_S = 90.0
EXIT_INVARIANT_BROKEN = 3
EXIT_GOAL_MISSED = 4
# A caller held up this long can see an answer sent in time as late: the render keeps 100 ms of
# its deadline back to answer with the fallback (services/render/renderer.py, fallback_reserve).
# Noted beside the late renders, so that the harness's own stalls are told apart.
CALLER_STALL_S = 0.1
CPU_SAMPLE_S = 1.0
ACKED = frozenset({ingest_pb2.EVENT_OUTCOME_ACCEPTED, ingest_pb2.EVENT_OUTCOME_DUPLICATE})


# --- what a run found (pure) -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Probe:
    seq: int
    scheduled: float  # monotonic seconds
    seen: float | None  # when profile first served it (or a later probe)

    @property
    def freshness(self) -> float | None:
        return None if self.seen is None else self.seen - self.scheduled


def recovery_s(
    probes: Sequence[Probe], fault_at: float, goal_s: float = FRESHNESS_GOAL_S, streak: int = 10
) -> float | None:
    """How long after ``fault_at`` freshness was back under ``goal_s``: from ``fault_at`` to the
    scheduled time of the first of ``streak`` probes in a row that were all fresh (seen within
    ``goal_s``), counting from ``goal_s`` before the fault (a probe sent just before it could
    have been caught by it); 0 when that streak starts before the fault. None when no such
    streak came (no recovery seen). A streak, not the last stale probe: on a loaded machine an
    odd probe of a healthy system takes a second, and one is not an outage."""
    considered = sorted((p for p in probes if p.scheduled >= fault_at - goal_s), key=lambda p: p.scheduled)
    run = 0
    for i, probe in enumerate(considered):
        fresh = probe.freshness is not None and probe.freshness < goal_s
        run = run + 1 if fresh else 0
        if run == streak:
            return max(0.0, considered[i - streak + 1].scheduled - fault_at)
    return None


def recovered(
    probes: Sequence[Probe], fault_at: float, now: float, goal_s: float = FRESHNESS_GOAL_S, streak: int = 10
) -> bool:
    """Whether freshness is known to be back under ``goal_s`` by ``now``: among the probes old
    enough to be judged (scheduled ``goal_s`` before ``now``), a recovery is found."""
    judged = [p for p in probes if p.scheduled <= now - goal_s]
    return recovery_s(judged, fault_at, goal_s, streak) is not None


def stream_duplicates(msg_ids: Iterable[str], seen_before: set[str]) -> int:
    """Extra copies among ``msg_ids`` (an id already in ``seen_before`` counts too); adds the ids
    to ``seen_before``."""
    extra = 0
    for msg_id in msg_ids:
        if msg_id in seen_before:
            extra += 1
        else:
            seen_before.add(msg_id)
    return extra


def overlapping(windows: Iterable[tuple[float, float]], stalls: Sequence[tuple[float, float]]) -> int:
    """How many of the (start, end) ``windows`` overlap any of the (start, end) ``stalls``."""
    return sum(1 for start, end in windows if any(s < end and start < e for s, e in stalls))


def cpu_during(
    samples: Sequence[tuple[float, float, Mapping[str, float]]], windows: Sequence[tuple[float, float]]
) -> dict[str, float]:
    """The mean CPU use per process group (% of one core) over the (start, end, usage) samples
    that overlap any of the (start, end) ``windows``; nothing when none does."""
    chosen = [usage for start, end, usage in samples if overlapping([(start, end)], windows)]
    if not chosen:
        return {}
    names = {name for usage in chosen for name in usage}
    return {name: round(sum(u.get(name, 0.0) for u in chosen) / len(chosen), 1) for name in sorted(names)}


def episode_counts(deliveries: Iterable[tuple[str, str]], orders: Iterable[str]) -> tuple[int, int]:
    """(undelivered, delivered under more than one webhook-id) among ``orders``, from the
    receiver's (webhook-id, episode key) records."""
    webhook_ids: dict[str, set[str]] = defaultdict(set)
    for webhook_id, episode_key in deliveries:
        webhook_ids[episode_key].add(webhook_id)
    wanted = set(orders)
    undelivered = sum(1 for order in wanted if not webhook_ids.get(order))
    duplicated = sum(1 for order in wanted if len(webhook_ids.get(order, ())) > 1)
    return undelivered, duplicated


@dataclass(slots=True)
class RunResult:
    fault: str
    kind: str
    run: int
    events_acked: int = 0
    orders_acked: int = 0
    in_flight_at_fault: str = ""
    lost_events: int = 0
    undelivered_episodes: int = 0
    stream_duplicates: int = 0
    duplicated_episodes: int = 0
    webhook_retries: int = 0  # deliveries that arrived again under the same webhook-id
    seconds: dict[str, float] = field(default_factory=dict)  # the run's phases: load, settle, reconcile
    longest_gc_pause_s: float = 0.0  # the harness's own, during the run
    customers_checked: int = 0
    profiles_differing: int = 0
    renders: int = 0
    renders_late: int = 0
    renders_late_caller_stalled: int = 0  # of renders_late: while the harness itself was held up
    longest_caller_stall_s: float = 0.0  # the harness's event loop's, during the run
    # CPU per process group (% of one core) over the run's load, and over the seconds in which
    # late renders were in flight: who had the cores when renders were late.
    cpu: dict[str, float] = field(default_factory=dict)
    cpu_at_late_renders: dict[str, float] = field(default_factory=dict)
    renders_bad: int = 0
    render_outcomes: dict[str, int] = field(default_factory=dict)
    # When the late renders were sent, in seconds from the fault (its end, for a held one).
    late_renders_at_s: list[float] = field(default_factory=list)
    call_errors: dict[str, int] = field(default_factory=dict)
    recovery_s: float | None = 0.0
    worst_freshness_s: float | None = 0.0
    # From an order's acknowledgement to its episode's first delivery at the receiver.
    delivery_lag_p50_s: float | None = None
    delivery_lag_max_s: float | None = None
    probes: int = 0

    @property
    def lost(self) -> int:
        return self.lost_events + self.undelivered_episodes

    @property
    def duplicated(self) -> int:
        return self.stream_duplicates + self.duplicated_episodes

    @property
    def bad_calls(self) -> int:
        bad = {code.name for code in BAD_CODES}
        answered = self.call_errors.items()  # "<method> <code>": how many
        return self.renders_bad + sum(n for call, n in answered if call.rpartition(" ")[2] in bad)

    def breaches(self) -> list[str]:
        """What broke an invariant or missed a goal in this run."""
        return self.invariant_breaches() + self.missed_goals()

    def invariant_breaches(self) -> list[str]:
        """What broke an invariant, whatever the machine's load: something lost or duplicated,
        a profile unequal to its replay, an INTERNAL/UNKNOWN answer."""
        found = []
        for name, count in (
            ("lost", self.lost),
            ("duplicated", self.duplicated),
            ("profiles differing from their replay", self.profiles_differing),
            ("INTERNAL/UNKNOWN answers", self.bad_calls),
        ):
            if count:
                found.append(f"{name} {count}")
        return found

    def missed_goals(self) -> list[str]:
        """A goal in seconds missed, which a machine with no core to spare misses too: a render
        later than its deadline, a process fault's recovery (``never`` is missed too)."""
        found = []
        if self.renders_late:
            found.append(f"late renders {self.renders_late}")
        if self.kind == "process" and (self.recovery_s is None or self.recovery_s >= RECOVERY_GOAL_S):
            found.append(f"recovery {_seconds(self.recovery_s)} (goal < {RECOVERY_GOAL_S:g} s)")
        return found


class GcPauses:
    """The longest pause of the harness's own garbage collector since the last ``take``: a pause
    stalls the load's event loop, and a caller stalled past a deadline counts an answer that
    came in time as late."""

    def __init__(self) -> None:
        self._started = 0.0
        self.longest_s = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.longest_s = max(self.longest_s, time.perf_counter() - self._started)

    def take(self) -> float:
        longest, self.longest_s = self.longest_s, 0.0
        return longest


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


def summary_line(results: Sequence[RunResult]) -> str:
    """The one line ``make chaos`` ends with."""
    recoveries = [r.recovery_s for r in results]
    worst = (
        "never"
        if any(v is None for v in recoveries)
        else f"{max([0.0, *(v or 0.0 for v in recoveries)]):.1f} s"
    )
    return (
        f"chaos: {len({r.fault for r in results})} faults, {len(results)} runs,"
        f" lost {sum(r.lost for r in results)}, duplicated {sum(r.duplicated for r in results)},"
        f" late renders {sum(r.renders_late for r in results)}, worst recovery {worst}"
    )


# --- the stack ---------------------------------------------------------------------------------


def _kill_now(process: subprocess.Popen[bytes]) -> float:
    """SIGKILL ``process`` and reap it; the monotonic time of the kill."""
    killed_at = time.monotonic()
    process.kill()
    process.wait()
    return killed_at


class ChaosStack(BenchStack):
    """A BenchStack with its own PostgreSQL cluster, the triggers service, a fault proxy in front
    of PostgreSQL, NATS, Redis and (for render) profile, and a webhook receiver."""

    def __init__(self, receiver_delay_s: float, *, keep_dir: bool = False) -> None:
        self.postgres_port = devstack.free_port()
        super().__init__(
            [suite.PROFILE, suite.INGEST, suite.RENDER],
            keep_dir=keep_dir,
            admin_database_url=f"postgresql://postgres@127.0.0.1:{self.postgres_port}/postgres",
        )
        self.workdir.chmod(0o755)  # the cluster runs as the postgres user when we are root
        self.postgres_dir = self.workdir / "postgres"
        self.receiver_delay_s = receiver_delay_s
        self.receiver_port = devstack.free_port()
        self.receiver: subprocess.Popen[bytes] | None = None
        self.proxy: FaultProxy | None = None
        self._postgres_started = False
        self.triggers_env: dict[str, str] = {}

    def _start(self) -> None:
        if self.nats_cluster is not None:
            raise BenchError(
                "make chaos runs one NATS server, behind its fault proxy: unset NATS_CLUSTER_NODES"
                " (a cluster's server killed: tests/test_nats_cluster.py)"
            )
        devstack.start_postgres(self.postgres_port, self.postgres_dir)
        self._postgres_started = True
        profile_port = suite.PROFILE.port(self.env)
        self.proxy = FaultProxy.start(
            {
                "postgres": ("127.0.0.1", self.postgres_port),
                "nats": ("127.0.0.1", self.nats_port),
                "redis": ("127.0.0.1", self.redis_port),
                "profile": ("127.0.0.1", profile_port),
            },
            self.workdir,
        )
        proxied = self.proxy.port
        self.env.update(
            DATABASE_URL=self.database_url.replace(f":{self.postgres_port}/", f":{proxied('postgres')}/"),
            NATS_URL=f"nats://127.0.0.1:{proxied('nats')}",
            REDIS_URL=f"redis://127.0.0.1:{proxied('redis')}/0",
            # render (and triggers) call profile through the proxy: the "render cut off" fault
            PROFILE_SERVICE_TARGET=f"127.0.0.1:{proxied('profile')}",
            RENDER_SERVICE_PLAINTEXT="true",
            # A fault must not make a service look dead for long: restarts are the harness's.
            READINESS_DELAY_SECONDS="0.5",
        )
        self._start_receiver()
        super()._start()  # NATS, Redis, the database and keys, then profile, ingest, render
        self.triggers_env = {
            **self.env,
            "PROFILE_SERVICE_API_KEY": self.admin_key,
            "RENDER_SERVICE_API_KEY": self.admin_key,
            "TRIGGERS_SECRET_KEYS": base64.b64encode(secrets.token_bytes(32)).decode(),
            "TRIGGERS_WEBHOOK_ALLOW": "127.0.0.1",
        }
        self.running.append(self._launch(suite.TRIGGERS, self.triggers_env))

    def _start_receiver(self) -> None:
        with open(self.workdir / "receiver.log", "ab") as log:
            self.receiver = subprocess.Popen(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "receive",
                    "--port",
                    str(self.receiver_port),
                    "--delay-s",
                    str(self.receiver_delay_s),
                ],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        devstack.wait_for_tcp("127.0.0.1", self.receiver_port, 15, self.receiver)

    def cpu_groups(self) -> dict[str, Callable[[], Sequence[int]]]:
        """The processes of this stack for ``CpuMeter``, looked up at each snapshot (a fault
        starts some again): the services, NATS, Redis, the private PostgreSQL cluster (its
        postmaster and every child), the fault proxy, the receiver and the harness."""

        def service(name: str) -> Callable[[], Sequence[int]]:
            return lambda: [r.process.pid for r in self.running if r.service.name == name]

        def postgres() -> list[int]:
            try:
                postmaster = psutil.Process(
                    int((self.postgres_dir / "data" / "postmaster.pid").read_text().split()[0])
                )
                return [postmaster.pid, *(child.pid for child in postmaster.children())]
            except (OSError, ValueError, IndexError, psutil.Error):
                return []

        groups: dict[str, Callable[[], Sequence[int]]] = {
            f"{r.service.name} service": service(r.service.name) for r in self.running
        }
        groups["nats-server"] = lambda: [self.nats.pid] if self.nats is not None else []
        groups["redis-server"] = lambda: [self.redis.pid] if self.redis is not None else []
        groups["postgres"] = postgres
        groups["fault proxy"] = lambda: [self.proxy.process.pid] if self.proxy is not None else []
        groups["webhook receiver"] = lambda: [self.receiver.pid] if self.receiver is not None else []
        groups["harness (load)"] = lambda: [os.getpid()]
        return groups

    @property
    def receiver_url(self) -> str:
        return f"http://127.0.0.1:{self.receiver_port}"

    def kill_and_restart(self, service: suite.Service) -> float:
        """SIGKILL ``service`` and start it again at once, as an orchestrator would; the
        monotonic time of the kill. Blocking (run it in a thread)."""
        index = next(i for i, r in enumerate(self.running) if r.service.name == service.name)
        killed_at = _kill_now(self.running[index].process)
        env = self.triggers_env if service == suite.TRIGGERS else self.env
        self.running[index] = self._launch(service, env)
        return killed_at

    def kill_and_restart_nats(self) -> float:
        assert self.nats is not None
        killed_at = _kill_now(self.nats)
        self.nats = devstack.start_nats(self.nats_port, self.workdir / "nats", detach=True)
        return killed_at

    def kill_and_restart_redis(self) -> float:
        """SIGKILL Redis and start an empty one on its port (it keeps nothing on disk)."""
        assert self.redis is not None
        killed_at = _kill_now(self.redis)
        self.redis = devstack.start_redis(self.redis_port, self.workdir / "redis", detach=True)
        return killed_at

    def take_postgres_down(self, seconds: float) -> float:
        """PostgreSQL stopped as in a crash (immediate) for ``seconds``, then started; when it
        accepted connections again."""
        devstack.stop_postgres(self.postgres_dir, mode="immediate")
        time.sleep(seconds)
        devstack.start_postgres(self.postgres_port, self.postgres_dir)
        return time.monotonic()

    def restart_postgres(self, mode: str) -> float:
        started = time.monotonic()
        devstack.restart_postgres(self.postgres_dir, mode)
        return started

    def close(self) -> None:
        keep, self.keep_dir = self.keep_dir, True
        try:
            super().close()
        finally:
            self.keep_dir = keep
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                if self.receiver is not None:
                    devstack.stop_process(self.receiver)
                    self.receiver = None
                if self.proxy is not None:
                    self.proxy.close()
                    self.proxy = None
                if self._postgres_started:
                    devstack.stop_postgres(self.postgres_dir)
                    self._postgres_started = False
                if not self.keep_dir:
                    shutil.rmtree(self.workdir, ignore_errors=True)
            finally:
                signal.signal(signal.SIGINT, previous)


# --- the webhook receiver (a process of its own) -----------------------------------------------


def serve_receiver(port: int, delay_s: float) -> None:
    """Record each delivery's webhook-id and episode key, then answer 204 after ``delay_s``.
    ``GET /records?after=N`` answers the records from the N-th on and how many are in flight."""
    records: list[tuple[str, str, float]] = []  # webhook-id, episode key, arrival (epoch s)
    in_flight = 0

    async def receive(request: web.Request) -> web.Response:
        nonlocal in_flight
        body = orjson.loads(await request.read())
        records.append((request.headers.get("webhook-id", ""), body["data"]["episode_key"], time.time()))
        in_flight += 1
        try:
            await asyncio.sleep(delay_s)
        finally:
            in_flight -= 1
        return web.Response(status=204)

    async def read(request: web.Request) -> web.Response:
        after = int(request.query.get("after", "0"))
        return web.json_response({"records": records[after:], "in_flight": in_flight})

    app = web.Application()
    app.router.add_post("/hooks", receive)
    app.router.add_get("/records", read)
    asyncio.run(serve_http_until_sigterm(app, port))


# --- the load ----------------------------------------------------------------------------------


def _money(units: int, cents: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code="EUR", units=units, nanos=cents * 10_000_000)


class EventMaker:
    """Events for the load: ids, order ids and occurred_at times unique to this harness run."""

    def __init__(self, run_id: str, customers: int, rng: random.Random) -> None:
        self._run_id = run_id
        self._customers = customers
        self._rng = rng
        self._counter = itertools.count()
        self._last_ns = 0

    def user_id(self, index: int) -> str:
        return f"chaos-{self._run_id}-c{index}"

    def _event(self, user_id: str) -> ingest_pb2.Event:
        n = next(self._counter)
        self._last_ns = max(time.time_ns(), self._last_ns + 1)  # strictly increasing
        return ingest_pb2.Event(
            event_id=f"chaos-{self._run_id}-e{n}",
            occurred_at=timestamp_from_ns(self._last_ns),
            customer=ingest_pb2.CustomerIdentifiers(user_id=user_id),
            source=ingest_pb2.EVENT_SOURCE_WEB,
        )

    def load_event(self) -> ingest_pb2.Event:
        """A product view (70%), a cart addition (15%) or an order (15%) of a random customer."""
        event = self._event(self.user_id(self._rng.randrange(self._customers)))
        sku = f"SKU-{self._rng.randrange(40):03d}"
        price = _money(9 + self._rng.randrange(190), self._rng.randrange(100))
        roll = self._rng.random()
        if roll < 0.70:
            event.product_viewed.CopyFrom(
                ingest_pb2.ProductViewed(sku=sku, name=f"Product {sku}", price=price)
            )
        elif roll < 0.85:
            event.cart_item_added.CopyFrom(
                ingest_pb2.CartItemAdded(sku=sku, name=f"Product {sku}", quantity=1, unit_price=price)
            )
        else:
            event.order_completed.CopyFrom(
                ingest_pb2.OrderCompleted(
                    order_id=f"o-{event.event_id}",
                    total=price,
                    lines=[
                        ingest_pb2.OrderLine(sku=sku, name=f"Product {sku}", quantity=1, unit_price=price)
                    ],
                )
            )
        return event

    def probe_event(self, seq: int) -> ingest_pb2.Event:
        event = self._event(f"{PROBE_USER}-{self._run_id}")
        traits = struct_pb2.Struct()
        traits.update({PROBE_TRAIT: seq})
        event.identify.CopyFrom(ingest_pb2.Identify(traits=traits))
        return event


@dataclass
class Tally:
    """What the load saw during one run."""

    acked: list[ingest_pb2.Event] = field(default_factory=list)
    acked_at: dict[str, float] = field(default_factory=dict)  # orders' event ids: when acknowledged (epoch s)
    refused: Counter[str] = field(default_factory=Counter)
    call_errors: Counter[str] = field(default_factory=Counter)
    render_outcomes: Counter[str] = field(default_factory=Counter)
    late_renders_at: list[float] = field(default_factory=list)  # when each late one was sent
    # When the harness's event loop was held up (CALLER_STALL_S or more): (due, woke) monotonic.
    stalls: list[tuple[float, float]] = field(default_factory=list)
    # CPU per process group (CpuMeter.usage) each second: (from, to, usage), monotonic.
    cpu: list[tuple[float, float, dict[str, float]]] = field(default_factory=list)
    probes: dict[int, Probe] = field(default_factory=dict)


class Load:
    """The mixed load: ingest calls, render callers, freshness probes (see the module's text)."""

    def __init__(self, stack: ChaosStack, options: Options, maker: EventMaker) -> None:
        self._stack = stack
        self._options = options
        self.maker = maker
        self._rng = random.Random(5)
        self._metadata = stack.key_metadata
        self._ingest = stack.channel(stack.target(suite.INGEST))
        self._profile = stack.channel(stack.target(suite.PROFILE))
        self._render = stack.channel(stack.target(suite.RENDER))
        self._send = self._ingest.unary_unary(
            SEND_EVENTS,
            request_serializer=ingest_pb2.SendEventsRequest.SerializeToString,
            response_deserializer=ingest_pb2.SendEventsResponse.FromString,
        )
        self._get = self._profile.unary_unary(
            GET_PROFILE,
            request_serializer=profile_pb2.GetProfileRequest.SerializeToString,
            response_deserializer=profile_pb2.GetProfileResponse.FromString,
        )
        self._render_call = self._render.unary_unary(
            RENDER_METHOD, request_serializer=None, response_deserializer=None
        )
        self.tally = Tally()
        self.active = asyncio.Event()
        self.sends_in_flight = 0
        self._pending: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._probe_seq = 0
        self._probe_seen = 0
        self.ingest_rate = 0.0

    # Sending: until every event is acknowledged, as a client that must not lose one does.
    async def send(self, events: Sequence[ingest_pb2.Event]) -> None:
        waiting = list(events)
        backoff = 0.05
        self.sends_in_flight += 1
        try:
            while waiting:
                try:
                    answer = await self._send(
                        ingest_pb2.SendEventsRequest(events=waiting), timeout=5, metadata=self._metadata
                    )
                except grpc.aio.AioRpcError as exc:
                    self.tally.call_errors[f"SendEvents {exc.code().name}"] += 1
                else:
                    by_id = {e.event_id: e for e in waiting}
                    retry = []
                    now = time.time()
                    for result in answer.results:
                        if result.outcome in ACKED:
                            event = by_id[result.event_id]
                            self.tally.acked.append(event)
                            if event.HasField("order_completed"):
                                self.tally.acked_at[event.order_completed.order_id] = now
                        elif result.outcome == ingest_pb2.EVENT_OUTCOME_RETRY:
                            retry.append(by_id[result.event_id])
                        else:  # the harness's events are valid and never reuse an id
                            self.tally.refused[ingest_pb2.EventOutcome.Name(result.outcome)] += 1
                    waiting = retry
                    if not waiting:
                        return
                await asyncio.sleep(backoff * (0.5 + self._rng.random()))
                backoff = min(backoff * 2, 1.0)
        finally:
            self.sends_in_flight -= 1

    async def get_profile(
        self, request: profile_pb2.GetProfileRequest, timeout_s: float
    ) -> profile_pb2.GetProfileResponse:
        answer: profile_pb2.GetProfileResponse = await self._get(
            request, timeout=timeout_s, metadata=self._metadata
        )
        return answer

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _ingest_loop(self) -> None:
        while True:
            await self.active.wait()
            self._spawn(self.send([self.maker.load_event() for _ in range(self._options.batch)]))
            await asyncio.sleep(self._rng.expovariate(self.ingest_rate))

    async def _render_caller(self) -> None:
        while True:
            await self.active.wait()
            user_id = self.maker.user_id(self._rng.randrange(self._options.customers))
            request = render_request(user_identifier(user_id))
            sent = time.monotonic()
            try:
                await self._render_call(
                    request, timeout=self._options.render_deadline_s, metadata=self._metadata
                )
            except grpc.aio.AioRpcError as exc:
                self.tally.render_outcomes[exc.code().name] += 1
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    self.tally.late_renders_at.append(sent)
            else:
                self.tally.render_outcomes["OK"] += 1
            await asyncio.sleep(self._options.render_pause_s)

    async def _probe_loop(self) -> None:
        while True:
            await self.active.wait()
            self._probe_seq += 1
            seq = self._probe_seq
            self.tally.probes[seq] = Probe(seq, time.monotonic(), None)
            self._spawn(self.send([self.maker.probe_event(seq)]))
            await asyncio.sleep(self._options.probe_interval_s)

    async def _probe_watch(self) -> None:
        identifier = profile_pb2.Identifier(
            kind=profile_pb2.IDENTIFIER_KIND_USER_ID, value=f"{PROBE_USER}-{self._stack.run_id}"
        )
        request = profile_pb2.GetProfileRequest(identifier=identifier)
        while True:
            await asyncio.sleep(0.02)
            try:
                answer = await self.get_profile(request, 1)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    self.tally.call_errors[f"GetProfile {exc.code().name}"] += 1
                continue
            value = answer.profile.traits.fields.get(PROBE_TRAIT)
            seen = int(value.number_value) if value is not None else 0
            if seen > self._probe_seen:
                now = time.monotonic()
                for seq in range(self._probe_seen + 1, seen + 1):
                    probe = self.tally.probes.get(seq)
                    if probe is not None and probe.seen is None:
                        self.tally.probes[seq] = Probe(seq, probe.scheduled, now)
                self._probe_seen = seen

    async def _watch_stalls(self) -> None:
        """Note when this event loop wakes CALLER_STALL_S or more past its time: the harness's
        own process held up (its work, its garbage collector, or no core free for it)."""
        while True:
            due = time.monotonic() + 0.01
            await asyncio.sleep(0.01)
            woke = time.monotonic()
            if woke - due >= CALLER_STALL_S:
                self.tally.stalls.append((due, woke))

    async def _sample_cpu(self) -> None:
        meter = CpuMeter(self._stack.cpu_groups())
        last: CpuSnapshot = await asyncio.to_thread(meter.snapshot)
        while True:
            await asyncio.sleep(CPU_SAMPLE_S)
            now: CpuSnapshot = await asyncio.to_thread(meter.snapshot)
            self.tally.cpu.append((last.at, now.at, CpuMeter.usage(last, now)))
            last = now

    def start(self) -> None:
        self._loops = [
            asyncio.ensure_future(self._watch_stalls()),
            asyncio.ensure_future(self._sample_cpu()),
            asyncio.ensure_future(self._ingest_loop()),
            asyncio.ensure_future(self._probe_loop()),
            asyncio.ensure_future(self._probe_watch()),
            *(asyncio.ensure_future(self._render_caller()) for _ in range(self._options.render_callers)),
        ]

    async def settle(self, timeout_s: float) -> None:
        """Stop offering load, and wait until every send in flight is acknowledged."""
        self.active.clear()
        deadline = time.monotonic() + timeout_s
        while self._pending:
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{len(self._pending)} SendEvents calls still not acknowledged after {timeout_s:g}s"
                )
            await asyncio.wait(set(self._pending), timeout=1)

    async def wait_probes_seen(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self._probe_seen < self._probe_seq and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def new_tally(self) -> Tally:
        finished, self.tally = self.tally, Tally()
        return finished

    async def close(self) -> None:
        for task in [*self._loops, *self._pending]:
            task.cancel()
        await asyncio.gather(*self._loops, *self._pending, return_exceptions=True)
        for channel in (self._ingest, self._profile, self._render):
            await channel.close(None)


async def calibrate(load: Load, pool: asyncpg.Pool, options: Options) -> float:
    """The events/s the suite takes end to end beside the renders and probes: a closed loop of
    ``options.calibrate_callers`` SendEvents calls for ``options.calibrate_s``, divided by the
    time until profile has merged the last of them. Ingest alone acknowledges faster than the
    merger merges; half of ingest's rate would be a backlog that grows, not a steady load."""
    load.active.set()
    acked_before = len(load.tally.acked)
    stop_at = time.monotonic() + options.calibrate_s

    async def caller() -> None:
        while time.monotonic() < stop_at:
            await load.send([load.maker.load_event() for _ in range(options.batch)])

    started = time.monotonic()
    await asyncio.gather(*(caller() for _ in range(options.calibrate_callers)))
    acked = [e.event_id for e in load.tally.acked[acked_before:]]
    missing = set(acked)
    while missing:
        missing -= await _merged(pool, sorted(missing))
        if missing:
            await asyncio.sleep(0.05)
    return len(acked) / (time.monotonic() - started)


# --- the faults --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fault:
    name: str
    kind: str  # process | dependency | network
    what: str
    inject: Callable[[Chaos], Awaitable[tuple[float, str]]]  # (fault_at, in flight when it hit)


class Chaos:
    """The stack, the load and the connections the reconciliation reads with."""

    def __init__(self, stack: ChaosStack, options: Options, load: Load) -> None:
        self.stack = stack
        self.options = options
        self.load = load
        self.settings = JetStreamSettings.from_env(stack.env)
        self.nc: NatsClient | None = None
        self.pool: asyncpg.Pool | None = None
        self.http: aiohttp.ClientSession | None = None
        self.acked: dict[str, list[ingest_pb2.Event]] = defaultdict(list)  # by user id
        self.customer_ids: dict[str, str] = {}
        self.stream_ids: set[str] = set()
        self.deliveries: list[tuple[str, str]] = []  # webhook-id, episode key
        self.first_arrival: dict[str, float] = {}  # by episode key (epoch s)
        self.run_orders: list[list[str]] = []  # each run's acknowledged orders, in run order

    async def open(self) -> None:
        self.nc = await nats.connect(
            self.stack.nats_url,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
            error_cb=_ignore,  # the kill-nats fault's disconnections are expected
        )
        # min_size 0: no pool upkeep (and its log lines) while PostgreSQL restarts
        self.pool = await asyncpg.create_pool(self.stack.database_url, min_size=0, max_size=4)
        assert self.pool is not None
        self.http = aiohttp.ClientSession()

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
        if self.pool is not None:
            await self.pool.close()
        if self.nc is not None:
            await self.nc.close()

    # The evidence that a kill lands in the middle of work.
    async def ack_pending(self) -> int:
        assert self.nc is not None
        info = await self.nc.jetstream().consumer_info(self.settings.stream, MERGER)
        return int(info.num_ack_pending)

    async def receiver_in_flight(self) -> int:
        assert self.http is not None
        async with self.http.get(f"{self.stack.receiver_url}/records?after={len(self.deliveries)}") as answer:
            body = await answer.json()
        for webhook_id, episode_key, arrived in body["records"]:
            self.deliveries.append((webhook_id, episode_key))
            self.first_arrival.setdefault(episode_key, arrived)
        return int(body["in_flight"])

    async def stream_last_seq(self) -> int:
        assert self.nc is not None
        info = await self.nc.jetstream().stream_info(self.settings.stream)
        return int(info.state.last_seq)


async def _ignore(_error: Exception) -> None:
    pass


async def _when_busy(busy: Callable[[], Awaitable[int]], timeout_s: float = 3.0) -> str:
    """Wait (up to ``timeout_s``) until ``busy`` reports work in flight; what it reported last
    (or why it could not tell)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            found = await busy()
        except Exception as exc:  # noqa: BLE001 - evidence only; the fault goes ahead anyway
            if time.monotonic() > deadline:
                return f"unknown ({type(exc).__name__}: {exc})"
        else:
            if found or time.monotonic() > deadline:
                return str(found)
        await asyncio.sleep(0.01)


def _kill(
    service: suite.Service,
    busy: Callable[[Chaos], Callable[[], Awaitable[int]]],
    label: str,
    wait_s: float = 3.0,
) -> Callable[[Chaos], Awaitable[tuple[float, str]]]:
    async def inject(chaos: Chaos) -> tuple[float, str]:
        found = await _when_busy(busy(chaos), wait_s)
        killed_at = await asyncio.to_thread(chaos.stack.kill_and_restart, service)
        return killed_at, f"{found} {label}"

    return inject


async def _sends(chaos: Chaos) -> int:
    return chaos.load.sends_in_flight


async def _kill_nats(chaos: Chaos) -> tuple[float, str]:
    found = chaos.load.sends_in_flight
    return await asyncio.to_thread(chaos.stack.kill_and_restart_nats), f"{found} sends"


async def _kill_redis(chaos: Chaos) -> tuple[float, str]:
    return await asyncio.to_thread(chaos.stack.kill_and_restart_redis), ""


async def _flush_redis(chaos: Chaos) -> tuple[float, str]:
    client = aioredis.Redis.from_url(chaos.stack.redis_url)
    try:
        at = time.monotonic()
        await client.flushall()
    finally:
        await client.aclose()
    return at, ""


def _restart_postgres(mode: str) -> Callable[[Chaos], Awaitable[tuple[float, str]]]:
    async def inject(chaos: Chaos) -> tuple[float, str]:
        found = await _when_busy(chaos.ack_pending)
        at = await asyncio.to_thread(chaos.stack.restart_postgres, mode)
        return at, f"{found} unacked, PostgreSQL back after {time.monotonic() - at:.1f} s"

    return inject


async def _postgres_down(chaos: Chaos) -> tuple[float, str]:
    """PostgreSQL crashed and away for twice the hold (8 s by default: about a failover)."""
    found = await _when_busy(chaos.ack_pending)
    away_s = 2 * chaos.options.hold_s
    back = await asyncio.to_thread(chaos.stack.take_postgres_down, away_s)
    return back, f"{found} unacked, PostgreSQL away {away_s:g} s"


def _slow(route: str) -> Callable[[Chaos], Awaitable[tuple[float, str]]]:
    """Latency on every chunk for the hold, then a stall of half the hold; the fault ends when
    the route flows again."""

    async def inject(chaos: Chaos) -> tuple[float, str]:
        proxy, hold = chaos.stack.proxy, chaos.options.hold_s
        assert proxy is not None
        await asyncio.to_thread(proxy.latency, route, chaos.options.latency_s)
        await asyncio.sleep(hold)
        await asyncio.to_thread(proxy.stall, route)
        await asyncio.sleep(hold / 2)
        await asyncio.to_thread(proxy.latency, route, 0)
        await asyncio.to_thread(proxy.resume, route)
        return time.monotonic(), ""

    return inject


async def _cut_render_off(chaos: Chaos) -> tuple[float, str]:
    """render's calls to profile stall (held bytes, open connections) for the hold."""
    proxy = chaos.stack.proxy
    assert proxy is not None
    await asyncio.to_thread(proxy.stall, "profile")
    await asyncio.sleep(chaos.options.hold_s)
    await asyncio.to_thread(proxy.resume, "profile")
    return time.monotonic(), ""


FAULTS: tuple[Fault, ...] = (
    # process: a service or the event log killed (-9) at a busy moment, and started again
    Fault(
        "kill-profile",
        "process",
        "kill -9 of profile in a merge batch, restarted",
        _kill(suite.PROFILE, lambda c: c.ack_pending, "unacked"),
    ),
    Fault(
        "kill-ingest",
        "process",
        "kill -9 of ingest while publishing, restarted",
        _kill(suite.INGEST, lambda c: lambda: _sends(c), "sends"),
    ),
    Fault(
        "kill-triggers",
        "process",
        "kill -9 of triggers in a delivery, restarted",
        # Orders come at random: up to 10 s for a delivery to be in flight.
        _kill(suite.TRIGGERS, lambda c: c.receiver_in_flight, "deliveries", wait_s=10.0),
    ),
    Fault("kill-nats", "process", "kill -9 of nats-server, restarted", _kill_nats),
    # dependency: PostgreSQL restarted, Redis emptied
    Fault(
        "postgres-immediate",
        "dependency",
        "PostgreSQL restarted in immediate mode",
        _restart_postgres("immediate"),
    ),
    Fault("postgres-fast", "dependency", "PostgreSQL restarted in fast mode", _restart_postgres("fast")),
    Fault("postgres-down", "dependency", "PostgreSQL crashed, away for 2 holds, started", _postgres_down),
    Fault("redis-flushall", "dependency", "Redis FLUSHALL", _flush_redis),
    Fault("redis-restart", "dependency", "kill -9 of Redis, restarted empty", _kill_redis),
    # network: a route stalled or slow (the fault proxy)
    Fault("render-cut-off", "network", "render cut off from profile (stalled)", _cut_render_off),
    Fault(
        "slow-postgres",
        "network",
        "latency, then a stall, between the services and PostgreSQL",
        _slow("postgres"),
    ),
    Fault("slow-nats", "network", "latency, then a stall, between the services and NATS", _slow("nats")),
    Fault("slow-redis", "network", "latency, then a stall, between the services and Redis", _slow("redis")),
)
FAULTS_BY_NAME = {f.name: f for f in FAULTS}


def short_matrix() -> list[Fault]:
    """One fault of each kind (the first listed): what ``make test`` runs."""
    chosen: dict[str, Fault] = {}
    for fault in FAULTS:
        chosen.setdefault(fault.kind, fault)
    return list(chosen.values())


# --- a run and its reconciliation --------------------------------------------------------------


async def run_once(chaos: Chaos, fault: Fault, run: int) -> RunResult:
    options, load = chaos.options, chaos.load
    first_seq = await chaos.stream_last_seq() + 1
    started = time.monotonic()
    load.new_tally()
    load.active.set()
    await asyncio.sleep(options.before_s)
    fault_at, in_flight = await fault.inject(chaos)
    await asyncio.sleep(options.after_s)
    # A backlog built during a held fault drains at the load's spare rate: the load goes on
    # until freshness is back (or the limit), so that the recovery is measured, not cut off.
    limit = time.monotonic() + options.recovery_limit_s
    streak = max(1, round(FRESHNESS_GOAL_S / options.probe_interval_s))  # a second of probes
    while not recovered(list(load.tally.probes.values()), fault_at, time.monotonic(), streak=streak):
        if time.monotonic() > limit:
            break
        await asyncio.sleep(0.2)
    loaded = time.monotonic()
    await load.settle(SETTLE_TIMEOUT_S)
    await load.wait_probes_seen(SETTLE_TIMEOUT_S)
    tally = load.new_tally()
    if tally.refused:
        raise BenchError(f"ingest refused the harness's events: {dict(tally.refused)}")
    result = RunResult(fault=fault.name, kind=fault.kind, run=run, in_flight_at_fault=in_flight)
    settled = time.monotonic()
    await reconcile(chaos, tally, first_seq, result)
    result.seconds = {
        "load": round(loaded - started, 1),
        "settle": round(settled - loaded, 1),
        "reconcile": round(time.monotonic() - settled, 1),
    }
    probes = list(tally.probes.values())
    result.probes = len(probes)
    result.recovery_s = recovery_s(probes, fault_at, streak=streak)
    freshness = [p.freshness for p in probes]
    result.worst_freshness_s = None if None in freshness else max([0.0, *(f or 0.0 for f in freshness)])
    result.renders = sum(tally.render_outcomes.values())
    result.renders_late = tally.render_outcomes.get("DEADLINE_EXCEEDED", 0)
    result.renders_bad = sum(tally.render_outcomes.get(c.name, 0) for c in BAD_CODES)
    result.render_outcomes = dict(tally.render_outcomes)
    result.late_renders_at_s = [round(at - fault_at, 2) for at in tally.late_renders_at]
    deadline_s = chaos.options.render_deadline_s
    result.renders_late_caller_stalled = overlapping(
        ((sent, sent + deadline_s) for sent in tally.late_renders_at), tally.stalls
    )
    result.longest_caller_stall_s = round(max([0.0, *(woke - due for due, woke in tally.stalls)]), 3)
    loading = [sample for sample in tally.cpu if sample[0] < loaded]
    result.cpu = cpu_during(loading, [(started, loaded)])
    result.cpu_at_late_renders = cpu_during(loading, [(at, at + deadline_s) for at in tally.late_renders_at])
    result.call_errors = dict(tally.call_errors)
    return result


async def _merged(pool: asyncpg.Pool, event_ids: Sequence[str]) -> set[str]:
    rows = await pool.fetch(
        "SELECT event_id FROM event_ids WHERE event_id = ANY($1::text[])", list(event_ids)
    )
    return {r["event_id"] for r in rows}


async def reconcile(chaos: Chaos, tally: Tally, first_seq: int, result: RunResult) -> None:
    assert chaos.pool is not None and chaos.nc is not None
    acked_ids = [e.event_id for e in tally.acked]
    result.events_acked = len(acked_ids)
    orders = [e.order_completed.order_id for e in tally.acked if e.HasField("order_completed")]
    result.orders_acked = len(orders)
    chaos.run_orders.append(orders)
    for event in tally.acked:
        chaos.acked[event.customer.user_id].append(event)

    # Lost: acknowledged, never merged (waited for while the merger catches up).
    missing = set(acked_ids)
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while missing and time.monotonic() < deadline:
        missing -= await _merged(chaos.pool, sorted(missing))
        if missing:
            await asyncio.sleep(0.2)
    result.lost_events = len(missing)

    # Duplicated in the log: every message of the run's stretch of the stream, by Nats-Msg-Id.
    last_seq = await chaos.stream_last_seq()
    result.stream_duplicates = stream_duplicates(
        await _stream_ids(chaos, first_seq, last_seq), chaos.stream_ids
    )

    # The episodes: every order delivered, under one webhook-id.
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        await chaos.receiver_in_flight()  # reads the new records
        undelivered, duplicated = episode_counts(chaos.deliveries, orders)
        if not undelivered or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    result.undelivered_episodes, result.duplicated_episodes = undelivered, duplicated
    wanted = set(orders)
    arrivals = Counter(w for w, key in chaos.deliveries if key in wanted)
    result.webhook_retries = sum(n - 1 for n in arrivals.values())
    lags = sorted(
        chaos.first_arrival[o] - tally.acked_at[o]
        for o in orders
        if o in chaos.first_arrival and o in tally.acked_at
    )
    if lags:
        result.delivery_lag_p50_s = round(lags[len(lags) // 2], 2)
        result.delivery_lag_max_s = round(lags[-1], 2)

    # Profiles: each touched customer's state equals the replay of what was acknowledged for it.
    touched = sorted({e.customer.user_id for e in tally.acked})
    await _resolve_customers(chaos, touched)
    known = {chaos.customer_ids[u]: u for u in touched if u in chaos.customer_ids}
    rows = await chaos.pool.fetch(
        "SELECT customer_id::text AS id, state::text AS state FROM customers"
        " WHERE customer_id = ANY($1::uuid[])",
        list(known),
    )
    differing = len(touched) - len(rows)  # a customer profile does not know
    for row in rows:
        expected = to_json(replay(chaos.acked[known[row["id"]]]))
        if orjson.loads(row["state"]) != orjson.loads(orjson.dumps(expected)):
            differing += 1
    result.customers_checked = len(touched)
    result.profiles_differing = differing


async def _stream_ids(chaos: Chaos, first_seq: int, last_seq: int) -> list[str]:
    """The Nats-Msg-Id of every message from ``first_seq`` to ``last_seq`` in the events stream."""
    if last_seq < first_seq:
        return []
    assert chaos.nc is not None
    js = chaos.nc.jetstream()
    subscription = await js.pull_subscribe(
        f"{chaos.settings.subject_prefix}.>",
        durable=None,
        stream=chaos.settings.stream,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=first_seq, ack_policy=None
        ),
    )
    ids: list[str] = []
    try:
        while True:
            for msg in await subscription.fetch(500, timeout=5):
                ids.append((msg.headers or {}).get(MSG_ID_HEADER, ""))
                if msg.metadata.sequence.stream >= last_seq:
                    return ids
    finally:
        await subscription.unsubscribe()


async def _resolve_customers(chaos: Chaos, user_ids: Sequence[str]) -> None:
    """Find the customer id of each user id not yet known (GetProfile)."""
    unknown = [u for u in user_ids if u not in chaos.customer_ids]
    semaphore = asyncio.Semaphore(16)

    async def one(user_id: str) -> None:
        request = profile_pb2.GetProfileRequest(
            identifier=profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_USER_ID, value=user_id)
        )
        async with semaphore:
            try:
                answer = await chaos.load.get_profile(request, 5)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                return
            chaos.customer_ids[user_id] = answer.profile.customer_id

    await asyncio.gather(*(one(u) for u in unknown))


# --- the matrix --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    faults: tuple[str, ...]
    runs: int
    customers: int
    batch: int
    ingest_rate: float | None
    calibrate_s: float
    calibrate_callers: int
    render_callers: int
    render_pause_s: float
    render_deadline_s: float
    probe_interval_s: float
    before_s: float
    after_s: float
    hold_s: float
    latency_s: float
    recovery_limit_s: float
    receiver_delay_s: float
    allowed_lateness_s: float | None
    keep: bool
    json_path: Path | None


async def set_up_trigger(stack: ChaosStack, allowed_lateness_s: float | None) -> None:
    async with stack.channel(stack.target(suite.TRIGGERS)) as channel:
        destinations = triggers_pb2_grpc.DestinationServiceStub(channel)
        await destinations.CreateDestination(
            triggers_pb2.CreateDestinationRequest(
                destination_id=DESTINATION_ID,
                destination=triggers_pb2.Destination(
                    display_name="Chaos receiver",
                    webhook=triggers_pb2.WebhookTarget(
                        url=f"{stack.receiver_url}/hooks", timeout=duration_pb2.Duration(seconds=5)
                    ),
                ),
            ),
            timeout=10,
        )
        trigger = builtin.order_completed([f"destinations/{DESTINATION_ID}"])
        if allowed_lateness_s is not None:
            trigger.allowed_lateness.FromTimedelta(timedelta(seconds=allowed_lateness_s))
        await triggers_pb2_grpc.TriggerServiceStub(channel).CreateTrigger(
            triggers_pb2.CreateTriggerRequest(trigger_id=TRIGGER_ID, trigger=trigger), timeout=10
        )


async def run_matrix(stack: ChaosStack, options: Options) -> dict[str, Any]:
    faults = [FAULTS_BY_NAME[name] for name in options.faults]
    await set_up_trigger(stack, options.allowed_lateness_s)
    await create_template(stack, stack.target(suite.RENDER))
    maker = EventMaker(stack.run_id, options.customers, random.Random(19))
    load = Load(stack, options, maker)
    chaos = Chaos(stack, options, load)
    results: list[RunResult] = []
    try:
        await chaos.open()
        load.ingest_rate = 1.0  # until calibrated
        load.start()
        if options.ingest_rate is None:
            say(
                f"calibrate: SendEvents in a closed loop of {options.calibrate_callers} callers"
                " beside the renders, until merged"
            )
            assert chaos.pool is not None
            maximum = await calibrate(load, chaos.pool, options)
            load.ingest_rate = max(1.0, maximum / 2 / options.batch)
            say(f"   {fmt_rate(maximum)} events/s merged at most; the load offers {fmt_rate(maximum / 2)}/s")
        else:
            load.ingest_rate = options.ingest_rate / options.batch
        await load.settle(SETTLE_TIMEOUT_S)
        warmup = load.new_tally()
        for event in warmup.acked:  # the calibration's events count in the replays
            chaos.acked[event.customer.user_id].append(event)
        pauses = GcPauses()
        for fault in faults:
            for run in range(1, options.runs + 1):
                say(f"{fault.name} #{run}: {fault.what}")
                # What the harness keeps for the replays (every acknowledged event) is never
                # garbage: out of the collector's scans, which would otherwise grow with it.
                gc.collect()
                gc.freeze()
                pauses.take()
                result = await run_once(chaos, fault, run)
                result.longest_gc_pause_s = round(pauses.take(), 3)
                results.append(result)
                say(
                    f"   {result.events_acked:,} events, {result.orders_acked:,} orders,"
                    f" {result.renders:,} renders;"
                    f" in flight at the fault: {result.in_flight_at_fault or 'n/a'};"
                    f" webhooks retried under their id: {result.webhook_retries};"
                    f" lost {result.lost}, duplicated {result.duplicated},"
                    f" profiles differing {result.profiles_differing}/{result.customers_checked},"
                    f" renders late {result.renders_late}"
                    f" ({result.renders_late_caller_stalled} while the caller stalled),"
                    f" bad {result.bad_calls};"
                    f" recovery {_seconds(result.recovery_s)},"
                    f" worst freshness {_seconds(result.worst_freshness_s)};"
                    f" delivery lag p50 {_seconds(result.delivery_lag_p50_s)},"
                    f" max {_seconds(result.delivery_lag_max_s)};"
                    f" took {', '.join(f'{k} {v:g} s' for k, v in result.seconds.items())};"
                    f" longest GC pause {result.longest_gc_pause_s * 1000:.0f} ms,"
                    f" longest stall {result.longest_caller_stall_s * 1000:.0f} ms"
                )
                if result.cpu_at_late_renders:
                    say(f"   CPU while renders were late: {busiest(result.cpu_at_late_renders)}")
        # A retry can arrive after its run ended: count each run's episodes again with every record.
        await chaos.receiver_in_flight()
        for result, orders in zip(results, chaos.run_orders, strict=True):
            result.undelivered_episodes, result.duplicated_episodes = episode_counts(chaos.deliveries, orders)
    finally:
        await load.close()
        await chaos.close()
    return {
        "bench": "chaos",
        "machine": machine_info(),
        "source": source_info(),
        "options": {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in asdict(options).items()
            if k not in ("json_path", "keep")
        },
        "ingest_events_per_s": load.ingest_rate * options.batch,
        "runs": [
            {
                **asdict(r),
                "lost": r.lost,
                "duplicated": r.duplicated,
                "breaches": r.breaches(),
                "invariant_breaches": r.invariant_breaches(),
            }
            for r in results
        ],
        "summary": summary_line(results),
        "passed": not any(r.breaches() for r in results),
        "invariants_held": not any(r.invariant_breaches() for r in results),
    }


# --- the report --------------------------------------------------------------------------------


MATRIX_HEADER = (
    "fault",
    "runs",
    "lost",
    "duplicated",
    "renders late",
    "worst recovery",
    "worst freshness",
    "worst delivery lag",
    "",
)


def busiest(cpu: Mapping[str, float], top: int = 5) -> str:
    """The machine's total and the ``top`` busiest process groups, in % of one core."""
    groups = sorted(((v, k) for k, v in cpu.items() if k != "machine"), reverse=True)[:top]
    shown = ", ".join(f"{name} {value:.0f}%" for value, name in groups)
    return f"machine {cpu.get('machine', 0.0):.0f}% ({shown})"


def _late(runs: Sequence[Mapping[str, Any]]) -> str:
    late = f"{sum(r['renders_late'] for r in runs)} of {sum(r['renders'] for r in runs):,}"
    stalled = sum(r["renders_late_caller_stalled"] for r in runs)
    return f"{late} ({stalled} caller stalled)" if stalled else late


def matrix_table(runs: Sequence[Mapping[str, Any]]) -> str:
    """One row per fault (the table docs/reliability.md shows): its runs, the sums of what broke
    over them, and the worst recovery, probe freshness and delivery lag."""
    rows = [MATRIX_HEADER]
    for name, group in itertools.groupby(runs, key=lambda r: r["fault"]):
        these = list(group)

        def worst(key: str, these: list[Mapping[str, Any]] = these, none: str = "never") -> str:
            values = [r[key] for r in these]
            return none if None in values else f"{max(values):.1f} s"

        rows.append(
            (
                name,
                str(len(these)),
                str(sum(r["lost"] for r in these)),
                str(sum(r["duplicated"] for r in these)),
                _late(these),
                worst("recovery_s"),
                worst("worst_freshness_s"),
                worst("delivery_lag_max_s", none="n/a"),
                "FAIL" if any(r["breaches"] for r in these) else "PASS",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(MATRIX_HEADER))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def report(results: Mapping[str, Any]) -> str:
    runs = results["runs"]
    breaches = [f"{r['fault']} #{r['run']}: {', '.join(r['breaches'])}" for r in runs if r["breaches"]]
    lines = [
        f"Chaos: ingest at {fmt_rate(results['ingest_events_per_s'])} events/s,"
        f" {results['options']['render_callers']} render callers; each fault"
        f" {results['options']['runs']} time(s).",
        matrix_table(runs),
        "",
        *(breaches or ["no invariant broke, no goal missed"]),
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="chaos.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--faults",
        default="all",
        help=f"comma-separated, 'all' or 'short' (one of each kind); of: {', '.join(FAULTS_BY_NAME)}",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of each fault (default 3)")
    parser.add_argument(
        "--customers", type=int, default=500, help="customers the load writes to (default 500)"
    )
    parser.add_argument("--batch", type=int, default=10, help="events per SendEvents call (default 10)")
    parser.add_argument(
        "--ingest-rate", type=float, default=None, help="events/s (default: half the calibrated maximum)"
    )
    parser.add_argument("--calibrate-s", type=float, default=5.0, help="calibration's length (default 5)")
    parser.add_argument("--calibrate-callers", type=int, default=8, help="calibration's callers (default 8)")
    parser.add_argument(
        "--render-callers", type=int, default=64, help="concurrent render callers (default 64)"
    )
    parser.add_argument("--render-pause-s", type=float, default=0.5, help="each caller's pause (default 0.5)")
    parser.add_argument(
        "--render-deadline-s", type=float, default=1.0, help="each render's deadline (default 1)"
    )
    parser.add_argument("--probe-interval-s", type=float, default=0.1, help="between probes (default 0.1)")
    parser.add_argument("--before-s", type=float, default=2.0, help="load before the fault (default 2)")
    parser.add_argument("--after-s", type=float, default=6.0, help="load after the fault (default 6)")
    parser.add_argument(
        "--recovery-limit-s",
        type=float,
        default=30.0,
        help="how long the load may go on after --after-s until freshness is back (default 30)",
    )
    parser.add_argument("--hold-s", type=float, default=4.0, help="a held fault's length (default 4)")
    parser.add_argument(
        "--latency-s", type=float, default=0.05, help="a slow route's added latency (default 0.05)"
    )
    parser.add_argument(
        "--receiver-delay-s", type=float, default=0.05, help="the receiver's answer delay (default 0.05)"
    )
    parser.add_argument(
        "--allowed-lateness-s",
        type=float,
        default=None,
        help="the trigger's allowed lateness, how long a fire waits for late events (default: its own: none)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the logs and data (the directory is printed)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.faults == "all":
        faults = tuple(FAULTS_BY_NAME)
    elif args.faults == "short":
        faults = tuple(f.name for f in short_matrix())
    else:
        faults = tuple(name.strip() for name in args.faults.split(",") if name.strip())
        unknown = [name for name in faults if name not in FAULTS_BY_NAME]
        if unknown or not faults:
            parser.error(f"unknown faults: {', '.join(unknown) or '(none given)'}")
    if min(args.runs, args.customers, args.batch, args.render_callers, args.calibrate_callers) < 1:
        parser.error("--runs, --customers, --batch and the callers must be at least 1")
    return Options(
        faults=faults,
        runs=args.runs,
        customers=args.customers,
        batch=args.batch,
        ingest_rate=args.ingest_rate,
        calibrate_s=args.calibrate_s,
        calibrate_callers=args.calibrate_callers,
        render_callers=args.render_callers,
        render_pause_s=args.render_pause_s,
        render_deadline_s=args.render_deadline_s,
        probe_interval_s=args.probe_interval_s,
        before_s=args.before_s,
        after_s=args.after_s,
        hold_s=args.hold_s,
        latency_s=args.latency_s,
        recovery_limit_s=args.recovery_limit_s,
        receiver_delay_s=args.receiver_delay_s,
        allowed_lateness_s=args.allowed_lateness_s,
        keep=args.keep,
        json_path=args.json,
    )


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["receive"]:
        receiver = argparse.ArgumentParser(prog="chaos.py receive")
        receiver.add_argument("--port", type=int, required=True)
        receiver.add_argument("--delay-s", type=float, required=True)
        args = receiver.parse_args(arguments[1:])
        serve_receiver(args.port, args.delay_s)
        return 0
    options = parse_args(arguments)
    started = time.monotonic()
    try:
        with sigterm_as_sigint(), ChaosStack(options.receiver_delay_s, keep_dir=options.keep) as stack:
            say(f"chaos {stack.run_id}: logs in {stack.workdir}")
            try:
                results = asyncio.run(run_matrix(stack, options))
            except Exception:
                stack.stop_services()
                stack.keep_dir = True  # what explains a failed matrix is in its logs
                say("chaos failed; last log lines:\n" + stack.log_tails())
                say(f"chaos failed: logs and data kept in {stack.workdir}")
                raise
            if not results["invariants_held"]:
                stack.keep_dir = True
                say(f"an invariant broke: logs and data kept in {stack.workdir}")
    except KeyboardInterrupt:
        print("chaos: interrupted; everything it started was stopped", file=sys.stderr)
        return 130
    except (BenchError, OSError, RuntimeError, grpc.RpcError, asyncpg.PostgresError) as exc:
        print(f"chaos: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    say(report(results))
    say(f"(chaos took {time.monotonic() - started:.0f}s)")
    if options.json_path is not None:
        options.json_path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    say(results["summary"])
    if not results["invariants_held"]:
        return EXIT_INVARIANT_BROKEN
    return 0 if results["passed"] else EXIT_GOAL_MISSED


if __name__ == "__main__":
    sys.exit(main())
