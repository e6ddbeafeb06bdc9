"""Cursors are durable: the sync service as a process of its own (``python -m sync``), killed
with SIGKILL in the middle of a HubSpot pull and started again with the same configuration,
resumes the connector from its stored cursor (``sync_connectors.cursor``) with no gap (every
contact became one event in ingest's event log, and its traits are in its profile) and no
double apply (ingest stored each event id once and answered the ones sent again DUPLICATE; each
profile applied its one event once). docs/connectors.md, "A pull run".

The local HubSpot runs in this process and answers each search a little late, so that the run
(30 pages) is still under way when the kill comes; ingest and profile are the session's
in-process services, which the process reaches over gRPC with a key of its own (events.write),
through the chaos harness's fault proxy (scripts/fault_proxy.py). Once the cursor has passed a
third of the contacts, the proxy delays the next page on its way to ingest and back, and the
kill comes as soon as ingest has stored that page, before the process can have heard so: the
kept cursor must stop short of that page (a cursor written before ingest's answer fails here),
and the page, sent again, must not be applied again. The connector has no lookback: what it
reads again is only what its cursor says, not a window that could hide a cursor kept too far.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import nats
import orjson
import pytest
from fault_proxy import FaultProxy
from google.protobuf import field_mask_pb2
from prometheus_client import REGISTRY

from ingest.server import IngestApp
from sendtime.ingest.v1 import ingest_pb2
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime_common.auth.api_keys import Scope
from sendtime_common.event_log import JetStreamSettings
from tests.conftest import eventually, local_env, repo_root
from tests.keys import issue_key
from tests.sync.hubspot_server import HubSpotServer

CONTACTS = 300
PAGE_SIZE = 10
# A page takes a little over this (the next page is fetched while one is sent): a run of 30 pages
# ~4 s, time enough to see the cursor move and kill the process before the run ends.
SEARCH_DELAY_S = 0.1
# The page the kill comes in: held this long on its way to ingest, and its answer on the way back.
INGEST_LATENCY_S = 0.5


@dataclass(frozen=True, slots=True)
class Contact:
    contact_id: int
    modified_ms: int
    traits: dict[str, str]

    @property
    def event_id(self) -> str:
        return f"hubspot-contact:{self.contact_id}:{self.modified_ms}"


@dataclass(frozen=True, slots=True)
class SyncProcess:
    """One ``python -m sync`` of the test's own. Its PostgreSQL sessions carry its name (as
    their application_name), so the test can tell when the last of them has ended."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def check_running(self) -> None:
        assert self.process.poll() is None, (
            f"{self.name} exited with {self.process.returncode}:\n{self.log_path.read_text()[-3000:]}"
        )


StartSync = Callable[[], SyncProcess]


@pytest.fixture
async def hubspot() -> AsyncIterator[HubSpotServer]:
    server = await HubSpotServer(searches_per_s=100, answer_delay_s=SEARCH_DELAY_S).start()
    yield server
    await server.stop()


@pytest.fixture
def ingest_proxy(ingest_app: IngestApp, tmp_path: Path) -> Iterator[FaultProxy]:
    """The fault proxy between the sync processes and ingest (route ``ingest``)."""
    with FaultProxy.start({"ingest": ("127.0.0.1", ingest_app.grpc.port)}, tmp_path) as proxy:
        yield proxy


