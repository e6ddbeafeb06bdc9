"""Segment HTTP Tracking API calls mapped to ingest events (services/ingest/segment.py).

The payloads are shaped as segment-analytics-python 2.x sends them: each call with messageId
(a uuid4), timestamp (isoformat with milliseconds), context.library and integrations; the
batch envelope with sentAt and writeKey.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.envelope import stamp
from ingest.segment import (
    CALL_TYPES,
    MAX_BATCH_BYTES,
    MAX_CALL_BYTES,
    CallOutcome,
    MappedRequest,
    custom_event_name,
    map_batch,
    map_call,
)
from ingest.validation import EVENT_ID_PATTERN, ValidationRules, validate_event
from sendtime.ingest.v1 import ingest_pb2
from sendtime_common import json_input

KEY_ID = "k3yId0000001"
TIMESTAMP = "2026-11-24T12:00:00.250+00:00"
SENT_AT = "2026-11-24T12:00:03.250000+00:00"
# The server's clock is 2 s ahead of the sender's: the call took 1 s to arrive... by the server.
RECEIVED_AT = datetime(2026, 11, 24, 12, 0, 5, 250000, tzinfo=UTC)
LIBRARY = {"name": "analytics-python", "version": "2.3.4"}


def segment_call(
    call_type: str, message_id: str = "4c5d7e1a-9b1f-4f39-8f0e-2a1b3c4d5e6f", **fields: Any
) -> dict[str, Any]:
    """A call as analytics-python's Client._enqueue leaves it (None values cleaned out)."""
    call: dict[str, Any] = {
        "integrations": {},
        "anonymousId": "6f2b9a8e-anon",
        "timestamp": TIMESTAMP,
        "context": {"library": dict(LIBRARY)},
        "userId": "ada",
        "type": call_type,
        "messageId": message_id,
    }
    call.update(fields)
    return {k: v for k, v in call.items() if v is not None}


