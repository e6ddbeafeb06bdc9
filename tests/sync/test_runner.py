"""sync.runner, sync.ingest_sink and sync.store together: a HubSpot pull (the local HubSpot of
tests/sync/hubspot_server.py) into the real ingest service, its cursor in PostgreSQL; a run that
fails part way keeps what ingest answered and the next one goes on from there with no gap and
nothing applied twice; a refused record is counted and passed over; ingest away ends the run."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest

from sendtime.ingest.v1 import ingest_pb2_grpc
from sendtime_common.migrate import migrate
from sync.hubspot import ContactsPage, HubSpotContacts
from sync.ingest_sink import IngestSink
from sync.provider_http import OAuthRefreshToken, ProviderApi, ProviderLimits, ProviderUnavailable
from sync.runner import Pull, fetched_ahead, retry_delay_s, run_pull
from sync.store import MIGRATIONS_DIR, MIGRATIONS_TABLE, ConnectorStore
from tests.conftest import empty_database
from tests.sync.hubspot_server import HubSpotServer
from tests.sync.provider_server import Scripted

T0 = 1_796_000_000_000
# Ingest keeps every event id it stored for the whole session: each test's contact versions
# are its own (another payload under a stored id would be a CONFLICT).
_FIRST_MS = -random.Random().randrange(1, 10**6) * 1000  # up to 12 days before T0 (ingest refuses the future)
LIMITS = ProviderLimits(requests=100, per_s=1.0, backoff_initial_s=0.02, backoff_max_s=0.1, attempts=2)


@pytest.fixture
async def store() -> AsyncIterator[ConnectorStore]:
    async with empty_database("sync_test") as url:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        await migrate(pool, MIGRATIONS_DIR, MIGRATIONS_TABLE)
        yield ConnectorStore(pool)
        await pool.close()


@pytest.fixture
def t0() -> int:
    global _FIRST_MS
    _FIRST_MS += 10_000  # ten seconds apart: a test's contacts are milliseconds apart
    return T0 + _FIRST_MS


@pytest.fixture
async def hubspot() -> AsyncIterator[HubSpotServer]:
    server = await HubSpotServer(searches_per_s=100).start()
    yield server
    await server.stop()


@pytest.fixture
async def contacts(hubspot: HubSpotServer) -> AsyncIterator[HubSpotContacts]:
    credentials = OAuthRefreshToken(
        hubspot.token_url, hubspot.client_id, hubspot.client_secret, hubspot.refresh_token
    )
    api = ProviderApi("hubspot", hubspot.url, credentials, LIMITS)
    yield HubSpotContacts(api, page_size=10, lookback_s=0)
    await api.aclose()


def _add(hubspot: HubSpotServer, run: str, count: int, start_ms: int) -> None:
    for i in range(count):
        hubspot.upsert(i + 1, start_ms + i, firstname=f"n{i}", email=f"{run}-{i}@example.com")


async def test_a_run_hands_every_change_to_ingest_and_keeps_the_newest_cursor(
    hubspot: HubSpotServer,
    contacts: HubSpotContacts,
    store: ConnectorStore,
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    unique: str,
    t0: int,
) -> None:
    _add(hubspot, unique, 25, t0)
    report = await run_pull("hubspot", contacts.pull, IngestSink(ingest_stub), store, interval_s=300)
    assert (report.error, report.pages, report.records, report.accepted) == ("", 3, 25, 25)
    state = await store.load("hubspot")
    assert state.cursor == {"lastmodified_ms": t0 + 24}
    assert (state.records_total, state.events_total, state.consecutive_failures) == (25, 25, 0)
    assert state.last_success_at is not None and state.next_run_at is not None
    assert timedelta(seconds=290) < state.next_run_at - datetime.now(UTC) <= timedelta(seconds=300)

    # Nothing changed: the next run reads the newest contact again (the search is inclusive).
    again = await run_pull("hubspot", contacts.pull, IngestSink(ingest_stub), store, interval_s=300)
    assert (again.records, again.accepted, again.duplicates) == (1, 0, 1)


async def test_a_run_failing_part_way_is_taken_up_from_the_last_page_ingest_answered(
    hubspot: HubSpotServer,
    contacts: HubSpotContacts,
    store: ConnectorStore,
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    unique: str,
    t0: int,
) -> None:
    _add(hubspot, unique, 30, t0)
    sink = IngestSink(ingest_stub)
    # Two pages, then HubSpot fails the third page's search past the retries.
    first = await run_pull("hubspot", _failing_after(hubspot, contacts, 2), sink, store, interval_s=300)
    assert first.error.startswith("ProviderUnavailable: hubspot: HTTP 502")
    assert (first.pages, first.accepted) == (2, 20)
    state = await store.load("hubspot")
    assert state.cursor == {"lastmodified_ms": t0 + 19} and state.consecutive_failures == 1
    assert "HTTP 502" in state.last_error and state.last_failure_at is not None

    second = await run_pull("hubspot", contacts.pull, sink, store, interval_s=300)
    assert second.error == ""
    # from the kept cursor: its own contact again (a duplicate), then the ten not yet sent
    assert (second.records, second.accepted, second.duplicates) == (11, 10, 1)
    assert (await store.load("hubspot")).consecutive_failures == 0


def _failing_after(hubspot: HubSpotServer, contacts: HubSpotContacts, pages: int) -> Pull:
    """The pull, but HubSpot fails its searches (502, every retry) once ``pages`` pages were
    taken (stored, when the runner asks for the next one)."""

    async def pull(cursor: Any) -> AsyncIterator[ContactsPage]:
        taken = 0
        async for page in contacts.pull(cursor):
            yield page
            taken += 1
            if taken == pages:
                hubspot.script.extend(Scripted(502) for _ in range(LIMITS.attempts))

    return pull


async def test_a_record_ingest_refuses_is_counted_and_the_run_goes_on(
    hubspot: HubSpotServer,
    contacts: HubSpotContacts,
    store: ConnectorStore,
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    unique: str,
    t0: int,
) -> None:
    hubspot.upsert(1, t0, firstname="Ada", email=f"{unique}-ada@example.com")
    hubspot.upsert(2, t0 + 1, firstname="Bo", email="not an address")
    hubspot.upsert(3, t0 + 2, firstname="Cy", email=f"{unique}-cy@example.com")
    report = await run_pull("hubspot", contacts.pull, IngestSink(ingest_stub), store, interval_s=300)
    assert (report.error, report.accepted, report.refused) == ("", 2, 1)
    state = await store.load("hubspot")
    assert state.cursor == {"lastmodified_ms": t0 + 2} and state.rejected_total == 1


async def test_ingest_away_ends_the_run_and_keeps_the_cursor(
    hubspot: HubSpotServer, contacts: HubSpotContacts, store: ConnectorStore, unique: str, t0: int
) -> None:
    _add(hubspot, unique, 5, t0)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as nowhere:
        sink = IngestSink(
            ingest_pb2_grpc.IngestServiceStub(nowhere), retry_budget_s=0.5, backoff_initial_s=0.05
        )
        report = await run_pull("hubspot", contacts.pull, sink, store, interval_s=60)
    assert report.error.startswith("IngestUnavailable: SendEvents UNAVAILABLE")
    state = await store.load("hubspot")
    assert state.cursor is None and state.consecutive_failures == 1
    assert state.next_run_at is not None and state.next_run_at - datetime.now(UTC) < timedelta(seconds=67)


async def test_an_answer_not_in_the_providers_shape_fails_the_run_for_later(
    hubspot: HubSpotServer,
    contacts: HubSpotContacts,
    store: ConnectorStore,
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
) -> None:
    hubspot.script.append(Scripted(200, body=b"<html>maintenance</html>"))
    report = await run_pull("hubspot", contacts.pull, IngestSink(ingest_stub), store, interval_s=60)
    assert report.error == "malformed answer from the provider: JSONDecodeError"
    state = await store.load("hubspot")
    assert state.consecutive_failures == 1 and state.cursor is None
    # not due again at once: a provider answering garbage is not asked again every poll
    assert state.next_run_at is not None and state.next_run_at - datetime.now(UTC) > timedelta(seconds=50)


async def test_a_bug_in_a_run_is_logged_with_an_id_and_fails_the_run_for_later(
    store: ConnectorStore,
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(cursor: Any) -> AsyncIterator[ContactsPage]:
        raise RuntimeError("a bug, with data in its message: ada@example.com")
        yield  # an async generator

    report = await run_pull("broken", broken, IngestSink(ingest_stub), store, interval_s=60)
    assert report.error.startswith("internal error ")
    (record,) = [r for r in caplog.records if r.getMessage() == "connector run failed unexpectedly"]
    assert record.error_id == report.error.removeprefix("internal error ")  # type: ignore[attr-defined]
    assert "ada@" not in record.getMessage() and record.exception == "builtins.RuntimeError"  # type: ignore[attr-defined]
    assert (await store.load("broken")).consecutive_failures == 1


def test_a_failing_connector_is_tried_again_later_each_time_with_jitter() -> None:
    rng = random.Random(1)
    delays = [retry_delay_s(60, failures, rng) for failures in (1, 2, 3, 5, 9)]
    for delay, expected in zip(delays, (60, 120, 240, 960, 960), strict=True):
        assert 0.9 * expected <= delay <= 1.1 * expected


async def test_the_next_page_is_fetched_while_this_one_is_sent_and_its_failure_comes_after() -> None:
    log: list[str] = []

    async def pages() -> AsyncIterator[ContactsPage]:
        for n in range(3):
            log.append(f"fetch {n}")
            if n == 2:
                raise ProviderUnavailable("hubspot", "503", 503)
            yield ContactsPage(events=[], records=0, cursor_ms=n)

    handed: list[int] = []
    with pytest.raises(ProviderUnavailable):
        async for page in fetched_ahead(pages()):
            assert isinstance(page, ContactsPage)
            await asyncio.sleep(0)  # sending it to ingest: the next fetch goes meanwhile
            log.append(f"sent {page.cursor_ms}")
            handed.append(page.cursor_ms)
    assert log == ["fetch 0", "fetch 1", "sent 0", "fetch 2", "sent 1"]
    assert handed == [0, 1]  # page 1 was handed on before page 2's failure surfaced
