"""Segment's HTTP Tracking API on ingest's HTTP port (issue 16), end to end on the in-process
services: the real segment-analytics-python and rudder-sdk-python clients, pointed at Sendtime
with an API key as their write key, send events that show up in the profile; curl sends a
track call as the README shows; the answer is per call; Segment's limits, its Basic auth and
SendEvents' scope and rate limit hold."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from rudderstack.analytics.client import Client as RudderClient
from segment.analytics.client import Client as SegmentClient
from segment.analytics.request import APIError

import devstack
from ingest.server import IngestApp, create_app
from ingest.settings import Settings as IngestSettings
from profile_service.server import ProfileApp
from sendtime.auth.v1 import auth_pb2, auth_pb2_grpc
from sendtime_common.auth.api_keys import Scope
from sendtime_common.event_log import JetStreamSettings
from tests.conftest import LOCAL_SERVER, channel, eventually
from tests.keys import issue_key


def base_url(app: IngestApp | ProfileApp) -> str:
    assert app.grpc.http is not None
    return f"http://127.0.0.1:{app.grpc.http.port}"


def basic(key: str) -> dict[str, str]:
    """Segment's Basic auth: the write key as the user name, no password."""
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture(scope="module")
async def write_key(database_url: str) -> str:
    """What a store would be given: a key that may only send events."""
    return await issue_key(database_url, [Scope.EVENTS_WRITE], "segment source")


async def profile_of(
    http: aiohttp.ClientSession, profile_app: ProfileApp, key: str, name: str
) -> dict[str, Any] | None:
    async with http.get(
        f"{base_url(profile_app)}/v1/profiles/{name}", headers={"Authorization": f"Bearer {key}"}
    ) as answer:
        if answer.status == 404:
            return None
        assert answer.status == 200, await answer.text()
        profile: dict[str, Any] = (await answer.json())["profile"]
        return profile


async def post(
    http: aiohttp.ClientSession, app: IngestApp, route: str, body: Any, headers: dict[str, str]
) -> tuple[int, dict[str, Any], Any]:
    async with http.post(f"{base_url(app)}/v1/{route}", json=body, headers=headers) as answer:
        return answer.status, await answer.json(), answer.headers


async def test_analytics_python_sends_a_store_s_calls_and_they_show_in_the_profile(
    http: aiohttp.ClientSession,
    ingest_app: IngestApp,
    profile_app: ProfileApp,
    write_key: str,
    admin_key: str,
    unique: str,
) -> None:
    user_id, email = f"seg-{unique}", f"seg.{unique}@example.com"
    errors: list[Exception] = []
    # As a store's backend runs it: a queue and a thread that posts batches to /v1/batch.
    client = SegmentClient(
        write_key, host=base_url(ingest_app), on_error=lambda e, _: errors.append(e), max_retries=0
    )
    # analytics-python stamps calls to the millisecond, so calls made in one millisecond tie;
    # these are a second apart, as a shopper's are.
    start = datetime.now(UTC) - timedelta(seconds=10)
    at = iter(start + timedelta(seconds=s) for s in range(6))
    try:
        client.identify(user_id, {"email": email, "firstName": "Ada", "plan": "pro"}, timestamp=next(at))
        client.track(
            user_id,
            "Product Viewed",
            {"product_id": "sku-1", "name": "Kettle", "price": 39.5, "currency": "EUR"},
            timestamp=next(at),
        )
        client.track(
            user_id,
            "Product Added",
            {"sku": "sku-2", "name": "Mug", "price": "12.00", "quantity": 2, "currency": "EUR"},
            timestamp=next(at),
        )
        client.track(
            user_id,
            "Order Completed",
            {
                "order_id": f"order-{unique}",
                "total": 63.5,
                "currency": "EUR",
                "products": [{"sku": "sku-1", "price": 39.5, "quantity": 1}, {"sku": "sku-2", "price": 12}],
            },
            timestamp=next(at),
        )
        client.track(
            user_id, "Product Added", {"sku": "sku-3", "price": 5, "currency": "EUR"}, timestamp=next(at)
        )
        client.page(
            user_id, "Shop", "Kettles", {"url": "https://shop.example.com/kettles"}, timestamp=next(at)
        )
        await asyncio.to_thread(client.flush)
    finally:
        await asyncio.to_thread(client.shutdown)
    assert errors == []

    async def ordered() -> dict[str, Any] | None:
        profile = await profile_of(http, profile_app, admin_key, f"user_id:{user_id}")
        if not profile or profile.get("orders", {}).get("count") != "1":
            return None
        # The product added after the order has merged too.
        return profile if [i["sku"] for i in profile.get("cart", {}).get("items", [])] == ["sku-3"] else None

    profile = await eventually(ordered)
    assert profile["traits"]["first_name"] == "Ada" and profile["traits"]["plan"] == "pro"
    assert {"kind": "IDENTIFIER_KIND_EMAIL", "value": email} in profile["identifiers"]
    assert profile["orders"]["lifetimeValue"] == [{"currencyCode": "EUR", "units": "63", "nanos": 500000000}]
    assert [view["sku"] for view in profile["recentlyViewed"]] == ["sku-1"]
    # The mug was bought with the order; the cart holds what was added after it.
    assert [item["sku"] for item in profile["cart"]["items"]] == ["sku-3"]
    # The same profile by the email the identify call carried.
    assert (await profile_of(http, profile_app, admin_key, f"email:{email}")) is not None


