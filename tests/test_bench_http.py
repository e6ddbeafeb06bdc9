"""scripts/bench_http.py: its open loop counts latency from the scheduled send time, and the
whole bench runs with tiny sizes (so that it cannot rot between the times someone runs it)."""

from __future__ import annotations

import asyncio
import gc
import json
import random
import statistics
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from bench_http import open_alternating, open_loop, poisson_schedule

from tests.script_runs import output_tail, run_script


def test_a_poisson_schedule_has_the_rate_asked_for() -> None:
    times = poisson_schedule(1000, 5.0, random.Random(1))
    assert times == sorted(times)
    assert 0 < times[0] and times[-1] < 5.0
    assert 4_700 < len(times) < 5_300  # 5,000 expected; the standard deviation is ~71


async def test_the_open_loop_counts_a_stall_for_every_request_it_delays() -> None:
    """A server that answers one request at a time and stalls 1 s on the first: a closed loop
    would wait and send nothing meanwhile (one slow call); the open loop keeps sending, and every
    request scheduled during the stall waits for it, counted from its scheduled time. (A stall
    of a second, so that a loaded machine's pauses of a few hundred ms cannot pass for it.)"""
    lock = asyncio.Lock()

    async def call(i: int) -> None:
        async with lock:
            await asyncio.sleep(1.0 if i == 0 else 0)

    result = await open_loop(call, 1000, 1.2, random.Random(2))
    assert len(result.latencies) == result.offered > 1000
    assert not result.errors
    # ~500 requests are scheduled in the stall's first 500 ms: each waits at least 500 ms.
    assert sum(latency >= 0.5 for latency in result.latencies) >= 250
    # Sent on time, not after the stall: a closed loop would send the ~1,000 requests scheduled
    # during the stall once it ended, at a median lag of ~0.4 s; a pause of the machine delays
    # only the few sends it overlaps.
    assert statistics.median(result.lags) < 0.2, sorted(result.lags)[-10:]


async def test_the_open_loop_runs_without_the_cycle_collector_and_turns_it_back_on() -> None:
    """A collection in the sender would count as a stall for every request it delays."""
    seen: list[bool] = []

    async def call(i: int) -> None:
        seen.append(gc.isenabled())

    assert gc.isenabled()
    result = await open_loop(call, 1000, 0.1, random.Random(4))
    assert result.offered == len(seen) > 50
    assert not any(seen)
    assert gc.isenabled()


async def test_sides_taking_turns_in_the_open_loop_get_the_same_arrival_times() -> None:
    sent: list[list[int]] = [[], []]

    def recorder(side: int) -> Callable[[int], Awaitable[None]]:
        async def call(i: int) -> None:
            sent[side].append(i)

        return call

    floor, measured = await open_alternating([recorder(0), recorder(1)], 2000, 0.2, seed=3)
    assert floor.segments == measured.segments == 4  # A B B A B A A B
    assert floor.offered == measured.offered == len(sent[0]) == len(sent[1]) > 300
    assert floor.seconds == measured.seconds == pytest.approx(0.2)


@pytest.mark.e2e
def test_the_bench_runs_with_tiny_sizes_and_reports_every_goal(tmp_path: Path) -> None:
    results_path = tmp_path / "results.json"
    result = run_script(
        "bench_http.py",
        *("--customers", "20", "--concurrency", "4", "--seconds", "0.2", "--open-seconds", "0.3"),
        *("--json", str(results_path)),
        timeout_s=110,
    )
    assert result.returncode == 0, output_tail(result)
    for row in ("profile GET hit (1 at a time) p50", "render GET (4 concurrent) p50", "open loop at"):
        assert row in result.stdout
    results = json.loads(results_path.read_text())
    assert set(results["goals"]) == {
        "profile_p50_vs_http_redis_get",
        "render_p50_vs_ideal",
        "open_loop_profile_p99_s",
    }
    both = ("one_at_a_time", "concurrent")
    for path, measures in (("profile_get", (*both, "one_at_a_time_vs_empty_http")), ("render_get", both)):
        for concurrency in measures:
            for side in ("floor", "measured"):
                measured = results[path][concurrency][side]
                assert measured["calls"] > 0 and not measured["errors"], (path, concurrency, side)
        loop = results["open_loop"][path]["measured"]
        assert loop["answered"] == loop["offered"] > 0 and not loop["errors"]
    assert set(results["render_get"]["outcomes"]) == {"RENDERED/LIVE"}
