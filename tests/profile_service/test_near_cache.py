"""The near cache: its bookkeeping (pure), and its coherence with real Redis, whose
invalidations drop copies whoever writes, and whose loss stops copies being served."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import ConnectionPool, Redis

import devstack
from profile_service.cache import KEY_PREFIX, CacheUnavailable, ProfileCache, cache_key
from profile_service.near_cache import InvalidationListener, NearCache
from profile_service.server import ProfileApp
from sendtime.ingest.v1 import ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime_common.identifiers import IdentifierKind
from tests.conftest import eventually, times_logged, user, wait_for_profile
from tests.factories import event, identify
from tests.profile_service.test_profile_service import cached_profile, send


def copy(version: int) -> profile_pb2.Profile:
    return profile_pb2.Profile(customer_id="c", version=version)


def tracking_cache(max_entries: int = 10, ttl_s: float = 60, timer: list[float] | None = None) -> NearCache:
    clock = timer if timer is not None else [0.0]
    near = NearCache(max_entries, ttl_s, timer=lambda: clock[0])
    near.start_tracking()
    return near


# --- bookkeeping -------------------------------------------------------------------------------


def test_a_read_keeps_what_it_reserved_and_an_invalidation_drops_it() -> None:
    near = tracking_cache()
    with near.reserve(["a"]) as reservation:
        reservation.fill("a", copy(1))
    assert near.get("a") == copy(1)
    near.invalidate(["a"])
    assert near.get("a") is None


def test_a_key_invalidated_while_it_is_read_is_not_kept() -> None:
    near = tracking_cache()
    with near.reserve(["a", "b"]) as reservation:
        near.invalidate(["a"])  # a write landed while the read was under way
        reservation.fill("a", copy(1))  # what the read saw may predate that write
        reservation.fill("b", copy(1))
    assert near.get("a") is None
    assert near.get("b") == copy(1)
    with near.reserve(["a"]) as later:  # a read reserving after the write may keep it
        later.fill("a", copy(2))
    assert near.get("a") == copy(2)


def test_a_released_reservation_cannot_fill_and_leaves_nothing_behind() -> None:
    near = tracking_cache()
    with near.reserve(["a"]) as reservation:
        pass
    reservation.fill("a", copy(1))
    assert near.get("a") is None
    near.invalidate(["a"])  # nothing left reserved to cancel
    with near.reserve(["a"]) as again:
        again.fill("a", copy(2))
    assert near.get("a") == copy(2)


def test_what_the_process_keeps_beside_a_copy_hears_whenever_the_copy_leaves() -> None:
    clock = [0.0]
    dropped: list[str] = []
    cleared: list[bool] = []
    near = tracking_cache(max_entries=2, ttl_s=10, timer=clock)
    near.follow(on_dropped=dropped.append, on_cleared=lambda: cleared.append(True))

    def fill(key: str, customer_id: str) -> None:
        with near.reserve([key]) as reservation:
            reservation.fill(key, profile_pb2.Profile(customer_id=customer_id, version=1))

    fill("a", "c-a")
    assert near.holds("c-a") and not near.holds("c-b")
    near.invalidate(["a", "b"])  # b held no copy: nothing to say of it
    assert dropped == ["c-a"] and not near.holds("c-a")

    fill("a", "c-a")
    fill("b", "c-b")
    fill("c", "c-c")  # past the bound: the oldest copy leaves
    assert dropped == ["c-a", "c-a"] and not near.holds("c-a") and near.holds("c-c")

    clock[0] = 11.0  # b and c expired; an invalidation of an expired copy still names its customer
    near.invalidate(["b"])
    assert dropped[-1] == "c-b" and not near.holds("c-b")
    fill("d", "c-d")  # the next write expires c
    assert "c-c" in dropped and not near.holds("c-c") and near.holds("c-d")

    near.invalidate_all()
    assert cleared == [True] and not near.holds("c-d")
    fill("a", "c-a")
    near.stop_tracking()
    assert cleared == [True, True] and not near.holds("c-a")


def test_without_tracking_nothing_is_kept_or_served() -> None:
    near = NearCache(10, 60)
    with near.reserve(["a"]) as reservation:
        reservation.fill("a", copy(1))
    assert near.get("a") is None and len(near) == 0


def test_losing_tracking_drops_every_copy_and_every_read_under_way() -> None:
    near = tracking_cache()
    with near.reserve(["a"]) as done:
        done.fill("a", copy(1))
    with near.reserve(["b"]) as under_way:
        near.stop_tracking()
        near.start_tracking()  # back on: invalidations sent in between were lost
        under_way.fill("b", copy(1))
    assert near.get("a") is None and near.get("b") is None


def test_flushed_redis_drops_every_copy() -> None:
    near = tracking_cache()
    with near.reserve(["a", "b"]) as reservation:
        reservation.fill("a", copy(1))
        near.invalidate_all()
        reservation.fill("b", copy(1))
    assert len(near) == 0


def test_copies_are_bounded_in_number_and_age() -> None:
    clock = [0.0]
    near = tracking_cache(max_entries=2, ttl_s=5, timer=clock)
    with near.reserve(["a", "b", "c"]) as reservation:
        for key in "abc":
            reservation.fill(key, copy(1))
    assert len(near) == 2
    clock[0] = 6.0
    assert near.get("b") is None and near.get("c") is None


def test_a_near_cache_needs_room() -> None:
    with pytest.raises(ValueError):
        NearCache(0, 60)


# --- with real Redis ---------------------------------------------------------------------------


@dataclass
class Listening:
    near: NearCache
    cache: ProfileCache
    listener: InvalidationListener
    task: asyncio.Task[None]


@pytest.fixture
def private_redis_process(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A Redis of the test's own (its port and process), which the test may shut down or freeze."""
    port = devstack.free_port()
    process = devstack.start_redis(port, tmp_path / "redis")
    yield port, process
    process.send_signal(signal.SIGCONT)  # a frozen Redis must run again to act on SIGTERM
    devstack.stop_process(process)


