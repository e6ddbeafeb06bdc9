"""Keys and scopes on the real services (ingest, profile, render, triggers on real PostgreSQL, Redis and
NATS): every method of every hosted service declares a scope and refuses a call without
credentials; each refusal carries its reason; a revoked key stops working on every service
within seconds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, duration_pb2, timestamp_pb2
from google.protobuf.descriptor import MethodDescriptor
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ingest.server import IngestApp
from profile_service.server import ProfileApp
from render.server import RenderApp
from sendtime.auth.v1 import auth_pb2, auth_pb2_grpc
from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime.render.v1 import render_pb2, render_pb2_grpc
from sendtime_common.auth.access import MissingAccessRule, access_rules, rule_of
from sendtime_common.auth.api_keys import ALL_SCOPES, KEY_PREFIX, Scope, new_key
from sendtime_common.auth.client import bearer_metadata
from sendtime_common.errors import field_violations, status_of
from tests.conftest import channel, eventually
from tests.keys import issue_key
from triggers.server import TriggersApp

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = status_of(error)
    assert status is not None, error
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError(f"no ErrorInfo in {status}")


async def raw_call(
    target: str, path: str, method: MethodDescriptor, metadata: tuple[tuple[str, str], ...] = ()
) -> grpc.aio.AioRpcError:
    """Call ``path`` with an empty request (raw bytes, any cardinality) and return its error."""
    async with grpc.aio.insecure_channel(target) as calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            if method.client_streaming:
                call = calls.stream_stream(path, None, None)(iter([b""]), metadata=metadata, timeout=5)
                async for _ in call:
                    pass
            elif method.server_streaming:
                async for _ in calls.unary_stream(path, None, None)(b"", metadata=metadata, timeout=5):
                    pass
            else:
                await calls.unary_unary(path, None, None)(b"", metadata=metadata, timeout=5)
    return caught.value


@pytest.fixture(scope="module")
def servers(
    ingest_app: IngestApp, profile_app: ProfileApp, render_app: RenderApp, triggers_app: TriggersApp
) -> list[tuple[str, list[str]]]:
    """(target, hosted service names) of each service."""
    return [
        (f"127.0.0.1:{app.grpc.port}", app.grpc.service_names)
        for app in (ingest_app, profile_app, render_app, triggers_app)
    ]


def hosted_methods(servers: list[tuple[str, list[str]]]) -> list[tuple[str, str, MethodDescriptor]]:
    pool = descriptor_pool.Default()
    return [
        (target, f"/{name}/{method.name}", method)
        for target, names in servers
        for name in names
        for method in pool.FindServiceByName(name).methods
    ]


async def test_every_method_declares_a_scope_and_refuses_a_call_without_credentials(
    servers: list[tuple[str, list[str]]],
) -> None:
    methods = hosted_methods(servers)
    # ingest; profile, unmerged events, keys, audit; render and templates; triggers, destinations
    # and deliveries
    assert len(methods) == 5 + 5 + 2 + 6 + 1 + 8 + 7 + 6 + 5
    for _, names in servers:
        access_rules(names)  # raises for a method without a usable rule
    for target, path, method in methods:
        error = await raw_call(target, path, method)
        assert error.code() == UNAUTHENTICATED, path
        assert error_info(error).reason == "CREDENTIALS_MISSING", path


async def test_a_key_without_the_scope_a_method_needs_is_refused_naming_that_scope(
    servers: list[tuple[str, list[str]]], database_url: str
) -> None:
    keys = {scope: await issue_key(database_url, ALL_SCOPES - {scope}, f"all but {scope}") for scope in Scope}
    for target, path, method in hosted_methods(servers):
        rule = rule_of(method)
        assert rule.scope is not None
        error = await raw_call(target, path, method, bearer_metadata(keys[rule.scope]))
        assert error.code() == PERMISSION_DENIED, path
        info = error_info(error)
        assert (info.reason, info.metadata["scope"], info.metadata["method"]) == (
            "SCOPE_MISSING",
            rule.scope.value,
            path,
        )
        assert rule.scope.value in (error.details() or "")


def test_a_method_without_an_access_rule_or_scope_is_caught() -> None:
    file = descriptor_pb2.FileDescriptorProto(
        name="test/open.proto", package="test.v1", syntax="proto3", dependency=["sendtime/auth/v1/auth.proto"]
    )
    file.message_type.add(name="Nothing")
    service = file.service.add(name="OpenService")
    service.method.add(name="Open", input_type=".test.v1.Nothing", output_type=".test.v1.Nothing")
    unscoped = service.method.add(
        name="Unscoped", input_type=".test.v1.Nothing", output_type=".test.v1.Nothing"
    )
    unscoped.options.Extensions[auth_pb2.access].audited = True
    descriptor_pool.Default().Add(file)
    open_service = descriptor_pool.Default().FindServiceByName("test.v1.OpenService")
    with pytest.raises(MissingAccessRule, match="declares no"):
        rule_of(open_service.methods_by_name["Open"])
    with pytest.raises(MissingAccessRule, match="declares no scope"):
        rule_of(open_service.methods_by_name["Unscoped"])
    with pytest.raises(MissingAccessRule):
        access_rules(["test.v1.OpenService"])


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("Bearer " + KEY_PREFIX + "x" * 10, "API_KEY_MALFORMED"),
        ("Basic dXNlcjpwYXNz", "API_KEY_MALFORMED"),
        ("Bearer " + new_key().key, "API_KEY_UNKNOWN"),
    ],
    ids=["too-short", "basic-auth", "well-formed-but-unknown"],  # the same in every xdist worker
)
async def test_a_bad_key_is_unauthenticated_with_its_reason(
    ingest_app: IngestApp, header: str, reason: str
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ingest_app.grpc.port}") as calls:
        stub = ingest_pb2_grpc.IngestServiceStub(calls)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetIngestStats(
                ingest_pb2.GetIngestStatsRequest(), metadata=(("authorization", header),)
            )
    assert caught.value.code() == UNAUTHENTICATED
    assert error_info(caught.value).reason == reason
    assert KEY_PREFIX + "x" not in (caught.value.details() or "")  # the key is not echoed


async def test_health_needs_no_credentials_and_reflection_does(
    profile_app: ProfileApp, admin_key: str
) -> None:
    target = f"127.0.0.1:{profile_app.grpc.port}"
    async with grpc.aio.insecure_channel(target) as calls:
        checked = await health_pb2_grpc.HealthStub(calls).Check(health_pb2.HealthCheckRequest())
        assert checked.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await list_services(calls)
        assert caught.value.code() == UNAUTHENTICATED
    async with channel(target, admin_key) as calls:
        assert "sendtime.auth.v1.KeyService" in await list_services(calls)


async def list_services(calls: grpc.aio.Channel) -> set[str]:
    call = reflection_pb2_grpc.ServerReflectionStub(calls).ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    await call.done_writing()
    return {s.name async for r in call for s in r.list_services_response.service}


@pytest.fixture
async def keys(profile_app: ProfileApp, admin_key: str) -> AsyncIterator[auth_pb2_grpc.KeyServiceAsyncStub]:
    async with channel(f"127.0.0.1:{profile_app.grpc.port}", admin_key) as calls:
        yield auth_pb2_grpc.KeyServiceStub(calls)


async def reads_work(ingest_app: IngestApp, render_app: RenderApp, key: str) -> dict[str, str]:
    """Each service's answer to a read with ``key``: "OK" or the ErrorInfo reason."""
    answers: dict[str, str] = {}
    async with (
        channel(f"127.0.0.1:{ingest_app.grpc.port}", key) as ingest_calls,
        channel(f"127.0.0.1:{render_app.grpc.port}", key) as render_calls,
    ):
        calls: list[tuple[str, Awaitable[Any]]] = [
            (
                "ingest",
                ingest_pb2_grpc.IngestServiceStub(ingest_calls).GetIngestStats(
                    ingest_pb2.GetIngestStatsRequest()
                ),
            ),
            (
                "render",
                render_pb2_grpc.TemplateServiceStub(render_calls).ListTemplates(
                    render_pb2.ListTemplatesRequest(page_size=1)
                ),
            ),
        ]
        for name, call in calls:
            try:
                await call
                answers[name] = "OK"
            except grpc.aio.AioRpcError as exc:
                answers[name] = error_info(exc).reason
    return answers


