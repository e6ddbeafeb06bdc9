"""A TCP fault-injection proxy for the chaos harness (``make chaos``): put between the services and
PostgreSQL, NATS or Redis, it delays, holds or resets the bytes of a route on command.

It runs as a process of its own, so that the harness's load generator and the proxy do not share
a GIL: in one process, every pause of the load generator would also be a pause of every byte
forwarded, and the faults injected would not be the only ones.

``python scripts/fault_proxy.py --route NAME=LISTEN_PORT:UPSTREAM_HOST:UPSTREAM_PORT [--route ...]``
listens on 127.0.0.1:LISTEN_PORT for each route (0: a port the system picks) and forwards each
connection it accepts to the upstream. Once every listener is bound it prints ``ready
NAME=PORT,...`` (the ports it listens on), then answers each line on stdin with one line, ``ok``
or ``error <reason>``:

- ``latency NAME SECONDS``: each chunk forwarded on the route, either way, on the open connections
  and the new ones, is written SECONDS after it was read. It is a pipeline delay: chunks read
  meanwhile are in flight together, as on a long link, so the throughput stays (up to
  ``MAX_HELD_BYTES`` per SECONDS, as a TCP window would allow). ``latency NAME 0`` removes it.
- ``stall NAME``: nothing is forwarded either way until ``resume NAME``; connections stay open,
  what is read is held (up to ``MAX_HELD_BYTES`` a direction, then TCP pushes back), new
  connections are accepted but connected upstream only on resume (and, under a latency, after
  it). Then the held bytes go, in order.
- ``resume NAME``.
- ``reset NAME``: every open connection of the route is closed abruptly, with an RST (SO_LINGER 0)
  to both the client and the upstream; new connections are accepted as before.
- ``stats``: ``ok NAME=OPEN_CONNECTIONS,...``, the routes in the order given.

NAME may be ``all`` for latency, stall, resume and reset. EOF on stdin or SIGTERM closes everything
and exits 0. The proxy needs only the standard library; its log (stderr) says what it did.

``FaultProxy`` is the harness's side: it starts the process (on ports the system picks: ports
chosen beforehand could be taken by then, by the services the harness starts next) and sends it
commands.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

ALL = "all"
CHUNK_BYTES = 64 * 1024
# Read but not yet written, a direction of a connection: enough for a latency pipeline at the
# rates the services reach (4 MiB in 0.2 s is 20 MiB/s); beyond it the proxy stops reading and
# TCP pushes back on the sender, as a full window would.
MAX_HELD_BYTES = 4 * 1024 * 1024
READY = "ready"


def log(message: str) -> None:
    print(f"fault_proxy: {message}", file=sys.stderr, flush=True)


# --- the proxy process ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RouteSpec:
    name: str
    listen_port: int
    upstream_host: str
    upstream_port: int


def parse_route(text: str) -> RouteSpec:
    """``NAME=LISTEN_PORT:UPSTREAM_HOST:UPSTREAM_PORT``; the host may be an IPv6 address."""
    try:
        name, _, rest = text.partition("=")
        listen, _, upstream = rest.partition(":")
        host, _, port = upstream.rpartition(":")
        spec = RouteSpec(name, int(listen), host.strip("[]"), int(port))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not NAME=LISTEN_PORT:UPSTREAM_HOST:UPSTREAM_PORT"
        ) from None
    if not name or name == ALL or any(c.isspace() or c in "=," for c in name) or not spec.upstream_host:
        raise argparse.ArgumentTypeError(f"{text!r}: a route needs a name (not {ALL!r}) and an upstream host")
    return spec


class Connection:
    """An accepted connection and, once connected, its upstream: ``abort`` breaks both at once."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.writers = [client]
        self.task = asyncio.current_task()

    def abort(self) -> None:
        for writer in self.writers:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):  # SO_LINGER 0: close() sends an RST, not a FIN
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()


