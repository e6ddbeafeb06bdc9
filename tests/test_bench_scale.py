"""scripts/bench_scale.py at a tiny size (so that it cannot rot between the times someone runs it):
1 and 2 profile processes share the lanes of a partitioned stream and merge every event."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from bench_scale import wait_kind

from profile_service.change_outbox import RELAY_LOCK
from tests.script_runs import output_tail, run_script


@pytest.mark.e2e
def test_the_bench_runs_with_tiny_sizes_and_reports_every_goal(tmp_path: Path) -> None:
    results_path = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "NATS_CLUSTER_NODES"}
    result = run_script(
        "bench_scale.py",
        *("--events", "300", "--customers", "30", "--partitions", "2", "--nats-nodes", "1"),
        *("--rounds", "1", "--processes", "1,2"),
        *("--json", str(results_path)),
        timeout_s=150,
        env=env,
    )
    assert result.returncode == 0, output_tail(result)
    for row in (
        "merged events/s",
        "profile CPU µs per merged event",
        "less idle, each run",
        "lock waits",
        "freshness stored -> merged",
        "projection",
    ):
        assert row in result.stdout
    results = json.loads(results_path.read_text())
    runs = results["runs"]
    assert [run["processes"] for run in runs] == [1, 2]
    assert all(run["events"] == 300 and run["cpu_us_per_event"] > 0 for run in runs)
    assert all(0 < run["idle_cpu_percent"] < 100 * run["processes"] for run in runs)
    # Two partitions and the unpartitioned lane: three lanes, dealt to 1 and 2 processes.
    assert [run["lanes_per_process"] for run in runs] == [[3], [1, 2]]
    assert set(results["goals"]) == {"cpu_per_event_2x", "lock_waits_2x"}
    assert results["goals"]["lock_waits_2x"]["value"] == 0  # two partitions' merges share no lock


def test_lock_waits_are_told_apart_by_what_they_wait_for() -> None:
    assert wait_kind("advisory", "advisory", 0, 1) == "merge: identifier locks"
    assert wait_kind("advisory", "advisory", RELAY_LOCK[0], 2) == "change relay's turn"
    assert wait_kind("transactionid", "transactionid", None, None) == "merge: row locks"
    assert wait_kind("extend", "extend", None, None) == "relation extension"
