"""scripts/bench_sync.py: how it counts, and the whole bench at a tiny size (so that it cannot
rot between the times someone runs it)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from bench_sync import served_rate

from tests.script_runs import output_tail, run_script


def test_the_served_rate_is_intervals_over_the_span() -> None:
    assert served_rate([10.0, 10.5, 11.0, 11.5, 12.0]) == pytest.approx(2.0)
    assert math.isnan(served_rate([10.0]))


@pytest.mark.e2e
def test_the_bench_runs_at_a_tiny_size_and_reports_both_directions(tmp_path: Path) -> None:
    results_path = tmp_path / "results.json"
    result = run_script(
        "bench_sync.py",
        *("--contacts", "400", "--pull-page", "50", "--pull-rate", "20", "--push-rate", "20"),
        *("--json", str(results_path)),
        timeout_s=110,
    )
    assert result.returncode == 0, output_tail(result)
    for row in ("pull: HubSpot searches/s", "push: Braze /users/track requests/s", "429s answered / left"):
        assert row in result.stdout
    results = json.loads(results_path.read_text())
    # Both ways, whole: every contact pulled as an event, every customer pushed, once.
    assert (results["pull"]["records"], results["pull"]["events"], results["pull"]["rejected"]) == (
        400,
        400,
        0,
    )
    assert (results["push"]["pushed"], results["push"]["braze_users"], results["push"]["pending"]) == (
        400,
        400,
        0,
    )
    assert results["pull"]["failures"] == results["push"]["failures"] == 0
    assert results["pull"]["requests"] == 8 and results["push"]["requests"] == math.ceil(400 / 75)
