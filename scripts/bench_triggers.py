"""``make bench-triggers``: the triggers engine firing and delivering with 100,000 pending
timers, next to floors measured in the same run.

The bench starts a private stack (bench_common.BenchStack: NATS with ``sync_interval: always``,
a fresh database; no service processes), migrates the triggers tables into the database, and
runs the real ``TriggersEngine`` (firer, delivery pump, webhook dispatcher, change consumer) in
this process, with the settings the service runs with. Two webhook destinations:

- **up**: a receiver process of its own (``bench_triggers.py receive``) that answers 204,
  records when each delivery arrived, and verifies the signature of every 50th with
  ``standardwebhooks`` (all of them would cost the shared 2 cores more than the sender);
- **down**: a listener that accepts connections and never answers (the dispatcher's timeout,
  1 s, then its breaker).

One trigger fires to both (the ready-made order-completed trigger: keyed, no delay, no
template). ``--timers`` waiting episodes of as many customers are written at once with COPY:
``--backlog`` of them due already, the rest a day away. Then:

1. floor: ``--floor`` more episodes fired by a bare loop with the same claims
   (``EpisodeStore.claim_due``) and, per episode, the same fire transaction's writes without
   the engine (the episode FIRED, the customer's fire fence, the fire, two deliveries), at the
   engine's concurrency: what PostgreSQL can do per fire on this machine. And the delivery
   floor: plain aiohttp POSTs of a fire's body to the up receiver at the up destination's
   concurrency, unsigned, unlogged;
2. backlog: the engine starts and fires the due backlog; fires/s while it drains, and
   deliveries/s arriving at the up receiver while the down destination holds its half;
3. paced: ``--paced-seconds`` × ``--rate`` of the day-away episodes are moved to fall due at
   ``--rate`` per second from 2 s on; each fire's lateness is the time from its due time
   (fire_at plus the allowed lateness) to the firer's decision (``FirerStats.lateness``), and
   each delivery's is from its due time to its arrival at the receiver;
4. alone: the trigger is changed to deliver to the up receiver only, and ``--backlog`` / 2 more
   episodes fall due at once: the up receiver's rate without a down destination beside it,
   which the rate of step 2 is compared with.

Goals (issue 17): fire lateness p99 < 1 s; at least 1,000 fires/s sustained; deliveries to
the up receiver at least 1,000/s while the down destination's deliveries fail, and at least
0.8 of the rate without it (step 4; a fire then writes one delivery, not two). The live
profile is read from memory here (an in-process ``ProfileReader``): the engine's own cost is
measured, not the profile service's (``make bench-profile`` measures GetProfile), and a fire
with a template costs a render on top (``make bench-render``). A missed goal is reported, not
an error: the exit code is 0 unless the bench broke. Defaults take about 50 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiohttp import web
from bench_common import (
    BenchStack,
    Row,
    add_output_arguments,
    fmt_ms,
    fmt_rate,
    fmt_ratio,
    percentile,
    render_table,
    run_bench_main,
    say,
    serve_http_until_sigterm,
    verdict,
)
from google.protobuf import duration_pb2, struct_pb2

import devstack
from sendtime.profile.v1 import profile_pb2
from sendtime.render.v1 import render_pb2
from sendtime.triggers.v1 import triggers_pb2
from sendtime_common.database import create_pool
from sendtime_common.event_log import JetStreamEventLog, JetStreamSettings
from triggers.builtin import order_completed
from triggers.engine import EngineSettings, TriggersEngine
from triggers.episode_store import EpisodeStore
from triggers.secret_box import SecretBox
from triggers.signing import SigningKeys, new_signing_secret, new_webhook_id
from triggers.ssrf import AllowList, UrlPolicy
from triggers.store import migrate_store
from triggers.trigger_store import TriggerStore

TRIGGER_ID = "bench-orders"
UP, DOWN = "bench-up", "bench-down"
ALLOWED_LATENESS = timedelta(seconds=0)
UP_CONCURRENCY = 100  # the most a destination may have in flight
VERIFY_EVERY = 50
GOAL_LATENESS_P99_S = 1.0
GOAL_FIRES_PER_S = 1000.0
GOAL_DELIVERIES_PER_S = 1000.0
# A destination that is down must not slow the others: the up receiver's rate with it is at
# least this share of the rate without it (each fire then writes one delivery, not two).
GOAL_DOWN_KEEPS = 0.8


# --- the receivers (a process of their own) -----------------------------------------------------


def serve_receiver(port: int, secret: str, arrivals_path: Path) -> None:
    """Answer every POST 204 and record its arrival (wall-clock seconds) and its body's
    fire_time; verify every ``VERIFY_EVERY``th signature. Writes the records to
    ``arrivals_path`` on SIGTERM."""
    from standardwebhooks import Webhook  # noqa: PLC0415 - only the receiver process needs it

    webhook = Webhook(secret)
    arrivals: list[tuple[float, str]] = []
    unverified = 0

    async def receive(request: web.Request) -> web.Response:
        nonlocal unverified
        body = await request.read()
        arrived = time.time()
        if len(arrivals) % VERIFY_EVERY == 0:
            try:
                webhook.verify(body, dict(request.headers))
            except Exception:  # noqa: BLE001 - counted; the bench reports it
                unverified += 1
        arrivals.append((arrived, orjson.loads(body)["data"]["fire_time"]))
        return web.Response(status=204)

    async def floor(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=204)

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/hooks", receive)
        app.router.add_post("/floor", floor)
        await serve_http_until_sigterm(app, port)
        arrivals_path.write_bytes(orjson.dumps({"arrivals": arrivals, "unverified": unverified}))

    asyncio.run(main())


@contextlib.asynccontextmanager
async def silent_listener() -> AsyncIterator[int]:
    """A port that accepts connections and never answers: a receiver that hangs."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0, backlog=1024)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in held:
            writer.close()


