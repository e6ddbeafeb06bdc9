"""scripts/bench_triggers.py: how it counts, and the whole bench at tiny sizes (so that it cannot
rot between the times someone runs it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_triggers import sustained_rate

from tests.script_runs import output_tail, run_script


def test_the_sustained_rate_leaves_out_the_ramp_and_the_tail() -> None:
    steady = [i / 1000 for i in range(1000)]  # 1,000/s
    stragglers = [5.0, 9.0]  # a slow start and a long tail would halve a naive rate
    assert sustained_rate([*steady, *stragglers]) == pytest.approx(1000, rel=0.02)
    assert sustained_rate([1.0, 2.0]) == 0.0  # too few to say


@pytest.mark.e2e
def test_the_bench_runs_with_tiny_sizes_and_reports_every_goal(tmp_path: Path) -> None:
    results_path = tmp_path / "results.json"
    result = run_script(
        "bench_triggers.py",
        *("--timers", "600", "--backlog", "200", "--rate", "100", "--paced-seconds", "1"),
        *("--floor", "100", "--json", str(results_path)),
        timeout_s=110,
    )
    assert result.returncode == 0, output_tail(result)
    for row in (
        "fires/s, draining the backlog",
        "fire lateness p50 / p99 / max",
        "deliveries/s to the up",
        "deliveries/s, the trigger delivering to the up receiver only",
    ):
        assert row in result.stdout
    results = json.loads(results_path.read_text())
    assert results["backlog_fires"] >= 200 and results["paced_fires"] == 100
    assert results["alone_fires_per_s"] > 0
    # Every fire reached the up receiver, once: the backlog, the paced ones, the second backlog.
    assert results["delivered_up"] == 200 + 100 + 100
    assert results["unverified"] == 0
    assert results["down_attempts"] >= 1  # the down destination was tried, and held no one up
