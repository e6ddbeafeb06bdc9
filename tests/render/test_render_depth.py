"""Render at depth: skipped sends, last-known-good profiles (in process and in Redis), the
circuit breaker, max data age and shared lookups, batches, and renders in time with the profile
service gone. The profile service is the real one where its data matters; a scripted server
speaking its contract stands in where a failure has to be made on cue."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import circuitbreaker
import grpc
import pytest
from google.protobuf import duration_pb2, json_format
from redis.asyncio import Redis

import devstack
import suite
from render import profiles as render_profiles
from render import servicer as render_servicer
from render.profiles import LKG_KEY_PREFIX
from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime.render.v1 import render_pb2, render_pb2_grpc
from sendtime_common.errors import FieldViolation, abort_with, field_violations, not_found_status, status_of
from sendtime_common.event_log import JetStreamEventLog, JetStreamSettings
from sendtime_common.identifiers import IdentifierHasher, IdentifierKind
from tests.conftest import RenderServiceFactory, eventually, repo_root, user, wait_for_profile
from tests.factories import cart_item_added, event, identify, money, order_completed
from tests.profile_service.test_profile_service import send
from tests.render.conftest import LIVE_DEADLINE_S

unkeyed_hash = IdentifierHasher.unkeyed().hash  # the services' default (IDENTIFIER_HASH_KEYS unset)

RENDERED, SKIPPED = render_pb2.RENDER_STATUS_RENDERED, render_pb2.RENDER_STATUS_SKIPPED

CART_EMAIL = render_pb2.Template(
    subject="{{ profile.traits.first_name }}, {{ profile.cart.items.size }} items wait for you",
    html="{% for i in profile.cart.items %}<p>{{ i.name }}</p>{% endfor %}",
    required_data=["profile.cart.items"],
)


def template(base: render_pb2.Template = CART_EMAIL, **changes: Any) -> render_pb2.Template:
    built = render_pb2.Template()
    built.CopyFrom(base)
    for name, value in changes.items():
        if name == "fallback":
            built.fallback.update(value)
        elif name == "max_data_age":
            built.max_data_age.CopyFrom(duration_pb2.Duration(seconds=value))
        elif name == "required_data":
            built.ClearField("required_data")
            built.required_data.extend(value)
        else:
            setattr(built, name, value)
    return built


class ScriptedProfileService(profile_pb2_grpc.ProfileServiceServicer):
    """Speaks ProfileService; answers as told (a profile, UNAVAILABLE, or late, or once released)
    and counts calls."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.delay_s = 0.0
        self.calls = 0
        self.time_left: list[float | None] = []  # each call's deadline, as time remaining
        self.identifiers_asked = 0
        self.asked = asyncio.Event()  # set by the first call
        # Calls answer once this is set: cleared, a test decides when an answer comes back.
        self.release = asyncio.Event()
        self.release.set()

    def profile(self) -> profile_pb2.Profile:
        profile = profile_pb2.Profile(customer_id="c-1", version=7)
        profile.traits.update({"first_name": "Ada"})
        profile.cart.items.add(sku="s1", name="Trail runner", quantity=1)
        profile.update_time.GetCurrentTime()
        return profile

    async def GetProfile(
        self, request: profile_pb2.GetProfileRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> profile_pb2.GetProfileResponse:
        await self.play(context)
        if self.mode == "erased":
            await abort_with(context, not_found_status("the customer was erased", "PROFILE_ERASED", {}))
        return profile_pb2.GetProfileResponse(profile=self.profile())

    async def BatchGetProfiles(
        self, request: profile_pb2.BatchGetProfilesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> profile_pb2.BatchGetProfilesResponse:
        self.identifiers_asked += len(request.identifiers)
        await self.play(context)
        if self.mode == "erased":
            results = [profile_pb2.ProfileResult(identifier=i, erased=True) for i in request.identifiers]
        else:
            results = [
                profile_pb2.ProfileResult(identifier=i, profile=self.profile(), found=True)
                for i in request.identifiers
            ]
        return profile_pb2.BatchGetProfilesResponse(results=results)

    async def play(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.calls += 1
        self.time_left.append(context.time_remaining())
        self.asked.set()
        await self.release.wait()
        await asyncio.sleep(self.delay_s)
        if self.mode == "fail":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "scripted failure")

    async def ListProfileEvents(self, request: Any, context: Any) -> Any:
        raise NotImplementedError

    async def ExportProfile(self, request: Any, context: Any) -> Any:
        raise NotImplementedError

    async def DeleteProfile(self, request: Any, context: Any) -> Any:
        raise NotImplementedError


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedProfileService, str]]:
    service = ScriptedProfileService()
    server = grpc.aio.server()
    profile_pb2_grpc.add_ProfileServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield service, f"127.0.0.1:{port}"
    await server.stop(grace=0)


# How long a lookup the test holds may wait for the test to let it answer.
HELD_S = 30.0


