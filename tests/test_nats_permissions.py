"""The services under their least-privilege NATS users (scripts/nats_auth.py), on a NATS of the
test's own: the whole path works (ingest publishes, profile merges and publishes erasure
notices, render keeps its catalog and hears erasures, triggers starts and reads the profile
change stream through its durable consumer and erases on the notices, sync's user reads that
stream through its own durable consumer), and what each must not do is refused."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient

import devstack
import nats_auth
from ingest.server import IngestApp
from ingest.server import create_app as create_ingest_app
from ingest.settings import Settings as IngestSettings
from profile_service.server import ProfileApp
from profile_service.server import create_app as create_profile_app
from profile_service.settings import Settings as ProfileSettings
from render.server import RenderApp
from render.server import create_app as create_render_app
from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime_common.auth.api_keys import Scope
from sendtime_common.event_log import (
    EventLogUnavailable,
    JetStreamEventLog,
    JetStreamSettings,
    inbox_prefix,
)
from sync.changes import DURABLE_NAME as SYNC_CHANGES
from tests.conftest import (
    LOCAL_SERVER,
    channel,
    empty_database,
    render_settings,
    triggers_settings,
    user,
    wait_for_profile,
)
from tests.factories import event, identify
from tests.keys import issue_key
from triggers.server import TriggersApp
from triggers.server import create_app as create_triggers_app

EVENTS = JetStreamSettings().stream
ERASURES = JetStreamSettings().erasure_stream
CHANGES = JetStreamSettings().profile_change_stream


@dataclass
class LockedNats:
    url: str
    passwords: dict[str, str]

    def settings(self, service: str, **overrides: object) -> JetStreamSettings:
        return replace(
            JetStreamSettings(url=self.url),
            user=nats_auth.user_name(service),
            password=self.passwords[service],
            manage_streams=service == "profile",
            **overrides,  # type: ignore[arg-type]
        )

    async def connect_as(self, service: str, errors: list[str]) -> NatsClient:
        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        return await nats.connect(
            self.url,
            user=nats_auth.user_name(service),
            password=self.passwords[service],
            inbox_prefix=inbox_prefix(nats_auth.user_name(service)),
            error_cb=on_error,
            allow_reconnect=False,
        )


@pytest.fixture(scope="module")
def locked_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LockedNats]:
    passwords = {service: secrets.token_urlsafe(24) for service in nats_auth.SERVICES}
    port = devstack.free_port()
    process = devstack.start_nats(port, tmp_path_factory.mktemp("locked-nats"), passwords=passwords)
    yield LockedNats(f"nats://127.0.0.1:{port}", passwords)
    devstack.stop_process(process)


@pytest.fixture(scope="module")
async def locked_database() -> AsyncIterator[str]:
    """A database of these services' own: the other tests' profile service must not publish
    their erasure notices."""
    async with empty_database("sendtime_locked") as url:
        yield url


@pytest.fixture(scope="module")
async def locked_apps(
    locked_nats: LockedNats, locked_database: str, redis_url: str
) -> AsyncIterator[tuple[IngestApp, ProfileApp, RenderApp, TriggersApp]]:
    database_url = locked_database
    # ingest first: it waits for the streams profile makes, as it would on a cluster.
    ingest_starting = asyncio.create_task(
        create_ingest_app(
            IngestSettings(
                **LOCAL_SERVER, database_url=database_url, event_log=locked_nats.settings("ingest")
            )
        )
    )
    profile = await create_profile_app(
        ProfileSettings(
            **LOCAL_SERVER,
            database_url=database_url,
            redis_url=redis_url,
            near_cache_entries=0,
            event_log=locked_nats.settings("profile"),
        )
    )
    ingest = await ingest_starting
    render = await create_render_app(
        render_settings(
            f"127.0.0.1:{profile.grpc.port}",
            database_url,
            locked_nats.url,
            redis_url="",
            profile_api_key=await issue_key(database_url, [Scope.PROFILES_READ]),
            event_log=locked_nats.settings("render"),
        )
    )
    triggers = await create_triggers_app(
        triggers_settings(
            f"127.0.0.1:{profile.grpc.port}",
            f"127.0.0.1:{render.grpc.port}",
            database_url,
            locked_nats.url,
            redis_url="",
            profile_api_key="unused",
            render_api_key="unused",
            event_log=locked_nats.settings("triggers"),
        )
    )
    for app in (profile, ingest, render, triggers):
        await app.start()
    yield ingest, profile, render, triggers
    for app in (triggers, render, ingest, profile):
        await app.stop(grace_s=1)


async def test_the_services_work_end_to_end_under_their_own_users(
    locked_apps: tuple[IngestApp, ProfileApp, RenderApp, TriggersApp],
    locked_nats: LockedNats,
    locked_database: str,
    unique: str,
) -> None:
    ingest, profile, _, triggers = locked_apps
    admin_key = await issue_key(locked_database)
    errors: list[str] = []
    watcher = await locked_nats.connect_as("profile", errors)
    # What the triggers engine reads, under its own user: the changes through its durable
    # consumer, and the erasure notices. Counted from here, as the engine runs all along.
    engine = triggers.engine
    changes_applied = engine.consumer.stats.changes
    erasures_handled = engine.erasures_handled
    notices_before = (await watcher.jetstream().stream_info(ERASURES)).state.last_seq
    changes_before = (await watcher.jetstream().stream_info(CHANGES)).state.last_seq
    async with (
        channel(f"127.0.0.1:{ingest.grpc.port}", admin_key) as ingest_calls,
        channel(f"127.0.0.1:{profile.grpc.port}", admin_key) as profile_calls,
    ):
        sent = await ingest_pb2_grpc.IngestServiceStub(ingest_calls).SendEvents(
            ingest_pb2.SendEventsRequest(
                events=[event(user_id=f"n-{unique}", identify=identify(first_name="Ada"))]
            )
        )
        assert sent.results[0].outcome == ingest_pb2.EVENT_OUTCOME_ACCEPTED
        profiles = profile_pb2_grpc.ProfileServiceStub(profile_calls)
        await wait_for_profile(profiles, user(f"n-{unique}"), lambda p: p.traits["first_name"] == "Ada")
        erased = await profiles.DeleteProfile(
            profile_pb2.DeleteProfileRequest(identifier=user(f"n-{unique}"))
        )
        assert erased.events_deleted == 1
    # The merge's change went out on the profile change stream, and the notice on the erasure
    # stream (profile may publish on both); the triggers engine applied the one and erased on
    # the other.
    try:
        while (await watcher.jetstream().stream_info(CHANGES)).state.last_seq == changes_before:
            await asyncio.sleep(0.05)
        while (await watcher.jetstream().stream_info(ERASURES)).state.last_seq == notices_before:
            await asyncio.sleep(0.05)
        while engine.consumer.stats.changes == changes_applied:
            await asyncio.sleep(0.05)
        while engine.erasures_handled == erasures_handled:
            await asyncio.sleep(0.05)
    finally:
        await watcher.close()
    assert engine.consumer.stats.undecodable == 0
    assert engine.consumer.stats.retried == 0
    assert not errors
    # Their readiness checks ask NATS only what their users may ask (docs/operations.md#health).
    for app in locked_apps:
        assert await app.grpc.readiness.evaluate(), app.grpc.readiness.conditions


async def test_sync_reads_the_profile_changes_through_its_own_durable_consumer(
    locked_apps: tuple[IngestApp, ProfileApp, RenderApp, TriggersApp],
    locked_nats: LockedNats,
    locked_database: str,
    unique: str,
) -> None:
    """What sync's push connectors do (sync.changes.ChangeFollower), under sync's user: make and
    pull from ``sync-changes``, get a merge's change, acknowledge it."""
    assert nats_auth.NatsNames().sync_changes_consumer == SYNC_CHANGES
    ingest = locked_apps[0]
    errors: list[str] = []
    event_log = await JetStreamEventLog.connect(locked_nats.settings("sync"))
    inspector = await locked_nats.connect_as("sync", errors)
    try:
        subscription = await event_log.subscribe_profile_changes(SYNC_CHANGES)
        sent = event(user_id=f"s-{unique}", identify=identify(first_name="Ada"))
        async with channel(f"127.0.0.1:{ingest.grpc.port}", await issue_key(locked_database)) as calls:
            answer = await ingest_pb2_grpc.IngestServiceStub(calls).SendEvents(
                ingest_pb2.SendEventsRequest(events=[sent])
            )
        assert answer.results[0].outcome == ingest_pb2.EVENT_OUTCOME_ACCEPTED
        found: profile_pb2.ProfileChange | None = None
        deadline = asyncio.get_running_loop().time() + 10
        while found is None:  # the changes of the tests before come first (it reads from the start)
            assert asyncio.get_running_loop().time() < deadline, "no change for the event"
            for delivery in await subscription.fetch(100, 0.5):
                change = profile_pb2.ProfileChange.FromString(delivery.payload)
                await delivery.ack()
                if change.event.event_id == sent.event_id:
                    found = change
        assert found.customer_id
        # The acks went through (the user may ack there), and the user may read its consumer.
        consumer = await inspector.jetstream().consumer_info(CHANGES, SYNC_CHANGES)
        while consumer.num_ack_pending or consumer.ack_floor.stream_seq < consumer.delivered.stream_seq:
            assert asyncio.get_running_loop().time() < deadline, consumer
            await asyncio.sleep(0.05)
            consumer = await inspector.jetstream().consumer_info(CHANGES, SYNC_CHANGES)
        await subscription.close()
    finally:
        await inspector.close()
        await event_log.close()
    assert not errors


