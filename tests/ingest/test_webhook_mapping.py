"""Webhook payloads as events, and webhook signatures: pure functions, real-looking payloads.

The Shopify payloads follow the REST resources Shopify posts (order, refund, checkout), the
SendGrid ones the Event Webhook reference, trimmed to the fields that matter plus a few that
do not, as real deliveries carry many.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ingest import webhook_mapping
from ingest.webhook_mapping import (
    ItemOutcome,
    MappedItem,
    Provider,
    WebhookPayloadError,
    WebhookSignatureError,
    load_sendgrid_public_key,
    map_item,
    quarantine_id,
    sendgrid_events,
    shopify_events,
    shopify_hmac,
    to_money,
    verify_sendgrid_signature,
    verify_shopify_signature,
)
from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.json_input import parse_json

WEBHOOK_ID = "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043"


def order_payload(order_id: int = 450789469, email: str = "Bob.Norman@Mail.example.com") -> dict[str, Any]:
    return {
        "id": order_id,
        "admin_graphql_api_id": f"gid://shopify/Order/{order_id}",
        "name": "#1001",
        "email": email,
        "contact_email": email,
        "created_at": "2026-11-24T07:15:03-05:00",
        "processed_at": "2026-11-24T07:15:04-05:00",
        "updated_at": "2026-11-24T07:15:10-05:00",
        "cancelled_at": None,
        "cancel_reason": None,
        "currency": "USD",
        "presentment_currency": "CAD",
        "financial_status": "paid",
        "subtotal_price": "597.00",
        "total_tax": "11.94",
        "total_price": "598.94",
        "total_price_set": {
            "shop_money": {"amount": "598.94", "currency_code": "USD"},
            "presentment_money": {"amount": "811.26", "currency_code": "CAD"},
        },
        "test": False,
        "user_id": 548380009,  # the staff member, not the customer
        "customer": {
            "id": 207119551,
            "email": email,
            "first_name": "Bob",
            "last_name": "Norman",
            "state": "disabled",
        },
        "line_items": [
            {
                "id": 466157049,
                "variant_id": 39072856,
                "product_id": 632910392,
                "title": "IPod Nano - 8gb",
                "name": "IPod Nano - 8gb - green",
                "sku": "IPOD2008GREEN",
                "quantity": 1,
                "price": "199.00",
                "price_set": {"shop_money": {"amount": "199.00", "currency_code": "USD"}},
                "total_discount": "0.00",
            },
            {
                "id": 518995019,
                "variant_id": 49148385,
                "product_id": 632910392,
                "title": "IPod Nano - 8gb",
                "name": "IPod Nano - 8gb - red",
                "sku": "",
                "quantity": 2,
                "price": "199.00",
            },
            {
                "id": 703073504,
                "variant_id": None,
                "product_id": None,
                "title": "Tip",
                "name": "Tip",
                "sku": None,
                "quantity": 1,
                "price": "0.94",
            },
        ],
        "refunds": [],
    }


def refund_payload(refund_id: int = 929361464, order_id: int = 450789469) -> dict[str, Any]:
    return {
        "id": refund_id,
        "order_id": order_id,
        "created_at": "2026-11-25T10:34:55-05:00",
        "processed_at": "2026-11-25T10:34:56-05:00",
        "note": "wrong size",
        "user_id": 548380009,
        "restock": True,
        "refund_line_items": [
            {
                "id": 1058498311,
                "quantity": 1,
                "line_item_id": 518995019,
                "restock_type": "return",
                "subtotal": 199.0,
                "total_tax": 3.98,
            }
        ],
        "transactions": [
            {
                "id": 1072844685,
                "order_id": order_id,
                "kind": "refund",
                "gateway": "bogus",
                "status": "success",
                "amount": "199.00",
                "currency": "USD",
            },
            {
                "id": 1072844686,
                "order_id": order_id,
                "kind": "refund",
                "gateway": "bogus",
                "status": "success",
                "amount": "3.98",
                "currency": "USD",
            },
            {
                "id": 1072844687,
                "order_id": order_id,
                "kind": "refund",
                "gateway": "bogus",
                "status": "failure",
                "amount": "100.00",
                "currency": "USD",
            },
        ],
        "order_adjustments": [],
    }


def checkout_payload(email: str | None = "bob@example.com") -> dict[str, Any]:
    return {
        "id": 901414060,
        "token": "2a1ace52255252df566af0faaedfbfa7",
        "cart_token": "68778783ad298f1c80c3bafcddeea02f",
        "email": email,
        "created_at": "2026-11-24T12:59:10-05:00",
        "updated_at": "2026-11-24T13:02:11-05:00",
        "completed_at": None,
        "currency": "USD",
        "presentment_currency": "EUR",
        "total_price": "403.99",
        "user_id": None,
        "customer": None,
        "line_items": [
            {
                "key": "49148385",
                "variant_id": 49148385,
                "product_id": 632910392,
                "sku": "IPOD2008RED",
                "title": "IPod Nano - 8GB",
                "quantity": 2,
                "price": "199.00",
                "line_price": "398.00",
            }
        ],
    }


def sendgrid_batch() -> list[dict[str, Any]]:
    common = {
        "email": "Ada@Example.com",
        "timestamp": 1795000000,
        "smtp-id": "<14c5d75ce93.dfd.64b469@ismtpd>",
    }
    return [
        {
            **common,
            "event": "processed",
            "sg_event_id": "cHJvY2Vzc2VkLTEtMjQ5NDY4NjgtVWxjYnFq",
            "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0",
            "category": "cat facts",
        },
        {
            **common,
            "event": "delivered",
            "sg_event_id": "ZGVsaXZlcmVkLTAtMjQ5NDY4NjgtVWxjYnFq",
            "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0",
            "response": "250 OK",
            "ip": "168.1.1.1",
            "campaign_id": "black-friday-26",
        },
        {
            **common,
            "event": "open",
            "sg_event_id": "b3Blbi0xLTI0OTQ2ODY4LVVsY2JxanRj",
            "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0",
            "useragent": "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0",
            "ip": "255.255.255.255",
            "sg_machine_open": False,
            "campaign_id": 42,
        },
        {
            **common,
            "event": "click",
            "sg_event_id": "Y2xpY2stMS0yNDk0Njg2OC1VbGNicWp0Yw",
            "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0",
            "useragent": "Mozilla/5.0",
            "ip": "2001:db8::1",
            "url": "https://shop.example.com/sale?utm_source=email",
            "url_offset": {"index": 0, "type": "html"},
        },
        {
            **common,
            "event": "bounce",
            "sg_event_id": "Ym91bmNlLTAtMjQ5NDY4NjgtVWxjYnFq",
            "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0",
            "reason": "550 5.1.1 The email account that you tried to reach does not exist.",
            "status": "5.1.1",
            "type": "bounce",
            "bounce_classification": "Invalid Address",
        },
        {
            **common,
            "event": "bounce",
            "sg_event_id": "Ym91bmNlLTQtNTA0ODUxOTUtZXVvMmlLeGRT",
            "sg_message_id": "euo2iKxdSayPF4YE4--I7A.recvd-5f54b5d587-pczjm-1-67BADEEA-6.0",
            "reason": "unable to get mx info",
            "type": "blocked",
            "bounce_classification": "Unclassified",
        },
        {
            **common,
            "event": "deferred",
            "sg_event_id": "ZGVmZXJyZWQtMC0yNDk0Njg2OC1VbGNicWp0",
            "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0",
            "response": "400 try again later",
            "attempt": "5",
        },
        {
            **common,
            "event": "dropped",
            "sg_event_id": "ZHJvcHBlZC0wLTI0OTQ2ODY4LVVsY2JxanRj",
            "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0",
            "reason": "Bounced Address",
            "status": "5.0.0",
        },
        {
            **common,
            "event": "unsubscribe",
            "sg_event_id": "dW5zdWJzY3JpYmUtMC0yNDk0Njg2OC1VbGNi",
            "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0",
        },
        {
            **common,
            "event": "group_unsubscribe",
            "sg_event_id": "Z3JvdXBfdW5zdWJzY3JpYmUtMC0yNDk0Njg2",
            "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0",
            "asm_group_id": 10,
        },
        {
            **common,
            "event": "spamreport",
            "sg_event_id": "c3BhbXJlcG9ydC0wLTI0OTQ2ODY4LVVsY2Jx",
            "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0",
        },
    ]


def seconds(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp())


def only_item(topic: str, payload: Any, webhook_id: str = WEBHOOK_ID) -> MappedItem:
    delivery = shopify_events(topic, webhook_id, payload)
    [item] = delivery.items
    assert (item.index, item.type, item.raw) == (0, topic, payload)
    return item


# --- Shopify ----------------------------------------------------------------------------------


def test_an_order_becomes_order_completed_keyed_by_the_order_id() -> None:
    item = only_item("orders/create", order_payload())

    assert item.outcome == ItemOutcome.MAPPED
    [event] = item.events
    assert event.event_id == "shopify:order:450789469:completed"
    assert event.source == ingest_pb2.EVENT_SOURCE_SERVER
    # The customer's id, not the top-level user_id (the staff member).
    assert event.customer == ingest_pb2.CustomerIdentifiers(
        email="Bob.Norman@Mail.example.com", user_id="207119551"
    )
    assert event.occurred_at.seconds == seconds("2026-11-24T07:15:04-05:00")  # processed_at
    order = event.order_completed
    assert order.order_id == "450789469"
    assert (order.total.currency_code, order.total.units, order.total.nanos) == ("USD", 598, 940_000_000)
    assert [(line.sku, line.name, line.quantity) for line in order.lines] == [
        ("IPOD2008GREEN", "IPod Nano - 8gb - green", 1),
        ("variant:49148385", "IPod Nano - 8gb - red", 2),  # no SKU: named by its variant
    ]  # the tip names no product and is left out
    assert (order.lines[0].unit_price.currency_code, order.lines[0].unit_price.units) == ("USD", 199)


def test_orders_paid_is_the_same_fact_as_orders_create() -> None:
    created = shopify_events("orders/create", WEBHOOK_ID, order_payload())
    paid = shopify_events("orders/paid", "another-webhook-id", order_payload())
    assert paid.events == created.events


def test_an_order_falls_back_to_created_at_and_the_customer_email() -> None:
    payload = order_payload()
    payload["processed_at"] = None
    payload["email"] = None
    payload["contact_email"] = None
    [event] = shopify_events("orders/create", WEBHOOK_ID, payload).events
    assert event.occurred_at.seconds == seconds("2026-11-24T07:15:03-05:00")
    assert event.customer.email == "Bob.Norman@Mail.example.com"


def test_an_order_without_identifiers_still_becomes_an_event_for_ingest_to_reject() -> None:
    payload = order_payload()
    payload.update(email=None, contact_email=None, customer=None)
    [event] = shopify_events("orders/create", WEBHOOK_ID, payload).events
    assert event.customer == ingest_pb2.CustomerIdentifiers()


def test_a_cancelled_order_becomes_order_cancelled_with_the_reason() -> None:
    payload = order_payload()
    payload.update(cancelled_at="2026-11-24T09:00:00-05:00", cancel_reason="customer")
    [event] = shopify_events("orders/cancelled", WEBHOOK_ID, payload).events
    assert event.event_id == "shopify:order:450789469:cancelled"
    assert event.occurred_at.seconds == seconds("2026-11-24T09:00:00-05:00")
    assert event.order_cancelled == ingest_pb2.OrderCancelled(order_id="450789469", reason="customer")
    assert event.customer.email == "Bob.Norman@Mail.example.com"


def test_a_refund_sums_its_successful_refund_transactions_exactly() -> None:
    [event] = shopify_events("refunds/create", WEBHOOK_ID, refund_payload()).events
    assert event.event_id == "shopify:refund:929361464"
    assert event.occurred_at.seconds == seconds("2026-11-25T10:34:56-05:00")
    refund = event.order_refunded
    assert (refund.order_id, refund.refund_id) == ("450789469", "929361464")
    assert (refund.amount.currency_code, refund.amount.units, refund.amount.nanos) == (
        "USD",
        202,
        980_000_000,
    )
    # A refund names no customer (its user_id is staff): ingest will reject it; see the docs.
    assert event.customer == ingest_pb2.CustomerIdentifiers()


def test_a_refund_without_money_is_ignored() -> None:
    payload = refund_payload()
    payload["transactions"] = []
    item = only_item("refunds/create", payload)
    assert (item.outcome, item.events) == (ItemOutcome.IGNORED, [])


def test_an_updated_order_yields_its_refunds_with_the_customer() -> None:
    payload = order_payload()
    payload["refunds"] = [refund_payload()]
    mapped = shopify_events("orders/updated", WEBHOOK_ID, payload)
    [event] = mapped.events
    assert event.event_id == "shopify:refund:929361464"  # the same id as from refunds/create
    assert event.customer.email == "Bob.Norman@Mail.example.com"
    assert event.order_refunded.amount.units == 202

    assert only_item("orders/updated", order_payload()).outcome == ItemOutcome.IGNORED


def test_a_checkout_with_an_email_becomes_checkout_started_in_the_buyers_currency() -> None:
    [event] = shopify_events("checkouts/update", WEBHOOK_ID, checkout_payload()).events
    assert event.event_id == f"shopify:{WEBHOOK_ID}"
    assert event.customer.email == "bob@example.com"
    assert event.occurred_at.seconds == seconds("2026-11-24T13:02:11-05:00")
    started = event.checkout_started
    assert started.checkout_id == "2a1ace52255252df566af0faaedfbfa7"
    assert (started.total.currency_code, started.total.units, started.total.nanos) == (
        "EUR",
        403,
        990_000_000,
    )
    assert [(line.sku, line.quantity, line.unit_price.currency_code) for line in started.lines] == [
        ("IPOD2008RED", 2, "EUR")
    ]


def test_an_anonymous_checkout_is_ignored() -> None:
    item = only_item("checkouts/create", checkout_payload(email=None), webhook_id="")
    assert (item.outcome, item.events) == (ItemOutcome.IGNORED, [])


def test_a_checkout_needs_the_webhook_id_for_its_event_id() -> None:
    item = only_item("checkouts/create", checkout_payload(), webhook_id="")
    assert item.outcome == ItemOutcome.MALFORMED
    assert "X-Shopify-Webhook-Id" in item.problem


def customer_payload(**changes: Any) -> dict[str, Any]:
    """A customers/create or customers/update body (Shopify's customer resource)."""
    customer: dict[str, Any] = {
        "id": 706405506930370084,
        "email": "bob@example.com",
        "created_at": "2026-11-20T19:00:00-05:00",
        "updated_at": "2026-11-24T08:00:00-05:00",
        "first_name": "Bob",
        "last_name": "Norman",
        "phone": None,
        "state": "enabled",
        "orders_count": 3,
        "total_spent": "199.65",
        "note": "loves ice cream",
        "tags": "vip",
        "currency": "USD",
        "email_marketing_consent": {
            "state": "subscribed",
            "opt_in_level": "confirmed_opt_in",
            "consent_updated_at": "2026-11-21T10:00:00-05:00",
        },
        "sms_marketing_consent": {
            "state": "not_subscribed",
            "opt_in_level": "single_opt_in",
            "consent_updated_at": None,
            "consent_collected_from": "OTHER",
        },
        "default_address": {"city": "Ottawa", "province_code": "ON", "country_code": "CA", "zip": "K2P 1L4"},
    }
    customer.update(changes)
    return customer


def test_a_customer_becomes_traits_and_marketing_consents() -> None:
    identify, email, sms = shopify_events("customers/create", WEBHOOK_ID, customer_payload()).events
    updated_ms = 1795525200000  # 2026-11-24T13:00:00Z
    assert identify.event_id == f"shopify:customer:706405506930370084:{updated_ms}"
    assert (identify.customer.user_id, identify.customer.email) == ("706405506930370084", "bob@example.com")
    assert identify.source == ingest_pb2.EVENT_SOURCE_SERVER
    assert identify.occurred_at.ToMilliseconds() == updated_ms
    # the person's own fields only: no note, no tags, no totals Sendtime computes from orders
    assert dict(identify.identify.traits) == {
        "first_name": "Bob",
        "last_name": "Norman",
        "city": "Ottawa",
        "state": "ON",
        "country": "CA",
        "postal_code": "K2P 1L4",
    }
    consented_ms = 1795273200000  # 2026-11-21T15:00:00Z
    assert email.event_id == f"shopify:customer:706405506930370084:email-consent:{consented_ms}"
    assert email.consent_changed == ingest_pb2.ConsentChanged(
        channel=ingest_pb2.CHANNEL_EMAIL, subscribed=True
    )
    assert email.occurred_at.ToMilliseconds() == consented_ms
    # never subscribed to SMS, and no consent time: the update's
    assert sms.consent_changed == ingest_pb2.ConsentChanged(channel=ingest_pb2.CHANNEL_SMS, subscribed=False)
    assert sms.event_id == f"shopify:customer:706405506930370084:sms-consent:{updated_ms}"


def test_an_update_that_leaves_the_consent_repeats_its_event_and_a_new_consent_is_another() -> None:
    first = shopify_events("customers/create", WEBHOOK_ID, customer_payload()).events
    renamed = customer_payload(first_name="Robert", updated_at="2026-11-25T08:00:00-05:00")
    second = shopify_events("customers/update", WEBHOOK_ID, renamed).events
    assert first[0].event_id != second[0].event_id  # a new version of the person
    assert first[1].event_id == second[1].event_id  # the same email consent: a duplicate
    unsubscribed = customer_payload(
        updated_at="2026-11-26T08:00:00-05:00",
        email_marketing_consent={"state": "unsubscribed", "consent_updated_at": "2026-11-26T07:59:00-05:00"},
    )
    third = shopify_events("customers/update", WEBHOOK_ID, unsubscribed).events
    assert third[1].event_id != first[1].event_id and not third[1].consent_changed.subscribed


@pytest.mark.parametrize("state", ["pending", "redacted", "invalid", None])
def test_a_consent_state_that_says_nothing_yet_makes_no_consent_event(state: str | None) -> None:
    payload = customer_payload(email_marketing_consent={"state": state}, sms_marketing_consent=None)
    events = shopify_events("customers/update", WEBHOOK_ID, payload).events
    assert [e.WhichOneof("payload") for e in events] == ["identify"]


def test_a_customer_with_nothing_to_say_is_ignored() -> None:
    bare = {"id": 5, "email": "x@example.com", "updated_at": "2026-11-24T08:00:00-05:00"}
    item = only_item("customers/update", bare)
    assert (item.outcome, item.events) == (ItemOutcome.IGNORED, [])


def test_a_malformed_consent_time_is_a_malformed_item_naming_the_field() -> None:
    payload = customer_payload(
        email_marketing_consent={"state": "subscribed", "consent_updated_at": "yesterday"}
    )
    item = only_item("customers/update", payload)
    assert item.outcome == ItemOutcome.MALFORMED
    assert item.problem == "customer.email_marketing_consent.consent_updated_at: must be an ISO 8601 time"


def test_a_topic_sendtime_does_not_map_is_an_unknown_type_kept_as_received() -> None:
    product = {"id": 1, "title": "T-Shirt"}
    item = only_item("products/update", product)
    assert (item.outcome, item.events, item.raw) == (ItemOutcome.UNKNOWN_TYPE, [], product)
    assert item.problem == "type 'products/update' is not one Sendtime maps"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda o: o.pop("id"), r"order\.id: required"),
        (lambda o: o.update(id=True), r"order\.id: must be an integer or a string"),
        (lambda o: o.update(total_price=["598.94"]), r"order\.total_price: must be a decimal amount"),
        (lambda o: o.update(total_price="five"), r"order\.total_price: must be a decimal amount"),
        (lambda o: o.update(total_price="NaN"), r"order\.total_price: must be a finite amount"),
        (lambda o: o.update(total_price="1.0000000001"), r"order\.total_price: more than 9 decimal places"),
        (lambda o: o.update(processed_at="yesterday"), r"order\.processed_at: must be an ISO 8601 time"),
        (lambda o: o.update(processed_at="2026-11-24T07:15:04"), r"order\.processed_at: must carry a UTC"),
        (lambda o: o.update(line_items={"sku": "x"}), r"order\.line_items: must be a list"),
        (lambda o: o["line_items"][1].update(quantity="2"), r"order\.line_items\[1\]\.quantity: must be an"),
        (lambda o: o.update(customer="207119551"), r"order\.customer: must be an object"),
        (lambda o: o.update(email=7), r"order\.email: must be a string"),
        (lambda o: o.update(currency="DEM"), r"order\.currency: must be an ISO 4217 currency code"),
        (lambda o: o.update(currency="usd"), r"order\.currency: must be an ISO 4217 currency code"),
        (lambda o: o.update(total_price="1E+19"), r"order\.total_price: too large"),
        (lambda o: o.update(total_price="١٢"), r"order\.total_price: must be a decimal amount"),
        (
            lambda o: o.update(processed_at="0001-01-01T00:00:00+01:00"),
            r"order\.processed_at: must be between",
        ),
        (lambda o: o["line_items"][0].update(quantity=2**63), r"quantity: must be between"),
    ],
)
def test_a_malformed_order_is_an_item_with_the_field_named(mutate: Any, message: str) -> None:
    payload = order_payload()
    mutate(payload)
    item = only_item("orders/create", payload)
    assert (item.outcome, item.events) == (ItemOutcome.MALFORMED, [])
    assert re.search(message, item.problem)
    assert "Bob" not in item.problem


