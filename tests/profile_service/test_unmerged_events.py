"""The merger's dead letters, on real NATS, PostgreSQL and Redis: a poison event that still
reaches the merger (published straight onto the bus, past ingest's validation) is set aside at
once with its reason, never blocks the consumer and never comes back; a transient failure (the
database down) is retried until it passes and never set aside; a failure of another kind is set
aside after PROFILE_MERGE_MAX_DELIVERIES deliveries; an operator lists them and replays one; an
idempotency conflict the merger finds is kept the same way; erasing a person deletes theirs.

Before: the merger retried a poison event for ever (8 deliveries in its first two minutes, then
one every 30 s), and discarded an undecodable message with only a log line."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import nats
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from nats.js import JetStreamContext
from prometheus_client import REGISTRY

import devstack
from profile_service.merger import EventMerger
from profile_service.repository import MergeResult, ProfileRepository
from profile_service.server import ProfileApp
from profile_service.server import create_app as create_profile_app
from profile_service.settings import Settings as ProfileSettings
from profile_service.unmerged import (
    FailureKind,
    StoreError,
    UnmergedStore,
    failure_kind,
)
from sendtime.ingest.v1 import ingest_pb2
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime_common.auth.api_keys import Scope
from sendtime_common.database import unreachable
from sendtime_common.errors import details_of, field_violations, status_of
from sendtime_common.event_integrity import CONFLICT_REASON
from sendtime_common.event_log import Delivery, JetStreamSettings, OutgoingMessage
from sendtime_common.identifiers import IdentifierHasher
from sendtime_common.storable import NOT_FINITE_DESCRIPTION, NUL_DESCRIPTION
from tests.conftest import LOCAL_SERVER, channel, eventually, user, wait_for_profile
from tests.factories import event, identify
from tests.keys import issue_key

CONSUMER = ProfileSettings().consumer_name
STREAM = JetStreamSettings().stream
PENDING = profile_pb2.UNMERGED_EVENT_STATE_PENDING
REPLAYED = profile_pb2.UNMERGED_EVENT_STATE_REPLAYED


@pytest.fixture(scope="module")
async def unmerged_stub(
    profile_app: ProfileApp, admin_key: str
) -> AsyncIterator[profile_pb2_grpc.UnmergedEventServiceAsyncStub]:
    async with channel(f"127.0.0.1:{profile_app.grpc.port}", admin_key) as calls:
        yield profile_pb2_grpc.UnmergedEventServiceStub(calls)


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    client = await nats.connect(nats_url)
    yield client.jetstream()
    await client.close()


async def publish(app: ProfileApp, message_id: str, payload: bytes) -> int:
    """Straight onto the bus, past ingest: what an older ingest, or a bug, could write."""
    return (await app.event_log.publish(OutgoingMessage("identify", message_id, payload))).sequence


async def publish_event(app: ProfileApp, e: ingest_pb2.Event, message_id: str = "") -> int:
    return await publish(app, message_id or e.event_id, e.SerializeToString())


def reason_of(status: status_pb2.Status) -> str:
    info = error_details_pb2.ErrorInfo()
    for detail in status.details:
        if detail.Unpack(info):
            return info.reason
    raise AssertionError(f"no ErrorInfo in {status}")


async def set_aside(
    stub: profile_pb2_grpc.UnmergedEventServiceAsyncStub, position: int
) -> profile_pb2.UnmergedEvent:
    """The unmerged event at ``position`` in the log, once the merger has set it aside."""

    async def find() -> profile_pb2.UnmergedEvent | None:
        listed = await stub.ListUnmergedEvents(profile_pb2.ListUnmergedEventsRequest(page_size=1000))
        return next((u for u in listed.unmerged_events if u.log_position == position), None)

    return await eventually(find)


async def test_poison_events_are_set_aside_at_once_and_the_consumer_goes_on(
    profile_app: ProfileApp,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    unmerged_stub: profile_pb2_grpc.UnmergedEventServiceAsyncStub,
    js: JetStreamContext,
    unique: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="profile_service.merger")

    def set_aside_counted() -> list[float]:
        return [
            REGISTRY.get_sample_value("sendtime_profile_unmerged_events_total", {"reason": reason}) or 0.0
            for reason in ("UNSTORABLE_VALUE", "EVENT_UNDECODABLE")
        ]

    counted_before = set_aside_counted()
    nan = event(user_id=f"u-{unique}", identify=identify(score=float("nan")))
    nul = event(user_id=f"u-{unique}\x00", identify=identify(a=1))
    positions = {
        "nan": await publish_event(profile_app, nan),
        "nul": await publish_event(profile_app, nul, f"nul-{unique}"),
        "undecodable": await publish(profile_app, f"junk-{unique}", b"\xff\xff\xff not an event"),
    }
    after = event(user_id=f"ok-{unique}", identify=identify(a=1))
    await publish_event(profile_app, after)
    await wait_for_profile(profile_stub, user(f"ok-{unique}"), lambda p: p.traits["a"] == 1)

    by_nan, by_nul, junk = [
        await set_aside(unmerged_stub, positions[k]) for k in ("nan", "nul", "undecodable")
    ]
    assert (by_nan.state, by_nan.delivery_count, by_nan.event.event_id) == (PENDING, 1, nan.event_id)
    assert reason_of(by_nan.status) == "UNSTORABLE_VALUE"
    assert [(v.field, v.description) for v in field_violations(by_nan.status)] == [
        ("identify.traits.score", NOT_FINITE_DESCRIPTION)
    ]
    assert [(v.field, v.description) for v in field_violations(by_nul.status)] == [
        ("customer.user_id", NUL_DESCRIPTION)
    ]
    assert (reason_of(junk.status), junk.status.code, junk.HasField("event")) == (
        "EVENT_UNDECODABLE",
        code_pb2.INVALID_ARGUMENT,
        False,
    )
    counted = [a - b for a, b in zip(set_aside_counted(), counted_before, strict=True)]
    assert counted == [2, 1]  # for Prometheus, by reason
    # Settled for good: none of them waits for an ack or comes back.
    await eventually(lambda: _nothing_pending(js))
    ids = {nan.event_id, nul.event_id}
    assert not [r for r in caplog.records if getattr(r, "event_id", "") in ids and "retry" in r.getMessage()]


async def _nothing_pending(js: JetStreamContext) -> bool:
    pending: int = (await js.consumer_info(STREAM, CONSUMER)).num_ack_pending
    return pending == 0


class Redelivering:
    """A subscription that delivers each message again when it is retried later (at once, not
    after the delay), counting deliveries as the log does."""

    def __init__(self, payloads: list[bytes]) -> None:
        self.queue: list[Delivery] = [_Delivery(p, self, 1) for p in payloads]
        self.settled: dict[bytes, str] = {}

    async def fetch(self, max_messages: int, timeout_s: float) -> Sequence[Delivery]:
        batch, self.queue = self.queue[:max_messages], self.queue[max_messages:]
        if not batch:
            await asyncio.sleep(0.01)
        return batch

    async def close(self) -> None: ...


class _Delivery:
    def __init__(self, payload: bytes, subscription: Redelivering, attempt: int) -> None:
        self.payload, self._subscription, self.attempt = payload, subscription, attempt
        self.headers: Mapping[str, str] = {}
        self.position: int | None = None
        self.stored_at_s: float | None = None

    async def ack(self) -> None:
        self._subscription.settled[self.payload] = "acked"

    async def retry_later(self, delay_s: float) -> None:
        self._subscription.settled[self.payload] = f"retry {self.attempt}"
        self._subscription.queue.append(_Delivery(self.payload, self._subscription, self.attempt + 1))

    async def discard(self) -> None:
        self._subscription.settled[self.payload] = f"set aside after {self.attempt}"


class FailsFor(ProfileRepository):
    """The real repository, with a bug only some events meet (an exception of no known kind)."""

    def __init__(self, app: ProfileApp, event_id: str) -> None:
        super().__init__(app.pool)
        self._event_id = event_id

    async def merge_events(
        self, events: Sequence[ingest_pb2.Event], positions: Sequence[int | None] | None = None
    ) -> list[MergeResult]:
        if any(e.event_id == self._event_id for e in events):
            raise RuntimeError("a bug only this event meets")
        return await super().merge_events(events, positions)


async def test_an_unknown_failure_is_set_aside_after_max_deliveries_and_replays_once_fixed(
    profile_app: ProfileApp,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    unmerged_stub: profile_pb2_grpc.UnmergedEventServiceAsyncStub,
    unique: str,
) -> None:
    buggy = event(user_id=f"u-{unique}", identify=identify(tier="gold"))
    fine = event(user_id=f"v-{unique}", identify=identify(tier="silver"))
    subscription = Redelivering([buggy.SerializeToString(), fine.SerializeToString()])
    merger = EventMerger(
        [subscription], FailsFor(profile_app, buggy.event_id), profile_app.cache, profile_app.unmerged,
        batch_size=10, max_deliveries=3,
    )  # fmt: skip
    task = asyncio.create_task(merger.run())
    try:
        await wait_for_profile(profile_stub, user(f"v-{unique}"), lambda p: p.traits["tier"] == "silver")
        await eventually(lambda: _settled(subscription, buggy))
    finally:
        merger.stop()
        await task
    assert subscription.settled[buggy.SerializeToString()] == "set aside after 3"

    # The fix deployed: the service's own merger, without the bug, merges it on replay.
    (kept,) = [
        u
        for u in (
            await unmerged_stub.ListUnmergedEvents(profile_pb2.ListUnmergedEventsRequest(state=PENDING))
        ).unmerged_events
        if u.event.event_id == buggy.event_id
    ]
    assert (reason_of(kept.status), kept.status.code, kept.delivery_count) == (
        "MERGE_FAILED",
        code_pb2.INTERNAL,
        3,
    )
    assert kept.status.message == "RuntimeError: a bug only this event meets"
    replayed = await unmerged_stub.ReplayUnmergedEvent(profile_pb2.ReplayUnmergedEventRequest(name=kept.name))
    assert replayed.unmerged_event.state == REPLAYED and replayed.unmerged_event.HasField("replay_time")
    profile = await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: p.traits["tier"] == "gold")
    assert replayed.customer_id == profile.customer_id
    with pytest.raises(grpc.aio.AioRpcError) as twice:
        await unmerged_stub.ReplayUnmergedEvent(profile_pb2.ReplayUnmergedEventRequest(name=kept.name))
    assert twice.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def _settled(subscription: Redelivering, e: ingest_pb2.Event) -> bool:
    return subscription.settled.get(e.SerializeToString(), "").startswith("set aside")


async def test_a_poison_event_replayed_as_stored_stays_pending_with_its_reason(
    profile_app: ProfileApp, unmerged_stub: profile_pb2_grpc.UnmergedEventServiceAsyncStub, unique: str
) -> None:
    poison = event(user_id=f"u-{unique}", identify=identify(score=float("inf")))
    kept = await set_aside(unmerged_stub, await publish_event(profile_app, poison))
    again = await unmerged_stub.ReplayUnmergedEvent(profile_pb2.ReplayUnmergedEventRequest(name=kept.name))
    assert again.unmerged_event.state == PENDING and again.customer_id == ""
    assert reason_of(again.unmerged_event.status) == "UNSTORABLE_VALUE"
    for name, code in (("unmergedEvents/999999999", grpc.StatusCode.NOT_FOUND), ("events/1", None)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await unmerged_stub.ReplayUnmergedEvent(profile_pb2.ReplayUnmergedEventRequest(name=name))
        assert refused.value.code() == (code or grpc.StatusCode.INVALID_ARGUMENT)


async def test_another_event_under_a_merged_id_is_kept_as_a_conflict_and_a_resend_is_a_duplicate(
    profile_app: ProfileApp,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    unmerged_stub: profile_pb2_grpc.UnmergedEventServiceAsyncStub,
    unique: str,
) -> None:
    # Past ingest's 72-hour record of ids and the log's 2-minute window, the same id comes again.
    first = event(event_id=f"evt-{unique}", user_id=f"u-{unique}", identify=identify(tier="gold"))
    await publish_event(profile_app, first)
    merged = await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: p.traits["tier"] == "gold")
    other = event(event_id=f"evt-{unique}", user_id=f"u-{unique}", identify=identify(tier="bronze"))
    kept = await set_aside(unmerged_stub, await publish_event(profile_app, other, f"evt-{unique}-later"))
    assert (reason_of(kept.status), kept.status.code) == (CONFLICT_REASON, code_pb2.ALREADY_EXISTS)
    assert kept.event.identify.traits["tier"] == "bronze"

    resend = ingest_pb2.Event()
    resend.CopyFrom(first)
    resend.received_at.FromDatetime(datetime.now(UTC))
    await publish_event(profile_app, resend, f"evt-{unique}-resent")
    after = event(user_id=f"u-{unique}", identify=identify(step=1))
    await publish_event(profile_app, after)
    profile = await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: "step" in p.traits)
    assert profile.traits["tier"] == "gold" and profile.version == merged.version + 1
    listed = await unmerged_stub.ListUnmergedEvents(profile_pb2.ListUnmergedEventsRequest(page_size=1000))
    assert [u.event.event_id for u in listed.unmerged_events].count(f"evt-{unique}") == 1


async def test_erasing_a_person_deletes_their_unmerged_events(
    profile_app: ProfileApp,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    unmerged_stub: profile_pb2_grpc.UnmergedEventServiceAsyncStub,
    unique: str,
) -> None:
    await publish_event(profile_app, event(user_id=f"u-{unique}", identify=identify(a=1)))
    await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: "a" in p.traits)
    position = await publish_event(
        profile_app, event(user_id=f"u-{unique}", identify=identify(b=float("nan")))
    )
    await set_aside(unmerged_stub, position)

    await profile_stub.DeleteProfile(profile_pb2.DeleteProfileRequest(identifier=user(f"u-{unique}")))
    assert not await profile_app.pool.fetchval(
        "SELECT count(*) FROM unmerged_events WHERE log_position = $1", position
    )
    # Its copy in the log goes with the person's other events (profile_service.erasure_outbox).
    await eventually(lambda: _erased_from_log(profile_app, position))


async def _erased_from_log(app: ProfileApp, position: int) -> bool:
    return await app.event_log.read(position) is None


async def test_unmerged_events_past_their_retention_are_purged(profile_app: ProfileApp, unique: str) -> None:
    store = UnmergedStore(profile_app.pool, IdentifierHasher.unkeyed(), purge_chunk=2)
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT)
    payloads = [f"{unique}-{i}".encode() for i in range(5)]
    for payload in payloads:
        await store.add(payload, None, 1, status)
    await profile_app.pool.execute(
        "UPDATE unmerged_events SET created_at = now() - interval '31 days' WHERE payload = ANY($1::bytea[])",
        payloads[:3],
    )
    assert await store.purge(datetime.now(UTC) - timedelta(days=30)) >= 3
    left = await profile_app.pool.fetch(
        "SELECT payload FROM unmerged_events WHERE payload = ANY($1::bytea[])", payloads
    )
    assert sorted(bytes(r["payload"]) for r in left) == payloads[3:]


async def test_with_the_database_down_the_batch_is_held_and_merges_once_it_is_back_no_delivery_spent(
    private_postgres: tuple[str, Path],
    nats_url: str,
    redis_url: str,
    unique: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, workdir = private_postgres
    port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    bus = JetStreamSettings(
        url=nats_url,
        stream=f"DOWN_{unique}",
        subject_prefix=f"down.{unique}",
        erasure_stream=f"DOWN_ERASURES_{unique}",
        erasure_subject=f"down-erasures.{unique}",
    )
    # Deliveries of an unknown failure before it is set aside: 2. An outage spends none.
    settings: dict[str, Any] = {"database_url": url, "redis_url": redis_url, "event_log": bus}
    reader_key = await issue_key(url, [Scope.PROFILES_READ], "tests: reads while the database is down")
    app = await create_profile_app(ProfileSettings(**LOCAL_SERVER, **settings, merge_max_deliveries=2))
    await app.start()
    caplog.set_level(logging.INFO, logger="profile_service.merger")
    down = False
    try:
        before = event(user_id=f"u-{unique}", identify=identify(step=1))
        await publish_event(app, before)
        await eventually(lambda: _merged(app, before))
        devstack.stop_postgres(workdir)
        down = True
        during = event(user_id=f"u-{unique}", identify=identify(step=2))
        await publish_event(app, during)
        await eventually(lambda: _logged(caplog, "PostgreSQL unreachable"), timeout_s=20)

        # Reads that need the database answer UNAVAILABLE with a retry delay, not INTERNAL.
        async with channel(f"127.0.0.1:{app.grpc.port}", reader_key) as calls:
            profiles = profile_pb2_grpc.ProfileServiceStub(calls)
            not_cached = user(f"nobody-{unique}")
            for call in (
                profiles.GetProfile(profile_pb2.GetProfileRequest(identifier=not_cached)),
                profiles.BatchGetProfiles(profile_pb2.BatchGetProfilesRequest(identifiers=[not_cached])),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                status = status_of(refused.value)
                assert status is not None and reason_of(status) == "DATABASE_UNAVAILABLE"
                assert len(details_of(status, error_details_pb2.RetryInfo)) == 1

        devstack.start_postgres(port, workdir)
        down = False
        await eventually(lambda: _merged(app, during), timeout_s=30)
        [back] = await _logged(caplog, "PostgreSQL answers again")
        assert back.tries >= 2  # type: ignore[attr-defined]
        # Held, never handed back to the log: no retry of its own, so no attempt counted.
        assert not await _failed_deliveries(caplog, during, at_least=1)
        assert not await app.pool.fetchval("SELECT count(*) FROM unmerged_events")
    finally:
        if down:  # for the app's own shutdown
            devstack.start_postgres(port, workdir)
        await app.stop(grace_s=1)


async def _logged(caplog: pytest.LogCaptureFixture, starting: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith(starting)]


async def _merged(app: ProfileApp, e: ingest_pb2.Event) -> bool:
    try:
        return bool(await app.pool.fetchval("SELECT count(*) FROM events WHERE event_id = $1", e.event_id))
    except StoreError:  # the pool's connections from before the restart
        return False


async def _failed_deliveries(caplog: pytest.LogCaptureFixture, e: ingest_pb2.Event, at_least: int) -> bool:
    attempts = {
        getattr(r, "attempt", 0)
        for r in caplog.records
        if r.getMessage() == "merge failed, will retry" and getattr(r, "event_id", "") == e.event_id
    }
    return len(attempts) >= at_least


def test_the_merger_s_limits_are_settings() -> None:
    env = {"PROFILE_MERGE_MAX_DELIVERIES": "3", "PROFILE_DEAD_LETTER_RETENTION_DAYS": "7"}
    settings = ProfileSettings.from_env(env)
    assert (settings.merge_max_deliveries, settings.dead_letter_retention_days) == (3, 7)
    assert (ProfileSettings().merge_max_deliveries, ProfileSettings().dead_letter_retention_days) == (10, 30)


@pytest.mark.parametrize(
    ("exc", "unavailable"),
    [
        (ConnectionRefusedError(), True),  # down
        (TimeoutError(), True),  # the pool could not connect in time
        (asyncpg.CannotConnectNowError("the database system is starting up"), True),
        (asyncpg.AdminShutdownError("terminating connection due to administrator command"), True),
        (asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"), True),
        # PostgreSQL answered: the batch is retried event by event, as before.
        (asyncpg.QueryCanceledError("canceling statement due to statement timeout"), False),
        (asyncpg.DeadlockDetectedError("deadlock detected"), False),
        (asyncpg.DataError("invalid byte sequence"), False),
    ],
)
def test_only_an_unreachable_postgresql_holds_the_batch_or_answers_unavailable(
    exc: Exception, unavailable: bool
) -> None:
    assert unreachable(exc) is unavailable
    if unavailable:  # also what it was before: transient, never set aside
        assert failure_kind(exc) is FailureKind.TRANSIENT
