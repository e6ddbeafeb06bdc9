"""The webhook server over real HTTP, feeding the real ingestor on real NATS (and, through the
event log, the profile service); a stub sink only where the sink itself is the subject."""

from __future__ import annotations

import base64
import json
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ingest.server import IngestApp, create_app
from ingest.settings import Settings
from ingest.webhook_mapping import shopify_hmac
from ingest.webhooks import EventSink, WebhookServer, WebhookSettings
from sendtime.ingest.v1 import ingest_pb2
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime_common.config import ConfigError
from sendtime_common.errors import retry_status
from tests.conftest import LOCAL_SERVER, local_env, wait_for_profile
from tests.ingest.test_webhook_mapping import order_payload

SECRET = "shpss_test_secret"
_PRIVATE_KEY = ec.generate_private_key(ec.SECP256R1())
PUBLIC_KEY_B64 = base64.b64encode(
    _PRIVATE_KEY.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
).decode()


def settings(**overrides: Any) -> WebhookSettings:
    values: dict[str, Any] = {
        "address": "127.0.0.1:0",
        "shopify_secret": SECRET,
        "sendgrid_public_key": PUBLIC_KEY_B64,
        "max_body_bytes": 64 * 1024,
    }
    return WebhookSettings(**(values | overrides))


class RecordingSink:
    """Records what it is given; answers every event with ``outcome``."""

    def __init__(
        self, outcome: ingest_pb2.EventOutcome.ValueType = ingest_pb2.EVENT_OUTCOME_ACCEPTED
    ) -> None:
        self.outcome = outcome
        self.batches: list[list[ingest_pb2.Event]] = []

    async def ingest_batch(self, events: list[ingest_pb2.Event]) -> list[ingest_pb2.EventResult]:
        self.batches.append(events)
        results = []
        for e in events:
            result = ingest_pb2.EventResult(event_id=e.event_id, outcome=self.outcome)
            if self.outcome == ingest_pb2.EVENT_OUTCOME_RETRY:
                result.status.CopyFrom(
                    retry_status(
                        grpc.StatusCode.RESOURCE_EXHAUSTED, "the event log is full", "EVENT_LOG_FULL", 30.0
                    )
                )
            results.append(result)
        return results


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def started(sink: EventSink, **overrides: Any) -> WebhookServer:
    server = WebhookServer(sink, settings(**overrides), tls=LOCAL_SERVER["tls"])
    await server.start()
    return server


@pytest.fixture
async def server(ingest_app: IngestApp) -> AsyncIterator[WebhookServer]:
    webhooks = await started(ingest_app.ingestor)
    yield webhooks
    await webhooks.stop()


def url(server: WebhookServer, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


def shopify_headers(body: bytes, topic: str = "orders/create", secret: str = SECRET) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Shopify-Topic": topic,
        "X-Shopify-Hmac-Sha256": shopify_hmac(secret, body),
        "X-Shopify-Webhook-Id": f"wh-{random.getrandbits(64):x}",
        "X-Shopify-Shop-Domain": "sendtime-test.myshopify.com",
        "X-Shopify-API-Version": "2026-10",
    }


def sendgrid_headers(body: bytes, at: datetime | None = None) -> dict[str, str]:
    timestamp = str(int((at or datetime.now(UTC)).timestamp()))
    signature = _PRIVATE_KEY.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {
        "Content-Type": "application/json",
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
    }


def a_recent_order(unique: str) -> tuple[dict[str, Any], str]:
    order_id = random.getrandbits(52)
    email = f"buyer-{unique}@example.com"
    order = order_payload(order_id=order_id, email=email)
    at = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    order.update(created_at=at, processed_at=at)
    order["customer"]["id"] = random.getrandbits(52)
    return order, email


async def post(
    http: aiohttp.ClientSession, target: str, body: bytes, headers: dict[str, str]
) -> tuple[int, Any]:
    async with http.post(target, data=body, headers=headers) as response:
        return response.status, await response.json()


