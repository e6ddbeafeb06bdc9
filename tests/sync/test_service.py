"""The sync service in this process: a HubSpot connector (the local HubSpot) run by its
scheduler into the real ingest service, reported by GetConnectorStatus and ListConnectorStatuses
and run at once by RunConnector; errors by AIP-193; scopes; one replica at a time per
connector; erasure notices reach the push ledger; what it refuses to start with."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from ingest.server import IngestApp
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime.sync.v1 import sync_pb2, sync_pb2_grpc
from sendtime_common.auth.api_keys import Scope
from sendtime_common.config import ConfigError
from sendtime_common.errors import field_violations, status_of
from sendtime_common.event_log import JetStreamEventLog, JetStreamSettings
from sendtime_common.tls import ClientTls
from sync.connectors import parse_connectors
from sync.push import ItemOutcome, ItemResult, PushItem
from sync.runner import RunReport
from sync.scheduler import Scheduler
from sync.server import SyncApp, create_app
from sync.settings import Settings
from sync.store import ConnectorStore
from tests.conftest import LOCAL_SERVER, channel, eventually, wait_for_profile
from tests.keys import issue_key
from tests.sync.hubspot_server import HubSpotServer

# Contacts modified before 2026-11-30 (ingest refuses times in the future), apart per run.
T0_MS = 1_796_000_000_000 - random.Random().randrange(10**6) * 1000


@pytest.fixture
async def hubspot() -> AsyncIterator[HubSpotServer]:
    server = await HubSpotServer(searches_per_s=100).start()
    yield server
    await server.stop()


def _document(hubspot: HubSpotServer, *ids: str) -> dict[str, Any]:
    return {
        "connectors": [
            {
                "id": connector_id,
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
                "options": {"page_size": 10, "lookback_s": 0},
            }
            for connector_id in ids
        ]
    }


async def _sync_app(
    hubspot: HubSpotServer, ingest_app: IngestApp, database_url: str, nats_url: str, redis_url: str, *ids: str
) -> SyncApp:
    env = {"HUBSPOT_CLIENT_SECRET": hubspot.client_secret, "HUBSPOT_REFRESH_TOKEN": hubspot.refresh_token}
    settings = Settings(
        **LOCAL_SERVER,
        database_url=database_url,
        redis_url=redis_url,
        event_log=JetStreamSettings(url=nats_url),
        ingest_target=f"127.0.0.1:{ingest_app.grpc.port}",
        ingest_tls=ClientTls(plaintext=True),
        ingest_api_key=await issue_key(database_url, [Scope.EVENTS_WRITE], "tests: sync to ingest"),
        connectors=tuple(parse_connectors(_document(hubspot, *ids), env)),
        poll_interval_s=0.1,
    )
    app = await create_app(settings)
    await app.start()
    return app


@pytest.fixture
async def sync_app(
    hubspot: HubSpotServer,
    ingest_app: IngestApp,
    database_url: str,
    nats_url: str,
    redis_url: str,
    unique: str,
) -> AsyncIterator[SyncApp]:
    app = await _sync_app(
        hubspot, ingest_app, database_url, nats_url, redis_url, f"crm-{unique}", f"more-{unique}"
    )
    yield app
    await app.stop(grace_s=1)


@pytest.fixture
async def stub(sync_app: SyncApp, database_url: str) -> AsyncIterator[sync_pb2_grpc.SyncServiceAsyncStub]:
    key = await issue_key(database_url, [Scope.SYNC_READ, Scope.SYNC_WRITE], "tests: sync caller")
    async with channel(f"127.0.0.1:{sync_app.grpc.port}", key) as sync_channel:
        yield sync_pb2_grpc.SyncServiceStub(sync_channel)


async def test_a_connector_runs_when_due_and_its_status_says_how_it_went(
    hubspot: HubSpotServer,
    stub: sync_pb2_grpc.SyncServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    unique: str,
) -> None:
    name = f"connectors/crm-{unique}"

    def status_when(ready: Callable[[sync_pb2.ConnectorStatus], bool]) -> Awaitable[sync_pb2.ConnectorStatus]:
        return _until(stub, name, ready)

    # A new connector is due at once: it runs (HubSpot has nothing yet), then waits an hour.
    first = await status_when(lambda s: s.HasField("last_success_time"))
    assert (first.kind, first.state) == (
        sync_pb2.CONNECTOR_KIND_HUBSPOT_CONTACTS,
        sync_pb2.CONNECTOR_STATE_WAITING,
    )
    assert (first.records_total, first.interval.seconds) == (0, 3600)
    assert first.next_run_time.seconds - first.last_success_time.seconds >= 3590
    assert not first.HasField("lag")  # nothing handed on yet

    # RunConnector makes it due now; a replica takes it up within a poll.
    first_id = random.randrange(10**12)  # contact ids of this test's own: one person each
    for i in range(12):
        hubspot.upsert(first_id + i, T0_MS + i, firstname=f"n{i}", email=f"{unique}-{i}@example.com")
    before = time.time()
    ran = await stub.RunConnector(sync_pb2.RunConnectorRequest(name=name))
    after = time.time()
    # Due now (PostgreSQL's now() during the call, on this machine's clock, whole seconds), not in
    # the hour its first run had set.
    assert math.floor(before) <= ran.status.next_run_time.seconds <= after
    assert ran.status.next_run_time.seconds < first.next_run_time.seconds - 3000
    second = await status_when(
        lambda s: s.records_total == 12 and s.state == sync_pb2.CONNECTOR_STATE_WAITING
    )
    assert (second.events_total, second.rejected_total, second.consecutive_failures) == (12, 0, 0)
    assert second.lag.seconds > 0  # the newest contact handed on is T0_MS + 11 ms old

    # A contact changed in the CRM is in the profile within the run that took it.
    crm = profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_CRM_ID, value=str(first_id + 5))
    profile = await wait_for_profile(profile_stub, crm, lambda p: "first_name" in p.traits)
    assert profile.traits["first_name"] == "n5"


async def test_a_failing_provider_shows_in_the_status_and_the_connector_is_tried_later(
    hubspot: HubSpotServer, stub: sync_pb2_grpc.SyncServiceAsyncStub, unique: str
) -> None:
    name = f"connectors/crm-{unique}"
    await _until(stub, name, lambda s: s.HasField("last_success_time"))  # its first run
    # The grant is gone (revoked at HubSpot): its token refused, and no new one to be had.
    hubspot.refresh_token = "rotated-elsewhere"
    hubspot.revoke_tokens()
    before = time.time()  # the failing run starts after this: the connector is not due before
    await stub.RunConnector(sync_pb2.RunConnectorRequest(name=name))
    status = await _until(stub, name, lambda s: s.consecutive_failures > 0)
    assert status.state == sync_pb2.CONNECTOR_STATE_FAILING
    assert status.last_error == "ProviderRefused: hubspot: token endpoint refused: invalid_grant"
    assert status.last_failure_time.seconds >= math.floor(before)
    # Tried again the interval on, less at most 10% jitter, from when the run failed (after
    # ``before``): however long the run took, never sooner.
    assert status.next_run_time.seconds >= math.floor(before) + 3600 * 0.9


async def test_statuses_are_listed_by_name_a_page_at_a_time(
    stub: sync_pb2_grpc.SyncServiceAsyncStub, unique: str
) -> None:
    first = await stub.ListConnectorStatuses(sync_pb2.ListConnectorStatusesRequest(page_size=1))
    assert [s.name for s in first.statuses] == [f"connectors/crm-{unique}"] and first.next_page_token
    second = await stub.ListConnectorStatuses(
        sync_pb2.ListConnectorStatusesRequest(page_size=1, page_token=first.next_page_token)
    )
    assert [s.name for s in second.statuses] == [f"connectors/more-{unique}"] and not second.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.ListConnectorStatuses(sync_pb2.ListConnectorStatusesRequest(page_token="not-ours"))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_an_unknown_connector_is_not_found_and_a_malformed_name_invalid(
    stub: sync_pb2_grpc.SyncServiceAsyncStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.RunConnector(sync_pb2.RunConnectorRequest(name="connectors/nope"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    status = status_of(missing.value)
    assert status is not None and "CONNECTOR_NOT_FOUND" in str(status)
    with pytest.raises(grpc.aio.AioRpcError) as malformed:
        await stub.GetConnectorStatus(sync_pb2.GetConnectorStatusRequest(name="crm"))
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = status_of(malformed.value)
    assert bad is not None and [v.field for v in field_violations(bad)] == ["name"]


async def test_reading_needs_sync_read_and_running_sync_write(
    sync_app: SyncApp, database_url: str, unique: str
) -> None:
    name = f"connectors/crm-{unique}"
    reader = await issue_key(database_url, [Scope.SYNC_READ], "tests: sync reader")
    other = await issue_key(database_url, [Scope.PROFILES_READ], "tests: not sync")
    async with channel(f"127.0.0.1:{sync_app.grpc.port}", reader) as read_only:
        stub = sync_pb2_grpc.SyncServiceStub(read_only)
        await stub.GetConnectorStatus(sync_pb2.GetConnectorStatusRequest(name=name))
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.RunConnector(sync_pb2.RunConnectorRequest(name=name))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    async with channel(f"127.0.0.1:{sync_app.grpc.port}", other) as unrelated:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await sync_pb2_grpc.SyncServiceStub(unrelated).ListConnectorStatuses(
                sync_pb2.ListConnectorStatusesRequest()
            )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_call_without_a_key_is_refused(sync_app: SyncApp, unique: str) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sync_app.grpc.port}") as anonymous:
        stub = sync_pb2_grpc.SyncServiceStub(anonymous)
        for call in (
            stub.GetConnectorStatus(sync_pb2.GetConnectorStatusRequest(name=f"connectors/crm-{unique}")),
            stub.ListConnectorStatuses(sync_pb2.ListConnectorStatusesRequest()),
            stub.RunConnector(sync_pb2.RunConnectorRequest(name=f"connectors/crm-{unique}")),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_two_replicas_never_run_one_connector_at_once(sync_app: SyncApp, unique: str) -> None:
    store = ConnectorStore(sync_app.pool)
    connector_id = f"solo-{unique}"
    running = 0
    most = 0
    runs = 0
    release = asyncio.Event()

    async def run() -> RunReport:
        nonlocal running, most, runs
        running += 1
        runs += 1
        most = max(most, running)
        await release.wait()
        running -= 1
        await store.run_succeeded(connector_id, await _in(sync_app, 3600))
        return RunReport(connector_id)

    stores = [_CountingStore(sync_app.pool) for _ in range(2)]
    replicas = [Scheduler(sync_app.pool, s, {connector_id: run}, poll_interval_s=0.02) for s in stores]
    for store_, replica in zip(stores, replicas, strict=True):
        store_.scheduler = replica
        replica.start()
    await eventually(lambda: asyncio.sleep(0, result=runs or None))
    # While it runs, the connector stays due. Wait for positive evidence that the other replica
    # tried it and was turned away by the lock: every replica polled 3 more times, and one (never
    # the runner, which holds the run) began 2 polls with nothing running. The first of those
    # started an attempt (due, a slot free); the second shows it ended, without a run: one that
    # got through would still be running, waiting for the release.
    polled = [(s.polls, s.idle_polls) for s in stores]

    def contested() -> bool | None:
        counts = list(zip(stores, polled, strict=True))
        more = all(s.polls >= polls + 3 for s, (polls, _) in counts)
        return (more and any(s.idle_polls >= idle + 2 for s, (_, idle) in counts)) or None

    await eventually(lambda: asyncio.sleep(0, result=contested()), timeout_s=30)
    release.set()
    await eventually(
        lambda: asyncio.sleep(0, result=(running == 0 and not any(r.running() for r in replicas)) or None)
    )
    for replica in replicas:
        await replica.close()
    assert (most, runs) == (1, 1)  # and once done, not due again for an hour: no second run


async def test_a_replica_runs_at_most_max_runs_connectors_at_once(sync_app: SyncApp, unique: str) -> None:
    store = ConnectorStore(sync_app.pool)
    ids = [f"many-{i}-{unique}" for i in range(3)]
    running: set[str] = set()
    most = 0
    release = asyncio.Event()

    def run_of(connector_id: str) -> Callable[[], Awaitable[RunReport]]:
        async def run() -> RunReport:
            nonlocal most
            running.add(connector_id)
            most = max(most, len(running))
            await release.wait()
            running.discard(connector_id)
            await store.run_succeeded(connector_id, await _in(sync_app, 3600))
            return RunReport(connector_id)

        return run

    polls = _CountingStore(sync_app.pool)
    scheduler = Scheduler(sync_app.pool, polls, {c: run_of(c) for c in ids}, poll_interval_s=0.02, max_runs=2)
    scheduler.start()
    await eventually(lambda: asyncio.sleep(0, result=len(running) == 2 or None))
    # 3 more polls, each seeing the third connector due while both slots are taken: it waits.
    polled = polls.polls
    await eventually(lambda: asyncio.sleep(0, result=polls.polls >= polled + 3 or None), timeout_s=30)
    assert most == 2 and len(scheduler.running()) == 2
    release.set()
    await eventually(lambda: _all_ran(store, ids))  # the third ran once a slot was free
    await scheduler.close()


class _CountingStore(ConnectorStore):
    """Counts the looks at which connectors are due, once each is answered (the scheduler acts on
    the answer before any other task runs); ``idle_polls``, those begun while ``scheduler`` ran
    nothing. A run's own look (``Scheduler._run``, once it holds the lock) counts too."""

    def __init__(self, pool: Any) -> None:
        super().__init__(pool)
        self.scheduler: Scheduler | None = None
        self.polls = 0
        self.idle_polls = 0

    async def due(self, connector_ids: list[str]) -> list[str]:
        idle = self.scheduler is not None and not self.scheduler.running()
        answer = await super().due(connector_ids)
        self.polls += 1
        self.idle_polls += idle
        return answer