def track(event: str, properties: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    return segment_call("track", event=event, properties=properties or {}, **fields)


def batch_body(*calls: Any, **fields: Any) -> dict[str, Any]:
    """The body request.post sends to /v1/batch."""
    return {"batch": list(calls), "sentAt": SENT_AT, "writeKey": "wk_secret_value", **fields}


def mapped(body: dict[str, Any], default_currency: str = "") -> MappedRequest:
    """A batch body through JSON bytes and json_input, as the HTTP layer will hand it over."""
    parsed = json_input.parse_json(json.dumps(body).encode())
    return map_batch(parsed, received_at=RECEIVED_AT, key_id=KEY_ID, default_currency=default_currency)


def one_event(body: dict[str, Any], default_currency: str = "") -> ingest_pb2.Event:
    result = mapped(body, default_currency)
    assert [i.outcome for i in result.items] == [CallOutcome.ACCEPTED], result.items
    (event,) = result.events
    return event


def assert_ingest_accepts(event: ingest_pb2.Event) -> None:
    stamped = stamp(event, RECEIVED_AT)
    assert validate_event(stamped, RECEIVED_AT, ValidationRules()) == []


def reason(result: MappedRequest, index: int = 0) -> tuple[str, str]:
    item = result.items[index]
    assert item.outcome == CallOutcome.REJECTED
    assert item.reason is not None
    return item.reason.field, item.reason.description


# --- limits, envelope -----------------------------------------------------------------------


def test_segment_limits_are_exported() -> None:
    assert MAX_CALL_BYTES == 32 * 1024
    assert MAX_BATCH_BYTES == 500 * 1024
    assert CALL_TYPES == {"track", "identify", "page", "screen", "alias", "group"}


def test_an_order_completed_from_analytics_python_maps_field_by_field() -> None:
    props = {
        "order_id": "50314b8e9bcf000000000000",
        "total": 27.50,
        "revenue": 25.00,
        "currency": "USD",
        "products": [
            {
                "product_id": "507f1f77bcf86cd799439011",
                "sku": "45790-32",
                "name": "Monopoly",
                "price": 19,
                "quantity": 1,
            },
            {
                "product_id": "505bd76785ebb509fc183733",
                "sku": "46493-32",
                "name": "Uno",
                "price": 3.25,
                "quantity": 2,
            },
        ],
    }
    event = one_event(batch_body(track("Order Completed", props)))
    assert event.event_id == f"segment:{KEY_ID}:4c5d7e1a-9b1f-4f39-8f0e-2a1b3c4d5e6f"
    assert event.customer == ingest_pb2.CustomerIdentifiers(user_id="ada", anonymous_id="6f2b9a8e-anon")
    assert event.source == ingest_pb2.EVENT_SOURCE_SERVER
    assert event.occurred_at.ToJsonString() == "2026-11-24T12:00:00.250Z"
    assert event.sent_at.ToJsonString() == "2026-11-24T12:00:03.250Z"
    order = event.order_completed
    assert order.order_id == "50314b8e9bcf000000000000"
    assert (order.total.currency_code, order.total.units, order.total.nanos) == ("USD", 27, 500_000_000)
    assert [(line.sku, line.name, line.quantity) for line in order.lines] == [
        ("45790-32", "Monopoly", 1),
        ("46493-32", "Uno", 2),
    ]
    assert (order.lines[1].unit_price.units, order.lines[1].unit_price.nanos) == (3, 250_000_000)
    assert_ingest_accepts(event)


def test_clock_skew_is_corrected_by_ingest_as_segment_does() -> None:
    event = one_event(batch_body(track("Signed Up")))
    stamped = stamp(event, RECEIVED_AT)
    # occurred_at = timestamp + (receivedAt - sentAt): the sender's clock is 2 s behind.
    expected = datetime(2026, 11, 24, 12, 0, 0, 250000, tzinfo=UTC) + (
        RECEIVED_AT - datetime(2026, 11, 24, 12, 0, 3, 250000, tzinfo=UTC)
    )
    assert stamped.occurred_at.ToDatetime(tzinfo=UTC) == expected
    assert stamped.original_occurred_at.ToJsonString() == "2026-11-24T12:00:00.250Z"


def test_a_calls_own_sent_at_wins_over_the_batchs() -> None:
    call = track("Signed Up", sentAt="2026-11-24T12:00:04.000Z")
    event = one_event(batch_body(call))
    assert event.sent_at.ToJsonString() == "2026-11-24T12:00:04Z"


def test_a_retry_with_a_new_sent_at_is_the_same_event() -> None:
    first = one_event(batch_body(track("Signed Up")))
    retry = one_event(batch_body(track("Signed Up"), sentAt="2026-11-24T12:00:09.000+00:00"))
    assert first.event_id == retry.event_id
    assert first.occurred_at == retry.occurred_at


def test_original_timestamp_is_used_without_timestamp_and_receipt_time_without_either() -> None:
    call = track("Signed Up", timestamp=None, originalTimestamp="2026-11-24T11:59:00Z")
    assert one_event(batch_body(call)).occurred_at.ToJsonString() == "2026-11-24T11:59:00Z"
    untimed = one_event(batch_body(track("Signed Up", timestamp=None), sentAt=None))
    assert untimed.occurred_at.ToDatetime(tzinfo=UTC) == RECEIVED_AT
    assert not untimed.HasField("sent_at")


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("yesterday", "must be an ISO 8601 time"),
        ("2026-11-24T12:00:00", "must carry a UTC offset"),
        (1732449600, "must be a string"),
    ],
)
def test_a_bad_timestamp_rejects_the_call(value: Any, problem: str) -> None:
    result = mapped(batch_body(track("Signed Up", timestamp=value)))
    assert reason(result) == ("batch[0].timestamp", problem)


def test_a_bad_sent_at_on_the_envelope_refuses_the_request() -> None:
    result = mapped(batch_body(track("Signed Up"), sentAt="soon"))
    assert result.items == ()
    assert result.problem is not None and result.problem.field == "sentAt"


# --- e-commerce -------------------------------------------------------------------------------

PRODUCT = {
    "product_id": "507f1f77bcf86cd799439011",
    "sku": "G-32",
    "category": "Games",
    "name": "Monopoly: 3rd Edition",
    "brand": "Hasbro",
    "variant": "200 pieces",
    "price": 18.99,
    "quantity": 1,
    "currency": "EUR",
    "url": "https://www.example.com/product/path",
    "image_url": "https://www.example.com/product/path.jpg",
}


