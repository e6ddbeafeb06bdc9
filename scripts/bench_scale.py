"""make bench-scale: the partitioned merge with 1, 2 and 3 profile processes (issue 21).

For each count of processes, on the same stack (a JetStream cluster of ``--nats-nodes``, 3 by
default, the streams replicated on each):

1. the event stream is made again with ``--partitions`` partitions (6 by default: two for each
   of three processes) and the profile processes are started; the bench waits until they share
   every lane (profile_service.merge_lanes);
2. ``--events`` events of ``--customers`` customers (bench-ingest's mix: views, cart adds,
   identifies with an email) are published straight to the stream as ingest publishes them
   (its routing key, atomic batches of 500), so the merge is measured, not ingest;
3. the bench waits until every lane's consumer has nothing pending or unacked.

Reported per count:

- merged events/s: all events / (first publish -> the last lane drained);
- CPU µs per merged event: the profile processes' CPU (/proc) over the run / events, and the
  same less what the processes use idle over as long (measured for IDLE_S before the load: lane
  fetches waiting, rebalancing, backlog reads; a cost per process, not per event); the goal is
  that the latter stays within 10% of one process's as processes are added (on two cores the
  rate cannot triple);
- lock waits: every 10 ms the bench looks at the sessions of its database waiting on a lock
  (``pg_stat_activity`` with the lock ``pg_locks`` says they wait for): the samples in which a
  merge waited on another merge's identifier or row lock, whose goal between partitions is
  zero, and all waits by kind (the change relay's turn, relation extension...);
- freshness, stored -> merged: each event's ``merged_at`` (its merge transaction's start) less
  when its publish was acknowledged, p50 and p99.

It ends with a projection of what N merging nodes would carry, from the CPU per event.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncpg
import nats
import nats.js.errors
from bench_common import (
    CLOCK_TICKS,
    BenchError,
    BenchStack,
    Row,
    add_output_arguments,
    fmt_rate,
    percentile,
    process_ticks,
    render_table,
    run_bench_main,
    say,
    verdict,
)
from bench_ingest import make_load

import suite
from profile_service.change_outbox import RELAY_LOCK
from profile_service.merge_lanes import lane_holders, lanes_of
from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.event_log import (
    JetStreamEventLog,
    JetStreamSettings,
    OutgoingMessage,
    PublishReceipt,
    partition_consumer,
)
from sendtime_common.identifiers import routing_key

PUBLISH_BATCH = 500
LOCK_SAMPLE_S = 0.010
IDLE_S = 3.0  # the processes' own CPU with nothing to merge, measured before each load
CPU_FLAT_GOAL = 1.10  # CPU per merged event at most 10% above one process's
DRAIN_STALL_S = 60.0
CONSUMER = "profile-merger"


@dataclass(frozen=True, slots=True)
class Options:
    events: int
    customers: int
    partitions: int
    nats_nodes: int
    rounds: int
    process_counts: tuple[int, ...]
    json_path: Path | None


@dataclass
class RunResult:
    processes: int
    events: int
    seconds: float
    cpu_s: float
    idle_cpu_s_per_s: float  # all the processes together, with nothing to merge
    lock_waits: LockWaits
    freshness_s: list[float]
    lanes_per_process: list[int]

    @property
    def net_cpu_s(self) -> float:
        """The CPU the merge took: less what the processes use idle over the same time (lane
        fetches waiting, rebalancing, backlog reads, health), a cost per process, not per event."""
        return self.cpu_s - self.idle_cpu_s_per_s * self.seconds

    def as_json(self) -> dict[str, Any]:
        return {
            "processes": self.processes,
            "events": self.events,
            "seconds": round(self.seconds, 3),
            "events_per_s": round(self.events / self.seconds, 1),
            "cpu_us_per_event": round(self.cpu_s * 1e6 / self.events, 1),
            "idle_cpu_percent": round(self.idle_cpu_s_per_s * 100, 2),
            "net_cpu_us_per_event": round(self.net_cpu_s * 1e6 / self.events, 1),
            "lock_samples": self.lock_waits.samples,
            "merge_lock_waiting_samples": self.lock_waits.waiting_samples,
            "lock_wait_s_by_kind": {
                kind: round(count * LOCK_SAMPLE_S, 3)
                for kind, count in sorted(self.lock_waits.by_kind.items())
            },
            "freshness_p50_s": round(percentile(self.freshness_s, 50), 4),
            "freshness_p99_s": round(percentile(self.freshness_s, 99), 4),
            "lanes_per_process": self.lanes_per_process,
        }


def _cpu_s(pids: Sequence[int]) -> float:
    """The CPU seconds the processes ``pids`` have used so far, together.

    Raises:
        BenchError: one of them is gone (it crashed: its log says why).
    """
    ticks = [process_ticks(pid) for pid in pids]
    if None in ticks:
        raise BenchError("a profile process exited during the run")
    return sum(t for t in ticks if t is not None) / CLOCK_TICKS


async def _wait_for_lanes(admin: asyncpg.Connection, processes: int, lanes: int) -> list[int]:
    async with asyncio.timeout(60):
        while True:
            held = sorted((await lane_holders(admin)).values())
            if len(held) == processes and sum(held) == lanes:
                return held
            await asyncio.sleep(0.1)


# What a waiting session waits for, by its ungranted lock: the merges' own (identifier advisory
# locks, row locks) are what partitions should remove; the change relay's lock and relation
# extension are not merge contention.
_WAITS = """
SELECT a.wait_event, l.locktype, l.classid::bigint AS classid, l.objsubid
FROM pg_stat_activity AS a LEFT JOIN pg_locks AS l ON l.pid = a.pid AND NOT l.granted
WHERE a.datname = current_database() AND a.wait_event_type = 'Lock'
"""


def wait_kind(wait_event: str, locktype: str | None, classid: int | None, objsubid: int | None) -> str:
    """What a lock wait is, in the bench's terms."""
    if locktype == "advisory":
        if objsubid == 1:
            return "merge: identifier locks"
        if classid == RELAY_LOCK[0]:
            return "change relay's turn"
        return f"advisory lock (class {classid})"
    if locktype in ("transactionid", "tuple"):
        return "merge: row locks"
    if wait_event == "extend":
        return "relation extension"
    return wait_event or str(locktype)


