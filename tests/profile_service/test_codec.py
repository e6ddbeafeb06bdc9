"""The API form of a profile: computed traits, provenance, read-time fields and read masks."""

from __future__ import annotations

from datetime import UTC, timedelta
from decimal import Decimal
from typing import Any

import pytest
from google.protobuf import field_mask_pb2

from profile_service.codec import (
    ALWAYS_RETURNED,
    NEVER_CHANGES,
    InvalidReadMask,
    StoredProfile,
    UserAgentInfo,
    apply_read_mask,
    as_of,
    as_of_until,
    check_read_mask,
    describe_user_agent,
    micros,
    money_to_proto,
    to_proto,
)
from profile_service.state import Money, OrderRecord, ProfileState, Provenance, from_json, replay
from sendtime.ingest.v1 import ingest_pb2
from sendtime.profile.v1 import profile_pb2
from sendtime_common.identifiers import IdentifierKind
from tests.factories import NOW, cart_item_added, identify, money, product_viewed
from tests.profile_service.test_state import (
    CRM,
    DELIVERED,
    EMAIL,
    HARD,
    IPHONE,
    LEGACY_ROW,
    SERVER,
    WEB,
    WINDOWS,
    at,
    cancel,
    consent,
    ev,
    message,
    order,
    refund,
)

DAY = 24 * 60


def stored(state: ProfileState) -> StoredProfile:
    return StoredProfile(
        customer_id="c1",
        version=7,
        identifiers=((IdentifierKind.USER_ID, "u"), (IdentifierKind.EMAIL, "ada@example.com")),
        state=state,
        created_at=NOW - timedelta(days=1),
        updated_at=NOW,
    )


def test_money_to_proto_keeps_currency_units_and_nanos() -> None:
    assert money_to_proto(Money(Decimal("179.80"), "EUR")) == money("179.80")
    assert money_to_proto(Money(Decimal("1000"), "JPY")) == money("1000", "JPY")
    assert money_to_proto(Money(Decimal("0.005"), "BHD")) == money("0.005", "BHD")
    negative = money_to_proto(Money(Decimal("-1.50"), "USD"))
    assert (negative.units, negative.nanos, negative.currency_code) == (-1, -500_000_000, "USD")


@pytest.fixture(scope="module")
def full() -> profile_pb2.Profile:
    events = [
        ev(minutes=1, source=CRM, event_id="e-trait", identify=identify(first_name="Ada")),
        ev(minutes=2, event_id="e-view", product_viewed=product_viewed("shoe", price="89.90")),
        ev(minutes=3, event_id="e-cart", cart_item_added=cart_item_added("shoe", 2, "89.90")),
        ev(minutes=4, source=SERVER, event_id="e-o1", order_completed=order("o1", "10.00", "EUR", "x")),
        ev(minutes=5, source=SERVER, event_id="e-o2", order_completed=order("o2", "30.00", "EUR", "x")),
        ev(minutes=6, source=SERVER, event_id="e-o3", order_completed=order("o3", "500", "JPY", "x")),
        ev(minutes=7, source=SERVER, event_id="e-r1", order_refunded=refund("o2", "r1", "5.00")),
        ev(minutes=8, source=SERVER, event_id="e-c1", order_cancelled=cancel("o1")),
        ev(
            minutes=9,
            source=CRM,
            event_id="e-loy",
            loyalty_changed=ingest_pb2.LoyaltyChanged(points=120, tier="gold"),
        ),
        ev(minutes=10, event_id="e-con", consent_changed=consent(ingest_pb2.CHANNEL_EMAIL, True)),
        ev(minutes=11, source=EMAIL, event_id="e-del", **DELIVERED),
        ev(
            minutes=12,
            source=EMAIL,
            event_id="e-open",
            email_opened=ingest_pb2.EmailOpened(message=message()),
        ),
        ev(minutes=13, source=EMAIL, event_id="e-bounce", **HARD),
        ev(
            minutes=14,
            event_id="e-seen",
            page_viewed=ingest_pb2.PageViewed(url="https://shop.example/"),
            context=ingest_pb2.EventContext(locale="de-AT", timezone="Europe/Vienna", user_agent=IPHONE),
        ),
    ]
    return to_proto(stored(replay(events)))


def test_to_proto_fills_identity_traits_cart_and_views(full: profile_pb2.Profile) -> None:
    assert (full.name, full.customer_id, full.version) == ("profiles/c1", "c1", 7)
    assert sorted(i.value for i in full.identifiers) == ["ada@example.com", "u"]
    assert full.traits["first_name"] == "Ada"
    assert [(i.sku, i.quantity) for i in full.cart.items] == [("shoe", 2)]
    assert full.cart.total == money("179.80")
    assert full.cart.update_time.ToDatetime(tzinfo=UTC) == at(6)  # the last order
    assert not full.cart.abandoned  # set at read time only
    assert [v.sku for v in full.recently_viewed] == ["shoe"]