@contextlib.contextmanager
def receiver_process(stack: BenchStack, secret: str) -> Iterator[tuple[int, Path]]:
    port = devstack.free_port()
    arrivals_path = stack.workdir / "arrivals.json"
    process = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "receive",
            "--port",
            str(port),
            "--secret",
            secret,
            "--out",
            str(arrivals_path),
        ],
        env={**os.environ},
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    stack.extra.append(process)
    try:
        deadline = time.monotonic() + 15
        while not devstack.tcp_reachable("127.0.0.1", port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the bench's receiver did not start")
            time.sleep(0.05)
        yield port, arrivals_path
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=15)


# --- what the engine reads from elsewhere -------------------------------------------------------


class MemoryProfiles:
    """Every customer exists, subscribed, with nothing that ends a fire."""

    async def get_profile(self, customer_id: str) -> profile_pb2.Profile | None:
        return profile_pb2.Profile(name=f"profiles/{customer_id}", customer_id=customer_id, version=1)


class NoRenders:
    async def render(
        self, template: str, customer_id: str, variables: struct_pb2.Struct
    ) -> render_pb2.RenderResponse:
        raise AssertionError("the bench's trigger has no template")


# --- the data -----------------------------------------------------------------------------------


def _duration(value: timedelta) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(value)
    return duration


async def create_destinations_and_trigger(
    pool: asyncpg.Pool, engine: TriggersEngine, up_port: int, down_port: int, secret: str
) -> None:
    for destination_id, port, timeout, concurrency in (
        (UP, up_port, 10, UP_CONCURRENCY),
        (DOWN, down_port, 1, 10),
    ):
        destination = triggers_pb2.Destination(
            webhook=triggers_pb2.WebhookTarget(
                url=f"http://127.0.0.1:{port}/hooks", timeout=_duration(timedelta(seconds=timeout))
            ),
            max_concurrency=concurrency,
        )
        await engine.destinations.create(destination_id, destination, signing_keys=SigningKeys(secret))
    trigger = order_completed([f"destinations/{UP}", f"destinations/{DOWN}"])
    trigger.allowed_lateness.CopyFrom(_duration(ALLOWED_LATENESS))
    await TriggerStore(pool).create(TRIGGER_ID, trigger)