MERGE_WAITS = ("merge: identifier locks", "merge: row locks")


@dataclass
class LockWaits:
    samples: int = 0
    waiting_samples: int = 0  # samples in which a merge waited on another's lock
    by_kind: Counter[str] = field(default_factory=Counter)  # session-samples waiting, by kind


async def _sample_lock_waits(admin: asyncpg.Connection, stop: asyncio.Event) -> LockWaits:
    """Every LOCK_SAMPLE_S until ``stop``: who in the bench database waits on a lock, and for
    what."""
    waits = LockWaits()
    while not stop.is_set():
        rows = await admin.fetch(_WAITS)
        kinds = [wait_kind(r["wait_event"], r["locktype"], r["classid"], r["objsubid"]) for r in rows]
        waits.samples += 1
        waits.by_kind.update(kinds)
        waits.waiting_samples += any(kind in MERGE_WAITS for kind in kinds)
        await asyncio.sleep(LOCK_SAMPLE_S)
    return waits


def _messages(payloads: Sequence[bytes]) -> list[OutgoingMessage]:
    """What ingest publishes for each event: its type, id, payload and routing key."""
    messages = []
    for payload in payloads:
        event = ingest_pb2.Event.FromString(payload)
        messages.append(
            OutgoingMessage(
                key=str(event.WhichOneof("payload")),
                message_id=event.event_id,
                payload=payload,
                partition_key=routing_key(event.customer),
            )
        )
    return messages


