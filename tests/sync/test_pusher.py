"""sync.profile_attributes, the pending marks (sync.push.PendingPushes), the change follower
(sync.changes) and a push run (sync.pusher) into the local Braze, on a database of their own:
what a change marks, what a run sends, what it settles and what it keeps for the next run."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
import pytest
from google.protobuf import json_format, timestamp_pb2

from sendtime.ingest.v1 import ingest_pb2
from sendtime.profile.v1 import profile_pb2
from sendtime_common.migrate import migrate
from sync.braze import BrazeAttributes
from sync.changes import ChangeFollower, change_of
from sync.profile_attributes import push_item, selected_attributes
from sync.profiles import ProfilesUnavailable
from sync.provider_http import ApiKey, ProviderApi, ProviderLimits
from sync.push import Change, ItemOutcome, ItemResult, PendingMark, PendingPushes, PushItem, PushLedger
from sync.pusher import run_push
from sync.runner import RunReport
from sync.store import MIGRATIONS_DIR, MIGRATIONS_TABLE, ConnectorStore
from tests.conftest import empty_database
from tests.sync.braze_server import BrazeServer
from tests.sync.provider_server import Scripted

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def _profile(
    customer_id: str, version: int, *, user_id: str = "", email: str = "", **traits: object
) -> profile_pb2.Profile:
    profile = profile_pb2.Profile(customer_id=customer_id, version=version)
    if user_id:
        profile.identifiers.add(kind=profile_pb2.IDENTIFIER_KIND_USER_ID, value=user_id)
    if email:
        profile.identifiers.add(kind=profile_pb2.IDENTIFIER_KIND_EMAIL, value=email)
    if traits:
        json_format.ParseDict(traits, profile.traits)
    return profile


# --- what a profile pushes (pure) -----------------------------------------------------------------


def test_the_named_traits_and_computed_attributes_the_profile_has_a_value_for() -> None:
    profile = _profile("c1", 3, user_id="42", first_name="Ada", tier="gold")
    profile.orders.count = 3
    profile.orders.lifetime_value.add(currency_code="EUR", units=120, nanos=500_000_000)
    profile.orders.last_order_time.CopyFrom(timestamp_pb2.Timestamp(seconds=1_790_000_000))
    profile.loyalty.tier = "silver"
    profile.consents.add(channel=ingest_pb2.CHANNEL_SMS, subscribed=True)
    profile.consents.add(channel=ingest_pb2.CHANNEL_EMAIL, subscribed=False)
    names = [
        "first_name",
        "city",
        "orders_count",
        "lifetime_value",
        "last_order_at",
        "loyalty_tier",
        "email_subscribed",
        "last_seen_at",
    ]
    assert selected_attributes(profile, names) == {
        "first_name": "Ada",
        "orders_count": 3,
        "lifetime_value": 120.5,
        "last_order_at": "2026-09-21T14:13:20Z",
        "loyalty_tier": "silver",
        "email_subscribed": False,
    }  # city and last_seen_at: no value, left out (not sent empty)


def test_a_customer_is_pushed_by_user_id_or_email_and_an_anonymous_one_not_at_all() -> None:
    item = push_item(_profile("c1", 7, user_id="42", email="ada@example.com", tier="gold"), ["tier"])
    assert item is not None
    assert (item.customer_key, item.version, item.external_id, item.email) == (
        "c1",
        7,
        "42",
        "ada@example.com",
    )
    assert dict(item.attributes) == {"tier": "gold"}
    assert push_item(_profile("c2", 1, tier="gold"), ["tier"]) is None


def test_a_change_marks_its_customer_at_its_version_and_merge_time() -> None:
    change = profile_pb2.ProfileChange(customer_id="c1", profile_version=9)
    change.merge_time.FromDatetime(T0)
    assert change_of(change, stored_at_s=None) == Change("c1", 9, T0)
    unset = profile_pb2.ProfileChange(customer_id="c1", profile_version=9)
    assert change_of(unset, stored_at_s=T0.timestamp()) == Change("c1", 9, T0)
    assert change_of(profile_pb2.ProfileChange(profile_version=1), stored_at_s=None) is None


# --- the pending marks ------------------------------------------------------------------------------


@pytest.fixture
async def pool() -> AsyncIterator[asyncpg.Pool]:
    async with empty_database("sync_pusher") as url:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
        await migrate(pool, MIGRATIONS_DIR, MIGRATIONS_TABLE)
        yield pool
        await pool.close()


async def test_marks_keep_the_newest_version_and_the_oldest_time_per_destination(pool: asyncpg.Pool) -> None:
    pending = PendingPushes(pool)
    await pending.mark(
        ["braze", "mailchimp"], [Change("b", 2, T0), Change("a", 5, T0 + timedelta(seconds=9))]
    )
    await pending.mark(["braze"], [Change("a", 4, T0), Change("a", 7, T0 + timedelta(seconds=30))])
    assert await pending.page("braze", "", 10) == [PendingMark("a", 7), PendingMark("b", 2)]
    assert await pending.page("braze", "a", 10) == [PendingMark("b", 2)]
    assert await pending.page("mailchimp", "", 1) == [PendingMark("a", 5)]
    summary = await pending.summary(["braze", "mailchimp", "sendgrid"])
    assert (summary["braze"].count, summary["braze"].oldest) == (2, T0)
    assert summary["sendgrid"].count == 0 and summary["sendgrid"].oldest is None


async def test_a_settle_deletes_only_the_marks_its_version_reaches(pool: asyncpg.Pool) -> None:
    pending = PendingPushes(pool)
    await pending.mark(["braze"], [Change("a", 5, T0), Change("b", 5, T0)])
    await pending.settle("braze", {"a": 5, "b": 4})  # b changed again after the profile was read
    assert await pending.page("braze", "", 10) == [PendingMark("b", 5)]


async def test_an_erased_customer_leaves_no_mark_and_no_ledger_row(pool: asyncpg.Pool) -> None:
    pending, ledger = PendingPushes(pool), PushLedger(pool)
    await pending.mark(["braze", "mailchimp"], [Change("gone", 3, T0), Change("kept", 3, T0)])
    assert await ledger.forget("gone") == 2
    assert await pending.page("braze", "", 10) == [PendingMark("kept", 3)]


# --- the change follower ----------------------------------------------------------------------------


@dataclass
class _Delivery:
    payload: bytes
    attempt: int = 1
    position: int | None = 1
    stored_at_s: float | None = None
    headers: dict[str, str] = field(default_factory=dict)
    outcome: str = ""

    async def ack(self) -> None:
        self.outcome = "ack"

    async def retry_later(self, delay_s: float) -> None:
        self.outcome = "retry"

    async def discard(self) -> None:
        self.outcome = "discard"


def _change(customer_id: str, version: int) -> _Delivery:
    message = profile_pb2.ProfileChange(customer_id=customer_id, profile_version=version)
    message.merge_time.FromDatetime(T0)
    return _Delivery(message.SerializeToString())


async def test_a_batch_of_changes_is_marked_for_every_destination_then_acknowledged(
    pool: asyncpg.Pool,
) -> None:
    pending = PendingPushes(pool)
    follower = ChangeFollower(event_log=None, pending=pending, destinations=["braze", "sendgrid"])  # type: ignore[arg-type]
    batch = [_change("a", 1), _Delivery(b"\xff not a change"), _change("a", 2), _change("b", 1)]
    await follower.apply_batch(batch)
    assert [d.outcome for d in batch] == ["ack", "discard", "ack", "ack"]
    assert await pending.page("sendgrid", "", 10) == [PendingMark("a", 2), PendingMark("b", 1)]


async def test_changes_whose_marks_cannot_be_stored_go_back_to_the_log() -> None:
    async with empty_database("sync_pusher_down") as url:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
        await migrate(pool, MIGRATIONS_DIR, MIGRATIONS_TABLE)
        await pool.execute("DROP TABLE sync_push_pending")  # the statement fails as with the store away
        follower = ChangeFollower(event_log=None, pending=PendingPushes(pool), destinations=["braze"])  # type: ignore[arg-type]
        batch = [_change("a", 1), _change("b", 1)]
        try:
            await follower.apply_batch(batch)
        finally:
            await pool.close()
    assert [d.outcome for d in batch] == ["retry", "retry"]


# --- a push run -------------------------------------------------------------------------------------


class _Profiles:
    """The live profiles, as the test sets them (the profile service's answer)."""

    def __init__(self) -> None:
        self.profiles: dict[str, profile_pb2.Profile] = {}
        self.down = False
        self.reads = 0

    async def get_many(self, customer_ids: Sequence[str]) -> dict[str, profile_pb2.Profile | None]:
        if self.down:
            raise ProfilesUnavailable("the profile service did not answer: UNAVAILABLE")
        self.reads += len(customer_ids)
        return {c: self.profiles.get(c) for c in customer_ids}

    def change(self, pending_marks: list[Change], profile: profile_pb2.Profile) -> None:
        self.profiles[profile.customer_id] = profile
        pending_marks.append(Change(profile.customer_id, profile.version, datetime.now(UTC)))


@pytest.fixture
async def braze() -> AsyncIterator[BrazeServer]:
    server = await BrazeServer().start()
    yield server
    await server.stop()


@pytest.fixture
async def api(braze: BrazeServer) -> AsyncIterator[ProviderApi]:
    assert braze.api_key is not None
    limits = ProviderLimits(requests=3000, per_s=3.0, backoff_initial_s=0.01, backoff_max_s=0.05, attempts=2)
    api = ProviderApi("braze", braze.url, ApiKey(braze.api_key), limits)
    yield api
    await api.aclose()


@dataclass
class _Push:
    pool: asyncpg.Pool
    api: ProviderApi
    profiles: _Profiles = field(default_factory=_Profiles)
    marks: list[Change] = field(default_factory=list)

    async def changed(self, *profiles: profile_pb2.Profile) -> None:
        for profile in profiles:
            self.profiles.change(self.marks, profile)
        await PendingPushes(self.pool).mark(["braze"], self.marks)
        self.marks.clear()

    async def run(self, page_size: int = 500) -> RunReport:
        return await run_push(
            "braze",
            BrazeAttributes(self.api),
            ["first_name", "tier", "orders_count"],
            PendingPushes(self.pool),
            PushLedger(self.pool),
            self.profiles,
            ConnectorStore(self.pool),
            interval_s=30,
            page_size=page_size,
        )

    async def waiting(self) -> int:
        return (await PendingPushes(self.pool).summary(["braze"]))["braze"].count


async def test_a_run_pushes_the_changed_customers_and_settles_their_marks(
    pool: asyncpg.Pool, api: ProviderApi, braze: BrazeServer
) -> None:
    push = _Push(pool, api)
    await push.changed(
        *(_profile(f"c{n:03}", 1, user_id=str(n), tier="gold", city="Leeds") for n in range(120))
    )
    await push.changed(_profile("anon", 1, tier="gold"))  # neither a user id nor an address
    report = await push.run(page_size=50)
    assert (report.error, report.pages, report.pushed, report.skipped) == ("", 3, 120, 1)
    assert braze.users["external_id:7"] == {"tier": "gold"}  # city was not selected
    assert await push.waiting() == 0
    state = await ConnectorStore(pool).load("braze")
    assert state.items_pushed_total == 120 and state.last_success_at is not None


async def test_a_change_to_a_trait_not_pushed_sends_nothing_and_a_change_to_one_pushed_does(
    pool: asyncpg.Pool, api: ProviderApi, braze: BrazeServer
) -> None:
    push = _Push(pool, api)
    await push.changed(_profile("c1", 1, user_id="1", tier="gold", city="Leeds"))
    await push.run()
    requests = len(braze.batch_sizes)
    await push.changed(_profile("c1", 2, user_id="1", tier="gold", city="York"))
    report = await push.run()
    assert (report.pushed, report.unchanged, len(braze.batch_sizes)) == (0, 1, requests)
    await push.changed(_profile("c1", 3, user_id="1", tier="platinum", city="York"))
    report = await push.run()
    assert report.pushed == 1 and braze.users["external_id:1"] == {"tier": "platinum"}
    assert [a for a in braze.applied if a[1] == "tier"] == [
        ("external_id:1", "tier", "gold"),
        ("external_id:1", "tier", "platinum"),
    ]


async def test_a_customer_gone_since_the_change_is_settled_and_nothing_sent(
    pool: asyncpg.Pool, api: ProviderApi, braze: BrazeServer
) -> None:
    push = _Push(pool, api)
    await push.changed(_profile("c1", 1, user_id="1", tier="gold"))
    del push.profiles.profiles["c1"]  # erased, or merged into another
    report = await push.run()
    assert (report.pushed, report.skipped, braze.users, await push.waiting()) == (0, 1, {}, 0)


async def test_a_provider_or_profile_service_away_keeps_the_marks_for_a_later_run(
    pool: asyncpg.Pool, api: ProviderApi, braze: BrazeServer
) -> None:
    push = _Push(pool, api)
    await push.changed(_profile("c1", 1, user_id="1", tier="gold"))
    push.profiles.down = True
    report = await push.run()
    assert report.error.startswith("ProfilesUnavailable") and await push.waiting() == 1
    push.profiles.down = False
    braze.script.extend([Scripted(503), Scripted(503)])  # every attempt of the request
    report = await push.run()
    assert report.error.startswith("ProviderUnavailable") and await push.waiting() == 1
    state = await ConnectorStore(pool).load("braze")
    assert state.consecutive_failures == 2 and state.next_run_at is not None
    report = await push.run()
    assert (report.error, report.pushed, await push.waiting()) == ("", 1, 0)


async def test_a_customer_changed_during_a_run_is_pushed_by_the_next(
    pool: asyncpg.Pool, api: ProviderApi, braze: BrazeServer
) -> None:
    push = _Push(pool, api)
    await push.changed(_profile("c1", 1, user_id="1", tier="gold"))
    # The run reads version 1; by the time it settles, a change to version 2 has been marked.
    await PendingPushes(pool).mark(["braze"], [Change("c1", 2, datetime.now(UTC))])
    await push.run()
    assert await push.waiting() == 1
    push.profiles.profiles["c1"] = _profile("c1", 2, user_id="1", tier="platinum")
    await push.run()
    assert braze.users["external_id:1"] == {"tier": "platinum"} and await push.waiting() == 0


async def test_items_braze_refuses_are_settled_and_counted_not_retried(
    pool: asyncpg.Pool, api: ProviderApi, braze: BrazeServer
) -> None:
    push = _Push(pool, api)
    await push.changed(
        _profile("c1", 1, user_id="1", tier="gold"), _profile("c2", 1, email="b@example.com", tier="x")
    )
    refusal = {"type": "Invalid tier", "input_array": "attributes", "index": 1}
    braze.script.append(Scripted(201, body=orjson.dumps({"message": "success", "errors": [refusal]})))
    report = await push.run()
    assert (report.pushed, report.items_refused, await push.waiting()) == (1, 1, 0)
    assert (await ConnectorStore(pool).load("braze")).items_refused_total == 1


class _ByEmail:
    """A destination that keys people by address (as Mailchimp and SendGrid do)."""

    keyed_by_email = True

    def __init__(self) -> None:
        self.sent: list[PushItem] = []

    async def push(self, items: Sequence[PushItem]) -> list[ItemResult]:
        self.sent.extend(items)
        return [ItemResult(item, ItemOutcome.PUSHED) for item in items]


async def test_a_customer_without_an_address_is_skipped_where_the_provider_keys_by_address(
    pool: asyncpg.Pool,
) -> None:
    profiles = _Profiles()
    marks: list[Change] = []
    profiles.change(marks, _profile("c1", 1, user_id="1", tier="gold"))  # a user id, no address
    profiles.change(marks, _profile("c2", 1, user_id="2", email="b@example.com", tier="gold"))
    await PendingPushes(pool).mark(["mc"], marks)
    destination = _ByEmail()
    report = await run_push(
        "mc", destination, ["tier"], PendingPushes(pool), PushLedger(pool), profiles, ConnectorStore(pool), 30
    )
    assert [i.customer_key for i in destination.sent] == ["c2"]
    assert (report.pushed, report.items_refused, report.skipped) == (1, 0, 1)  # not counted as refused
