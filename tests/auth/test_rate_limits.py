"""Rate limits per key on the real services (ingest, profile and render, each with a tiny rate,
sharing a Redis of the test's own): past its rate a key gets RESOURCE_EXHAUSTED with RetryInfo
and an ErrorInfo, while another key goes on; a stream is limited when it opens, not per message;
with that Redis killed each replica limits alone and no call fails otherwise, and once Redis is
back the limits are shared again; a client certificate is limited by its identity. And a key's
own rate limits, set with KeyService, in place of the defaults."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from redis.asyncio import Redis

import devstack
from ingest.server import IngestApp
from ingest.server import create_app as create_ingest_app
from ingest.settings import Settings as IngestSettings
from profile_service.server import ProfileApp
from profile_service.server import create_app as create_profile_app
from profile_service.settings import Settings as ProfileSettings
from render.server import RenderApp
from render.server import create_app as create_render_app
from sendtime.auth.v1 import auth_pb2, auth_pb2_grpc
from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime.render.v1 import render_pb2, render_pb2_grpc
from sendtime_common.auth.access import AccessInterceptor, Authenticator, MethodAccess
from sendtime_common.auth.api_keys import Scope, key_id_of, new_key
from sendtime_common.auth.audit import AuditTrail
from sendtime_common.auth.key_store import KeyStore
from sendtime_common.auth.keyring import KeyRing
from sendtime_common.auth.server_auth import AuthSettings
from sendtime_common.errors import field_violations, status_of
from sendtime_common.event_log import JetStreamSettings
from sendtime_common.grpc_server import GrpcServer
from sendtime_common.identifiers import IdentifierHasher
from sendtime_common.rate_limit import KEY_PREFIX, RATE_LIMITED, Rate, RateLimiter, RateLimitSettings
from sendtime_common.tls import TlsSettings, channel
from tests.auth.test_tls import READ, Guarded, make_pki
from tests.conftest import LOCAL_SERVER, eventually, render_settings
from tests.conftest import channel as keyed_channel
from tests.factories import event, identify
from tests.keys import issue_key

RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
# How the cheap calls below end when they are let through (nobody has that profile).
ANSWERED = {grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND}
# Tiny rates: 3 calls at once, then one every 5 s. A call after the burst is refused unless 5 s
# passed since its first call: the calls between open channels and run handlers (PostgreSQL,
# NATS), which a loaded machine can stretch well past a second.
TINY = Rate(per_second=0.2, burst=3)
TINY_INTERVAL_S = 5.0
# A Redis timeout a loaded machine keeps: a script run cut short would move the decisions in
# process (a fresh bucket there) in the middle of a sequence. A dead Redis fails at once anyway.
LIMITS = RateLimitSettings(rates={scope: TINY for scope in Scope}, redis_timeout_s=2, redis_retry_s=0.1)


@dataclass
class Limited:
    redis_url: str
    redis_port: int
    workdir: Path
    redis: subprocess.Popen[bytes]
    ingest: IngestApp
    profile: ProfileApp
    render: RenderApp
    database_url: str

    def target(self, app: IngestApp | ProfileApp | RenderApp) -> str:
        return f"127.0.0.1:{app.grpc.port}"


@pytest.fixture
async def limited(
    tmp_path: Path,
    database_url: str,
    nats_url: str,
    redis_url: str,
    profile_reader_key: str,
    unique: str,
) -> AsyncIterator[Limited]:
    """The three services, their rate limits in a Redis of this test's own (the caches in the
    session's Redis), serving gRPC only."""
    port = devstack.free_port()
    process = devstack.start_redis(port, tmp_path / "redis")
    limits_url = f"redis://127.0.0.1:{port}/0"
    auth = AuthSettings(rate_limits=RateLimitSettings(**{**_fields(LIMITS), "redis_url": limits_url}))
    events = JetStreamSettings(url=nats_url)
    started: list[IngestApp | ProfileApp | RenderApp] = []
    try:
        ingest = await create_ingest_app(
            IngestSettings(**LOCAL_SERVER, database_url=database_url, event_log=events, auth=auth)
        )
        started.append(ingest)
        profile = await create_profile_app(
            ProfileSettings(
                **LOCAL_SERVER,
                database_url=database_url,
                redis_url=redis_url,
                consumer_name=f"limits-{unique}",
                event_log=events,
                auth=auth,
            )
        )
        started.append(profile)
        render = await create_render_app(
            render_settings(
                f"127.0.0.1:{profile.grpc.port}",
                database_url,
                nats_url,
                redis_url="",
                profile_api_key=profile_reader_key,
                auth=auth,
            )
        )
        started.append(render)
        for app in started:
            await app.grpc.start()
        limited = Limited(limits_url, port, tmp_path, process, ingest, profile, render, database_url)
        yield limited
        process = limited.redis  # the one running now: a test may have restarted it
    finally:
        for app in reversed(started):
            await app.stop(grace_s=1)
        devstack.stop_process(process)


