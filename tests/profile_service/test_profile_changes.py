"""Profile change notices: each merged event is announced once on the profile change stream,
after its merge committed, with the customer it was stitched to (and the customers merged into
it); none for duplicates, conflicts or erased late events; in commit order per customer; held
in the outbox while NATS is down or the relay is gone, and published once it is back; an
erasure deletes a person's pending changes. Real PostgreSQL, NATS and services."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import asyncpg
import pytest

import devstack
from profile_service.change_outbox import (
    PUBLISH_BATCH,
    RELAY_LOCK,
    ProfileChangeOutbox,
    change_id,
)
from profile_service.repository import ProfileRepository, create_pool
from profile_service.server import MIGRATIONS_DIR, ProfileApp
from profile_service.server import create_app as create_profile_app
from profile_service.settings import Settings as ProfileSettings
from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime_common.event_log import (
    EventLog,
    EventLogSubscription,
    EventLogUnavailable,
    JetStreamEventLog,
    JetStreamSettings,
    OutgoingMessage,
    PublishOutcome,
    PublishReceipt,
)
from sendtime_common.identifiers import IdentifierKind
from sendtime_common.migrate import migrate
from tests.conftest import LOCAL_SERVER, empty_database, eventually, times_logged, user, wait_for_profile
from tests.factories import cart_item_added, event, identify, product_viewed, timestamp
from tests.profile_service.test_identity_and_privacy import anonymous
from tests.profile_service.test_profile_service import send


class Changes:
    """What a durable consumer of the profile change stream has read so far (it acks each)."""

    def __init__(self, subscription: EventLogSubscription) -> None:
        self.subscription = subscription
        self.read: list[profile_pb2.ProfileChange] = []

    @classmethod
    async def follow(cls, log: EventLog, durable_name: str) -> Changes:
        return cls(await log.subscribe_profile_changes(durable_name))

    async def read_more(self, timeout_s: float = 0.2) -> int:
        deliveries = await self.subscription.fetch(200, timeout_s=timeout_s)
        for delivery in deliveries:
            self.read.append(profile_pb2.ProfileChange.FromString(delivery.payload))
            await delivery.ack()
        return len(deliveries)

    async def until(
        self, enough: Callable[[list[profile_pb2.ProfileChange]], bool], timeout_s: float = 10
    ) -> None:
        async def check() -> bool:
            await self.read_more()
            return enough(self.read)

        await eventually(check, timeout_s)

    async def of(self, *events: ingest_pb2.Event, timeout_s: float = 10) -> list[profile_pb2.ProfileChange]:
        """The changes of ``events``, once each has one, and after the stream had nothing more
        for a moment (so a second copy of one would be here too); in the order read."""
        ids = {e.event_id for e in events}
        await self.until(lambda read: ids <= {c.event.event_id for c in read}, timeout_s)
        while await self.read_more(timeout_s=0.3):
            pass
        return [c for c in self.read if c.event.event_id in ids]

    async def close(self) -> None:
        await self.subscription.close()


@pytest.fixture
async def changes(profile_app: ProfileApp, unique: str) -> AsyncIterator[Changes]:
    """A durable consumer of the session's profile change stream, from its start."""
    following = await Changes.follow(profile_app.event_log, f"test-{unique}")
    yield following
    await following.close()


async def test_a_merged_event_is_announced_once_after_its_commit_with_its_customer_and_the_event(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    profile_app: ProfileApp,
    changes: Changes,
    unique: str,
) -> None:
    hello = event(user_id=f"u-{unique}", identify=identify(first_name="Ada"))
    await send(ingest_stub, hello)
    await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: "first_name" in p.traits)
    # Read once (cached in full), so a stale copy would show below.
    await profile_stub.GetProfile(profile_pb2.GetProfileRequest(identifier=user(f"u-{unique}")))
    add = event(user_id=f"u-{unique}", cart_item_added=cart_item_added("TRAIL-42"))
    await send(ingest_stub, add)

    # A consumer reading the profile as soon as it hears the change finds the event in it: the
    # first item of a cart is there (cart.items EXISTS holds at an episode's open).
    await changes.until(lambda read: any(c.event.event_id == add.event_id for c in read))
    heard = next(c for c in changes.read if c.event.event_id == add.event_id)
    profile = (
        await profile_stub.GetProfile(profile_pb2.GetProfileRequest(identifier=user(f"u-{unique}")))
    ).profile
    assert profile.version >= heard.profile_version
    assert [item.sku for item in profile.cart.items] == ["TRAIL-42"]

    announced = await changes.of(hello, add)
    assert [c.event.event_id for c in announced] == [hello.event_id, add.event_id]  # once each, in order
    first, second = announced
    assert {c.customer_id for c in announced} == {profile.customer_id}
    assert second.event.cart_item_added == add.cart_item_added  # the event as merged
    assert second.event.received_at.seconds > 0  # stamped by ingest
    assert first.sequence < second.sequence
    assert first.profile_version < second.profile_version <= profile.version
    assert list(second.merged_customer_ids) == []
    assert second.change_id == f"{second.sequence}-{second.customer_id}" != first.change_id
    assert second.merge_time.ToDatetime(tzinfo=UTC) > datetime.now(UTC) - timedelta(minutes=1)
    position = await profile_app.pool.fetchval(
        "SELECT log_position FROM events WHERE event_id = $1", add.event_id
    )
    assert second.log_position == position > 0

    async def outbox_empty() -> bool:  # taken out once published
        return not await profile_app.pool.fetchval(
            "SELECT count(*) FROM profile_change_outbox WHERE event_id = ANY($1::text[])",
            [hello.event_id, add.event_id],
        )

    await eventually(outbox_empty, timeout_s=5)