def test_a_refund_whose_transactions_add_up_past_any_amount_is_malformed_not_an_overflow() -> None:
    payload = refund_payload()
    for tx in payload["transactions"]:
        tx["amount"] = "999999999999999999.999999999"
    payload["transactions"] *= 1000
    item = only_item("refunds/create", payload)
    assert (item.outcome, item.problem) == (ItemOutcome.MALFORMED, "refund.transactions: too large")


def test_a_refund_in_a_currency_that_is_not_iso_4217_is_malformed() -> None:
    payload = refund_payload()
    payload["transactions"][0]["currency"] = "XTS"
    item = only_item("refunds/create", payload)
    assert item.outcome == ItemOutcome.MALFORMED
    assert item.problem.startswith("refund.transactions[0].currency: must be an ISO 4217")


def test_an_error_inside_a_mapping_fails_that_item_only(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(payload: dict[str, Any], webhook_id: str) -> list[ingest_pb2.Event]:
        raise KeyError("a bug")

    monkeypatch.setitem(webhook_mapping._SHOPIFY_TOPICS, "orders/create", broken)
    item = only_item("orders/create", order_payload())
    assert (item.outcome, item.problem) == (ItemOutcome.FAILED, "mapping failed")
    assert isinstance(item.error, KeyError)


def test_a_body_that_is_not_an_object_is_refused_whole() -> None:
    with pytest.raises(WebhookPayloadError, match="body: must be an object"):
        shopify_events("orders/create", WEBHOOK_ID, [order_payload()])


# --- money ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "units", "nanos"),
    [
        ("0.1", 0, 100_000_000),
        ("19.99", 19, 990_000_000),
        ("598.94", 598, 940_000_000),
        ("100", 100, 0),
        ("0.000000001", 0, 1),
        ("1234567890123.123456789", 1234567890123, 123_456_789),
        ("-5.25", -5, -250_000_000),
        ("-0.5", 0, -500_000_000),
        ("9223372036854775807.999999999", 2**63 - 1, 999_999_999),
    ],
)
def test_money_is_converted_exactly(amount: str, units: int, nanos: int) -> None:
    money = to_money(Decimal(amount), "EUR", "x")
    assert (money.currency_code, money.units, money.nanos) == ("EUR", units, nanos)