async def _publish(log: JetStreamEventLog, messages: list[OutgoingMessage]) -> dict[str, float]:
    """Publish in atomic batches, a few in flight; event id -> when its publish was acked."""
    acked_at: dict[str, float] = {}
    window = asyncio.Semaphore(4)

    async def batch(part: list[OutgoingMessage]) -> None:
        async with window:
            outcomes = await (await log.publish_batch(part))
            now = time.time()
        for message, outcome in zip(part, outcomes, strict=True):
            if not isinstance(outcome, PublishReceipt):
                raise BenchError(f"the event log refused an event: {outcome}")
            acked_at[message.message_id] = now

    await asyncio.gather(
        *(batch(messages[i : i + PUBLISH_BATCH]) for i in range(0, len(messages), PUBLISH_BATCH))
    )
    return acked_at


async def _drained(js: Any, consumers: Sequence[str], stall_s: float) -> None:
    """Until no lane's consumer has anything pending or unacked.

    Raises:
        BenchError: nothing was merged for ``stall_s``.
    """
    settings = JetStreamSettings()
    fewest, progress_at = None, time.monotonic()
    while True:
        pending = 0
        for consumer in consumers:
            try:
                info = await js.consumer_info(settings.stream, consumer)
            except nats.js.errors.NotFoundError:
                continue  # a lane nobody took yet
            pending += int(info.num_pending) + int(info.num_ack_pending)
        if pending == 0:
            return
        if fewest is None or pending < fewest:
            fewest, progress_at = pending, time.monotonic()
        elif time.monotonic() - progress_at > stall_s:
            raise BenchError(f"the merge stopped: {pending:,} events pending, none merged for {stall_s:.0f}s")
        await asyncio.sleep(0.05)


async def _freshness(admin: asyncpg.Connection, acked_at: dict[str, float], prefix: str) -> list[float]:
    rows = await admin.fetch(
        "SELECT event_id, extract(epoch FROM merged_at)::float8 AS merged FROM events WHERE event_id LIKE $1",
        f"{prefix}%",
    )
    return sorted(max(0.0, r["merged"] - acked_at[r["event_id"]]) for r in rows if r["event_id"] in acked_at)


async def _reset_stream(nats_url: str) -> None:
    """Delete the event stream: the next profile process makes it again, empty, partitioned."""
    client = await nats.connect(nats_url.split(","))
    try:
        await client.jetstream().delete_stream(JetStreamSettings().stream)
    except nats.js.errors.NotFoundError:
        pass
    finally:
        await client.close()


def _one_run(stack: BenchStack, options: Options, processes: int, round_: int) -> RunResult:
    asyncio.run(_reset_stream(stack.nats_url))
    labels = [f"profile-{processes}x-{i}" for i in range(processes)]
    for label in labels:
        stack.start_variant(
            suite.PROFILE,
            label,
            {"NATS_EVENT_PARTITIONS": str(options.partitions), "PROFILE_HTTP_ADDRESS": ""},
        )
    pids = [stack.pid_of(label) for label in labels]
    try:
        return asyncio.run(_measure(stack, options, processes, round_, pids))
    finally:
        for label in labels:
            stack.stop_variant(label)


