"""The commands a person runs in a terminal (``scripts/suite.py``, ``sendtime``) keep gRPC core's
INFO logging off it: ``make run``'s Ctrl-C while a service started once printed gRPC's
``Got goaway [2] ... Cancelling all calls`` above "interrupted; what it started has been
stopped". They set ``GRPC_VERBOSITY=ERROR`` before grpc is imported, unless it is given; gRPC's
errors still show. (That grpcio honours it was checked by hand: the GOAWAY line of a call cut off
by a server's stop shows without it and not with it; the timing of that line is too loose for a
test on a loaded machine.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _verbosity_after_importing(module: str, given: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    if given is not None:
        env["GRPC_VERBOSITY"] = given
    code = (
        f"import sys, os; import {module}; assert 'grpc' in sys.modules; print(os.environ['GRPC_VERBOSITY'])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("module", ["suite", "sendtime_cli.__main__"])
def test_the_terminal_commands_quiet_grpc_core_unless_told_otherwise(module: str) -> None:
    assert _verbosity_after_importing(module, None) == "ERROR"
    assert _verbosity_after_importing(module, "DEBUG") == "DEBUG"  # asked for while debugging
