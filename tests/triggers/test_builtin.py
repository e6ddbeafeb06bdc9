"""The ready-made triggers: valid, and behaving as issue 17 describes them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf import json_format

from sendtime.ingest.v1 import ingest_pb2
from sendtime.triggers.v1 import triggers_pb2
from triggers.builtin import (
    BROWSE_ABANDONED,
    BUILTIN,
    CART_ABANDONED,
    ORDER_COMPLETED,
    browse_abandoned,
    cart_abandoned,
    order_completed,
)
from triggers.episodes import (
    DueAction,
    Episode,
    EpisodeState,
    EventAction,
    IncomingEvent,
    Reason,
    due_at,
    on_due,
    on_event,
)
from triggers.trigger_validation import Reentry, TriggerDefinition, check_trigger_id, validate_trigger

T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
DESTINATIONS = ["destinations/esp"]


def event(payload: str, occurred: datetime, **fields: object) -> IncomingEvent:
    message = json_format.ParseDict({payload: fields}, ingest_pb2.Event())
    message.occurred_at.FromDatetime(occurred)
    return IncomingEvent.of(message)


@pytest.mark.parametrize("trigger_id", sorted(BUILTIN))
@pytest.mark.parametrize("template", ["", "templates/reminder"])
def test_every_builtin_trigger_is_valid(trigger_id: str, template: str) -> None:
    assert check_trigger_id(trigger_id) == []
    trigger = BUILTIN[trigger_id](["destinations/esp", "destinations/crm"], template)
    definition = validate_trigger(trigger)
    assert definition.delivery.destinations == ("destinations/esp", "destinations/crm")
    assert definition.delivery.template == template


def test_builtin_triggers_refuse_invalid_destinations() -> None:
    with pytest.raises(ValueError, match="trigger.delivery.destinations"):
        validate_trigger(cart_abandoned([]))


def test_cart_abandoned() -> None:
    definition = validate_trigger(cart_abandoned(DESTINATIONS))
    assert definition.entry.event_type == "cart_item_added"
    assert definition.wait.after == timedelta(hours=1)
    assert definition.reentry == Reentry.RESTART
    assert not definition.keyed
    assert sorted(e.event.event_type for e in definition.exits) == ["checkout_started", "order_completed"]
    assert all(e.key is None for e in definition.exits)
    assert [c.path.text for c in definition.profile_conditions] == ["cart.items"]
    assert definition.cooldown == timedelta(hours=12)


def test_browse_abandoned() -> None:
    definition = validate_trigger(browse_abandoned(DESTINATIONS))
    assert definition.entry.event_type == "product_viewed"
    assert definition.episode_key is not None and definition.episode_key.text == "product_viewed.sku"
    assert definition.wait.after == timedelta(hours=2)
    keys = {e.event.event_type: e.key.text if e.key else None for e in definition.exits}
    assert keys == {"cart_item_added": "cart_item_added.sku", "order_completed": None}
    assert definition.cooldown == timedelta(days=7)


def test_order_completed() -> None:
    definition = validate_trigger(order_completed(DESTINATIONS, "templates/thanks"))
    assert definition.wait.after == timedelta(0)
    assert definition.episode_key is not None and definition.episode_key.text == "order_completed.order_id"
    assert definition.exits == () and definition.cooldown is None
    assert definition.reentry == Reentry.KEEP


def test_the_delays_and_cooldowns_can_be_chosen() -> None:
    definition = validate_trigger(
        cart_abandoned(DESTINATIONS, delay=timedelta(hours=4), cooldown=timedelta(0))
    )
    assert definition.wait.after == timedelta(hours=4) and definition.cooldown is None


def test_the_ids() -> None:
    assert (CART_ABANDONED, BROWSE_ABANDONED, ORDER_COMPLETED) == (
        "cart-abandoned",
        "browse-abandoned",
        "order-completed",
    )
    assert isinstance(BUILTIN[ORDER_COMPLETED](DESTINATIONS, ""), triggers_pb2.Trigger)


# ---- the stories of issue 17 ------------------------------------------------------------------

CART = validate_trigger(cart_abandoned(DESTINATIONS))
BROWSE = validate_trigger(browse_abandoned(DESTINATIONS))
ORDER = validate_trigger(order_completed(DESTINATIONS))
WITH_CART = {"cart": {"items": [{"sku": "a"}]}}


def apply(
    definition: TriggerDefinition, episode: Episode | None, incoming: IncomingEvent, **kwargs: object
) -> Episode | None:
    decision = on_event(definition, incoming, episode, **kwargs)  # type: ignore[arg-type]
    return decision.episode or episode


def test_a_cart_is_reminded_once_and_new_activity_a_day_later_is_a_new_episode() -> None:
    episode = apply(CART, None, event("cart_item_added", T0, sku="a", quantity=1))
    episode = apply(CART, episode, event("cart_item_added", T0 + timedelta(minutes=20), sku="b", quantity=1))
    assert episode is not None and episode.fire_at == T0 + timedelta(minutes=80)
    fire = on_due(CART, episode, now=due_at(CART, episode), profile=WITH_CART)
    assert fire.action == DueAction.FIRE and fire.episode is not None
    fired_at = due_at(CART, episode)
    # The same cart, touched again an hour later: no second reminder (cooldown).
    again = on_event(CART, event("cart_item_added", T0 + timedelta(hours=2), sku="c"), fire.episode)
    assert again.reason == Reason.COOLDOWN
    # New cart activity the next day: a new episode, reminded an hour later.
    next_day = on_event(
        CART, event("cart_item_added", T0 + timedelta(days=1), sku="d"), fire.episode, last_fire_time=fired_at
    )
    assert next_day.action == EventAction.OPEN
    assert next_day.episode is not None and next_day.episode.fire_at == T0 + timedelta(days=1, hours=1)


@pytest.mark.parametrize("exit_type", ["checkout_started", "order_completed"])
def test_a_cart_exits_on_checkout_or_order(exit_type: str) -> None:
    episode = apply(CART, None, event("cart_item_added", T0, sku="a"))
    decision = on_event(CART, event(exit_type, T0 + timedelta(minutes=30)), episode)
    assert decision.action == EventAction.EXIT


def test_an_emptied_cart_is_not_reminded() -> None:
    episode = apply(CART, None, event("cart_item_added", T0, sku="a"))
    assert episode is not None
    decision = on_due(CART, episode, now=due_at(CART, episode), profile={"cart": {}})
    assert (decision.action, decision.reason) == (DueAction.END, Reason.PROFILE_CONDITIONS)


def test_browse_waits_per_sku_and_the_cart_ends_the_skus_wait() -> None:
    viewed_a = apply(BROWSE, None, event("product_viewed", T0, sku="a"))
    viewed_b = apply(BROWSE, None, event("product_viewed", T0 + timedelta(minutes=5), sku="b"))
    assert viewed_a is not None and viewed_b is not None and (viewed_a.key, viewed_b.key) == ("a", "b")
    added_a = event("cart_item_added", T0 + timedelta(minutes=10), sku="a")
    assert on_event(BROWSE, added_a, viewed_a).action == EventAction.EXIT
    assert on_event(BROWSE, added_a, viewed_b).reason == Reason.NOT_MATCHED
    # b fires; a third sku falling due later the same week ends by the cooldown.
    fire = on_due(BROWSE, viewed_b, now=due_at(BROWSE, viewed_b), profile={})
    assert fire.action == DueAction.FIRE
    viewed_c = Episode("c", EpisodeState.WAITING, T0, T0, T0 + timedelta(hours=3))
    later = on_due(
        BROWSE, viewed_c, now=due_at(BROWSE, viewed_c), profile={}, last_fire_time=due_at(BROWSE, viewed_b)
    )
    assert later.reason == Reason.COOLDOWN


def test_an_order_fires_at_once_and_once() -> None:
    placed = event("order_completed", T0, order_id="o-1")
    opened = on_event(ORDER, placed, None)
    assert opened.action == EventAction.OPEN and opened.episode is not None
    assert opened.episode.key == "o-1" and opened.episode.fire_at == T0
    fire = on_due(ORDER, opened.episode, now=T0 + timedelta(seconds=5), profile={})
    assert fire.action == DueAction.FIRE and fire.episode is not None
    # The same order reported again (another source, a replay): nothing more.
    assert on_event(
        ORDER, event("order_completed", T0 + timedelta(minutes=1), order_id="o-1"), fire.episode
    ).reason == (Reason.ALREADY_FIRED)
    assert on_event(ORDER, placed, opened.episode).action == EventAction.KEEP
