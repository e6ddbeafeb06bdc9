"""The profile service as configured: read-time fields (abandoned cart) and the merge-rules file."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from profile_service.reader import ProfileReader
from profile_service.repository import ProfileRepository
from profile_service.server import ProfileApp, create_app
from profile_service.settings import Settings
from sendtime.ingest.v1 import ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime_common.config import ConfigError
from sendtime_common.identifiers import IdentifierKind
from tests.conftest import eventually, local_env, user, wait_for_profile
from tests.factories import cart_item_added, event
from tests.profile_service.test_profile_service import send


async def a_fresh_cart(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    unique: str,
) -> profile_pb2.Profile:
    """Customer ``u-<unique>`` adds an item to the cart; their profile once merged."""
    await send(ingest_stub, event(user_id=f"u-{unique}", cart_item_added=cart_item_added("s1")))
    return await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: len(p.cart.items) == 1)


async def test_a_cart_is_abandoned_as_of_the_read_not_of_the_merge(
    profile_app: ProfileApp,
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    unique: str,
) -> None:
    fresh = await a_fresh_cart(ingest_stub, profile_stub, unique)
    assert not fresh.cart.abandoned

    later = datetime.now(UTC) + timedelta(hours=2)
    reader = ProfileReader(
        ProfileRepository(profile_app.pool),
        profile_app.cache,
        cart_abandoned_after=timedelta(hours=1),
        clock=lambda: later,
    )
    (seen_later,) = await reader.get_many([(IdentifierKind.USER_ID, f"u-{unique}")])
    assert seen_later is not None and seen_later.cart.abandoned
    (cached,) = await profile_app.cache.get_many([f"sendtime:profile:user_id:u-{unique}"])
    assert cached is not None and not cached.cart.abandoned  # never cached: it depends on the read


async def test_a_bad_source_priority_file_stops_the_service_with_the_key(
    tmp_path: Path, database_url: str, redis_url: str, nats_url: str
) -> None:
    bad = tmp_path / "priority.toml"
    bad.write_text(
        'default = ["crm", "server", "import", "email", "mobile_app", "web"]\n[attributes]\ncart = ["fax"]\n'
    )
    env = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "NATS_URL": nats_url,
        "PROFILE_SOURCE_PRIORITY_FILE": str(bad),
        "IDENTIFIER_HASH_KEYS": "unkeyed",
    }
    with pytest.raises(ConfigError, match="fax"):
        await create_app(Settings.from_env(env))


async def test_the_near_cache_is_sized_from_the_environment_and_zero_turns_it_off(
    database_url: str, redis_url: str, nats_url: str
) -> None:
    env = local_env("PROFILE", DATABASE_URL=database_url, REDIS_URL=redis_url, NATS_URL=nats_url)
    sized = Settings.from_env(
        env | {"PROFILE_NEAR_CACHE_ENTRIES": "500", "PROFILE_NEAR_CACHE_TTL_SECONDS": "5"}
    )
    assert (sized.near_cache_entries, sized.near_cache_ttl_s) == (500, 5.0)
    with pytest.raises(ConfigError, match="PROFILE_NEAR_CACHE_ENTRIES"):
        Settings.from_env(env | {"PROFILE_NEAR_CACHE_ENTRIES": "-1"})

    app = await create_app(Settings.from_env(env | {"PROFILE_NEAR_CACHE_ENTRIES": "0"}))
    try:
        assert app.cache.near is None and app.invalidations is None
    finally:
        await app.close()


async def test_without_identifier_hash_keys_the_service_refuses_to_start_and_unkeyed_warns(
    database_url: str, redis_url: str, nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    env = local_env("PROFILE", DATABASE_URL=database_url, REDIS_URL=redis_url, NATS_URL=nats_url)
    del env["IDENTIFIER_HASH_KEYS"]
    with pytest.raises(ConfigError, match="IDENTIFIER_HASH_KEYS is not set"):
        await create_app(Settings.from_env(env))
    with caplog.at_level(logging.WARNING, logger="sendtime_common.identifiers"):
        app = await create_app(Settings.from_env(env | {"IDENTIFIER_HASH_KEYS": "unkeyed"}))
        await app.close()
    assert any("for local development only" in r.getMessage() for r in caplog.records)


async def test_a_hot_profiles_read_time_copy_is_kept_only_while_it_holds(
    profile_app: ProfileApp,
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    unique: str,
) -> None:
    fresh = await a_fresh_cart(ingest_stub, profile_stub, unique)
    updated = fresh.cart.update_time.ToDatetime(tzinfo=UTC)
    now = [updated + timedelta(minutes=59)]
    reader = ProfileReader(
        ProfileRepository(profile_app.pool),
        profile_app.cache,
        cart_abandoned_after=timedelta(hours=1),
        clock=lambda: now[0],
        read_time_copies=10,
    )
    key = (IdentifierKind.USER_ID, f"u-{unique}")

    async def read_twice_from_one_copy() -> profile_pb2.Profile | None:
        (first,) = await reader.get_many([key])
        (again,) = await reader.get_many([key])
        return first if again is first else None

    # The process's copy of the profile, read again before anything changed, gives the same
    # read-time copy. Until the near cache keeps the profile (the invalidations of the merge's
    # cache refresh and of wait_for_profile's refill may still arrive and drop it), each read is
    # of a new object: read the pair again until the profile is hot.
    first = await eventually(read_twice_from_one_copy)
    assert not first.cart.abandoned

    now[0] = updated + timedelta(hours=1, microseconds=1)  # idle for longer than an hour
    (later,) = await reader.get_many([key])
    assert later is not None and later is not first and later.cart.abandoned
    assert not first.cart.abandoned  # what an earlier read was given did not change under it
