from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.protobuf import timestamp_pb2

from ingest.envelope import stamp
from ingest.validation import ValidationRules, validate_event
from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.storable import NOT_FINITE_DESCRIPTION, NUL_DESCRIPTION, TIMESTAMP_DESCRIPTION
from tests.factories import NOW, cart_item_added, event, identify, money, order_completed, product_viewed

SKEW = timedelta(minutes=5)
RULES = ValidationRules(max_future_skew=SKEW)
CURRENCY_RULE = "must be an ISO 4217 currency code such as EUR or USD"


def fields(e: ingest_pb2.Event) -> dict[str, str]:
    return {v.field: v.description for v in validate_event(e, NOW, RULES)}


def test_a_valid_event_has_no_violations() -> None:
    assert fields(event(user_id="u1", occurred_at=NOW, product_viewed=product_viewed("sku-1"))) == {}


def test_every_problem_of_an_event_is_reported_by_field() -> None:
    bad = ingest_pb2.Event(event_id="has space")
    assert fields(bad) == {
        "event_id": "must be 1 to 128 characters of letters, digits and . _ : -",
        "customer": "at least one of user_id, email, anonymous_id, crm_id, device_id is required",
        "occurred_at": "required",
        "source": "required",
        "payload": "one event type is required, e.g. product_viewed, identify or custom",
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


# --- the catalogue: one valid example per event type, then each rule of docs/ingest.md --------

EMAIL_MESSAGE = ingest_pb2.EmailMessage(message_id="m-1", campaign_id="c-1")
VALID_PAYLOADS: dict[str, Any] = {
    "product_viewed": product_viewed("sku-1"),
    "cart_item_added": cart_item_added("sku-1"),
    "cart_item_removed": ingest_pb2.CartItemRemoved(sku="sku-1", quantity=1),
    "order_completed": order_completed("o-1", "10.00", "sku-1"),
    "identify": identify(first_name="Ada"),
    "page_viewed": ingest_pb2.PageViewed(url="https://shop.example/", title="Home"),
    "product_searched": ingest_pb2.ProductSearched(query="trail shoes", result_count=12),
    "checkout_started": ingest_pb2.CheckoutStarted(checkout_id="ch-1", total=money("10.00")),
    "order_refunded": ingest_pb2.OrderRefunded(order_id="o-1", refund_id="r-1", amount=money("5.00")),
    "order_cancelled": ingest_pb2.OrderCancelled(order_id="o-1", reason="customer"),
    "alias": ingest_pb2.Alias(other=ingest_pb2.CustomerIdentifiers(anonymous_id="anon-1")),
    "loyalty_changed": ingest_pb2.LoyaltyChanged(points=120, tier="gold"),
    "consent_changed": ingest_pb2.ConsentChanged(channel=ingest_pb2.CHANNEL_SMS, subscribed=True),
    "email_delivered": ingest_pb2.EmailDelivered(message=EMAIL_MESSAGE),
    "email_opened": ingest_pb2.EmailOpened(message=EMAIL_MESSAGE),
    "email_clicked": ingest_pb2.EmailClicked(message=EMAIL_MESSAGE, url="https://shop.example/p/1"),
    "email_bounced": ingest_pb2.EmailBounced(message=EMAIL_MESSAGE, bounce_type=ingest_pb2.BOUNCE_TYPE_HARD),
    "email_unsubscribed": ingest_pb2.EmailUnsubscribed(message=EMAIL_MESSAGE),
    "email_spam_reported": ingest_pb2.EmailSpamReported(message=EMAIL_MESSAGE),
    "product_upserted": ingest_pb2.ProductUpserted(
        sku="sku-1", name="Shoe", price=money("10.00"), in_stock=True
    ),
    "custom": ingest_pb2.CustomEvent(name="wishlist_item_added"),
    "email_suppressed": ingest_pb2.EmailSuppressed(reason=ingest_pb2.SUPPRESSION_REASON_HARD_BOUNCE),
}


def test_a_suppression_needs_its_reason_and_no_message() -> None:
    def problems(reason: int) -> dict[str, str]:
        suppressed = ingest_pb2.EmailSuppressed(reason=reason)  # type: ignore[arg-type]
        return fields(event(email="a@example.com", occurred_at=NOW, email_suppressed=suppressed))

    assert problems(ingest_pb2.SUPPRESSION_REASON_UNSUBSCRIBE) == {}
    required = "required: SUPPRESSION_REASON_HARD_BOUNCE, _SOFT_BOUNCE, _SPAM_REPORT or _UNSUBSCRIBE"
    assert problems(ingest_pb2.SUPPRESSION_REASON_UNSPECIFIED) == {"email_suppressed.reason": required}
    assert problems(99) == {"email_suppressed.reason": "unknown value 99"}


def test_every_event_type_has_a_valid_example() -> None:
    payload_fields = {f.name for f in ingest_pb2.Event.DESCRIPTOR.oneofs_by_name["payload"].fields}
    assert set(VALID_PAYLOADS) == payload_fields
    for name, payload in VALID_PAYLOADS.items():
        assert fields(event(user_id="u", occurred_at=NOW, **{name: payload})) == {}, name


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"inner": value}
    return value


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"page_viewed": ingest_pb2.PageViewed()}, {"page_viewed.url": "required"}),
        (
            {"page_viewed": ingest_pb2.PageViewed(url="https://x/" + "a" * 2048)},
            {"page_viewed.url": "must be at most 2048 characters"},
        ),
        (
            {"product_searched": ingest_pb2.ProductSearched(query="q", result_count=-1)},
            {"product_searched.result_count": "must not be negative"},
        ),
        (
            {"checkout_started": ingest_pb2.CheckoutStarted(checkout_id="c")},
            {"checkout_started.total": "required"},
        ),
        (
            {
                "checkout_started": ingest_pb2.CheckoutStarted(
                    checkout_id="c",
                    total=money("10.00"),
                    lines=[ingest_pb2.OrderLine(sku="s", quantity=1, unit_price=money("10.00", "USD"))],
                )
            },
            {"checkout_started.lines[0].unit_price.currency_code": "must match the total's currency"},
        ),
        (
            {"order_refunded": ingest_pb2.OrderRefunded(order_id="o", amount=money("1.00"))},
            {"order_refunded.refund_id": "required"},
        ),
        ({"order_cancelled": ingest_pb2.OrderCancelled()}, {"order_cancelled.order_id": "required"}),
        (
            {"alias": ingest_pb2.Alias()},
            {"alias.other": "at least one of user_id, email, anonymous_id, crm_id, device_id is required"},
        ),
        (
            {"loyalty_changed": ingest_pb2.LoyaltyChanged(points=-1)},
            {"loyalty_changed.points": "must not be negative"},
        ),
        ({"consent_changed": ingest_pb2.ConsentChanged()}, {"consent_changed.channel": "required"}),
        ({"email_opened": ingest_pb2.EmailOpened()}, {"email_opened.message": "required"}),
        (
            {"email_delivered": ingest_pb2.EmailDelivered(message=ingest_pb2.EmailMessage())},
            {"email_delivered.message.message_id": "required"},
        ),
        (
            {"email_clicked": ingest_pb2.EmailClicked(message=EMAIL_MESSAGE)},
            {"email_clicked.url": "required"},
        ),
        (
            {"email_bounced": ingest_pb2.EmailBounced(message=EMAIL_MESSAGE)},
            {"email_bounced.bounce_type": "required: BOUNCE_TYPE_HARD or BOUNCE_TYPE_SOFT"},
        ),
        (
            {"product_upserted": ingest_pb2.ProductUpserted(sku="s", price=money("1.00"))},
            {"product_upserted.name": "required"},
        ),
        (
            {"custom": ingest_pb2.CustomEvent(name="Wishlist Added")},
            {"custom.name": "must be 1 to 64 lower-case letters, digits and _, starting with a letter"},
        ),
        (
            {"product_viewed": ingest_pb2.ProductViewed(sku="s", price=money("1.005"))},
            {"product_viewed.price.nanos": "EUR has 2 decimal places; this amount has more"},
        ),
        (
            {"product_viewed": ingest_pb2.ProductViewed(sku="s", price=money("100.5", "JPY"))},
            {"product_viewed.price.nanos": "JPY has 0 decimal places; this amount has more"},
        ),
        (
            {"identify": identify(profile=nested(4))},
            {"identify.traits.profile": "nested more than 3 levels deep"},
        ),
        (
            {"identify": identify(bio="x" * 1025)},
            {"identify.traits.bio": "strings must be at most 1024 characters"},
        ),
        (
            {
                "custom": ingest_pb2.CustomEvent(
                    name="quiz", properties=identify(**{f"p{i}": i for i in range(51)}).traits
                )
            },
            {"custom.properties": "at most 50 entries"},
        ),
        (
            {"order_completed": order_completed("o", "1.00", *[f"s{i}" for i in range(501)])},
            {"order_completed.lines": "at most 500 lines"},
        ),
    ],
)
def test_catalogue_rules(payload: dict[str, Any], expected: dict[str, str]) -> None:
    assert fields(event(user_id="u", occurred_at=NOW, **payload)) == expected