@pytest.mark.parametrize(
    ("name", "properties", "payload", "check"),
    [
        (
            "Product Viewed",
            PRODUCT,
            "product_viewed",
            lambda p: (
                (p.sku, p.name, p.category, p.url, p.price.currency_code, p.price.units, p.price.nanos)
                == ("G-32", "Monopoly: 3rd Edition", "Games", PRODUCT["url"], "EUR", 18, 990_000_000)
            ),
        ),
        (
            "Product Added",
            {**PRODUCT, "cart_id": "skdjsidjsdkdj29j", "quantity": 2},
            "cart_item_added",
            lambda p: (p.sku, p.quantity, p.unit_price.units) == ("G-32", 2, 18),
        ),
        (
            "Product Removed",
            {**PRODUCT, "cart_id": "skdjsidjsdkdj29j"},
            "cart_item_removed",
            lambda p: (p.sku, p.quantity) == ("G-32", 1),
        ),
        (
            "Checkout Started",
            {
                "order_id": "50314b8e9bcf000000000000",
                "value": 30,
                "revenue": 25,
                "currency": "USD",
                "products": [{"product_id": "p1", "sku": "45790-32", "price": 19, "quantity": 1}],
            },
            "checkout_started",
            lambda p: (
                (p.checkout_id, p.total.units, p.total.currency_code, len(p.lines))
                == ("50314b8e9bcf000000000000", 30, "USD", 1)
            ),
        ),
        (
            "Order Refunded",
            {"order_id": "50314b8e9bcf000000000000", "total": 30, "currency": "USD"},
            "order_refunded",
            lambda p: (
                (p.order_id, p.amount.units, p.refund_id.startswith("segment:"))
                == ("50314b8e9bcf000000000000", 30, True)
            ),
        ),
        (
            "Order Cancelled",
            {"order_id": "50314b8e9bcf000000000000", "total": 30, "currency": "USD", "reason": "customer"},
            "order_cancelled",
            lambda p: (p.order_id, p.reason) == ("50314b8e9bcf000000000000", "customer"),
        ),
        (
            "Products Searched",
            {"query": "blue roses"},
            "product_searched",
            lambda p: p.query == "blue roses",
        ),
    ],
)
def test_each_ecommerce_event_maps_to_its_ingest_type(
    name: str, properties: dict[str, Any], payload: str, check: Any
) -> None:
    event = one_event(batch_body(track(name, properties)))
    assert event.WhichOneof("payload") == payload
    assert check(getattr(event, payload))
    assert_ingest_accepts(event)


@pytest.mark.parametrize(
    ("name", "custom"), [("Cart Viewed", "cart_viewed"), ("Order Updated", "order_updated")]
)
def test_ecommerce_events_without_a_counterpart_are_custom_events(name: str, custom: str) -> None:
    props = {
        "cart_id": "d92jd",
        "order_id": "o-1",
        "products": [{"product_id": "p1", "sku": "G-32", "price": 19}],
    }
    event = one_event(batch_body(track(name, props)))
    assert event.custom.name == custom
    as_dict = json_format.MessageToDict(event.custom.properties)
    assert as_dict["products"] == [{"product_id": "p1", "sku": "G-32", "price": 19.0}]
    assert_ingest_accepts(event)


@pytest.mark.parametrize("name", ["order completed", "ORDER COMPLETED", "  Order   Completed "])
def test_ecommerce_names_match_case_insensitively(name: str) -> None:
    event = one_event(batch_body(track(name, {"order_id": "o-1", "total": "10.00", "currency": "EUR"})))
    assert event.WhichOneof("payload") == "order_completed"


def test_product_id_stands_in_for_a_missing_sku_and_quantity_defaults_to_one() -> None:
    props = {"product_id": 507, "price": "5.00", "currency": "EUR"}
    added = one_event(batch_body(track("Product Added", props))).cart_item_added
    assert (added.sku, added.quantity) == ("507", 1)


def test_a_product_without_sku_or_product_id_is_rejected() -> None:
    result = mapped(batch_body(track("Product Viewed", {"name": "Mystery"})))
    assert reason(result) == ("batch[0].properties.sku", "required (sku or product_id)")


def test_money_without_a_currency_uses_the_default_else_is_rejected() -> None:
    call = track("Product Added", {"sku": "G-32", "price": "18.99"})
    assert (
        one_event(batch_body(call), default_currency="EUR").cart_item_added.unit_price.currency_code == "EUR"
    )
    field, description = reason(mapped(batch_body(call)))
    assert field == "batch[0].properties.currency"
    assert "no currency" in description


def test_a_currency_that_is_not_iso_4217_is_rejected() -> None:
    result = mapped(batch_body(track("Product Viewed", {"sku": "G-32", "price": 1, "currency": "BTC"})))
    assert reason(result)[0] == "batch[0].properties.currency"


def test_an_invalid_default_currency_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="ISO 4217"):
        map_call("track", {}, received_at=RECEIVED_AT, key_id=KEY_ID, default_currency="EURO")


