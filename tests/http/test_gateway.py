"""The HTTP/JSON face (issue 16), end to end on the in-process services: an event posted over
HTTP shows up in the profile fetched over HTTP; the same keys, scopes and rate limits as gRPC;
errors as google.rpc.Status JSON under the standard HTTP status; ETag, Cache-Control and 304;
curl, as an engineer would type it."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from google.protobuf import duration_pb2, json_format, struct_pb2
from multidict import CIMultiDictProxy

from ingest.server import IngestApp
from profile_service.server import ProfileApp
from render.server import RenderApp
from sendtime.auth.v1 import auth_pb2, auth_pb2_grpc
from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime.render.v1 import render_pb2, render_pb2_grpc
from sendtime_common.auth.api_keys import Scope
from sendtime_common.grpc_server import OPENAPI_DOCUMENT
from tests.conftest import channel, eventually
from tests.factories import event, identify
from tests.keys import issue_key


def base_url(app: IngestApp | ProfileApp | RenderApp) -> str:
    assert app.grpc.http is not None
    return f"http://127.0.0.1:{app.grpc.http.port}"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def send_over_http(
    http: aiohttp.ClientSession, ingest_app: IngestApp, key: str, *events: ingest_pb2.Event
) -> dict[str, Any]:
    body = {"events": [json_format.MessageToDict(e) for e in events]}
    async with http.post(f"{base_url(ingest_app)}/v1/events:send", json=body, headers=bearer(key)) as answer:
        assert answer.status == 200, await answer.text()
        result: dict[str, Any] = await answer.json()
        return result


async def profile_named(
    http: aiohttp.ClientSession, profile_app: ProfileApp, key: str, name: str, query: str = ""
) -> tuple[int, dict[str, Any], CIMultiDictProxy[str]]:
    async with http.get(f"{base_url(profile_app)}/v1/{name}{query}", headers=bearer(key)) as answer:
        return answer.status, await answer.json(), answer.headers


async def test_an_event_posted_over_http_shows_in_the_profile_fetched_over_http(
    http: aiohttp.ClientSession, ingest_app: IngestApp, profile_app: ProfileApp, admin_key: str, unique: str
) -> None:
    email = f"ada.{unique}@example.com"
    sent = await send_over_http(
        http, ingest_app, admin_key, event(email=email, identify=identify(first_name="Ada", plan="pro"))
    )
    assert [r["outcome"] for r in sent["results"]] == ["EVENT_OUTCOME_ACCEPTED"]

    async def fetched() -> dict[str, Any] | None:
        status, body, _ = await profile_named(http, profile_app, admin_key, f"profiles/email:{email}")
        return body if status == 200 else None

    body = await eventually(fetched)
    profile = body["profile"]
    assert profile["traits"] == {"first_name": "Ada", "plan": "pro"}
    assert profile["name"] == f"profiles/{profile['customerId']}"  # canonical JSON: camelCase
    assert isinstance(profile["version"], str)  # int64 as a string

    # The canonical name works too, and the read mask is a query parameter.
    status, by_id, _ = await profile_named(http, profile_app, admin_key, profile["name"], "?readMask=traits")
    assert status == 200
    assert set(by_id["profile"]) == {"name", "customerId", "version", "traits"}
    # An alias is matched as the identifier is (trimmed, lower-cased for an email).
    status, upper, _ = await profile_named(http, profile_app, admin_key, f"profiles/email:{email.upper()}")
    assert status == 200 and upper["profile"]["customerId"] == profile["customerId"]


async def test_errors_are_status_json_under_the_standard_http_status(
    http: aiohttp.ClientSession, profile_app: ProfileApp, admin_key: str, database_url: str
) -> None:
    url = base_url(profile_app)
    async with http.get(f"{url}/v1/profiles/email:nobody@example.com") as answer:
        assert answer.status == 401
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
        body = await answer.json()
        assert body["code"] == 16 and body["details"][0]["reason"] == "CREDENTIALS_MISSING"
        assert body["details"][0]["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"

    nobody = f"{url}/v1/profiles/email:nobody@example.com"
    async with http.get(nobody, headers=bearer("sendtime_bad")) as answer:
        assert answer.status == 401

    renderer = await issue_key(database_url, [Scope.RENDER], display_name="http: render only")
    async with http.get(f"{url}/v1/profiles/email:nobody@example.com", headers=bearer(renderer)) as answer:
        assert answer.status == 403
        body = await answer.json()
        assert body["code"] == 7 and body["details"][0]["metadata"]["scope"] == "profiles.read"

    status, body, _ = await profile_named(http, profile_app, admin_key, "profiles/email:nobody@example.com")
    assert status == 404 and body["code"] == 5
    assert body["details"][0]["reason"] == "PROFILE_NOT_FOUND"

    status, body, _ = await profile_named(http, profile_app, admin_key, "profiles/shoe_size:44")
    assert status == 400
    assert body["details"][0]["fieldViolations"][0]["field"] == "name"

    status, body, _ = await profile_named(
        http, profile_app, admin_key, "profiles/email:a@example.com", "?readMask=password&colour=red"
    )
    assert status == 400
    assert [v["field"] for v in body["details"][0]["fieldViolations"]] == ["colour"]

    async with http.get(f"{url}/v1/nothing/here", headers=bearer(admin_key)) as answer:
        assert answer.status == 404 and (await answer.json())["details"][0]["reason"] == "ROUTE_NOT_FOUND"
    async with http.delete(f"{url}/v1/profiles/email:a@example.com", headers=bearer(admin_key)) as answer:
        assert answer.status == 405 and answer.headers["Allow"] == "GET"

    as_json = {**bearer(admin_key), "Content-Type": "application/json"}
    async with http.post(f"{url}/v1/profiles:batchGet", data=b"{", headers=as_json) as answer:
        assert answer.status == 400 and (await answer.json())["details"][0]["reason"] == "JSON_MALFORMED"
    async with http.post(f"{url}/v1/profiles:batchGet", data=b"{}", headers=bearer(admin_key)) as answer:
        assert answer.status == 415


async def test_a_dead_letter_holding_values_json_cannot_carry_is_listed_without_them(
    http: aiohttp.ClientSession, ingest_app: IngestApp, admin_key: str, unique: str
) -> None:
    """gRPC takes events JSON cannot express (a timestamp out of range, a NaN trait); they are
    rejected and kept as sent. Over HTTP the listing shows each without those values, instead
    of failing with 500 for every page that holds one (schemathesis found it)."""
    bad = event(event_id=f"bad-{unique}", user_id=f"u-{unique}", identify=identify(plan="pro"))
    bad.sent_at.seconds = -(10**15)
    bad.identify.traits["score"] = math.nan
    async with channel(f"127.0.0.1:{ingest_app.grpc.port}", admin_key) as opened:
        answer = await ingest_pb2_grpc.IngestServiceStub(opened).SendEvents(
            ingest_pb2.SendEventsRequest(events=[bad])
        )
    assert [r.outcome for r in answer.results] == [ingest_pb2.EVENT_OUTCOME_REJECTED]

    async with http.get(
        f"{base_url(ingest_app)}/v1/rejectedEvents?pageSize=1000", headers=bearer(admin_key)
    ) as listed:
        assert listed.status == 200, await listed.text()
        body = await listed.json()
    (shown,) = [r for r in body["rejectedEvents"] if r["event"]["eventId"] == bad.event_id]
    assert "sentAt" not in shown["event"] and shown["event"]["occurredAt"]
    assert shown["event"]["identify"]["traits"] == {"plan": "pro", "score": None}
    assert {v["field"] for v in shown["status"]["details"][0]["fieldViolations"]} >= {
        "sent_at",
        "identify.traits.score",
    }


async def test_a_profile_answer_carries_an_etag_and_a_repeat_is_answered_304_until_it_changes(
    http: aiohttp.ClientSession, ingest_app: IngestApp, profile_app: ProfileApp, admin_key: str, unique: str
) -> None:
    user_id = f"etag-{unique}"
    await send_over_http(http, ingest_app, admin_key, event(user_id=user_id, identify=identify(plan="free")))
    url = f"{base_url(profile_app)}/v1/profiles/user_id:{user_id}"

    async def first() -> CIMultiDictProxy[str] | None:
        async with http.get(url, headers=bearer(admin_key)) as answer:
            return answer.headers if answer.status == 200 else None

    headers = await eventually(first)
    etag = headers["ETag"]
    assert headers["Cache-Control"] == "private, max-age=0"
    async with http.get(url, headers={**bearer(admin_key), "If-None-Match": etag}) as answer:
        assert answer.status == 304 and answer.headers["ETag"] == etag and not await answer.read()

    await send_over_http(http, ingest_app, admin_key, event(user_id=user_id, identify=identify(plan="pro")))

    async def changed() -> dict[str, Any] | None:
        async with http.get(url, headers={**bearer(admin_key), "If-None-Match": etag}) as answer:
            return await answer.json() if answer.status == 200 else None

    body = await eventually(changed)
    assert body["profile"]["traits"]["plan"] == "pro"


async def test_a_stored_template_renders_over_get_and_post_with_its_data_age_as_max_age(
    http: aiohttp.ClientSession,
    ingest_app: IngestApp,
    render_app: RenderApp,
    template_stub: render_pb2_grpc.TemplateServiceAsyncStub,
    admin_key: str,
    unique: str,
) -> None:
    email = f"grace.{unique}@example.com"
    grace = event(email=email, identify=identify(first_name="Grace"))
    await send_over_http(http, ingest_app, admin_key, grace)
    fallback = struct_pb2.Struct()
    fallback.update({"profile": {"traits": {"first_name": "there"}}})
    await template_stub.CreateTemplate(
        render_pb2.CreateTemplateRequest(
            template_id=f"welcome-{unique}",
            content=render_pb2.Template(
                subject="Hi {{ profile.traits.first_name }}",
                html="<p>{{ vars.offer | default: 'Welcome' }}</p>",
                fallback=fallback,
                max_data_age=duration_pb2.Duration(seconds=60),
            ),
            publish=True,
        )
    )
    url = f"{base_url(render_app)}/v1/templates/welcome-{unique}:render"

    async def rendered() -> tuple[dict[str, Any], CIMultiDictProxy[str]] | None:
        query = {"profile": f"profiles/email:{email}"}
        async with http.get(url, params=query, headers=bearer(admin_key)) as answer:
            assert answer.status == 200, await answer.text()
            body = await answer.json()
            return (body, answer.headers) if body.get("profileSource") == "PROFILE_SOURCE_LIVE" else None

    body, headers = await eventually(rendered)
    assert body["subject"] == "Hi Grace" and body["status"] == "RENDER_STATUS_RENDERED"
    assert body["templateVersion"] == "1" and "dataAge" in body
    assert headers["Cache-Control"] == "private, max-age=60"
    repeat = {**bearer(admin_key), "If-None-Match": headers["ETag"]}
    async with http.get(url, params={"profile": f"profiles/email:{email}"}, headers=repeat) as answer:
        assert answer.status == 304  # the data age moved on; the render did not

    posted = {"profile": f"profiles/email:{email}", "variables": {"offer": "10% off"}}
    async with http.post(url, json=posted, headers=bearer(admin_key)) as answer:
        assert answer.status == 200
        assert (await answer.json())["html"] == "<p>10% off</p>"

    unknown = {"profile": "profiles/email:nobody@example.com"}
    async with http.get(url, params=unknown, headers=bearer(admin_key)) as answer:
        body = await answer.json()
        # An unknown customer renders from the fallback values, not cacheable.
        assert answer.status == 200 and body["subject"] == "Hi there"
        assert body["fallbackReason"] == "FALLBACK_REASON_PROFILE_NOT_FOUND"
        assert answer.headers["Cache-Control"] == "private, max-age=0"


async def test_over_its_rate_an_http_caller_gets_429_with_retry_after(
    http: aiohttp.ClientSession, profile_app: ProfileApp, admin_key: str
) -> None:
    async with channel(f"127.0.0.1:{profile_app.grpc.port}", admin_key) as opened:
        made = await auth_pb2_grpc.KeyServiceStub(opened).CreateApiKey(
            auth_pb2.CreateApiKeyRequest(
                display_name="http: slow reader",
                scopes=[auth_pb2.SCOPE_PROFILES_READ],
                rate_limits=[
                    auth_pb2.RateLimit(scope=auth_pb2.SCOPE_PROFILES_READ, calls_per_second=0.01, burst=2)
                ],
            )
        )
    # One call in 100 s after the burst of 2: the third call is refused however slowly the first two
    # ran (at 1/s, two calls taking over a second between them let the third one through).
    statuses = []
    for _ in range(3):
        async with http.get(
            f"{base_url(profile_app)}/v1/profiles/user_id:nobody", headers=bearer(made.key)
        ) as answer:
            statuses.append(answer.status)
            last_headers, last_body = answer.headers, await answer.json()
    assert statuses == [404, 404, 429]
    assert int(last_headers["Retry-After"]) >= 1
    assert last_body["details"][0]["reason"] == "RATE_LIMITED"


async def test_curl_fetches_a_profile_as_the_readme_shows(
    ingest_app: IngestApp, profile_app: ProfileApp, admin_key: str, unique: str, http: aiohttp.ClientSession
) -> None:
    email = f"curl.{unique}@example.com"
    curl = event(email=email, identify=identify(first_name="Curl"))
    await send_over_http(http, ingest_app, admin_key, curl)

    async def curled() -> dict[str, Any] | None:
        process = await asyncio.create_subprocess_exec(
            "curl",
            "-sS",
            "--fail-with-body",
            "-H",
            f"Authorization: Bearer {admin_key}",
            f"{base_url(profile_app)}/v1/profiles/email:{email}?readMask=traits",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, _ = await process.communicate()
        return json.loads(out) if process.returncode == 0 else None

    body = await eventually(curled)
    assert body["profile"]["traits"] == {"first_name": "Curl"}


async def test_every_http_port_serves_the_committed_openapi_document_without_a_key(
    http: aiohttp.ClientSession, ingest_app: IngestApp, profile_app: ProfileApp, render_app: RenderApp
) -> None:
    committed = json.loads(OPENAPI_DOCUMENT.read_text())
    for app in (ingest_app, profile_app, render_app):
        async with http.get(f"{base_url(app)}/openapi.json") as answer:
            assert answer.status == 200
            assert answer.content_type == "application/json"
            assert await answer.json() == committed
            etag = answer.headers["ETag"]
        async with http.get(f"{base_url(app)}/openapi.json", headers={"If-None-Match": etag}) as again:
            assert again.status == 304
        async with http.get(f"{base_url(app)}/healthz") as health:
            assert (health.status, await health.json()) == (200, {"status": "SERVING"})
