"""Waiting for something for a given time, and not a moment longer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


async def wait_at_most(awaitable: Awaitable[T], timeout_s: float) -> T:
    """``awaitable``'s result, or ``TimeoutError`` as soon as ``timeout_s`` has passed.

    Past its time the awaitable is cancelled and left to unwind on its own. ``asyncio.wait_for``
    and ``asyncio.timeout`` wait for a cancelled call to end, and a PostgreSQL query cancelled on
    a connection the network stalls ends only when bytes flow again: asyncpg waits for the
    server's answer to the cancel before it gives the connection back to its pool. A 50 ms
    bound became the stall's length (render's recommendations, docs/reliability.md). What the
    awaitable raises after it was let go is retrieved and dropped. The caller's own cancellation
    cancels it too.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=max(0.0, timeout_s))
    except asyncio.CancelledError:
        task.cancel()
        task.add_done_callback(_retrieve)
        raise
    if not done:
        task.cancel()
        task.add_done_callback(_retrieve)
        raise TimeoutError(f"not done within {timeout_s:g} s")
    return task.result()


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # else asyncio logs "exception was never retrieved"
