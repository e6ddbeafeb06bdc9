"""Traits from Sendtime to an email platform, end to end: events sent to the real ingest service
are merged by the real profile service, whose profile changes the sync service follows; a Braze
push connector (the local Braze, tests/sync/braze_server.py) sends the changed customers' traits,
once; after a restart in the middle of a push, Braze holds what one push would have left.

The stack is the test's own (NATS, a database, ingest and profile in this process): the
profile change stream then holds only this test's changes, and no other profile service relays
this database's change outbox."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import devstack
from ingest.server import IngestApp
from ingest.server import create_app as create_ingest_app
from ingest.settings import Settings as IngestSettings
from profile_service.server import ProfileApp
from profile_service.server import create_app as create_profile_app
from profile_service.settings import Settings as ProfileSettings
from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime.sync.v1 import sync_pb2, sync_pb2_grpc
from sendtime_common.auth.api_keys import Scope
from sendtime_common.event_log import JetStreamSettings
from sendtime_common.tls import ClientTls
from sync.connectors import parse_connectors
from sync.server import SyncApp, create_app
from sync.settings import Settings
from tests.conftest import LOCAL_SERVER, channel, empty_database, eventually, user, wait_for_profile
from tests.factories import event, identify
from tests.keys import issue_key
from tests.sync.braze_server import BrazeServer


@dataclass
class Stack:
    database_url: str
    nats_url: str
    redis_url: str
    ingest: IngestApp
    profile: ProfileApp
    admin_key: str


@pytest.fixture
async def stack(tmp_path: Path, redis_url: str) -> AsyncIterator[Stack]:
    port = devstack.free_port()
    nats = devstack.start_nats(port, tmp_path / "nats")
    nats_url = f"nats://127.0.0.1:{port}"
    try:
        async with empty_database("sync_push_e2e") as database_url:
            common = {**LOCAL_SERVER, "database_url": database_url, "redis_url": redis_url}
            profile = await create_profile_app(
                ProfileSettings(**common, event_log=JetStreamSettings(url=nats_url))
            )
            await profile.start()
            ingest = await create_ingest_app(
                IngestSettings(**common, event_log=JetStreamSettings(url=nats_url))
            )
            await ingest.start()
            try:
                yield Stack(database_url, nats_url, redis_url, ingest, profile, await issue_key(database_url))
            finally:
                await ingest.stop(grace_s=1)
                await profile.stop(grace_s=1)
    finally:
        devstack.stop_process(nats)


@pytest.fixture
async def braze() -> AsyncIterator[BrazeServer]:
    server = await BrazeServer().start()
    yield server
    await server.stop()


async def _sync_app(stack: Stack, braze: BrazeServer) -> SyncApp:
    document = {
        "connectors": [
            {
                "id": "braze",
                "kind": "braze_push",
                "interval_s": 3600,  # runs when the test asks (RunConnector)
                "base_url": braze.url,
                "auth": {"api_key_env": "BRAZE_API_KEY"},
                "options": {"traits": ["first_name", "tier", "orders_count"]},
            }
        ]
    }
    assert braze.api_key is not None
    settings = Settings(
        **LOCAL_SERVER,
        database_url=stack.database_url,
        redis_url=stack.redis_url,
        event_log=JetStreamSettings(url=stack.nats_url),
        profile_target=f"127.0.0.1:{stack.profile.grpc.port}",
        profile_tls=ClientTls(plaintext=True),
        profile_api_key=await issue_key(stack.database_url, [Scope.PROFILES_READ], "tests: sync to profile"),
        connectors=tuple(parse_connectors(document, {"BRAZE_API_KEY": braze.api_key})),
        poll_interval_s=0.1,
    )
    app = await create_app(settings)
    await app.start()
    return app


async def _send(stack: Stack, *events: ingest_pb2.Event) -> None:
    async with channel(f"127.0.0.1:{stack.ingest.grpc.port}", stack.admin_key) as ingest_channel:
        answer = await ingest_pb2_grpc.IngestServiceStub(ingest_channel).SendEvents(
            ingest_pb2.SendEventsRequest(events=list(events))
        )
    assert all(r.outcome == ingest_pb2.EVENT_OUTCOME_ACCEPTED for r in answer.results), answer


async def _traits_merged(stack: Stack, user_id: str, **traits: str) -> None:
    async with channel(f"127.0.0.1:{stack.profile.grpc.port}", stack.admin_key) as profile_channel:
        stub = profile_pb2_grpc.ProfileServiceStub(profile_channel)
        await wait_for_profile(
            stub,
            user(user_id),
            lambda p: all(k in p.traits and p.traits[k] == v for k, v in traits.items()),
            timeout_s=10,
        )


async def _run_until_settled(app: SyncApp, stack: Stack, marked: int) -> sync_pb2.ConnectorStatus:
    """Once ``marked`` customers wait (the changes have been read), RunConnector; then the status
    once a run went to its end and nothing waits."""
    await eventually(lambda: _pending(app, expect=marked))
    async with channel(f"127.0.0.1:{app.grpc.port}", stack.admin_key) as sync_channel:
        stub = sync_pb2_grpc.SyncServiceStub(sync_channel)
        ran = await stub.RunConnector(sync_pb2.RunConnectorRequest(name="connectors/braze"))
        asked = ran.status.next_run_time.ToDatetime()
        for _ in range(100):
            status = (
                await stub.GetConnectorStatus(sync_pb2.GetConnectorStatusRequest(name="connectors/braze"))
            ).status
            ended = status.HasField("last_success_time") and status.last_success_time.ToDatetime() >= asked
            if ended and status.state == sync_pb2.CONNECTOR_STATE_WAITING and status.items_pending == 0:
                return status
            await asyncio.sleep(0.1)
    raise AssertionError(f"not settled within 10 s: {status}")


def _identify(user_id: str, **traits: str) -> ingest_pb2.Event:
    return event(identify=identify(**traits), user_id=user_id)


async def test_a_trait_changed_in_sendtime_reaches_braze_once(stack: Stack, braze: BrazeServer) -> None:
    app = await _sync_app(stack, braze)
    try:
        await _send(stack, _identify("u1", first_name="Ada", tier="gold"), _identify("u2", first_name="Bo"))
        await _traits_merged(stack, "u1", first_name="Ada", tier="gold")
        await _traits_merged(stack, "u2", first_name="Bo")
        status = await _run_until_settled(app, stack, marked=2)
        assert braze.users == {
            "external_id:u1": {"first_name": "Ada", "tier": "gold", "orders_count": 0},
            "external_id:u2": {"first_name": "Bo", "orders_count": 0},
        }
        assert (status.items_pushed_total, status.kind) == (2, sync_pb2.CONNECTOR_KIND_BRAZE_PUSH)

        # A trait the connector does not push changes: nothing is sent. One it pushes: sent once.
        await _send(stack, _identify("u1", city="Leeds"))
        await _traits_merged(stack, "u1", city="Leeds")
        requests = len(braze.batch_sizes)
        await _run_until_settled(app, stack, marked=1)
        assert len(braze.batch_sizes) == requests
        await _send(stack, _identify("u1", tier="platinum"))
        await _traits_merged(stack, "u1", tier="platinum")
        status = await _run_until_settled(app, stack, marked=1)
        assert braze.users["external_id:u1"] == {"first_name": "Ada", "tier": "platinum", "orders_count": 0}
        tiers = [value for who, name, value in braze.applied if who == "external_id:u1" and name == "tier"]
        assert tiers == ["gold", "platinum"]  # each value reached Braze once
        assert status.items_pushed_total == 3
        await _run_until_settled(app, stack, marked=0)  # and nothing more goes on later runs
        assert len(braze.applied) == 3 + 2 + 3  # u1's, u2's, u1's again
    finally:
        await app.stop(grace_s=1)


async def test_a_restart_in_the_middle_of_a_push_leaves_braze_as_one_push(
    stack: Stack, braze: BrazeServer
) -> None:
    await _send(stack, *(_identify(f"r{n}", tier="gold") for n in range(3)))
    for n in range(3):
        await _traits_merged(stack, f"r{n}", tier="gold")
    braze.release_answers = asyncio.Event()  # Braze applies the batch; its answer never comes
    app = await _sync_app(stack, braze)
    try:
        await eventually(lambda: _pending(app, expect=3))  # the changes have been read
        async with channel(f"127.0.0.1:{app.grpc.port}", stack.admin_key) as sync_channel:
            await sync_pb2_grpc.SyncServiceStub(sync_channel).RunConnector(
                sync_pb2.RunConnectorRequest(name="connectors/braze")
            )
        await asyncio.wait_for(braze.applied_one.wait(), timeout=10)
    finally:
        await app.stop(grace_s=0)  # stopped mid-push: the run is cancelled, nothing recorded
    braze.release_answers.set()
    braze.release_answers = None

    app = await _sync_app(stack, braze)  # started again: the marks are still there
    try:
        status = await _run_until_settled(app, stack, marked=3)
        assert braze.users == {f"external_id:r{n}": {"tier": "gold", "orders_count": 0} for n in range(3)}
        # The batch Braze applied before the restart went once more, with the same values.
        assert sorted(v for _, name, v in braze.applied if name == "tier") == ["gold"] * 6
        assert status.items_pushed_total == 3
        applied = len(braze.applied)
        await _run_until_settled(app, stack, marked=0)  # settled now: never sent again
        assert len(braze.applied) == applied
    finally:
        await app.stop(grace_s=1)


async def test_an_erased_customer_waits_for_no_push(stack: Stack, braze: BrazeServer) -> None:
    app = await _sync_app(stack, braze)
    try:
        await _send(stack, _identify("e1", tier="gold"))
        await _traits_merged(stack, "e1", tier="gold")
        await eventually(lambda: _pending(app))
        async with channel(f"127.0.0.1:{stack.profile.grpc.port}", stack.admin_key) as profile_channel:
            await profile_pb2_grpc.ProfileServiceStub(profile_channel).DeleteProfile(
                profile_pb2.DeleteProfileRequest(identifier=user("e1"))
            )
        await _run_until_settled(app, stack, marked=0)
        assert braze.users == {}
    finally:
        await app.stop(grace_s=1)


async def _pending(app: SyncApp, expect: int = 1) -> bool | None:
    count = await app.pool.fetchval("SELECT count(*) FROM sync_push_pending")
    return count == expect or None
