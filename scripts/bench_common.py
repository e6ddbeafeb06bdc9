"""What every Sendtime benchmark needs: a private stack, floors, CPU accounting and a report.

A benchmark number means little on its own, so each bench measures, in the same run and on the
same machine, the floors it is compared with: here the cost of an empty grpc.aio call (and of
an empty message on a grpc.aio stream) between two processes. ``BenchStack`` starts everything
a bench uses on free ports (NATS with ``sync_interval: always`` as in production, Redis, a
fresh PostgreSQL database, the services as separate processes) and removes it all on exit, also
after Ctrl-C or a failure. The services run as deployed, with API keys checked on every call:
the stack makes an admin key with every scope (``BenchStack.admin_key``; calls present it with
``key_metadata``) and render's own profiles.read key. Its services serve plaintext
(``ALLOW_PLAINTEXT=true``) unless a variant is given a certificate from the stack's local CA
(``BenchStack.tls``), so that a bench can measure TLS beside plaintext in one run.
``CpuMeter`` reads /proc to say which process used how much CPU in each phase, which is what
tells where a bottleneck is on a small machine.

Run ``python scripts/bench_common.py serve-empty --port N`` to serve the empty gRPC methods the
floors call (benches start it themselves).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, Self

import asyncpg
import grpc
from aiohttp import web
from google.protobuf import timestamp_pb2
from redis.exceptions import RedisError

import devstack
import local_ca
import suite
from sendtime_common.auth.api_keys import ALL_SCOPES, Scope
from sendtime_common.auth.client import authenticated_channel, bearer_metadata
from sendtime_common.auth.key_store import KeyStore
from sendtime_common.tls import ClientTls

ROOT = Path(__file__).resolve().parent.parent
ADMIN_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
EMPTY_UNARY = "/sendtime.bench.Empty/Call"
EMPTY_STREAM = "/sendtime.bench.Empty/Stream"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Environment a bench must not inherit: it would change what is measured (trace export, TLS,
# mutual TLS, credentials meant for another database) or open listeners on fixed ports (webhooks).
_DROPPED_ENV = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "SHOPIFY_WEBHOOK_SECRET",
    "SENDGRID_WEBHOOK_PUBLIC_KEY",
    "TLS_CERT_FILE",
    "TLS_KEY_FILE",
    "TLS_CLIENT_CA_FILE",
    "AUTH_MTLS_IDENTITIES",
    "PROFILE_SERVICE_API_KEY",
    "PROFILE_SERVICE_API_KEY_FILE",
    "PROFILE_SERVICE_CA_FILE",
    "PROFILE_SERVICE_CERT_FILE",
    "PROFILE_SERVICE_KEY_FILE",
)
PLAINTEXT = ClientTls(plaintext=True)


def timestamp_from_ns(ns: int) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp of ``ns`` nanoseconds since the epoch (an event's occurred_at)."""
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def say(message: str = "") -> None:
    print(message, flush=True)


# --- statistics and formatting -----------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def fmt_rate(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.0f}"


def fmt_ratio(value: float, floor: float) -> str:
    """``value`` as a multiple of ``floor`` ("1.31 x"), or n/a without both."""
    return "n/a" if not floor or math.isnan(value) or math.isnan(floor) else f"{value / floor:.2f} x"


def fmt_ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:,.0f} ms"


@dataclass(frozen=True, slots=True)
class Row:
    """One line of a results table: a measure, what it is compared with, and the goal."""

    measure: str
    value: str
    floor: str = ""
    ratio: str = ""
    goal: str = ""
    verdict: str = ""


def render_table(rows: Sequence[Row]) -> str:
    header = Row("measure", "value", "floor (same run)", "ratio", "goal", "")
    table = [header, *rows]
    columns = list(
        zip(*((r.measure, r.value, r.floor, r.ratio, r.goal, r.verdict) for r in table), strict=True)
    )
    widths = [max(len(cell) for cell in column) for column in columns]
    lines = []
    for index, row in enumerate(table):
        cells = (row.measure, row.value, row.floor, row.ratio, row.goal, row.verdict)
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def verdict(met: bool | None) -> str:
    """PASS/MISS for a goal; a miss is reported, never turned into a failing exit code."""
    return "n/a" if met is None else ("PASS" if met else "MISS")