@pytest.mark.parametrize(
    ("price", "problem"),
    [
        ("abc", 'must be a decimal amount such as "19.99"'),
        (-5, "must not be negative"),
        ("1e40", "too large"),
        ("0.0000000001", "more than 9 decimal places"),
        (True, 'must be a decimal amount such as "19.99"'),
        ({"amount": 5}, 'must be a decimal amount such as "19.99"'),
    ],
)
def test_a_bad_price_rejects_the_call_naming_the_field(price: Any, problem: str) -> None:
    result = mapped(batch_body(track("Product Added", {"sku": "G-32", "price": price, "currency": "EUR"})))
    assert reason(result) == ("batch[0].properties.price", problem)


def test_non_finite_numbers_are_rejected_whatever_the_parser() -> None:
    for price in (float("nan"), float("inf")):
        call = track("Product Added", {"sku": "G-32", "price": price, "currency": "EUR"})
        result = map_call("track", call, received_at=RECEIVED_AT, key_id=KEY_ID)
        assert reason(result) == ("properties.price", "must be a finite amount")
    custom = map_call(
        "track", track("Scored", {"points": float("nan")}), received_at=RECEIVED_AT, key_id=KEY_ID
    )
    assert reason(custom) == ("properties.points", "must be a finite number")


def test_a_float_price_from_json_loads_is_read_as_its_shortest_decimal() -> None:
    call = track("Product Added", {"sku": "G-32", "price": 18.99, "currency": "EUR"})
    result = map_call("track", call, received_at=RECEIVED_AT, key_id=KEY_ID)
    price = result.events[0].cart_item_added.unit_price
    assert (price.units, price.nanos) == (18, 990_000_000)


def test_an_order_total_falls_back_to_value_revenue_then_the_products() -> None:
    products = [{"sku": "a", "price": "2.50", "quantity": 3}, {"sku": "b", "price": "1.25"}]
    props = {"order_id": "o-1", "currency": "EUR", "products": products}
    total = one_event(batch_body(track("Order Completed", props))).order_completed.total
    assert (total.units, total.nanos) == (8, 750_000_000)
    revenue = one_event(batch_body(track("Order Completed", {**props, "revenue": 7}))).order_completed.total
    assert revenue.units == 7
    unpriced = mapped(batch_body(track("Order Completed", {"order_id": "o-1", "currency": "EUR"})))
    assert reason(unpriced)[0] == "batch[0].properties.total"


def test_a_refund_sent_negative_is_its_amount_and_keeps_its_own_refund_id() -> None:
    props = {"order_id": "o-1", "total": -30, "currency": "USD", "refund_id": "r-7"}
    refund = one_event(batch_body(track("Order Refunded", props))).order_refunded
    assert (refund.amount.units, refund.refund_id) == (30, "r-7")


def test_an_order_without_an_order_id_is_rejected() -> None:
    result = mapped(batch_body(track("Order Completed", {"total": 5, "currency": "EUR"})))
    assert reason(result) == ("batch[0].properties.order_id", "required")


@pytest.mark.parametrize("quantity", [0, -1, 1.5, "2", 10_000_000])
def test_a_bad_quantity_is_rejected(quantity: Any) -> None:
    result = mapped(batch_body(track("Product Removed", {"sku": "G-32", "quantity": quantity})))
    assert reason(result)[0] == "batch[0].properties.quantity"


def test_a_product_url_that_is_not_http_is_rejected() -> None:
    result = mapped(batch_body(track("Product Viewed", {"sku": "G-32", "url": "javascript:alert(1)"})))
    assert reason(result) == ("batch[0].properties.url", "must be an http or https URL")


# --- custom events ---------------------------------------------------------------------------


def test_other_track_events_are_custom_events_with_their_properties() -> None:
    props = {
        "title": "Intro",
        "length_s": 94,
        "plan": {"name": "pro", "seats": [1, 2]},
        "ok": True,
        "none": None,
    }
    event = one_event(batch_body(track("Video Played", props)))
    assert event.custom.name == "video_played"
    assert json_format.MessageToDict(event.custom.properties) == {
        "title": "Intro",
        "length_s": 94.0,
        "plan": {"name": "pro", "seats": [1.0, 2.0]},
        "ok": True,
        "none": None,
    }
    assert_ingest_accepts(event)


@pytest.mark.parametrize(
    ("name", "custom"),
    [
        ("Video Played", "video_played"),
        ("videoPlayed", "video_played"),
        ("Commande passée", "commande_passee"),
        ("2FA Enabled", "event_2fa_enabled"),
        ("  --  ", ""),
        ("x" * 65, ""),
    ],
)
def test_custom_event_names(name: str, custom: str) -> None:
    assert custom_event_name(name) == custom


def test_a_name_that_makes_no_custom_name_is_rejected() -> None:
    result = mapped(batch_body(track("🎉")))
    assert reason(result)[0] == "batch[0].event"