@dataclass(eq=False)
class Route:
    """A listener's faults, read afresh for every chunk: a command applies to open connections."""

    spec: RouteSpec
    port: int = 0  # where it listens, once it does
    latency_s: float = 0.0
    stalled: bool = False
    connections: set[Connection] = field(default_factory=set)
    # Set, and replaced, whenever the latency or the stall changes: it wakes the chunks waiting
    # under the old setting (a chunk held for 30 s goes at once when the latency drops to 0).
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def change(self, *, latency_s: float | None = None, stalled: bool | None = None) -> None:
        if latency_s is not None:
            self.latency_s = latency_s
        if stalled is not None:
            self.stalled = stalled
        self.changed.set()
        self.changed = asyncio.Event()

    async def ready_to_send(self, read_at: float) -> None:
        """Return once what was read at ``read_at`` (loop time) may be written: the route is not
        stalled and its latency has passed since. The delay counts from the read, not from the
        previous write, so chunks read together wait together."""
        loop = asyncio.get_running_loop()
        while True:
            changed = self.changed
            wait_s = math.inf if self.stalled else read_at + self.latency_s - loop.time()
            if wait_s <= 0:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if math.isinf(wait_s) else wait_s):
                    await changed.wait()

    async def serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        connection = Connection(client_writer)
        self.connections.add(connection)
        try:
            # Connecting upstream is forwarding too: a stalled route connects on resume, a slow one
            # after its latency.
            await self.ready_to_send(asyncio.get_running_loop().time())
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(
                    self.spec.upstream_host, self.spec.upstream_port
                )
            except OSError as error:
                log(f"{self.spec.name}: cannot connect upstream: {error}")
                connection.abort()
                return
            connection.writers.append(upstream_writer)
            async with asyncio.TaskGroup() as pipes:
                pipes.create_task(self.pipe(connection, client_reader, upstream_writer))
                pipes.create_task(self.pipe(connection, upstream_reader, client_writer))
        except asyncio.CancelledError:
            # Aborted (reset, a side broken, shutdown): the end of this connection, not an error.
            # Python 3.11's start_server logs a handler task that ends cancelled as a failure.
            pass
        finally:
            self.connections.discard(connection)
            for writer in connection.writers:
                writer.close()

    async def pipe(
        self, connection: Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One direction: a reader stamps each chunk with the time it was read and queues it; a
        writer writes each when ``ready_to_send`` says, in order, then passes on the EOF (a
        half-close stays a half-close). drain() keeps the writer at the receiver's pace."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()  # b"": the EOF
        room = asyncio.Event()
        room.set()
        held_bytes = 0

        async def read() -> None:
            nonlocal held_bytes
            while True:
                await room.wait()
                chunk = await reader.read(CHUNK_BYTES)
                queue.put_nowait((loop.time(), chunk))
                if not chunk:
                    return
                held_bytes += len(chunk)
                if held_bytes >= MAX_HELD_BYTES:
                    room.clear()

        async def write() -> None:
            nonlocal held_bytes
            while True:
                read_at, chunk = await queue.get()
                await self.ready_to_send(read_at)
                if not chunk:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(chunk)
                await writer.drain()
                held_bytes -= len(chunk)
                if held_bytes < MAX_HELD_BYTES:
                    room.set()

        try:
            async with asyncio.TaskGroup() as sides:
                sides.create_task(read())
                sides.create_task(write())
        except* OSError:
            # One side broke (reset, refused write): break the other too, as the network would.
            connection.abort()


class Proxy:
    def __init__(self, specs: Sequence[RouteSpec]) -> None:
        self.routes = {spec.name: Route(spec) for spec in specs}
        self.servers: list[asyncio.Server] = []

    async def listen(self) -> None:
        for route in self.routes.values():
            server = await asyncio.start_server(route.serve, "127.0.0.1", route.spec.listen_port)
            self.servers.append(server)
            route.port = server.sockets[0].getsockname()[1]
            spec = route.spec
            log(f"{spec.name}: 127.0.0.1:{route.port} -> {spec.upstream_host}:{spec.upstream_port}")

    def selected(self, name: str) -> list[Route]:
        if name == ALL:
            return list(self.routes.values())
        if name not in self.routes:
            raise ValueError(f"unknown route {name!r}")
        return [self.routes[name]]

    async def reset(self, routes: Sequence[Route]) -> None:
        connections = [connection for route in routes for connection in route.connections]
        for connection in connections:
            connection.abort()
        # Answer once they are gone: a ``stats`` right after a reset counts none of them.
        tasks = {connection.task for connection in connections if connection.task is not None}
        if tasks:
            await asyncio.wait(tasks)

    async def command(self, line: str) -> str:
        """The answer to one command line, ``ok ...`` or ``error <reason>``."""
        words = line.split()
        try:
            match words:
                case ["latency", name, seconds]:
                    latency_s = float(seconds)
                    if not 0 <= latency_s < math.inf:
                        raise ValueError(f"latency {seconds!r} is not a number of seconds >= 0")
                    for route in self.selected(name):
                        route.change(latency_s=latency_s)
                case ["stall", name]:
                    for route in self.selected(name):
                        route.change(stalled=True)
                case ["resume", name]:
                    for route in self.selected(name):
                        route.change(stalled=False)
                case ["reset", name]:
                    await self.reset(self.selected(name))
                case ["stats"]:
                    return "ok " + ",".join(f"{name}={len(r.connections)}" for name, r in self.routes.items())
                case _:
                    raise ValueError(f"unknown command {line.strip()!r}")
        except ValueError as error:
            return f"error {error}"
        return "ok"

    async def answer_commands(self, commands: asyncio.StreamReader) -> None:
        """Until EOF: the harness closing our stdin (or exiting) is the order to stop."""
        while line := await commands.readline():
            text = line.decode(errors="replace").strip()
            answer = await self.command(text)
            log(f"{text} -> {answer}")
            print(answer, flush=True)

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        await self.reset(list(self.routes.values()))


async def run(specs: Sequence[RouteSpec]) -> int:
    loop = asyncio.get_running_loop()
    proxy = Proxy(specs)
    try:
        await proxy.listen()
    except OSError as error:
        log(f"cannot listen: {error}")
        await proxy.close()
        return 1
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"{READY} " + ",".join(f"{name}={route.port}" for name, route in proxy.routes.items()), flush=True)
    until = [asyncio.create_task(proxy.answer_commands(stdin)), asyncio.create_task(stop.wait())]
    done, pending = await asyncio.wait(until, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await proxy.close()
    for task in done:
        task.result()  # a stdout closed under us (BrokenPipeError) ends here
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--route",
        type=parse_route,
        action="append",
        required=True,
        help="NAME=LISTEN_PORT:UPSTREAM_HOST:UPSTREAM_PORT; repeat for each route",
    )
    args = parser.parse_args(argv)
    specs: list[RouteSpec] = args.route
    if len({spec.name for spec in specs}) != len(specs):
        parser.error("route names must be distinct")
    try:
        return asyncio.run(run(specs))
    except BrokenPipeError:  # stdout closed: nobody is left to command us
        # Python flushes stdout once more at exit: let that go nowhere instead of failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


