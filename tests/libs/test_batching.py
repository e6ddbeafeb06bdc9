"""MicroBatcher: single submissions leave in batches, results go back to their callers. Turns:
concurrent batches pass one step in the order they were formed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from sendtime_common.batching import MicroBatcher, Turns


async def test_concurrent_submissions_share_batches_and_get_their_own_results() -> None:
    batches: list[list[int]] = []

    async def double(items: list[int]) -> list[int]:
        batches.append(items)
        await asyncio.sleep(0.01)
        return [2 * i for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(double, max_batch=10, max_concurrent_batches=2)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(35)))
    assert results == [2 * i for i in range(35)]
    assert sorted(i for b in batches for i in b) == list(range(35))
    assert all(len(b) <= 10 for b in batches) and len(batches) < 35


async def test_a_failed_batch_fails_each_of_its_callers() -> None:
    async def fail(items: list[int]) -> list[int]:
        raise RuntimeError("down")

    batcher: MicroBatcher[int, int] = MicroBatcher(fail, max_batch=4, max_concurrent_batches=1)
    outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    with pytest.raises(RuntimeError):
        await batcher.submit(9)


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(items)
        return items


class FrozenClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock moves only when the test moves it: a linger runs out on
    ``advance`` and never on its own, however fast or slow the machine is."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def on_a_frozen_clock(test: Callable[[FrozenClockLoop], Awaitable[None]]) -> None:
    loop = FrozenClockLoop()
    try:
        loop.run_until_complete(test(loop))
    finally:
        loop.close()


async def loop_turns(count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


async def spaced(batcher: MicroBatcher[int, int], count: int) -> list[int]:
    """Submit ``count`` items a loop turn apart, as a paced producer would; their results."""
    submitted = []
    for i in range(count):
        submitted.append(asyncio.create_task(batcher.submit(i)))
        await asyncio.sleep(0)
    return list(await asyncio.gather(*submitted))


# A batch with no linger leaves within this many loop turns of its item (it takes three:
# submit, schedule the flush, process); none of them moves a frozen clock.
TURNS_TO_LEAVE = 10


def test_without_a_linger_items_arriving_apart_leave_apart() -> None:
    async def test(loop: FrozenClockLoop) -> None:
        recorder = Recorder()
        batcher: MicroBatcher[int, int] = MicroBatcher(recorder, max_batch=100, max_concurrent_batches=4)
        submitted = []
        for i in range(4):
            submitted.append(asyncio.create_task(batcher.submit(i)))
            await loop_turns(TURNS_TO_LEAVE)  # no time passes: a batch waiting for any stays put
            assert recorder.batches == [[j] for j in range(i + 1)]
        assert await asyncio.gather(*submitted) == [0, 1, 2, 3]

    on_a_frozen_clock(test)


def test_with_a_linger_items_arriving_within_it_leave_together() -> None:
    async def test(loop: FrozenClockLoop) -> None:
        recorder = Recorder()
        batcher: MicroBatcher[int, int] = MicroBatcher(
            recorder, max_batch=100, max_concurrent_batches=4, linger_s=0.2
        )
        submitted = []
        for i in range(4):  # as far apart as without a linger they leave apart, and 0.05 s
            submitted.append(asyncio.create_task(batcher.submit(i)))
            await loop_turns(TURNS_TO_LEAVE)
            loop.advance(0.05)
        assert recorder.batches == []  # 0.15 s after the first: still lingering
        loop.advance(0.05)
        await loop_turns(TURNS_TO_LEAVE)
        assert recorder.batches == [[0, 1, 2, 3]]  # at 0.2 s, together
        assert await asyncio.gather(*submitted) == [0, 1, 2, 3]

    on_a_frozen_clock(test)


async def test_a_batch_that_fills_up_goes_without_waiting_out_the_linger() -> None:
    recorder = Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(
        recorder, max_batch=3, max_concurrent_batches=1, linger_s=60
    )
    first = await asyncio.wait_for(spaced(batcher, 3), timeout=5)  # full at the third item
    rest = await asyncio.wait_for(asyncio.gather(*(batcher.submit(i) for i in range(3, 10))), timeout=5)
    assert first + rest == list(range(10))
    # What was left over from a full batch went on at once too, the last one alone: it had
    # waited for a slot already (a 60 s linger would have tripped the timeout).
    assert recorder.batches == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


async def test_turns_let_tasks_pass_in_ticket_order_whatever_order_they_arrive_in() -> None:
    turns = Turns()
    passed: list[int] = []

    async def task(delay_s: float) -> None:
        ticket = turns.ticket()
        try:
            await asyncio.sleep(delay_s)  # e.g. a database query; the later ones return first
            await turns.wait(ticket)
            passed.append(ticket)
        finally:
            turns.done(ticket)

    await asyncio.gather(*(task(0.05 - 0.01 * i) for i in range(5)))
    assert passed == [0, 1, 2, 3, 4]


async def test_a_ticket_done_without_its_turn_holds_no_one_back() -> None:
    turns = Turns()
    first, skipped, third = turns.ticket(), turns.ticket(), turns.ticket()
    waiting = asyncio.create_task(turns.wait(third))
    await asyncio.sleep(0)
    turns.done(skipped)  # e.g. a batch that returned early, before its turn
    assert not waiting.done()
    turns.done(first)
    turns.done(first)  # twice, as a finally after the step does
    await asyncio.wait_for(waiting, timeout=1)


async def test_a_cancelled_waiter_still_lets_the_next_one_pass_once_done() -> None:
    turns = Turns()
    first, second, third = turns.ticket(), turns.ticket(), turns.ticket()
    cancelled = asyncio.create_task(turns.wait(second))
    later = asyncio.create_task(turns.wait(third))
    await asyncio.sleep(0)
    cancelled.cancel()
    turns.done(second)  # the cancelled task's finally
    turns.done(first)
    await asyncio.wait_for(later, timeout=1)
    with pytest.raises(asyncio.CancelledError):
        await cancelled
