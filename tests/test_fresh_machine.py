"""`make demo` as a newcomer runs it: as root, with a run dir under a directory only root may enter
(a clone under /root), on a machine where nothing listens (a network namespace of its own,
`unshare -n`). However it ends, nothing it started is left running or listening, and what was
running before still is."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import devstack
import suite

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="root only: unshare -n, and PostgreSQL started as the postgres user"
)

SUITE = str(devstack.ROOT / "scripts" / "suite.py")
LISTEN = "0A"  # the TCP state in /proc/net/tcp


class Namespace:
    """A network namespace with only loopback (up), kept alive by a `sleep` of its own."""

    def __init__(self) -> None:
        self.holder = subprocess.Popen(
            ["unshare", "--net", "--", "sh", "-c", "ip link set lo up && echo up && exec sleep infinity"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.holder.stdout is not None and self.holder.stdout.readline() == "up\n"
        self.path = f"/proc/{self.holder.pid}/ns/net"
        self.inode = os.readlink(self.path)

    def command(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def listening(self) -> list[str]:
        """Local addresses with a listening TCP socket in the namespace (hex, as the kernel lists)."""
        found = []
        for table in ("tcp", "tcp6"):
            for line in Path(f"/proc/{self.holder.pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == LISTEN:
                    found.append(fields[1])
        return found

    def processes(self) -> dict[int, str]:
        """Every process in the namespace but its holder: its command line."""
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == self.holder.pid:
                continue
            try:
                if os.readlink(entry / "ns" / "net") == self.inode:
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:  # gone meanwhile, or a zombie (no namespaces left)
                continue
        return found

    def wait_listening(self, count: int, timeout_s: float = 10) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.listening()) < count:
            assert time.monotonic() < deadline, f"fewer than {count} listening after {timeout_s}s"
            time.sleep(0.05)

    def assert_empty(self, but: dict[int, str] | None = None) -> None:
        """Nothing runs and nothing listens in the namespace, except ``but`` (which must still run).
        A server stopped with a wait (pg_ctl stop -w) may take a moment more to leave the
        process table after it has released everything."""
        expected = but or {}
        deadline = time.monotonic() + 2
        while self.processes() != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.processes() == expected
        assert len(self.listening()) == len(expected)

    def close(self) -> None:
        for pid in self.processes():  # only a failed test leaves any
            os.kill(pid, signal.SIGKILL)
        self.holder.kill()
        self.holder.wait()
        if self.holder.stdout is not None:
            self.holder.stdout.close()


@pytest.fixture(scope="module")
def namespace() -> Iterator[Namespace]:
    ns = Namespace()
    try:
        yield ns
    finally:
        ns.close()


@pytest.fixture(scope="module")
def closed_run_dir() -> Iterator[Path]:
    """A run dir under a 0700 directory, as .run is in a clone under /root; its PostgreSQL
    cluster (kept between the tests, as between runs) deleted after."""
    checkout = Path(tempfile.mkdtemp(prefix="sendtime-newcomer-"))
    assert checkout.stat().st_mode & 0o777 == 0o700
    run_dir = checkout / ".run"
    try:
        yield run_dir
    finally:
        devstack.remove_postgres_dir(run_dir)
        shutil.rmtree(checkout)


def newcomer_env(run_dir: Path, **settings: str) -> dict[str, str]:
    """A newcomer's environment: none of the URL or address settings, only what make exports."""
    return {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "PYTHONPATH": suite.PYTHONPATH,
        "SENDTIME_RUN_DIR": str(run_dir),
        **settings,
    }


