"""The ready-made triggers are valid triggers."""

from __future__ import annotations

from datetime import timedelta

import pytest

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
from triggers.trigger_validation import Reentry, check_trigger_id, validate_trigger

DESTINATIONS = ["destinations/esp"]


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