async def test_a_stitch_of_two_customers_names_the_merged_one(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    changes: Changes,
    unique: str,
) -> None:
    browse = event(anonymous_id=f"a-{unique}", product_viewed=product_viewed("sku-1"))
    await send(ingest_stub, browse)
    visitor = await wait_for_profile(profile_stub, anonymous(f"a-{unique}"), lambda p: True)
    signup = event(user_id=f"u-{unique}", identify=identify(first_name="Ada"))
    await send(ingest_stub, signup)
    account = await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: True)
    alias = event(
        user_id=f"u-{unique}",
        alias=ingest_pb2.Alias(other=ingest_pb2.CustomerIdentifiers(anonymous_id=f"a-{unique}")),
    )
    await send(ingest_stub, alias)

    announced = await changes.of(browse, signup, alias)
    assert [(c.event.event_id, c.customer_id, list(c.merged_customer_ids)) for c in announced] == [
        (browse.event_id, visitor.customer_id, []),
        (signup.event_id, account.customer_id, []),
        # The older customer survives; episodes of the account move to it.
        (alias.event_id, visitor.customer_id, [account.customer_id]),
    ]
    merged = await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: len(p.merges) == 1)
    assert merged.version >= announced[-1].profile_version > account.version


async def test_a_customer_s_changes_reach_a_durable_consumer_in_commit_order(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    changes: Changes,
    unique: str,
) -> None:
    ada = [event(user_id=f"ada-{unique}", identify=identify(step=i)) for i in range(60)]
    grace = [event(user_id=f"grace-{unique}", identify=identify(step=i)) for i in range(60)]
    for start in range(0, 60, 15):  # several calls, so several merge batches; interleaved
        mixed = [
            e for pair in zip(ada[start : start + 15], grace[start : start + 15], strict=True) for e in pair
        ]
        await send(ingest_stub, *mixed)

    announced = await changes.of(*ada, *grace)
    for person in (ada, grace):
        ids = {e.event_id for e in person}
        theirs = [c for c in announced if c.event.event_id in ids]
        assert [c.event.event_id for c in theirs] == [e.event_id for e in person]
        assert [c.sequence for c in theirs] == sorted(c.sequence for c in theirs)
        versions = [c.profile_version for c in theirs]
        assert versions == sorted(versions)


# --- The outbox and its relay, on a database and a NATS of the test's own -----------------------


@pytest.fixture
async def own_database() -> AsyncIterator[str]:
    """A database of its own: no relay but the test's publishes its outbox."""
    async with empty_database("sendtime_changes") as url:
        yield url