async def _measure(
    stack: BenchStack, options: Options, processes: int, round_: int, pids: list[int]
) -> RunResult:
    lanes = lanes_of(options.partitions)
    tag = f"scale{processes}r{round_}"
    # Customers of this run's own (the run in their ids): a later run merging into the same
    # customers would grow their states and cost more per event.
    run_id = f"{stack.run_id}{tag}"
    load = make_load(run_id, tag, options.events, options.customers, streams=1)
    messages = _messages(load.raw_payloads)
    settings = JetStreamSettings(
        url=stack.nats_url,
        manage_streams=False,
        replicas=options.nats_nodes,
        event_partitions=options.partitions,
    )
    admin = await asyncpg.connect(stack.database_url)
    sampler_connection = await asyncpg.connect(stack.database_url)
    log = await JetStreamEventLog.connect(settings)
    client = await nats.connect(stack.nats_url.split(","))
    try:
        if log.event_partitions != options.partitions:
            raise BenchError(f"the stream has {log.event_partitions} partitions, not {options.partitions}")
        held = await _wait_for_lanes(admin, processes, len(lanes))
        idle_from = _cpu_s(pids)
        await asyncio.sleep(IDLE_S)
        idle_cpu = (_cpu_s(pids) - idle_from) / IDLE_S
        say(f"   {processes} process(es): lanes held {held}; publishing {len(messages):,} events")
        stop = asyncio.Event()
        sampling = asyncio.create_task(_sample_lock_waits(sampler_connection, stop))
        cpu_before = _cpu_s(pids)
        started = time.monotonic()
        acked_at = await _publish(log, messages)
        consumers = [partition_consumer(CONSUMER, lane) for lane in lanes]
        await _drained(client.jetstream(), consumers, DRAIN_STALL_S)
        seconds = time.monotonic() - started
        cpu_s = _cpu_s(pids) - cpu_before
        stop.set()
        lock_waits = await sampling
        freshness = await _freshness(admin, acked_at, f"bench-{run_id}-{tag}-")
        if len(freshness) != len(messages):
            raise BenchError(f"{len(freshness):,} of {len(messages):,} events were merged")
        return RunResult(
            processes=processes,
            events=len(messages),
            seconds=seconds,
            cpu_s=cpu_s,
            idle_cpu_s_per_s=idle_cpu,
            lock_waits=lock_waits,
            freshness_s=freshness,
            lanes_per_process=held,
        )
    finally:
        await log.close()
        await client.close()
        await admin.close()
        await sampler_connection.close()


def measure(stack: BenchStack, options: Options) -> dict[str, Any]:
    say(
        f"bench-scale: {options.rounds} round(s) of 1, 2, 3 processes; {options.events:,} events of"
        f" {options.customers:,} customers per run, {options.partitions} partitions,"
        f" NATS {options.nats_nodes} server(s)"
    )
    # Rounds interleave the counts, so that drift (the database growing, the machine's other
    # work) falls on all of them alike; one run's figures vary by ~20% on a shared 2-core machine.
    runs = [
        _one_run(stack, options, processes, round_)
        for round_ in range(options.rounds)
        for processes in options.process_counts
    ]
    by_processes = {
        processes: _medians([run for run in runs if run.processes == processes])
        for processes in options.process_counts
    }
    one_cpu = by_processes[1]["net_cpu_us_per_event"]
    goals: dict[str, Any] = {}
    for processes in options.process_counts[1:]:
        goals[f"cpu_per_event_{processes}x"] = {
            "value": round(by_processes[processes]["net_cpu_us_per_event"] / one_cpu, 3),
            "goal": CPU_FLAT_GOAL,
        }
        goals[f"lock_waits_{processes}x"] = {
            "value": by_processes[processes]["merge_lock_waiting_samples"],
            "goal": 0,
        }
    return {
        "options": {
            "events": options.events,
            "customers": options.customers,
            "partitions": options.partitions,
            "nats_nodes": options.nats_nodes,
            "rounds": options.rounds,
        },
        "runs": [run.as_json() for run in runs],
        "medians": {str(processes): figures for processes, figures in by_processes.items()},
        "goals": goals,
    }


def _medians(runs: Sequence[RunResult]) -> dict[str, Any]:
    """The median of each figure over ``runs`` (one count of processes); lock waits summed."""
    figures = [run.as_json() for run in runs]

    def median(key: str) -> float:
        return round(float(statistics.median(f[key] for f in figures)), 4)

    by_kind: Counter[str] = Counter()
    for run in runs:
        by_kind.update(run.lock_waits.by_kind)
    return {
        "runs": len(runs),
        "events_per_s": median("events_per_s"),
        "cpu_us_per_event": median("cpu_us_per_event"),
        "net_cpu_us_per_event": median("net_cpu_us_per_event"),
        "idle_cpu_percent": median("idle_cpu_percent"),
        "freshness_p50_s": median("freshness_p50_s"),
        "freshness_p99_s": median("freshness_p99_s"),
        "lock_samples": sum(run.lock_waits.samples for run in runs),
        "merge_lock_waiting_samples": sum(run.lock_waits.waiting_samples for run in runs),
        "lock_wait_s_by_kind": {kind: round(n * LOCK_SAMPLE_S, 3) for kind, n in sorted(by_kind.items())},
        "lanes_per_process": figures[0]["lanes_per_process"],
        "net_cpu_us_per_event_each_run": [f["net_cpu_us_per_event"] for f in figures],
        "events_per_s_each_run": [f["events_per_s"] for f in figures],
    }