@pytest.fixture
def lkg_from_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gives a last-known-good read from Redis 2 s instead of 20 ms: a render process with no
    copy in memory reads Redis through a client that connects lazily, and connecting, the
    handshake and the GET did not always fit in 20 ms on a loaded machine (the render then fell
    back to no profile). Renders that read Redis need a deadline of LIVE_DEADLINE_S with it."""
    monkeypatch.setattr(render_profiles, "LKG_REDIS_WAIT_S", 2.0)


def request(customer: profile_pb2.Identifier, content: render_pb2.Template) -> render_pb2.RenderRequest:
    return render_pb2.RenderRequest(customer=customer, template=content)


@pytest.mark.usefixtures("live_lookups")
async def test_a_send_without_its_required_data_is_skipped(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    render_stub: render_pb2_grpc.RenderServiceAsyncStub,
    unique: str,
) -> None:
    await send(ingest_stub, event(user_id=f"u-{unique}", identify=identify(first_name="Ada")))
    await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: "first_name" in p.traits)
    empty = await render_stub.Render(request(user(f"u-{unique}"), CART_EMAIL), timeout=LIVE_DEADLINE_S)
    assert (empty.status, empty.skip_reason) == (SKIPPED, render_pb2.SKIP_REASON_REQUIRED_DATA_MISSING)
    assert empty.skip_detail == "profile.cart.items is missing or empty" and empty.html == ""

    await send(
        ingest_stub, event(user_id=f"u-{unique}", cart_item_added=cart_item_added("s1", name="Trail runner"))
    )
    profile = await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: len(p.cart.items) == 1)
    full = await render_stub.Render(request(user(f"u-{unique}"), CART_EMAIL), timeout=LIVE_DEADLINE_S)
    assert (full.status, full.subject, full.html) == (
        RENDERED,
        "Ada, 1 items wait for you",
        "<p>Trail runner</p>",
    )
    assert (full.profile_source, full.profile_version) == (render_pb2.PROFILE_SOURCE_LIVE, profile.version)
    assert not full.degraded and full.data_age.ToTimedelta() < timedelta(minutes=1)


@pytest.mark.usefixtures("live_lookups")
async def test_an_erased_customer_is_skipped(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    render_stub: render_pb2_grpc.RenderServiceAsyncStub,
    unique: str,
) -> None:
    await send(ingest_stub, event(user_id=f"u-{unique}", cart_item_added=cart_item_added("s1")))
    await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: len(p.cart.items) == 1)
    await profile_stub.DeleteProfile(profile_pb2.DeleteProfileRequest(identifier=user(f"u-{unique}")))
    response = await render_stub.Render(request(user(f"u-{unique}"), CART_EMAIL), timeout=LIVE_DEADLINE_S)
    assert (response.status, response.skip_reason) == (SKIPPED, render_pb2.SKIP_REASON_ERASED)


@pytest.mark.usefixtures("live_lookups")  # NOT_FOUND is the profile service's live answer
async def test_fallback_values_are_reported_by_path(
    render_stub: render_pb2_grpc.RenderServiceAsyncStub, unique: str
) -> None:
    content = template(
        CART_EMAIL,
        required_data=[],
        subject="Hi {{ profile.traits.first_name }} from {{ profile.traits.city }}",
        fallback={"profile": {"traits": {"first_name": "there", "city": "home"}}},
    )
    response = await render_stub.Render(request(user(f"nobody-{unique}"), content), timeout=LIVE_DEADLINE_S)
    assert response.subject == "Hi there from home"
    assert sorted(response.fallbacks_used) == ["profile.traits.city", "profile.traits.first_name"]
    assert (response.fallback_reason, response.profile_source) == (
        render_pb2.FALLBACK_REASON_PROFILE_NOT_FOUND,
        render_pb2.PROFILE_SOURCE_NONE,
    )


@pytest.mark.usefixtures("live_lookups", "lkg_from_redis")
async def test_the_last_known_good_profile_stands_in_when_the_service_fails(
    scripted: tuple[ScriptedProfileService, str], render_service: RenderServiceFactory, redis_url: str
) -> None:
    service, target = scripted
    async with render_service(target, redis_url=redis_url) as stub:
        live = await stub.Render(request(user("u-lkg"), CART_EMAIL), timeout=LIVE_DEADLINE_S)
        assert live.profile_source == render_pb2.PROFILE_SOURCE_LIVE
        async with Redis.from_url(redis_url) as redis:  # the copy is written off the hot path
            await eventually(lambda: redis.exists(lkg_key("u-lkg")))
        service.mode = "fail"
        # Long enough that the scripted UNAVAILABLE, not the deadline, ends the lookup.
        stale = await stub.Render(request(user("u-lkg"), CART_EMAIL), timeout=LIVE_DEADLINE_S)
    assert stale.status == RENDERED and stale.subject == live.subject
    assert (stale.profile_source, stale.fallback_reason) == (
        render_pb2.PROFILE_SOURCE_LAST_KNOWN_GOOD,
        render_pb2.FALLBACK_REASON_PROFILE_UNAVAILABLE,
    )
    assert stale.degraded and stale.fallback_used and stale.profile_version == 7

    # A fresh process has nothing in memory: the copy in Redis stands in, with its age.
    async with render_service(target, redis_url=redis_url) as stub:
        from_redis = await stub.Render(request(user("u-lkg"), CART_EMAIL), timeout=LIVE_DEADLINE_S)
    assert (from_redis.profile_source, from_redis.subject) == (
        render_pb2.PROFILE_SOURCE_LAST_KNOWN_GOOD,
        live.subject,
    )


async def announce_erasure(nats_url: str, *user_ids: str) -> None:
    """What the profile service publishes once a DeleteProfile has committed."""
    notice = profile_pb2.ErasureNotice(
        identifier_hashes=[unkeyed_hash((IdentifierKind.USER_ID, u)) for u in user_ids]
    )
    log = await JetStreamEventLog.connect(JetStreamSettings(url=nats_url))
    try:
        await log.publish_erasure(f"test-{uuid.uuid4().hex}", notice.SerializeToString())
    finally:
        await log.close()


def lkg_key(user_id: str) -> str:
    return LKG_KEY_PREFIX + unkeyed_hash((IdentifierKind.USER_ID, user_id)).hex()


async def test_an_erasure_notice_drops_every_copy_of_the_person(
    scripted: tuple[ScriptedProfileService, str],
    render_service: RenderServiceFactory,
    redis_url: str,
    nats_url: str,
    unique: str,
) -> None:
    service, target = scripted
    erased = f"u-erased-{unique}"
    redis = Redis.from_url(redis_url)
    try:
        async with render_service(target, redis_url=redis_url) as stub:
            await stub.Render(request(user(erased), CART_EMAIL))  # kept in process and in Redis
            await eventually(lambda: redis.exists(lkg_key(erased)))
            service.mode = "fail"
            kept = await stub.Render(request(user(erased), CART_EMAIL))
            assert kept.profile_source == render_pb2.PROFILE_SOURCE_LAST_KNOWN_GOOD

            await announce_erasure(nats_url, erased)

            async def forgotten() -> bool:
                after = await stub.Render(request(user(erased), CART_EMAIL))
                return after.profile_source == render_pb2.PROFILE_SOURCE_NONE

            await eventually(forgotten)
            await eventually(lambda: _absent(redis, lkg_key(erased)))
            gone = await stub.Render(request(user(erased), CART_EMAIL))
        # Nothing of the person is left to render: no cart, so the send is skipped.
        assert (gone.status, gone.skip_reason) == (SKIPPED, render_pb2.SKIP_REASON_REQUIRED_DATA_MISSING)
    finally:
        await redis.aclose()


@pytest.mark.usefixtures("lkg_from_redis")  # the last render must see a copy in Redis if one was kept
async def test_a_lookup_under_way_when_the_notice_comes_keeps_no_copy(
    scripted: tuple[ScriptedProfileService, str],
    render_service: RenderServiceFactory,
    unheard_redis: tuple[str, Redis],
    nats_url: str,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The order is made, not timed: the lookup is under way (the profile service has it), the
    notice is handled (it deleted a copy in Redis), and only then does the answer come back."""
    service, target = scripted
    private_redis, redis = unheard_redis
    erased = f"u-racing-{unique}"
    # The lookup waits for the test, not for the 1 s cap on a BatchGetProfiles call.
    monkeypatch.setattr(render_profiles, "LOOKUP_TIMEOUT_MAX_S", HELD_S)
    service.release.clear()  # the profile service answers from before the erasure, when told
    # Only the notice deletes this copy (this Redis is the test's render's alone): its going is
    # the evidence that the notice was handled.
    await redis.set(lkg_key(erased), b"0:")
    async with render_service(target, redis_url=private_redis) as stub:
        racing = asyncio.ensure_future(stub.Render(request(user(erased), CART_EMAIL), timeout=HELD_S))
        await asyncio.wait_for(service.asked.wait(), HELD_S)  # the lookup is under way
        await announce_erasure(nats_url)  # an empty notice is handled (and does not stall the rest)
        await announce_erasure(nats_url, erased)
        await eventually(lambda: _absent(redis, lkg_key(erased)), timeout_s=HELD_S)
        service.release.set()
        assert (await racing).profile_source == render_pb2.PROFILE_SOURCE_LIVE
        service.mode = "fail"
        after = await stub.Render(request(user(erased), CART_EMAIL), timeout=LIVE_DEADLINE_S)
    assert after.profile_source == render_pb2.PROFILE_SOURCE_NONE
    assert await _absent(redis, lkg_key(erased))  # the late answer was not written to Redis either


