"""Bounded shutdown (sendtime_common.shutdown, HttpListener.stop, close_pool): a request or a task
that never ends is cancelled after its time, a pool with a connection never released is
terminated, an idle keep-alive connection is closed at once."""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg
import pytest
from aiohttp import web

from sendtime_common.database import close_pool
from sendtime_common.http_server import HttpListener
from sendtime_common.shutdown import CANCEL_WAIT_S, bounded, finish_or_cancel
from sendtime_common.tls import TlsSettings

PLAINTEXT = TlsSettings(allow_plaintext=True)


class Endless:
    """An app whose /wait handler runs until cancelled (or released)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/wait", self.wait)
        app.router.add_get("/healthz", self.healthz)
        return app

    async def wait(self, request: web.Request) -> web.Response:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return web.Response(text="done")

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")


async def request(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A keep-alive HTTP/1.1 request written on a raw connection (the answer left unread)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: keep-alive\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(
        next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")).split(b":")[1]
    )
    return head + await reader.readexactly(length)


async def timed_stop(listener: HttpListener, grace_s: float) -> float:
    started = time.monotonic()
    await listener.stop(grace_s)
    return time.monotonic() - started


async def test_an_idle_keep_alive_connection_does_not_hold_the_stop() -> None:
    listener = HttpListener(Endless().app(), "127.0.0.1:0", tls=PLAINTEXT, name="test", grace_s=30)
    await listener.start()
    reader, writer = await request(listener.port, "/healthz")
    assert b"200 OK" in await read_answer(reader)  # the connection stays open, idle
    took = await timed_stop(listener, 30)
    assert took < 1.0
    assert await asyncio.wait_for(reader.read(), 1) == b""  # the server closed it
    writer.close()


@pytest.mark.parametrize("client_stays", [True, False], ids=["client-waiting", "client-gone"])
async def test_a_request_past_the_grace_period_is_cancelled(client_stays: bool) -> None:
    """Client gone: aiohttp leaves that handler running and its own shutdown no longer sees it;
    the listener cancels it all the same."""
    endless = Endless()
    listener = HttpListener(endless.app(), "127.0.0.1:0", tls=PLAINTEXT, name="test", grace_s=30)
    await listener.start()
    reader, writer = await request(listener.port, "/wait")
    await asyncio.wait_for(endless.started.wait(), 5)
    if not client_stays:
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.1)
    assert listener.requests_in_progress == 1
    took = await timed_stop(listener, 0.5)  # the stop's grace, not the listener's 30 s
    assert 0.5 <= took < 0.5 + 2 * CANCEL_WAIT_S
    assert endless.cancelled == 1
    assert listener.requests_in_progress == 0
    if client_stays:
        answer = await asyncio.wait_for(reader.read(), 1)
        assert b"done" not in answer
        writer.close()


async def test_a_request_that_ends_within_the_grace_period_is_answered() -> None:
    endless = Endless()
    listener = HttpListener(endless.app(), "127.0.0.1:0", tls=PLAINTEXT, name="test", grace_s=30)
    await listener.start()
    reader, writer = await request(listener.port, "/wait")
    await asyncio.wait_for(endless.started.wait(), 5)
    stopping = asyncio.create_task(timed_stop(listener, 5))
    await asyncio.sleep(0.2)
    with pytest.raises(OSError):  # no new connections while draining
        await asyncio.open_connection("127.0.0.1", listener.port)
    endless.release.set()
    assert b"done" in await asyncio.wait_for(read_answer(reader), 2)
    assert await stopping < 1.0
    assert endless.cancelled == 0
    writer.close()


async def test_close_pool_terminates_a_connection_never_released(database_url: str) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    held = await pool.acquire()
    started = time.monotonic()
    await close_pool(pool, timeout_s=0.3)  # pool.close() alone would wait for `held` forever
    assert time.monotonic() - started < 1.0
    assert pool.is_closing()
    assert pool.get_size() == 0
    with pytest.raises(asyncpg.InterfaceError):
        await held.fetchval("SELECT 1")


async def test_close_pool_closes_an_idle_pool_at_once(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sendtime_common.database")
    pool = await asyncpg.create_pool(database_url, min_size=2, max_size=2)
    # The close completes by itself, with nothing to wait for: it is not cut short and nothing is
    # terminated (whatever a loaded machine makes of the time it takes).
    await close_pool(pool, timeout_s=10)
    assert [r.getMessage() for r in caplog.records if r.name == "sendtime_common.database"] == []
    assert pool.get_size() == 0


async def test_finish_or_cancel_lets_work_finish_then_cancels_what_is_left() -> None:
    finishing = asyncio.create_task(asyncio.sleep(0.05), name="quick")
    endless = asyncio.create_task(asyncio.Event().wait(), name="endless")
    started = time.monotonic()
    await finish_or_cancel("test", [finishing, endless, None], timeout_s=0.2)
    assert 0.2 <= time.monotonic() - started < 0.2 + CANCEL_WAIT_S
    assert finishing.done() and not finishing.cancelled()
    assert endless.cancelled()


async def test_a_task_that_ignores_cancellation_is_left_behind_within_the_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="sendtime_common.shutdown")
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                pass  # what no task should do; the shutdown must not wait for it

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    await finish_or_cancel("test", [task], timeout_s=0.1)
    # It returned with the task still running: it cancelled it after its time, gave it its
    # CANCEL_WAIT_S, and left it behind, as it says.
    assert not task.done()
    said = [r for r in caplog.records if r.name == "sendtime_common.shutdown"]
    assert [(r.getMessage(), getattr(r, "tasks", None)) for r in said] == [
        ("shutdown: work not finished in time, cancelled", ["stubborn"]),
        ("shutdown: tasks ignore cancellation; left behind", ["stubborn"]),
    ]
    release.set()
    await task


async def test_bounded_reports_a_step_cut_short_or_failed_without_raising() -> None:
    assert await bounded("quick", asyncio.sleep(0), 1)
    assert not await bounded("slow", asyncio.sleep(10), 0.05)

    async def failing() -> None:
        raise OSError("gone")

    assert not await bounded("failing", failing(), 1)
