"""MicroBatcher: single submissions leave in batches, results go back to their callers. Turns:
concurrent batches pass one step in the order they were formed."""

from __future__ import annotations

import asyncio

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