async def test_a_key_made_over_the_api_works_at_once_and_a_revoked_one_stops_everywhere_within_5_s(
    keys: auth_pb2_grpc.KeyServiceAsyncStub, ingest_app: IngestApp, render_app: RenderApp
) -> None:
    made = await keys.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(
            display_name="dashboard", scopes=[auth_pb2.SCOPE_STATS_READ, auth_pb2.SCOPE_TEMPLATES_READ]
        )
    )
    assert made.key.startswith(KEY_PREFIX) and made.api_key.state == auth_pb2.API_KEY_STATE_ACTIVE
    assert made.api_key.creator.startswith("apiKeys/")
    assert await reads_work(ingest_app, render_app, made.key) == {"ingest": "OK", "render": "OK"}

    revoked = await keys.RevokeApiKey(auth_pb2.RevokeApiKeyRequest(name=made.api_key.name))
    assert revoked.api_key.state == auth_pb2.API_KEY_STATE_REVOKED
    started = time.monotonic()
    while (answers := await reads_work(ingest_app, render_app, made.key)) != {
        "ingest": "API_KEY_REVOKED",
        "render": "API_KEY_REVOKED",
    }:
        assert time.monotonic() - started < 5, answers
        await asyncio.sleep(0.05)


async def until_expired(ingest_app: IngestApp, render_app: RenderApp, key: str, *services: str) -> None:
    """Read with ``key`` until each of ``services`` answers API_KEY_EXPIRED, and only OK before."""

    async def expired() -> bool:
        read = await reads_work(ingest_app, render_app, key)
        answers = {name: read[name] for name in services}
        assert set(answers.values()) <= {"OK", "API_KEY_EXPIRED"}, answers
        if set(answers.values()) != {"API_KEY_EXPIRED"}:
            await asyncio.sleep(0.25)  # a few reads a second: well within the key's rates
            return False
        return True

    await eventually(expired, timeout_s=15)


