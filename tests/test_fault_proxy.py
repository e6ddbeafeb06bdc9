"""scripts/fault_proxy.py, the chaos harness's proxy, run as its own process in front of a local
echo server: bytes pass unchanged, ``latency`` delays them without throttling, ``stall`` holds them
in order until ``resume``, ``reset`` breaks the open connections only, and bad commands are errors.

Timing is asserted as lower bounds; the one upper bound (that latency is a pipeline) has a margin
of seconds over what it measures."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from fault_proxy import FaultProxy, FaultProxyError

from tests.conftest import repo_root

WAIT_S = 10.0  # for what must arrive: only a failing test waits this long
MIB = 1024 * 1024

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Connect = Callable[[int], Awaitable[Streams]]


class Echo:
    """The upstream: a TCP server that writes back what it reads, and counts it."""

    def __init__(self) -> None:
        self.received = 0
        self.port = 0
        self.handlers: set[asyncio.Task[None]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            while data := await reader.read(64 * 1024):
                self.received += len(data)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass  # the proxy reset it
        finally:
            writer.close()
            self.handlers.discard(task)


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    echo = Echo()
    server = await asyncio.start_server(echo.handle, "127.0.0.1", 0)
    echo.port = server.sockets[0].getsockname()[1]
    async with server:
        yield echo
    if echo.handlers:  # the proxy, closed first, has closed their connections
        await asyncio.wait(echo.handlers, timeout=WAIT_S)


@pytest.fixture
def proxy(echo: Echo, tmp_path: Path) -> Iterator[FaultProxy]:
    upstream = ("127.0.0.1", echo.port)
    with FaultProxy.start({"r": upstream, "s": upstream}, tmp_path) as proxy:
        yield proxy


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    writers: list[asyncio.StreamWriter] = []

    async def open_connection(port: int) -> Streams:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
        return reader, writer

    yield open_connection
    for writer in writers:
        writer.close()
        with contextlib.suppress(OSError):  # a connection the proxy reset
            await writer.wait_closed()


async def round_trip(streams: Streams, data: bytes) -> float:
    """Send ``data``, wait for the echo of it; the seconds it took."""
    reader, writer = streams
    started = time.monotonic()
    writer.write(data)
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(len(data)), WAIT_S) == data
    return time.monotonic() - started


async def test_bytes_pass_through_unchanged_both_ways(
    proxy: FaultProxy, echo: Echo, connect: Connect
) -> None:
    reader, writer = await connect(proxy.port("r"))
    await round_trip((reader, writer), b"hello")
    payload = os.urandom(MIB)

    async def send() -> None:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()

    # Sent and read at once: the echo writes back as it reads, so neither side waits for the other.
    _, received = await asyncio.wait_for(asyncio.gather(send(), reader.readexactly(MIB)), WAIT_S)
    assert received == payload
    assert echo.received == len(b"hello") + MIB
    # The half-close went through: the echo saw EOF and closed, and that EOF came back.
    assert await asyncio.wait_for(reader.read(), WAIT_S) == b""


async def test_latency_delays_each_direction_as_a_pipeline_and_zero_removes_it(
    proxy: FaultProxy, connect: Connect
) -> None:
    streams = await connect(proxy.port("r"))
    await round_trip(streams, b"before")

    proxy.latency("r", 0.2)
    assert await round_trip(streams, b"slow") >= 0.4  # 0.2 s there, 0.2 s back

    # 20 chunks, 10 ms apart: as a pipeline they arrive about 0.4 s after each was sent, all
    # within about 0.6 s; delayed one after the other they would take 20 x 0.2 = 4 s or more.
    reader, writer = streams
    messages = [b"%02d" % i for i in range(20)]
    started = time.monotonic()
    for message in messages:
        writer.write(message)
        await writer.drain()
        await asyncio.sleep(0.01)
    assert await asyncio.wait_for(reader.readexactly(40), WAIT_S) == b"".join(messages)  # in order
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 3.0

    # A chunk already held under a long latency goes as soon as the latency is removed.
    proxy.latency("r", 30)
    writer.write(b"held")
    await writer.drain()
    await asyncio.sleep(0.1)  # read and queued by the proxy, due in 30 s
    proxy.latency("r", 0)
    assert await asyncio.wait_for(reader.readexactly(4), WAIT_S) == b"held"  # not after 60 s
    await round_trip(streams, b"after")


async def test_stall_holds_bytes_in_order_until_resume(
    proxy: FaultProxy, echo: Echo, connect: Connect
) -> None:
    first = await connect(proxy.port("r"))
    other_route = await connect(proxy.port("s"))
    await round_trip(first, b"x")
    await round_trip(other_route, b"y")
    received_before = echo.received

    proxy.stall("r")
    first[1].write(b"one")
    await first[1].drain()
    await asyncio.sleep(0.05)  # a chunk of its own
    first[1].write(b"two")
    await first[1].drain()
    reply = asyncio.create_task(first[0].readexactly(6))
    # A new connection is accepted while stalled, and its bytes held too.
    second = await connect(proxy.port("r"))
    second[1].write(b"three")
    await second[1].drain()
    second_reply = asyncio.create_task(second[0].readexactly(5))

    # The proxy keeps forwarding the other route meanwhile, so the silence of r is the stall's.
    await round_trip(other_route, b"live")
    await asyncio.sleep(0.2)
    assert not reply.done() and not second_reply.done()
    assert echo.received == received_before + len(b"live")  # nothing of r reached the upstream
    assert proxy.stats() == {"r": 2, "s": 1}  # both connections open

    proxy.resume("r")
    assert await asyncio.wait_for(reply, WAIT_S) == b"onetwo"
    assert await asyncio.wait_for(second_reply, WAIT_S) == b"three"
    await round_trip(first, b"flowing")


async def test_reset_breaks_the_open_connections_and_new_ones_work(
    proxy: FaultProxy, connect: Connect
) -> None:
    first = await connect(proxy.port("r"))
    other_route = await connect(proxy.port("s"))
    await round_trip(first, b"x")
    await round_trip(other_route, b"y")

    proxy.reset("r")
    with pytest.raises(ConnectionResetError):  # an RST, not a polite FIN
        await asyncio.wait_for(first[0].read(), WAIT_S)
    assert proxy.stats() == {"r": 0, "s": 1}
    await round_trip(other_route, b"untouched")
    second = await connect(proxy.port("r"))
    await round_trip(second, b"new")

    proxy.reset("all")
    for reader, _ in (second, other_route):
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), WAIT_S)
    assert proxy.stats() == {"r": 0, "s": 0}


def test_bad_commands_are_errors_and_close_exits_0(proxy: FaultProxy) -> None:
    with pytest.raises(FaultProxyError, match="unknown route 'nope'"):
        proxy.latency("nope", 1)
    with pytest.raises(FaultProxyError, match="unknown route"):
        proxy.stall("nope")
    with pytest.raises(FaultProxyError, match="unknown command"):
        proxy.command("jitter r 1")
    with pytest.raises(FaultProxyError, match="seconds"):
        proxy.latency("r", -1)
    with pytest.raises(FaultProxyError, match="unknown command 'stats r'"):
        proxy.command("stats r")  # stats takes no route
    assert proxy.stats() == {"r": 0, "s": 0}  # still answering
    proxy.latency("all", 0.5)
    proxy.stall("all")
    proxy.resume("all")

    assert proxy.close() == 0
    with pytest.raises(FaultProxyError, match="exited"):
        proxy.resume("r")
    assert proxy.close() == 0  # twice is harmless


async def test_sigterm_closes_the_connections_and_exits_0(proxy: FaultProxy, connect: Connect) -> None:
    streams = await connect(proxy.port("r"))
    await round_trip(streams, b"x")
    proxy.process.send_signal(signal.SIGTERM)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(streams[0].read(), WAIT_S)
    assert proxy.process.wait(WAIT_S) == 0
    with pytest.raises(FaultProxyError, match=r"exited \(code 0\)"):
        proxy.stats()


def test_the_command_line_rejects_a_busy_port_and_a_malformed_route() -> None:
    script = str(repo_root() / "scripts" / "fault_proxy.py")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, script, "--route", f"r={port}:127.0.0.1:1"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=WAIT_S,
            check=False,
        )
    assert result.returncode == 1 and "ready" not in result.stdout
    assert "cannot listen" in result.stderr

    for route in ("r=1234", "all=1:localhost:2", "r=x:localhost:2"):
        result = subprocess.run(
            [sys.executable, script, "--route", route],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=WAIT_S,
            check=False,
        )
        assert result.returncode == 2 and "--route" in result.stderr, route