@pytest.mark.parametrize(
    "amount", ["0.0000000001", "9223372036854775808", "1E+999999", "1." + "0" * 70 + "1"]
)
def test_money_that_cannot_be_exact_is_refused(amount: str) -> None:
    with pytest.raises(WebhookPayloadError):
        to_money(Decimal(amount), "EUR", "x")


def test_json_numbers_are_parsed_as_decimals_never_floats() -> None:
    payload = order_payload()
    payload["total_price"] = "__NUMBER__"
    body = json.dumps(payload).replace('"__NUMBER__"', "0.30").encode()
    [event] = shopify_events("orders/create", WEBHOOK_ID, parse_json(body)).events
    assert (event.order_completed.total.units, event.order_completed.total.nanos) == (0, 300_000_000)

    float_noise = json.dumps(payload).replace('"__NUMBER__"', "0.30000000000000004").encode()
    [item] = shopify_events("orders/create", WEBHOOK_ID, parse_json(float_noise)).items
    assert (item.outcome, item.problem) == (
        ItemOutcome.MALFORMED,
        "order.total_price: more than 9 decimal places",
    )


def test_json_integers_beyond_2_53_stay_exact_in_ids() -> None:
    body = json.dumps(order_payload()).replace("450789469", "9007199254740993").encode()
    [event] = shopify_events("orders/create", WEBHOOK_ID, parse_json(body)).events
    assert event.order_completed.order_id == "9007199254740993"