async def test_render_cannot_publish_an_event_nor_read_another_services_inbox(
    locked_nats: LockedNats, locked_apps: tuple[IngestApp, ProfileApp, RenderApp, TriggersApp]
) -> None:
    errors: list[str] = []
    render = await locked_nats.connect_as("render", errors)
    ingest = await locked_nats.connect_as("ingest", errors)
    try:
        before = (await ingest.jetstream().stream_info(EVENTS)).state.last_seq
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await render.jetstream(timeout=1).publish("sendtime.events.identify", b"{}")
        await render.flush()
        assert any('permissions violation for publish to "sendtime.events.identify"' in e for e in errors), (
            errors
        )
        assert (await ingest.jetstream().stream_info(EVENTS)).state.last_seq == before  # nothing stored

        await render.subscribe(f"{inbox_prefix('sendtime-profile')}.>")
        await render.flush()
        await asyncio.sleep(0.1)
        assert any("permissions violation for subscription to" in e for e in errors), errors
    finally:
        await render.close()
        await ingest.close()


@pytest.mark.parametrize(
    ("service", "subject"),
    [
        ("ingest", f"$JS.API.STREAM.DELETE.{EVENTS}"),
        ("ingest", f"$JS.API.STREAM.PURGE.{EVENTS}"),
        ("ingest", f"$JS.API.STREAM.UPDATE.{EVENTS}"),
        ("ingest", f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS}.profile-merger"),
        ("render", f"$JS.API.STREAM.MSG.DELETE.{EVENTS}"),
        ("render", f"$JS.API.CONSUMER.DELETE.{EVENTS}.profile-merger"),
        ("render", "sendtime.erasures"),
        ("render", "sendtime.profile_changes.identify"),
        ("ingest", "sendtime.profile_changes.identify"),
        ("profile", f"$JS.API.STREAM.DELETE.{EVENTS}"),
        ("profile", f"$JS.API.STREAM.PURGE.{CHANGES}"),
        ("profile", "sendtime.events.identify"),
        ("triggers", "sendtime.events.identify"),
        ("triggers", "sendtime.profile_changes.identify"),
        ("triggers", "sendtime.erasures"),
        ("triggers", f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS}.profile-merger"),
        ("triggers", f"$JS.API.STREAM.PURGE.{CHANGES}"),
        ("triggers", f"$JS.API.STREAM.UPDATE.{CHANGES}"),
        ("render", f"$JS.API.CONSUMER.MSG.NEXT.{CHANGES}.triggers-changes"),
        ("sync", "sendtime.events.identify"),
        ("sync", "sendtime.profile_changes.identify"),
        ("sync", "sendtime.erasures"),
        ("sync", f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS}.profile-merger"),
        ("sync", f"$JS.API.CONSUMER.MSG.NEXT.{CHANGES}.triggers-changes"),
        ("sync", f"$JS.API.CONSUMER.DELETE.{CHANGES}.triggers-changes"),
        ("sync", f"$JS.API.STREAM.PURGE.{CHANGES}"),
        ("sync", f"$JS.API.STREAM.UPDATE.{CHANGES}"),
        ("triggers", f"$JS.API.CONSUMER.MSG.NEXT.{CHANGES}.{SYNC_CHANGES}"),
        ("render", f"$JS.API.CONSUMER.MSG.NEXT.{CHANGES}.{SYNC_CHANGES}"),
    ],
)
async def test_no_user_may_do_what_its_service_does_not(
    locked_nats: LockedNats,
    locked_apps: tuple[IngestApp, ProfileApp, RenderApp, TriggersApp],
    service: str,
    subject: str,
) -> None:
    errors: list[str] = []
    client = await locked_nats.connect_as(service, errors)
    try:
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await client.request(subject, b"{}", timeout=0.5)
        await client.flush()
        assert any(f'permissions violation for publish to "{subject.lower()}"' in e for e in errors), (
            errors
        )  # nats-py lower-cases it
    finally:
        await client.close()


async def test_a_wrong_password_is_refused(locked_nats: LockedNats) -> None:
    with pytest.raises(EventLogUnavailable):
        await JetStreamEventLog.connect(replace(locked_nats.settings("ingest"), password="wrong"))


def test_the_deploy_config_grants_what_the_code_says(tmp_path: Path) -> None:
    deploy = (Path(__file__).resolve().parent.parent / "deploy" / "nats" / "authorization.conf").read_text()
    assert nats_auth.deploy_block() in deploy