def _fields(settings: RateLimitSettings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in RateLimitSettings.__slots__}


Call = Callable[[str], Awaitable[grpc.StatusCode]]
StubCall = Callable[[grpc.aio.Channel], Any]  # a stub's call: awaitable


def calls(limited: Limited) -> dict[str, Call]:
    """One cheap call per service, made with a given key: how it ended."""

    async def outcome(target: str, key: str, make: StubCall) -> grpc.StatusCode:
        async with keyed_channel(target, key) as opened:
            try:
                await make(opened)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    def ingest(key: str) -> Awaitable[grpc.StatusCode]:
        return outcome(
            limited.target(limited.ingest),
            key,
            lambda c: ingest_pb2_grpc.IngestServiceStub(c).GetIngestStats(
                ingest_pb2.GetIngestStatsRequest(), timeout=5
            ),
        )

    def profile(key: str) -> Awaitable[grpc.StatusCode]:
        nobody = profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_USER_ID, value="nobody")
        return outcome(
            limited.target(limited.profile),
            key,
            lambda c: profile_pb2_grpc.ProfileServiceStub(c).GetProfile(
                profile_pb2.GetProfileRequest(identifier=nobody), timeout=5
            ),
        )

    def render(key: str) -> Awaitable[grpc.StatusCode]:
        return outcome(
            limited.target(limited.render),
            key,
            lambda c: render_pb2_grpc.TemplateServiceStub(c).ListTemplates(
                render_pb2.ListTemplatesRequest(), timeout=5
            ),
        )

    return {"ingest": ingest, "profile": profile, "render": render}


def details(error: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo]:
    status = status_of(error)
    assert status is not None, error
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    assert [d.Unpack(info) or d.Unpack(retry) for d in status.details] == [True, True]
    return info, retry


async def refusal(target: str, key: str, stub_call: StubCall) -> grpc.aio.AioRpcError:
    async with keyed_channel(target, key) as opened:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub_call(opened)
    return caught.value


async def test_past_its_rate_a_key_is_refused_with_retry_info_on_every_service_and_others_go_on(
    limited: Limited,
) -> None:
    service_calls = calls(limited)
    for service, scope in (
        ("ingest", Scope.STATS_READ),
        ("profile", Scope.PROFILES_READ),
        ("render", Scope.TEMPLATES_READ),
    ):
        key = await issue_key(limited.database_url, [scope], f"limits {service}")
        other = await issue_key(limited.database_url, [scope], f"limits {service}, another")
        outcomes = [await service_calls[service](key) for _ in range(5)]
        assert set(outcomes[:3]) <= ANSWERED, service  # the burst
        assert outcomes[3:] == [RESOURCE_EXHAUSTED] * 2, service
        assert await service_calls[service](other) != RESOURCE_EXHAUSTED, service  # a budget of its own
    for app in (limited.ingest, limited.profile, limited.render):
        assert app.auth.limiter is not None and app.auth.limiter.shared  # decided in Redis throughout

    key = await issue_key(limited.database_url, [Scope.PROFILES_READ], "limits details")
    get = lambda c: profile_pb2_grpc.ProfileServiceStub(c).GetProfile(  # noqa: E731
        profile_pb2.GetProfileRequest(
            identifier=profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_USER_ID, value="nobody")
        ),
        timeout=5,
    )
    started = time.monotonic()
    for _ in range(3):
        await service_calls["profile"](key)
    error = await refusal(limited.target(limited.profile), key, get)
    took = time.monotonic() - started
    assert error.code() == RESOURCE_EXHAUSTED
    info, retry = details(error)
    assert (info.reason, info.domain) == (RATE_LIMITED, "sendtime.dev")
    assert dict(info.metadata) == {
        "scope": "profiles.read",
        "limit": "12/min burst 3",
        "key_id": key_id_of(key),
        "principal": f"apiKeys/{key_id_of(key)}",
    }
    delay = retry.retry_delay.ToTimedelta().total_seconds()
    # The next call fits one interval after the first of the burst, less the time since then
    # (at most ``took``; 1 ms for the Duration's rounding).
    assert TINY_INTERVAL_S - took - 0.001 <= delay <= TINY_INTERVAL_S
    assert "profiles.read" in (error.details() or "")
    await asyncio.sleep(delay + 0.05)
    assert await service_calls["profile"](key) != RESOURCE_EXHAUSTED  # as RetryInfo said