@pytest.fixture
async def unheard_redis(redis_url: str) -> AsyncIterator[tuple[str, Redis]]:
    """Database 1 of the test Redis, and a client of it: the session's render, which follows
    erasure notices too, does not use it, so only the test's own renders delete there."""
    url = redis_url.rpartition("/")[0] + "/1"
    client = Redis.from_url(url)
    try:
        yield url, client
    finally:
        await client.aclose()


@pytest.mark.usefixtures("live_lookups", "lkg_from_redis")  # the last render reads the copy from Redis
async def test_a_render_started_after_an_erasure_drops_the_copies_it_finds(
    scripted: tuple[ScriptedProfileService, str],
    render_service: RenderServiceFactory,
    unheard_redis: tuple[str, Redis],
    nats_url: str,
    unique: str,
) -> None:
    """No render was running to hear the notice; one that starts later reads the notices the
    log keeps and deletes the copy left in Redis."""
    service, target = scripted
    private_redis, redis = unheard_redis
    erased, kept = f"u-before-{unique}", f"u-kept-{unique}"
    async with render_service(target, redis_url=private_redis) as stub:
        for user_id in (erased, kept):
            await stub.Render(request(user(user_id), CART_EMAIL), timeout=LIVE_DEADLINE_S)
        await eventually(lambda: _all_present(redis, lkg_key(erased), lkg_key(kept)))  # off the hot path
    await announce_erasure(nats_url, erased)
    service.mode = "fail"
    async with render_service(target, redis_url=private_redis) as stub:
        await eventually(lambda: _absent(redis, lkg_key(erased)))
        assert await redis.exists(lkg_key(kept)) == 1  # only the erased person's copy goes
        left = await stub.Render(request(user(kept), CART_EMAIL), timeout=LIVE_DEADLINE_S)
    assert left.profile_source == render_pb2.PROFILE_SOURCE_LAST_KNOWN_GOOD