@pytest.fixture
def private_redis(private_redis_process: tuple[int, subprocess.Popen[bytes]]) -> tuple[str, int]:
    port, _ = private_redis_process
    return f"redis://127.0.0.1:{port}/0", port


async def listening(redis_url: str, health_check_s: float = 1.0) -> Listening:
    near = NearCache(100, 60)
    listener = InvalidationListener(near, redis_url, KEY_PREFIX, health_check_s=health_check_s)
    task = asyncio.create_task(listener.run())
    await asyncio.wait_for(listener.wait_until_tracking(), 5)
    return Listening(near, ProfileCache(Redis.from_url(redis_url), ttl_s=60, near=near), listener, task)


async def stop(listening_: Listening) -> None:
    listening_.task.cancel()
    await asyncio.gather(listening_.task, return_exceptions=True)
    await listening_.listener.close()
    await listening_.cache.close()


async def read_until_kept(listening_: Listening, key: str) -> None:
    """Read ``key`` until its copy is kept: the invalidation of the write that stored it may
    arrive after a first read and drop that read's copy (or cancel its reservation)."""

    async def kept() -> bool:
        await listening_.cache.get_many([key])
        return listening_.near.get(key) is not None

    await eventually(kept, timeout_s=2)


@pytest.fixture
async def near_cache(redis_url: str) -> AsyncIterator[Listening]:
    listening_ = await listening(redis_url)
    yield listening_
    await stop(listening_)


async def test_a_write_from_anywhere_drops_the_copy(
    near_cache: Listening, redis_url: str, unique: str
) -> None:
    key = cache_key(IdentifierKind.USER_ID, f"u-{unique}")
    other_replica = ProfileCache(Redis.from_url(redis_url), ttl_s=60)
    try:
        await other_replica.put([cached_profile(f"u-{unique}", 1, "old")])
        assert [p.version for p in await near_cache.cache.get_many([key]) if p] == [1]
        await read_until_kept(near_cache, key)  # kept: the next read needs no Redis

        await other_replica.put([cached_profile(f"u-{unique}", 2, "new")])

        async def dropped() -> bool:
            return near_cache.near.get(key) is None

        await eventually(dropped, timeout_s=2)
        assert [p.version for p in await near_cache.cache.get_many([key]) if p] == [2]
    finally:
        await other_replica.close()


async def test_its_own_writes_drop_the_copies_at_once(near_cache: Listening, unique: str) -> None:
    key = cache_key(IdentifierKind.USER_ID, f"u-{unique}")
    await near_cache.cache.put([cached_profile(f"u-{unique}", 1, "old")])
    await read_until_kept(near_cache, key)  # a copy to drop
    await near_cache.cache.erase([key])
    assert await near_cache.cache.get_many([key]) == [None]  # no waiting for Redis to say so


async def test_flushing_redis_drops_every_copy(private_redis: tuple[str, int], unique: str) -> None:
    url, _ = private_redis
    near_cache = await listening(url)
    try:
        key = cache_key(IdentifierKind.USER_ID, f"u-{unique}")
        await near_cache.cache.put([cached_profile(f"u-{unique}", 1, "old")])
        await read_until_kept(near_cache, key)  # a copy to drop
        async with Redis.from_url(url) as client:
            await client.flushdb()

        async def emptied() -> bool:
            return len(near_cache.near) == 0

        await eventually(emptied, timeout_s=2)
    finally:
        await stop(near_cache)