async def test_an_expired_key_stops_working_without_a_reload(
    keys: auth_pb2_grpc.KeyServiceAsyncStub, ingest_app: IngestApp, render_app: RenderApp
) -> None:
    # Long enough for the reads below to come first on a loaded machine (each service looks the
    # new key up on a miss); nothing reloads the keys when it passes.
    expires = timestamp_pb2.Timestamp()
    expires.FromDatetime(datetime.now(UTC) + timedelta(seconds=5))
    made = await keys.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(
            display_name="short-lived",
            scopes=[auth_pb2.SCOPE_STATS_READ, auth_pb2.SCOPE_TEMPLATES_READ],
            expire_time=expires,
        )
    )
    assert await reads_work(ingest_app, render_app, made.key) == {"ingest": "OK", "render": "OK"}

    await until_expired(ingest_app, render_app, made.key, "ingest", "render")


async def test_rotation_with_a_grace_period_keeps_both_keys_working_until_it_ends(
    keys: auth_pb2_grpc.KeyServiceAsyncStub, ingest_app: IngestApp, render_app: RenderApp
) -> None:
    made = await keys.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(display_name="tracker", scopes=[auth_pb2.SCOPE_STATS_READ])
    )
    # A grace long enough for the reads below to come first on a loaded machine.
    rotated = await keys.RotateApiKey(
        auth_pb2.RotateApiKeyRequest(
            name=made.api_key.name, old_key_grace_period=duration_pb2.Duration(seconds=5)
        )
    )
    assert rotated.api_key.display_name == "tracker" and list(rotated.api_key.scopes) == [
        auth_pb2.SCOPE_STATS_READ
    ]
    assert rotated.api_key.rotated_from == made.api_key.name and rotated.key != made.key
    assert rotated.replaced_api_key.state == auth_pb2.API_KEY_STATE_ACTIVE
    assert rotated.replaced_api_key.HasField("expire_time")
    for key in (made.key, rotated.key):
        assert (await reads_work(ingest_app, render_app, key))["ingest"] == "OK"

    await until_expired(ingest_app, render_app, made.key, "ingest")  # its scope reads only stats
    assert (await reads_work(ingest_app, render_app, rotated.key))["ingest"] == "OK"

    at_once = await keys.RotateApiKey(auth_pb2.RotateApiKeyRequest(name=rotated.api_key.name))
    assert at_once.replaced_api_key.state == auth_pb2.API_KEY_STATE_REVOKED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await keys.RotateApiKey(auth_pb2.RotateApiKeyRequest(name=rotated.api_key.name))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value).reason == "API_KEY_NOT_ACTIVE"


async def test_key_requests_are_checked_field_by_field(keys: auth_pb2_grpc.KeyServiceAsyncStub) -> None:
    past = timestamp_pb2.Timestamp()
    past.FromDatetime(datetime.now(UTC) - timedelta(minutes=1))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await keys.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(
                display_name=" ", scopes=[auth_pb2.SCOPE_UNSPECIFIED], expire_time=past
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = status_of(caught.value)
    assert status is not None
    assert {v.field for v in field_violations(status)} == {"display_name", "scopes[0]", "expire_time"}
    for bad in ("keys/abc", "apiKeys/short", ""):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await keys.GetApiKey(auth_pb2.GetApiKeyRequest(name=bad))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await keys.RevokeApiKey(auth_pb2.RevokeApiKeyRequest(name=f"apiKeys/{new_key().key_id}"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_keys_are_listed_newest_first_a_page_at_a_time_and_last_use_is_recorded(
    keys: auth_pb2_grpc.KeyServiceAsyncStub, ingest_app: IngestApp, render_app: RenderApp
) -> None:
    made = [
        await keys.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(display_name=f"page {i}", scopes=[auth_pb2.SCOPE_STATS_READ])
        )
        for i in range(3)
    ]
    first = await keys.ListApiKeys(auth_pb2.ListApiKeysRequest(page_size=2))
    assert [k.name for k in first.api_keys] == [made[2].api_key.name, made[1].api_key.name]
    second = await keys.ListApiKeys(
        auth_pb2.ListApiKeysRequest(page_size=2, page_token=first.next_page_token)
    )
    assert second.api_keys[0].name == made[0].api_key.name
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await keys.ListApiKeys(
            auth_pb2.ListApiKeysRequest(page_size=2, page_token=first.next_page_token, show_inactive=True)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    await reads_work(ingest_app, render_app, made[0].key)
    await ingest_app.auth.keyring.flush_uses()
    used = await keys.GetApiKey(auth_pb2.GetApiKeyRequest(name=made[0].api_key.name))
    assert used.api_key.HasField("last_use_time") and not (
        await keys.GetApiKey(auth_pb2.GetApiKeyRequest(name=made[1].api_key.name))
    ).api_key.HasField("last_use_time")