# --- SendGrid ---------------------------------------------------------------------------------


def test_a_sendgrid_batch_maps_each_engagement_event_and_counts_the_rest_as_ignored() -> None:
    mapped = sendgrid_events(sendgrid_batch())

    assert [item.outcome for item in mapped.items] == [
        ItemOutcome.IGNORED,  # processed
        *[ItemOutcome.MAPPED] * 5,
        ItemOutcome.IGNORED,  # deferred
        ItemOutcome.IGNORED,  # dropped
        *[ItemOutcome.MAPPED] * 3,
    ]
    assert [item.index for item in mapped.items] == list(range(11))
    assert [e.WhichOneof("payload") for e in mapped.events] == [
        "email_delivered",
        "email_opened",
        "email_clicked",
        "email_bounced",
        "email_bounced",
        "email_unsubscribed",
        "email_unsubscribed",
        "email_spam_reported",
    ]
    for e in mapped.events:
        assert e.source == ingest_pb2.EVENT_SOURCE_EMAIL
        assert e.customer == ingest_pb2.CustomerIdentifiers(email="Ada@Example.com")
        assert e.occurred_at.seconds == 1795000000

    delivered, opened, clicked, hard, soft = mapped.events[:5]
    assert delivered.event_id == "sendgrid:ZGVsaXZlcmVkLTAtMjQ5NDY4NjgtVWxjYnFq"
    assert delivered.email_delivered.message == ingest_pb2.EmailMessage(
        message_id="14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0", campaign_id="black-friday-26"
    )
    assert not delivered.HasField("context")  # a delivery's ip is SendGrid's server
    assert opened.email_opened.message.campaign_id == "42"
    assert (opened.context.ip, opened.context.user_agent) == (
        "255.255.255.255",
        "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0",
    )
    assert clicked.email_clicked.url == "https://shop.example.com/sale?utm_source=email"
    assert clicked.email_clicked.message.campaign_id == ""
    assert clicked.context.ip == "2001:db8::1"
    assert hard.email_bounced.bounce_type == ingest_pb2.BOUNCE_TYPE_HARD
    assert hard.email_bounced.reason.startswith("550 5.1.1")
    assert soft.email_bounced.bounce_type == ingest_pb2.BOUNCE_TYPE_SOFT