async def test_rudderstack_s_client_sends_gzipped_batches_that_show_in_the_profile(
    http: aiohttp.ClientSession,
    ingest_app: IngestApp,
    profile_app: ProfileApp,
    write_key: str,
    admin_key: str,
    unique: str,
) -> None:
    user_id = f"rudder-{unique}"
    errors: list[Exception] = []
    client = RudderClient(
        write_key, host=base_url(ingest_app), on_error=lambda e, _: errors.append(e), max_retries=0
    )
    assert client.gzip  # RudderStack's default: Content-Encoding gzip
    try:
        client.identify(user_id, {"lastName": "Lovelace", "tier": "gold"}, anonymous_id=f"anon-{unique}")
        client.track(user_id, "Video Played", {"title": "How to brew", "seconds": 42})
        await asyncio.to_thread(client.flush)
    finally:
        await asyncio.to_thread(client.join)
    assert errors == []

    async def identified() -> dict[str, Any] | None:
        profile = await profile_of(http, profile_app, admin_key, f"anonymous_id:anon-{unique}")
        return profile if profile and "last_name" in profile["traits"] else None

    profile = await eventually(identified)
    assert profile["traits"]["last_name"] == "Lovelace" and profile["traits"]["tier"] == "gold"
    assert {"kind": "IDENTIFIER_KIND_USER_ID", "value": user_id} in profile["identifiers"]


async def test_a_batch_is_answered_call_by_call_and_a_resend_is_a_duplicate(
    http: aiohttp.ClientSession, ingest_app: IngestApp, write_key: str, unique: str
) -> None:
    batch: dict[str, Any] = {
        "batch": [
            {"type": "track", "userId": f"u-{unique}", "event": "Signed Up", "messageId": f"m1-{unique}"},
            {
                "type": "track",
                "userId": f"u-{unique}",
                "event": "Order Completed",
                "messageId": f"m2-{unique}",
                "properties": {"order_id": "o-1", "total": "-1", "currency": "EUR"},
            },
            {"type": "identify", "userId": f"u-{unique}", "messageId": f"m3-{unique}"},
            {"type": "track", "event": "Orphan", "messageId": f"m4-{unique}"},
            {"type": "shout", "userId": f"u-{unique}", "messageId": f"m5-{unique}"},
        ],
        "sentAt": "2026-12-05T08:00:00Z",
    }
    for call in batch["batch"]:  # as every Segment library sends them
        call["timestamp"] = "2026-12-05T07:59:59.5Z"
    status, body, headers = await post(http, ingest_app, "batch", batch, basic(write_key))
    assert status == 200, body
    assert headers["Cache-Control"] == "no-store"
    items = body["items"]
    assert [item["outcome"] for item in items] == ["accepted", "rejected", "ignored", "rejected", "rejected"]
    assert [item["index"] for item in items] == [0, 1, 2, 3, 4]
    assert items[0]["event_id"].startswith("segment:") and items[0]["event_id"].endswith(f":m1-{unique}")
    assert items[1]["reason"] == "SEGMENT_CALL_MALFORMED"
    assert items[1]["violations"][0]["field"] == "batch[1].properties.total"
    assert items[3]["violations"][0]["field"] == "batch[3].userId"
    assert items[4]["violations"][0]["field"] == "batch[4].type"
    assert body["accepted"] == 1 and body["rejected"] == 3 and body["ignored"] == 1

    # analytics-python sends a retry with a new sentAt: the stored call is a duplicate.
    status, body, _ = await post(
        http, ingest_app, "batch", {**batch, "sentAt": "2026-12-05T08:00:01Z"}, basic(write_key)
    )
    assert status == 200 and body["items"][0]["outcome"] == "duplicate" and body["duplicate"] == 1


