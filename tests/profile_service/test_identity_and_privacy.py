"""Identity merges and their limits, the event history, export and erasure — through ingest,
NATS, the merger, PostgreSQL and Redis, all real."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import asyncpg
import grpc
import pytest
from google.protobuf import json_format
from redis.asyncio import Redis

import devstack
from profile_service.cache import ProfileCache
from profile_service.reader import ProfileReader
from profile_service.repository import ProfileRecord, ProfileRepository
from profile_service.server import ProfileApp, create_app
from profile_service.settings import Settings
from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime_common.errors import status_of
from sendtime_common.event_log import JetStreamEventLog, JetStreamSettings
from sendtime_common.identifier_proto import IdentifierKey
from sendtime_common.identifiers import IdentifierHasher, IdentifierKind
from tests.conftest import LOCAL_SERVER, channel, eventually, user, wait_for_profile
from tests.factories import cart_item_added, event, identify, product_viewed
from tests.keys import issue_key
from tests.profile_service.test_erasure_notices import Heard, unkeyed_hash
from tests.profile_service.test_profile_service import send

EMAIL = profile_pb2.IDENTIFIER_KIND_EMAIL


def email(value: str) -> profile_pb2.Identifier:
    return profile_pb2.Identifier(kind=EMAIL, value=value)


def anonymous(value: str) -> profile_pb2.Identifier:
    return profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_ANONYMOUS_ID, value=value)


async def not_found(
    stub: profile_pb2_grpc.ProfileServiceAsyncStub, identifier: profile_pb2.Identifier
) -> bool:
    try:
        await stub.GetProfile(profile_pb2.GetProfileRequest(identifier=identifier))
    except grpc.aio.AioRpcError as exc:
        return exc.code() == grpc.StatusCode.NOT_FOUND
    return False


async def test_a_merge_is_recorded_with_the_event_that_caused_it(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    unique: str,
) -> None:
    await send(ingest_stub, event(anonymous_id=f"a-{unique}", product_viewed=product_viewed("sku-1")))
    visitor = await wait_for_profile(profile_stub, anonymous(f"a-{unique}"), lambda p: True)
    await send(ingest_stub, event(user_id=f"u-{unique}", identify=identify(first_name="Ada")))
    account = await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: True)

    alias = event(
        user_id=f"u-{unique}",
        alias=ingest_pb2.Alias(other=ingest_pb2.CustomerIdentifiers(anonymous_id=f"a-{unique}")),
    )
    await send(ingest_stub, alias)
    merged = await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: len(p.merges) == 1)
    assert merged.customer_id == visitor.customer_id  # the older customer survives
    assert (merged.merges[0].merged_customer_id, merged.merges[0].event_id) == (
        account.customer_id,
        alias.event_id,
    )
    assert merged.traits["first_name"] == "Ada"
    by_visitor = await profile_stub.GetProfile(
        profile_pb2.GetProfileRequest(identifier=anonymous(f"a-{unique}"))
    )
    assert by_visitor.profile.customer_id == merged.customer_id
    assert [v.sku for v in by_visitor.profile.recently_viewed] == ["sku-1"]


async def test_a_shared_device_does_not_collapse_people_past_the_limit(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    unique: str,
) -> None:
    device = f"kiosk-{unique}"
    for i in range(4):  # four people sign in on one device; the limit is 3 emails per profile
        e = event(email=f"p{i}-{unique}@example.com", identify=identify(seen=i))
        e.customer.device_id = device
        await send(ingest_stub, e)
        if i < 3:
            await wait_for_profile(profile_stub, email(f"p{i}-{unique}@example.com"), lambda p: True)
    shared = await wait_for_profile(
        profile_stub, profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_DEVICE_ID, value=device),
        lambda p: len(p.blocked_merges) == 1,
    )  # fmt: skip
    assert shared.blocked_merges[0].reason == "at most 3 email identifiers per profile"
    assert shared.blocked_merges[0].other_customer_id == ""
    assert await not_found(profile_stub, email(f"p3-{unique}@example.com"))

    # Two people with two emails each: linking them would make four, so the merge is refused.
    for person in ("x", "y"):
        for n in (1, 2):
            await send(
                ingest_stub,
                event(
                    user_id=f"{person}-{unique}",
                    email=f"{person}{n}-{unique}@example.com",
                    identify=identify(n=n),
                ),
            )
        await wait_for_profile(profile_stub, user(f"{person}-{unique}"), lambda p: len(p.identifiers) == 3)
    link = event(
        user_id=f"x-{unique}",
        alias=ingest_pb2.Alias(other=ingest_pb2.CustomerIdentifiers(user_id=f"y-{unique}")),
    )
    await send(ingest_stub, link)
    x = await wait_for_profile(profile_stub, user(f"x-{unique}"), lambda p: len(p.blocked_merges) == 1)
    y = await profile_stub.GetProfile(profile_pb2.GetProfileRequest(identifier=user(f"y-{unique}")))
    assert x.customer_id != y.profile.customer_id
    assert (x.blocked_merges[0].other_customer_id, x.blocked_merges[0].event_id) == (
        y.profile.customer_id,
        link.event_id,
    )


async def test_the_event_history_is_paged_and_filtered(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    unique: str,
) -> None:
    start = datetime.now(UTC) - timedelta(hours=1)
    events = [
        event(
            user_id=f"u-{unique}",
            occurred_at=start + timedelta(minutes=i),
            product_viewed=product_viewed(f"s{i}"),
        )
        for i in range(5)
    ] + [
        event(
            user_id=f"u-{unique}",
            occurred_at=start + timedelta(minutes=10),
            cart_item_added=cart_item_added("s1"),
        )
    ]
    await send(ingest_stub, *events)
    await wait_for_profile(
        profile_stub, user(f"u-{unique}"), lambda p: len(p.cart.items) == 1 and len(p.recently_viewed) == 5
    )

    seen, token = [], ""
    while True:
        page = await profile_stub.ListProfileEvents(
            profile_pb2.ListProfileEventsRequest(
                identifier=user(f"u-{unique}"), page_size=2, page_token=token
            )
        )
        seen += [e.event_id for e in page.events]
        if not (token := page.next_page_token):
            break
    assert seen == [e.event_id for e in reversed(events)]  # newest first

    views = await profile_stub.ListProfileEvents(
        profile_pb2.ListProfileEventsRequest(identifier=user(f"u-{unique}"), event_types=["product_viewed"])
    )
    assert len(views.events) == 5
    window = profile_pb2.ListProfileEventsRequest(identifier=user(f"u-{unique}"))
    window.start_time.FromDatetime(start + timedelta(minutes=1))
    window.end_time.FromDatetime(start + timedelta(minutes=3))
    assert [e.product_viewed.sku for e in (await profile_stub.ListProfileEvents(window)).events] == [
        "s2",
        "s1",
    ]

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await profile_stub.ListProfileEvents(
            profile_pb2.ListProfileEventsRequest(identifier=user(f"u-{unique}"), event_types=["clicked"])
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def _said_dropped(caplog: pytest.LogCaptureFixture, event_id: str) -> bool:
    return any(
        r.getMessage() == "late event of an erased person dropped" and getattr(r, "event_id", "") == event_id
        for r in caplog.records
    )


async def test_erasure_removes_everything_and_a_late_event_does_not_bring_the_person_back(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    unique: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="profile_service.merger")
    who = f"gone-{unique}@example.com"
    await send(
        ingest_stub,
        event(user_id=f"u-{unique}", email=who, identify=identify(first_name="Eve")),
        event(user_id=f"u-{unique}", cart_item_added=cart_item_added("s1")),
    )
    await wait_for_profile(profile_stub, email(who), lambda p: len(p.cart.items) == 1)  # cached now

    exported = await profile_stub.ExportProfile(profile_pb2.ExportProfileRequest(identifier=email(who)))
    document = json_format.MessageToDict(exported.export)
    assert len(document["events"]) == 2 and document["profile"]["traits"]["first_name"] == "Eve"
    assert {"kind": "email", "value": who} in document["identifiers"]

    erased = await profile_stub.DeleteProfile(
        profile_pb2.DeleteProfileRequest(identifier=user(f"u-{unique}"))
    )
    assert (erased.identifiers_deleted, erased.events_deleted) == (2, 2)
    assert await not_found(profile_stub, email(who)) and await not_found(profile_stub, user(f"u-{unique}"))

    # A late event (it happened before the erasure) is dropped; later activity is a new person.
    late = event(
        email=who, occurred_at=datetime.now(UTC) - timedelta(minutes=5), identify=identify(first_name="Eve")
    )
    await send(ingest_stub, late)
    # Absence proves something only once the merger has had the event: it says it dropped it
    # (a fixed wait also passed while the merger was merely slow).
    await eventually(lambda: _said_dropped(caplog, late.event_id))
    assert await not_found(profile_stub, email(who))
    fresh = event(
        email=who, occurred_at=datetime.now(UTC) + timedelta(seconds=1), identify=identify(first_name="E.")
    )
    await send(ingest_stub, fresh)
    back = await wait_for_profile(profile_stub, email(who), lambda p: True)
    assert back.traits["first_name"] == "E." and back.customer_id != erased.customer_id

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await profile_stub.DeleteProfile(profile_pb2.DeleteProfileRequest(identifier=user(f"u-{unique}")))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_with_redis_down_reads_fall_back_to_postgres(
    tmp_path: Path, nats_url: str, database_url: str, profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub, unique: str,
) -> None:  # fmt: skip
    await send(ingest_stub, event(user_id=f"u-{unique}", identify=identify(first_name="Ada")))
    await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: "first_name" in p.traits)

    port = devstack.free_port()
    redis = devstack.start_redis(port, tmp_path / "redis")
    settings = Settings(
        **LOCAL_SERVER,
        database_url=database_url,
        redis_url=f"redis://127.0.0.1:{port}/0",
        consumer_name=f"reader-{unique}",
        event_log=JetStreamSettings(url=nats_url),
    )
    app = await create_app(settings)
    await app.grpc.start()  # reads only: no merger
    try:
        async with channel(f"127.0.0.1:{app.grpc.port}", await issue_key(database_url)) as calls:
            stub = profile_pb2_grpc.ProfileServiceStub(calls)
            request = profile_pb2.GetProfileRequest(identifier=user(f"u-{unique}"))
            assert (await stub.GetProfile(request)).profile.traits["first_name"] == "Ada"
            async with Redis.from_url(settings.redis_url) as client:
                assert await client.exists(f"sendtime:profile:user_id:u-{unique}")
            devstack.stop_process(redis)
            for _ in range(3):  # Redis is gone: every read still answers, from PostgreSQL
                assert (await stub.GetProfile(request)).profile.traits["first_name"] == "Ada"
    finally:
        await app.stop(grace_s=1)
        devstack.stop_process(redis)


class CountingRepository(ProfileRepository):
    """The real repository, counting its reads; each waits for ``gate`` before it queries."""

    reads = 0

    def __init__(self, pool: asyncpg.Pool, gate: asyncio.Event) -> None:
        super().__init__(pool)
        self.gate = gate

    async def find_by_identifiers(
        self, identifiers: Sequence[IdentifierKey]
    ) -> dict[IdentifierKey, ProfileRecord]:
        self.reads += 1
        await self.gate.wait()
        return await super().find_by_identifiers(identifiers)


class CacheReadsSeen:
    """The real cache, opening ``gate`` once ``readers`` reads of it have been answered."""

    def __init__(self, cache: ProfileCache, readers: int, gate: asyncio.Event) -> None:
        self._cache = cache
        self._waiting = readers
        self._gate = gate

    async def get_many(self, keys: Sequence[str]) -> list[profile_pb2.Profile | None]:
        try:
            return await self._cache.get_many(keys)
        finally:
            self._waiting -= 1
            if self._waiting == 0:
                self._gate.set()

    async def put(self, profiles: Iterable[profile_pb2.Profile]) -> None:
        await self._cache.put(profiles)


async def test_concurrent_misses_for_one_customer_make_one_database_read(
    profile_app: ProfileApp,
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    redis_url: str,
    unique: str,
) -> None:
    await send(ingest_stub, event(user_id=f"u-{unique}", identify=identify(first_name="Ada")))
    await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: "first_name" in p.traits)
    async with Redis.from_url(redis_url) as client:
        await client.delete(f"sendtime:profile:user_id:u-{unique}")  # a cold cache

    async def dropped_in_process() -> bool:  # Redis's invalidation reached the near cache
        near = profile_app.cache.near
        return near is None or near.get(f"sendtime:profile:user_id:u-{unique}") is None

    await eventually(dropped_in_process, timeout_s=2)
    # The database read waits until every reader has had its answer from the cache (a miss):
    # all 20 are then past the cache and in the reader, whatever the machine's pace.
    gate = asyncio.Event()
    repository = CountingRepository(profile_app.pool, gate)
    cache = cast(ProfileCache, CacheReadsSeen(profile_app.cache, readers=20, gate=gate))
    reader = ProfileReader(repository, cache)
    key = (IdentifierKind.USER_ID, f"u-{unique}")
    async with asyncio.timeout(30):
        results = await asyncio.gather(*(reader.get_many([key]) for _ in range(20)))
    assert repository.reads == 1
    assert {r[0].traits["first_name"] for r in results if r[0] is not None} == {"Ada"}
    assert all(r[0] is not None for r in results)


async def test_parallel_mergers_lose_no_update_for_one_customer(
    nats_url: str,
    redis_url: str,
    database_url: str,
    profile_app: ProfileApp,
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    unique: str,
) -> None:
    # A second replica on the same durable consumer: the two split the events between them.
    second = await create_app(
        Settings(
            **LOCAL_SERVER,
            database_url=database_url,
            redis_url=redis_url,
            event_log=JetStreamSettings(url=nats_url),
            consumer_name="profile-merger",  # as the session's profile service
        )
    )
    await second.start()
    try:
        start = datetime.now(UTC) - timedelta(minutes=10)
        events = [
            event(
                user_id=f"u-{unique}",
                occurred_at=start + timedelta(milliseconds=(i * 7919) % 100),  # out of order, with ties
                cart_item_added=cart_item_added(f"sku-{i}"),
            )
            for i in range(100)
        ]
        await send(ingest_stub, *events)
        profile = await wait_for_profile(
            profile_stub, user(f"u-{unique}"), lambda p: len(p.cart.items) == 100, timeout_s=30
        )
    finally:
        await second.stop(grace_s=1)
    assert profile.version == 100  # one version per merge, none lost
    assert {item.sku for item in profile.cart.items} == {f"sku-{i}" for i in range(100)}
    history = await profile_stub.ListProfileEvents(
        profile_pb2.ListProfileEventsRequest(identifier=user(f"u-{unique}"), page_size=1000)
    )
    assert len(history.events) == 100


async def test_lookups_of_an_erased_person_say_so(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    unique: str,
) -> None:
    await send(ingest_stub, event(user_id=f"u-{unique}", identify=identify(a=1)))
    await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: True)
    await profile_stub.DeleteProfile(profile_pb2.DeleteProfileRequest(identifier=user(f"u-{unique}")))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await profile_stub.GetProfile(profile_pb2.GetProfileRequest(identifier=user(f"u-{unique}")))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    status = status_of(caught.value)
    assert status is not None and b"PROFILE_ERASED" in status.details[0].value
    batch = await profile_stub.BatchGetProfiles(
        profile_pb2.BatchGetProfilesRequest(identifiers=[user(f"u-{unique}"), user(f"never-{unique}")])
    )
    assert [(r.found, r.erased) for r in batch.results] == [(False, True), (False, False)]


async def test_after_a_hash_key_rotation_tombstones_still_hold_and_notices_name_both_keys(
    profile_app: ProfileApp, nats_url: str, unique: str
) -> None:
    old_key, new_key = IdentifierHasher([b"o" * 32]), IdentifierHasher([b"n" * 32])
    before = ProfileRepository(profile_app.pool, hasher=old_key)
    after = ProfileRepository(profile_app.pool, hasher=IdentifierHasher([b"n" * 32, b"o" * 32]))
    erased, later = (IdentifierKind.USER_ID, f"u-{unique}"), (IdentifierKind.USER_ID, f"v-{unique}")
    start = datetime.now(UTC) - timedelta(hours=1)
    heard = Heard()
    log = await JetStreamEventLog.connect(JetStreamSettings(url=nats_url))
    following = await log.follow_erasures(heard.handle)
    try:
        await before.merge_events([event(user_id=erased[1], occurred_at=start, identify=identify(a=1))])
        assert await before.delete_customer(erased) is not None
        tombstoned = "SELECT count(*) FROM erasure_tombstones WHERE identifier_hash = $1"
        assert await profile_app.pool.fetchval(tombstoned, old_key.hash(erased)) == 1
        assert await profile_app.pool.fetchval(tombstoned, unkeyed_hash(erased)) == 0  # no guessable hash

        # The key rotated: the tombstone made under the old one still keeps a late event out.
        assert await after.erased_among([erased]) == {erased}
        late = event(user_id=erased[1], occurred_at=start + timedelta(minutes=1), identify=identify(a=2))
        (result,) = await after.merge_events([late])
        assert result.erased and result.profile is None
        assert await after.find_by_identifiers([erased]) == {}

        # Erased after the rotation: the notice names them under both keys, so copies kept under
        # either are found.
        await after.merge_events([event(user_id=later[1], occurred_at=start, identify=identify(a=1))])
        await after.delete_customer(later)
        profile_app.erasure_outbox.wake()
        notice = await heard.wait_for(new_key.hash(later))
        assert list(notice.identifier_hashes) == [new_key.hash(later), old_key.hash(later)]
    finally:
        await following.close()
        await log.close()