def write_json(path: Path, results: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")


# --- the machine and CPU accounting ------------------------------------------------------------


def source_info() -> dict[str, Any]:
    """Which code was measured: the commit, and whether services/ or libs/ had local changes."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = git("status", "--porcelain", "--", "services", "libs")
    return {"commit": git("rev-parse", "--short", "HEAD"), "local_changes": len(changed.splitlines())}


def machine_info() -> dict[str, Any]:
    """What the numbers depend on: cores, CPU model, load before the run."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "load_average_1m_before": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "kernel": platform.release(),
    }


def process_ticks(pid: int) -> int | None:
    """utime + stime of a process (all its threads), in clock ticks; None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


def _machine_busy_ticks() -> int:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values[:8]) - idle  # user..steal; guest time is already inside user


def pids_matching(pattern: str) -> list[int]:
    """Processes whose command line (as ps shows it) matches ``pattern``."""
    regex = re.compile(pattern)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if regex.search(cmdline):
            found.append(int(entry.name))
    return found


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    at: float
    machine: int
    groups: dict[str, dict[int, int]]


@dataclass
class CpuMeter:
    """CPU used per named group of processes between two snapshots, in % of one core (so on a
    2-core machine the machine total is at most 200%). ``groups`` maps a name to a function
    listing its pids now, so that processes started during a phase (PostgreSQL backends) count."""

    groups: dict[str, Callable[[], Sequence[int]]] = field(default_factory=dict)

    def snapshot(self) -> CpuSnapshot:
        groups: dict[str, dict[int, int]] = {}
        for name, pids in self.groups.items():
            ticks = {pid: t for pid in pids() if (t := process_ticks(pid)) is not None}
            groups[name] = ticks
        return CpuSnapshot(time.monotonic(), _machine_busy_ticks(), groups)

    @staticmethod
    def usage(start: CpuSnapshot, end: CpuSnapshot) -> dict[str, float]:
        """Per group, then ``machine`` (all processes) and ``rest of machine`` (not in a group)."""
        elapsed_ticks = max(1e-9, (end.at - start.at) * CLOCK_TICKS)
        usage: dict[str, float] = {}
        for name, ticks in end.groups.items():
            before = start.groups.get(name, {})
            used = sum(t - before.get(pid, 0) for pid, t in ticks.items())
            usage[name] = 100 * used / elapsed_ticks
        machine = 100 * (end.machine - start.machine) / elapsed_ticks
        usage["rest of machine"] = max(0.0, machine - sum(usage.values()))
        usage["machine"] = machine
        return usage


def render_cpu(phases: Mapping[str, Mapping[str, float]]) -> str:
    """A table: one row per process group, one column per phase, in % of one core."""
    names = list(next(iter(phases.values())).keys()) if phases else []
    width = max((len(n) for n in names), default=10)
    widths = [max(6, len(phase)) for phase in phases]
    header = f"{'process':<{width}}  " + "  ".join(f"{p:>{w}}" for p, w in zip(phases, widths, strict=True))
    lines = [header, "-" * len(header)]
    for name in names:
        cells = "  ".join(
            f"{phases[phase].get(name, math.nan):>{w - 1}.0f}%"
            for phase, w in zip(phases, widths, strict=True)
        )
        lines.append(f"{name:<{width}}  {cells}")
    return "\n".join(lines)


# --- the stack ---------------------------------------------------------------------------------


def _with_database(url: str, database: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{database}"


async def _admin(admin_url: str, sql: str) -> None:
    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _issue_keys(database_url: str) -> tuple[str, str]:
    """An admin key with every scope, and render's key (profiles.read only), made in the bench
    database the way ``sendtime keys create`` makes them (the key tables created first)."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        store = KeyStore(pool)
        await store.migrate()
        _, admin = await store.create("bench admin", ALL_SCOPES, "cli:bench")
        _, render = await store.create("render (bench)", [Scope.PROFILES_READ], "cli:bench")
        return admin, render
    finally:
        await pool.close()


