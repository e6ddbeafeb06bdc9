"""Readiness from named conditions (sendtime_common.readiness): what a failing condition's
history means (a blip is forgiven, a lasting failure is not), the settings, and the monitor
that runs the checks."""

from __future__ import annotations

import asyncio

import pytest

from sendtime_common.config import ConfigError
from sendtime_common.readiness import (
    ReadinessChange,
    ReadinessMonitor,
    ReadinessRules,
    ReadinessSettings,
    task_running,
)


def test_a_failure_shorter_than_the_delay_is_forgiven() -> None:
    rules = ReadinessRules(delay_s=5)
    assert rules.observe([], now=0) == ReadinessChange(ready=True)
    assert rules.observe(["event log"], now=1) is None  # failing since 1
    assert rules.observe(["event log"], now=5.9) is None
    assert rules.observe([], now=6) is None  # back before the delay ran out
    assert rules.ready


def test_a_failure_as_long_as_the_delay_makes_the_replica_unready_until_it_ends() -> None:
    rules = ReadinessRules(delay_s=5)
    rules.observe([], now=0)
    rules.observe(["event log"], now=1)
    assert rules.observe(["event log"], now=6) == ReadinessChange(ready=False, failing=("event log",))
    assert rules.observe(["event log"], now=60) is None
    assert rules.observe([], now=61) == ReadinessChange(ready=True)  # at once: no delay back


def test_each_condition_is_timed_from_its_own_first_failure() -> None:
    rules = ReadinessRules(delay_s=5)
    rules.observe([], now=0)
    rules.observe(["store"], now=1)
    rules.observe(["store", "engine"], now=4)
    assert rules.observe(["engine"], now=5.5) is None  # store recovered; engine failing 1.5 s
    assert rules.observe(["engine"], now=9) == ReadinessChange(ready=False, failing=("engine",))
    # A condition that recovers and fails again starts over.
    rules.observe([], now=10)
    assert rules.observe(["engine"], now=11) is None
    assert rules.observe(["engine"], now=15.9) is None
    assert rules.observe(["engine", "store"], now=16) == ReadinessChange(ready=False, failing=("engine",))


def test_the_first_look_forgives_nothing() -> None:
    rules = ReadinessRules(delay_s=5)
    assert not rules.ready  # before any observation
    assert rules.observe(["store"], now=100) == ReadinessChange(ready=False, failing=("store",))
    assert rules.observe([], now=100.5) == ReadinessChange(ready=True)


def test_with_no_delay_any_failure_counts_at_once() -> None:
    rules = ReadinessRules(delay_s=0)
    rules.observe([], now=0)
    assert rules.observe(["merger"], now=0.1) == ReadinessChange(ready=False, failing=("merger",))


def test_settings_come_from_the_environment_with_defaults() -> None:
    assert ReadinessSettings.from_env({}) == ReadinessSettings(delay_s=5.0, check_interval_s=1.0)
    env = {"READINESS_DELAY_SECONDS": "10", "READINESS_CHECK_INTERVAL_SECONDS": "0.5"}
    assert ReadinessSettings.from_env(env) == ReadinessSettings(delay_s=10, check_interval_s=0.5)
    with pytest.raises(ConfigError, match="READINESS_DELAY_SECONDS must be a number"):
        ReadinessSettings.from_env({"READINESS_DELAY_SECONDS": "5s"})
    with pytest.raises(ConfigError, match="READINESS_DELAY_SECONDS must be at least 0"):
        ReadinessSettings.from_env({"READINESS_DELAY_SECONDS": "-1"})
    with pytest.raises(ConfigError, match="READINESS_CHECK_INTERVAL_SECONDS must be positive"):
        ReadinessSettings.from_env({"READINESS_CHECK_INTERVAL_SECONDS": "0"})


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_the_monitor_reports_each_change_once_and_counts_errors_and_hangs_as_failing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="sendtime_common.readiness")
    clock, reported = Clock(), []
    store_up, log_up, log_hangs = True, True, False

    async def report(ready: bool) -> None:
        reported.append(ready)

    def store() -> bool:
        if not store_up:
            raise ConnectionError("refused")
        return True

    async def event_log() -> bool:
        if log_hangs:
            await asyncio.sleep(10)
        return log_up

    monitor = ReadinessMonitor(ReadinessSettings(delay_s=2), report, clock=clock, check_timeout_s=0.1)
    with pytest.raises(ValueError, match="needs a name"):
        monitor.watch(" ", store)
    monitor.watch("store", store)
    monitor.watch("event log", event_log)
    assert monitor.conditions == ["store", "event log"]

    assert await monitor.evaluate() and reported == [True]
    store_up = False
    clock.now = 1
    assert await monitor.evaluate() and reported == [True]  # forgiven for now
    clock.now = 3
    assert not await monitor.evaluate()
    assert reported == [True, False]
    store_up, log_hangs = True, True
    clock.now = 4
    started = asyncio.get_running_loop().time()
    assert await monitor.evaluate()  # the store is back; the hang has only just begun
    assert asyncio.get_running_loop().time() - started < 1  # cut at the check timeout
    assert reported == [True, False, True]
    log_hangs, log_up = False, False
    clock.now = 6.5
    assert not await monitor.evaluate()  # failing (hung, then false) since 4
    assert reported == [True, False, True, False]
    events = [
        (r.getMessage(), r.__dict__.get("condition") or r.__dict__.get("failing")) for r in caplog.records
    ]
    assert events == [  # condition names and states only: nothing about a customer
        ("ready", None),
        ("readiness condition failing", "store"),
        ("not ready", ["store"]),
        ("readiness condition failing", "event log"),
        ("readiness condition holds again", "store"),
        ("ready", None),
        ("not ready", ["event log"]),
    ]
    assert monitor.conditions == ["store", "event log"]


async def test_a_task_is_running_until_it_ends_and_how_it_ended_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = asyncio.Event()

    async def loop_that_crashes() -> None:
        await release.wait()
        raise KeyError("customer-42")  # its message is not logged: it may carry data

    task = asyncio.create_task(loop_that_crashes(), name="merger")
    running = task_running(task)
    await asyncio.sleep(0)
    assert running()
    release.set()
    with pytest.raises(KeyError):
        await task
    assert not running() and not running()
    ended = [r for r in caplog.records if r.getMessage() == "background task ended"]
    assert [(r.__dict__["task"], r.__dict__["ended"], r.__dict__["error"]) for r in ended] == [
        ("merger", "failed", "KeyError")
    ]
    assert "customer-42" not in caplog.text


async def test_a_check_cut_at_its_timeout_is_not_waited_for_while_it_unwinds() -> None:
    """A database check on a connection the network stalls: cancelled, its query ends only when
    the network is back (asyncpg waits for the server's answer to the cancel). The readiness
    loop must not wait that long, or a replica cut off from PostgreSQL stays ready."""
    network_back = asyncio.Event()
    unwinding = asyncio.Event()

    async def stalled_database() -> bool:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            unwinding.set()
            await network_back.wait()
            raise
        return True

    reported: list[bool] = []

    async def report(ready: bool) -> None:
        reported.append(ready)

    monitor = ReadinessMonitor(ReadinessSettings(delay_s=0), report, clock=Clock(), check_timeout_s=0.05)
    monitor.watch("store", stalled_database)
    assert not await monitor.evaluate()
    assert reported == [False]
    assert unwinding.is_set() and not network_back.is_set()
    network_back.set()