def demo(ns: Namespace, run_dir: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    """`make demo`'s command, in the namespace."""
    return subprocess.run(
        ns.command(sys.executable, SUITE, "demo"),
        env=newcomer_env(run_dir, **settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_demo_works_from_a_checkout_the_postgres_user_cannot_enter(
    namespace: Namespace, closed_run_dir: Path
) -> None:
    namespace.assert_empty()

    result = demo(namespace, closed_run_dir)

    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert "demo worked" in result.stdout
    assert "stopped: postgres, redis, nats" in result.stdout
    namespace.assert_empty()
    # The cluster lives where its user can reach it, the run dir links there, and the checkout
    # was not opened up for it.
    link = closed_run_dir / "postgres"
    cluster = devstack.postgres_dir(closed_run_dir)
    assert link.is_symlink() and cluster.parent == devstack.POSTGRES_STATE_ROOT
    assert (cluster / "data" / "PG_VERSION").exists()
    postgres_uid = pwd.getpwnam("postgres").pw_uid
    assert (cluster.stat().st_uid, cluster.stat().st_mode & 0o777) == (postgres_uid, 0o700)
    assert closed_run_dir.parent.stat().st_mode & 0o777 == 0o700


def test_a_service_that_fails_to_start_stops_what_the_demo_started_and_only_that(
    namespace: Namespace, closed_run_dir: Path
) -> None:
    namespace.assert_empty()
    already_running = subprocess.Popen(  # the machine's own Redis, there before the demo
        namespace.command("redis-server", "--bind", "127.0.0.1", "--port", "6379", "--save", ""),
        stdout=subprocess.DEVNULL,
    )
    try:
        namespace.wait_listening(1)
        redis_only = namespace.processes()

        result = demo(namespace, closed_run_dir, RENDER_RECOMMENDATION_LIMIT="many")

        assert result.returncode == 1
        assert "redis:    using 127.0.0.1:6379 (already listening)" in result.stdout
        assert "profile: serving" in result.stdout and "ingest:  serving" in result.stdout
        assert "stopped: postgres, nats" in result.stdout
        assert result.stderr.startswith("suite.py demo: failed: render exited with 1:")
        assert "RENDER_RECOMMENDATION_LIMIT must be an integer, got 'many'" in result.stderr
        namespace.assert_empty(but=redis_only)
    finally:
        devstack.stop_process(already_running)
    namespace.assert_empty()


def test_dependencies_failing_midway_stop_the_ones_already_started(
    namespace: Namespace, closed_run_dir: Path
) -> None:
    namespace.assert_empty()

    # NATS and Redis start, then PostgreSQL cannot: TEST-NET-1 is never routed.
    result = demo(namespace, closed_run_dir, DATABASE_URL="postgresql://postgres@192.0.2.1/sendtime")

    assert result.returncode == 1
    assert "not ready: stopping what this start began (nats, redis)" in result.stdout
    assert result.stderr.strip() == (
        "suite.py demo: failed: postgres: nothing reachable at 192.0.2.1:5432, "
        "and devstack only starts local ones"
    )
    namespace.assert_empty()


def _ctrl_c_as_in_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_while_the_services_start_stops_everything(namespace: Namespace, closed_run_dir: Path) -> None:
    namespace.assert_empty()
    process = subprocess.Popen(
        namespace.command(sys.executable, SUITE, "run"),
        env=newcomer_env(closed_run_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A test run started in the background of a script has SIGINT ignored, and a child
        # inherits that: Ctrl-C as a terminal sends it is what is tested here.
        preexec_fn=_ctrl_c_as_in_a_terminal,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:  # nsenter execs: process.pid is suite.py's
            if line.startswith("profile: serving"):
                process.send_signal(signal.SIGINT)  # while ingest starts
                break
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert stderr.strip() == "suite.py run: interrupted; what it started has been stopped"
    namespace.assert_empty()


def test_clean_stops_and_deletes_the_cluster_kept_outside_the_run_dir(
    namespace: Namespace, closed_run_dir: Path
) -> None:
    script = str(devstack.ROOT / "scripts" / "devstack.py")

    def devstack_cli(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            namespace.command(sys.executable, script, command),
            env=newcomer_env(closed_run_dir),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    started = devstack_cli("ensure")  # `make test`'s: PostgreSQL started and left running
    assert started.returncode == 0, started.stderr
    cluster = devstack.postgres_dir(closed_run_dir)
    assert cluster.parent == devstack.POSTGRES_STATE_ROOT and len(namespace.listening()) == 1

    cleaned = devstack_cli("clean")

    assert cleaned.returncode == 0, cleaned.stderr
    assert cleaned.stdout.splitlines() == ["stopped: postgres", f"deleted {cluster}"]
    assert not cluster.exists() and not (closed_run_dir / "postgres").is_symlink()
    namespace.assert_empty()