@pytest.mark.parametrize(
    ("properties", "field"),
    [
        ({"Plan Type": "pro"}, 'batch[0].properties["Plan Type"]'),
        ({f"p{i}": i for i in range(51)}, "batch[0].properties"),
        ({"deep": {"a": {"b": {"c": {"d": 1}}}}}, "batch[0].properties.deep.a.b.c"),
        ({"long": "x" * 1025}, "batch[0].properties.long"),
        ({"nul": "a\x00b"}, "batch[0].properties.nul"),
        ({"huge": 10**400}, "batch[0].properties.huge"),
    ],
)
def test_properties_beyond_ingests_limits_are_rejected_with_their_path(
    properties: dict[str, Any], field: str
) -> None:
    result = map_batch(batch_body(track("Scored", properties)), received_at=RECEIVED_AT, key_id=KEY_ID)
    assert reason(result)[0] == field


def test_properties_nested_three_levels_are_kept() -> None:
    event = one_event(batch_body(track("Scored", {"deep": {"a": {"b": [1]}}})))
    assert_ingest_accepts(event)


# --- identify, page, screen, alias, group --------------------------------------------------


def test_identify_maps_traits_and_takes_the_email_as_an_identifier() -> None:
    traits = {
        "email": "Ada@Example.com",
        "firstName": "Ada",
        "lastName": "Lovelace",
        "createdAt": "2026-01-01T00:00:00Z",
        "plan": "pro",
        "address": {"city": "London", "postalCode": "W1"},
    }
    event = one_event(batch_body(segment_call("identify", traits=traits)))
    assert event.customer.email == "Ada@Example.com"
    assert json_format.MessageToDict(event.identify.traits) == {
        "email": "Ada@Example.com",
        "first_name": "Ada",
        "last_name": "Lovelace",
        "created_at": "2026-01-01T00:00:00Z",
        "plan": "pro",
        "address": {"city": "London", "postalCode": "W1"},
    }
    assert_ingest_accepts(event)


def test_a_snake_case_trait_wins_over_its_camel_case_twin() -> None:
    event = one_event(batch_body(segment_call("identify", traits={"firstName": "A", "first_name": "Ada"})))
    assert json_format.MessageToDict(event.identify.traits) == {"first_name": "Ada"}


def test_an_identify_with_traits_only_in_its_context_as_rudderstack_sends_it_maps_them() -> None:
    context = {"library": LIBRARY, "traits": {"email": "ada@example.com", "lastName": "Lovelace"}}
    event = one_event(batch_body(segment_call("identify", traits=None, context=context)))
    assert event.customer.email == "ada@example.com"
    assert json_format.MessageToDict(event.identify.traits) == {
        "email": "ada@example.com",
        "last_name": "Lovelace",
    }
    context["traits"] = {"p": "x" * 1025}
    result = mapped(batch_body(segment_call("identify", traits=None, context=context)))
    assert reason(result)[0] == "batch[0].context.traits.p"


def test_identify_without_traits_links_its_identifiers() -> None:
    event = one_event(batch_body(segment_call("identify", traits={})))
    assert event.WhichOneof("payload") == "alias"
    assert event.customer == ingest_pb2.CustomerIdentifiers(user_id="ada")
    assert event.alias.other == ingest_pb2.CustomerIdentifiers(anonymous_id="6f2b9a8e-anon")
    assert_ingest_accepts(event)
    lone = mapped(batch_body(segment_call("identify", anonymousId=None)))
    assert lone.items[0].outcome == CallOutcome.ACCEPTED and lone.events == []


def test_a_track_takes_the_email_from_context_traits() -> None:
    context = {"library": LIBRARY, "traits": {"email": "ada@example.com"}}
    assert one_event(batch_body(track("Signed Up", context=context))).customer.email == "ada@example.com"


def test_a_call_needs_a_user_id_or_an_anonymous_id() -> None:
    result = mapped(batch_body(track("Signed Up", userId=None, anonymousId=None)))
    assert reason(result) == ("batch[0].userId", "userId or anonymousId is required")
    only_anonymous = one_event(batch_body(track("Signed Up", userId=None)))
    assert only_anonymous.customer == ingest_pb2.CustomerIdentifiers(anonymous_id="6f2b9a8e-anon")


def test_a_page_with_a_url_is_a_page_view() -> None:
    props = {"title": "Shoes", "url": "https://shop.example.com/shoes", "referrer": "android-app://x"}
    context = {
        "library": {"name": "analytics.js", "version": "2.11.1"},
        "page": {"referrer": "https://a.example/"},
    }
    event = one_event(batch_body(segment_call("page", name="Shoes page", properties=props, context=context)))
    assert event.page_viewed == ingest_pb2.PageViewed(url="https://shop.example.com/shoes", title="Shoes")
    assert event.source == ingest_pb2.EVENT_SOURCE_WEB
    assert_ingest_accepts(event)