class BenchError(RuntimeError):
    """The bench could not run (a process did not start, an event was refused): it exits 1."""


class CallFailed(Exception):
    """A timed call that was answered with a failure other than a gRPC error (an HTTP status):
    counted by ``reason`` like a gRPC error's code, not raised."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class BenchTls:
    """A server certificate for 127.0.0.1 from a CA made for one bench run: ``server_env`` serves
    a service's ports with it; ``client`` trusts it."""

    client: ClientTls
    server_env: dict[str, str]


class BenchStack:
    """NATS, Redis, a fresh database and the named services, private to one bench run.

    Use as a context manager: everything is stopped and removed on exit, including the database
    (dropped) and the working directory (unless ``keep_dir``). While it cleans up it ignores
    Ctrl-C, so a second Ctrl-C cannot leave processes or a database behind.

    Once started, ``admin_key`` is a key with every scope in the bench database; render calls
    profile with a key of its own. Each service (and each variant) has a plaintext health port
    of its own, which is what ``suite.wait_until_serving`` polls.
    """

    def __init__(
        self,
        services: Sequence[suite.Service],
        *,
        keep_dir: bool = False,
        cprofile_dir: Path | None = None,
        admin_database_url: str = ADMIN_DATABASE_URL,
    ) -> None:
        self.admin_database_url = admin_database_url
        self.run_id = uuid.uuid4().hex[:8]
        self.database = f"sendtime_bench_{self.run_id}"
        self.services = list(services)
        self.keep_dir = keep_dir
        self.cprofile_dir = cprofile_dir
        self.workdir = Path(tempfile.mkdtemp(prefix=f"sendtime-bench-{self.run_id}-"))
        self.nats_port, self.redis_port = devstack.free_port(), devstack.free_port()
        self.nats_url = f"nats://127.0.0.1:{self.nats_port}"
        # NATS_CLUSTER_NODES=3 (as for `make up`): the stack's NATS is a JetStream cluster of
        # that many servers, the streams replicated on each, as production runs it.
        nats_nodes = devstack.nats_cluster_nodes(os.environ)
        self.nats_cluster: devstack.NatsCluster | None = None
        if nats_nodes > 1:
            self.nats_cluster = devstack.NatsCluster(self.workdir / "nats", nats_nodes)
            self.nats_url = self.nats_cluster.url
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.database_url = _with_database(admin_database_url, self.database)
        self.env = self._service_env()
        self.nats: subprocess.Popen[bytes] | None = None
        self.redis: subprocess.Popen[bytes] | None = None
        self.running: list[suite.RunningService] = []
        self.variants: list[suite.RunningService] = []
        self.extra: list[subprocess.Popen[bytes]] = []
        self.admin_key = ""
        self._tls: BenchTls | None = None
        self._database_created = False

    def _service_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
        env.update(
            DATABASE_URL=self.database_url,
            REDIS_URL=self.redis_url,
            NATS_URL=self.nats_url,
            LOG_LEVEL="WARNING",
            # The stack's own ports serve plaintext (a variant may be given a certificate: ``tls``),
            # and render calls profile in plaintext, with its key.
            ALLOW_PLAINTEXT="true",
            PROFILE_SERVICE_PLAINTEXT="true",
            # Keyed identifier hashes, as in production (a service refuses to start without).
            IDENTIFIER_HASH_KEYS=base64.b64encode(secrets.token_bytes(32)).decode(),
            NATS_REPLICAS=str(len(self.nats_cluster.nodes) if self.nats_cluster is not None else 1),
        )
        for service in suite.SERVICES:
            env[service.address_variable] = f"127.0.0.1:{devstack.free_port()}"
            env[service.health_address_variable] = f"127.0.0.1:{devstack.free_port()}"
            env[service.http_address_variable] = f"127.0.0.1:{devstack.free_port()}"
            env[service.metrics_address_variable] = f"127.0.0.1:{devstack.free_port()}"
        env["PROFILE_SERVICE_TARGET"] = suite.PROFILE.target(env)
        return suite.service_env(env)

    def target(self, service: suite.Service) -> str:
        return service.target(self.env)

    @property
    def key_metadata(self) -> tuple[tuple[str, str]]:
        """Call metadata presenting ``admin_key``. Timed calls pass it themselves: it is the same
        header ``bearer_auth``'s client interceptors add, without their Python layer on every
        call, which the floors' calls do not have."""
        return bearer_metadata(self.admin_key)

    def channel(self, target: str, tls: ClientTls = PLAINTEXT) -> grpc.aio.Channel:
        """A channel to ``target`` whose calls all carry ``admin_key`` (for untimed calls)."""
        return authenticated_channel(target, self.admin_key, tls)

    @property
    def tls(self) -> BenchTls:
        """A local CA and a server certificate for 127.0.0.1 in the working directory, made on
        first use."""
        if self._tls is None:
            directory = self.workdir / "tls"
            directory.mkdir(exist_ok=True)
            ca = local_ca.make_ca("Sendtime bench CA")
            ca.write(directory / "ca.crt", directory / "ca.key")
            server = local_ca.issue(ca, local_ca.LOCAL_SERVER_NAMES, server=True, client=False)
            server.write(directory / "server.crt", directory / "server.key")
            self._tls = BenchTls(
                client=ClientTls(ca_file=str(directory / "ca.crt")),
                server_env={
                    "TLS_CERT_FILE": str(directory / "server.crt"),
                    "TLS_KEY_FILE": str(directory / "server.key"),
                },
            )
        return self._tls

    def __enter__(self) -> Self:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        if self.nats_cluster is not None:
            self.nats_cluster.start(detach=True)
        else:
            self.nats = devstack.start_nats(self.nats_port, self.workdir / "nats", detach=True)
        self.redis = devstack.start_redis(self.redis_port, self.workdir / "redis", detach=True)
        asyncio.run(_admin(self.admin_database_url, f'CREATE DATABASE "{self.database}"'))
        self._database_created = True
        self.admin_key, render_key = asyncio.run(_issue_keys(self.database_url))
        self.env["PROFILE_SERVICE_API_KEY"] = render_key
        for service in self.services:  # in suite order: profile creates the stream and consumer
            self.running.append(self._launch(service, self.env))

    def _launch(self, service: suite.Service, env: Mapping[str, str]) -> suite.RunningService:
        """Start ``service`` with ``env`` and wait until it reports SERVING."""
        log_path = self.workdir / f"{service.name}.log"
        command = [sys.executable, "-m", service.module]
        if self.cprofile_dir is not None:  # written when the service exits after SIGTERM
            self.cprofile_dir.mkdir(parents=True, exist_ok=True)
            output = self.cprofile_dir / f"{service.name}.prof"
            command = [sys.executable, "-m", "cProfile", "-o", str(output), "-m", service.module]
        with open(log_path, "ab") as log:  # the child keeps its own copy
            process = subprocess.Popen(
                command,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the bench only; it stops them in order
            )
        running = suite.RunningService(service, process, log_path)
        try:
            suite.wait_until_serving(running, env, timeout_s=30)
        except suite.SuiteError as exc:
            devstack.stop_process(process)
            raise BenchError(str(exc)) from None
        return running

    def start_variant(self, service: suite.Service, label: str, overrides: Mapping[str, str]) -> str:
        """Start one more ``service`` process on a port of its own, configured with ``overrides``
        (named ``label`` in logs and CPU tables); its target. Stopped with the services."""
        env = {
            **self.env,
            service.address_variable: f"127.0.0.1:{devstack.free_port()}",
            service.health_address_variable: f"127.0.0.1:{devstack.free_port()}",
            service.http_address_variable: f"127.0.0.1:{devstack.free_port()}",
            service.metrics_address_variable: f"127.0.0.1:{devstack.free_port()}",
            **overrides,  # an empty address turns its port off
        }
        variant = replace(service, name=label)
        self.variants.append(self._launch(variant, env))
        return variant.target(env)

    def pid_of(self, label: str) -> int:
        """The process id of the variant ``label``."""
        return next(v.process.pid for v in self.variants if v.service.name == label)

    def stop_variant(self, label: str) -> None:
        """SIGTERM the variant ``label`` and wait for it (its log stays until ``close``). Between
        phases: the CPU it used in the phase it stops in would count as the rest of the machine's."""
        stopping = [v for v in self.variants if v.service.name == label]
        self.variants = [v for v in self.variants if v.service.name != label]
        started = time.monotonic()
        for name, code in suite.stop_services(stopping).items():
            if code not in (0, None):  # the log is removed with the working directory: say it now
                log = (self.workdir / f"{name}.log").read_text(errors="replace").strip().splitlines()
                say(
                    f"bench: {name} exited with {code} {time.monotonic() - started:.1f}s after SIGTERM;"
                    " its last log lines:\n  " + "\n  ".join(log[-8:])
                )

    def start_empty_server(self) -> str:
        """Start the empty gRPC server (a process of its own, like a service); its target."""
        port = devstack.free_port()
        with open(self.workdir / "empty-server.log", "ab") as log:
            process = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "serve-empty", "--port", str(port)],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.extra.append(process)
        devstack.wait_for_tcp("127.0.0.1", port, 15, process)
        return f"127.0.0.1:{port}"

    def cpu_groups(self) -> dict[str, Callable[[], Sequence[int]]]:
        """The processes of this stack, for ``CpuMeter``: services, NATS, Redis, the
        PostgreSQL backends serving this database, and PostgreSQL's shared background workers
        (WAL writer, checkpointer: they also work for anyone else using the server)."""
        groups: dict[str, Callable[[], Sequence[int]]] = {}
        for item in self.running:
            groups[f"{item.service.name} service"] = _fixed(item.process.pid)
        groups["service variants"] = lambda: [v.process.pid for v in self.variants]
        groups["bench (load generator)"] = _fixed(os.getpid())
        groups["empty gRPC server (floors)"] = lambda: [p.pid for p in self.extra]
        if self.nats is not None:
            groups["nats-server"] = _fixed(self.nats.pid)
        if self.nats_cluster is not None:
            cluster = self.nats_cluster
            groups["nats-server"] = lambda: [process.pid for process in cluster.processes.values()]
        if self.redis is not None:
            groups["redis-server"] = _fixed(self.redis.pid)
        database = re.escape(self.database)
        groups["postgres backends (bench db)"] = lambda: pids_matching(rf"^postgres: .* {database} ")
        groups["postgres shared (wal writer...)"] = lambda: pids_matching(
            r"^postgres: .*(walwriter|checkpointer|background writer|walsender)"
        )
        return groups

    def log_tails(self, lines: int = 12) -> str:
        """The last lines of each service's log (NATS and Redis logs stay in their directories)."""
        tails = []
        for path in sorted(self.workdir.glob("*.log")):
            text = path.read_text(errors="replace").strip().splitlines()[-lines:]
            if text:
                tails.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(tails) or "(the service logs are empty)"

    def stop_services(self) -> None:
        """SIGTERM the services (callers first) and wait for them; say which did not exit 0.
        Their logs stay until ``close``."""
        running = self.running + self.variants
        codes = suite.stop_services(running) if running else {}
        self.running, self.variants = [], []
        for name, code in codes.items():
            if code not in (0, None):
                say(f"bench: {name} exited with {code} on SIGTERM")

    def close(self) -> None:
        """Stop and remove everything this stack started; safe to call twice."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self.stop_services()
            for process in self.extra:
                devstack.stop_process(process)
            self.extra = []
            if self._database_created:
                try:
                    asyncio.run(
                        _admin(
                            self.admin_database_url, f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)'
                        )
                    )
                    self._database_created = False
                except (OSError, asyncpg.PostgresError) as exc:
                    say(f"bench: could not drop database {self.database}: {exc}")
            for dependency in (self.redis, self.nats):
                if dependency is not None:
                    devstack.stop_process(dependency)
            self.redis = self.nats = None
            if self.nats_cluster is not None:
                self.nats_cluster.stop()
            if not self.keep_dir:
                shutil.rmtree(self.workdir, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, previous)


def _fixed(pid: int) -> Callable[[], Sequence[int]]:
    return lambda: [pid]


@contextlib.contextmanager
def sigterm_as_sigint() -> Iterator[None]:
    """Make SIGTERM stop a bench the way Ctrl-C does, so the same cleanup runs. A shell without
    job control starts background commands with SIGINT ignored; a bench takes it back, so that
    both signals stop it wherever it was started."""

    def handler(signum: int, frame: FrameType | None) -> None:
        signal.raise_signal(signal.SIGINT)

    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def run_bench_main(
    name: str,
    services: Sequence[suite.Service],
    *,
    cprofile_dir: Path | None,
    json_path: Path | None,
    measure: Callable[[BenchStack], dict[str, Any]],
    report: Callable[[dict[str, Any]], str],
) -> int:
    """What every bench's ``main`` does around its measurements: start the stack, ``measure``
    with it, print the ``report`` (and the JSON), and turn failures and interruptions into exit
    codes after everything started has been stopped."""
    started = time.monotonic()
    try:
        with sigterm_as_sigint(), BenchStack(services, cprofile_dir=cprofile_dir) as stack:
            say(f"bench {stack.run_id}: NATS {stack.nats_url}, Redis {stack.redis_url}")
            say(f"   database {stack.database}, logs in {stack.workdir}")
            try:
                results = measure(stack)
            except Exception:
                stack.stop_services()  # a service writes its last words (a traceback) when it stops
                say("bench failed; last log lines:\n" + stack.log_tails())
                raise
    except KeyboardInterrupt:
        print(f"{name}: interrupted; everything it started was stopped", file=sys.stderr)
        return 130
    except (BenchError, OSError, RuntimeError, grpc.RpcError, asyncpg.PostgresError, RedisError) as exc:
        print(f"{name}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    say(report(results))
    say(f"(the whole bench took {time.monotonic() - started:.0f}s)")
    if json_path is not None:
        write_json(json_path, results)
        say(f"results written to {json_path}")
    return 0


# --- the gRPC floors ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallFloor:
    """Empty unary calls: throughput at a concurrency, and latency."""

    concurrency: int
    calls: int
    seconds: float
    p50_s: float
    p99_s: float
    idle_p50_s: float  # one call at a time: the round trip itself

    @property
    def rate(self) -> float:
        return self.calls / self.seconds


@dataclass(frozen=True, slots=True)
class StreamFloor:
    """Empty messages on grpc.aio streams: one small reply per request, windowed like a bench's
    load, so it bounds what any streaming service in Python can answer per second."""

    streams: int
    window: int
    messages: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


async def measure_empty_unary(target: str, concurrency: int, duration_s: float) -> CallFloor:
    """``concurrency`` callers each making empty unary calls back to back for ``duration_s``;
    then 200 calls one at a time for the idle latency."""
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(EMPTY_UNARY, request_serializer=None, response_deserializer=None)
        for _ in range(50):  # connect and warm up
            await call(b"")
        latencies: list[float] = []
        stop_at = time.perf_counter() + duration_s

        async def caller() -> None:
            while (started := time.perf_counter()) < stop_at:
                await call(b"")
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
        idle: list[float] = []
        for _ in range(200):
            t0 = time.perf_counter()
            await call(b"")
            idle.append(time.perf_counter() - t0)
    return CallFloor(
        concurrency=concurrency,
        calls=len(latencies),
        seconds=seconds,
        p50_s=percentile(latencies, 50),
        p99_s=percentile(latencies, 99),
        idle_p50_s=percentile(idle, 50),
    )


async def measure_empty_stream(
    target: str, payloads: Sequence[Sequence[bytes]], window: int, duration_s: float
) -> StreamFloor:
    """One stream per list in ``payloads``, each on its own channel (as a bench's load streams
    are), writing its payloads over and over for ``duration_s`` with ``window`` unanswered."""
    channels = [grpc.aio.insecure_channel(target) for _ in payloads]
    try:

        async def one(channel: grpc.aio.Channel, messages: Sequence[bytes], seconds: float) -> int:
            method = channel.stream_stream(EMPTY_STREAM, request_serializer=None, response_deserializer=None)
            call = method(None)  # no request iterator: this side writes
            slots = asyncio.Semaphore(window)
            stop_at = time.perf_counter() + seconds

            async def write() -> None:
                index = 0
                while time.perf_counter() < stop_at:
                    await slots.acquire()
                    await call.write(messages[index % len(messages)])
                    index += 1
                await call.done_writing()

            writer = asyncio.create_task(write())
            answered = 0
            try:
                async for _ in call:
                    answered += 1
                    slots.release()
                await writer
            finally:
                writer.cancel()
            return answered

        await asyncio.gather(*(one(c, m, 0.2) for c, m in zip(channels, payloads, strict=True)))  # warm up
        started = time.perf_counter()
        counts = await asyncio.gather(
            *(one(c, m, duration_s) for c, m in zip(channels, payloads, strict=True))
        )
        seconds = time.perf_counter() - started
    finally:
        for channel in channels:
            await channel.close(None)
    return StreamFloor(streams=len(payloads), window=window, messages=sum(counts), seconds=seconds)


# CPU (% of one core) that processes outside the bench may use in a phase before it warns.
NOISY_NEIGHBOURS_PERCENT = 25.0


def report_warnings(results: Mapping[str, Any], cprofiled: bool) -> list[str]:
    """The report lines that say its figures are not to be trusted: services under cProfile, or
    other processes using the CPU during a phase."""
    lines = []
    if cprofiled:
        lines.append(
            "The services ran under cProfile, which slows them down: compare nothing with these figures."
        )
    noisy = {
        phase: usage["rest of machine"]
        for phase, usage in results["cpu_percent_of_one_core"].items()
        if usage["rest of machine"] > NOISY_NEIGHBOURS_PERCENT
    }
    if noisy:
        during = ", ".join(f"{used:.0f}% in {phase}" for phase, used in noisy.items())
        lines.append(f"WARNING: processes outside the bench used CPU ({during}): expect worse figures.")
    return lines


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--json`` and ``--cprofile``, as every bench takes them."""
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results here")
    parser.add_argument(
        "--cprofile",
        type=Path,
        default=None,
        metavar="DIR",
        help="run the services under cProfile and write DIR/<service>.prof (slows them down)",
    )