def report(results: dict[str, Any]) -> str:
    medians = results["medians"]
    rows: list[Row] = []
    one_cpu = medians["1"]["net_cpu_us_per_event"]
    for key, run in medians.items():
        n = int(key)
        ratio = run["net_cpu_us_per_event"] / one_cpu
        cpu_goal = verdict(ratio <= CPU_FLAT_GOAL) if n > 1 else ""
        lock_goal = verdict(run["merge_lock_waiting_samples"] == 0) if n > 1 else ""
        others = ", ".join(
            f"{kind} ~{seconds * 1000:.0f} ms" for kind, seconds in run["lock_wait_s_by_kind"].items()
        )
        each = " ".join(f"{v:.0f}" for v in run["net_cpu_us_per_event_each_run"])
        rows += [
            Row(
                f"{n} process(es), median of {run['runs']}: lanes held",
                " / ".join(map(str, run["lanes_per_process"])),
            ),
            Row("  merged events/s", fmt_rate(run["events_per_s"])),
            Row(
                "  profile CPU µs per merged event (all / less idle)",
                f"{run['cpu_us_per_event']:.0f} / {run['net_cpu_us_per_event']:.0f} µs"
                f" (idle {run['idle_cpu_percent']:.1f}% of a core)",
                ratio=f"{ratio:.2f} x one's" if n > 1 else "",
                goal=f"<= {CPU_FLAT_GOAL:.2f} x" if n > 1 else "",
                verdict=cpu_goal,
            ),
            Row("    less idle, each run", f"{each} µs"),
            Row(
                "  merges waiting on a merge's lock (samples / of)",
                f"{run['merge_lock_waiting_samples']} / {run['lock_samples']}",
                goal="0" if n > 1 else "",
                verdict=lock_goal,
            ),
            Row("  all lock waits, by kind (session time)", others or "none"),
            Row(
                "  freshness stored -> merged p50 / p99",
                f"{run['freshness_p50_s'] * 1000:.0f} / {run['freshness_p99_s'] * 1000:.0f} ms",
            ),
        ]
    per_core = 1e6 / max(run["net_cpu_us_per_event"] for run in medians.values())
    lines = [
        render_table(rows),
        "",
        f"projection: one merging core carries ~{per_core:,.0f} events/s (the worst median CPU per event"
        f" above); N nodes of one merging core each ~N x {per_core:,.0f}/s, up to as many nodes as"
        f" partitions ({results['options']['partitions']}), while PostgreSQL and NATS keep up",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=30_000, help="events per run (default 30,000)")
    parser.add_argument("--customers", type=int, default=3_000, help="customers per run (default 3,000)")
    parser.add_argument("--partitions", type=int, default=6, help="partitions of the stream (default 6)")
    parser.add_argument(
        "--processes", default="1,2,3", help="counts of profile processes, compared with 1 (default 1,2,3)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of 1, 2, 3 processes; medians are compared (default 3)"
    )
    parser.add_argument(
        "--nats-nodes", type=int, default=3, help="NATS servers (default 3; NATS_CLUSTER_NODES overrides)"
    )
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    counts = tuple(sorted({int(n) for n in args.processes.split(",")}))
    if counts[0] != 1 or len(counts) < 2:
        parser.error("--processes must start with 1 and name at least one more count")
    return Options(
        args.events, args.customers, args.partitions, args.nats_nodes, args.rounds, counts, args.json
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    os.environ.setdefault("NATS_CLUSTER_NODES", str(options.nats_nodes))
    options = replace(options, nats_nodes=int(os.environ["NATS_CLUSTER_NODES"]))
    return run_bench_main(
        "bench-scale",
        [],
        cprofile_dir=None,
        json_path=options.json_path,
        measure=lambda stack: measure(stack, options),
        report=report,
    )


if __name__ == "__main__":
    sys.exit(main())
