"""scripts/devstack.py as the Makefile runs it: a subprocess, with its own ports and run directory."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import nats
import pytest
import redis.asyncio as redis

import devstack
from sendtime_common.event_log import JetStreamEventLog, JetStreamSettings, inbox_prefix

SCRIPT = devstack.ROOT / "scripts" / "devstack.py"
ADMIN_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", devstack.DEFAULT_TEST_DATABASE_URL)


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A run directory the ``postgres`` user can enter (pytest's tmp root is 0700 when we are root)."""
    path = Path(tempfile.mkdtemp(prefix="devstack-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def app_database() -> AsyncIterator[tuple[str, str]]:
    """The name and URL of a database ``up`` is to create on the admin PostgreSQL, dropped after
    the test (skipped where no PostgreSQL listens there)."""
    admin = urlsplit(ADMIN_DATABASE_URL)
    if not devstack.tcp_reachable(admin.hostname or "127.0.0.1", admin.port or 5432):
        pytest.skip(f"no PostgreSQL at {devstack.redact(ADMIN_DATABASE_URL)}: run `devstack.py ensure`")
    name = f"devstack_test_{uuid.uuid4().hex[:12]}"
    yield name, with_database(ADMIN_DATABASE_URL, name)
    conn = await asyncpg.connect(ADMIN_DATABASE_URL)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        await conn.close()


def cli(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), command],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def pids(run_dir: Path) -> dict[str, int]:
    return {path.stem: int(path.read_text()) for path in run_dir.glob("*.pid")}


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def test_up_starts_all_three_once_and_down_stops_them(run_dir: Path) -> None:
    ports = {name: devstack.free_port() for name in ("nats", "redis", "postgres")}
    env = {
        "SENDTIME_RUN_DIR": str(run_dir),
        "NATS_URL": f"nats://127.0.0.1:{ports['nats']}",
        "REDIS_URL": f"redis://127.0.0.1:{ports['redis']}/0",
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{ports['postgres']}/sendtime_devstack",
    }
    try:
        first = cli("up", env)
        assert first.returncode == 0, first.stderr
        started = pids(run_dir)
        assert set(started) == {"nats", "redis", "postgres"}

        conn = await asyncpg.connect(env["DATABASE_URL"])
        try:
            assert await conn.fetchval("SELECT current_database()") == "sendtime_devstack"
        finally:
            await conn.close()
        nc = await nats.connect(env["NATS_URL"])
        try:
            await nc.jetstream().account_info()
        finally:
            await nc.close()
        client = redis.from_url(env["REDIS_URL"])
        try:
            assert await client.ping()
        finally:
            await client.aclose()

        second = cli("up", env)
        assert second.returncode == 0, second.stderr
        assert "started" not in second.stdout.replace("started earlier", "")
        assert pids(run_dir) == started

        stopped = cli("down", env)
        assert stopped.returncode == 0, stopped.stderr
        assert "postgres" in stopped.stdout and "redis" in stopped.stdout and "nats" in stopped.stdout
        assert not any(devstack.tcp_reachable("127.0.0.1", port) for port in ports.values())
        assert pids(run_dir) == {}
        assert cli("down", env).stdout.strip() == "nothing to stop"
    finally:
        cli("down", env)


async def test_up_uses_what_is_already_reachable(
    run_dir: Path, nats_url: str, redis_url: str, app_database: tuple[str, str]
) -> None:
    name, database_url = app_database
    env = {
        "SENDTIME_RUN_DIR": str(run_dir),
        "NATS_URL": nats_url,
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
    }
    result = cli("up", env)
    assert result.returncode == 0, result.stderr
    assert "started" not in result.stdout
    assert f"created database {name}" in result.stdout
    assert pids(run_dir) == {}
    conn = await asyncpg.connect(env["DATABASE_URL"])
    await conn.close()

    assert cli("down", env).stdout.strip() == "nothing to stop"
    assert devstack.tcp_reachable("127.0.0.1", urlsplit(nats_url).port or 0)


def test_unreachable_remote_host_fails_cleanly(run_dir: Path) -> None:
    # 192.0.2.0/24 is TEST-NET-1: never routed, so nothing answers there.
    result = cli("up", {"SENDTIME_RUN_DIR": str(run_dir), "NATS_URL": "nats://192.0.2.1:4222"})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "devstack.py up: error: nats: nothing reachable at 192.0.2.1:4222, "
        "and devstack only starts local ones"
    )
    assert pids(run_dir) == {}


