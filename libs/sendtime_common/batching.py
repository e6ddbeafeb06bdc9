"""Coalescing single requests into batches, so a hot path makes one round trip per batch.

A caller awaits ``submit(item)``; items submitted while earlier batches are in flight wait and
leave together. Under light load a batch is whatever arrived in one event-loop turn, or, with a
``linger``, whatever arrived within it; under heavy load batches grow up to ``max_batch`` and go
as soon as a slot is free. Batches run concurrently; where one step of them must keep the order
they were formed in, ``Turns`` orders it.
"""

from __future__ import annotations

import asyncio
import itertools
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
        linger_s: float = 0.0,
    ) -> None:
        """``process`` gets a batch and returns one result per item, in order. A batch smaller
        than ``max_batch`` waits up to ``linger_s`` after its first item for more: fewer, larger
        batches for that much latency, where each batch has a fixed cost (a commit, an fsync)."""
        self._process = process
        self._max_batch = max_batch
        self._linger_s = linger_s
        self._slots = asyncio.Semaphore(max_concurrent_batches)
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._flush_scheduled = False
        self._lingering: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> R:
        """The item's result, once its batch is processed (its exception, if processing failed)."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._schedule_flush()
        return await future

    def _schedule_flush(self, *, now: bool = False) -> None:
        full = now or len(self._pending) >= self._max_batch
        if self._lingering is not None and full:  # no point waiting longer
            self._lingering.cancel()
            self._lingering = None
            self._flush_scheduled = False
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop = asyncio.get_running_loop()
            if self._linger_s > 0 and not full:
                self._lingering = loop.call_later(self._linger_s, self._start_flush)
            else:
                loop.call_soon(self._start_flush)

    def _start_flush(self) -> None:
        self._lingering = None
        self._flush_scheduled = False
        task = asyncio.create_task(self._flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self) -> None:
        async with self._slots:
            batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
            if not batch:
                return
            if self._pending:  # left over from a full batch: they waited for a slot already
                self._schedule_flush(now=True)
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


class Turns:
    """Lets concurrent tasks pass one point in the order they took their tickets: e.g. batches
    that query a database side by side but must publish in the order they were formed.

    ``ticket()`` is taken synchronously when the task starts; ``wait(ticket)`` returns once every
    earlier ticket is ``done``; ``done(ticket)`` may be called more than once, and must be called
    on every path (a ``finally``), or later tickets wait forever.
    """

    def __init__(self) -> None:
        self._tickets = itertools.count()
        self._next = 0  # the first ticket not done
        self._done_early: set[int] = set()
        self._waiting: dict[int, asyncio.Future[None]] = {}

    def ticket(self) -> int:
        return next(self._tickets)

    async def wait(self, ticket: int) -> None:
        if ticket <= self._next:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[ticket] = waiter
        try:
            await waiter
        finally:
            self._waiting.pop(ticket, None)

    def done(self, ticket: int) -> None:
        if ticket < self._next:
            return
        self._done_early.add(ticket)
        while self._next in self._done_early:
            self._done_early.remove(self._next)
            self._next += 1
        waiter = self._waiting.get(self._next)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