def by_email(email: str) -> profile_pb2.Identifier:
    return profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_EMAIL, value=email)


async def test_a_shopify_order_reaches_the_profile_and_a_redelivery_is_a_duplicate(
    server: WebhookServer,
    http: aiohttp.ClientSession,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    unique: str,
) -> None:
    order, email = a_recent_order(unique)
    body = json.dumps(order).encode()

    status, counts = await post(http, url(server, "/webhooks/shopify"), body, shopify_headers(body))
    assert (status, counts) == (200, {"accepted": 1, "duplicate": 0, "rejected": 0, "ignored": 0})
    profile = await wait_for_profile(profile_stub, by_email(email), lambda p: p.orders.count >= 1)
    assert profile.orders.count == 1
    assert profile.orders.recent[0].order_id == str(order["id"])

    # Shopify redelivers, and also reports the same order as paid: the same fact, once.
    again = await post(http, url(server, "/webhooks/shopify"), body, shopify_headers(body))
    paid = await post(
        http, url(server, "/webhooks/shopify"), body, shopify_headers(body, topic="orders/paid")
    )
    assert again == paid == (200, {"accepted": 0, "duplicate": 1, "rejected": 0, "ignored": 0})


async def test_a_bad_shopify_signature_is_401_and_nothing_is_ingested(
    server: WebhookServer,
    http: aiohttp.ClientSession,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    unique: str,
) -> None:
    order, email = a_recent_order(unique)
    body = json.dumps(order).encode()

    forged = await post(http, url(server, "/webhooks/shopify"), body, shopify_headers(body, secret="guess"))
    unsigned_headers = shopify_headers(body)
    del unsigned_headers["X-Shopify-Hmac-Sha256"]
    unsigned = await post(http, url(server, "/webhooks/shopify"), body, unsigned_headers)
    assert forged == (401, {"error": "invalid signature: signature does not match the body"})
    assert unsigned == (401, {"error": "invalid signature: missing X-Shopify-Hmac-Sha256 header"})

    # Had either been stored, this genuine delivery of the same order would be a duplicate.
    status, counts = await post(http, url(server, "/webhooks/shopify"), body, shopify_headers(body))
    assert (status, counts["accepted"], counts["duplicate"]) == (200, 1, 0)
    profile = await wait_for_profile(profile_stub, by_email(email), lambda p: p.orders.count >= 1)
    assert profile.orders.count == 1


async def test_an_invalid_shopify_event_is_answered_200_with_the_rejection_counted(
    server: WebhookServer, http: aiohttp.ClientSession, unique: str
) -> None:
    order, _ = a_recent_order(unique)
    order.update(email=None, contact_email=None, customer=None)  # about nobody: ingest rejects it
    body = json.dumps(order).encode()
    status, counts = await post(http, url(server, "/webhooks/shopify"), body, shopify_headers(body))
    assert (status, counts) == (200, {"accepted": 0, "duplicate": 0, "rejected": 1, "ignored": 0})


async def test_shopify_topics_sendtime_does_not_map_are_acknowledged_as_ignored(
    server: WebhookServer, http: aiohttp.ClientSession
) -> None:
    body = b'{"id": 9554194432293, "title": "T-Shirt"}'
    status, counts = await post(
        http, url(server, "/webhooks/shopify"), body, shopify_headers(body, "products/update")
    )
    assert (status, counts) == (200, {"accepted": 0, "duplicate": 0, "rejected": 0, "ignored": 1})


