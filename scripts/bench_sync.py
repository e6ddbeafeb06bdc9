"""``make bench-sync``: 100,000 contacts synced both ways against rate-limited local providers:
pulled from a CRM into Sendtime, then pushed from Sendtime to an email platform.

The bench starts a private stack (bench_common.BenchStack: NATS, Redis, a fresh database, the
profile and ingest services as processes), then a providers process of its own (``bench_sync.py
providers``) serving the local HubSpot and Braze of the sync tests (tests/sync/hubspot_server.py
and braze_server.py: their documented contracts, OAuth token endpoint and rate limits), and the
sync service as a process with two connectors:

1. **pull**: ``hubspot_contacts`` over ``--contacts`` contacts, ``--pull-page`` a search, with
   HubSpot allowing ``--pull-rate`` searches a second (a sliding second; more answered 429 with
   no Retry-After, as HubSpot does) and the connector configured with that rate, as an operator
   would configure the published limit. Each contact becomes an event through ingest, merged by
   profile; its profile change marks the customer pending for the push.
2. **push**: once every contact is merged and marked, ``braze_push`` is run (``RunConnector``):
   each customer's live profile read from the profile service and its traits sent to Braze's
   ``/users/track``, 75 a request, with Braze allowing ``--push-rate`` requests a second (a
   fixed window; more answered 429 with ``X-RateLimit-Reset``) and the connector configured
   with that rate.

Per direction: the requests the provider served per second while the run went, against the rate
it allows (goal: at least 90%, issue 20), the 429s it answered, and how many of them were left
unhandled: a run that ended in error, or a contact or customer missing at the end (goal: 0). The
CPU each process used per phase is printed too. A missed goal is reported, not an error: the exit
code is 0 unless the bench broke. Defaults take about three minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
from bench_common import (
    BenchError,
    BenchStack,
    CpuMeter,
    Row,
    add_output_arguments,
    render_cpu,
    render_table,
    run_bench_main,
    say,
    verdict,
)

import devstack
import suite
from sendtime.sync.v1 import sync_pb2, sync_pb2_grpc
from sendtime_common.auth.api_keys import Scope
from sendtime_common.auth.key_store import KeyStore

REPO = Path(__file__).resolve().parent.parent
GOAL_RATE_SHARE = 0.9
T0_MS = 1_780_000_000_000  # the contacts' last-modified times: 2026-05-28 on, 1 ms apart
CLIENT_ID, CLIENT_SECRET, REFRESH_TOKEN = "sendtime-bench", "bench-secret", "bench-refresh"
BRAZE_KEY = "bench-braze-key"
TRAITS = ["first_name", "last_name", "orders_count"]


# --- the providers (a process of their own) -----------------------------------------------------


def serve_providers(
    hubspot_port: int, braze_port: int, contacts: int, pull_rate: int, push_rate: int, out: Path
) -> None:
    """The local HubSpot and Braze until SIGTERM; every 0.5 s, what they served, to ``out``
    (with ``written_at``, the wall-clock time of that snapshot)."""
    sys.path.insert(0, str(REPO))  # the providers are the sync tests' own
    import signal  # noqa: PLC0415

    from aiohttp import web  # noqa: PLC0415

    from tests.sync.braze_server import BrazeServer  # noqa: PLC0415
    from tests.sync.hubspot_server import HubSpotServer  # noqa: PLC0415

    class CountingHubSpot(HubSpotServer):
        served: list[float] = []

        async def _search(self, request: web.Request) -> web.StreamResponse:
            answer = await super()._search(request)
            if answer.status == 200:
                self.served.append(time.time())
            return answer

    class CountingBraze(BrazeServer):
        served: list[float] = []

        async def _track(self, request: web.Request) -> web.StreamResponse:
            answer = await super()._track(request)
            if answer.status == 201:
                self.served.append(time.time())
            return answer

    async def main() -> None:
        hubspot = CountingHubSpot(
            searches_per_s=pull_rate,
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            refresh_token=REFRESH_TOKEN,
        )
        for i in range(contacts):
            hubspot.upsert(
                10_000_000 + i,
                T0_MS + i,
                email=f"contact-{i}@bench.example",
                firstname=f"First{i}",
                lastname=f"Last{i}",
            )
        braze = CountingBraze(api_key=BRAZE_KEY, requests_per_window=push_rate, window_s=1)
        await hubspot.start(hubspot_port)
        await braze.start(braze_port)
        stopped = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
        while not stopped.is_set():
            stats = {
                "written_at": time.time(),
                "hubspot": {"served": hubspot.served, "rate_limited": hubspot.rate_limited},
                "braze": {
                    "served": braze.served,
                    "rate_limited": braze.throttled,
                    "users": len(braze.users),
                    "objects": sum(braze.batch_sizes),
                },
            }
            out.with_suffix(".tmp").write_text(json.dumps(stats))
            out.with_suffix(".tmp").replace(out)
            with_timeout = asyncio.wait_for(stopped.wait(), timeout=0.5)
            try:
                await with_timeout
            except TimeoutError:
                pass
        await hubspot.stop()
        await braze.stop()

    asyncio.run(main())


@contextmanager
def providers_process(stack: BenchStack, args: argparse.Namespace) -> Iterator[tuple[int, int, Path]]:
    hubspot_port, braze_port = devstack.free_port(), devstack.free_port()
    stats_path = stack.workdir / "providers.json"
    command = [
        sys.executable,
        __file__,
        "providers",
        f"--hubspot-port={hubspot_port}",
        f"--braze-port={braze_port}",
        f"--contacts={args.contacts}",
        f"--pull-rate={args.pull_rate}",
        f"--push-rate={args.push_rate}",
        f"--out={stats_path}",
    ]
    with open(stack.workdir / "providers.log", "ab") as log:
        process = subprocess.Popen(
            command,
            env={**os.environ},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    stack.extra.append(process)
    deadline = time.monotonic() + 120  # loading the contacts
    while not (
        devstack.tcp_reachable("127.0.0.1", hubspot_port) and devstack.tcp_reachable("127.0.0.1", braze_port)
    ):
        if process.poll() is not None or time.monotonic() > deadline:
            raise BenchError("the providers process did not start")
        time.sleep(0.1)
    yield hubspot_port, braze_port, stats_path


# --- the sync service ---------------------------------------------------------------------------


def connectors_document(hubspot_port: int, braze_port: int, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "connectors": [
            {
                "id": "crm",
                "kind": "hubspot_contacts",
                "interval_s": 3600,
                "base_url": f"http://127.0.0.1:{hubspot_port}",
                "auth": {
                    "oauth_refresh_token": {
                        "token_url": f"http://127.0.0.1:{hubspot_port}/oauth/token",
                        "client_id": CLIENT_ID,
                        "client_secret_env": "HUBSPOT_CLIENT_SECRET",
                        "refresh_token_env": "HUBSPOT_REFRESH_TOKEN",
                    }
                },
                "rate": {"requests": args.pull_rate, "per_s": 1},
                "options": {"page_size": args.pull_page, "lookback_s": 0},
            },
            {
                "id": "esp",
                "kind": "braze_push",
                "interval_s": 3600,  # runs when the bench asks
                "base_url": f"http://127.0.0.1:{braze_port}",
                "auth": {"api_key_env": "BRAZE_API_KEY"},
                "rate": {"requests": args.push_rate, "per_s": 1},
                "options": {"traits": TRAITS},
            },
        ]
    }


async def _ingest_key(database_url: str) -> str:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        _, key = await KeyStore(pool).create("sync to ingest (bench)", [Scope.EVENTS_WRITE], "cli:bench")
        return key
    finally:
        await pool.close()


def start_sync(stack: BenchStack, hubspot_port: int, braze_port: int, args: argparse.Namespace) -> str:
    path = stack.workdir / "connectors.json"
    path.write_text(json.dumps(connectors_document(hubspot_port, braze_port, args)))
    return stack.start_variant(
        suite.SYNC,
        "sync",
        {
            "SYNC_CONNECTORS_FILE": str(path),
            "SYNC_POLL_SECONDS": "0.2",
            "INGEST_SERVICE_PLAINTEXT": "true",
            "INGEST_SERVICE_API_KEY": asyncio.run(_ingest_key(stack.database_url)),
            "HUBSPOT_CLIENT_SECRET": CLIENT_SECRET,
            "HUBSPOT_REFRESH_TOKEN": REFRESH_TOKEN,
            "BRAZE_API_KEY": BRAZE_KEY,
        },
    )


async def _status(stack: BenchStack, target: str, connector: str) -> sync_pb2.ConnectorStatus:
    async with stack.channel(target) as channel:
        stub = sync_pb2_grpc.SyncServiceStub(channel)
        answer = await stub.GetConnectorStatus(
            sync_pb2.GetConnectorStatusRequest(name=f"connectors/{connector}")
        )
    return answer.status


async def _run_connector(stack: BenchStack, target: str, connector: str) -> None:
    async with stack.channel(target) as channel:
        await sync_pb2_grpc.SyncServiceStub(channel).RunConnector(
            sync_pb2.RunConnectorRequest(name=f"connectors/{connector}")
        )


async def _pending(database_url: str, destination: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(
            await conn.fetchval("SELECT count(*) FROM sync_push_pending WHERE destination = $1", destination)
        )
    finally:
        await conn.close()


def wait_for(what: str, check: Any, timeout_s: float) -> float:
    """Poll ``check()`` every 0.2 s until true; the seconds it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            raise BenchError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.2)
    return time.monotonic() - started