def test_a_page_takes_its_url_and_referrer_from_context_page() -> None:
    context = {
        "library": LIBRARY,
        "page": {"url": "https://shop.example.com/", "referrer": "https://a.example/"},
    }
    page = one_event(
        batch_body(segment_call("page", name="Home", properties={}, context=context))
    ).page_viewed
    assert (page.url, page.title, page.referrer) == (
        "https://shop.example.com/",
        "Home",
        "https://a.example/",
    )


def test_a_page_without_a_url_and_a_screen_are_custom_events() -> None:
    page = one_event(
        batch_body(segment_call("page", name="Docs", category="Help", properties={"path": "/d"}))
    )
    assert page.custom.name == "page"
    assert json_format.MessageToDict(page.custom.properties) == {
        "path": "/d",
        "name": "Docs",
        "category": "Help",
    }
    screen = one_event(batch_body(segment_call("screen", name="Cart", properties={"name": "Basket"})))
    assert screen.custom.name == "screen"
    assert json_format.MessageToDict(screen.custom.properties) == {"name": "Basket"}
    assert_ingest_accepts(screen)


def test_alias_links_the_previous_id_to_the_user_id() -> None:
    call = segment_call("alias", previousId="6f2b9a8e-anon", userId="ada", anonymousId=None)
    event = one_event(batch_body(call))
    assert event.customer == ingest_pb2.CustomerIdentifiers(user_id="ada")
    assert event.alias.other == ingest_pb2.CustomerIdentifiers(anonymous_id="6f2b9a8e-anon")
    assert_ingest_accepts(event)
    no_previous = mapped(batch_body(segment_call("alias", anonymousId=None)))
    assert reason(no_previous) == ("batch[0].previousId", "required")
    no_user = mapped(batch_body(segment_call("alias", previousId="x", userId=None)))
    assert reason(no_user) == ("batch[0].userId", "required for an alias")


def test_group_is_a_custom_event_with_the_group_id_and_its_traits() -> None:
    event = one_event(
        batch_body(segment_call("group", groupId=42, traits={"name": "Initech", "employees": 300}))
    )
    assert event.custom.name == "group"
    assert json_format.MessageToDict(event.custom.properties) == {
        "group_id": "42",
        "traits": {"name": "Initech", "employees": 300.0},
    }
    assert_ingest_accepts(event)
    assert reason(mapped(batch_body(segment_call("group")))) == ("batch[0].groupId", "required")


def test_context_fields_enrich_the_event_and_bad_ones_are_left_out() -> None:
    context = {
        "library": {"name": "analytics-ios", "version": "4.1.8"},
        "ip": "203.0.113.9",
        "userAgent": "Mozilla/5.0",
        "locale": "de_AT",
        "timezone": "Europe/Vienna",
    }
    event = one_event(batch_body(track("Signed Up", context=context)))
    assert event.source == ingest_pb2.EVENT_SOURCE_MOBILE_APP
    assert event.context == ingest_pb2.EventContext(
        ip="203.0.113.9", user_agent="Mozilla/5.0", locale="de-AT", timezone="Europe/Vienna"
    )
    bad = {"library": LIBRARY, "ip": "not-an-ip", "locale": "xx-XX-nope", "timezone": "Europe"}
    bad_event = one_event(batch_body(track("Signed Up", context=bad)))
    assert not bad_event.HasField("context")
    assert_ingest_accepts(bad_event)


# --- single calls ------------------------------------------------------------------------------


def test_map_call_maps_one_call_with_paths_from_the_body() -> None:
    call = track("Order Completed", {"order_id": "o-1", "total": "x", "currency": "EUR"}, writeKey="wk")
    result = map_call("track", call, received_at=RECEIVED_AT, key_id=KEY_ID)
    assert reason(result) == ("properties.total", 'must be a decimal amount such as "19.99"')
    ok = map_call("TRACK", track("Signed Up"), received_at=RECEIVED_AT, key_id=KEY_ID)
    assert [(i.index, i.type, i.outcome) for i in ok.items] == [(0, "track", CallOutcome.ACCEPTED)]