async def test_a_stream_is_limited_when_it_opens_not_per_event(limited: Limited, unique: str) -> None:
    key = await issue_key(limited.database_url, [Scope.EVENTS_WRITE], "limits stream")

    async def stream(n: int) -> list[ingest_pb2.StreamEventsResponse]:
        async def requests() -> AsyncIterator[ingest_pb2.StreamEventsRequest]:
            for i in range(n):
                yield ingest_pb2.StreamEventsRequest(
                    event=event(user_id=f"limits-{unique}-{i}", identify=identify(plan="pro"))
                )

        async with keyed_channel(limited.target(limited.ingest), key) as opened:
            return [
                r
                async for r in ingest_pb2_grpc.IngestServiceStub(opened).StreamEvents(requests(), timeout=10)
            ]

    answers = await stream(10)  # ten events in one call: more than the burst of 3
    assert [a.result.outcome for a in answers] == [ingest_pb2.EVENT_OUTCOME_ACCEPTED] * 10
    await stream(1)
    await stream(1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream(1)
    assert caught.value.code() == RESOURCE_EXHAUSTED
    assert details(caught.value)[0].metadata["scope"] == "events.write"
    limiter = limited.ingest.auth.limiter
    assert limiter is not None and limiter.shared  # decided in Redis throughout


async def test_with_redis_killed_each_replica_limits_alone_then_limits_are_shared_again(
    limited: Limited,
) -> None:
    service_calls = calls(limited)
    apps: dict[str, IngestApp | ProfileApp | RenderApp] = {
        "ingest": limited.ingest,
        "profile": limited.profile,
        "render": limited.render,
    }
    scopes = {"ingest": Scope.STATS_READ, "profile": Scope.PROFILES_READ, "render": Scope.TEMPLATES_READ}
    limited.redis.kill()  # no goodbye: connections just break
    limited.redis.wait()
    for service, call in service_calls.items():
        key = await issue_key(limited.database_url, [scopes[service]], f"limits down {service}")
        outcomes = [await call(key) for _ in range(5)]
        # Limited by this replica alone (RATE_LIMIT_REPLICAS=1: the whole rate); nothing else fails.
        assert set(outcomes[:3]) <= ANSWERED, (service, outcomes)
        assert outcomes[3:] == [RESOURCE_EXHAUSTED] * 2, (service, outcomes)
        limiter = apps[service].auth.limiter
        assert limiter is not None and not limiter.shared

    limited.redis = devstack.start_redis(limited.redis_port, limited.workdir / "redis-again")
    for service, call in service_calls.items():
        limiter = apps[service].auth.limiter
        assert limiter is not None
        key = await issue_key(limited.database_url, [scopes[service]], f"limits back {service}")

        async def shared_again(call: Call = call, key: str = key, limiter: RateLimiter = limiter) -> bool:
            await call(key)  # a decision made while per replica probes Redis when it is due
            return limiter.shared

        await eventually(shared_again, timeout_s=10)
        fresh = await issue_key(limited.database_url, [scopes[service]], f"limits shared {service}")
        assert await call(fresh) != RESOURCE_EXHAUSTED
        async with Redis.from_url(limited.redis_url) as client:
            bucket = f"{KEY_PREFIX}{service}:{scopes[service].value}:apiKeys/{key_id_of(fresh)}"
            assert await client.exists(bucket)  # decided in Redis again


async def test_a_client_certificate_is_limited_by_its_identity(
    tmp_path: Path, database_url: str, redis_url: str, unique: str
) -> None:
    pki = make_pki(tmp_path / "pki")
    cert, key = pki.server()
    identity = f"spiffe://sendtime.test/{unique}"
    identities = {f"{identity}/{name}": frozenset({Scope.PROFILES_READ}) for name in ("a", "b")}
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    ring = KeyRing(KeyStore(pool))
    await ring.load()
    limiter = RateLimiter(LIMITS, "test", redis_url)
    access = AccessInterceptor(
        {READ: MethodAccess(READ, Scope.PROFILES_READ)},
        Authenticator(ring, identities),
        AuditTrail(pool, "test"),
        IdentifierHasher.unkeyed(),
        limiter=limiter,
    )
    tls = TlsSettings(cert_file=str(cert), key_file=str(key), client_ca_file=str(pki.ca_file))
    server = GrpcServer(
        "127.0.0.1:0", ["test.Guarded"], Guarded().register, access, tls=tls, health_address=""
    )
    await server.start()
    try:

        async def read_as(name: str) -> grpc.StatusCode:
            client = pki.client(f"{identity}/{name}", name)
            async with channel(f"localhost:{server.port}", client) as opened:
                try:
                    await opened.unary_unary(READ, None, None)(b"", timeout=5)
                except grpc.aio.AioRpcError as exc:
                    info, _ = details(exc)
                    assert (info.metadata["principal"], info.metadata["key_id"]) == (
                        f"mtls:{identity}/{name}",
                        "",
                    )
                    return exc.code()
            return grpc.StatusCode.OK

        assert [await read_as("a") for _ in range(4)] == [grpc.StatusCode.OK] * 3 + [RESOURCE_EXHAUSTED]
        assert await read_as("b") == grpc.StatusCode.OK  # another identity: a budget of its own
        assert limiter.shared  # decided in Redis throughout
    finally:
        await server.stop(0)
        await limiter.close()
        await pool.close()


# --- A key's own rate limits (KeyService, on the session's services with the default rates) ---


@pytest.fixture
async def keys(profile_app: ProfileApp, admin_key: str) -> AsyncIterator[auth_pb2_grpc.KeyServiceAsyncStub]:
    async with keyed_channel(f"127.0.0.1:{profile_app.grpc.port}", admin_key) as opened:
        yield auth_pb2_grpc.KeyServiceStub(opened)


async def get_profile(profile_app: ProfileApp, key: str) -> tuple[grpc.StatusCode, str]:
    """How a read with ``key`` ends, and the limit a refusal for rate names ("" for no refusal)."""
    nobody = profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_USER_ID, value="nobody")
    async with keyed_channel(f"127.0.0.1:{profile_app.grpc.port}", key) as opened:
        try:
            await profile_pb2_grpc.ProfileServiceStub(opened).GetProfile(
                profile_pb2.GetProfileRequest(identifier=nobody), timeout=5
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == RESOURCE_EXHAUSTED:
                return exc.code(), details(exc)[0].metadata["limit"]
            return exc.code(), ""
    return grpc.StatusCode.OK, ""


async def decided_in_redis(limiter: RateLimiter) -> bool:
    """Whether ``limiter`` decides in Redis; a decision for a caller of its own first, which
    probes Redis when due if it had stopped answering in time (the limiter is the session's)."""
    await limiter.decide(Scope.PROFILES_READ, f"apiKeys/probe-{uuid.uuid4().hex[:12]}", Rate(1, 1))
    return limiter.shared


async def test_a_key_with_its_own_rate_is_held_to_it_until_it_is_set_back_to_the_default(
    keys: auth_pb2_grpc.KeyServiceAsyncStub, profile_app: ProfileApp, admin_key: str
) -> None:
    # Two calls at once, then one every 10 s: the third call is refused however slow the first two.
    own = auth_pb2.RateLimit(scope=auth_pb2.SCOPE_PROFILES_READ, calls_per_second=0.1, burst=2)
    made = await keys.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(
            display_name="slow reader", scopes=[auth_pb2.SCOPE_PROFILES_READ], rate_limits=[own]
        )
    )
    assert list(made.api_key.rate_limits) == [own]
    limiter = profile_app.auth.limiter
    assert limiter is not None
    await eventually(lambda: decided_in_redis(limiter))
    outcomes = [await get_profile(profile_app, made.key) for _ in range(3)]
    # Its own limit, not the default (20,000 at once).
    assert outcomes == [(grpc.StatusCode.NOT_FOUND, "")] * 2 + [(RESOURCE_EXHAUSTED, "6/min burst 2")]
    assert limiter.shared  # the three decided in Redis, none in process after a slow answer

    rotated = await keys.RotateApiKey(
        auth_pb2.RotateApiKeyRequest(
            name=made.api_key.name, old_key_grace_period=duration_pb2.Duration(seconds=60)
        )
    )
    assert list(rotated.api_key.rate_limits) == [own]  # a rotated key keeps them

    cleared = await keys.SetApiKeyRateLimits(auth_pb2.SetApiKeyRateLimitsRequest(name=made.api_key.name))
    assert not cleared.api_key.rate_limits

    # Every replica reloads the keys within about a second. The first call at the default rate
    # may still be refused for an instant: what the own rate owed is cut to a burst at the new rate.
    async def default_again() -> bool:
        return all(
            [(await get_profile(profile_app, made.key))[0] == grpc.StatusCode.NOT_FOUND for _ in range(3)]
        )

    await eventually(default_again, timeout_s=10)
    shown = await keys.GetApiKey(auth_pb2.GetApiKeyRequest(name=made.api_key.name))
    assert not shown.api_key.rate_limits

    async with keyed_channel(f"127.0.0.1:{profile_app.grpc.port}", admin_key) as opened:
        trail = await auth_pb2_grpc.AuditServiceStub(opened).ListAuditEvents(
            auth_pb2.ListAuditEventsRequest(method="/sendtime.auth.v1.KeyService/SetApiKeyRateLimits")
        )
    assert [(e.target, e.outcome) for e in trail.audit_events][:1] == [(made.api_key.name, "OK")]


