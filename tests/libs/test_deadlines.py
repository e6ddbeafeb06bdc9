"""sendtime_common.deadlines.wait_at_most: a bound that holds even when the awaitable it cuts
takes its time to unwind (asyncpg's cancelled query on a stalled connection)."""

from __future__ import annotations

import asyncio

import pytest

from sendtime_common.deadlines import wait_at_most


class SlowToUnwind:
    """A call that, once cancelled, ends only when ``network_back`` is set: as a PostgreSQL
    query cancelled while the network stalls."""

    def __init__(self) -> None:
        self.network_back = asyncio.Event()
        self.cancelled = False
        self.ended = False

    async def __call__(self) -> str:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            await self.network_back.wait()
            raise
        finally:
            self.ended = True
        return "never"


async def test_the_result_and_the_error_come_through() -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    async def fail() -> None:
        raise ConnectionError("refused")

    assert await wait_at_most(answer(), 1.0) == 42
    with pytest.raises(ConnectionError, match="refused"):
        await wait_at_most(fail(), 1.0)


async def test_past_its_time_it_gives_up_without_waiting_for_the_call_to_unwind() -> None:
    call = SlowToUnwind()
    with pytest.raises(TimeoutError):
        await wait_at_most(call(), 0.05)
    await asyncio.sleep(0)
    assert call.cancelled and not call.ended  # told to stop, still unwinding: not waited for
    call.network_back.set()
    while not call.ended:
        await asyncio.sleep(0.01)


async def test_asyncio_wait_for_would_have_waited() -> None:
    """Why the helper exists: the standard bound waits for the unwinding."""
    call = SlowToUnwind()
    bounded = asyncio.ensure_future(asyncio.wait_for(call(), 0.05))
    while not call.cancelled:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert not bounded.done()
    call.network_back.set()
    with pytest.raises(TimeoutError):
        await bounded


async def test_cancelling_the_caller_cancels_the_call() -> None:
    call = SlowToUnwind()
    waiting = asyncio.ensure_future(wait_at_most(call(), 60))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.sleep(0)
    assert call.cancelled
    call.network_back.set()
    while not call.ended:
        await asyncio.sleep(0.01)