@pytest.mark.parametrize(
    ("bounce_type", "expected"),
    [
        ("bounce", ingest_pb2.BOUNCE_TYPE_HARD),
        ("blocked", ingest_pb2.BOUNCE_TYPE_SOFT),
        (None, ingest_pb2.BOUNCE_TYPE_HARD),  # before SendGrid sent a type, bounces were permanent
        ("expired", ingest_pb2.BOUNCE_TYPE_UNSPECIFIED),  # unknown: ingest rejects this one event
    ],
)
def test_bounce_classification(bounce_type: str | None, expected: int) -> None:
    raw = {
        "event": "bounce",
        "email": "a@example.com",
        "timestamp": 1,
        "sg_event_id": "x",
        "sg_message_id": "m",
    }
    if bounce_type is not None:
        raw["type"] = bounce_type
    [event] = sendgrid_events([raw]).events
    assert event.email_bounced.bounce_type == expected


def test_unknown_sendgrid_types_are_unknown_and_known_unmodelled_ones_ignored() -> None:
    unknown = {"event": "account_status_change", "timestamp": 1}
    mapped = sendgrid_events([unknown, {"event": "group_resubscribe"}])
    assert [(i.outcome, i.type) for i in mapped.items] == [
        (ItemOutcome.UNKNOWN_TYPE, "account_status_change"),
        (ItemOutcome.IGNORED, "group_resubscribe"),
    ]
    assert (mapped.items[0].raw, mapped.events) == (unknown, [])