async def _all_ran(store: ConnectorStore, ids: list[str]) -> bool | None:
    states = await store.load_many(ids)
    return all(s.last_success_at is not None for s in states.values()) or None


async def _until(
    stub: sync_pb2_grpc.SyncServiceAsyncStub, name: str, ready: Callable[[sync_pb2.ConnectorStatus], bool]
) -> sync_pb2.ConnectorStatus:
    """The connector's status once ``ready`` says so; asked every 0.2 s (within sync.read's rate)."""
    for _ in range(75):
        status = (await stub.GetConnectorStatus(sync_pb2.GetConnectorStatusRequest(name=name))).status
        if ready(status):
            return status
        await asyncio.sleep(0.2)
    raise AssertionError(f"not within 15 s: {status}")


async def _in(app: SyncApp, seconds: int) -> Any:
    return await app.pool.fetchval("SELECT now() + make_interval(secs => $1)", seconds)


async def test_an_erasure_notice_empties_the_push_ledger_of_that_person(
    sync_app: SyncApp, nats_url: str, unique: str
) -> None:
    item = PushItem(f"cust-{unique}", {"tier": "gold"}, 1)
    await sync_app.ledger.record("braze", [ItemResult(item, ItemOutcome.PUSHED)])
    assert await sync_app.ledger.unsettled("braze", [item]) == ([], [])
    log = await JetStreamEventLog.connect(JetStreamSettings(url=nats_url))
    try:
        notice = profile_pb2.ErasureNotice(
            customer_id=f"cust-{unique}", erase_time=timestamp_pb2.Timestamp(seconds=1)
        )
        await log.publish_erasure(f"erase-{unique}", notice.SerializeToString())
    finally:
        await log.close()

    async def forgotten() -> bool | None:
        return (await sync_app.ledger.unsettled("braze", [item]) == ([item], [])) or None

    await eventually(forgotten)


async def test_it_refuses_to_start_without_a_key_for_ingest_or_for_the_profile_service(
    hubspot: HubSpotServer, database_url: str
) -> None:
    env = {"BRAZE_API_KEY": "k", "HUBSPOT_CLIENT_SECRET": "s", "HUBSPOT_REFRESH_TOKEN": "r"}
    braze = {
        "id": "braze",
        "kind": "braze_push",
        "base_url": "https://rest.iad-01.braze.com",
        "auth": {"api_key_env": "BRAZE_API_KEY"},
        "options": {"traits": ["tier"]},
    }
    pushing = Settings(
        **LOCAL_SERVER,
        database_url=database_url,
        ingest_api_key="key",
        connectors=tuple(parse_connectors({"connectors": [braze]}, env)),
    )
    with pytest.raises(ConfigError, match="PROFILE_SERVICE_API_KEY"):
        await create_app(pushing)
    keyless = Settings(
        **LOCAL_SERVER,
        database_url=database_url,
        connectors=tuple(parse_connectors(_document(hubspot, "c"), env)),
    )
    with pytest.raises(ConfigError, match="INGEST_SERVICE_API_KEY"):
        await create_app(keyless)