def sendgrid_batch(unique: str) -> list[dict[str, Any]]:
    now = int(datetime.now(UTC).timestamp()) - 60
    email = f"reader-{unique}@example.com"
    message_id = f"{unique}.filter0001.16648.5515E0B88.0"

    def sg(event: str, n: int, **fields: Any) -> dict[str, Any]:
        return {
            "email": email,
            "timestamp": now,
            "event": event,
            "sg_event_id": f"{event}-{unique}-{n}",
            "sg_message_id": message_id,
            "campaign_id": "welcome",
            **fields,
        }

    return [
        sg("processed", 0),
        sg("delivered", 1, ip="168.1.1.1", response="250 OK"),
        sg("open", 2, ip="192.0.2.7", useragent="Mozilla/5.0"),
        sg("click", 3, ip="192.0.2.7", useragent="Mozilla/5.0", url="https://shop.example.com/"),
        sg("bounce", 4, type="blocked", reason="421 try later"),
        sg("deferred", 5, response="400 try again later"),
        sg("spamreport", 6),
        sg("click", 7, url=""),  # a click without a URL: invalid, rejected on its own
    ]


async def test_a_signed_sendgrid_batch_is_ingested_and_counted(
    server: WebhookServer, http: aiohttp.ClientSession, unique: str
) -> None:
    body = json.dumps(sendgrid_batch(unique)).encode()
    status, counts = await post(http, url(server, "/webhooks/sendgrid"), body, sendgrid_headers(body))
    assert (status, counts) == (200, {"accepted": 5, "duplicate": 0, "rejected": 1, "ignored": 2})

    again = await post(http, url(server, "/webhooks/sendgrid"), body, sendgrid_headers(body))
    assert again[0] == 200
    assert (again[1]["accepted"], again[1]["duplicate"], again[1]["ignored"]) == (0, 5, 2)


async def test_tampered_stale_or_unsigned_sendgrid_batches_are_401_and_nothing_is_ingested(
    http: aiohttp.ClientSession, unique: str
) -> None:
    sink = RecordingSink()
    server = await started(sink, signature_max_age_s=60)
    try:
        target = url(server, "/webhooks/sendgrid")
        body = json.dumps(sendgrid_batch(unique)).encode()

        tampered = await post(http, target, body.replace(b"welcome", b"welcomf"), sendgrid_headers(body))
        stale = await post(
            http, target, body, sendgrid_headers(body, at=datetime.now(UTC) - timedelta(seconds=61))
        )
        unsigned = await post(http, target, body, {"Content-Type": "application/json"})

        assert tampered == (
            401,
            {"error": "invalid signature: signature does not match the timestamp and body"},
        )
        assert stale == (401, {"error": "invalid signature: timestamp is more than 60s from now"})
        assert unsigned[0] == 401
        assert sink.batches == []
    finally:
        await server.stop()


async def test_an_oversized_body_is_413_before_anything_else(http: aiohttp.ClientSession) -> None:
    sink = RecordingSink()
    server = await started(sink, max_body_bytes=1024)
    try:
        body = json.dumps([{"event": "open", "padding": "x" * 2000}]).encode()
        status, answer = await post(http, url(server, "/webhooks/sendgrid"), body, sendgrid_headers(body))
        assert (status, answer) == (413, {"error": "the body is larger than 1024 bytes"})

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length to go by
            for _ in range(4):
                yield b" " * 400

        async with http.post(
            url(server, "/webhooks/shopify"), data=chunked(), headers=shopify_headers(b"")
        ) as response:
            assert response.status == 413
        assert sink.batches == []
    finally:
        await server.stop()


async def test_a_malformed_signed_body_is_400_with_a_json_error(http: aiohttp.ClientSession) -> None:
    sink = RecordingSink()
    server = await started(sink)
    try:
        not_json = b'{"id": 1,'
        status, answer = await post(
            http, url(server, "/webhooks/shopify"), not_json, shopify_headers(not_json)
        )
        assert status == 400
        assert answer["error"].startswith("the body is not valid JSON")

        wrong_shape = b'{"event": "open"}'
        status, answer = await post(
            http, url(server, "/webhooks/sendgrid"), wrong_shape, sendgrid_headers(wrong_shape)
        )
        assert (status, answer) == (400, {"error": "body: must be a JSON array of events"})

        no_topic = shopify_headers(b"{}")
        del no_topic["X-Shopify-Topic"]
        status, answer = await post(http, url(server, "/webhooks/shopify"), b"{}", no_topic)
        assert (status, answer) == (400, {"error": "missing X-Shopify-Topic header"})
        assert sink.batches == []
    finally:
        await server.stop()