def test_money_within_the_currency_precision_is_fine() -> None:
    ok = ingest_pb2.ProductViewed(sku="s", price=money("100", "JPY"))
    assert fields(event(user_id="u", occurred_at=NOW, product_viewed=ok)) == {}


def test_occurred_at_older_than_the_retention_window_is_rejected() -> None:
    old = event(user_id="u", occurred_at=NOW - timedelta(days=731), identify=identify(a=1))
    assert fields(old) == {"occurred_at": "is older than the retention window of 730 days"}


def test_unknown_custom_names_are_rejected_when_names_are_configured() -> None:
    rules = ValidationRules(custom_event_names=frozenset({"quiz_completed"}))
    known = event(user_id="u", occurred_at=NOW, custom=ingest_pb2.CustomEvent(name="quiz_completed"))
    unknown = event(user_id="u", occurred_at=NOW, custom=ingest_pb2.CustomEvent(name="quiz_started"))
    assert validate_event(known, NOW, rules) == []
    assert [(v.field, v.description) for v in validate_event(unknown, NOW, rules)] == [
        ("custom.name", "is not a known custom event (INGEST_CUSTOM_EVENT_NAMES)")
    ]


def test_context_fields_are_checked() -> None:
    e = event(user_id="u", occurred_at=NOW, identify=identify(a=1))
    e.context.CopyFrom(ingest_pb2.EventContext(ip="300.1.1.1", locale="xx-!!", timezone="Mars/Olympus"))
    assert fields(e) == {
        "context.ip": "must be an IPv4 or IPv6 address",
        "context.locale": "must be a BCP 47 locale such as en-US or de-AT",
        "context.timezone": "must be an IANA time zone such as Europe/Vienna",
    }
    e.context.CopyFrom(ingest_pb2.EventContext(ip="2001:db8::1", locale="de-AT", timezone="Europe/Vienna"))
    assert fields(e) == {}