async def test_with_redis_gone_no_copy_is_served_until_tracking_is_back(
    private_redis: tuple[str, int], tmp_path: Path, unique: str
) -> None:
    url, port = private_redis
    near_cache = await listening(url)
    key = cache_key(IdentifierKind.USER_ID, f"u-{unique}")
    try:
        await near_cache.cache.put([cached_profile(f"u-{unique}", 1, "old")])
        await read_until_kept(near_cache, key)  # a copy to drop

        async with Redis.from_url(url) as client:
            await client.shutdown(nosave=True)

        async def untracked() -> bool:
            return not near_cache.near.tracking and len(near_cache.near) == 0

        await eventually(untracked, timeout_s=3)

        restarted = devstack.start_redis(port, tmp_path / "redis-again")  # a Redis that lost its data
        try:
            await asyncio.wait_for(near_cache.listener.wait_until_tracking(), 10)

            async def empty() -> bool:
                try:
                    return await near_cache.cache.get_many([key]) == [None]
                except CacheUnavailable:  # a pooled connection that died with the old Redis
                    return False

            await eventually(empty, timeout_s=3)
            await near_cache.cache.put([cached_profile(f"u-{unique}", 2, "new")])
            assert [p.version for p in await near_cache.cache.get_many([key]) if p] == [2]
            await read_until_kept(near_cache, key)  # copies are kept again
        finally:
            devstack.stop_process(restarted)
    finally:
        await stop(near_cache)


async def test_a_connection_gone_silent_counts_as_lost(
    private_redis_process: tuple[int, subprocess.Popen[bytes]],
    caplog: pytest.LogCaptureFixture,
    unique: str,
) -> None:
    port, redis_process = private_redis_process
    near_cache = await listening(f"redis://127.0.0.1:{port}/0", health_check_s=0.2)
    key = cache_key(IdentifierKind.USER_ID, f"u-{unique}")
    try:
        await near_cache.cache.put([cached_profile(f"u-{unique}", 1, "old")])
        await read_until_kept(near_cache, key)  # a copy to drop

        async def untracked() -> bool:
            return not near_cache.near.tracking and len(near_cache.near) == 0

        lost = "near cache: lost Redis invalidations, reading Redis"
        unanswered = "ConnectionError: no answer to PING within 0.2s"
        # Any loss before now (a stalled test process can miss a PONG) was logged before the
        # listener tracked again and the copy was kept.
        lost_before = times_logged(caplog, lost, error=unanswered)
        # Redis answers no one, as a partitioned network would: frozen, it keeps the connection
        # open and says nothing, so the listener's PING goes unanswered. Frozen until the listener
        # has noticed, however slow the machine (a CLIENT PAUSE cannot end early: under PAUSE
        # ALL, CLIENT UNPAUSE waits too).
        redis_process.send_signal(signal.SIGSTOP)
        try:
            await eventually(untracked, timeout_s=10)
        finally:
            redis_process.send_signal(signal.SIGCONT)
        # Reconnection backs off up to 5 s between attempts.
        await asyncio.wait_for(near_cache.listener.wait_until_tracking(), 20)
        # Lost for the unanswered PING (logged after the copies are dropped, before the listener
        # tries to track again).
        assert times_logged(caplog, lost, error=unanswered) == lost_before + 1
    finally:
        await stop(near_cache)


async def test_the_service_serves_copies_and_each_merge_replaces_them(
    profile_app: ProfileApp,
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    unique: str,
) -> None:
    near = profile_app.cache.near
    assert near is not None and near.tracking  # the service runs with a near cache by default
    await send(ingest_stub, event(user_id=f"u-{unique}", identify=identify(first_name="Ada")))
    await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: "first_name" in p.traits)
    key = cache_key(IdentifierKind.USER_ID, f"u-{unique}")

    async def kept() -> bool:
        await profile_stub.GetProfile(profile_pb2.GetProfileRequest(identifier=user(f"u-{unique}")))
        return near.get(key) is not None

    # A read keeps a copy, and the next read is served in process (the merge's own invalidation
    # may arrive after a first read and drop its copy: read until one is kept).
    await eventually(kept, timeout_s=2)

    await send(ingest_stub, event(user_id=f"u-{unique}", identify=identify(first_name="Grace")))
    renamed = await wait_for_profile(
        profile_stub, user(f"u-{unique}"), lambda p: p.traits["first_name"] == "Grace"
    )
    assert renamed.traits["first_name"] == "Grace"


async def test_a_listener_that_cannot_track_keeps_no_copies_and_says_so_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = devstack.free_port()
    attempts = 0  # connections the listener made to its Redis: one an attempt
    make_connection = ConnectionPool.make_connection

    def counted(pool: ConnectionPool) -> Any:
        nonlocal attempts
        if pool.connection_kwargs.get("port") == port:
            attempts += 1
        return make_connection(pool)  # type: ignore[no-untyped-call]  # redis-py

    monkeypatch.setattr(ConnectionPool, "make_connection", counted)
    near = NearCache(10, 60)
    nowhere = f"redis://127.0.0.1:{port}/0"  # no Redis: every attempt fails alike
    listener = InvalidationListener(near, nowhere, KEY_PREFIX, max_backoff_s=0.05)
    task = asyncio.create_task(listener.run())

    # Several attempts: the fifth starts once the fourth has failed and been reported or not (a
    # fixed wait also passed after a single attempt on a slow machine).
    async def tried_five_times() -> bool:
        return attempts >= 5

    await eventually(tried_five_times, timeout_s=5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await listener.close()
    refusals = [r for r in caplog.records if "cannot track Redis invalidations" in r.getMessage()]
    assert len(refusals) == 1
    with near.reserve(["a"]) as reservation:
        reservation.fill("a", copy(1))
    assert near.get("a") is None