async def test_rate_limit_requests_are_checked_field_by_field(
    keys: auth_pb2_grpc.KeyServiceAsyncStub,
) -> None:
    def limit(scope: int, calls_per_second: float = 10, burst: int = 10) -> auth_pb2.RateLimit:
        return auth_pb2.RateLimit(scope=scope, calls_per_second=calls_per_second, burst=burst)  # type: ignore[arg-type]

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await keys.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(
                display_name="wrong limits",
                scopes=[auth_pb2.SCOPE_EVENTS_WRITE],
                rate_limits=[
                    limit(auth_pb2.SCOPE_PROFILES_READ),  # not one of its scopes
                    limit(auth_pb2.SCOPE_EVENTS_WRITE, calls_per_second=0),
                    limit(auth_pb2.SCOPE_EVENTS_WRITE, burst=0),
                    limit(auth_pb2.SCOPE_EVENTS_WRITE, calls_per_second=float("nan")),
                    limit(auth_pb2.SCOPE_UNSPECIFIED),
                ],
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = status_of(caught.value)
    assert status is not None
    assert [v.field for v in field_violations(status)] == [
        "rate_limits[0].scope",
        "rate_limits[1].calls_per_second",
        "rate_limits[2].burst",
        "rate_limits[3].calls_per_second",
        "rate_limits[4].scope",
    ]

    made = await keys.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(display_name="limits checked", scopes=[auth_pb2.SCOPE_EVENTS_WRITE])
    )
    twice = [limit(auth_pb2.SCOPE_EVENTS_WRITE), limit(auth_pb2.SCOPE_EVENTS_WRITE)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await keys.SetApiKeyRateLimits(
            auth_pb2.SetApiKeyRateLimitsRequest(name=made.api_key.name, rate_limits=twice)
        )
    status = status_of(caught.value)
    assert status is not None and [v.field for v in field_violations(status)] == ["rate_limits[1].scope"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await keys.SetApiKeyRateLimits(
            auth_pb2.SetApiKeyRateLimitsRequest(name=f"apiKeys/{new_key().key_id}")
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
