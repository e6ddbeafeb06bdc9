"""The repository itself: buf lint passes, the committed generated code is current, the code lints."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import gen_protos

ROOT = Path(__file__).resolve().parent.parent


def test_buf_lint_passes() -> None:
    buf = Path(sys.executable).parent / "buf"
    result = subprocess.run([str(buf), "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def _differences(left: Path, right: Path) -> list[str]:
    comparison = filecmp.dircmp(left, right, ignore=["__pycache__"])
    found = [*comparison.left_only, *comparison.right_only, *comparison.diff_files]
    for name in comparison.common_dirs:
        found.extend(f"{name}/{d}" for d in _differences(left / name, right / name))
    return found


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    assert gen_protos.generate(tmp_path / "python") == 0
    stale = _differences(ROOT / "gen" / "python", tmp_path / "python")
    assert stale == [], f"gen/python is stale, run `make gen`: {stale}"


def test_ruff_and_mypy_pass() -> None:
    """`make lint`'s Python checks, here so that CI (which runs the suite) enforces them too."""
    bin_dir = Path(sys.executable).parent
    for command in (["ruff", "check", "."], ["ruff", "format", "--check", "."], ["mypy"]):
        result = subprocess.run(
            [str(bin_dir / command[0]), *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}{result.stderr}"


def test_an_xdist_group_runs_on_one_worker(tmp_path: Path) -> None:
    """`make test` keeps the tests that set up PostgreSQL's roles (cluster-wide) on one worker by
    their xdist_group; pytest 9.2 broke that without a word (pytest-dev/pytest-xdist#1386)."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    grouped = "import pytest\npytestmark = pytest.mark.xdist_group('together')\n"
    for name in ("a", "b"):
        (tmp_path / f"test_{name}.py").write_text(
            grouped + "".join(f"def test_{i}(): pass\n" for i in range(4))
        )
    (tmp_path / "test_free.py").write_text("".join(f"def test_{i}(): pass\n" for i in range(8)))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    workers = {
        line.split()[0]
        for line in result.stdout.splitlines()
        if "PASSED test_a.py" in line or "PASSED test_b.py" in line
    }
    assert len(workers) == 1, result.stdout
