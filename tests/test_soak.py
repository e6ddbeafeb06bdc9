"""scripts/soak.py: its verdicts flag a leak and pass a flat series, and the whole soak runs with
a tiny duration and sample interval (so that it cannot rot between the times someone runs it)."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
from soak import (
    EXIT_VERDICT_FAILED,
    FD_KINDS,
    KINDS,
    LIMITS,
    MIB,
    P99_LIMIT,
    Allowance,
    fds_by_kind,
    flatness,
    verdicts,
)

from tests.script_runs import output_tail, run_script

RSS = LIMITS["rss_bytes"]


def test_open_fds_are_told_apart_by_what_they_connect() -> None:
    """This process: a listener, a connection into it (two ends: ours to a 'services' port, and
    the accepted one, inbound), a connection to a port named as a dependency, and a pipe."""
    before = fds_by_kind(os.getpid(), {})
    with (
        socket.create_server(("127.0.0.1", 0)) as listener,
        socket.create_server(("127.0.0.1", 0)) as dependency,
    ):
        port, dependency_port = listener.getsockname()[1], dependency.getsockname()[1]
        with (
            socket.create_connection(("127.0.0.1", port)) as outgoing,
            listener.accept()[0] as accepted,
            socket.create_connection(("127.0.0.1", dependency_port)) as to_postgres,
            dependency.accept()[0] as accepted_by_dependency,
        ):
            read_end, write_end = os.pipe()
            try:
                after = fds_by_kind(os.getpid(), {port: "services", dependency_port: "postgres"})
            finally:
                os.close(read_end)
                os.close(write_end)
            assert outgoing and accepted and to_postgres and accepted_by_dependency
    assert set(after) == set(FD_KINDS)
    grew = {kind: after[kind] - before[kind] for kind in FD_KINDS if after[kind] != before[kind]}
    # Both listeners are this process's: the accepted ends of both connections are inbound.
    assert grew == {"listening": 2, "services": 1, "postgres": 1, "inbound": 2, "not sockets": 2}


def test_a_flat_series_with_noise_is_flat() -> None:
    noisy = [100 * MIB + (3 * MIB if i % 2 else -3 * MIB) for i in range(30)]
    verdict = flatness(noisy, RSS, warmup=1)
    assert verdict.flat is True
    assert verdict.samples == 29
    assert abs(verdict.growth) < 3 * MIB


def test_a_leak_is_flagged() -> None:
    leaking = [100 * MIB + i * 2 * MIB for i in range(30)]  # 2 MiB a sample: +40 MiB over the thirds
    verdict = flatness(leaking, RSS, warmup=1)
    assert verdict.flat is False
    assert verdict.growth == pytest.approx(40 * MIB)
    assert verdict.allowed == 16 * MIB  # beats 10% of the first third's 110 MiB
    big = flatness([1000 * MIB + i * 2 * MIB for i in range(30)], RSS, warmup=1)
    assert big.flat is True and big.allowed == pytest.approx(101 * MIB)  # 10% of 1,010 MiB


def test_the_warm_up_is_left_out_and_a_fall_is_not_a_leak() -> None:
    # A process that grows while it warms up, then stays: flat once the warm-up is dropped.
    warming = [20.0, 60.0, 100.0, 100.0, 101.0, 100.0, 101.0, 100.0]
    assert flatness(warming, Allowance(2, 0), warmup=0).flat is False
    assert flatness(warming, Allowance(2, 0), warmup=2).flat is True
    assert flatness([50.0, 40.0, 30.0, 20.0], Allowance(0, 0), warmup=0).flat is True


def test_the_allowance_is_the_larger_of_absolute_and_relative() -> None:
    assert Allowance(8, 0.10).of(30) == 8
    assert Allowance(8, 0.10).of(300) == pytest.approx(30)
    # p99 in seconds: 10 ms may become 15 ms, not 16.
    assert flatness([0.010] * 3 + [0.015] * 3, P99_LIMIT, warmup=0).flat is True
    assert flatness([0.010] * 3 + [0.016] * 3, P99_LIMIT, warmup=0).flat is False


def test_too_few_samples_or_windows_without_calls_give_no_verdict() -> None:
    assert flatness([1.0, 2.0, 3.0], RSS, warmup=1).flat is None
    assert flatness([1.0, math.nan, 2.0, math.nan], RSS, warmup=0).flat is None
    assert flatness([1.0, math.nan, 1.0, 1.0], RSS, warmup=0).samples == 3


def _sample(at: float, rss: float) -> dict[str, object]:
    return {
        "at_s": at,
        "services": {
            "profile": {
                "rss_bytes": rss,
                "open_fds": 30.0,
                "asyncio_tasks": 40.0,
                "db_pool_in_use": 1.0,
                "db_pool_open": 3.0,
            }
        },
    }


def _window(p99: float, errors: int = 0) -> dict[str, object]:
    calls = {"calls": 100, "p50_s": p99 / 3, "p99_s": p99}
    return {"calls": {kind: {**calls, "errors": {"UNAVAILABLE": errors} if errors else {}} for kind in KINDS}}


def test_the_soak_verdicts_name_what_failed() -> None:
    windows = [_window(0.010) for _ in range(7)]
    flat = [_sample(i, 100 * MIB) for i in range(8)]  # the first, before the load, is left out
    passed = verdicts(flat, windows, warmup=1)
    assert passed["passed"] and passed["failed"] == [] and passed["errors"] == 0
    assert passed["flat"]["profile rss_bytes"]["samples"] == 6

    leaking = [_sample(i, 100 * MIB + i * 10 * MIB) for i in range(8)]
    failed = verdicts(leaking, [*windows[:-1], _window(0.010, errors=2)], warmup=1)
    assert failed["failed"] == ["profile rss_bytes", "errors"]
    assert failed["errors"] == 2 * len(KINDS)
    assert not failed["passed"]

    slower = verdicts(flat, [*windows[:4], *(_window(0.050) for _ in range(3))], warmup=1)
    assert slower["failed"] == list(KINDS)


@pytest.mark.e2e
def test_the_soak_runs_with_a_tiny_duration_and_reports_every_series(tmp_path: Path) -> None:
    results_path = tmp_path / "results.json"
    result = run_script(
        "soak.py",
        *("--customers", "20", "--concurrency", "4", "--calibrate-s", "1"),
        *("--duration-s", "4", "--sample-s", "1", "--json", str(results_path)),
        timeout_s=90,
    )
    # A 4 s soak on a shared machine may see a p99 move: the verdicts decide the exit code.
    assert result.returncode in (0, EXIT_VERDICT_FAILED), output_tail(result)
    results = json.loads(results_path.read_text())
    assert results["calibration"]["per_s"] > 0 and not results["calibration"]["errors"]
    assert results["rate_per_s"] == pytest.approx(results["calibration"]["per_s"] / 2)

    samples = results["samples"]
    # One before the load (at 0), then one as each 1 s window ends: the sampler waits for a fixed
    # grid, so a sample is never early; late by the load on its loop, but within its interval.
    assert len(samples) == 5
    for k, sample in enumerate(samples):
        assert k <= sample["at_s"] < k + 1, [s["at_s"] for s in samples]
    for sample in samples:
        assert set(sample["services"]) == {"profile", "ingest", "render"}
        for quantities in sample["services"].values():
            assert set(quantities) == set(LIMITS)
            assert quantities["rss_bytes"] > 10 * MIB and quantities["open_fds"] > 5
            assert quantities["asyncio_tasks"] >= 1
            assert 0 <= quantities["db_pool_in_use"] <= quantities["db_pool_open"]
        for service, counts in sample["fds_by_kind"].items():
            assert sum(counts.values()) == pytest.approx(sample["services"][service]["open_fds"], abs=2)
            assert counts["postgres"] >= 1 and counts["listening"] >= 4  # gRPC, health, HTTP, metrics
        assert sample["fds_by_kind"]["render"]["services"] >= 1  # its channel to profile
    windows = results["windows"]
    assert [w["until_s"] for w in windows] == [1, 2, 3, 4]
    for window in windows:
        assert set(window["calls"]) == set(KINDS)
        assert all(window["calls"][kind]["calls"] > 0 for kind in KINDS)
    assert results["verdicts"]["errors"] == 0, [w["calls"] for w in windows]

    # The verdicts are the ones the samples give, and decide the exit code.
    assert results["verdicts"] == json.loads(json.dumps(verdicts(samples, windows, warmup=1)))
    assert results["verdicts"]["flat"]["render rss_bytes"]["samples"] == 3
    assert (result.returncode == 0) == results["verdicts"]["passed"]
    for line in (
        "RSS (MiB), by service",
        "asyncio tasks, by service",
        "profile's open file descriptors by kind",
        "Render p99",
        "calls failed",
    ):
        assert line in result.stdout
    assert ("PASS: every quantity" in result.stdout) == results["verdicts"]["passed"]
