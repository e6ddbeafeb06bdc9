"""Readiness: whether this replica can do its job right now, from named conditions it watches.

A service names what it needs (``watch("event log", check)``); the server asks every check each
``READINESS_CHECK_INTERVAL_SECONDS`` and reports NOT_SERVING on its readiness (the overall
health status and each hosted service's) once a condition has been failing for
``READINESS_DELAY_SECONDS``: a blip shorter than that (a NATS reconnect, a slow answer) does
not take the replica out of rotation. It reports SERVING again as soon as every condition
passes. Liveness is not this: it never follows a dependency (sendtime_common.grpc_server).

``ReadinessRules`` is the pure part (what the conditions' history means, given the time);
``ReadinessMonitor`` runs the checks and reports changes.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from sendtime_common.config import ConfigError, env_float
from sendtime_common.deadlines import wait_at_most

log = logging.getLogger(__name__)

# A check that has not answered by then counts as failing (a dependency that hangs is down).
CHECK_TIMEOUT_S = 2.0

# A check: true while its condition holds; an exception counts as false.
Check = Callable[[], bool | Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class ReadinessSettings:
    # How long a condition must fail before the replica reports NOT_SERVING.
    delay_s: float = 5.0
    # How often the conditions are checked.
    check_interval_s: float = 1.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ReadinessSettings:
        """READINESS_DELAY_SECONDS, READINESS_CHECK_INTERVAL_SECONDS; unset ones keep their
        defaults.

        Raises:
            sendtime_common.config.ConfigError: a value is not a number, or the interval is
                not positive.
        """
        defaults = cls()
        interval = env_float(env, "READINESS_CHECK_INTERVAL_SECONDS", defaults.check_interval_s)
        if interval <= 0:
            raise ConfigError(f"READINESS_CHECK_INTERVAL_SECONDS must be positive, got {interval}")
        return cls(
            delay_s=env_float(env, "READINESS_DELAY_SECONDS", defaults.delay_s), check_interval_s=interval
        )


@dataclass(frozen=True, slots=True)
class ReadinessChange:
    """The replica became ready, or stopped being ready because of ``failing``."""

    ready: bool
    failing: tuple[str, ...] = ()


@dataclass(slots=True)
class ReadinessRules:
    """What the conditions' history means: ready while every failing condition has been failing
    for less than ``delay_s``. The first observation has no history to forgive: a condition
    failing then makes the replica unready at once (it was never ready)."""

    delay_s: float
    _failing_since: dict[str, float] = field(default_factory=dict)
    _ready: bool | None = None

    @property
    def ready(self) -> bool:
        """The last verdict; false before the first observation."""
        return bool(self._ready)

    def observe(self, failing: Collection[str], now: float) -> ReadinessChange | None:
        """Record that exactly ``failing`` fail at ``now`` (monotonic seconds); the change of
        readiness this makes, if any."""
        for name in failing:
            self._failing_since.setdefault(name, now)
        for name in [n for n in self._failing_since if n not in failing]:
            del self._failing_since[name]
        first = self._ready is None
        too_long = sorted(
            name for name, since in self._failing_since.items() if first or now - since >= self.delay_s
        )
        ready = not too_long
        if ready == self._ready:
            return None
        self._ready = ready
        return ReadinessChange(ready, tuple(too_long))


class ReadinessMonitor:
    """Runs the watched checks and calls ``on_change(ready)`` when readiness changes."""

    def __init__(
        self,
        settings: ReadinessSettings,
        on_change: Callable[[bool], Awaitable[None]],
        clock: Callable[[], float] | None = None,
        check_timeout_s: float = CHECK_TIMEOUT_S,
    ) -> None:
        """``clock``: monotonic seconds (the event loop's by default)."""
        self._settings = settings
        self._check_timeout_s = check_timeout_s
        self._on_change = on_change
        self._clock = clock
        self._rules = ReadinessRules(settings.delay_s)
        self._checks: dict[str, Check] = {}
        self._failing: set[str] = set()

    @property
    def ready(self) -> bool:
        return self._rules.ready

    @property
    def conditions(self) -> list[str]:
        """The names watched."""
        return list(self._checks)

    def watch(self, name: str, check: Check) -> None:
        """Watch the condition ``name`` (short, fixed, no personal data: it is logged) from now
        on; a second watch of a name replaces the first.

        Raises:
            ValueError: the name is empty.
        """
        if not name.strip():
            raise ValueError("a readiness condition needs a name")
        self._checks[name] = check

    async def evaluate(self) -> bool:
        """Run every check once, record the outcome, report a change; whether ready now."""
        outcomes = await asyncio.gather(*(self._passes(name, check) for name, check in self._checks.items()))
        failing = {name for name, passed in zip(self._checks, outcomes, strict=True) if not passed}
        for name in sorted(failing - self._failing):
            log.warning("readiness condition failing", extra={"condition": name})
        for name in sorted(self._failing - failing):
            log.info("readiness condition holds again", extra={"condition": name})
        self._failing = failing
        clock = self._clock or asyncio.get_running_loop().time
        change = self._rules.observe(failing, clock())
        if change is not None:
            if change.ready:
                log.info("ready", extra={"conditions": self.conditions})
            else:
                log.warning(
                    "not ready",
                    extra={"failing": list(change.failing), "delay_s": self._settings.delay_s},
                )
            await self._on_change(change.ready)
        return self._rules.ready

    async def run(self) -> None:
        """Evaluate every check interval until cancelled."""
        while True:
            await asyncio.sleep(self._settings.check_interval_s)
            await self.evaluate()

    async def _passes(self, name: str, check: Check) -> bool:
        try:
            answer: Any = check()
            if inspect.isawaitable(answer):
                # Not asyncio.timeout: it waits for the cancelled check, as long as a network stall.
                answer = await wait_at_most(answer, self._check_timeout_s)
            return bool(answer)
        except TimeoutError:
            log.debug(
                "readiness check timed out", extra={"condition": name, "timeout_s": self._check_timeout_s}
            )
            return False
        except Exception as exc:  # noqa: BLE001 - a check that fails says the condition does not hold
            log.debug("readiness check failed", extra={"condition": name, "error": type(exc).__name__})
            return False


def task_running(task: asyncio.Task[Any]) -> Callable[[], bool]:
    """A check: ``task`` has not ended (a background loop that crashed or returned cannot do
    its work). How it ended is logged once, when first seen (the exception's type only: its
    message may carry data)."""
    seen_done = False

    def running() -> bool:
        nonlocal seen_done
        if not task.done():
            return True
        if not seen_done:
            seen_done = True
            failed = None if task.cancelled() else task.exception()
            log.error(
                "background task ended",
                extra={
                    "task": task.get_name(),
                    "ended": "cancelled" if task.cancelled() else "failed" if failed else "returned",
                    "error": type(failed).__name__ if failed else None,
                },
            )
        return False

    return running