def test_map_call_takes_the_type_from_the_route() -> None:
    call = segment_call("identify", traits={"plan": "pro"})
    assert map_call("identify", call, received_at=RECEIVED_AT, key_id=KEY_ID).events[0].HasField("identify")
    unknown = map_call("batch", call, received_at=RECEIVED_AT, key_id=KEY_ID)
    assert reason(unknown)[0] == "type"
    assert reason(map_call("track", [1], received_at=RECEIVED_AT, key_id=KEY_ID)) == (
        "body",
        "must be an object",
    )


# --- event ids ------------------------------------------------------------------------------


def test_event_ids_are_the_message_id_under_the_key() -> None:
    event = one_event(batch_body(track("Signed Up", message_id="ajs-next-1700000000000-abc")))
    assert event.event_id == f"segment:{KEY_ID}:ajs-next-1700000000000-abc"
    other_key = map_batch(batch_body(track("Signed Up")), received_at=RECEIVED_AT, key_id="otherKey0001")
    assert other_key.events[0].event_id == "segment:otherKey0001:4c5d7e1a-9b1f-4f39-8f0e-2a1b3c4d5e6f"


@pytest.mark.parametrize("message_id", ["a b/c+d=", "x" * 200, "ü-123"])
def test_a_message_id_an_event_id_cannot_hold_is_hashed(message_id: str) -> None:
    event_id = one_event(batch_body(track("Signed Up", message_id=message_id))).event_id
    assert event_id.startswith(f"segment:{KEY_ID}:h:")
    assert EVENT_ID_PATTERN.match(event_id)
    assert one_event(batch_body(track("Signed Up", message_id=message_id))).event_id == event_id


def test_without_a_message_id_the_id_is_a_digest_of_the_call_without_transport_fields() -> None:
    call = track("Signed Up", message_id=None)
    first = one_event(batch_body(call)).event_id
    assert first.startswith(f"segment:{KEY_ID}:c:") and EVENT_ID_PATTERN.match(first)
    resent = map_call(
        "track",
        {**call, "sentAt": "2026-11-24T12:09:00Z", "writeKey": "rotated"},
        received_at=RECEIVED_AT,
        key_id=KEY_ID,
    )
    assert resent.events[0].event_id == first
    changed = one_event(batch_body(track("Signed Up", message_id=None, properties={"plan": "pro"}))).event_id
    assert changed != first


def test_an_odd_key_id_still_makes_valid_event_ids() -> None:
    result = map_batch(batch_body(track("Signed Up")), received_at=RECEIVED_AT, key_id="key with spaces")
    assert EVENT_ID_PATTERN.match(result.events[0].event_id)


# --- batches -------------------------------------------------------------------------------------


def test_each_call_of_a_batch_has_its_own_answer() -> None:
    body = batch_body(
        track("Signed Up"),
        "not a call",
        track("Product Added", {"sku": "G-32", "price": "1.00"}),
        segment_call("identify", traits={"plan": "pro"}),
        {**track("Signed Up"), "type": "unknown"},
        segment_call("track", event=None),
    )
    result = mapped(body)
    assert [(i.index, i.type, i.outcome) for i in result.items] == [
        (0, "track", CallOutcome.ACCEPTED),
        (1, "", CallOutcome.REJECTED),
        (2, "track", CallOutcome.REJECTED),
        (3, "identify", CallOutcome.ACCEPTED),
        (4, "unknown", CallOutcome.REJECTED),
        (5, "track", CallOutcome.REJECTED),
    ]
    assert reason(result, 1) == ("batch[1]", "must be an object")
    assert reason(result, 2)[0] == "batch[2].properties.currency"
    assert reason(result, 4)[0] == "batch[4].type"
    assert reason(result, 5) == ("batch[5].event", "required")
    assert len(result.events) == 2 and (result.accepted, result.rejected) == (2, 4)


def test_the_batchs_context_is_merged_into_each_call() -> None:
    web = {"library": {"name": "analytics.js", "version": "2.11.1"}, "ip": "203.0.113.9"}
    plain = {k: v for k, v in track("Signed Up").items() if k != "context"}
    own = track("Signed Up", context={"library": LIBRARY})
    result = mapped(batch_body(plain, own, context=web, integrations={"All": True}))
    assert [e.source for e in result.events] == [ingest_pb2.EVENT_SOURCE_WEB, ingest_pb2.EVENT_SOURCE_SERVER]
    assert [e.context.ip for e in result.events] == ["203.0.113.9", "203.0.113.9"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], "body"),
        ({"batch": {}}, "batch"),
        ({}, "batch"),
        ({"batch": [], "context": "web"}, "context"),
        ({"batch": [], "integrations": []}, "integrations"),
    ],
)
def test_a_body_that_is_not_a_batch_is_refused_whole(body: Any, field: str) -> None:
    result = map_batch(body, received_at=RECEIVED_AT, key_id=KEY_ID)
    assert result.items == ()
    assert result.problem is not None and result.problem.field == field


