"""Coalescing single requests into batches, so a hot path makes one round trip per batch.

A caller awaits ``submit(item)``; items submitted while earlier batches are in flight wait and
leave together. Under light load a batch is whatever arrived in one event-loop turn (no added
delay); under heavy load batches grow up to ``max_batch``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        process: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        max_batch: int,
        max_concurrent_batches: int,
    ) -> None:
        """``process`` gets a batch and returns one result per item, in order."""
        self._process = process
        self._max_batch = max_batch
        self._slots = asyncio.Semaphore(max_concurrent_batches)
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> R:
        """The item's result, once its batch is processed (its exception, if processing failed)."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._schedule_flush()
        return await future

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._start_flush)

    def _start_flush(self) -> None:
        self._flush_scheduled = False
        task = asyncio.create_task(self._flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self) -> None:
        async with self._slots:
            batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
            if not batch:
                return
            if self._pending:
                self._schedule_flush()
            try:
                results = await self._process([item for item, _ in batch])
            except BaseException as exc:  # handed to every waiting caller
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                return
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
