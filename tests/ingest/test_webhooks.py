"""The webhook server over real HTTP, feeding the real ingestor on real NATS (and, through the
event log, the profile service); a stub sink only where the sink itself is the subject."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import random
import zlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import REGISTRY

from ingest import webhook_mapping
from ingest.server import IngestApp, create_app
from ingest.settings import Settings
from ingest.webhook_mapping import MappedItem, Provider, shopify_hmac
from ingest.webhooks import EventSink, Quarantine, WebhookServer, WebhookSettings
from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime_common import json_input
from sendtime_common.config import ConfigError
from sendtime_common.errors import retry_status
from sendtime_common.identifiers import IdentifierHasher, IdentifierKind
from tests.conftest import LOCAL_SERVER, eventually, local_env, wait_for_profile
from tests.ingest.test_webhook_mapping import customer_payload, order_payload

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


class RecordingQuarantine:
    """Records the items it is given; raises ``failure`` instead when one is set."""

    def __init__(self, failure: Exception | None = None) -> None:
        self.failure = failure
        self.items: list[tuple[Provider, str, MappedItem, str]] = []

    async def quarantine(
        self, provider: Provider, webhook_id: str, items: Sequence[tuple[MappedItem, str]]
    ) -> None:
        if self.failure is not None:
            raise self.failure
        self.items.extend((provider, webhook_id, item, error_id) for item, error_id in items)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # auto_decompress off: a test reads answers as sent.
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def started(sink: EventSink, quarantine: Quarantine | None = None, **overrides: Any) -> WebhookServer:
    server = WebhookServer(
        sink, settings(**overrides), tls=LOCAL_SERVER["tls"], quarantine=quarantine or RecordingQuarantine()
    )
    await server.start()
    return server


@pytest.fixture
async def server(ingest_app: IngestApp) -> AsyncIterator[WebhookServer]:
    webhooks = await started(ingest_app.ingestor, ingest_app.dead_letters)
    yield webhooks
    await webhooks.stop()


def counts(
    accepted: int = 0,
    duplicate: int = 0,
    rejected: int = 0,
    quarantined: int = 0,
    ignored: int = 0,
    conflict: int = 0,
) -> dict[str, int]:
    return {
        "accepted": accepted,
        "duplicate": duplicate,
        "rejected": rejected,
        "conflict": conflict,
        "quarantined": quarantined,
        "ignored": ignored,
    }


def without_items(answer: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in answer.items() if k != "items"}


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

    event_id = f"shopify:order:{order['id']}:completed"
    status, answer = await post(http, url(server, "/webhooks/shopify"), body, shopify_headers(body))
    assert (status, answer) == (
        200,
        {**counts(accepted=1), "items": [{"index": 0, "outcome": "accepted", "event_id": event_id}]},
    )
    profile = await wait_for_profile(profile_stub, by_email(email), lambda p: p.orders.count >= 1)
    assert profile.orders.count == 1
    assert profile.orders.recent[0].order_id == str(order["id"])

    # Shopify redelivers, and also reports the same order as paid: the same fact, once.
    again = await post(http, url(server, "/webhooks/shopify"), body, shopify_headers(body))
    paid = await post(
        http, url(server, "/webhooks/shopify"), body, shopify_headers(body, topic="orders/paid")
    )
    duplicate = {**counts(duplicate=1), "items": [{"index": 0, "outcome": "duplicate", "event_id": event_id}]}
    assert again == paid == (200, duplicate)


async def test_a_shopify_customer_update_reaches_the_profile_as_traits_and_consent(
    server: WebhookServer,
    http: aiohttp.ClientSession,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    unique: str,
) -> None:
    email = f"customer-{unique}@example.com"
    at = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    customer = customer_payload(id=random.getrandbits(52), email=email, updated_at=at)
    customer["email_marketing_consent"]["consent_updated_at"] = at
    body = json.dumps(customer).encode()
    headers = shopify_headers(body, topic="customers/update")
    status, answer = await post(http, url(server, "/webhooks/shopify"), body, headers)
    assert (status, answer["accepted"]) == (200, 3)  # traits, email consent, SMS consent

    def merged(p: profile_pb2.Profile) -> bool:
        return p.traits.fields["first_name"].string_value == "Bob" and len(p.consents) == 2

    profile = await wait_for_profile(profile_stub, by_email(email), merged)
    consents = {c.channel: c.subscribed for c in profile.consents}
    assert consents == {ingest_pb2.CHANNEL_EMAIL: True, ingest_pb2.CHANNEL_SMS: False}
    assert profile.traits.fields["city"].string_value == "Ottawa"


async def test_an_order_changed_under_the_id_of_its_first_delivery_is_a_conflict_kept_for_review(
    server: WebhookServer, http: aiohttp.ClientSession, ingest_app: IngestApp, unique: str
) -> None:
    order, _ = a_recent_order(unique)
    body = json.dumps(order).encode()
    assert (await post(http, url(server, "/webhooks/shopify"), body, shopify_headers(body)))[0] == 200
    order["total_price"] = "999.00"
    changed = json.dumps(order).encode()
    event_id = f"shopify:order:{order['id']}:completed"
    status, answer = await post(http, url(server, "/webhooks/shopify"), changed, shopify_headers(changed))
    assert (status, answer) == (  # 200: a retry could not change it, and would hold the rest back
        200,
        {
            **counts(conflict=1),
            "items": [
                {"index": 0, "outcome": "conflict", "event_id": event_id, "reason": "IDEMPOTENCY_CONFLICT"}
            ],
        },
    )
    kept = await dead_letter_of(ingest_app, event_id)
    assert kept.status.code == grpc.StatusCode.ALREADY_EXISTS.value[0]


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
    assert forged == (
        401,
        {
            "error": {
                "reason": "SIGNATURE_INVALID",
                "message": "invalid signature: signature does not match the body",
            }
        },
    )
    assert unsigned == (
        401,
        {
            "error": {
                "reason": "SIGNATURE_INVALID",
                "message": "invalid signature: missing X-Shopify-Hmac-Sha256 header",
            }
        },
    )

    # Had either been stored, this genuine delivery of the same order would be a duplicate.
    status, answer = await post(http, url(server, "/webhooks/shopify"), body, shopify_headers(body))
    assert (status, answer["accepted"], answer["duplicate"]) == (200, 1, 0)
    profile = await wait_for_profile(profile_stub, by_email(email), lambda p: p.orders.count >= 1)
    assert profile.orders.count == 1


async def test_an_invalid_shopify_event_is_answered_200_with_the_rejection_and_its_reasons(
    server: WebhookServer, http: aiohttp.ClientSession, unique: str
) -> None:
    order, _ = a_recent_order(unique)
    order.update(email=None, contact_email=None, customer=None)  # about nobody: ingest rejects it
    body = json.dumps(order).encode()
    status, answer = await post(http, url(server, "/webhooks/shopify"), body, shopify_headers(body))
    assert (status, without_items(answer)) == (200, counts(rejected=1))
    [item] = answer["items"]
    assert item == {
        "index": 0,
        "outcome": "rejected",
        "event_id": f"shopify:order:{order['id']}:completed",
        "reason": "EVENT_INVALID",
        "violations": [
            {
                "field": "customer",
                "description": "at least one of user_id, email, anonymous_id, crm_id, device_id is required",
            }
        ],
    }


async def dead_letter_of(app: IngestApp, event_id: str) -> ingest_pb2.RejectedEvent:
    async def find() -> ingest_pb2.RejectedEvent | None:
        page, _ = await app.dead_letters.list(page_size=1000, page_token="", state=0, source=0)
        return next((d for d in page if d.event.event_id == event_id), None)

    return await eventually(find)


async def test_a_shopify_topic_sendtime_does_not_map_is_quarantined_once_and_answered_200(
    ingest_app: IngestApp, server: WebhookServer, http: aiohttp.ClientSession, unique: str
) -> None:
    body = f'{{"id": {random.getrandbits(52)}, "title": "T-Shirt {unique}", "price": 19.90}}'.encode()
    headers = shopify_headers(body, "products/update")
    kept = {"source": "server", "kind": "webhook_item"}
    kept_before = REGISTRY.get_sample_value("sendtime_ingest_dead_letters_total", kept) or 0.0
    status, answer = await post(http, url(server, "/webhooks/shopify"), body, headers)
    assert REGISTRY.get_sample_value("sendtime_ingest_dead_letters_total", kept) == kept_before + 1
    assert (status, answer) == (
        200,
        {
            **counts(quarantined=1),
            "items": [
                {
                    "index": 0,
                    "outcome": "quarantined",
                    "type": "products/update",
                    "reason": "WEBHOOK_UNKNOWN_TYPE",
                    "message": "type 'products/update' is not one Sendtime maps",
                }
            ],
        },
    )

    event_id = webhook_mapping.quarantine_id(Provider.SHOPIFY, "products/update", json_input.parse_json(body))
    dead_letter = await dead_letter_of(ingest_app, event_id)
    assert dead_letter.state == ingest_pb2.REJECTED_EVENT_STATE_PENDING
    assert dead_letter.event.source == ingest_pb2.EVENT_SOURCE_SERVER
    item = dead_letter.webhook_item
    assert (item.provider, item.type, item.webhook_id, item.index) == (
        ingest_pb2.WEBHOOK_PROVIDER_SHOPIFY,
        "products/update",
        headers["X-Shopify-Webhook-Id"],
        0,
    )
    assert json_input.parse_json(item.json) == json_input.parse_json(body)  # 19.90 exactly, as sent
    assert b"19.90" in item.json
    assert dead_letter.status.code == 12  # UNIMPLEMENTED

    # Shopify redelivers it: answered the same, and still one dead letter.
    again = await post(http, url(server, "/webhooks/shopify"), body, headers)
    assert again == (status, answer)
    page, _ = await ingest_app.dead_letters.list(page_size=1000, page_token="", state=0, source=0)
    assert [d.event.event_id for d in page].count(event_id) == 1


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


async def test_a_signed_sendgrid_batch_is_ingested_and_answered_per_item(
    server: WebhookServer, http: aiohttp.ClientSession, unique: str
) -> None:
    body = json.dumps(sendgrid_batch(unique)).encode()
    status, answer = await post(http, url(server, "/webhooks/sendgrid"), body, sendgrid_headers(body))
    assert (status, without_items(answer)) == (200, counts(accepted=5, rejected=1, ignored=2))
    assert [(i["index"], i["outcome"]) for i in answer["items"]] == [
        (0, "ignored"),
        (1, "accepted"),
        (2, "accepted"),
        (3, "accepted"),
        (4, "accepted"),
        (5, "ignored"),
        (6, "accepted"),
        (7, "rejected"),
    ]
    assert answer["items"][7]["violations"] == [{"field": "email_clicked.url", "description": "required"}]
    assert answer["items"][1]["event_id"] == f"sendgrid:delivered-{unique}-1"

    again = await post(http, url(server, "/webhooks/sendgrid"), body, sendgrid_headers(body))
    assert again[0] == 200
    assert (again[1]["accepted"], again[1]["duplicate"], again[1]["ignored"]) == (0, 5, 2)


async def test_one_bad_item_never_fails_the_delivery(
    ingest_app: IngestApp, server: WebhookServer, http: aiohttp.ClientSession, unique: str
) -> None:
    """A SendGrid item whose timestamp a protobuf Timestamp cannot hold made the whole delivery an
    HTTP 500 (a ValueError while mapping), so SendGrid retried it and in the end dropped the good
    events with it. Now the bad items are dead-lettered, and the good ones stored."""
    batch: list[Any] = sendgrid_batch(unique)[1:4]
    batch.insert(1, {**batch[0], "sg_event_id": f"far-{unique}", "timestamp": 10**15})
    batch.append({"event": "machine_open", "email": f"reader-{unique}@example.com", "timestamp": 1})
    batch.append(["not", "an", "event"])
    body = json.dumps(batch).encode()
    status, answer = await post(http, url(server, "/webhooks/sendgrid"), body, sendgrid_headers(body))

    assert (status, without_items(answer)) == (200, counts(accepted=3, rejected=2, quarantined=1))
    items = answer["items"]
    assert [(i["index"], i["outcome"]) for i in items] == [
        (0, "accepted"),
        (1, "rejected"),
        (2, "accepted"),
        (3, "accepted"),
        (4, "quarantined"),
        (5, "rejected"),
    ]
    assert items[1] == {
        "index": 1,
        "outcome": "rejected",
        "type": "delivered",
        "reason": "WEBHOOK_ITEM_MALFORMED",
        "message": "body[1].timestamp: must be between -62135596800 and 253402300799",
    }
    assert (items[4]["reason"], items[4]["type"]) == ("WEBHOOK_UNKNOWN_TYPE", "machine_open")
    assert (items[5]["reason"], items[5]["message"]) == (
        "WEBHOOK_ITEM_MALFORMED",
        "body[5]: must be an object",
    )

    # The bad items are in the dead-letter store, as received.
    bad = json_input.parse_json(body)[1]
    dead_letter = await dead_letter_of(
        ingest_app, webhook_mapping.quarantine_id(Provider.SENDGRID, "delivered", bad)
    )
    assert dead_letter.webhook_item.index == 1
    assert json_input.parse_json(dead_letter.webhook_item.json)["timestamp"] == 10**15
    assert dead_letter.status.code == 3  # INVALID_ARGUMENT
    assert dead_letter.event.customer.email == f"reader-{unique}@example.com"


async def test_a_quarantined_item_is_mapped_again_when_replayed(
    ingest_app: IngestApp,
    server: WebhookServer,
    http: aiohttp.ClientSession,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raw = {**sendgrid_batch(unique)[2], "event": "machine_open", "sg_event_id": f"machine-{unique}"}
    body = json.dumps([raw]).encode()
    status, answer = await post(http, url(server, "/webhooks/sendgrid"), body, sendgrid_headers(body))
    assert (status, answer["quarantined"]) == (200, 1)
    dead_letter = await dead_letter_of(
        ingest_app, webhook_mapping.quarantine_id(Provider.SENDGRID, "machine_open", raw)
    )
    rejection_id = int(dead_letter.name.removeprefix("rejectedEvents/"))

    # Before an upgrade maps the type: still unknown, still pending.
    replayed = await ingest_app.dead_letters.replay(rejection_id, None)
    assert replayed is not None
    result, after = replayed
    assert result is not None and result.outcome == ingest_pb2.EVENT_OUTCOME_REJECTED
    assert after.state == ingest_pb2.REJECTED_EVENT_STATE_PENDING

    # An upgrade that maps it (here: machine opens as opens): the replay stores the event.
    monkeypatch.setitem(webhook_mapping._SENDGRID_EVENT_TYPES, "machine_open", "email_opened")
    replayed = await ingest_app.dead_letters.replay(rejection_id, None)
    assert replayed is not None
    result, after = replayed
    assert result is not None
    assert (result.event_id, result.outcome) == (
        f"sendgrid:machine-{unique}",
        ingest_pb2.EVENT_OUTCOME_ACCEPTED,
    )
    assert after.state == ingest_pb2.REJECTED_EVENT_STATE_REPLAYED
    assert after.webhook_item.type == "machine_open"


async def test_through_the_api_a_quarantined_item_is_listed_and_replayed_to_nothing(
    ingest_app: IngestApp,
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    server: WebhookServer,
    http: aiohttp.ClientSession,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raw = {"event": "newsletter_preview", "email": f"reader-{unique}@example.com", "timestamp": 1}
    body = json.dumps([raw]).encode()
    assert (await post(http, url(server, "/webhooks/sendgrid"), body, sendgrid_headers(body)))[0] == 200
    event_id = webhook_mapping.quarantine_id(Provider.SENDGRID, "newsletter_preview", raw)
    listed = await ingest_stub.ListRejectedEvents(
        ingest_pb2.ListRejectedEventsRequest(page_size=1000, source=ingest_pb2.EVENT_SOURCE_EMAIL)
    )
    [dead_letter] = [d for d in listed.rejected_events if d.event.event_id == event_id]
    assert dead_letter.webhook_item.provider == ingest_pb2.WEBHOOK_PROVIDER_SENDGRID
    assert json_input.parse_json(dead_letter.webhook_item.json) == raw

    # An upgrade that knowingly ignores the type: the replay resolves it, with no event to show.
    monkeypatch.setattr(
        webhook_mapping,
        "SENDGRID_IGNORED_TYPES",
        webhook_mapping.SENDGRID_IGNORED_TYPES | {"newsletter_preview"},
    )
    replayed = await ingest_stub.ReplayRejectedEvent(
        ingest_pb2.ReplayRejectedEventRequest(name=dead_letter.name)
    )
    assert not replayed.HasField("result")
    assert replayed.rejected_event.state == ingest_pb2.REJECTED_EVENT_STATE_REPLAYED


async def test_an_erased_persons_quarantined_items_are_deleted(
    ingest_app: IngestApp, server: WebhookServer, http: aiohttp.ClientSession, unique: str
) -> None:
    email = f"gone-{unique}@example.com"
    raw = {"event": "machine_open", "email": email, "timestamp": 1}
    body = json.dumps([raw]).encode()
    assert (await post(http, url(server, "/webhooks/sendgrid"), body, sendgrid_headers(body)))[0] == 200
    event_id = webhook_mapping.quarantine_id(Provider.SENDGRID, "machine_open", raw)
    await dead_letter_of(ingest_app, event_id)

    notice = profile_pb2.ErasureNotice(
        identifier_hashes=[IdentifierHasher.unkeyed().hash((IdentifierKind.EMAIL, email))]
    )
    await ingest_app.dead_letters.on_erasure_notice(notice.SerializeToString())
    page, _ = await ingest_app.dead_letters.list(page_size=1000, page_token="", state=0, source=0)
    assert event_id not in [d.event.event_id for d in page]


async def test_a_mapping_that_fails_quarantines_the_item_with_an_error_id(
    http: aiohttp.ClientSession,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(payload: dict[str, Any], webhook_id: str) -> list[ingest_pb2.Event]:
        raise ZeroDivisionError("a bug in the mapping")

    monkeypatch.setitem(webhook_mapping._SHOPIFY_TOPICS, "orders/create", broken)
    sink, quarantine = RecordingSink(), RecordingQuarantine()
    server = await started(sink, quarantine)
    try:
        order, _ = a_recent_order(unique)
        body = json.dumps(order).encode()
        with caplog.at_level(logging.ERROR, logger="ingest.webhooks"):
            status, answer = await post(http, url(server, "/webhooks/shopify"), body, shopify_headers(body))
        [item] = answer["items"]
        assert (status, item["outcome"], item["reason"]) == (
            200,
            "quarantined",
            "WEBHOOK_ITEM_MAPPING_FAILED",
        )
        assert "ZeroDivisionError" not in json.dumps(answer) and "a bug" not in json.dumps(answer)
        [(provider, _, kept, error_id)] = quarantine.items
        assert (provider, kept.raw, error_id) == (Provider.SHOPIFY, order, item["error_id"])
        [record] = [r for r in caplog.records if getattr(r, "error_id", None) == error_id]
        assert record.__dict__["exception"] == "builtins.ZeroDivisionError"
        assert "broken" in record.__dict__["traceback"]
        # (The traceback's source lines quote the code, which raises a literal here.)
        logged = {k: v for k, v in record.__dict__.items() if k != "traceback"}
        assert "a bug in the mapping" not in str(logged)
        assert sink.batches == []
    finally:
        await server.stop()


async def test_when_the_dead_letter_store_is_down_the_delivery_is_503_and_nothing_is_ingested(
    http: aiohttp.ClientSession, unique: str
) -> None:
    sink = RecordingSink()
    server = await started(sink, RecordingQuarantine(failure=OSError("connection refused")))
    try:
        batch = [*sendgrid_batch(unique)[1:3], {"event": "machine_open", "timestamp": 1}]
        body = json.dumps(batch).encode()
        async with http.post(
            url(server, "/webhooks/sendgrid"), data=body, headers=sendgrid_headers(body)
        ) as response:
            assert (response.status, response.headers["Retry-After"]) == (503, "1")
            assert (await response.json())["error"]["reason"] == "DEAD_LETTER_STORE_UNAVAILABLE"
        assert sink.batches == []
    finally:
        await server.stop()


async def test_an_unexpected_error_is_500_with_an_opaque_error_id(
    http: aiohttp.ClientSession, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    class BrokenSink:
        async def ingest_batch(self, events: list[ingest_pb2.Event]) -> list[ingest_pb2.EventResult]:
            raise RuntimeError('relation "ingest_processed_events" does not exist')

    server = await started(BrokenSink())
    try:
        order, _ = a_recent_order(unique)
        body = json.dumps(order).encode()
        with caplog.at_level(logging.ERROR, logger="ingest.webhooks"):
            async with http.post(
                url(server, "/webhooks/shopify"), data=body, headers=shopify_headers(body)
            ) as response:
                status, text = response.status, await response.text()
        answer = json.loads(text)
        error_id = answer["error"]["error_id"]
        assert (status, answer) == (
            500,
            {
                "error": {
                    "reason": "INTERNAL",
                    "message": f"an unexpected error; error id {error_id}",
                    "error_id": error_id,
                }
            },
        )
        assert "RuntimeError" not in text and "ingest_processed_events" not in text
        [record] = [r for r in caplog.records if getattr(r, "error_id", None) == error_id]
        # Logged by class and traceback, never the message, which may quote data.
        assert record.__dict__["exception"] == "builtins.RuntimeError"
        logged = {k: v for k, v in record.__dict__.items() if k != "traceback"}
        assert "ingest_processed_events" not in str(logged)
    finally:
        await server.stop()


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
            {
                "error": {
                    "reason": "SIGNATURE_INVALID",
                    "message": "invalid signature: signature does not match the timestamp and body",
                }
            },
        )
        assert stale == (
            401,
            {
                "error": {
                    "reason": "SIGNATURE_INVALID",
                    "message": "invalid signature: timestamp is more than 60s from now",
                }
            },
        )
        assert unsigned[0] == 401
        assert sink.batches == []
    finally:
        await server.stop()


async def test_a_header_that_is_not_utf8_is_401_not_500(unique: str) -> None:
    """aiohttp hands header bytes that are not UTF-8 on as lone surrogates; the signature check
    raised on them (a 500). Sent over a raw socket, as no HTTP client sends such a header."""
    server = await started(RecordingSink())
    try:
        body = b"{}"
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"POST /webhooks/shopify HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nX-Shopify-Topic: orders/create\r\n"
            b"X-Shopify-Hmac-Sha256: \xff\xfe\r\nContent-Length: 2\r\n\r\n" + body
        )
        await writer.drain()
        answer = await reader.read()
        writer.close()
        await writer.wait_closed()
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line == b"HTTP/1.1 401 Unauthorized"
        assert b'"SIGNATURE_INVALID"' in rest
    finally:
        await server.stop()


async def test_an_oversized_body_is_413_before_anything_else(http: aiohttp.ClientSession) -> None:
    sink = RecordingSink()
    server = await started(sink, max_body_bytes=1024)
    try:
        body = json.dumps([{"event": "open", "padding": "x" * 2000}]).encode()
        status, answer = await post(http, url(server, "/webhooks/sendgrid"), body, sendgrid_headers(body))
        assert (status, answer) == (
            413,
            {"error": {"reason": "BODY_TOO_LARGE", "message": "the body is larger than 1024 bytes"}},
        )

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


async def test_a_compressed_body_is_inflated_with_a_bound_and_unknown_codings_are_415(
    http: aiohttp.ClientSession, unique: str
) -> None:
    sink = RecordingSink()
    server = await started(sink, max_body_bytes=64 * 1024)
    try:
        target = url(server, "/webhooks/shopify")
        order, _ = a_recent_order(unique)
        body = json.dumps(order).encode()  # signed as JSON, sent compressed
        for coding, compressed in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
            headers = {**shopify_headers(body), "Content-Encoding": coding}
            status, answer = await post(http, target, compressed, headers)
            assert (status, answer["accepted"]) == (200, 1), coding

        bomb = gzip.compress(b" " * 20_000_000)  # 20 KB on the wire, 20 MB inflated
        headers = {**shopify_headers(b""), "Content-Encoding": "gzip"}
        assert await post(http, target, bomb, headers) == (
            413,
            {"error": {"reason": "BODY_TOO_LARGE", "message": "the decoded body is larger than 65536 bytes"}},
        )
        async with http.post(
            target, data=body, headers={**shopify_headers(body), "Content-Encoding": "br"}
        ) as response:
            assert (response.status, response.headers["Accept-Encoding"]) == (415, "identity, gzip, deflate")
            assert (await response.json())["error"]["reason"] == "UNSUPPORTED_CONTENT_ENCODING"
        corrupt = await post(http, target, b"not gzip", {**shopify_headers(b""), "Content-Encoding": "gzip"})
        assert (corrupt[0], corrupt[1]["error"]["reason"]) == (400, "CONTENT_ENCODING_INVALID")
        assert len(sink.batches) == 2
    finally:
        await server.stop()


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1"],
)
async def test_a_body_that_is_not_json_by_its_media_type_is_415(
    http: aiohttp.ClientSession, content_type: str | None
) -> None:
    sink = RecordingSink()
    server = await started(sink)
    try:
        body = b'{"id": 1}'
        headers = shopify_headers(body)
        del headers["Content-Type"]
        if content_type is not None:
            headers["Content-Type"] = content_type
        async with http.post(url(server, "/webhooks/shopify"), data=body, headers=headers) as response:
            assert response.status == 415
            assert (await response.json())["error"] == {
                "reason": "UNSUPPORTED_MEDIA_TYPE",
                "message": "the body must be sent as Content-Type: application/json"
                if content_type != "application/json; charset=latin-1"
                else "JSON must be UTF-8 (charset=utf-8)",
            }
        assert sink.batches == []
    finally:
        await server.stop()


# Each JSON edge (RFC 8259, I-JSON) over HTTP: a signed body, a 400 with its reason and path.
JSON_EDGES = [
    (b'{"id": 1,', "JSON_MALFORMED", None),
    (b'{"id": 1, "id": 2}', "JSON_DUPLICATE_KEY", "$.id"),
    (b'{"total_price": NaN}', "JSON_NOT_FINITE", "$.total_price"),
    (b'{"total_price": -Infinity}', "JSON_NOT_FINITE", "$.total_price"),
    (b'{"id": 18446744073709551616}', "JSON_NUMBER_OUT_OF_RANGE", "$.id"),
    (b'{"total_price": 1e400}', "JSON_NUMBER_OUT_OF_RANGE", "$.total_price"),
    (b'{"email": "\xff@example.com"}', "JSON_INVALID_UTF8", None),
    (rb'{"email": "\ud800@example.com"}', "JSON_UNPAIRED_SURROGATE", "$.email"),
    (rb'{"note": "a\u0000b"}', "JSON_CONTROL_CHARACTER", "$.note"),
    (b'{"note": "a\x07b"}', "JSON_CONTROL_CHARACTER", None),
    ('{"note": "\ufffe"}'.encode(), "JSON_NONCHARACTER", "$.note"),
    (b'{"a":' * 65 + b"1" + b"}" * 65, "JSON_TOO_DEEP", "$" + ".a" * 64),
    (b"\xef\xbb\xbf{}", "JSON_BYTE_ORDER_MARK", None),
    (b"[{}]", "JSON_UNEXPECTED_TYPE", "$"),
    (b'"orders/create"', "JSON_UNEXPECTED_TYPE", "$"),
]


@pytest.mark.parametrize(("body", "reason", "path"), JSON_EDGES)
async def test_every_json_edge_is_400_with_its_reason(
    http: aiohttp.ClientSession, body: bytes, reason: str, path: str | None
) -> None:
    sink, quarantine = RecordingSink(), RecordingQuarantine()
    server = await started(sink, quarantine)
    try:
        status, answer = await post(http, url(server, "/webhooks/shopify"), body, shopify_headers(body))
        assert (status, answer["error"]["reason"], answer["error"].get("path")) == (400, reason, path)
        assert answer["error"]["message"]
        assert (sink.batches, quarantine.items) == ([], [])
    finally:
        await server.stop()


async def test_a_sendgrid_delivery_of_more_than_10000_items_is_413(http: aiohttp.ClientSession) -> None:
    sink, quarantine = RecordingSink(), RecordingQuarantine()
    server = await started(sink, quarantine)
    try:
        body = json.dumps([1] * 10_001).encode()  # 30 KB: past the item limit, not the size limit
        status, answer = await post(http, url(server, "/webhooks/sendgrid"), body, sendgrid_headers(body))
        assert (status, answer["error"]["reason"]) == (413, "WEBHOOK_TOO_MANY_ITEMS")
        at_limit = json.dumps([1] * 10_000).encode()
        status, answer = await post(
            http, url(server, "/webhooks/sendgrid"), at_limit, sendgrid_headers(at_limit)
        )
        assert (status, answer["rejected"], len(quarantine.items)) == (200, 10_000, 10_000)
        assert sink.batches == []
    finally:
        await server.stop()


async def test_an_unexpected_envelope_or_a_missing_topic_is_400(http: aiohttp.ClientSession) -> None:
    sink = RecordingSink()
    server = await started(sink)
    try:
        wrapped = b'{"events": [{"event": "open"}]}'  # SendGrid posts a bare array
        status, answer = await post(
            http, url(server, "/webhooks/sendgrid"), wrapped, sendgrid_headers(wrapped)
        )
        assert (status, answer) == (
            400,
            {
                "error": {
                    "reason": "JSON_UNEXPECTED_TYPE",
                    "message": "the body must be a JSON array",
                    "path": "$",
                }
            },
        )

        no_topic = shopify_headers(b"{}")
        del no_topic["X-Shopify-Topic"]
        status, answer = await post(http, url(server, "/webhooks/shopify"), b"{}", no_topic)
        assert (status, answer) == (
            400,
            {"error": {"reason": "WEBHOOK_TOPIC_MISSING", "message": "missing X-Shopify-Topic header"}},
        )
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
        assert (answer["retry"], answer["error"]["reason"]) == (1, "EVENT_LOG_FULL")
        assert answer["items"] == [
            {"index": 0, "outcome": "retry", "event_id": f"shopify:order:{order['id']}:completed"}
        ]
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
                assert (await response.json())["error"]["reason"] == "WEBHOOK_NOT_CONFIGURED"
    finally:
        await server.stop()


def test_an_unusable_configuration_fails_at_construction() -> None:
    quarantine = RecordingQuarantine()
    with pytest.raises(ValueError, match="verification key"):
        WebhookServer(
            RecordingSink(),
            settings(sendgrid_public_key="bm90IGEga2V5"),
            tls=LOCAL_SERVER["tls"],
            quarantine=quarantine,
        )
    with pytest.raises(ValueError, match="host:port"):
        WebhookServer(
            RecordingSink(), settings(address="localhost"), tls=LOCAL_SERVER["tls"], quarantine=quarantine
        )
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
        status, answer = await post(http, target, body, shopify_headers(body))
        assert (status, without_items(answer)) == (200, counts(accepted=1))
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