async def test_a_lookup_that_finds_the_person_erased_drops_the_copies_too(
    scripted: tuple[ScriptedProfileService, str],
    render_service: RenderServiceFactory,
    unheard_redis: tuple[str, Redis],
    unique: str,
) -> None:
    """Before the notice arrives, the profile service's own answer says it."""
    service, target = scripted
    private_redis, redis = unheard_redis
    erased = f"u-looked-up-{unique}"
    async with render_service(target, redis_url=private_redis) as stub:
        await stub.Render(request(user(erased), CART_EMAIL))
        await eventually(lambda: redis.exists(lkg_key(erased)))
        service.mode = "erased"
        answer = await stub.Render(request(user(erased), CART_EMAIL))
        assert (answer.status, answer.skip_reason) == (SKIPPED, render_pb2.SKIP_REASON_ERASED)
        await eventually(lambda: _absent(redis, lkg_key(erased)))
        service.mode = "fail"
        after = await stub.Render(request(user(erased), CART_EMAIL))
    assert after.profile_source == render_pb2.PROFILE_SOURCE_NONE


async def _absent(redis: Redis, key: str) -> bool:
    return not await redis.exists(key)


async def _all_present(redis: Redis, *keys: str) -> bool:
    return bool(await redis.exists(*keys) == len(keys))