def stats_since(path: Path, since: float, timeout_s: float) -> dict[str, Any]:
    """The providers' first stats written after ``since`` (wall-clock seconds): they count every
    request answered by then. Every 0.5 s, they write one; later on a loaded machine."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats: dict[str, Any] = json.loads(path.read_text())
        if stats["written_at"] > since:
            return stats
        if time.monotonic() > deadline:
            raise BenchError(f"the providers' stats: none written within {timeout_s:.0f} s")
        time.sleep(0.1)


# --- the measurement ----------------------------------------------------------------------------


def served_rate(times: Sequence[float]) -> float:
    """Requests a second from the first served to the last: (n - 1) intervals over the span."""
    if len(times) < 2:
        return float("nan")
    return (len(times) - 1) / (times[-1] - times[0])


def measure(stack: BenchStack, args: argparse.Namespace) -> dict[str, Any]:
    meter = CpuMeter(stack.cpu_groups())
    # The stack's "extra" processes are the providers here, its one variant the sync service.
    del meter.groups["empty gRPC server (floors)"], meter.groups["service variants"]
    with providers_process(stack, args) as (hubspot_port, braze_port, stats_path):
        meter.groups["providers (local HubSpot, Braze)"] = lambda: [p.pid for p in stack.extra]
        say(f"providers: {args.contacts:,} contacts in the local HubSpot")
        target = start_sync(stack, hubspot_port, braze_port, args)
        meter.groups["sync service"] = lambda: [stack.pid_of("sync")]
        start = meter.snapshot()
        # 1. pull: the HubSpot connector is due at once.
        pull_s = wait_for(
            "the pull",
            lambda: (
                (s := asyncio.run(_status(stack, target, "crm"))).records_total >= args.contacts
                and s.state == sync_pb2.CONNECTOR_STATE_WAITING
            ),
            args.timeout,
        )
        pulled = asyncio.run(_status(stack, target, "crm"))
        say(f"pull: {pulled.records_total:,} contacts in {pull_s:.0f} s; waiting for every merge and mark")
        marked_s = wait_for(
            "the marks",
            lambda: asyncio.run(_pending(stack.database_url, "esp")) >= args.contacts,
            args.timeout,
        )
        pulled_cpu = meter.snapshot()
        # 2. push
        asyncio.run(_run_connector(stack, target, "esp"))
        push_s = wait_for(
            "the push",
            lambda: (
                (s := asyncio.run(_status(stack, target, "esp"))).items_pushed_total >= args.contacts
                and s.state == sync_pb2.CONNECTOR_STATE_WAITING
            ),
            args.timeout,
        )
        pushed = asyncio.run(_status(stack, target, "esp"))
        pushed_cpu = meter.snapshot()
        stats = stats_since(stats_path, time.time(), timeout_s=30)
    say(f"push: {pushed.items_pushed_total:,} customers in {push_s:.0f} s")
    return {
        "args": vars(args) | {"json": str(args.json) if args.json else None},
        "pull": {
            "seconds": pull_s,
            "records": pulled.records_total,
            "events": pulled.events_total,
            "rejected": pulled.rejected_total,
            "failures": pulled.consecutive_failures,
            "last_error": pulled.last_error,
            "served_per_s": served_rate(stats["hubspot"]["served"]),
            "requests": len(stats["hubspot"]["served"]),
            "rate_limited": stats["hubspot"]["rate_limited"],
            "allowed_per_s": args.pull_rate,
            "marked_after_s": marked_s,
        },
        "push": {
            "seconds": push_s,
            "pushed": pushed.items_pushed_total,
            "refused": pushed.items_refused_total,
            "pending": pushed.items_pending,
            "failures": pushed.consecutive_failures,
            "last_error": pushed.last_error,
            "served_per_s": served_rate(stats["braze"]["served"]),
            "requests": len(stats["braze"]["served"]),
            "rate_limited": stats["braze"]["rate_limited"],
            "allowed_per_s": args.push_rate,
            "braze_users": stats["braze"]["users"],
        },
        "cpu_percent_of_one_core": {
            "pull": CpuMeter.usage(start, pulled_cpu),
            "push": CpuMeter.usage(pulled_cpu, pushed_cpu),
        },
    }


def report(results: dict[str, Any]) -> str:
    contacts = results["args"]["contacts"]
    rows = []
    for direction, label, missing in (
        ("pull", "HubSpot searches/s", contacts - results["pull"]["records"]),
        ("push", "Braze /users/track requests/s", contacts - results["push"]["braze_users"]),
    ):
        r = results[direction]
        share = r["served_per_s"] / r["allowed_per_s"]
        rows.append(
            Row(
                f"{direction}: {label}",
                f"{r['served_per_s']:.2f}",
                f"{r['allowed_per_s']} (the provider's limit)",
                f"{share:.2f} x",
                f">= {GOAL_RATE_SHARE:.1f} x",
                verdict(share >= GOAL_RATE_SHARE),
            )
        )
        unhandled = r["failures"] + max(0, missing)
        rows.append(
            Row(
                f"{direction}: 429s answered / left unhandled",
                f"{r['rate_limited']:,} / {unhandled:,}",
                "",
                "",
                "0 unhandled",
                verdict(unhandled == 0),
            )
        )
    pull, push = results["pull"], results["push"]
    lines = [
        render_table(rows),
        f"pull: {pull['records']:,} contacts in {pull['seconds']:.0f} s ({pull['requests']:,} searches of"
        f" {results['args']['pull_page']}), {pull['events']:,} events answered, {pull['rejected']} refused;"
        f" every customer merged and marked for the push {pull['marked_after_s']:.0f} s later",
        f"push: {push['pushed']:,} customers in {push['seconds']:.0f} s ({push['requests']:,} requests),"
        f" {push['refused']} refused, {push['pending']} still pending;"
        f" Braze holds {push['braze_users']:,} users",
        "",
        "CPU, % of one core:",
        render_cpu(results["cpu_percent_of_one_core"]),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command")
    providers = commands.add_parser("providers", help="(internal) run the local HubSpot and Braze")
    providers.add_argument("--hubspot-port", type=int, required=True)
    providers.add_argument("--braze-port", type=int, required=True)
    providers.add_argument("--out", type=Path, required=True)
    for p in (parser, providers):
        p.add_argument("--contacts", type=int, default=100_000, help="contacts in the CRM")
        p.add_argument("--pull-rate", type=int, default=10, help="HubSpot searches allowed a second")
        p.add_argument("--push-rate", type=int, default=20, help="Braze requests allowed a second")
    parser.add_argument("--pull-page", type=int, default=200, help="contacts a search (HubSpot: at most 200)")
    parser.add_argument("--timeout", type=float, default=600.0, help="the most a phase may take")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.command == "providers":
        serve_providers(
            args.hubspot_port, args.braze_port, args.contacts, args.pull_rate, args.push_rate, args.out
        )
        return 0
    return run_bench_main(
        "bench-sync",
        [suite.PROFILE, suite.INGEST],
        cprofile_dir=args.cprofile,
        json_path=args.json,
        measure=lambda stack: measure(stack, args),
        report=report,
    )


if __name__ == "__main__":
    sys.exit(main())