async def write_waiting(pool: asyncpg.Pool, prefix: str, fire_times: Sequence[datetime]) -> None:
    """Waiting episodes, one per customer ``{prefix}-{i}``, due at their fire time (COPY)."""
    opened = min(fire_times)
    records = [
        (f"{prefix}-{i}", TRIGGER_ID, f"order-{i}", "waiting", opened, opened, at, at + ALLOWED_LATENESS)
        for i, at in enumerate(fire_times)
    ]
    async with pool.acquire() as conn:
        await conn.copy_records_to_table(
            "triggers_episodes",
            records=records,
            columns=[
                "customer_id",
                "trigger_id",
                "episode_key",
                "state",
                "opened_at",
                "last_entry_at",
                "fire_at",
                "due_at",
            ],
        )
        await conn.execute("ANALYZE triggers_episodes")


# --- the floors ---------------------------------------------------------------------------------


async def fire_floor(pool: asyncpg.Pool, count: int, concurrency: int) -> float:
    """Fires/s of a bare loop: the engine's claims, and per episode the fire transaction's
    writes (no decision, no profile, no dispatcher). The episodes are gone afterwards."""
    now = datetime.now(UTC)
    await write_waiting(pool, "floor", [now - timedelta(seconds=1)] * count)
    episodes = EpisodeStore(pool)
    body = orjson.dumps({"type": "trigger.fired", "data": {"fire_time": "", "bench": "floor"}}).decode()
    fired = 0

    async def fire(customer_id: str, key: str, version: int) -> None:
        at = datetime.now(UTC)
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE triggers_episodes SET state = 'fired', due_at = NULL, closed_at = $4,"
                " claimed_by = NULL, claimed_at = NULL, version = version + 1"
                " WHERE customer_id = $1 AND trigger_id = $2 AND episode_key = $3 AND version = $5",
                customer_id,
                TRIGGER_ID,
                key,
                at,
                version,
            )
            await conn.execute(
                "INSERT INTO triggers_customer_fires AS c (customer_id, fire_sequence) VALUES ($1, 1)"
                " ON CONFLICT (customer_id) DO UPDATE SET fire_sequence = c.fire_sequence + 1",
                customer_id,
            )
            await conn.execute(
                "INSERT INTO triggers_fires (customer_id, trigger_id, fired_at, episode_key)"
                " VALUES ($1, $2, $3, $4)",
                customer_id,
                TRIGGER_ID,
                at,
                key,
            )
            await conn.execute(
                "INSERT INTO triggers_deliveries (destination_id, kind, webhook_id, trigger_id, customer_id,"
                " episode_key, fired_at, state, payload, next_attempt_time, available_at, created_at)"
                " SELECT d, 'webhook', w, $3, $4, $5, $6, 1, $7::jsonb, $6, $6, $6"
                " FROM unnest($1::text[], $2::text[]) AS n(d, w)",
                [UP, DOWN],
                [new_webhook_id(at), new_webhook_id(at)],
                TRIGGER_ID,
                customer_id,
                key,
                at,
                body,
            )

    started = time.perf_counter()
    while True:
        claimed = await episodes.claim_due(datetime.now(UTC), concurrency, owner="floor")
        if not claimed:
            break
        await asyncio.gather(*(fire(c.customer_id, c.episode.key, c.version) for c in claimed))
        fired += len(claimed)
    seconds = time.perf_counter() - started
    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM triggers_deliveries WHERE customer_id LIKE 'floor-%'")
        await conn.execute("DELETE FROM triggers_fires WHERE customer_id LIKE 'floor-%'")
        await conn.execute("DELETE FROM triggers_customer_fires WHERE customer_id LIKE 'floor-%'")
        await conn.execute("DELETE FROM triggers_episodes WHERE customer_id LIKE 'floor-%'")
    return fired / seconds


async def delivery_floor(port: int, count: int, concurrency: int) -> float:
    """POSTs/s of a fire's body to the up receiver: plain aiohttp, unsigned, nothing logged."""
    url = f"http://127.0.0.1:{port}/floor"  # answered like /hooks, not recorded
    body = orjson.dumps({"type": "trigger.fired", "data": {"fire_time": "floor"}})
    queue = iter(range(count))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for _ in queue:
                async with session.post(
                    url, data=body, headers={"Content-Type": "application/json"}
                ) as answer:
                    await answer.read()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return count / (time.perf_counter() - started)


# --- the measures -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arrivals:
    times: list[float]  # wall-clock seconds
    fire_times: list[str]
    unverified: int