async def test_the_circuit_opens_after_repeated_failures_and_closes_after_recovery(
    scripted: tuple[ScriptedProfileService, str],
    render_service: RenderServiceFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service, target = scripted
    service.mode = "fail"
    # The breaker's clock is ours: open for a minute of it whatever the machine's speed (with a
    # real 0.5 s a slow call let the circuit half-open before it was seen open), then a minute on.
    skipped_s = 0.0
    monkeypatch.setattr(circuitbreaker, "monotonic", lambda: time.monotonic() + skipped_s)
    async with render_service(target, breaker_failures=3, breaker_recovery_s=60) as stub:
        for _ in range(3):
            failed = await stub.Render(request(user("u-cb"), CART_EMAIL))
            assert failed.fallback_reason == render_pb2.FALLBACK_REASON_PROFILE_UNAVAILABLE
        calls = service.calls
        opened = await stub.Render(request(user("u-cb"), CART_EMAIL))
        assert opened.fallback_reason == render_pb2.FALLBACK_REASON_CIRCUIT_OPEN
        assert service.calls == calls  # not even asked
        service.mode = "ok"
        assert (await stub.Render(request(user("u-cb"), CART_EMAIL))).fallback_reason == (
            render_pb2.FALLBACK_REASON_CIRCUIT_OPEN
        )  # still open while the recovery time runs, though the service is back
        skipped_s = 61
        recovered = await stub.Render(request(user("u-cb"), CART_EMAIL))
        assert recovered.profile_source == render_pb2.PROFILE_SOURCE_LIVE
        assert (
            await stub.Render(request(user("u-cb"), CART_EMAIL))
        ).profile_source == render_pb2.PROFILE_SOURCE_LIVE


@pytest.mark.usefixtures("live_lookups")
async def test_within_max_data_age_renders_share_a_cached_profile_and_one_lookup(
    scripted: tuple[ScriptedProfileService, str],
    render_service: RenderServiceFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The profile service holds the first lookup until all 20 renders have asked for the
    customer, so how the calls arrive over time (spread out on a loaded machine, where a late one
    used to start a second lookup) does not decide the count."""
    service, target = scripted
    key = unkeyed_hash((IdentifierKind.USER_ID, "u-age")).hex()
    asked = 0
    shared_live = render_profiles.ProfileFetcher._shared_live

    async def counted(
        fetcher: render_profiles.ProfileFetcher,
        lookup_key: str,
        identifier: profile_pb2.Identifier,
        time_left_s: float,
    ) -> tuple[float, profile_pb2.Profile]:
        nonlocal asked
        asked += lookup_key == key
        return await shared_live(fetcher, lookup_key, identifier, time_left_s)

    monkeypatch.setattr(render_profiles.ProfileFetcher, "_shared_live", counted)
    cached_ok = template(max_data_age=60)
    service.release.clear()
    async with render_service(target) as stub:
        answering = asyncio.gather(
            *(stub.Render(request(user("u-age"), CART_EMAIL), timeout=LIVE_DEADLINE_S) for _ in range(20))
        )

        async def all_asked() -> bool:
            return asked == 20

        await eventually(all_asked)
        service.release.set()
        burst = await answering
        assert service.calls == 1  # concurrent renders for one customer share the lookup
        assert {r.profile_source for r in burst} == {render_pb2.PROFILE_SOURCE_LIVE}
        again = await stub.Render(request(user("u-age"), cached_ok))
        assert (again.profile_source, service.calls) == (render_pb2.PROFILE_SOURCE_CACHE, 1)
        live = await stub.Render(request(user("u-age"), CART_EMAIL), timeout=LIVE_DEADLINE_S)  # no max age
        assert (live.profile_source, service.calls) == (render_pb2.PROFILE_SOURCE_LIVE, 2)


@pytest.mark.usefixtures("live_lookups")  # the first lookup is held
async def test_concurrent_renders_look_their_customers_up_together(
    scripted: tuple[ScriptedProfileService, str],
    render_service: RenderServiceFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The lookups that come while one is out go out together in the next call. The profile
    service holds the first call until all 20 renders have handed in their lookups, so how the
    calls arrive over time (spread out on a loaded machine) does not decide the count."""
    service, target = scripted
    customers = [user(f"u-together-{i}") for i in range(20)]
    ours = {unkeyed_hash((IdentifierKind.USER_ID, c.value)).hex() for c in customers}
    handed_in: set[str] = set()
    get_live = render_profiles.ProfileFetcher._get_live

    async def counted(
        fetcher: render_profiles.ProfileFetcher,
        key: str,
        identifier: profile_pb2.Identifier,
        timeout_s: float,
    ) -> tuple[float, profile_pb2.Profile]:
        if key in ours:  # not the session render's lookups
            handed_in.add(key)
        return await get_live(fetcher, key, identifier, timeout_s)  # queued before it first waits

    monkeypatch.setattr(render_profiles.ProfileFetcher, "_get_live", counted)
    service.release.clear()
    async with render_service(target) as stub:
        answering = asyncio.gather(
            *(stub.Render(request(c, CART_EMAIL), timeout=LIVE_DEADLINE_S) for c in customers)
        )

        async def all_handed_in() -> bool:
            return len(handed_in) == len(customers)

        await eventually(all_handed_in)
        service.release.set()
        answers = await answering
    assert {a.profile_source for a in answers} == {render_pb2.PROFILE_SOURCE_LIVE}
    assert service.identifiers_asked == 20
    assert service.calls <= 2  # not 20: the first lookup, then all the rest in one batch


@pytest.fixture
def render_process_without_profiles(
    database_url: str, redis_url: str, tmp_path: Path, profile_reader_key: str
) -> Iterator[str]:
    """A render service as deployed, a process of its own (with a NATS of its own, so its
    catalog consumer has nothing to replay), pointed at a profile service that is not there. A
    deadline is the service's promise, so it is measured where the service runs alone, not in
    this process's event loop, which a dozen in-process services and the test's heap share."""
    nats_port = devstack.free_port()
    nats = devstack.start_nats(nats_port, tmp_path / "nats")
    env = {
        **os.environ,
        "RENDER_ADDRESS": f"127.0.0.1:{devstack.free_port()}",
        "RENDER_HEALTH_ADDRESS": f"127.0.0.1:{devstack.free_port()}",
        "RENDER_HTTP_ADDRESS": f"127.0.0.1:{devstack.free_port()}",
        "RENDER_METRICS_ADDRESS": f"127.0.0.1:{devstack.free_port()}",
        "ALLOW_PLAINTEXT": "true",  # the client measures deadlines, not handshakes
        "IDENTIFIER_HASH_KEYS": "unkeyed",
        "PROFILE_SERVICE_PLAINTEXT": "true",
        "PROFILE_SERVICE_TARGET": f"127.0.0.1:{devstack.free_port()}",
        "PROFILE_SERVICE_API_KEY": profile_reader_key,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "NATS_URL": f"nats://127.0.0.1:{nats_port}",
    }
    try:
        running = suite.start_services(env, tmp_path / "logs", [suite.RENDER])
        try:
            yield suite.RENDER.target(env)
        finally:
            assert suite.stop_services(running) == {"render": 0}
    finally:
        devstack.stop_process(nats)


async def test_with_the_profile_service_stopped_every_render_answers_at_once_with_its_fallback(
    render_process_without_profiles: str, admin_key: str
) -> None:
    """Render does not wait for a profile service that is not there: each lookup fails at once
    (UNAVAILABLE, then the circuit open), never by running out of time (TIMEOUT), and every
    call gets its fallback. Shown by the fallback's reason, not by a clock: a 150 ms deadline
    was missed on a loaded machine by processes waiting for a core."""
    content = template(
        CART_EMAIL, required_data=[], fallback={"profile": {"traits": {"first_name": "there"}}}
    )
    requests = [json_format.MessageToDict(request(user(f"u-{i}"), content)) for i in range(50)]
    # 50 concurrent calls with a 2 s deadline (an email platform's), from a client process of its
    # own (DEADLINE_EXCEEDED would come back as an error).
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.render.concurrent_renders",
        render_process_without_profiles,
        "2",
        cwd=repo_root(),
        env={**suite.service_env(os.environ), "SENDTIME_API_KEY": admin_key},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    output, _ = await asyncio.wait_for(client.communicate(json.dumps(requests).encode()), 60)
    assert client.returncode == 0
    results = [json_format.ParseDict(r["response"], render_pb2.RenderResponse()) for r in json.loads(output)]
    assert len(results) == 50
    assert all(r.status == RENDERED and r.subject.startswith("there,") for r in results)
    assert {r.fallback_reason for r in results} <= {
        render_pb2.FALLBACK_REASON_PROFILE_UNAVAILABLE,
        render_pb2.FALLBACK_REASON_CIRCUIT_OPEN,
    }


@pytest.mark.usefixtures("live_lookups")
async def test_a_batch_streams_one_result_per_customer(
    scripted: tuple[ScriptedProfileService, str],
    render_service: RenderServiceFactory,
    template_stub: render_pb2_grpc.TemplateServiceAsyncStub,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each chunk of 500 has 5 s to look its customers up and render them; on a loaded machine
    # the lookup of 500 profiles took longer, and those customers rendered without a profile.
    monkeypatch.setattr(render_servicer, "BATCH_CHUNK_DEADLINE_S", LIVE_DEADLINE_S)
    service, target = scripted
    created = await template_stub.CreateTemplate(
        render_pb2.CreateTemplateRequest(template_id=f"cart-{unique}", content=CART_EMAIL, publish=True)
    )
    customers = [user(f"u-{i}") for i in range(1200)]
    customers.append(profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_EMAIL, value="bad"))
    async with render_service(target) as stub:
        batch = render_pb2.RenderBatchRequest(customers=customers, template_name=created.template.name)
        results = [r async for r in stub.RenderBatch(batch)]
    assert sorted(r.index for r in results) == list(range(len(customers)))
    rendered = [r for r in results if r.HasField("result")]
    assert len(rendered) == 1200 and all(r.result.template_version == 1 for r in rendered)
    assert all(r.result.subject == "Ada, 1 items wait for you" for r in rendered)
    assert service.calls == 3  # 500 customers per profile lookup
    (bad,) = [r for r in results if r.HasField("error")]
    assert bad.index == 1200 and bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


async def test_a_batch_of_100000_long_identifiers_fits_and_150000_short_ones_name_the_limit(
    scripted: tuple[ScriptedProfileService, str],
    render_service: RenderServiceFactory,
    template_stub: render_pb2_grpc.TemplateServiceAsyncStub,
    unique: str,
) -> None:
    """The contract allows 100,000 customers: with 256-character identifiers that is ~26 MB,
    over gRPC's default 4 MiB. Before explicit sizes, 150,000 short ones got the transport's raw
    "Received message larger than max (8250016 vs. 4194304)"."""
    _, target = scripted
    created = await template_stub.CreateTemplate(
        render_pb2.CreateTemplateRequest(template_id=f"big-{unique}", content=CART_EMAIL, publish=True)
    )
    largest = render_pb2.RenderBatchRequest(
        customers=[user(f"{i:06d}" + "x" * 250) for i in range(100_000)], template_name=created.template.name
    )
    assert largest.ByteSize() > 25_000_000
    too_many = render_pb2.RenderBatchRequest(
        customers=[user(f"customer-{i:06d}") for i in range(150_000)], template_name=created.template.name
    )
    async with render_service(target) as stub:
        first = await anext(aiter(stub.RenderBatch(largest, timeout=30)))
        assert first.HasField("result")  # taken and rendering; the rest is not read
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await anext(aiter(stub.RenderBatch(too_many, timeout=30)))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = status_of(refused.value)
    assert status is not None
    assert field_violations(status) == [FieldViolation("customers", "must hold 1 to 100000 customers")]


async def test_a_batchs_deadline_reaches_its_profile_lookups(
    scripted: tuple[ScriptedProfileService, str],
    render_service: RenderServiceFactory,
    template_stub: render_pb2_grpc.TemplateServiceAsyncStub,
    unique: str,
) -> None:
    service, target = scripted
    created = await template_stub.CreateTemplate(
        render_pb2.CreateTemplateRequest(template_id=f"due-{unique}", content=CART_EMAIL, publish=True)
    )
    batch = render_pb2.RenderBatchRequest(customers=[user("u-1")], template_name=created.template.name)
    async with render_service(target) as stub:
        results = [r async for r in stub.RenderBatch(batch, timeout=2)]
    assert len(results) == 1 and results[0].HasField("result")
    (time_left,) = service.time_left
    assert time_left is not None and time_left <= 2  # a chunk alone may take 5 s


async def test_a_batch_renders_only_as_fast_as_its_reader_reads(
    scripted: tuple[ScriptedProfileService, str],
    render_service: RenderServiceFactory,
    template_stub: render_pb2_grpc.TemplateServiceAsyncStub,
    unique: str,
) -> None:
    """A reader that stops after ten results holds a batch of 20 chunks (500 customers, looked
    up together) at a few chunks ahead of it, once HTTP/2's flow-control window is full:
    before, every chunk rendered and waited in memory. Each email is ~6 KB, as real ones are,
    most of it markup that costs nothing to render: the flow control is what is tested, and
    10,000 renders of a 200-step loop took 36 s of CPU, too long for a loaded machine."""
    service, target = scripted
    long_email = render_pb2.Template(
        subject="Hi {{ profile.traits.first_name }}",
        html="<p>Hi {{ profile.traits.first_name }}</p>"
        + "".join(f"<p>item {i}: lorem ipsum dolor sit amet</p>" for i in range(150)),
    )
    created = await template_stub.CreateTemplate(
        render_pb2.CreateTemplateRequest(template_id=f"slow-{unique}", content=long_email, publish=True)
    )
    batch = render_pb2.RenderBatchRequest(
        customers=[user(f"u-{i}") for i in range(10_000)], template_name=created.template.name
    )
    async with render_service(target) as stub:
        call = stub.RenderBatch(batch, timeout=120)
        read = 0
        async for response in call:
            assert len(response.result.html) > 5_000  # with the profile or, late, without
            read += 1
            if read == 10:
                break
        held_at = -1
        while held_at != service.identifiers_asked:  # until the batch stops moving
            held_at = service.identifiers_asked
            await asyncio.sleep(1)
        assert held_at <= 8 * 500  # the chunk being read, 4 ahead, what the window holds
        rest = [r async for r in call]
    assert [r.index for r in rest] == list(range(10, 10_000))  # all, in order
    assert service.identifiers_asked == 10_000


async def test_a_stored_template_renders_at_its_published_or_a_given_version(
    scripted: tuple[ScriptedProfileService, str],
    render_service: RenderServiceFactory,
    template_stub: render_pb2_grpc.TemplateServiceAsyncStub,
    unique: str,
) -> None:
    _, target = scripted
    name = (
        await template_stub.CreateTemplate(
            render_pb2.CreateTemplateRequest(template_id=f"t-{unique}", content=CART_EMAIL, publish=True)
        )
    ).template.name
    await template_stub.UpdateTemplate(
        render_pb2.UpdateTemplateRequest(
            name=name, content=template(CART_EMAIL, subject="v2 for {{ profile.traits.first_name }}")
        )
    )
    async with render_service(target) as stub:
        published = await stub.Render(render_pb2.RenderRequest(customer=user("u-1"), template_name=name))
        second = await stub.Render(
            render_pb2.RenderRequest(customer=user("u-1"), template_name=name, template_version=2)
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Render(
                render_pb2.RenderRequest(customer=user("u-1"), template_name=f"templates/none-{unique}")
            )
        # Found by schemathesis: a version past 32 bits, a negative one, or a name no template
        # can have, were the template store "unavailable" (503).
        refused = {}
        for version, template_name in ((461718108206, name), (-7, name), (0, "templates/Not\x0bAnId")):
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stub.Render(
                    render_pb2.RenderRequest(
                        customer=user("u-1"), template_name=template_name, template_version=version
                    )
                )
            refused[version] = failed.value.code()
    assert (published.template_version, published.subject) == (1, "Ada, 1 items wait for you")
    assert (second.template_version, second.subject) == (2, "v2 for Ada")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert refused == {
        461718108206: grpc.StatusCode.NOT_FOUND,
        -7: grpc.StatusCode.INVALID_ARGUMENT,
        0: grpc.StatusCode.INVALID_ARGUMENT,
    }


EMAIL_MESSAGE = ingest_pb2.EmailMessage(message_id="m-1")


@pytest.mark.parametrize(
    ("payload", "channel", "reason"),
    [
        (
            {"email_unsubscribed": ingest_pb2.EmailUnsubscribed(message=EMAIL_MESSAGE)},
            0,
            render_pb2.SKIP_REASON_UNSUBSCRIBED,
        ),
        (
            {
                "email_bounced": ingest_pb2.EmailBounced(
                    message=EMAIL_MESSAGE, bounce_type=ingest_pb2.BOUNCE_TYPE_HARD
                )
            },
            0,
            render_pb2.SKIP_REASON_HARD_BOUNCED,
        ),
        (
            {"email_spam_reported": ingest_pb2.EmailSpamReported(message=EMAIL_MESSAGE)},
            0,
            render_pb2.SKIP_REASON_SPAM_REPORTED,
        ),
        (
            {"consent_changed": ingest_pb2.ConsentChanged(channel=ingest_pb2.CHANNEL_SMS, subscribed=False)},
            ingest_pb2.CHANNEL_SMS,
            render_pb2.SKIP_REASON_NO_CONSENT,
        ),
    ],
)
@pytest.mark.usefixtures("live_lookups")
async def test_suppressed_customers_are_skipped(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    render_stub: render_pb2_grpc.RenderServiceAsyncStub,
    unique: str,
    payload: dict[str, Any],
    channel: int,
    reason: int,
) -> None:
    await send(
        ingest_stub,
        event(user_id=f"u-{unique}", cart_item_added=cart_item_added("s1")),
        event(user_id=f"u-{unique}", source=ingest_pb2.EVENT_SOURCE_EMAIL, **payload),
    )
    await wait_for_profile(
        profile_stub, user(f"u-{unique}"), lambda p: len(p.cart.items) == 1 and p.version >= 2
    )
    response = await render_stub.Render(
        request(user(f"u-{unique}"), template(CART_EMAIL, channel=channel)), timeout=LIVE_DEADLINE_S
    )
    assert (response.status, response.skip_reason) == (SKIPPED, reason)
    other_channel = ingest_pb2.CHANNEL_PUSH
    allowed = await render_stub.Render(
        request(user(f"u-{unique}"), template(CART_EMAIL, channel=other_channel)), timeout=LIVE_DEADLINE_S
    )
    assert allowed.status == RENDERED  # suppression is per channel


async def test_recommendations_come_from_the_catalog_kept_from_events(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    render_stub: render_pb2_grpc.RenderServiceAsyncStub,
    unique: str,
) -> None:
    sku = {name: f"{name}-{unique}" for name in ("shoe", "sock", "lace", "hat", "old")}

    def product(name: str) -> ingest_pb2.Event:
        upsert = ingest_pb2.ProductUpserted(
            sku=sku[name],
            name=name.title(),
            price=money("10.00"),
            category=f"c-{unique}",
            in_stock=name != "hat",
        )
        e = event(product_upserted=upsert)
        e.customer.crm_id = "catalog"
        return e

    catalog = [product(name) for name in sku]
    someone_else = [
        event(
            user_id=f"other-{unique}",
            order_completed=order_completed(f"o1-{unique}", "30.00", sku["shoe"], sku["sock"], sku["hat"]),
        )
    ]
    mine = [
        event(user_id=f"u-{unique}", order_completed=order_completed(f"o2-{unique}", "10.00", sku["old"])),
        event(user_id=f"u-{unique}", cart_item_added=cart_item_added(sku["shoe"], name="Shoe")),
    ]
    await send(ingest_stub, *catalog, *someone_else, *mine)
    await wait_for_profile(
        profile_stub, user(f"u-{unique}"), lambda p: len(p.cart.items) == 1 and p.orders.count == 1
    )
    content = template(
        CART_EMAIL,
        html="{% for r in recommendations %}{{ r.sku }}:{{ r.reason }} {% endfor %}",
        required_data=[],
    )
    deadline = asyncio.get_running_loop().time() + 10
    while True:  # the catalog consumer catches up with the events
        response = await render_stub.Render(request(user(f"u-{unique}"), content), timeout=2)
        if f"{sku['sock']}:bought_together" in response.html or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.1)
    shown = response.html.split()
    assert shown[0] == f"{sku['shoe']}:cart"
    assert f"{sku['sock']}:bought_together" in shown
    assert not any(s.startswith(sku["hat"]) for s in shown)  # out of stock
    assert not any(s.startswith(sku["old"]) for s in shown)  # already bought