@pytest.fixture
async def pool(own_database: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on it, migrated."""
    made = await create_pool(own_database, min_size=1, max_size=4)
    try:
        await migrate(made, MIGRATIONS_DIR, table="schema_migrations")
        yield made
    finally:
        await made.close()


def bus(url: str, unique: str, **overrides: Any) -> JetStreamSettings:
    """Streams of the test's own on ``url``."""
    return JetStreamSettings(
        url=url,
        stream=f"EVENTS_{unique}",
        subject_prefix=f"events.{unique}",
        erasure_stream=f"ERASURES_{unique}",
        erasure_subject=f"erasures.{unique}",
        profile_change_stream=f"CHANGES_{unique}",
        profile_change_subject_prefix=f"changes.{unique}",
        **overrides,
    )


async def outbox(pool: asyncpg.Pool) -> list[tuple[str, str | None, list[str]]]:
    """The changes waiting: customer id, event id, merged customer ids; oldest first."""
    rows = await pool.fetch(
        "SELECT customer_id, event_id, merged_customer_ids FROM profile_change_outbox ORDER BY id"
    )
    return [(str(r["customer_id"]), r["event_id"], [str(m) for m in r["merged_customer_ids"]]) for r in rows]


async def test_duplicates_conflicts_and_late_events_of_an_erased_person_leave_no_change(
    pool: asyncpg.Pool, unique: str
) -> None:
    repository = ProfileRepository(pool)
    first = event(user_id=f"u-{unique}", identify=identify(first_name="Ada"))
    (merged,) = await repository.merge_events([first])
    assert await outbox(pool) == [(merged.customer_id, first.event_id, [])]
    version = await pool.fetchval("SELECT profile_version FROM profile_change_outbox")
    assert merged.profile is not None and version == merged.profile.stored.version

    # Redelivered after a crash between the commit and the ack: its change came with the commit.
    again, conflict, copy = await repository.merge_events(
        [
            first,
            event(event_id=first.event_id, user_id=f"u-{unique}", identify=identify(first_name="Eve")),
            first,
        ]
    )
    assert again.duplicate and conflict.conflict and copy.duplicate
    assert len(await outbox(pool)) == 1

    # One batch: an event, the same one again, and its conflicting twin: one change.
    fresh = event(user_id=f"u-{unique}", identify=identify(step=2))
    twin = event(event_id=fresh.event_id, user_id=f"u-{unique}", identify=identify(step=3))
    results = await repository.merge_events([fresh, fresh, twin])
    assert [(r.duplicate, r.conflict) for r in results] == [(False, False), (True, False), (False, True)]
    assert [event_id for _, event_id, _ in await outbox(pool)] == [first.event_id, fresh.event_id]

    await repository.delete_customer((IdentifierKind.USER_ID, f"u-{unique}"))
    late = event(user_id=f"u-{unique}", identify=identify(first_name="Ada"))
    late.occurred_at.CopyFrom(timestamp(datetime.now(UTC) - timedelta(minutes=5)))
    (dropped,) = await repository.merge_events([late])
    assert dropped.erased
    assert await outbox(pool) == []  # the erasure took the others, the late one left none


async def test_a_stitch_inside_one_batch_names_the_merged_customer_and_every_change_the_survivor(
    pool: asyncpg.Pool, unique: str
) -> None:
    repository = ProfileRepository(pool)
    (older,) = await repository.merge_events([event(anonymous_id=f"a-{unique}", identify=identify(a=1))])
    (newer,) = await repository.merge_events([event(user_id=f"u-{unique}", identify=identify(b=1))])
    await pool.execute("DELETE FROM profile_change_outbox")
    before = event(user_id=f"u-{unique}", identify=identify(b=2))  # to the account, merged next
    alias = event(
        user_id=f"u-{unique}",
        alias=ingest_pb2.Alias(other=ingest_pb2.CustomerIdentifiers(anonymous_id=f"a-{unique}")),
    )
    results = await repository.merge_events([before, alias])
    assert {r.customer_id for r in results} == {older.customer_id}
    assert await outbox(pool) == [
        (older.customer_id, before.event_id, []),
        (older.customer_id, alias.event_id, [newer.customer_id]),
    ]
    versions = await pool.fetch("SELECT profile_version FROM profile_change_outbox")
    final = await pool.fetchval(
        "SELECT version FROM customers WHERE customer_id = $1", uuid.UUID(older.customer_id)
    )
    assert {r["profile_version"] for r in versions} == {final}  # one commit, one version


async def test_an_erasure_deletes_the_person_s_pending_changes_under_every_id_they_had(
    pool: asyncpg.Pool, unique: str
) -> None:
    repository = ProfileRepository(pool)
    await repository.merge_events([event(anonymous_id=f"a-{unique}", identify=identify(a=1))])
    await repository.merge_events([event(user_id=f"u-{unique}", identify=identify(b=1))])
    await repository.merge_events(
        [
            event(
                user_id=f"u-{unique}",
                alias=ingest_pb2.Alias(other=ingest_pb2.CustomerIdentifiers(anonymous_id=f"a-{unique}")),
            )
        ]
    )
    other = event(user_id=f"other-{unique}", identify=identify(c=1))
    await repository.merge_events([other])
    assert len({customer for customer, _, _ in await outbox(pool)}) == 3  # visitor, account, other

    await repository.delete_customer((IdentifierKind.ANONYMOUS_ID, f"a-{unique}"))
    assert [event_id for _, event_id, _ in await outbox(pool)] == [other.event_id]


@dataclass
class ScriptedLog:
    """An event log whose profile-change publishes get the outcomes given, in turn."""

    outcomes: list[list[str]]  # "ok" or "down" per change, per call
    published: list[list[str]]

    async def publish_profile_changes(self, changes: Sequence[OutgoingMessage]) -> list[PublishOutcome]:
        script = self.outcomes.pop(0)
        self.published.append([c.message_id for c in changes])
        return [
            PublishReceipt(sequence=i, duplicate=False) if s == "ok" else EventLogUnavailable("down")
            for i, s in enumerate(script[: len(changes)])
        ]


async def test_only_the_confirmed_prefix_is_taken_out_so_what_follows_a_refused_change_goes_again_after_it(
    pool: asyncpg.Pool, unique: str
) -> None:
    await ProfileRepository(pool).merge_events(
        [event(user_id=f"u-{unique}", identify=identify(step=i)) for i in range(4)]
    )
    ids = [
        change_id(r["id"], str(r["customer_id"]))
        for r in await pool.fetch("SELECT id, customer_id FROM profile_change_outbox ORDER BY id")
    ]
    log = ScriptedLog(outcomes=[["ok", "down", "ok", "ok"], ["ok", "ok", "ok"]], published=[])
    relay = ProfileChangeOutbox(pool, cast(EventLog, log))

    with pytest.raises(EventLogUnavailable):
        await relay.publish_changes()
    assert len(await outbox(pool)) == 3  # the second and the two stored after it stay
    assert await relay.publish_changes() == 3
    assert log.published == [ids, ids[1:]]  # again in order, from the refused one
    assert await outbox(pool) == []


async def test_a_relay_finding_another_replicas_at_work_waits_in_no_lock_and_publishes_after_it(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch, unique: str
) -> None:
    await ProfileRepository(pool).merge_events([event(user_id=f"u-{unique}", identify=identify(a=1))])
    log = ScriptedLog(outcomes=[["ok"]], published=[])
    relay = ProfileChangeOutbox(pool, cast(EventLog, log), retry_after_s=30)  # no timed retry
    other_replica = await pool.acquire()
    try:
        held = other_replica.transaction()
        await held.start()
        await other_replica.execute("SELECT pg_advisory_xact_lock($1, $2)", *RELAY_LOCK)
        # A lock wait would sit here until the other commits, which it does not before this ends.
        async with asyncio.timeout(10):
            assert await relay.publish_changes() is None

        # The rounds the running relay found the other's at work (publish_changes said None).
        busy_rounds = 0
        publish_changes = relay.publish_changes

        async def counted() -> int | None:
            nonlocal busy_rounds
            taken = await publish_changes()
            busy_rounds += taken is None
            return taken

        monkeypatch.setattr(relay, "publish_changes", counted)
        running = asyncio.create_task(relay.run())

        async def tried_again() -> bool:
            return busy_rounds >= 2  # found it busy, waited RELAY_BUSY_RETRY_S, found it busy again

        await eventually(tried_again)
        assert log.published == []  # still the other's turn
        await held.commit()

        async def outbox_empty() -> bool:
            return not await outbox(pool)

        # Well before retry_after_s: the next busy retry, not a timed round, publishes it.
        await eventually(outbox_empty, timeout_s=15)
        relay.stop()
        await running
    finally:
        await pool.release(other_replica)
    assert len(log.published) == 1 and len(log.published[0]) == 1


@dataclass
class BrokenOnceLog:
    """An event log whose first profile-change publish fails in a way nobody planned for."""

    published: list[list[str]]

    async def publish_profile_changes(self, changes: Sequence[OutgoingMessage]) -> list[PublishOutcome]:
        if not self.published:
            self.published.append([])
            raise RuntimeError("a bug")
        self.published.append([c.message_id for c in changes])
        return [PublishReceipt(sequence=i, duplicate=False) for i, _ in enumerate(changes)]


async def test_the_relay_outlives_a_failed_round_and_publishes_the_rows_at_the_next(
    pool: asyncpg.Pool, unique: str
) -> None:
    await ProfileRepository(pool).merge_events([event(user_id=f"u-{unique}", identify=identify(a=1))])
    log = BrokenOnceLog(published=[])
    relay = ProfileChangeOutbox(pool, cast(EventLog, log), retry_after_s=0.05)
    running = asyncio.create_task(relay.run())
    try:

        async def outbox_empty() -> bool:
            return not await outbox(pool)

        await eventually(outbox_empty)
    finally:
        relay.stop()
        await running
    assert [len(batch) for batch in log.published[:2]] == [0, 1]


async def test_with_nats_down_changes_wait_in_the_outbox_and_go_out_in_order_once_it_is_back(
    pool: asyncpg.Pool, tmp_path: Path, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="profile_service.change_outbox")
    port = devstack.free_port()
    nats = devstack.start_nats(port, tmp_path / "nats")
    log = await JetStreamEventLog.connect(bus(f"nats://127.0.0.1:{port}", unique, publish_timeout_s=0.3))
    relay = ProfileChangeOutbox(pool, log, retry_after_s=0.2)
    running = asyncio.create_task(relay.run())
    repository = ProfileRepository(pool)
    events = [event(user_id=f"u-{unique}", identify=identify(step=i)) for i in range(5)]
    try:
        devstack.stop_process(nats)
        for e in events:  # five commits while NATS is down
            await repository.merge_events([e])
            relay.wake()

        # Several rounds since the last commit, each refused (as the relay says; a fixed wait also
        # passed while it had not tried once): the changes stay, in order.
        refusal = "profile changes not published yet; retrying"
        before = times_logged(caplog, refusal)

        async def refused_twice() -> bool:
            return times_logged(caplog, refusal) >= before + 2

        await eventually(refused_twice)
        assert [event_id for _, event_id, _ in await outbox(pool)] == [e.event_id for e in events]

        nats = devstack.start_nats(port, tmp_path / "nats")  # the same store: the stream is kept

        async def outbox_empty() -> bool:
            return not await outbox(pool)

        await eventually(outbox_empty, timeout_s=15)
        changes = await Changes.follow(log, "after-the-outage")
        try:
            announced = await changes.of(*events)
        finally:
            await changes.close()
        assert [c.event.event_id for c in announced] == [e.event_id for e in events]
    finally:
        relay.stop()
        await running
        await log.close()
        devstack.stop_process(nats)


async def test_two_replicas_relays_publish_each_change_once_and_in_order(
    pool: asyncpg.Pool, nats_url: str, unique: str
) -> None:
    logs = [await JetStreamEventLog.connect(bus(nats_url, unique)) for _ in range(2)]
    relays = [ProfileChangeOutbox(pool, log, retry_after_s=0.05) for log in logs]
    running = [asyncio.create_task(relay.run()) for relay in relays]
    repository = ProfileRepository(pool)
    events = [
        event(user_id=f"u-{unique}-{i % 3}", identify=identify(step=i)) for i in range(3 * PUBLISH_BATCH)
    ]
    try:
        for start in range(0, len(events), 100):
            await repository.merge_events(events[start : start + 100])
            for relay in relays:
                relay.wake()
        changes = await Changes.follow(logs[0], "replicas")
        try:
            announced = await changes.of(*events, timeout_s=30)
        finally:
            await changes.close()
        assert [c.event.event_id for c in announced] == [e.event_id for e in events]
    finally:
        for relay in relays:
            relay.stop()
        await asyncio.gather(*running)
        for log in logs:
            await log.close()


async def test_changes_committed_by_a_service_killed_before_publishing_are_published_by_the_next(
    pool: asyncpg.Pool,
    own_database: str,
    nats_url: str,
    redis_url: str,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = ProfileSettings(
        **LOCAL_SERVER,
        database_url=own_database,
        redis_url=redis_url,
        event_log=bus(nats_url, unique),
    )
    killed = await create_profile_app(settings)

    async def never() -> None:  # the relay of a process killed right after its merges committed
        return None

    monkeypatch.setattr(killed.change_outbox, "run", never)
    await killed.start()
    events = [event(user_id=f"u-{unique}", cart_item_added=cart_item_added(f"sku-{i}")) for i in range(3)]
    try:
        for e in events:
            await killed.event_log.publish(
                OutgoingMessage("cart_item_added", e.event_id, e.SerializeToString())
            )

        async def merged() -> bool:
            return len(await outbox(pool)) == len(events)

        await eventually(merged)
    finally:
        await killed.stop(grace_s=1)
    assert len(await outbox(pool)) == len(events)  # committed, never published

    restarted = await create_profile_app(settings)
    await restarted.start()
    try:
        changes = await Changes.follow(restarted.event_log, "after-the-restart")
        try:
            announced = await changes.of(*events)
        finally:
            await changes.close()
        assert [c.event.event_id for c in announced] == [e.event_id for e in events]
        assert await outbox(pool) == []
    finally:
        await restarted.stop(grace_s=1)