async def test_when_the_event_log_must_be_retried_the_answer_is_503_with_retry_after(
    http: aiohttp.ClientSession, unique: str
) -> None:
    sink = RecordingSink(ingest_pb2.EVENT_OUTCOME_RETRY)
    server = await started(sink)
    try:
        order, _ = a_recent_order(unique)
        body = json.dumps(order).encode()
        async with http.post(
            url(server, "/webhooks/shopify"), data=body, headers=shopify_headers(body)
        ) as response:
            assert response.status == 503
            assert response.headers["Retry-After"] == "30"  # the RetryInfo of the results
            answer = await response.json()
        assert answer["retry"] == 1
        assert [e.event_id for e in sink.batches[0]] == [f"shopify:order:{order['id']}:completed"]
    finally:
        await server.stop()


async def test_an_endpoint_without_its_secret_is_404_and_health_is_200(http: aiohttp.ClientSession) -> None:
    server = await started(RecordingSink(), shopify_secret="", sendgrid_public_key="")
    try:
        async with http.get(url(server, "/healthz")) as response:
            assert (response.status, await response.json()) == (200, {"status": "ok"})
        for path in ("/webhooks/shopify", "/webhooks/sendgrid"):
            async with http.post(url(server, path), data=b"{}") as response:
                assert response.status == 404
    finally:
        await server.stop()


def test_an_unusable_configuration_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="verification key"):
        WebhookServer(RecordingSink(), settings(sendgrid_public_key="bm90IGEga2V5"), tls=LOCAL_SERVER["tls"])
    with pytest.raises(ValueError, match="host:port"):
        WebhookServer(RecordingSink(), settings(address="localhost"), tls=LOCAL_SERVER["tls"])
    assert SECRET not in repr(settings())


async def test_the_ingest_service_runs_the_listener_when_a_secret_is_configured(
    nats_url: str, database_url: str, http: aiohttp.ClientSession, unique: str
) -> None:
    env = {
        **local_env("INGEST", DATABASE_URL=database_url, NATS_URL=nats_url),
        "INGEST_WEBHOOK_ADDRESS": "127.0.0.1:0",
        "SHOPIFY_WEBHOOK_SECRET": SECRET,
    }
    app = await create_app(Settings.from_env(env))
    await app.start()
    try:
        assert app.webhooks is not None
        order, _ = a_recent_order(unique)
        body = json.dumps(order).encode()
        target = f"http://127.0.0.1:{app.webhooks.port}/webhooks/shopify"
        assert await post(http, target, body, shopify_headers(body)) == (
            200,
            {"accepted": 1, "duplicate": 0, "rejected": 0, "ignored": 0},
        )
        async with http.post(
            f"http://127.0.0.1:{app.webhooks.port}/webhooks/sendgrid", data=b"[]"
        ) as response:
            assert response.status == 404  # no SendGrid key configured
    finally:
        await app.stop(grace_s=1)


async def test_without_secrets_no_listener_runs_and_a_bad_key_is_a_config_error(
    nats_url: str, database_url: str
) -> None:
    base = local_env("INGEST", DATABASE_URL=database_url, NATS_URL=nats_url)
    app = await create_app(Settings.from_env(base))
    assert app.webhooks is None
    await app.close()
    with pytest.raises(ConfigError, match="webhooks"):
        await create_app(Settings.from_env(base | {"SENDGRID_WEBHOOK_PUBLIC_KEY": "bm90IGEga2V5"}))
