"""MicroBatcher: single submissions leave in batches, results go back to their callers."""

from __future__ import annotations

import asyncio

import pytest

from sendtime_common.batching import MicroBatcher


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