# --- the harness's side --------------------------------------------------------------------------


class FaultProxyError(Exception):
    """A command the proxy refused, or a proxy that is gone or mute."""


class FaultProxy:
    """A running fault proxy process, and the commands it takes. Each command waits for its
    answer, so when ``stall`` returns, the route is stalled. Use as a context manager, or call
    ``close``."""

    def __init__(self, process: subprocess.Popen[bytes], ports: Mapping[str, int], log_path: Path) -> None:
        self.process = process
        self.ports = dict(ports)
        self.log_path = log_path
        self._received = b""

    @classmethod
    def start(
        cls, routes: Mapping[str, tuple[str, int]], workdir: Path, *, timeout_s: float = 10.0
    ) -> FaultProxy:
        """Start a proxy for ``routes`` (name: upstream host and port), each on a free port of
        127.0.0.1, logging to ``workdir``/fault_proxy.log; return once it listens."""
        # Here, not at the top: the proxy process imports this module too, and needs only the
        # standard library (devstack would bring the whole project, and a slower start).
        import devstack

        argv = [sys.executable, str(Path(__file__).resolve())]
        for name, (host, port) in routes.items():
            argv += ["--route", f"{name}=0:{host}:{port}"]
        log_path = workdir / "fault_proxy.log"
        proxy = None
        try:
            with devstack.deferred_interrupts(), log_path.open("ab") as log_file:
                process = subprocess.Popen(
                    argv,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log_file,  # the child keeps its own copy
                    start_new_session=True,  # Ctrl-C reaches the harness only; it closes us
                )
                proxy = cls(process, {}, log_path)
            answer = proxy._read_line(timeout_s)
            word, _, listening = answer.partition(" ")
            if word != READY:
                raise FaultProxyError(f"the fault proxy said {answer!r} instead of {READY!r}")
            pairs = (item.partition("=") for item in listening.split(","))
            proxy.ports = {name: int(port) for name, _, port in pairs}
        except BaseException:
            if proxy is not None:
                with devstack.held_signals():
                    proxy.close()
            raise
        return proxy

    def port(self, name: str) -> int:
        """The port on 127.0.0.1 where route ``name`` listens: what the services connect to."""
        return self.ports[name]

    def latency(self, name: str, seconds: float) -> None:
        self.command(f"latency {name} {float(seconds)!r}")

    def stall(self, name: str) -> None:
        self.command(f"stall {name}")

    def resume(self, name: str) -> None:
        self.command(f"resume {name}")

    def reset(self, name: str) -> None:
        self.command(f"reset {name}")

    def stats(self) -> dict[str, int]:
        """Each route's open connections."""
        pairs = (item.partition("=") for item in self.command("stats").split(","))
        return {name: int(count) for name, _, count in pairs}

    def command(self, line: str, timeout_s: float = 10.0) -> str:
        """Send one command line; return what follows ``ok`` in the answer (often nothing)."""
        stdin = self.process.stdin
        if stdin is None or stdin.closed or self.process.poll() is not None:
            raise self._gone()
        try:
            stdin.write(line.encode() + b"\n")
            stdin.flush()
        except OSError:
            raise self._gone() from None
        answer = self._read_line(timeout_s)
        if answer == "ok" or answer.startswith("ok "):
            return answer[3:]
        reason = answer.removeprefix("error ") if answer.startswith("error ") else f"the answer {answer!r}"
        raise FaultProxyError(f"fault proxy: {line!r}: {reason}")

    def close(self, timeout_s: float = 10.0) -> int:
        """Close stdin (the proxy closes its connections and exits), wait, and return its exit
        code; SIGKILL if it has not exited within ``timeout_s``. Closing twice is harmless."""
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):  # already gone: a broken pipe
                self.process.stdin.close()
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        return code

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _read_line(self, timeout_s: float) -> str:
        """The next line of the proxy's stdout. Read from the file descriptor, without Python's
        buffering, so that select() tells the truth and a mute proxy cannot hang the harness."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._received:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise FaultProxyError(
                    f"the fault proxy did not answer within {timeout_s} s (log: {self.log_path})"
                )
            chunk = os.read(fd, 4096)
            if not chunk:
                raise self._gone()
            self._received += chunk
        line, _, self._received = self._received.partition(b"\n")
        return line.decode()

    def _gone(self) -> FaultProxyError:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-5:]
        except OSError:
            tail = []
        return FaultProxyError(
            f"the fault proxy has exited (code {self.process.returncode}); {self.log_path} ends:\n"
            + "\n".join(tail)
        )


if __name__ == "__main__":
    sys.exit(main())