def test_sendgrid_event_ids_that_an_event_id_cannot_hold_are_hashed_deterministically() -> None:
    raw = {
        "event": "open",
        "email": "a@example.com",
        "timestamp": 1,
        "sg_event_id": "rbtnWrG1DVDGGGFHFyun0A==",
    }
    [first] = sendgrid_events([raw]).events
    [again] = sendgrid_events([copy.deepcopy(raw)]).events
    assert first.event_id.startswith("sendgrid:h:")
    assert first.event_id == again.event_id
    [other] = sendgrid_events([{**raw, "sg_event_id": "rbtnWrG1DVDGGGFHFyun0B=="}]).events
    assert other.event_id != first.event_id


def test_a_sendgrid_event_without_an_id_leaves_the_id_to_ingest() -> None:
    [event] = sendgrid_events([{"event": "open", "email": "a@example.com", "timestamp": 1}]).events
    assert event.event_id == ""


def test_a_sendgrid_body_that_is_not_an_array_is_refused_whole() -> None:
    with pytest.raises(WebhookPayloadError, match="body: must be a JSON array"):
        sendgrid_events({"event": "open"})


GOOD_OPEN = {"event": "open", "email": "a@example.com", "timestamp": 1795000000, "sg_event_id": "good-1"}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("open", r"body\[1\]: must be an object"),
        ({"email": "a@example.com"}, r"body\[1\]\.event: required"),
        ({"event": 7}, r"body\[1\]\.event: required"),
        ({"event": "open", "timestamp": "1795000000"}, r"body\[1\]\.timestamp: must be an integer"),
        (
            {"event": "open", "timestamp": 1, "email": ["a@example.com"]},
            r"body\[1\]\.email: must be a string",
        ),
        # Past what a Timestamp holds: once a ValueError deep in protobuf, and an HTTP 500.
        ({"event": "open", "timestamp": 10**15}, r"body\[1\]\.timestamp: must be between"),
        ({"event": "open", "timestamp": 2**63}, r"body\[1\]\.timestamp: must be between"),
        ({"event": "open", "timestamp": Decimal("1E+400")}, r"body\[1\]\.timestamp: must be an integer"),
        (
            {"event": "click", "timestamp": 1, "url": "javascript:alert(1)"},
            r"body\[1\]\.url: must be an http",
        ),
    ],
)
def test_a_malformed_sendgrid_event_fails_alone(bad: Any, message: str) -> None:
    mapped = sendgrid_events([GOOD_OPEN, bad, {**GOOD_OPEN, "sg_event_id": "good-2"}])
    good, malformed, also_good = mapped.items
    assert (good.outcome, also_good.outcome) == (ItemOutcome.MAPPED, ItemOutcome.MAPPED)
    assert [e.event_id for e in mapped.events] == ["sendgrid:good-1", "sendgrid:good-2"]
    assert (malformed.index, malformed.outcome, malformed.raw) == (1, ItemOutcome.MALFORMED, bad)
    assert re.search(message, malformed.problem)


