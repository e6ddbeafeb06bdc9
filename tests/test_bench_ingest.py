"""scripts/bench_ingest.py at tiny sizes, so that it cannot rot between the times someone runs it:
every load runs (streamed, in SendEvents batches, at the goal load), every goal is reported, and
every accepted event was merged (the bench checks PostgreSQL itself and exits non-zero if not)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.script_runs import output_tail, run_script


@pytest.mark.e2e
def test_the_bench_runs_with_tiny_sizes_and_reports_every_goal(tmp_path: Path) -> None:
    results_path = tmp_path / "results.json"
    result = run_script(
        "bench_ingest.py",
        *("--events", "400", "--batch-events", "600", "--batch-size", "50", "--customers", "40"),
        *("--samples", "10", "--floor-seconds", "0.5", "--json", str(results_path)),
        timeout_s=110,
    )
    assert result.returncode == 0, output_tail(result)
    for row in (
        "acked ingest (StreamEvents)",
        "acked ingest (SendEvents x 50)",
        "call latency p50 / p99",
        "merged (load start -> all merged)",
        "freshness p99",
    ):
        assert row in result.stdout
    results = json.loads(results_path.read_text())
    assert set(results["goals"]) == {
        "acked_vs_raw_jetstream",
        "send_events_acked_per_s",
        "merged_vs_acked",
        "freshness_p99_s",
    }
    batches = results["full_speed_batches"]["ingest"]
    assert batches["outcomes"] == {"EVENT_OUTCOME_ACCEPTED": 600}
    assert results["goals"]["send_events_acked_per_s"]["value"] == batches["acked_events_per_s"] > 0
    assert results["full_speed_batches"]["merge"]["merged"] >= 600
    assert results["cpu_us_per_event"]["ingest service, per acked event (SendEvents batches)"] > 0


def test_a_batch_larger_than_ingest_takes_is_refused_before_anything_starts() -> None:
    result = run_script("bench_ingest.py", "--batch-size", "1001", timeout_s=30)
    assert result.returncode == 2 and "--batch-size must be at most 1000" in result.stderr