def test_a_call_of_a_batch_larger_than_32_kb_is_rejected() -> None:
    big = track("Signed Up", {f"p{i}": "x" * 1000 for i in range(40)})
    result = mapped(batch_body(big, track("Signed Up")))
    assert reason(result) == ("batch[0]", "larger than 32 KB")
    assert result.items[1].outcome == CallOutcome.ACCEPTED


# --- hostile input: nothing raises ---------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.decimals(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=25,
)
FIELD_NAMES = [
    "type",
    "userId",
    "anonymousId",
    "previousId",
    "groupId",
    "event",
    "name",
    "category",
    "messageId",
    "timestamp",
    "originalTimestamp",
    "sentAt",
    "context",
    "traits",
    "properties",
    "integrations",
]
PROPERTY_NAMES = [
    "sku",
    "product_id",
    "price",
    "quantity",
    "currency",
    "total",
    "value",
    "revenue",
    "order_id",
    "checkout_id",
    "cart_id",
    "refund_id",
    "url",
    "image_url",
    "products",
    "query",
    "reason",
    "email",
]
shaped_calls = st.fixed_dictionaries(
    {
        "type": st.sampled_from(sorted(CALL_TYPES)),
        "userId": st.sampled_from(["ada", 7]),
        "event": st.sampled_from(
            [
                "Order Completed",
                "Product Added",
                "Order Refunded",
                "Checkout Started",
                "Product Viewed",
                "Video Played",
            ]
        ),
        "timestamp": st.sampled_from([TIMESTAMP, "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"]),
    },
    optional={
        "properties": st.dictionaries(st.sampled_from(PROPERTY_NAMES), json_values, max_size=6),
        "traits": st.dictionaries(st.sampled_from(PROPERTY_NAMES + ["firstName"]), json_values, max_size=4),
        "context": st.dictionaries(
            st.sampled_from(["traits", "page", "library", "ip", "locale"]), json_values
        ),
        "messageId": json_values,
        "previousId": json_values,
        "groupId": json_values,
        "name": json_values,
        "sentAt": json_values,
    },
)


def _check_never_raises(result: MappedRequest) -> None:
    for item in result.items:
        assert item.error is None, item.error
        assert (item.outcome == CallOutcome.REJECTED) == (item.reason is not None)
    for event in result.events:
        # Ingest judges every accepted event without raising.
        validate_event(stamp(event, RECEIVED_AT), RECEIVED_AT, ValidationRules())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call_type=st.sampled_from(sorted(CALL_TYPES) + ["batch", ""]), payload=json_values)
def test_map_call_never_raises_on_any_json(call_type: str, payload: Any) -> None:
    _check_never_raises(map_call(call_type, payload, received_at=RECEIVED_AT, key_id=KEY_ID))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    payload=json_values
    | st.dictionaries(st.sampled_from(FIELD_NAMES), json_values)
    | st.builds(lambda calls: {"batch": calls}, st.lists(json_values, max_size=4))
)
def test_map_batch_never_raises_on_any_json(payload: Any) -> None:
    _check_never_raises(map_batch(payload, received_at=RECEIVED_AT, key_id=KEY_ID))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls=st.lists(shaped_calls, min_size=1, max_size=3), currency=st.sampled_from(["", "EUR", "JPY"]))
def test_calls_shaped_like_segments_with_any_values_never_raise(
    calls: list[dict[str, Any]], currency: str
) -> None:
    body = batch_body(*calls)
    _check_never_raises(map_batch(body, received_at=RECEIVED_AT, key_id=KEY_ID, default_currency=currency))
    for call in calls:
        result = map_call(
            call["type"], call, received_at=RECEIVED_AT, key_id=KEY_ID, default_currency=currency
        )
        _check_never_raises(result)


def test_deeply_nested_input_is_rejected_not_raised() -> None:
    deep: Any = "x"
    for _ in range(5000):
        deep = [deep]
    result = map_call("track", track("Scored", {"deep": deep}), received_at=RECEIVED_AT, key_id=KEY_ID)
    assert result.items[0].outcome == CallOutcome.REJECTED


def test_a_huge_timestamp_year_is_rejected() -> None:
    call = track("Signed Up", timestamp="0001-01-01T00:00:00+01:00")
    assert reason(mapped(batch_body(call)))[0] == "batch[0].timestamp"
    assert RECEIVED_AT - timedelta(days=1) < RECEIVED_AT  # the fixture clock is a plain UTC time