def test_a_sendgrid_timestamp_may_be_a_json_number_with_an_exponent() -> None:
    [event] = sendgrid_events([{**GOOD_OPEN, "timestamp": Decimal("1.795E+9")}]).events
    assert event.occurred_at.seconds == 1_795_000_000


def test_an_item_is_mapped_again_as_a_delivery_would_map_it() -> None:
    order = order_payload()
    assert (
        map_item(Provider.SHOPIFY, "orders/paid", "", order).events
        == shopify_events("orders/create", WEBHOOK_ID, order).events
    )
    assert map_item(Provider.SHOPIFY, "products/create", "", {"id": 1}).outcome == ItemOutcome.UNKNOWN_TYPE
    again = map_item(Provider.SENDGRID, "open", "", GOOD_OPEN)
    assert (again.index, again.events) == (0, sendgrid_events([GOOD_OPEN]).events)


def test_the_quarantine_id_is_a_digest_of_the_item() -> None:
    first = quarantine_id(Provider.SENDGRID, "machine_open", {"event": "machine_open", "n": Decimal("1.50")})
    assert first == quarantine_id(
        Provider.SENDGRID, "machine_open", {"event": "machine_open", "n": Decimal("1.50")}
    )
    assert first.startswith("sendgrid:q:") and len(first) == len("sendgrid:q:") + 40
    assert first != quarantine_id(
        Provider.SENDGRID, "machine_open", {"event": "machine_open", "n": Decimal("1.5")}
    )
    assert first != quarantine_id(
        Provider.SHOPIFY, "machine_open", {"event": "machine_open", "n": Decimal("1.50")}
    )


# --- signatures -------------------------------------------------------------------------------

SECRET = "shpss_0123456789abcdef"


def test_shopify_signature_is_base64_hmac_sha256_of_the_raw_body() -> None:
    body = json.dumps(order_payload()).encode()
    # Computed independently, as Shopify's documentation describes it.
    expected = base64.b64encode(hmac.new(SECRET.encode(), body, hashlib.sha256).digest()).decode()
    assert shopify_hmac(SECRET, body) == expected
    verify_shopify_signature(SECRET, {"X-Shopify-Hmac-Sha256": expected}, body)
    verify_shopify_signature(SECRET, {"x-shopify-hmac-sha256": expected}, body)  # any header case


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing X-Shopify-Hmac-Sha256"),
        ({"X-Shopify-Hmac-Sha256": "bm90IHRoZSBzaWduYXR1cmU="}, "does not match"),
        ({"X-Shopify-Hmac-Sha256": "ünicode"}, "does not match"),
    ],
)
def test_a_bad_shopify_signature_is_refused(headers: dict[str, str], message: str) -> None:
    with pytest.raises(WebhookSignatureError, match=message):
        verify_shopify_signature(SECRET, headers, b"{}")


def test_a_shopify_signature_header_that_is_not_utf8_is_refused_not_a_crash() -> None:
    """Found by tests/fuzz: aiohttp decodes header bytes that are not UTF-8 into lone surrogates,
    and encoding the header raised UnicodeEncodeError (a 500) instead of refusing it (a 401)."""
    for value in ("\udcff", "\ud800", "é" + shopify_hmac(SECRET, b"{}")):
        with pytest.raises(WebhookSignatureError, match="does not match"):
            verify_shopify_signature(SECRET, {"X-Shopify-Hmac-Sha256": value}, b"{}")


