"""The profile as a pure fold of events."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta
from decimal import Decimal

from profile_service.state import Money, ProfileState, apply_event, from_json, replay, to_json
from sendtime.ingest.v1 import ingest_pb2
from tests.factories import (
    NOW,
    cart_item_added,
    cart_item_removed,
    event,
    identify,
    order_completed,
    product_viewed,
)


def at(minutes: int) -> datetime:
    return NOW + timedelta(minutes=minutes)


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


def test_latest_occurred_at_wins_not_latest_arrival() -> None:
    newer = event(user_id="u", identify=identify(first_name="New"), occurred_at=at(2))
    older = event(user_id="u", identify=identify(first_name="Old"), occurred_at=at(1))
    state = replay([newer, older])
    assert state.traits["first_name"].value == "New"


def test_on_equal_times_the_more_authoritative_source_wins() -> None:
    web = event(
        user_id="u", source=ingest_pb2.EVENT_SOURCE_WEB, identify=identify(tier="web"), occurred_at=at(1)
    )
    crm = event(
        user_id="u", source=ingest_pb2.EVENT_SOURCE_CRM, identify=identify(tier="crm"), occurred_at=at(1)
    )
    assert replay([crm, web]).traits["tier"].value == "crm"
    assert replay([web, crm]).traits["tier"].value == "crm"


def test_recently_viewed_is_newest_first_and_unique() -> None:
    state = replay(
        [
            event(user_id="u", product_viewed=product_viewed("a"), occurred_at=at(1)),
            event(user_id="u", product_viewed=product_viewed("b"), occurred_at=at(2)),
            event(user_id="u", product_viewed=product_viewed("a"), occurred_at=at(3)),
        ]
    )
    assert [v.sku for v in state.recently_viewed] == ["a", "b"]


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
        ]
    )
    assert from_json(to_json(state)) == state