def test_to_proto_fills_the_order_summary(full: profile_pb2.Profile) -> None:
    orders = full.orders
    assert (orders.count, orders.cancelled_count) == (3, 1)
    assert orders.last_order_time.ToDatetime(tzinfo=UTC) == at(6)
    assert list(orders.lifetime_value) == [money("25.00"), money("500", "JPY")]
    assert list(orders.average_order_value) == [money("25.00"), money("500", "JPY")]
    assert [(o.order_id, o.cancelled, o.HasField("refunded")) for o in orders.recent] == [
        ("o3", False, False),
        ("o2", False, True),
        ("o1", True, False),
    ]
    assert orders.recent[1].refunded == money("5.00")
    assert orders.recent[0].total == money("500", "JPY")


def test_to_proto_fills_loyalty_consents_email_and_last_seen(full: profile_pb2.Profile) -> None:
    assert (full.loyalty.points, full.loyalty.tier) == (120, "gold")
    assert full.loyalty.update_time.ToDatetime(tzinfo=UTC) == at(9)
    assert [(c.channel, c.subscribed) for c in full.consents] == [(ingest_pb2.CHANNEL_EMAIL, True)]
    email = full.email
    assert email.last_delivered_time.ToDatetime(tzinfo=UTC) == at(11)
    assert email.last_open_time.ToDatetime(tzinfo=UTC) == at(12)
    assert not email.HasField("last_click_time")
    assert [t.ToDatetime(tzinfo=UTC) for t in email.recent_open_times] == [at(12)]
    assert email.bounce_state == profile_pb2.BOUNCE_STATE_HARD
    assert (email.unsubscribed, email.spam_reported) == (False, False)
    seen = full.last_seen
    assert seen.seen_time.ToDatetime(tzinfo=UTC) == at(14)
    assert (seen.locale, seen.timezone, seen.device, seen.os, seen.browser) == (
        "de-AT",
        "Europe/Vienna",
        "mobile",
        "iOS",
        "Mobile Safari",
    )


def test_provenance_names_the_event_behind_each_attribute(full: profile_pb2.Profile) -> None:
    by_path = {path: (p.event_id, p.source) for path, p in full.provenance.items()}
    assert by_path == {
        "traits.first_name": ("e-trait", CRM),
        "recently_viewed": ("e-view", WEB),
        "cart": ("e-o3", SERVER),  # an order is a change to the cart too
        "orders": ("e-c1", SERVER),
        "loyalty": ("e-loy", CRM),
        "consents.email": ("e-con", WEB),
        "email.bounce_state": ("e-bounce", EMAIL),
        "last_seen": ("e-seen", WEB),
    }
    assert full.provenance["loyalty"].occur_time.ToDatetime(tzinfo=UTC) == at(9)


def test_an_empty_profile_has_no_computed_values() -> None:
    profile = to_proto(stored(ProfileState()))
    assert not profile.HasField("cart") or not profile.cart.items
    assert profile.orders.count == 0 and not profile.orders.lifetime_value
    assert not profile.HasField("loyalty")
    assert not profile.HasField("last_seen")
    assert not profile.HasField("email")
    assert profile.email.bounce_state == profile_pb2.BOUNCE_STATE_UNSPECIFIED
    assert not profile.provenance


def test_a_state_of_the_first_layout_still_converts() -> None:
    profile = to_proto(stored(from_json(LEGACY_ROW)))
    assert profile.traits["first_name"] == "Ada"
    assert profile.provenance["traits.first_name"].source == CRM
    assert profile.orders.count == 1
    assert "cart" not in profile.provenance  # layout 1 did not record it