def test_ensure_finds_promtool_and_the_prometheus_server_beside_it() -> None:
    """`make test` runs promtool and Debian's prometheus from PATH: ensure's check finds them
    (and installs the package only when promtool is missing)."""
    assert devstack.require_promtool() == shutil.which("promtool")
    assert shutil.which("prometheus") is not None


def test_free_ports_are_outside_the_range_of_outgoing_connections() -> None:
    """A port from bind(0) can be taken by any outgoing connection before its server binds it."""
    low, high = devstack._ephemeral_port_range()
    ports = [devstack.free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(not low <= port <= high for port in ports)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_free_ports_go_above_an_ephemeral_range_that_starts_low(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("1024\t60999\n")
    monkeypatch.setattr(devstack, "_EPHEMERAL_PORTS", ranges)
    assert all(61_000 <= devstack.free_port() <= 65_535 for _ in range(20))


def test_a_port_something_listens_on_is_never_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", devstack.free_port()))
        listener.listen()
        taken = listener.getsockname()[1]
        devstack._handed_out_ports.discard(taken)
        choices = iter([taken, taken, taken + 1 if taken + 1 < 32_768 else taken - 1])
        monkeypatch.setattr(random, "choice", lambda _candidates: next(choices))
        assert devstack.free_port() != taken


async def test_up_runs_a_nats_cluster_when_asked_and_down_stops_every_server(
    run_dir: Path, redis_url: str, app_database: tuple[str, str]
) -> None:
    env = {
        "SENDTIME_RUN_DIR": str(run_dir),
        "NATS_URL": "",  # devstack's own NATS, a user per service
        "NATS_CLUSTER_NODES": "3",
        "REDIS_URL": redis_url,
        "DATABASE_URL": app_database[1],
    }
    try:
        first = cli("up", env)
        assert first.returncode == 0, first.stderr
        assert "a JetStream cluster of 3" in first.stdout
        servers = (run_dir / "nats.url").read_text().strip().split(",")
        server_pids = [int(pid) for pid in (run_dir / "nats.pid").read_text().split()]
        assert len(servers) == len(set(servers)) == 3 and len(server_pids) == 3
        assert devstack.nats_connection_env(env) == {"NATS_URL": ",".join(servers), "NATS_REPLICAS": "3"}

        # The profile service makes its streams there, on all three servers.
        settings = JetStreamSettings.from_env(
            {
                **devstack.nats_connection_env(env),
                "NATS_USER": "sendtime-profile",
                "NATS_PASSWORD": (run_dir / "secrets" / "nats-profile.password").read_text().strip(),
            }
        )
        await (await JetStreamEventLog.connect(settings)).close()
        client = await nats.connect(
            settings.servers,
            user=settings.user,
            password=settings.password,
            inbox_prefix=inbox_prefix(settings.user),
        )
        try:
            info = await client.jetstream().stream_info(settings.stream)
        finally:
            await client.close()
        assert info.config.num_replicas == 3
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2

        again = cli("up", env)
        assert again.returncode == 0, again.stderr
        assert "users reloaded" in again.stdout and "a cluster of 3" in again.stdout
        refused = cli("up", {**env, "NATS_CLUSTER_NODES": "1"})
        assert refused.returncode == 1 and "run `devstack.py down` first" in refused.stderr

        stopped = cli("down", env)
        assert stopped.returncode == 0 and "nats" in stopped.stdout, stopped.stderr
        assert not any(devstack.tcp_reachable("127.0.0.1", int(s.rpartition(":")[2])) for s in servers)
        assert not (run_dir / "nats.pid").exists() and not (run_dir / "nats.url").exists()
    finally:
        cli("down", env)


@pytest.mark.parametrize("value", ["2", "4", "0", "three", "11"])
def test_a_cluster_size_without_a_majority_to_lose_is_refused(value: str) -> None:
    with pytest.raises(devstack.DevstackError, match="NATS_CLUSTER_NODES must be 1, 3, 5, 7 or 9"):
        devstack.nats_cluster_nodes({"NATS_CLUSTER_NODES": value})
