from datetime import timedelta
from typing import Any

import pytest

from ingest.validation import validate_event
from sendtime.ingest.v1 import ingest_pb2
from tests.factories import NOW, cart_item_added, event, identify, money, order_completed, product_viewed

SKEW = timedelta(minutes=5)
CURRENCY_RULE = "must be an ISO 4217 currency code such as EUR or USD"


def fields(e: ingest_pb2.Event) -> dict[str, str]:
    return {v.field: v.description for v in validate_event(e, NOW, SKEW)}


def test_a_valid_event_has_no_violations() -> None:
    assert fields(event(user_id="u1", occurred_at=NOW, product_viewed=product_viewed("sku-1"))) == {}


def test_every_problem_of_an_event_is_reported_by_field() -> None:
    bad = ingest_pb2.Event(event_id="has space")
    assert fields(bad) == {
        "event_id": "must be 1 to 128 characters of letters, digits and . _ : -",
        "customer": "at least one of user_id, email, anonymous_id, crm_id, device_id is required",
        "occurred_at": "required",
        "source": "required",
        "payload": (
            "one of product_viewed, cart_item_added, cart_item_removed, order_completed, identify is required"
        ),
    }


def test_missing_event_id_is_required() -> None:
    assert (
        fields(event(event_id="", user_id="u", occurred_at=NOW, identify=identify(a=1)))["event_id"]
        == "required"
    )


def test_malformed_email_is_rejected_without_echoing_it() -> None:
    found = fields(event(email="not-an-email", occurred_at=NOW, identify=identify(a=1)))
    assert "customer.email" in found
    assert "not-an-email" not in found["customer.email"]


def test_occurred_at_too_far_in_the_future_is_rejected() -> None:
    found = fields(event(user_id="u", occurred_at=NOW + timedelta(minutes=6), identify=identify(a=1)))
    assert found == {"occurred_at": "is more than 300s in the future"}
    assert fields(event(user_id="u", occurred_at=NOW + timedelta(minutes=4), identify=identify(a=1))) == {}


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            {"cart_item_added": cart_item_added("s", quantity=0)},
            {"cart_item_added.quantity": "must be positive"},
        ),
        (
            {"cart_item_added": ingest_pb2.CartItemAdded(sku="s", quantity=1)},
            {"cart_item_added.unit_price": "required"},
        ),
        (
            {"cart_item_added": ingest_pb2.CartItemAdded(sku="s", quantity=1, unit_price=money("1", "EURO"))},
            {"cart_item_added.unit_price.currency_code": CURRENCY_RULE},
        ),
        ({"product_viewed": ingest_pb2.ProductViewed()}, {"product_viewed.sku": "required"}),
        (
            {"order_completed": ingest_pb2.OrderCompleted(total=money("5"))},
            {"order_completed.order_id": "required"},
        ),
        (
            {"order_completed": order_completed("o1", "-5")},
            {"order_completed.total": "must not be negative"},
        ),
        ({"identify": ingest_pb2.Identify()}, {"identify.traits": "at least one trait is required"}),
    ],
)
def test_payload_rules(payload: dict[str, Any], expected: dict[str, str]) -> None:
    assert fields(event(user_id="u", occurred_at=NOW, **payload)) == expected


def test_money_nanos_must_share_the_sign_of_units() -> None:
    bad = money("1.5")
    bad.nanos = -500_000_000
    found = fields(
        event(user_id="u", occurred_at=NOW, product_viewed=ingest_pb2.ProductViewed(sku="s", price=bad))
    )
    assert found["product_viewed.price.nanos"] == "must have the same sign as units"


def test_trait_names_are_checked() -> None:
    found = fields(event(user_id="u", occurred_at=NOW, identify=identify(**{"first name": "x"})))
    assert "identify.traits" in found