async def test_curl_sends_a_track_call_as_the_readme_shows(
    ingest_app: IngestApp, write_key: str, unique: str
) -> None:
    body = json.dumps(
        {"userId": f"curl-{unique}", "event": "Newsletter Joined", "properties": {"list": "weekly"}}
    )
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--fail-with-body", "-u", f"{write_key}:", "-H", "Content-Type: application/json",
        "-d", body, f"{base_url(ingest_app)}/v1/track",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode == 0, (out, err)
    answer = json.loads(out)
    assert answer["success"] is True
    assert answer["items"] == [
        {"index": 0, "type": "track", "outcome": "accepted", "event_id": answer["items"][0]["event_id"]}
    ]


@pytest.mark.parametrize("route", ["track", "identify", "page", "screen", "alias", "group", "batch"])
async def test_without_a_key_every_route_is_refused_with_a_basic_challenge(
    http: aiohttp.ClientSession, ingest_app: IngestApp, route: str
) -> None:
    status, body, headers = await post(http, ingest_app, route, {"userId": "u", "event": "E"}, {})
    assert status == 401
    assert headers["WWW-Authenticate"].startswith('Basic realm="sendtime"')
    # analytics-python raises APIError(status, body["code"], body["message"]): both are there.
    assert body["code"] == 16 and body["message"]


async def test_a_wrong_write_key_is_refused_and_analytics_python_reports_it(
    ingest_app: IngestApp, write_key: str
) -> None:
    wrong = write_key[:-4] + ("AAAA" if not write_key.endswith("AAAA") else "BBBB")
    client = SegmentClient(wrong, host=base_url(ingest_app), sync_mode=True, max_retries=0)
    with pytest.raises(APIError) as refused:
        await asyncio.to_thread(client.track, "u-1", "Signed Up")
    assert refused.value.status == 401


async def test_a_key_without_events_write_is_refused_naming_the_scope(
    http: aiohttp.ClientSession, ingest_app: IngestApp, database_url: str
) -> None:
    reader = await issue_key(database_url, [Scope.PROFILES_READ], "segment: reader")
    status, body, _ = await post(http, ingest_app, "track", {"userId": "u", "event": "E"}, basic(reader))
    assert status == 403
    assert body["details"][0]["metadata"]["scope"] == "events.write"


async def test_segment_s_size_limits_hold_before_the_body_is_read(
    http: aiohttp.ClientSession, ingest_app: IngestApp, write_key: str
) -> None:
    big = {"userId": "u", "event": "E", "properties": {"blob": "x" * (32 * 1024)}}
    status, body, _ = await post(http, ingest_app, "track", big, basic(write_key))
    assert status == 413 and body["details"][0]["reason"] == "BODY_TOO_LARGE"

    calls = [{"type": "track", "userId": "u", "event": "E", "properties": {"p": "x" * 1000}}] * 520
    status, body, _ = await post(http, ingest_app, "batch", {"batch": calls}, basic(write_key))
    assert status == 413

    # Gzip does not get past the limit: it holds on the inflated bytes.
    packed = gzip.compress(json.dumps({"batch": calls}).encode())
    assert len(packed) < 32 * 1024
    async with http.post(
        f"{base_url(ingest_app)}/v1/batch",
        data=packed,
        headers={**basic(write_key), "Content-Type": "application/json", "Content-Encoding": "gzip"},
    ) as answer:
        assert answer.status == 413


async def test_a_batch_of_more_calls_than_one_send_events_holds_is_ingested_in_chunks(
    http: aiohttp.ClientSession, ingest_app: IngestApp, write_key: str, unique: str
) -> None:
    calls = [
        {"type": "track", "userId": f"many-{unique}", "event": "Tick", "messageId": f"{unique}-{i}"}
        for i in range(2_500)
    ]
    status, body, _ = await post(http, ingest_app, "batch", {"batch": calls}, basic(write_key))
    assert status == 200, body
    assert body["accepted"] == 2_500
    assert [item["index"] for item in body["items"]] == list(range(2_500))