@pytest.fixture
async def sync_env(
    hubspot: HubSpotServer,
    ingest_proxy: FaultProxy,
    database_url: str,
    nats_url: str,
    redis_url: str,
    tmp_path: Path,
    unique: str,
) -> dict[str, str]:
    """The environment of the sync processes: the test's databases, ingest in this process
    (through the proxy), and one connector, ``crash-<unique>``, pulling from the local HubSpot."""
    connectors = tmp_path / "connectors.json"
    connector = {
        "id": f"crash-{unique}",
        "kind": "hubspot_contacts",
        "interval_s": 3600,
        "base_url": hubspot.url,
        "auth": {
            "oauth_refresh_token": {
                "token_url": hubspot.token_url,
                "client_id": hubspot.client_id,
                "client_secret_env": "HUBSPOT_CLIENT_SECRET",
                "refresh_token_env": "HUBSPOT_REFRESH_TOKEN",
            }
        },
        "rate": {"requests": 100, "per_s": 1},  # the fake's delay sets the pace, not the limiter
        "options": {"page_size": PAGE_SIZE, "lookback_s": 0},
    }
    connectors.write_bytes(orjson.dumps({"connectors": [connector]}))
    root = repo_root()
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(root / path) for path in ("gen/python", "libs", "services")),
        **local_env(
            "SYNC",
            DATABASE_URL=database_url,
            REDIS_URL=redis_url,
            NATS_URL=nats_url,
            INGEST_SERVICE_TARGET=f"127.0.0.1:{ingest_proxy.port('ingest')}",
            INGEST_SERVICE_PLAINTEXT="true",
            INGEST_SERVICE_API_KEY=await issue_key(
                database_url, [Scope.EVENTS_WRITE], "tests: sync to ingest"
            ),
            SYNC_CONNECTORS_FILE=str(connectors),
            SYNC_POLL_SECONDS="0.1",
            HUBSPOT_CLIENT_SECRET=hubspot.client_secret,
            HUBSPOT_REFRESH_TOKEN=hubspot.refresh_token,
            SHUTDOWN_GRACE_SECONDS="1",
        ),
    }


