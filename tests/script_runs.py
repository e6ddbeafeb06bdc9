"""Running a bench or the soak as ``make`` runs it (a process of its own, the repository's
PYTHONPATH), for the tests that run them at tiny sizes so that they cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping

from tests.conftest import repo_root


def run_script(
    script: str, *args: str, timeout_s: float, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``scripts/<script> <args>``, its output captured; ``env``: the environment (default: this
    process's), to which the PYTHONPATH is added."""
    root = repo_root()
    pythonpath = os.pathsep.join(str(root / part) for part in ("gen/python", "libs", "services", "scripts"))
    return subprocess.run(
        [sys.executable, str(root / "scripts" / script), *args],
        env={**(os.environ if env is None else env), "PYTHONPATH": pythonpath},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def output_tail(result: subprocess.CompletedProcess[str]) -> str:
    """What a failed run said last, for the assertion message."""
    return result.stdout[-3000:] + result.stderr[-3000:]