async def test_not_a_batch_is_a_400_naming_the_field(
    http: aiohttp.ClientSession, ingest_app: IngestApp, write_key: str
) -> None:
    status, body, _ = await post(http, ingest_app, "batch", {"batch": {"type": "track"}}, basic(write_key))
    assert status == 400
    assert body["details"][0]["fieldViolations"][0]["field"] == "batch"


async def test_segment_calls_count_against_the_key_s_events_write_rate(
    http: aiohttp.ClientSession, ingest_app: IngestApp, profile_app: ProfileApp, admin_key: str
) -> None:
    async with channel(f"127.0.0.1:{profile_app.grpc.port}", admin_key) as opened:
        made = await auth_pb2_grpc.KeyServiceStub(opened).CreateApiKey(
            auth_pb2.CreateApiKeyRequest(
                display_name="segment: slow source",
                scopes=[auth_pb2.SCOPE_EVENTS_WRITE],
                rate_limits=[
                    auth_pb2.RateLimit(scope=auth_pb2.SCOPE_EVENTS_WRITE, calls_per_second=0.01, burst=2)
                ],
            )
        )
    # One call in 100 s after the burst of 2: the third call is refused however slowly the first two
    # ran (at 1/s, two calls taking over a second between them let the third one through).
    statuses = []
    for i in range(3):
        status, body, headers = await post(
            http,
            ingest_app,
            "track",
            {"userId": "slow", "event": "E", "messageId": f"slow-{i}"},
            basic(made.key),
        )
        statuses.append(status)
    assert statuses == [200, 200, 429]
    assert int(headers["Retry-After"]) >= 1 and body["details"][0]["reason"] == "RATE_LIMITED"


async def test_while_the_event_log_is_down_a_batch_is_503_and_its_resend_stores_it_once(
    http: aiohttp.ClientSession, tmp_path: Path, database_url: str, unique: str
) -> None:
    """What analytics-python does on a 503: wait Retry-After, send the same batch again."""
    port = devstack.free_port()
    nats = devstack.start_nats(port, tmp_path / "nats")
    try:  # the NATS last started is stopped, however the test ends
        app = await create_app(
            IngestSettings(
                **LOCAL_SERVER,
                database_url=database_url,
                # Long enough for a fresh server's first ack (stream files created and fsynced) on a
                # loaded machine; short enough for each call while NATS is down to end well within 10 s.
                event_log=JetStreamSettings(url=f"nats://127.0.0.1:{port}", publish_timeout_s=2.0),
            )
        )
        await app.start()
        try:
            key = await issue_key(database_url, [Scope.EVENTS_WRITE])
            first = {"type": "track", "userId": unique, "event": "Signed Up", "messageId": f"{unique}-1"}
            first["timestamp"] = datetime.now(UTC).isoformat()
            status, body, _ = await post(http, app, "batch", {"batch": [first]}, basic(key))
            assert status == 200 and body["accepted"] == 1

            devstack.stop_process(nats)
            second = {**first, "messageId": f"{unique}-2"}
            batch = {"batch": [first, second]}
            status, body, headers = await asyncio.wait_for(
                post(http, app, "batch", batch, basic(key)), timeout=10
            )
            assert status == 503 and int(headers["Retry-After"]) >= 1
            assert body["code"] == 14 and body["retry"] >= 1
            assert [item["outcome"] for item in body["items"]][1] == "retry"

            nats = devstack.start_nats(port, tmp_path / "nats")  # the same store: what was acked is there

            async def resent() -> dict[str, Any] | None:
                status, body, _ = await post(http, app, "batch", batch, basic(key))
                return body if status == 200 else None

            body = await eventually(resent, timeout_s=20)
            # The second call is stored now: by this resend, or already by the NATS client, which
            # keeps what it could not send while disconnected and sends it on reconnecting.
            assert body["items"][0]["outcome"] == "duplicate"
            assert body["items"][1]["outcome"] in ("accepted", "duplicate")
            status, body, _ = await post(http, app, "batch", batch, basic(key))
            assert [item["outcome"] for item in body["items"]] == ["duplicate", "duplicate"]
        finally:
            await app.stop(grace_s=1)
    finally:
        devstack.stop_process(nats)