def read_arrivals(path: Path) -> Arrivals:
    data = orjson.loads(path.read_bytes())
    return Arrivals(
        [a for a, _ in data["arrivals"]], [f for _, f in data["arrivals"]], int(data["unverified"])
    )


def sustained_rate(times: Sequence[float], trim: float = 0.05) -> float:
    """Events/s between the arrivals at ``trim`` and ``1 - trim`` of the run (its ramp up and
    its tail left out)."""
    ordered = sorted(times)
    if len(ordered) < 20:
        return 0.0
    first, last = int(len(ordered) * trim), int(len(ordered) * (1 - trim)) - 1
    span = ordered[last] - ordered[first]
    return (last - first) / span if span > 0 else 0.0


async def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _measure(stack: BenchStack, args: argparse.Namespace) -> dict[str, Any]:
    secret = new_signing_secret()
    pool = await create_pool(stack.database_url, min_size=4, max_size=args.pool_size)
    # The stack's settings (its NATS_URL and NATS_REPLICAS): with defaults this connection, which
    # manages the streams, would set a cluster's replicated streams back to one replica.
    event_log = await JetStreamEventLog.connect(JetStreamSettings.from_env(stack.env))
    settings = EngineSettings(owner="bench", fire_concurrency=args.concurrency, claim_limit=args.concurrency)
    engine = TriggersEngine(
        pool=pool,
        event_log=event_log,
        profiles=MemoryProfiles(),
        renderer=NoRenders(),
        secret_box=SecretBox.generate(),
        url_policy=UrlPolicy(AllowList.parse(["127.0.0.0/8"])),
        settings=settings,
    )
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    engine_closed = False
    try:
        await migrate_store(pool)
        with receiver_process(stack, secret) as (up_port, arrivals_path):
            async with silent_listener() as down_port:
                await create_destinations_and_trigger(pool, engine, up_port, down_port, secret)
                say("1. floors")
                results["fire_floor_per_s"] = await fire_floor(pool, args.floor, args.concurrency)
                results["delivery_floor_per_s"] = await delivery_floor(up_port, args.floor, UP_CONCURRENCY)

                now = datetime.now(UTC)
                later = now + timedelta(days=1)
                say(f"2. {args.timers:,} waiting episodes ({args.backlog:,} due now)")
                fire_times = [now - timedelta(milliseconds=1)] * args.backlog
                fire_times += [later] * (args.timers - args.backlog)
                await write_waiting(pool, "c", fire_times)

                await engine.start()
                started = time.perf_counter()
                await wait_for(
                    lambda: _fired_at_least(engine, args.backlog), args.timeout, "the backlog to fire"
                )
                backlog_s = time.perf_counter() - started
                results["backlog_fires"] = engine.firer.stats.fired
                results["backlog_fires_per_s"] = engine.firer.stats.fired / backlog_s
                results["backlog_lateness"] = _lateness(engine)

                paced = int(args.rate * args.paced_seconds)
                say(f"3. {paced:,} episodes falling due at {args.rate:,.0f}/s")
                engine.firer.stats.lateness.clear()
                fired_before = engine.firer.stats.fired
                start_at = datetime.now(UTC) + timedelta(seconds=2)
                results["paced_from"] = start_at.timestamp()
                await _pace(pool, paced, start_at, args.rate)
                engine.firer.wake()
                await wait_for(
                    lambda: _fired_at_least(engine, fired_before + paced),
                    args.paced_seconds + args.timeout,
                    "the paced episodes to fire",
                )
                results["paced_fires"] = engine.firer.stats.fired - fired_before
                results["paced_lateness"] = _lateness(engine)
                await wait_for(
                    lambda: _delivered_at_least(pool, args.backlog + paced), args.timeout, "the deliveries"
                )
                results["down_attempts"] = await pool.fetchval(
                    "SELECT count(*) FROM triggers_delivery_attempts a JOIN triggers_deliveries d"
                    " ON d.id = a.delivery_id WHERE d.destination_id = $1",
                    DOWN,
                )

                alone = args.backlog // 2
                say(f"4. {alone:,} due at once again, the trigger now delivering to the up receiver only")
                trigger = order_completed([f"destinations/{UP}"])
                trigger.allowed_lateness.CopyFrom(_duration(ALLOWED_LATENESS))
                await TriggerStore(pool).update(TRIGGER_ID, trigger)  # the claims read it
                engine.triggers_changed()
                fired_before = engine.firer.stats.fired
                alone_from = datetime.now(UTC)
                results["alone_from"] = alone_from.timestamp()
                await _pace(pool, alone, alone_from, rate=float("inf"))
                engine.firer.wake()
                started = time.perf_counter()
                await wait_for(
                    lambda: _fired_at_least(engine, fired_before + alone), args.timeout, "the second backlog"
                )
                results["alone_fires_per_s"] = alone / (time.perf_counter() - started)
                await wait_for(
                    lambda: _delivered_at_least(pool, args.backlog + paced + alone),
                    args.timeout,
                    "the deliveries",
                )
                results["still_waiting"] = await pool.fetchval(
                    "SELECT count(*) FROM triggers_episodes WHERE state = 'waiting'"
                )
                await engine.close()
                engine_closed = True
            # The receiver writes its arrivals when it stops (the context's exit).
        arrivals = read_arrivals(arrivals_path)
    finally:
        if not engine_closed:
            await engine.close()
        await event_log.close()
        await pool.close()
    paced_from = results.pop("paced_from")
    alone_from = results.pop("alone_from")
    backlog_times: list[float] = []
    paced_lateness: list[float] = []
    alone_times: list[float] = []
    for at, fire_time in zip(arrivals.times, arrivals.fire_times, strict=True):
        fired = datetime.fromisoformat(fire_time).timestamp()
        if fired < paced_from:
            backlog_times.append(at)
        elif fired >= alone_from:
            alone_times.append(at)
        else:
            paced_lateness.append(at - fired - ALLOWED_LATENESS.total_seconds())
    results["backlog_deliveries_per_s"] = sustained_rate(backlog_times)
    results["alone_deliveries_per_s"] = sustained_rate(alone_times)
    results["paced_delivery_lateness"] = paced_lateness
    results["delivered_up"] = len(arrivals.times)
    results["unverified"] = arrivals.unverified
    return results