def test_a_shopify_signature_of_another_body_or_secret_is_refused() -> None:
    body = b'{"id": 1}'
    with pytest.raises(WebhookSignatureError):
        verify_shopify_signature(SECRET, {"X-Shopify-Hmac-Sha256": shopify_hmac(SECRET, b'{"id": 2}')}, body)
    with pytest.raises(WebhookSignatureError):
        verify_shopify_signature(SECRET, {"X-Shopify-Hmac-Sha256": shopify_hmac("other", body)}, body)


NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
MAX_AGE = timedelta(minutes=5)


def sendgrid_keys() -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A key pair as SendGrid makes one; the public key as its UI shows it (base64 DER)."""
    private = ec.generate_private_key(ec.SECP256R1())
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, base64.b64encode(der).decode()


def sendgrid_headers(private: ec.EllipticCurvePrivateKey, body: bytes, at: datetime = NOW) -> dict[str, str]:
    timestamp = str(int(at.timestamp()))
    signature = private.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
    }


def test_a_sendgrid_signature_over_timestamp_and_body_verifies() -> None:
    private, public_b64 = sendgrid_keys()
    key = load_sendgrid_public_key(public_b64)
    body = json.dumps(sendgrid_batch()).encode()
    verify_sendgrid_signature(key, sendgrid_headers(private, body), body, NOW, MAX_AGE)
    lower = {k.lower(): v for k, v in sendgrid_headers(private, body).items()}
    verify_sendgrid_signature(key, lower, body, NOW, MAX_AGE)


def test_a_tampered_sendgrid_body_or_timestamp_is_refused() -> None:
    private, public_b64 = sendgrid_keys()
    key = load_sendgrid_public_key(public_b64)
    body = json.dumps(sendgrid_batch()).encode()
    headers = sendgrid_headers(private, body)
    with pytest.raises(WebhookSignatureError, match="does not match"):
        verify_sendgrid_signature(key, headers, body.replace(b"Ada", b"Eve"), NOW, MAX_AGE)
    moved = {**headers, "X-Twilio-Email-Event-Webhook-Timestamp": str(int(NOW.timestamp()) + 1)}
    with pytest.raises(WebhookSignatureError, match="does not match"):
        verify_sendgrid_signature(key, moved, body, NOW, MAX_AGE)
    other_key = load_sendgrid_public_key(sendgrid_keys()[1])
    with pytest.raises(WebhookSignatureError, match="does not match"):
        verify_sendgrid_signature(other_key, headers, body, NOW, MAX_AGE)


@pytest.mark.parametrize("offset", [timedelta(minutes=-5, seconds=-1), timedelta(minutes=5, seconds=1)])
def test_a_sendgrid_signature_outside_the_tolerance_is_refused(offset: timedelta) -> None:
    private, public_b64 = sendgrid_keys()
    body = b"[]"
    headers = sendgrid_headers(private, body, at=NOW + offset)
    with pytest.raises(WebhookSignatureError, match="more than 300s from now"):
        verify_sendgrid_signature(load_sendgrid_public_key(public_b64), headers, body, NOW, MAX_AGE)


def test_a_sendgrid_signature_at_the_edge_of_the_tolerance_verifies() -> None:
    private, public_b64 = sendgrid_keys()
    headers = sendgrid_headers(private, b"[]", at=NOW - MAX_AGE)
    verify_sendgrid_signature(load_sendgrid_public_key(public_b64), headers, b"[]", NOW, MAX_AGE)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"X-Twilio-Email-Event-Webhook-Signature": ""}, "missing X-Twilio-Email-Event-Webhook-Signature"),
        ({"X-Twilio-Email-Event-Webhook-Timestamp": ""}, "missing X-Twilio-Email-Event-Webhook-Timestamp"),
        ({"X-Twilio-Email-Event-Webhook-Timestamp": "2026-11-24"}, "must be unix seconds"),
        ({"X-Twilio-Email-Event-Webhook-Signature": "not base64!"}, "is not base64"),
        ({"X-Twilio-Email-Event-Webhook-Signature": "AAAA"}, "does not match"),
    ],
)
def test_malformed_sendgrid_signature_headers_are_refused(change: dict[str, str], message: str) -> None:
    private, public_b64 = sendgrid_keys()
    headers = {**sendgrid_headers(private, b"[]"), **change}
    with pytest.raises(WebhookSignatureError, match=message):
        verify_sendgrid_signature(load_sendgrid_public_key(public_b64), headers, b"[]", NOW, MAX_AGE)


def test_the_verification_key_may_be_pem_too() -> None:
    private, _ = sendgrid_keys()
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key = load_sendgrid_public_key(pem.decode())
    verify_sendgrid_signature(key, sendgrid_headers(private, b"[]"), b"[]", NOW, MAX_AGE)


def test_an_unusable_verification_key_is_a_configuration_error() -> None:
    rsa_der = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    p384_der = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    for key in ("not base64!", base64.b64encode(b"not a key").decode()):
        with pytest.raises(ValueError, match="cannot be loaded"):
            load_sendgrid_public_key(key)
    for der in (rsa_der, p384_der):
        with pytest.raises(ValueError, match="ECDSA P-256"):
            load_sendgrid_public_key(base64.b64encode(der).decode())