# --- user agents -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user_agent", "expected"),
    [
        (IPHONE, UserAgentInfo("mobile", "iOS", "Mobile Safari")),
        (
            "Mozilla/5.0 (iPad; CPU OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko)"
            " Version/16.6 Mobile/15E148 Safari/604.1",
            UserAgentInfo("tablet", "iOS", "Mobile Safari"),
        ),
        (
            "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko)"
            " Chrome/124.0.0.0 Mobile Safari/537.36",
            UserAgentInfo("mobile", "Android", "Chrome Mobile"),
        ),
        (
            "Mozilla/5.0 (Linux; Android 13; SM-X700) AppleWebKit/537.36 (KHTML, like Gecko)"
            " Chrome/124.0.0.0 Safari/537.36",
            UserAgentInfo("tablet", "Android", "Chrome"),
        ),
        (WINDOWS, UserAgentInfo("desktop", "Windows", "Chrome")),
        (
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"
            " Version/17.4 Safari/605.1.15",
            UserAgentInfo("desktop", "Mac OS X", "Safari"),
        ),
        (
            "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
            UserAgentInfo("desktop", "Linux", "Firefox"),
        ),
        (
            "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
            UserAgentInfo("other", "", "Googlebot"),
        ),
        (
            "Mozilla/5.0 (SMART-TV; Linux; Tizen 6.0) AppleWebKit/537.36 (KHTML, like Gecko)"
            " SamsungBrowser/4.0 Chrome/76.0.3809.146 TV Safari/537.36",
            UserAgentInfo("other", "Tizen", "Samsung Internet"),
        ),
        ("curl/8.0", UserAgentInfo("other", "", "curl")),
        ("", UserAgentInfo("", "", "")),
    ],
)
def test_user_agents_give_device_class_os_and_browser(user_agent: str, expected: UserAgentInfo) -> None:
    assert describe_user_agent(user_agent) == expected


def test_user_agent_parses_are_cached() -> None:
    describe_user_agent(WINDOWS)
    hits = describe_user_agent.cache_info().hits
    describe_user_agent(WINDOWS)
    assert describe_user_agent.cache_info().hits == hits + 1


# --- read time ---------------------------------------------------------------------------------


def test_a_cart_is_abandoned_when_idle_longer_than_the_setting_as_of_the_read() -> None:
    profile = to_proto(stored(replay([ev(minutes=0, cart_item_added=cart_item_added("a"))])))
    after = timedelta(minutes=60)
    assert not as_of(profile, at(60), cart_abandoned_after=after).cart.abandoned
    assert as_of(profile, at(61), cart_abandoned_after=after).cart.abandoned
    assert not profile.cart.abandoned  # a copy was changed, not the profile
    emptied = replay(
        [
            ev(minutes=0, cart_item_added=cart_item_added("a")),
            ev(minutes=1, source=SERVER, order_completed=order("o", "10")),
        ]
    )
    assert not as_of(to_proto(stored(emptied)), at(600), cart_abandoned_after=after).cart.abandoned


def test_a_read_time_copy_says_until_when_it_holds_to_the_microsecond() -> None:
    """Every read from the copy's time up to (not including) its end gets the same answer; the
    first microsecond after it another: the moment the cart turns abandoned, or the oldest
    recent email time leaves the 30 days, whichever comes first."""
    opened: dict[str, Any] = {"email_opened": ingest_pb2.EmailOpened(message=message())}
    after = timedelta(minutes=60)
    cart_first = to_proto(
        stored(
            replay(
                [
                    ev(minutes=-40 * DAY, source=EMAIL, **opened),
                    ev(minutes=0, cart_item_added=cart_item_added("a")),
                ]
            )
        )
    )
    mail_first = to_proto(
        stored(
            replay(
                [
                    ev(minutes=-30 * DAY + 30, source=EMAIL, **opened),
                    ev(minutes=0, cart_item_added=cart_item_added("a")),
                ]
            )
        )
    )
    now_us = micros(at(10))
    for profile, changes_at in (
        (cart_first, micros(at(60)) + 1),  # idle for longer than 60 minutes
        (mail_first, micros(at(-30 * DAY + 30) + timedelta(days=30))),  # 30 days after the open
    ):
        read, until = as_of_until(profile, now_us, cart_abandoned_after=after)
        assert until == changes_at
        for moment in (now_us, now_us + 1, until - 1):
            assert as_of_until(profile, moment, cart_abandoned_after=after)[0] == read
        assert as_of_until(profile, until, cart_abandoned_after=after)[0] != read

    abandoned, until = as_of_until(cart_first, micros(at(61)) + 1, cart_abandoned_after=after)
    assert abandoned.cart.abandoned and until == NEVER_CHANGES  # the 40-day-old open is gone already
    assert as_of_until(to_proto(stored(replay([]))), now_us, cart_abandoned_after=after)[1] == NEVER_CHANGES


