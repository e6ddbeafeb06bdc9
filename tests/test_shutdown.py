"""A service's stop is bounded (sendtime_common.shutdown): with an HTTP request that holds a
database connection and never ends, whether its client still waits for the answer or has gone
(aiohttp then leaves the handler running), and with an idle keep-alive client connected, a
stop returns within its grace period plus STOP_MARGIN_S and leaves no connection open: not to
PostgreSQL, not to the HTTP port.

Before the bound, the stop took twice the settings' grace period for the waiting client
(aiohttp's shutdown waits twice its own timeout, whatever grace the stop was given), and never
ended for the client that had gone: asyncpg's Pool.close() waits for every connection to be
released, and nothing cancelled that handler.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

import ingest.servicer
from ingest.server import IngestApp
from ingest.server import create_app as create_ingest_app
from ingest.settings import Settings as IngestSettings
from sendtime_common.event_log import JetStreamSettings
from sendtime_common.shutdown import STOP_MARGIN_S
from tests.conftest import ADMIN_DATABASE_URL, LOCAL_SERVER, empty_database
from tests.keys import issue_key

GRACE_S = 1.0
# Where a stop says what it had to cut short (sendtime_common.shutdown's bounded steps, the
# pool's termination, the gRPC and HTTP drains).
SHUTDOWN_LOGGERS = {
    "sendtime_common.shutdown",
    "sendtime_common.database",
    "sendtime_common.grpc_server",
    "sendtime_common.http_server",
}


class HeldConnection:
    """Stands in for GetIngestStats: takes a pool connection and never gives it back."""

    def __init__(self) -> None:
        self.app: IngestApp | None = None
        self.holding = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def handle(self, request: Any, context: Any) -> Any:
        assert self.app is not None
        async with self.app.pool.acquire() as connection:
            await connection.execute("SELECT 1")
            self.holding.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise


@pytest.fixture
async def own_database() -> AsyncIterator[str]:
    """A database only the app under test connects to, so its connections can be counted."""
    async with empty_database("sendtime_shutdown") as url:
        yield url


async def server_connections(database_url: str) -> int:
    name = database_url.rpartition("/")[2]
    admin = await asyncpg.connect(ADMIN_DATABASE_URL)
    try:
        count: int = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", name
        )
        return count
    finally:
        await admin.close()


async def send(port: int, path: str, key: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"GET {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\nConnection: keep-alive\r\n"
    writer.write(f"{head}\r\n".encode())
    await writer.drain()
    return reader, writer


@pytest.mark.parametrize("client_stays", [True, False], ids=["client-waiting", "client-gone"])
async def test_a_service_stops_within_its_grace_with_a_request_holding_a_database_connection(
    client_stays: bool,
    own_database: str,
    nats_url: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    key = await issue_key(own_database)
    held = HeldConnection()
    monkeypatch.setattr(
        ingest.servicer.IngestServicer,
        "GetIngestStats",
        lambda servicer, request, context: held.handle(request, context),
    )
    app = await create_ingest_app(
        IngestSettings(
            **LOCAL_SERVER,
            database_url=own_database,
            redis_url=redis_url,
            event_log=JetStreamSettings(url=nats_url),
            shutdown_grace_s=30,  # the stop's own grace must be the one that counts
        )
    )
    held.app = app
    await app.start()
    assert app.grpc.http is not None
    port = app.grpc.http.port
    idle_reader, idle_writer = await send(port, "/healthz", key)  # answered, then kept alive
    assert b"200 OK" in await idle_reader.readuntil(b"\r\n\r\n")
    await idle_reader.readuntil(b"}")
    reader, writer = await send(port, "/v1/ingestStats", key)
    await asyncio.wait_for(held.holding.wait(), 10)
    if not client_stays:
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.1)
    assert app.grpc.http.requests_in_progress == 1

    caplog.clear()
    started = time.monotonic()
    await asyncio.wait_for(app.stop(GRACE_S), GRACE_S + STOP_MARGIN_S + 5)  # a hang fails, not waits
    took = time.monotonic() - started

    assert GRACE_S <= took < GRACE_S + STOP_MARGIN_S
    # Nothing else was stuck: only the request had to be cancelled. Whatever a stop cuts short
    # (a step timed out, work or calls cancelled, handlers or connections left) is logged by
    # the shutdown machinery; that request's cancellation was all it logged.
    cut_short = [
        (r.getMessage(), getattr(r, "requests", None))
        for r in caplog.records
        if r.name in SHUTDOWN_LOGGERS and r.levelno >= logging.WARNING
    ]
    assert cut_short == [("HTTP: requests still in progress after the grace period, cancelled", 1)]
    assert held.cancelled.is_set()
    assert app.grpc.http.requests_in_progress == 0
    assert app.pool.is_closing() and app.pool.get_size() == 0
    assert await asyncio.wait_for(idle_reader.read(), 10) == b""  # the keep-alive connection closed
    idle_writer.close()
    if client_stays:
        assert await asyncio.wait_for(reader.read(), 10) == b""  # no answer: the request was cancelled
        writer.close()
    deadline = time.monotonic() + 30
    while (left := await server_connections(own_database)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # a terminated connection leaves PostgreSQL a moment later
    assert left == 0
