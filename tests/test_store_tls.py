"""TLS to the stores is passed through as configured: NATS (``tls://`` and NATS_CA_FILE), Redis
(``rediss://`` with its ``ssl_ca_certs``) and PostgreSQL (``sslmode=verify-full`` with its
``sslrootcert``), each against a real server of the test's own serving TLS with a local CA."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

import devstack
import local_ca
from sendtime_common.database import create_pool
from sendtime_common.event_log import (
    EventLogUnavailable,
    JetStreamEventLog,
    JetStreamSettings,
    OutgoingMessage,
)


@pytest.fixture(scope="module")
def pki() -> Iterator[tuple[Path, Path, Path]]:
    """(CA, server certificate, key) for localhost, in a directory the postgres user can read."""
    directory = Path(tempfile.mkdtemp(prefix="sendtime-store-tls-"))
    directory.chmod(0o755)
    ca = local_ca.make_ca("store tls test")
    ca.write(directory / "ca.crt", directory / "ca.key")
    local_ca.issue(ca, local_ca.LOCAL_SERVER_NAMES, server=True, client=False).write(
        directory / "server.crt", directory / "server.key"
    )
    yield directory / "ca.crt", directory / "server.crt", directory / "server.key"
    shutil.rmtree(directory, ignore_errors=True)


async def test_nats_over_tls_with_the_ca_given(
    pki: tuple[Path, Path, Path], tmp_path: Path, unique: str
) -> None:
    ca, cert, key = pki
    port = devstack.free_port()
    process = devstack.start_nats(port, tmp_path / "nats", tls=(cert, key))
    try:
        settings = JetStreamSettings(
            url=f"tls://localhost:{port}",
            ca_file=str(ca),
            stream=f"TLS_{unique}",
            subject_prefix=f"tls.{unique}",
        )
        log = await JetStreamEventLog.connect(settings)
        try:
            receipt = await log.publish(OutgoingMessage(key="identify", message_id=unique, payload=b"{}"))
            assert receipt.sequence == 1
        finally:
            await log.close()
        with pytest.raises(EventLogUnavailable):  # the system's roots do not trust the local CA
            await JetStreamEventLog.connect(replace(settings, ca_file=""))
    finally:
        devstack.stop_process(process)


async def test_redis_over_tls_with_rediss(pki: tuple[Path, Path, Path], tmp_path: Path) -> None:
    ca, cert, key = pki
    port = devstack.free_port()
    process = devstack.start_redis(port, tmp_path / "redis", tls=(cert, key, ca))
    try:
        async with Redis.from_url(f"rediss://localhost:{port}/0?ssl_ca_certs={ca}") as client:
            assert await client.ping()
        async with Redis.from_url(f"rediss://localhost:{port}/0") as untrusting:
            with pytest.raises(RedisConnectionError):
                await untrusting.ping()
    finally:
        devstack.stop_process(process)


async def test_postgres_over_tls_with_verify_full(pki: tuple[Path, Path, Path]) -> None:
    ca, cert, key = pki
    workdir = Path(tempfile.mkdtemp(prefix="sendtime-pg-tls-"))
    workdir.chmod(0o755)
    port = devstack.free_port()
    devstack.start_postgres(port, workdir, ssl=(cert, key))
    try:
        pool = await create_pool(
            f"postgresql://postgres@localhost:{port}/postgres?sslmode=verify-full&sslrootcert={ca}",
            min_size=1,
            max_size=1,
        )
        try:
            assert await pool.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        finally:
            await pool.close()
    finally:
        devstack.stop_postgres(workdir)
        shutil.rmtree(workdir, ignore_errors=True)