async def _fired_at_least(engine: TriggersEngine, count: int) -> bool:
    return engine.firer.stats.fired >= count


async def _delivered_at_least(pool: asyncpg.Pool, count: int) -> bool:
    delivered = await pool.fetchval(
        "SELECT count(*) FROM triggers_deliveries WHERE destination_id = $1 AND state = 2", UP
    )
    return bool(delivered >= count)


def _lateness(engine: TriggersEngine) -> list[float]:
    return [late.total_seconds() for late in engine.firer.stats.lateness]


async def _pace(pool: asyncpg.Pool, count: int, start_at: datetime, rate: float) -> None:
    """Move ``count`` day-away episodes to fall due one after the other at ``rate`` per second
    from ``start_at`` (an infinite rate: all at ``start_at``)."""
    await pool.execute(
        """
        WITH picked AS (
            SELECT customer_id, row_number() OVER (ORDER BY customer_id) - 1 AS n
            FROM triggers_episodes
            WHERE trigger_id = $1 AND state = 'waiting' AND due_at > $2::timestamptz + interval '1 hour'
            LIMIT $3
        )
        UPDATE triggers_episodes e
        SET fire_at = $2::timestamptz + make_interval(secs => p.n / $4::float8),
            due_at = $2::timestamptz + make_interval(secs => p.n / $4::float8) + $5::interval
        FROM picked p
        WHERE e.customer_id = p.customer_id AND e.trigger_id = $1
        """,
        TRIGGER_ID,
        start_at,
        count,
        rate,
        ALLOWED_LATENESS,
    )


