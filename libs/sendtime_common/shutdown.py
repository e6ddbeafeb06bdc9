"""Closing a service within a bound: every step of a shutdown waits a limited time, then moves on.

Kubernetes kills a pod that has not exited by the end of its grace period (30 s here). A
service's stop is the drain (calls and HTTP requests in flight get ``SHUTDOWN_GRACE_SECONDS``,
then are cancelled) and then its close, in three phases: the background work finishes what it
has in hand (a merge batch, the last key uses: ``FINISH_S``), the clients it used close side by
side (the event log's drain ``FINISH_S``, others ``RELEASE_S``), and last the database pool
(``RELEASE_S``). A cancelled task gets ``CANCEL_WAIT_S`` to unwind. What does not finish in its
time is cancelled, or torn down (a pool's connections terminated), and logged; nothing waits
for it. So a stop returns within its grace period plus ``STOP_MARGIN_S``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable
from typing import Any

log = logging.getLogger(__name__)

FINISH_S = 2.0  # work in hand at close: the batch being merged, a last flush
RELEASE_S = 1.0  # closing one client, connection pool or subscription
CANCEL_WAIT_S = 1.0  # a cancelled task's time to unwind (its finally blocks)
# The longest a close can take: background work, then clients, then the pool.
CLOSE_BOUND_S = 2 * (FINISH_S + CANCEL_WAIT_S) + RELEASE_S
# What a stop may take past its grace period: the cancellation of calls and requests still in
# flight (and aiohttp's own wait for them), then the close.
STOP_MARGIN_S = 2 * CANCEL_WAIT_S + CLOSE_BOUND_S


async def bounded(what: str, awaitable: Awaitable[object], timeout_s: float = RELEASE_S) -> bool:
    """Await ``awaitable`` for at most ``timeout_s`` (it is cancelled past that): whether it
    completed. A timeout or a failure is logged, never raised: one step of a shutdown must not
    keep the next ones from running. Only the caller's own cancellation propagates."""
    try:
        async with asyncio.timeout(timeout_s):
            await awaitable
    except TimeoutError:
        log.warning("shutdown step cut short", extra={"step": what, "timeout_s": timeout_s})
        return False
    except Exception as exc:  # noqa: BLE001 - logged; the shutdown goes on
        log.warning("shutdown step failed", extra={"step": what, "error": f"{type(exc).__name__}: {exc}"})
        return False
    return True


async def finish_or_cancel(
    what: str, tasks: Iterable[asyncio.Task[Any] | None], timeout_s: float = FINISH_S
) -> None:
    """Let ``tasks`` finish within ``timeout_s``; cancel those still running and give them
    ``CANCEL_WAIT_S`` to unwind. A task that failed, or that does not end even then, is logged."""
    running = {task for task in tasks if task is not None}
    if not running:
        return
    _, late = await asyncio.wait(running, timeout=timeout_s)
    if late:
        log.warning(
            "shutdown: work not finished in time, cancelled",
            extra={"step": what, "tasks": sorted(t.get_name() for t in late), "timeout_s": timeout_s},
        )
        for task in late:
            task.cancel()
        _, stuck = await asyncio.wait(late, timeout=CANCEL_WAIT_S)
        if stuck:
            log.error(
                "shutdown: tasks ignore cancellation; left behind",
                extra={"step": what, "tasks": sorted(t.get_name() for t in stuck)},
            )
    for task in running:
        if task.done() and not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.warning(
                "shutdown: background work had failed",
                extra={"step": what, "task": task.get_name(), "error": f"{type(exc).__name__}: {exc}"},
            )
