"""scripts/bench_sync.py: how it counts, and the whole bench at a tiny size (so that it cannot
rot between the times someone runs it)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bench_sync import served_rate

from tests.conftest import repo_root


def test_the_served_rate_is_intervals_over_the_span() -> None:
    assert served_rate([10.0, 10.5, 11.0, 11.5, 12.0]) == pytest.approx(2.0)
    assert math.isnan(served_rate([10.0]))


@pytest.mark.e2e
def test_the_bench_runs_at_a_tiny_size_and_reports_both_directions(tmp_path: Path) -> None:
    root = repo_root()
    pythonpath = os.pathsep.join(str(root / part) for part in ("gen/python", "libs", "services", "scripts"))
    results_path = tmp_path / "results.json"
    result = subprocess.run(
        [
            sys.executable,
            str(root / "scripts" / "bench_sync.py"),
            *("--contacts", "400", "--pull-page", "50", "--pull-rate", "20", "--push-rate", "20"),
            *("--json", str(results_path)),
        ],
        env={**os.environ, "PYTHONPATH": pythonpath},
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
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