def test_email_counts_cover_the_30_days_before_the_read() -> None:
    opened: dict[str, Any] = {"email_opened": ingest_pb2.EmailOpened(message=message())}
    clicked: dict[str, Any] = {
        "email_clicked": ingest_pb2.EmailClicked(message=message(), url="https://x.example/")
    }
    state = replay(
        [
            ev(minutes=-20 * DAY, source=EMAIL, **opened),
            ev(minutes=-5 * DAY, source=EMAIL, **opened),
            ev(minutes=-1, source=EMAIL, **opened),
            ev(minutes=-2, source=EMAIL, **clicked),
            ev(minutes=-3, source=EMAIL, **DELIVERED),
        ]
    )
    profile = to_proto(stored(state))
    assert len(profile.email.recent_open_times) == 3
    now = at(0)
    read = as_of(profile, now, cart_abandoned_after=timedelta(hours=1)).email
    assert (read.opens_30d, read.clicks_30d, read.delivered_30d) == (3, 1, 1)
    later = as_of(profile, now + timedelta(days=15), cart_abandoned_after=timedelta(hours=1)).email
    assert (later.opens_30d, later.clicks_30d, later.delivered_30d) == (2, 1, 1)
    assert len(later.recent_open_times) == 2
    much_later = as_of(profile, now + timedelta(days=31), cart_abandoned_after=timedelta(hours=1)).email
    assert (much_later.opens_30d, much_later.clicks_30d, much_later.delivered_30d) == (0, 0, 0)
    assert not much_later.recent_open_times
    # Last times stay: they are not about the last 30 days.
    assert much_later.last_open_time.ToDatetime(tzinfo=UTC) == at(-1)


# --- read masks --------------------------------------------------------------------------------


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


def test_an_empty_mask_returns_everything_but_provenance(full: profile_pb2.Profile) -> None:
    masked = apply_read_mask(full, mask())
    assert not masked.provenance
    expected = profile_pb2.Profile()
    expected.CopyFrom(full)
    expected.ClearField("provenance")
    assert masked == expected
    assert full.provenance  # the input is left alone


def test_provenance_comes_only_when_the_mask_names_it(full: profile_pb2.Profile) -> None:
    traits_only = apply_read_mask(full, mask("traits"))
    assert not traits_only.provenance and not traits_only.HasField("cart")
    assert traits_only.traits["first_name"] == "Ada"
    with_provenance = apply_read_mask(full, mask("traits", "provenance"))
    assert with_provenance.provenance == full.provenance
    assert with_provenance.traits == full.traits
    only = apply_read_mask(full, mask("provenance"))
    assert only.provenance == full.provenance and not only.HasField("traits")
    for name in ALWAYS_RETURNED:
        assert getattr(only, name) == getattr(full, name)


def test_check_read_mask_accepts_profile_fields_and_rejects_others() -> None:
    check_read_mask(mask("provenance", "email", "last_seen", "orders"))
    check_read_mask(mask())
    with pytest.raises(InvalidReadMask, match="shoe_size"):
        check_read_mask(mask("traits", "shoe_size"))


def test_email_flags_and_their_provenance() -> None:
    events = [
        ev(
            minutes=1,
            source=EMAIL,
            event_id="e-unsub",
            email_unsubscribed=ingest_pb2.EmailUnsubscribed(message=message()),
        ),
        ev(
            minutes=2,
            source=EMAIL,
            event_id="e-spam",
            email_spam_reported=ingest_pb2.EmailSpamReported(message=message()),
        ),
    ]
    profile = to_proto(stored(replay(events)))
    assert (profile.email.unsubscribed, profile.email.spam_reported) == (True, True)
    assert profile.provenance["email.unsubscribed"].event_id == "e-unsub"
    assert profile.provenance["email.spam_reported"].event_id == "e-spam"
    opt_in = ev(minutes=3, event_id="e-opt-in", consent_changed=consent(ingest_pb2.CHANNEL_EMAIL, True))
    lifted = to_proto(stored(replay([*events, opt_in])))
    assert (lifted.email.unsubscribed, lifted.email.spam_reported) == (False, True)
    assert lifted.provenance["email.unsubscribed"].event_id == "e-opt-in"


def test_sums_past_google_money_s_range_are_left_out_not_raised() -> None:
    # The largest amounts and quantities ingest accepts (10^15 units, 10^6 items) add up past
    # int64 units in a few cart lines or in thousands of orders: to_proto raised ValueError, so
    # GetProfile failed and a merge that refreshed the cache stopped the merger.
    most = Money(Decimal(10**15), "EUR")
    lines = [cart_item_added(f"s-{i}", quantity=1_000_000, price=str(most.amount)) for i in range(3)]
    cart = to_proto(stored(replay([ev(minutes=i, cart_item_added=line) for i, line in enumerate(lines)])))
    assert [i.quantity for i in cart.cart.items] == [1_000_000] * 3
    assert not cart.cart.HasField("total")  # 3 * 10^21 units: beyond int64

    by = Provenance(WEB, NOW, "e-1")
    orders = tuple(OrderRecord(f"o-{i}", most, NOW, by) for i in range(9_300))
    summary = to_proto(stored(ProfileState(orders=orders))).orders
    assert summary.count == 9_300 and not summary.lifetime_value  # 9.3 * 10^18 units
    assert [(m.currency_code, m.units) for m in summary.average_order_value] == [("EUR", 10**15)]