async def serve_http_until_sigterm(app: web.Application, port: int) -> None:
    """Serve ``app`` on 127.0.0.1:``port`` (a receiver the bench starts as a process of its own)
    until SIGTERM; returns once it is cleaned up."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    await stopped.wait()
    await runner.cleanup()


async def serve_until_signalled(handler: grpc.GenericRpcHandler[Any, Any], port: int) -> None:
    """Serve ``handler`` on 127.0.0.1:``port`` with a bare grpc.aio server (no interceptors: the
    floors measure the bare cost) until SIGTERM or SIGINT."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1)


async def serve_empty(port: int) -> None:
    """The empty server: a unary method answering b"" and a stream method answering each message
    with a 40-byte reply (about an ingest result's size). No interceptors: the bare cost."""
    reply = b"\x0a\x26" + b"x" * 38

    async def call(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return b""

    async def stream(requests: Any, context: grpc.aio.ServicerContext[bytes, bytes]) -> Any:
        async for _ in requests:
            yield reply

    handler = grpc.method_handlers_generic_handler(
        "sendtime.bench.Empty",
        {
            "Call": grpc.unary_unary_rpc_method_handler(call),
            "Stream": grpc.stream_stream_rpc_method_handler(stream),
        },
    )
    await serve_until_signalled(handler, port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_common.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve-empty", help="serve the empty gRPC methods the floors call")
    serve.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    asyncio.run(serve_empty(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
