"""The profile as a pure fold of events: each computed trait, the tie rules, and the property that
the same set of events gives the same state whatever the order and however many duplicates."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st

from profile_service import state as state_module
from profile_service.merge_rules import DEFAULT_RULES, MergeRules
from profile_service.state import (
    BounceState,
    EmailState,
    Money,
    ProfileState,
    apply_event,
    from_json,
    replay,
    to_json,
)
from sendtime.ingest.v1 import ingest_pb2
from tests.factories import (
    NOW,
    cart_item_added,
    cart_item_removed,
    event,
    identify,
    money,
    order_completed,
    product_viewed,
)

WEB = ingest_pb2.EVENT_SOURCE_WEB
APP = ingest_pb2.EVENT_SOURCE_MOBILE_APP
SERVER = ingest_pb2.EVENT_SOURCE_SERVER
CRM = ingest_pb2.EVENT_SOURCE_CRM
EMAIL = ingest_pb2.EVENT_SOURCE_EMAIL
IMPORT = ingest_pb2.EVENT_SOURCE_IMPORT
ALL_SOURCES = [WEB, APP, SERVER, CRM, EMAIL, IMPORT]

IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko)"
    " Version/17.4 Mobile/15E148 Safari/604.1"
)
WINDOWS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/124.0.0.0 Safari/537.36"
)

# Every source in the opposite order to the default, for every attribute: ties then go the
# other way than the fold order.
REVERSED_RULES = MergeRules(
    default=tuple(reversed(DEFAULT_RULES.default)),
    attributes={
        name: tuple(reversed(DEFAULT_RULES.default))
        for name in (
            "traits",
            "cart",
            "recently_viewed",
            "orders",
            "loyalty",
            "consents",
            "email",
            "last_seen",
        )
    },
)


def at(minutes: float) -> datetime:
    return NOW + timedelta(minutes=minutes)


def ev(
    *,
    minutes: float = 0,
    source: int = WEB,
    event_id: str | None = None,
    context: ingest_pb2.EventContext | None = None,
    **payload: Any,
) -> ingest_pb2.Event:
    built = event(event_id=event_id, user_id="u", occurred_at=at(minutes), source=source, **payload)
    if context is not None:
        built.context.CopyFrom(context)
    return built


def message(message_id: str = "m1") -> ingest_pb2.EmailMessage:
    return ingest_pb2.EmailMessage(message_id=message_id, campaign_id="c")


def refund(order_id: str, refund_id: str, amount: str, currency: str = "EUR") -> ingest_pb2.OrderRefunded:
    return ingest_pb2.OrderRefunded(order_id=order_id, refund_id=refund_id, amount=money(amount, currency))


def cancel(order_id: str) -> ingest_pb2.OrderCancelled:
    return ingest_pb2.OrderCancelled(order_id=order_id, reason="customer")


def order(order_id: str, total: str, currency: str = "EUR", *skus: str) -> ingest_pb2.OrderCompleted:
    return ingest_pb2.OrderCompleted(
        order_id=order_id,
        total=money(total, currency),
        lines=[ingest_pb2.OrderLine(sku=s, quantity=1) for s in skus],
    )


def in_every_order(events: Sequence[ingest_pb2.Event], rules: MergeRules = DEFAULT_RULES) -> ProfileState:
    """The state of ``events``, checked to be the same for every arrival order."""
    expected = replay(events, rules=rules)
    for permutation in itertools.permutations(events):
        assert replay(permutation, rules=rules) == expected
    return expected


# --- the cart ----------------------------------------------------------------------------------


def test_cart_adds_removes_and_checkout() -> None:
    state = replay(
        [
            event(user_id="u", cart_item_added=cart_item_added("a", 2, "5.50"), occurred_at=at(1)),
            event(user_id="u", cart_item_added=cart_item_added("b", 1, "3.00"), occurred_at=at(2)),
            event(user_id="u", cart_item_removed=cart_item_removed("a", 1), occurred_at=at(3)),
        ]
    )
    assert [(c.sku, c.quantity, c.unit_price) for c in state.cart] == [
        ("a", 1, Money(Decimal("5.5"), "EUR")),
        ("b", 1, Money(Decimal("3"), "EUR")),
    ]
    after_order = apply_event(
        state, event(user_id="u", order_completed=order_completed("o1", "8.50", "a"), occurred_at=at(4))
    )
    assert [c.sku for c in after_order.cart] == ["b"]
    assert [o.order_id for o in after_order.orders] == ["o1"]
    assert after_order.cart_updated_at == at(4)


def test_an_order_without_lines_empties_the_cart() -> None:
    state = replay(
        [ev(minutes=1, cart_item_added=cart_item_added("a")), ev(minutes=2, order_completed=order("o", "10"))]
    )
    assert state.cart == ()


def test_cart_changes_at_the_same_instant_follow_the_cart_priority() -> None:
    # The default rules rank server over web for the cart: the server's removal applies last.
    add = ev(minutes=1, source=WEB, cart_item_added=cart_item_added("a", 1))
    remove = ev(minutes=1, source=SERVER, cart_item_removed=cart_item_removed("a", 1))
    assert in_every_order([add, remove]).cart == ()
    assert in_every_order([add, remove]).cart_set_by == replay([remove]).cart_set_by
    # Reversed, the web's addition applies last.
    state = in_every_order([add, remove], REVERSED_RULES)
    assert [(c.sku, c.quantity) for c in state.cart] == [("a", 1)]
    assert state.cart_set_by is not None and state.cart_set_by.event_id == add.event_id


def test_cart_changes_after_an_instant_build_on_it() -> None:
    events = [
        ev(minutes=1, source=WEB, cart_item_added=cart_item_added("a", 2)),
        ev(minutes=1, source=SERVER, cart_item_added=cart_item_added("b", 1)),
        ev(minutes=2, source=WEB, cart_item_removed=cart_item_removed("a", 1)),
        ev(minutes=2, source=APP, cart_item_added=cart_item_added("c", 1)),
    ]
    state = in_every_order(events)
    assert sorted((c.sku, c.quantity) for c in state.cart) == [("a", 1), ("b", 1), ("c", 1)]
    assert state.cart_updated_at == at(2)


# --- traits ------------------------------------------------------------------------------------


def test_latest_occurred_at_wins_not_latest_arrival() -> None:
    newer = event(user_id="u", identify=identify(first_name="New"), occurred_at=at(2))
    older = event(user_id="u", identify=identify(first_name="Old"), occurred_at=at(1))
    state = replay([newer, older])
    assert state.traits["first_name"].value == "New"
    assert state.traits["first_name"].set_by.event_id == newer.event_id


def test_on_equal_times_the_more_authoritative_source_wins() -> None:
    web = event(user_id="u", source=WEB, identify=identify(tier="web"), occurred_at=at(1))
    crm = event(user_id="u", source=CRM, identify=identify(tier="crm"), occurred_at=at(1))
    server = event(user_id="u", source=SERVER, identify=identify(tier="server"), occurred_at=at(1))
    assert replay([crm, web, server]).traits["tier"].value == "crm"
    assert replay([web, server]).traits["tier"].value == "server"  # checkout over the storefront
    assert in_every_order([web, crm, server], REVERSED_RULES).traits["tier"].value == "web"


def test_a_trait_row_overrides_the_group() -> None:
    rules = MergeRules(default=DEFAULT_RULES.default, attributes={"traits.vip": (WEB,)})
    web = ev(minutes=1, source=WEB, identify=identify(vip=True, name="web"))
    crm = ev(minutes=1, source=CRM, identify=identify(vip=False, name="crm"))
    state = in_every_order([web, crm], rules)
    assert (state.traits["vip"].value, state.traits["name"].value) == (True, "crm")


def test_traits_merge_name_by_name() -> None:
    state = in_every_order(
        [ev(minutes=1, identify=identify(a=1, b=1)), ev(minutes=2, identify=identify(b=2, c=2))]
    )
    assert {name: t.value for name, t in state.traits.items()} == {"a": 1, "b": 2, "c": 2}


# --- recently viewed ---------------------------------------------------------------------------


def test_recently_viewed_is_newest_first_and_unique() -> None:
    state = replay(
        [
            event(user_id="u", product_viewed=product_viewed("a"), occurred_at=at(1)),
            event(user_id="u", product_viewed=product_viewed("b"), occurred_at=at(2)),
            event(user_id="u", product_viewed=product_viewed("a"), occurred_at=at(3)),
        ]
    )
    assert [v.sku for v in state.recently_viewed] == ["a", "b"]
    assert state.recently_viewed[0].viewed_at == at(3)


def test_recently_viewed_is_bounded() -> None:
    state = replay(ev(minutes=i, product_viewed=product_viewed(f"s{i}")) for i in range(30))
    assert len(state.recently_viewed) == state_module.RECENTLY_VIEWED_LIMIT
    assert state.recently_viewed[0].sku == "s29"
    assert state.recently_viewed[-1].sku == "s10"


# --- orders ------------------------------------------------------------------------------------


def test_order_summary_counts_values_and_averages_per_currency() -> None:
    state = in_every_order(
        [
            ev(minutes=1, source=SERVER, order_completed=order("o1", "10.00")),
            ev(minutes=2, source=SERVER, order_completed=order("o2", "20.01")),
            ev(minutes=3, source=SERVER, order_completed=order("o3", "1000", "JPY")),
        ]
    )
    summary = state.order_summary()
    assert summary.count == 3
    assert summary.cancelled_count == 0
    assert summary.last_order_time == at(3)
    assert [o.record.order_id for o in summary.orders] == ["o3", "o2", "o1"]
    assert summary.lifetime_value == (Money(Decimal("30.01"), "EUR"), Money(Decimal("1000"), "JPY"))
    # 30.01 / 2 = 15.005, rounded half to even to EUR's 2 decimals.
    assert summary.average_order_value == (Money(Decimal("15.00"), "EUR"), Money(Decimal("1000"), "JPY"))


def test_refunds_reduce_the_lifetime_value_once_per_refund_id_whenever_they_arrive() -> None:
    events = [
        ev(minutes=5, source=SERVER, order_refunded=refund("o1", "r1", "3.00")),  # before its order
        ev(minutes=6, source=IMPORT, order_refunded=refund("o1", "r1", "3.00")),  # the same refund again
        ev(minutes=7, source=SERVER, order_refunded=refund("o1", "r2", "2.00")),
        ev(minutes=10, source=SERVER, order_completed=order("o1", "10.00")),
    ]
    summary = in_every_order(events).order_summary()
    assert summary.lifetime_value == (Money(Decimal("5.00"), "EUR"),)
    assert summary.orders[0].refunded == Money(Decimal("5.00"), "EUR")
    assert summary.average_order_value == (Money(Decimal("5.00"), "EUR"),)
    assert replay(events).orders_set_by is not None
    assert replay(events).orders_set_by == replay(events[3:]).orders_set_by


def test_a_refund_never_takes_an_order_below_zero_and_other_currencies_do_not_count() -> None:
    summary = in_every_order(
        [
            ev(minutes=1, source=SERVER, order_completed=order("o1", "10.00")),
            ev(minutes=2, source=SERVER, order_refunded=refund("o1", "r1", "8.00")),
            ev(minutes=3, source=SERVER, order_refunded=refund("o1", "r2", "8.00")),
            ev(minutes=4, source=SERVER, order_refunded=refund("o1", "r3", "5.00", "USD")),
        ]
    ).order_summary()
    assert summary.orders[0].refunded == Money(Decimal("10.00"), "EUR")
    assert summary.lifetime_value == (Money(Decimal("0.00"), "EUR"),)


def test_a_refund_in_another_currency_is_not_subtracted() -> None:
    summary = replay(
        [
            ev(minutes=1, source=SERVER, order_completed=order("o1", "10.00")),
            ev(minutes=2, source=SERVER, order_refunded=refund("o1", "r1", "4.00", "USD")),
        ]
    ).order_summary()
    assert summary.orders[0].refunded is None
    assert summary.lifetime_value == (Money(Decimal("10.00"), "EUR"),)


def test_a_refund_reported_twice_counts_with_its_latest_amount() -> None:
    events = [
        ev(minutes=1, source=SERVER, order_completed=order("o1", "10.00")),
        ev(minutes=2, source=SERVER, order_refunded=refund("o1", "r1", "4.00")),
        ev(minutes=3, source=IMPORT, order_refunded=refund("o1", "r1", "3.00")),
        # At one instant the orders row decides: the server over the storefront by default.
        ev(minutes=4, source=SERVER, order_refunded=refund("o1", "r2", "1.00")),
        ev(minutes=4, source=WEB, order_refunded=refund("o1", "r2", "2.00")),
    ]
    assert in_every_order(events).order_summary().lifetime_value == (Money(Decimal("6.00"), "EUR"),)
    reversed_rules = in_every_order(events, REVERSED_RULES).order_summary()
    assert reversed_rules.lifetime_value == (Money(Decimal("5.00"), "EUR"),)


def test_a_cancelled_order_leaves_the_lifetime_value_and_average_even_when_cancelled_first() -> None:
    events = [
        ev(minutes=1, source=SERVER, order_cancelled=cancel("o2")),
        ev(minutes=2, source=SERVER, order_completed=order("o1", "10.00")),
        ev(minutes=3, source=SERVER, order_completed=order("o2", "50.00")),
        ev(minutes=4, source=SERVER, order_cancelled=cancel("o-unknown")),
    ]
    summary = in_every_order(events).order_summary()
    assert (summary.count, summary.cancelled_count) == (2, 1)
    assert [(o.record.order_id, o.cancelled) for o in summary.orders] == [("o2", True), ("o1", False)]
    assert summary.lifetime_value == (Money(Decimal("10.00"), "EUR"),)
    assert summary.average_order_value == (Money(Decimal("10.00"), "EUR"),)
    assert summary.last_order_time == at(3)


def test_an_order_reported_twice_counts_once_with_the_latest_total() -> None:
    first = ev(minutes=1, source=SERVER, order_completed=order("o1", "10.00", "EUR", "a"))
    again = ev(minutes=5, source=IMPORT, order_completed=order("o1", "12.00", "EUR", "b"))
    cart = [
        ev(minutes=0, cart_item_added=cart_item_added("a")),
        ev(minutes=2, cart_item_added=cart_item_added("b")),
    ]
    state = in_every_order([first, again, *cart])
    summary = state.order_summary()
    assert summary.count == 1
    assert summary.orders[0].record.ordered_at == at(1)
    assert summary.lifetime_value == (Money(Decimal("12.00"), "EUR"),)
    assert [c.sku for c in state.cart] == ["b"]  # only the first report touched the cart


def test_order_ties_follow_the_orders_priority() -> None:
    web = ev(minutes=1, source=WEB, order_completed=order("o1", "10.00"))
    server = ev(minutes=1, source=SERVER, order_completed=order("o1", "11.00"))
    summary = in_every_order([web, server]).order_summary()
    assert summary.lifetime_value == (Money(Decimal("11.00"), "EUR"),)


# --- loyalty and consent -----------------------------------------------------------------------


def test_loyalty_is_the_latest_standing() -> None:
    state = in_every_order(
        [
            ev(minutes=2, source=CRM, loyalty_changed=ingest_pb2.LoyaltyChanged(points=120, tier="gold")),
            ev(minutes=1, source=CRM, loyalty_changed=ingest_pb2.LoyaltyChanged(points=80, tier="silver")),
            ev(minutes=2, source=WEB, loyalty_changed=ingest_pb2.LoyaltyChanged(points=1, tier="web")),
        ]
    )
    assert state.loyalty is not None
    assert (state.loyalty.points, state.loyalty.tier, state.loyalty.set_by.occurred_at) == (
        120,
        "gold",
        at(2),
    )
    assert state.loyalty.set_by.source == CRM


def test_latest_wins_ties_follow_each_attribute_row() -> None:
    """Two sources set every latest-wins attribute at one instant: the default rules pick one,
    reversed rules the other, whatever the arrival order."""

    def both(**payload: Any) -> list[ingest_pb2.Event]:
        return [ev(minutes=1, source=CRM, **payload), ev(minutes=1, source=WEB, **payload)]

    events = [
        *both(loyalty_changed=ingest_pb2.LoyaltyChanged(points=1, tier="t")),
        *both(consent_changed=consent(ingest_pb2.CHANNEL_SMS, True)),
        *both(product_viewed=product_viewed("p")),
        *both(page_viewed=ingest_pb2.PageViewed(url="https://x.example/")),
    ]
    for e in events:
        e.context.locale = "de-AT"
    for rules in (DEFAULT_RULES, REVERSED_RULES):

        def winner(attribute: str, rules: MergeRules = rules) -> int:
            return CRM if rules.priority(attribute, CRM) > rules.priority(attribute, WEB) else WEB

        state = replay(events, rules=rules)
        assert replay(reversed(events), rules=rules) == state
        assert state.loyalty is not None and state.loyalty.set_by.source == winner("loyalty")
        assert state.consents[ingest_pb2.CHANNEL_SMS].set_by.source == winner("consents.sms")
        assert state.recently_viewed[0].set_by.source == winner("recently_viewed")
        assert state.last_seen.seen is not None and state.last_seen.seen.source == winner("last_seen")
        assert state.last_seen.locale is not None and state.last_seen.locale.set_by.source == winner(
            "last_seen"
        )
    # The defaults: the CRM's loyalty standing, the storefront's view of where the customer was.
    defaults = replay(events)
    assert defaults.loyalty is not None and defaults.loyalty.set_by.source == CRM
    assert defaults.last_seen.seen is not None and defaults.last_seen.seen.source == WEB


def consent(channel: int, subscribed: bool) -> ingest_pb2.ConsentChanged:
    return ingest_pb2.ConsentChanged(channel=channel, subscribed=subscribed)  # type: ignore[arg-type]


def test_consent_is_the_latest_per_channel() -> None:
    state = in_every_order(
        [
            ev(minutes=1, consent_changed=consent(ingest_pb2.CHANNEL_EMAIL, True)),
            ev(minutes=3, consent_changed=consent(ingest_pb2.CHANNEL_EMAIL, False)),
            ev(minutes=2, consent_changed=consent(ingest_pb2.CHANNEL_SMS, True)),
        ]
    )
    assert {ch: c.subscribed for ch, c in state.consents.items()} == {
        ingest_pb2.CHANNEL_EMAIL: False,
        ingest_pb2.CHANNEL_SMS: True,
    }
    assert state.consents[ingest_pb2.CHANNEL_SMS].set_by.occurred_at == at(2)


# --- email engagement --------------------------------------------------------------------------


def bounce(kind: int) -> ingest_pb2.EmailBounced:
    return ingest_pb2.EmailBounced(message=message(), bounce_type=kind)  # type: ignore[arg-type]


DELIVERED: dict[str, Any] = {"email_delivered": ingest_pb2.EmailDelivered(message=message())}
HARD: dict[str, Any] = {"email_bounced": bounce(ingest_pb2.BOUNCE_TYPE_HARD)}
SOFT: dict[str, Any] = {"email_bounced": bounce(ingest_pb2.BOUNCE_TYPE_SOFT)}


def bounce_state(*steps: dict[str, Any]) -> str:
    events = [ev(minutes=i, source=EMAIL, **step) for i, step in enumerate(steps)]
    return in_every_order(events).email.bounce_state


def test_bounce_state_rules() -> None:
    assert bounce_state() == BounceState.UNKNOWN
    assert bounce_state(DELIVERED) == BounceState.NONE
    assert bounce_state(SOFT) == BounceState.SOFT
    assert bounce_state(SOFT, DELIVERED) == BounceState.NONE
    assert bounce_state(DELIVERED, SOFT) == BounceState.SOFT
    assert bounce_state(HARD) == BounceState.HARD
    assert bounce_state(HARD, SOFT) == BounceState.HARD  # a soft bounce does not lift a hard one
    assert bounce_state(SOFT, HARD) == BounceState.HARD
    assert bounce_state(HARD, DELIVERED) == BounceState.NONE  # a later delivery does
    assert bounce_state(HARD, DELIVERED, SOFT) == BounceState.SOFT


def test_bounce_state_provenance_is_the_deciding_event() -> None:
    hard = ev(minutes=2, source=EMAIL, **HARD)
    state = in_every_order(
        [ev(minutes=1, source=EMAIL, **DELIVERED), hard, ev(minutes=3, source=EMAIL, **SOFT)]
    )
    assert state.email.bounce_set_by is not None and state.email.bounce_set_by.event_id == hard.event_id


def test_unsubscribed_until_a_later_email_opt_in_and_spam_reports_stay() -> None:
    unsub: dict[str, Any] = {"email_unsubscribed": ingest_pb2.EmailUnsubscribed(message=message())}
    spam: dict[str, Any] = {"email_spam_reported": ingest_pb2.EmailSpamReported(message=message())}
    opt_in: dict[str, Any] = {"consent_changed": consent(ingest_pb2.CHANNEL_EMAIL, True)}
    state = in_every_order([ev(minutes=1, **unsub), ev(minutes=2, **spam)])
    assert (state.email.unsubscribed, state.email.spam_reported) == (True, True)
    # The unsubscribe leaves the consent list alone.
    assert state.consents == {}
    later = in_every_order([ev(minutes=1, **unsub), ev(minutes=2, **spam), ev(minutes=3, **opt_in)])
    assert (later.email.unsubscribed, later.email.spam_reported) == (False, True)
    assert later.email.unsubscribed_set_by is not None
    assert later.email.unsubscribed_set_by.occurred_at == at(3)
    earlier = in_every_order([ev(minutes=0, **opt_in), ev(minutes=1, **unsub)])
    assert earlier.email.unsubscribed


def suppressed(reason: int) -> dict[str, Any]:
    return {"email_suppressed": ingest_pb2.EmailSuppressed(reason=reason)}  # type: ignore[arg-type]


def test_a_suppression_list_entry_counts_as_the_bounce_report_or_unsubscribe_it_stands_for() -> None:
    hard, soft = (
        suppressed(ingest_pb2.SUPPRESSION_REASON_HARD_BOUNCE),
        suppressed(ingest_pb2.SUPPRESSION_REASON_SOFT_BOUNCE),
    )
    assert bounce_state(hard) == BounceState.HARD
    assert bounce_state(DELIVERED, soft) == BounceState.SOFT
    assert bounce_state(hard, DELIVERED) == BounceState.NONE  # a later delivery lifts it, as a bounce's
    assert bounce_state(HARD, soft) == BounceState.HARD
    spam = in_every_order(
        [ev(minutes=1, source=EMAIL, **suppressed(ingest_pb2.SUPPRESSION_REASON_SPAM_REPORT))]
    )
    assert spam.email.spam_reported and not spam.email.unsubscribed
    opt_in: dict[str, Any] = {"consent_changed": consent(ingest_pb2.CHANNEL_EMAIL, True)}
    unsub = suppressed(ingest_pb2.SUPPRESSION_REASON_UNSUBSCRIBE)
    assert in_every_order([ev(minutes=0, **opt_in), ev(minutes=1, source=EMAIL, **unsub)]).email.unsubscribed
    assert not in_every_order(
        [ev(minutes=1, source=EMAIL, **unsub), ev(minutes=2, **opt_in)]
    ).email.unsubscribed
    # a reason this code does not know changes nothing
    assert in_every_order([ev(minutes=1, source=EMAIL, **suppressed(99))]).email == EmailState()


def test_recent_email_times_are_newest_first_bounded_and_within_30_days_of_the_newest() -> None:
    opened: dict[str, Any] = {"email_opened": ingest_pb2.EmailOpened(message=message())}
    clicked: dict[str, Any] = {
        "email_clicked": ingest_pb2.EmailClicked(message=message(), url="https://x.example/")
    }
    days = 24 * 60
    events = [
        ev(minutes=-40 * days, source=EMAIL, **opened),  # more than 30 days before the newest open
        ev(minutes=-29 * days, source=EMAIL, **opened),
        ev(minutes=0, source=EMAIL, **opened),
        ev(minutes=0, source=EMAIL, **opened),  # two opens at one instant are two opens
        ev(minutes=-1, source=EMAIL, **clicked),
        ev(minutes=-2, source=EMAIL, **DELIVERED),
    ]
    email = replay(events).email
    assert email.recent_opens == (at(0), at(0), at(-29 * days))
    assert email.recent_clicks == (at(-1),)
    assert email.recent_delivered == (at(-2),)
    many = replay(ev(minutes=i, source=EMAIL, **opened) for i in range(150)).email
    assert len(many.recent_opens) == state_module.RECENT_EMAIL_TIMES_LIMIT
    assert many.recent_opens[0] == at(149) and many.recent_opens[-1] == at(50)


# --- last seen ---------------------------------------------------------------------------------


def test_last_seen_takes_each_context_field_from_the_latest_event_that_has_it() -> None:
    events = [
        ev(
            minutes=1,
            context=ingest_pb2.EventContext(locale="de-AT", timezone="Europe/Vienna", user_agent=IPHONE),
        ),
        ev(minutes=2, context=ingest_pb2.EventContext(user_agent=WINDOWS, ip="203.0.113.9")),
        ev(minutes=3, context=ingest_pb2.EventContext(ip="203.0.113.9")),  # nothing shown: not seen
        ev(minutes=4, identify=identify(a=1)),
    ]
    seen = in_every_order(events).last_seen
    assert seen.seen is not None and seen.seen.occurred_at == at(2)
    assert seen.locale is not None and seen.locale.value == "de-AT"
    assert seen.timezone is not None and seen.timezone.value == "Europe/Vienna"
    assert seen.user_agent is not None and seen.user_agent.value == WINDOWS


# --- incremental folding, schema, JSON ---------------------------------------------------------


def test_any_order_with_duplicates_gives_the_same_state() -> None:
    events = [
        event(user_id="u", identify=identify(first_name="Ada"), occurred_at=at(1)),
        event(user_id="u", cart_item_added=cart_item_added("a", 2), occurred_at=at(2)),
        event(user_id="u", cart_item_removed=cart_item_removed("a", 1), occurred_at=at(3)),
        event(user_id="u", product_viewed=product_viewed("p"), occurred_at=at(4)),
        event(user_id="u", order_completed=order_completed("o1", "10", "a"), occurred_at=at(5)),
    ]
    expected = replay(events)
    for permutation in itertools.permutations(events):
        assert replay([*permutation, permutation[0]]) == expected


def test_incremental_application_equals_replay() -> None:
    events = [
        event(user_id="u", identify=identify(a=1), occurred_at=at(1)),
        event(user_id="u", cart_item_added=cart_item_added("x"), occurred_at=at(2)),
        event(user_id="u", order_completed=order_completed("o", "10"), occurred_at=at(3)),
    ]
    state = ProfileState()
    for e in events:
        assert state.is_newer(e)
        state = apply_event(state, e)
    assert state == replay(events)
    assert not state.is_newer(events[0])


def test_json_round_trip_preserves_the_state() -> None:
    state = replay(
        [
            event(user_id="u", identify=identify(first_name="Ada", vip=True, score=3.5), occurred_at=at(1)),
            event(user_id="u", cart_item_added=cart_item_added("a", 2, "5.55"), occurred_at=at(2)),
            event(user_id="u", product_viewed=product_viewed("p", price="9.99"), occurred_at=at(3)),
            event(user_id="u", order_completed=order_completed("o", "12.34"), occurred_at=at(4)),
            ev(
                minutes=5,
                order_refunded=refund("o", "r", "1.00"),
                context=ingest_pb2.EventContext(locale="fr"),
            ),
            ev(minutes=6, order_cancelled=cancel("o2"), source=SERVER),
            ev(minutes=7, loyalty_changed=ingest_pb2.LoyaltyChanged(points=3, tier="bronze")),
            ev(minutes=8, consent_changed=consent(ingest_pb2.CHANNEL_PUSH, True)),
            ev(minutes=9, source=EMAIL, **HARD),
            ev(minutes=10, source=EMAIL, email_unsubscribed=ingest_pb2.EmailUnsubscribed(message=message())),
        ]
    )
    assert from_json(json.loads(json.dumps(to_json(state)))) == state


LEGACY_ROW: dict[str, Any] = {
    # What the first layout of to_json stored.
    "traits": {
        "first_name": {
            "value": "Ada",
            "occurred_at": "2026-11-24T12:01:00+00:00",
            "source_priority": 60,
            "event_id": "e1",
        }
    },
    "cart": [{"sku": "a", "name": "A", "quantity": 2, "unit_price": {"amount": "5.50", "currency": "EUR"}}],
    "cart_updated_at": "2026-11-24T12:02:00+00:00",
    "recently_viewed": [
        {
            "sku": "p",
            "name": "P",
            "price": None,
            "category": "shoes",
            "url": "",
            "viewed_at": "2026-11-24T12:03:00+00:00",
        }
    ],
    "orders": [
        {
            "order_id": "o",
            "total": {"amount": "12.34", "currency": "EUR"},
            "ordered_at": "2026-11-24T12:04:00+00:00",
        }
    ],
    "newest": ["2026-11-24T12:04:00+00:00", 50, "e4"],
}


def test_states_stored_by_the_first_layout_still_load_and_get_replayed() -> None:
    state = from_json(LEGACY_ROW)
    assert state.traits["first_name"].value == "Ada"
    assert state.traits["first_name"].set_by.source == CRM
    assert [(c.sku, c.quantity) for c in state.cart] == [("a", 2)]
    assert state.cart_updated_at == at(2)
    assert [v.viewed_at for v in state.recently_viewed] == [at(3)]
    assert state.order_summary().lifetime_value == (Money(Decimal("12.34"), "EUR"),)
    assert state.schema == 1
    # Whatever comes next, the merger replays the history, which computes what layout 1 lacked.
    assert not state.is_newer(ev(minutes=60, identify=identify(a=1)))
    assert from_json({}) == ProfileState(schema=1)
    assert from_json(to_json(state)) == state


def test_long_histories_keep_the_state_bounded() -> None:
    events: list[ingest_pb2.Event] = []
    for i in range(600):
        events.append(ev(minutes=i, product_viewed=product_viewed(f"s{i % 50}")))
        events.append(ev(minutes=i, source=EMAIL, email_opened=ingest_pb2.EmailOpened(message=message())))
        events.append(ev(minutes=i, cart_item_added=cart_item_added(f"c{i % 5}")))
    state = ProfileState()
    for e in events:
        state = apply_event(state, e)
    assert state == replay(events)
    assert len(state.recently_viewed) == 20
    assert len(state.email.recent_opens) == 100
    assert len(state.cart) == 5 and len(state.cart_ops) == 1


# --- the property: any order, any duplicates, incremental or replayed --------------------------

_MINUTES = st.sampled_from([0, 1, 2, 60 * 24 * 20, 60 * 24 * 31, 60 * 24 * 45])
_SOURCES = [*ALL_SOURCES, ingest_pb2.EVENT_SOURCE_UNSPECIFIED]
_SKUS = st.sampled_from(["s1", "s2", "s3"])
_ORDERS = st.sampled_from(["o1", "o2", "o3"])
_AMOUNTS = st.sampled_from(["1.00", "2.50", "10.00", "0.01"])
_CURRENCIES = st.sampled_from(["EUR", "EUR", "USD"])
_CONTEXTS = st.one_of(
    st.none(),
    st.builds(
        ingest_pb2.EventContext,
        locale=st.sampled_from(["", "de-AT", "en-US"]),
        timezone=st.sampled_from(["", "Europe/Vienna"]),
        user_agent=st.sampled_from(["", IPHONE, WINDOWS]),
    ),
)
_PAYLOADS: list[st.SearchStrategy[dict[str, Any]]] = [
    st.builds(
        lambda traits: {"identify": identify(**traits)},
        st.dictionaries(
            st.sampled_from(["a", "b"]), st.one_of(st.integers(0, 3), st.sampled_from(["x", "y"])), min_size=1
        ),
    ),
    st.builds(lambda sku, price: {"product_viewed": product_viewed(sku, price=price)}, _SKUS, _AMOUNTS),
    st.builds(
        lambda sku, q, price: {"cart_item_added": cart_item_added(sku, q, price)},
        _SKUS,
        st.integers(1, 3),
        _AMOUNTS,
    ),
    st.builds(lambda sku, q: {"cart_item_removed": cart_item_removed(sku, q)}, _SKUS, st.integers(1, 3)),
    st.builds(
        lambda o, amount, cur, skus: {"order_completed": order(o, amount, cur, *skus)},
        _ORDERS,
        _AMOUNTS,
        _CURRENCIES,
        st.lists(_SKUS, max_size=2),
    ),
    st.builds(
        lambda o, r, amount, cur: {"order_refunded": refund(o, r, amount, cur)},
        _ORDERS,
        st.sampled_from(["r1", "r2", "r3"]),
        _AMOUNTS,
        _CURRENCIES,
    ),
    st.builds(lambda o: {"order_cancelled": cancel(o)}, _ORDERS),
    st.builds(
        lambda p, t: {"loyalty_changed": ingest_pb2.LoyaltyChanged(points=p, tier=t)},
        st.integers(0, 3),
        st.sampled_from(["gold", "silver"]),
    ),
    st.builds(
        lambda ch, sub: {"consent_changed": consent(ch, sub)},
        st.sampled_from([ingest_pb2.CHANNEL_EMAIL, ingest_pb2.CHANNEL_SMS, ingest_pb2.CHANNEL_UNSPECIFIED]),
        st.booleans(),
    ),
    st.sampled_from(
        [
            DELIVERED,
            HARD,
            SOFT,
            {"email_bounced": bounce(ingest_pb2.BOUNCE_TYPE_UNSPECIFIED)},
            {"email_opened": ingest_pb2.EmailOpened(message=message())},
            {"email_clicked": ingest_pb2.EmailClicked(message=message(), url="https://x.example/")},
            {"email_unsubscribed": ingest_pb2.EmailUnsubscribed(message=message())},
            {"email_spam_reported": ingest_pb2.EmailSpamReported(message=message())},
            {"page_viewed": ingest_pb2.PageViewed(url="https://shop.example/")},
        ]
    ),
]


@st.composite
def histories(draw: st.DrawFn) -> list[ingest_pb2.Event]:
    # A few event types and sources per history, so that ties and repeats are common.
    kinds = draw(st.lists(st.sampled_from(_PAYLOADS), min_size=1, max_size=3, unique_by=id))
    sources = draw(st.lists(st.sampled_from(_SOURCES), min_size=2, max_size=3, unique=True))
    times = draw(st.lists(_MINUTES, min_size=1, max_size=3, unique=True))
    events = []
    for i in range(draw(st.integers(1, 24))):
        # Random ids, so that ties on time and source fall either way; unique by the suffix.
        event_id = f"{draw(st.integers(0, 99)):02d}-{i}"
        built = ev(
            minutes=draw(st.sampled_from(times)),
            source=draw(st.sampled_from(sources)),
            event_id=event_id,
            context=draw(_CONTEXTS),
            **draw(st.one_of(kinds)),
        )
        events.append(built)
    return events


@st.composite
def arrivals(draw: st.DrawFn) -> tuple[list[ingest_pb2.Event], list[ingest_pb2.Event], MergeRules]:
    """A history, the same events in another order with duplicates, and merge rules."""
    events = draw(histories())
    duplicates = draw(st.lists(st.sampled_from(events), max_size=5))
    arrived = draw(st.permutations([*events, *duplicates]))
    return events, arrived, draw(st.sampled_from([DEFAULT_RULES, REVERSED_RULES]))


@settings(max_examples=200, deadline=None, database=None)
@given(arrivals())
def test_the_state_is_a_function_of_the_set_of_events(
    case: tuple[list[ingest_pb2.Event], list[ingest_pb2.Event], MergeRules],
) -> None:
    events, arrived, rules = case
    # Small bounds, so that the property covers what falls off the bounded lists.
    with (
        mock.patch.object(state_module, "RECENTLY_VIEWED_LIMIT", 2),
        mock.patch.object(state_module, "RECENT_EMAIL_TIMES_LIMIT", 3),
    ):
        expected = replay(events, rules=rules)
        assert replay(arrived, rules=rules) == expected

        # What the merger does: fold a newer event, replay everything seen for any other one.
        state, seen = ProfileState(), []
        for e in arrived:
            seen.append(e)
            state = apply_event(state, e, rules=rules) if state.is_newer(e) else replay(seen, rules=rules)
        assert state == expected

        check_against_a_model(events, expected, rules)

    # Through PostgreSQL's json and back, the state and its JSON form stay the same (a rebuild
    # compares JSON forms).
    stored = json.loads(json.dumps(to_json(expected)))
    assert from_json(stored) == expected
    assert to_json(from_json(stored)) == stored


def check_against_a_model(events: list[ingest_pb2.Event], state: ProfileState, rules: MergeRules) -> None:
    """The latest-wins attributes and the cart, computed the obvious way from the whole set."""

    def key(e: ingest_pb2.Event, attribute: str) -> tuple[datetime, int, str]:
        return (e.occurred_at.ToDatetime(tzinfo=NOW.tzinfo), rules.priority(attribute, e.source), e.event_id)

    def of(kind: str) -> list[ingest_pb2.Event]:
        return [e for e in events if e.WhichOneof("payload") == kind]

    traits: dict[str, Any] = {}
    for name in ("a", "b"):
        setting = [e for e in of("identify") if name in e.identify.traits]
        if setting:
            winner = max(setting, key=lambda e: key(e, f"traits.{name}"))
            traits[name] = winner.identify.traits[name]
    assert {name: t.value for name, t in state.traits.items()} == traits

    loyalty = max(of("loyalty_changed"), key=lambda e: key(e, "loyalty"), default=None)
    assert (state.loyalty.set_by.event_id if state.loyalty else None) == (
        loyalty.event_id if loyalty else None
    )

    for channel, name in ((ingest_pb2.CHANNEL_EMAIL, "email"), (ingest_pb2.CHANNEL_SMS, "sms")):
        changes = [e for e in of("consent_changed") if e.consent_changed.channel == channel]
        latest = max(changes, key=lambda e: key(e, f"consents.{name}"), default=None)
        current = state.consents.get(channel)
        assert (current.set_by.event_id if current else None) == (latest.event_id if latest else None)

    views: dict[str, ingest_pb2.Event] = {}
    for e in sorted(of("product_viewed"), key=lambda e: key(e, "recently_viewed")):
        views[e.product_viewed.sku] = e
    newest = sorted(views.values(), key=lambda e: key(e, "recently_viewed"), reverse=True)
    expected_views = [e.event_id for e in newest[: state_module.RECENTLY_VIEWED_LIMIT]]
    assert [v.set_by.event_id for v in state.recently_viewed] == expected_views

    # The cart: instants in time order, the changes of one instant in the cart's priority order.
    first_reports: dict[str, ingest_pb2.Event] = {}
    for e in sorted(of("order_completed"), key=state_module.event_order_key, reverse=True):
        first_reports[e.order_completed.order_id] = e
    changes = [*of("cart_item_added"), *of("cart_item_removed"), *first_reports.values()]
    lines: dict[str, int] = {}
    for e in sorted(changes, key=lambda e: key(e, "cart")):
        kind = e.WhichOneof("payload")
        if kind == "cart_item_added":
            lines[e.cart_item_added.sku] = lines.get(e.cart_item_added.sku, 0) + e.cart_item_added.quantity
        elif kind == "cart_item_removed":
            left = lines.pop(e.cart_item_removed.sku, 0) - e.cart_item_removed.quantity
            if left > 0:
                lines[e.cart_item_removed.sku] = left
        else:
            bought = {line.sku for line in e.order_completed.lines}
            lines = {sku: q for sku, q in lines.items() if bought and sku not in bought}
    assert {c.sku: c.quantity for c in state.cart} == lines