# --- the report ---------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> str:
    fire_floor_rate = results["fire_floor_per_s"]
    delivery_floor_rate = results["delivery_floor_per_s"]
    fires = results["backlog_fires_per_s"]
    deliveries = results["backlog_deliveries_per_s"]
    alone = results["alone_deliveries_per_s"]
    paced = results["paced_lateness"]
    paced_delivery = results["paced_delivery_lateness"]
    p99 = percentile(paced, 99) if paced else float("inf")
    rows = [
        Row(
            "fires/s, draining the backlog",
            fmt_rate(fires),
            f"{fmt_rate(fire_floor_rate)} (bare fire loop)",
            fmt_ratio(fires, fire_floor_rate),
            f">= {GOAL_FIRES_PER_S:,.0f}/s",
            verdict(fires >= GOAL_FIRES_PER_S),
        ),
        Row(
            f"fire lateness p50 / p99 / max, {float(results['args']['rate']):,.0f}/s falling due",
            f"{fmt_ms(percentile(paced, 50))} / {fmt_ms(p99)} / {fmt_ms(max(paced))}" if paced else "none",
            "",
            "",
            f"p99 < {GOAL_LATENESS_P99_S:.0f} s",
            verdict(p99 < GOAL_LATENESS_P99_S),
        ),
        Row(
            "deliveries/s to the up receiver, the other down",
            fmt_rate(deliveries),
            f"{fmt_rate(delivery_floor_rate)} (plain POSTs)",
            fmt_ratio(deliveries, delivery_floor_rate),
            f">= {GOAL_DELIVERIES_PER_S:,.0f}/s",
            verdict(deliveries >= GOAL_DELIVERIES_PER_S),
        ),
        Row(
            "deliveries/s, the trigger delivering to the up receiver only",
            fmt_rate(alone),
            "",
            f"{fmt_ratio(deliveries, alone)} with the down one",
            f">= {GOAL_DOWN_KEEPS:.1f} x",
            verdict(deliveries >= GOAL_DOWN_KEEPS * alone),
        ),
        Row(
            "delivery lateness p50 / p99 (due to arrival)",
            f"{fmt_ms(percentile(paced_delivery, 50))} / {fmt_ms(percentile(paced_delivery, 99))}"
            if paced_delivery
            else "none",
        ),
    ]
    lines = [
        render_table(rows),
        f"backlog lateness p99 {fmt_ms(percentile(results['backlog_lateness'], 99))} (all due at once)",
        f"down destination: {results['down_attempts']:,} attempts made (timeouts, then its breaker)",
        f"delivered to the up receiver: {results['delivered_up']:,}; signatures checked and failed: "
        f"{results['unverified']}; episodes still waiting: {results['still_waiting']:,}",
    ]
    return "\n".join(lines)


def _lean_results(results: dict[str, Any]) -> dict[str, Any]:
    """The JSON without the per-fire lists."""
    lean = {k: v for k, v in results.items() if not isinstance(v, list)}
    for name in ("backlog_lateness", "paced_lateness", "paced_delivery_lateness"):
        values = results[name]
        lean[name] = {f"p{q}": percentile(values, q) for q in (50, 90, 99)} if values else {}
    return lean


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command")
    receive = commands.add_parser("receive", help="(internal) run the up receiver")
    receive.add_argument("--port", type=int, required=True)
    receive.add_argument("--secret", required=True)
    receive.add_argument("--out", type=Path, required=True)
    parser.add_argument("--timers", type=int, default=100_000, help="waiting episodes in all")
    parser.add_argument("--backlog", type=int, default=20_000, help="of them due at the start")
    parser.add_argument("--rate", type=float, default=1000.0, help="paced episodes falling due per second")
    parser.add_argument("--paced-seconds", type=float, default=20.0)
    parser.add_argument("--floor", type=int, default=5_000, help="fires and POSTs of each floor")
    parser.add_argument("--concurrency", type=int, default=64, help="the firer's claims and settles at once")
    parser.add_argument("--pool-size", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=300.0, help="the most a phase may take")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.command == "receive":
        serve_receiver(args.port, args.secret, args.out)
        return 0
    paced_and_alone = args.rate * args.paced_seconds + args.backlog // 2
    if not 1 < args.backlog <= args.timers or paced_and_alone > args.timers - args.backlog:
        parser.error(
            "need 1 < --backlog <= --timers, and --rate x --paced-seconds + --backlog / 2 within the rest"
        )
    results: dict[str, Any] = {}

    def measure(stack: BenchStack) -> dict[str, Any]:
        results.update(asyncio.run(_measure(stack, args)))
        return _lean_results(results)

    return run_bench_main(
        "bench-triggers",
        [],
        cprofile_dir=args.cprofile,
        json_path=args.json,
        measure=measure,
        report=lambda _: report(results),
    )


if __name__ == "__main__":
    sys.exit(main())
