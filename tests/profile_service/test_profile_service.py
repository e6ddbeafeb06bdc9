"""Ingest → NATS → merger → PostgreSQL/Redis → ProfileService, all real."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import field_mask_pb2, json_format
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from profile_service.cache import ChangedProfile, ProfileCache, cache_key, decode_entry
from profile_service.server import ProfileApp
from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime_common.errors import FieldViolation, field_violations, status_of
from sendtime_common.identifiers import IdentifierKind
from tests.conftest import eventually, user, wait_for_profile
from tests.factories import cart_item_added, event, identify, order_completed, product_viewed

EMAIL = profile_pb2.IDENTIFIER_KIND_EMAIL


async def send(stub: ingest_pb2_grpc.IngestServiceAsyncStub, *events: ingest_pb2.Event) -> None:
    response = await stub.SendEvents(ingest_pb2.SendEventsRequest(events=list(events)))
    assert {r.outcome for r in response.results} <= {
        ingest_pb2.EVENT_OUTCOME_ACCEPTED,
        ingest_pb2.EVENT_OUTCOME_DUPLICATE,
    }, response


async def test_events_become_a_profile_found_by_any_identifier(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    unique: str,
) -> None:
    await send(
        ingest_stub,
        event(user_id=f"u-{unique}", email=f"Ada.{unique}@Example.com", identify=identify(first_name="Ada")),
        event(user_id=f"u-{unique}", product_viewed=product_viewed("shoe-1", price="89.90")),
        event(user_id=f"u-{unique}", cart_item_added=cart_item_added("shoe-1", 2, "89.90")),
    )
    profile = await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: len(p.cart.items) == 1)
    assert profile.traits["first_name"] == "Ada"
    assert [v.sku for v in profile.recently_viewed] == ["shoe-1"]
    assert (profile.cart.items[0].quantity, profile.cart.total.units, profile.cart.total.nanos) == (
        2,
        179,
        800000000,
    )
    assert profile.name == f"profiles/{profile.customer_id}"

    by_email = await profile_stub.GetProfile(
        profile_pb2.GetProfileRequest(
            identifier=profile_pb2.Identifier(kind=EMAIL, value=f"ada.{unique}@example.com")
        )
    )
    assert by_email.profile.customer_id == profile.customer_id


async def test_a_redelivered_or_resent_event_changes_nothing(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    profile_app: ProfileApp,
    unique: str,
) -> None:
    add = event(user_id=f"u-{unique}", cart_item_added=cart_item_added("sku", 1))
    await send(ingest_stub, add)
    first = await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: len(p.cart.items) == 1)
    # What a redelivery from the log does: the merger sees the same event again.
    from profile_service.repository import ProfileRepository

    result = await ProfileRepository(profile_app.pool).merge_event(add)
    assert result.duplicate
    again = await profile_stub.GetProfile(profile_pb2.GetProfileRequest(identifier=user(f"u-{unique}")))
    assert again.profile.cart.items[0].quantity == 1
    assert again.profile.version == first.version


async def test_traits_follow_occurred_at_not_arrival(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    unique: str,
) -> None:
    now = datetime.now(UTC)
    await send(ingest_stub, event(user_id=f"u-{unique}", occurred_at=now, identify=identify(city="Paris")))
    await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: "city" in p.traits)
    late = event(
        user_id=f"u-{unique}", occurred_at=now - timedelta(hours=1), identify=identify(city="Oslo", age=40)
    )
    await send(ingest_stub, late)
    profile = await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: "age" in p.traits)
    assert profile.traits["city"] == "Paris"


async def test_an_event_linking_two_customers_merges_them(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    unique: str,
) -> None:
    anon = profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_ANONYMOUS_ID, value=f"anon-{unique}")
    await send(ingest_stub, event(anonymous_id=f"anon-{unique}", cart_item_added=cart_item_added("a")))
    await send(ingest_stub, event(user_id=f"u-{unique}", order_completed=order_completed("o1", "20")))
    before = await wait_for_profile(profile_stub, anon, lambda p: len(p.cart.items) == 1)
    await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: p.orders.count == 1)

    await send(
        ingest_stub, event(user_id=f"u-{unique}", anonymous_id=f"anon-{unique}", identify=identify(x=1))
    )
    merged = await wait_for_profile(profile_stub, anon, lambda p: p.orders.count == 1 and "x" in p.traits)
    by_user = await profile_stub.GetProfile(profile_pb2.GetProfileRequest(identifier=user(f"u-{unique}")))
    assert by_user.profile.customer_id == merged.customer_id
    assert merged.version > before.version
    assert {i.value for i in merged.identifiers} == {f"anon-{unique}", f"u-{unique}"}


async def test_batch_get_keeps_order_and_reports_missing(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    unique: str,
) -> None:
    await send(ingest_stub, *(event(user_id=f"b{i}-{unique}", identify=identify(n=i)) for i in range(3)))
    for i in range(3):
        await wait_for_profile(profile_stub, user(f"b{i}-{unique}"), lambda p: "n" in p.traits)
    ids = [user(f"b2-{unique}"), user(f"missing-{unique}"), user(f"b0-{unique}")]
    response = await profile_stub.BatchGetProfiles(
        profile_pb2.BatchGetProfilesRequest(
            identifiers=ids, read_mask=field_mask_pb2.FieldMask(paths=["traits"])
        )
    )
    assert [r.identifier.value for r in response.results] == [i.value for i in ids]
    assert [r.found for r in response.results] == [True, False, True]
    assert response.results[0].profile.traits["n"] == 2
    assert not response.results[0].profile.HasField("cart")  # masked out
    assert response.results[0].profile.version > 0


async def test_batch_get_by_customer_names_keeps_order_and_reports_missing(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    unique: str,
) -> None:
    await send(ingest_stub, *(event(user_id=f"n{i}-{unique}", identify=identify(n=i)) for i in range(2)))
    found = [
        await wait_for_profile(profile_stub, user(f"n{i}-{unique}"), lambda p: "n" in p.traits)
        for i in range(2)
    ]
    names = [found[1].name, f"profiles/{uuid.uuid4()}", found[0].name, f"profiles/user_id:n0-{unique}"]
    response = await profile_stub.BatchGetProfiles(profile_pb2.BatchGetProfilesRequest(names=names))
    assert [r.name for r in response.results] == names
    assert [r.found for r in response.results] == [True, False, True, True]  # an alias is a name too
    assert [r.profile.customer_id for r in response.results] == [
        found[1].customer_id,
        "",
        found[0].customer_id,
        found[0].customer_id,
    ]
    with pytest.raises(grpc.aio.AioRpcError) as both:
        await profile_stub.BatchGetProfiles(
            profile_pb2.BatchGetProfilesRequest(names=names[:1], identifiers=[user(f"n0-{unique}")])
        )
    status = status_of(both.value)
    assert status is not None and [v.field for v in field_violations(status)] == ["names"]
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await profile_stub.BatchGetProfiles(profile_pb2.BatchGetProfilesRequest(names=["customers/1"]))
    status = status_of(bad.value)
    assert status is not None and [v.field for v in field_violations(status)] == ["names[0]"]


async def test_bad_requests_get_field_violations(
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await profile_stub.GetProfile(
            profile_pb2.GetProfileRequest(
                identifier=profile_pb2.Identifier(kind=EMAIL, value="nope"),
                read_mask=field_mask_pb2.FieldMask(paths=["shoe_size"]),
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = status_of(caught.value)
    assert status is not None
    assert [v.field for v in field_violations(status)] == ["identifier.value", "read_mask"]

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await profile_stub.GetProfile(
            profile_pb2.GetProfileRequest(identifier=profile_pb2.Identifier(value="x"))
        )
    status = status_of(caught.value)
    assert status is not None
    assert field_violations(status)[0] == FieldViolation(
        "identifier.kind", "required: one of USER_ID, EMAIL, ANONYMOUS_ID, CRM_ID, DEVICE_ID"
    )


async def test_unknown_identifier_is_not_found(
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub, unique: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await profile_stub.GetProfile(profile_pb2.GetProfileRequest(identifier=user(f"nobody-{unique}")))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_stale_cache_write_never_replaces_a_newer_entry(redis_url: str, unique: str) -> None:
    cache = ProfileCache(Redis.from_url(redis_url), ttl_s=60)
    identifier = profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_USER_ID, value=f"c-{unique}")
    newer = profile_pb2.Profile(customer_id="c", version=5, identifiers=[identifier])
    newer.traits.update({"v": "new"})
    older = profile_pb2.Profile(customer_id="c", version=4, identifiers=[identifier])
    older.traits.update({"v": "old"})
    try:
        await cache.put([newer])
        await cache.put([older])
        (cached,) = await cache.get_many([cache_key(IdentifierKind.USER_ID, f"c-{unique}")])
        assert cached is not None and json_format.MessageToDict(cached.traits) == {"v": "new"}
    finally:
        await cache.close()


def cached_profile(user_id: str, version: int, value: str) -> profile_pb2.Profile:
    identifier = profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_USER_ID, value=user_id)
    profile = profile_pb2.Profile(customer_id=user_id, version=version, identifiers=[identifier])
    profile.traits.update({"v": value})
    return profile


async def test_a_merge_marks_the_entries_and_writes_in_full_only_profiles_someone_reads(
    redis_url: str, unique: str
) -> None:
    client = Redis.from_url(redis_url)
    cache = ProfileCache(client, ttl_s=60)
    read, unread = f"read-{unique}", f"unread-{unique}"
    built: list[str] = []

    def changed(user_id: str, version: int) -> ChangedProfile:
        def build() -> profile_pb2.Profile:
            built.append(user_id)
            return cached_profile(user_id, version, "new")

        return ChangedProfile(version, [cache_key(IdentifierKind.USER_ID, user_id)], build)

    def values(profiles: list[profile_pb2.Profile | None]) -> list[tuple[int, str] | None]:
        return [None if p is None else (p.version, str(p.traits["v"])) for p in profiles]

    keys = [cache_key(IdentifierKind.USER_ID, u) for u in (read, unread)]
    try:
        await cache.put([cached_profile(read, 1, "old")])  # someone read it: it holds a profile

        assert await cache.refresh([changed(read, 2), changed(unread, 2)]) == 1
        assert built == [read]  # the unread profile is never even encoded
        assert values(await cache.get_many(keys)) == [(2, "new"), None]
        assert await client.get(keys[1]) == b"2:"  # a marker: it reads as a miss

        # A reader that read PostgreSQL before the merge loses to the marker; one that read
        # after it fills the entry.
        await cache.put([cached_profile(unread, 1, "old")])
        assert values(await cache.get_many(keys[1:])) == [None]
        await cache.put([cached_profile(unread, 2, "new")])
        assert values(await cache.get_many(keys[1:])) == [(2, "new")]

        # An erased person's entries stay erased, whatever merges after.
        await cache.erase(keys[:1])
        assert await cache.refresh([changed(read, 3)]) == 0
        assert values(await cache.get_many(keys[:1])) == [None]
        await cache.put([cached_profile(read, 3, "new")])
        assert values(await cache.get_many(keys[:1])) == [None]
    finally:
        await client.delete(*keys)
        await cache.close()


async def test_a_merged_profile_nobody_read_is_a_marker_until_it_is_read(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    redis_url: str,
    unique: str,
) -> None:
    client = Redis.from_url(redis_url)
    key = cache_key(IdentifierKind.USER_ID, f"u-{unique}")

    async def entry_matches(pattern: bytes) -> bytes:
        for _ in range(500):
            entry = await client.get(key)
            if isinstance(entry, bytes) and re.fullmatch(pattern, entry, re.DOTALL):
                return entry
            await asyncio.sleep(0.02)
        raise AssertionError(f"the entry never matched {pattern!r}")

    try:
        await send(ingest_stub, event(user_id=f"u-{unique}", cart_item_added=cart_item_added("a")))
        await entry_matches(rb"\d+:")  # merged, never read: a marker
        first = await profile_stub.GetProfile(profile_pb2.GetProfileRequest(identifier=user(f"u-{unique}")))
        await entry_matches(rb"\d+:.+")  # the read filled it
        await send(ingest_stub, event(user_id=f"u-{unique}", cart_item_added=cart_item_added("b")))
        next_version = str(first.profile.version + 1).encode()
        later = decode_entry(await entry_matches(next_version + rb":.+"))
    finally:
        await client.aclose()
    # Read before, so the merge wrote it in full.
    assert later is not None and [i.sku for i in later.cart.items] == ["a", "b"]


async def test_the_cache_entry_follows_each_merge(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    redis_url: str,
    unique: str,
) -> None:
    await send(ingest_stub, event(user_id=f"u-{unique}", cart_item_added=cart_item_added("a")))
    first = await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: len(p.cart.items) == 1)
    await send(ingest_stub, event(user_id=f"u-{unique}", cart_item_added=cart_item_added("b")))
    cache = ProfileCache(Redis.from_url(redis_url), ttl_s=60)

    async def merged_entry() -> profile_pb2.Profile | None:
        (cached,) = await cache.get_many([cache_key(IdentifierKind.USER_ID, f"u-{unique}")])
        return cached if cached is not None and cached.version > first.version else None

    try:
        # As long as wait_for_profile allows for the same ingest → merge → refresh path.
        cached = await eventually(merged_entry, timeout_s=20)
        assert [i.sku for i in cached.cart.items] == ["a", "b"]
    finally:
        await cache.close()


async def test_merges_freshness_and_reads_are_measured_for_prometheus(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    unique: str,
) -> None:
    """A merged batch, the age of its events when they became readable (from the log's storing
    them and from when they occurred), and where each read was answered from."""

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    names = [
        ("sendtime_profile_merge_batch_events_count", {}),
        ("sendtime_profile_freshness_from_stored_seconds_count", {}),
        ("sendtime_profile_freshness_from_occurred_seconds_count", {}),
        ("sendtime_profile_freshness_from_occurred_seconds_bucket", {"le": "60.0"}),  # it occurred just now
        ("sendtime_profile_reads_total", {"source": "missing"}),
    ]
    before = {name + str(labels): sample(name, **labels) for name, labels in names}
    await send(ingest_stub, event(user_id=f"fresh-{unique}", identify=identify(first_name="Ada")))
    customer = user(f"fresh-{unique}")
    await wait_for_profile(profile_stub, customer, lambda p: p.traits["first_name"] == "Ada")
    with pytest.raises(grpc.aio.AioRpcError):
        await profile_stub.GetProfile(profile_pb2.GetProfileRequest(identifier=user(f"nobody-{unique}")))
    reads_before = sample("sendtime_profile_reads_total", source="near") + sample(
        "sendtime_profile_reads_total", source="redis"
    )
    await profile_stub.GetProfile(profile_pb2.GetProfileRequest(identifier=customer))
    after = {name + str(labels): sample(name, **labels) for name, labels in names}
    assert all(after[key] >= before[key] + 1 for key in before), (before, after)
    assert sample("sendtime_profile_merge_batch_seconds_count") >= 1
    cached_reads = sample("sendtime_profile_reads_total", source="near") + sample(
        "sendtime_profile_reads_total", source="redis"
    )
    assert cached_reads == reads_before + 1  # the read after the merge came from a cache