def test_alias_identifiers_are_checked_like_the_customers() -> None:
    bad = ingest_pb2.Alias(other=ingest_pb2.CustomerIdentifiers(email="nope"))
    assert "alias.other.email" in fields(event(user_id="u", occurred_at=NOW, alias=bad))


def test_an_event_over_the_size_limit_is_rejected() -> None:
    rules = ValidationRules(max_event_bytes=2048)
    big = event(user_id="u", occurred_at=NOW, identify=identify(**{f"t{i}": "x" * 100 for i in range(30)}))
    violations = validate_event(big, NOW, rules)
    assert [v.field for v in violations] == ["event"]
    assert violations[0].description.endswith("at most 2048 are allowed")


# --- acknowledged means mergeable: what no store after ingest could keep --------------------


def test_a_nul_anywhere_is_refused_by_field() -> None:
    e = event(user_id="u", occurred_at=NOW, order_completed=order_completed("o\x001", "5", "sku\x00"))
    assert fields(e) == {
        "order_completed.order_id": NUL_DESCRIPTION,
        "order_completed.lines[0].sku": NUL_DESCRIPTION,
    }
    assert "customer.user_id" in fields(event(user_id="u\x00", occurred_at=NOW, identify=identify(a=1)))


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_infinity_are_refused_in_traits_and_properties(number: float) -> None:
    trait = event(user_id="u", occurred_at=NOW, identify=identify(score=number))
    assert fields(trait) == {"identify.traits.score": NOT_FINITE_DESCRIPTION}
    props = ingest_pb2.CustomEvent(name="quiz", properties=identify(x={"y": number}).traits)
    assert fields(event(user_id="u", occurred_at=NOW, custom=props)) == {
        "custom.properties.x.y": NOT_FINITE_DESCRIPTION
    }


def test_amounts_and_quantities_beyond_their_ranges_are_refused() -> None:
    huge = ingest_pb2.CartItemAdded(sku="s", quantity=1_000_001, unit_price=money("1000000000000001"))
    assert fields(event(user_id="u", occurred_at=NOW, cart_item_added=huge)) == {
        "cart_item_added.quantity": "must be at most 1000000",
        "cart_item_added.unit_price.units": "must be at most 1000000000000000 (10^15)",
    }
    edge = ingest_pb2.CartItemAdded(sku="s", quantity=1_000_000, unit_price=money("1000000000000000"))
    assert fields(event(user_id="u", occurred_at=NOW, cart_item_added=edge)) == {}