@pytest.fixture
def start_sync(sync_env: dict[str, str], tmp_path: Path) -> Iterator[StartSync]:
    """Start a sync process (``start_sync()``), logging to the test's directory; every process
    started is killed after the test, whatever became of it."""
    started: list[SyncProcess] = []

    def start() -> SyncProcess:
        name = f"sync-crash-{len(started)}"
        log_path = tmp_path / f"{name}.log"
        env = {**sync_env, "DATABASE_URL": f"{sync_env['DATABASE_URL']}?application_name={name}"}
        with open(log_path, "wb") as log:  # the child keeps its own copy
            process = subprocess.Popen(
                [sys.executable, "-m", "sync"],
                env=env,
                cwd=repo_root(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        started.append(SyncProcess(name, process, log_path))
        return started[-1]

    try:
        yield start
    finally:
        for sync in started:
            if sync.process.poll() is None:
                sync.process.kill()
            sync.process.wait(10)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(database_url, min_size=1, max_size=2) as created:
        yield created


def _load_contacts(hubspot: HubSpotServer, unique: str) -> list[Contact]:
    """CONTACTS contacts of this test's own (ids apart from any other test's), one person each,
    modified a second apart within the last hour (ingest refuses times in the future)."""
    first_id = random.randrange(10**12)
    first_ms = int(time.time() * 1000) - 3_600_000
    contacts = []
    for i in range(CONTACTS):
        contact = Contact(first_id + i, first_ms + i * 1000, {"first_name": f"Ada-{i}", "last_name": f"L{i}"})
        hubspot.upsert(
            contact.contact_id,
            contact.modified_ms,
            email=f"{unique}-{i}@example.com",
            firstname=contact.traits["first_name"],
            lastname=contact.traits["last_name"],
        )
        contacts.append(contact)
    return contacts


async def _connector(pool: asyncpg.Pool, connector_id: str) -> asyncpg.Record | None:
    """The connector's stored state; None before the service has stored any (or made its table)."""
    try:
        return await pool.fetchrow(
            "SELECT (cursor->>'lastmodified_ms')::bigint AS cursor_ms, last_success_at, last_error,"
            " records_total, events_total, rejected_total FROM sync_connectors WHERE connector_id = $1",
            connector_id,
        )
    except asyncpg.UndefinedTableError:  # a database no sync service has migrated yet
        return None


async def _sessions_of(pool: asyncpg.Pool, sync: SyncProcess) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", sync.name
    )
    return count


async def _log_end(nats_url: str) -> int:
    """The sequence number of the newest message in ingest's event log."""
    client = await nats.connect(nats_url)
    try:
        return int((await client.jetstream().stream_info(JetStreamSettings().stream)).state.last_seq)
    finally:
        await client.close()


async def _logged_events(nats_url: str, after: int) -> list[tuple[int, ingest_pb2.Event]]:
    """The events ingest stored in its event log after the sequence number ``after``, each with
    its sequence number."""
    client = await nats.connect(nats_url)
    try:
        js = client.jetstream()
        end = int((await js.stream_info(JetStreamSettings().stream)).state.last_seq)
        events = []
        for seq in range(after + 1, end + 1):
            stored = await js.get_msg(JetStreamSettings().stream, seq)
            assert stored.data is not None
            events.append((seq, ingest_pb2.Event.FromString(stored.data)))
        return events
    finally:
        await client.close()


def _crm_answers(outcome: str) -> float:
    """Ingest's count (in this process) of CRM events answered ``outcome``."""
    labels = {"source": "crm", "outcome": outcome, "reason": ""}
    return REGISTRY.get_sample_value("sendtime_ingest_events_total", labels) or 0.0


async def _until(ready: Callable[[], bool], sync: SyncProcess, timeout_s: float = 5) -> None:
    """Return once ``ready`` (a look at something in this process: no I/O), looking every
    millisecond while ``sync`` runs. The local HubSpot and ingest run in this event loop: this
    sees what they have just done before they can do more (the next timer due is this one's)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not ready():
        sync.check_running()
        assert asyncio.get_running_loop().time() < deadline, "not within the time"
        await asyncio.sleep(0.001)


async def test_a_connector_killed_mid_run_resumes_from_its_cursor_with_no_gap_and_no_double_apply(
    hubspot: HubSpotServer,
    ingest_proxy: FaultProxy,
    start_sync: StartSync,
    pool: asyncpg.Pool,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    nats_url: str,
    unique: str,
) -> None:
    started = time.monotonic()
    contacts = _load_contacts(hubspot, unique)
    newest_ms = contacts[-1].modified_ms
    connector_id = f"crash-{unique}"
    log_start = await _log_end(nats_url)
    accepted_before, duplicates_before = _crm_answers("accepted"), _crm_answers("duplicate")

    # The first process: killed once its cursor has passed a third of the contacts, in a page
    # ingest has stored and whose cursor the process has not kept.
    first = start_sync()

    async def cursor_past_a_third() -> bool | None:
        first.check_running()
        row = await _connector(pool, connector_id)
        if row is None:
            return None
        assert not row["last_error"], row["last_error"]
        return (row["cursor_ms"] or 0) >= contacts[CONTACTS // 3].modified_ms or None

    await eventually(cursor_past_a_third, timeout_s=60)  # a cold start of python -m sync included
    # A new search has come, not yet answered (SEARCH_DELAY_S): its page will go to ingest
    # through the proxy delayed, and its answer come back delayed. (The process fetches a page
    # while it sends the one before, which may go either way.) Once ingest has counted that
    # page, which it does before answering, the process cannot have kept the page's cursor.
    searches = len(hubspot.searches)
    await _until(lambda: len(hubspot.searches) > searches, first)
    ingest_proxy.latency("ingest", INGEST_LATENCY_S)
    held_from = int(hubspot.searches[searches].get("after", 0))  # the page's first contact
    await _until(lambda: _crm_answers("accepted") - accepted_before >= held_from + PAGE_SIZE, first)
    os.kill(first.process.pid, signal.SIGKILL)
    assert first.process.wait(10) == -signal.SIGKILL
    ingest_proxy.latency("ingest", 0)

    async def sessions_ended() -> bool | None:
        return await _sessions_of(pool, first) == 0 or None

    # Once its last session has ended, no write of the killed process is still to land.
    await eventually(sessions_ended)
    killed = await _connector(pool, connector_id)
    assert killed is not None
    assert killed["cursor_ms"] < newest_ms and killed["last_success_at"] is None, "the run had ended"
    # The cursor stops at the page before the held one: it never passes what ingest has not
    # answered to the process.
    killed_after = sum(c.modified_ms <= killed["cursor_ms"] for c in contacts)
    assert killed_after == held_from

    # The second process, configured the same: it takes the connector up from the cursor.
    restart_seq = await _log_end(nats_url)
    second = start_sync()

    async def run_ended() -> asyncpg.Record | None:
        second.check_running()
        row = await _connector(pool, connector_id)
        assert row is not None and not row["last_error"], row
        return row if row["last_success_at"] is not None else None

    done = await eventually(run_ended, timeout_s=60)  # a cold start of python -m sync, then the pages
    assert (done["cursor_ms"], done["last_error"], done["rejected_total"]) == (newest_ms, "", 0)
    # Resumed, not started over: two searches began (the others paged on with ``after``), the
    # first process's from the beginning and the second's from the kept cursor (inclusive, no
    # lookback); so only the contact the cursor names was read twice.
    began = [s["filterGroups"][0]["filters"][0]["value"] for s in hubspot.searches if "after" not in s]
    assert began == ["0", str(killed["cursor_ms"])]
    # One event per contact read (no consent property), each answered: every contact once,
    # and the one at the cursor again.
    assert done["records_total"] == done["events_total"] == CONTACTS + 1

    # No gap, no double apply in ingest: each contact's event is in the event log once.
    expected = {c.event_id: str(c.contact_id) for c in contacts}
    logged = [(seq, e.event_id, e.customer.crm_id) for seq, e in await _logged_events(nats_url, log_start)]
    ours = [(event_id, crm_id) for _, event_id, crm_id in logged if event_id in expected]
    assert len(ours) == len(set(ours)) == CONTACTS, Counter(ours).most_common(3)
    assert dict(ours) == expected
    recorded = await pool.fetchval(
        "SELECT count(*) FROM ingest_processed_events WHERE event_id = ANY($1::text[])", list(expected)
    )
    assert recorded == CONTACTS
    # The kill came with the held page stored past the cursor; the second process sent that page
    # again and the contact the cursor names (the search is inclusive), each answered DUPLICATE,
    # and ingest accepted each contact once.
    stored_first = sum(seq <= restart_seq for seq, event_id, _ in logged if event_id in expected)
    assert stored_first == killed_after + PAGE_SIZE
    duplicates = _crm_answers("duplicate") - duplicates_before
    assert (_crm_answers("accepted") - accepted_before, duplicates) == (CONTACTS, PAGE_SIZE + 1)

    # ... and in the profiles: each contact's traits, from its one event, applied once.
    identifiers = [
        profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_CRM_ID, value=str(c.contact_id))
        for c in contacts
    ]
    request = profile_pb2.BatchGetProfilesRequest(
        identifiers=identifiers, read_mask=field_mask_pb2.FieldMask(paths=["traits", "provenance"])
    )

    async def merged() -> list[profile_pb2.Profile] | None:
        results = (await profile_stub.BatchGetProfiles(request)).results
        return [r.profile for r in results] if all(r.found for r in results) else None

    profiles = await eventually(merged, timeout_s=15)
    assert [
        (dict(p.traits.items()), p.version, p.provenance["traits.first_name"].event_id) for p in profiles
    ] == [(c.traits, 1, c.event_id) for c in contacts]
    print(
        f"killed with {killed_after} of {CONTACTS} contacts behind the cursor and {stored_first} in"
        f" ingest; {duplicates:.0f} sent again, answered DUPLICATE; {time.monotonic() - started:.1f} s"
    )