@pytest.mark.parametrize(
    ("field", "seconds", "nanos"),
    [("occurred_at", 10**15, 0), ("occurred_at", 0, -5), ("sent_at", -(10**15), 0)],
)
def test_a_timestamp_out_of_range_is_refused_not_raised(field: str, seconds: int, nanos: int) -> None:
    e = event(user_id="u", occurred_at=NOW, identify=identify(a=1))
    getattr(e, field).CopyFrom(timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos))
    stamped = stamp(e, NOW)  # raised ValueError before: the caller got UNKNOWN
    assert fields(stamped) == {field: TIMESTAMP_DESCRIPTION}


def test_a_correction_past_the_timestamp_range_is_refused_as_the_corrected_time() -> None:
    # occurred_at += received_at - sent_at would leave Timestamp's range (and raised before): it
    # is kept at the range's edge, which is refused as the corrected time is.
    e = event(user_id="u", occurred_at=datetime(9000, 1, 1, tzinfo=UTC), identify=identify(a=1))
    e.sent_at.FromDatetime(datetime(1, 1, 1, tzinfo=UTC))
    assert fields(stamp(e, NOW)) == {
        "occurred_at": "is more than 300s in the future",
        "sent_at": "must not be before occurred_at (both by the sender's clock)",
    }
    e = event(user_id="u", occurred_at=datetime(1, 1, 1, tzinfo=UTC), identify=identify(a=1))
    e.sent_at.FromDatetime(datetime(9999, 1, 1, tzinfo=UTC))
    assert fields(stamp(e, NOW)) == {"occurred_at": "is older than the retention window of 730 days"}


@pytest.mark.parametrize("zone", ["Europe", "America/Argentina", "x" * 5000, "Europe/Vienna\x00"])
def test_a_time_zone_that_names_a_directory_or_no_file_is_refused(zone: str) -> None:
    # zoneinfo.ZoneInfo raised IsADirectoryError and "File name too long" for the first three.
    e = event(user_id="u", occurred_at=NOW, identify=identify(a=1))
    e.context.timezone = zone
    assert fields(e)["context.timezone"] == "must be an IANA time zone such as Europe/Vienna"


@pytest.mark.parametrize(
    "url",
    [
        "javascript:alert(1)",
        "data:text/html,<b>x</b>",
        "file:///etc/passwd",
        "ftp://shop.example/",
        "//shop.example/p",
        "/p/1",
        "https://",
        "http://[::1",
    ],
)
def test_url_fields_accept_only_http_and_https(url: str) -> None:
    found = fields(
        event(user_id="u", occurred_at=NOW, page_viewed=ingest_pb2.PageViewed(url=url, referrer=url))
    )
    assert found == {
        "page_viewed.url": "must be an http or https URL",
        "page_viewed.referrer": "must be an http or https URL",
    }
    clicked = ingest_pb2.EmailClicked(message=EMAIL_MESSAGE, url=url)
    assert fields(event(user_id="u", occurred_at=NOW, email_clicked=clicked)) == {
        "email_clicked.url": "must be an http or https URL"
    }


@pytest.mark.parametrize(
    "url", ["https://shop.example/p/1?q=2#x", "HTTP://SHOP.EXAMPLE", "https://[2001:db8::1]:8443/"]
)
def test_http_and_https_urls_are_valid(url: str) -> None:
    assert fields(event(user_id="u", occurred_at=NOW, page_viewed=ingest_pb2.PageViewed(url=url))) == {}


@pytest.mark.parametrize("code", ["DEM", "XTS", "XXX", "XAU", "USN", "CNH", "usd", "US", "EURO"])
def test_currencies_must_be_iso_4217_legal_tender_in_use(code: str) -> None:
    found = fields(
        event(
            user_id="u",
            occurred_at=NOW,
            product_viewed=ingest_pb2.ProductViewed(sku="s", price=money("1", code)),
        )
    )
    assert found == {"product_viewed.price.currency_code": CURRENCY_RULE}


@pytest.mark.parametrize("code", ["EUR", "USD", "JPY", "CHF", "XOF", "ZWG", "SLE"])
def test_iso_4217_currencies_in_use_are_valid(code: str) -> None:
    found = fields(
        event(
            user_id="u",
            occurred_at=NOW,
            product_viewed=ingest_pb2.ProductViewed(sku="s", price=money("1", code)),
        )
    )
    assert found == {}
