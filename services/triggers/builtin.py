"""The three ready-made triggers of issue 17, as ``Trigger`` messages to create like any other
(``validate_trigger`` accepts them; tests/triggers/test_builtin.py checks it). Each needs the
destinations its fires go to, and optionally a stored template to render.

- **Cart abandoned**: a cart item added opens the customer's one episode (no episode key: the
  cart is the customer's); more cart activity restarts the hour (RESTART); a checkout started or
  an order completed ends it; a cart emptied by then is a profile condition checked at the fire
  (``cart.items EXISTS``). A 12 h cooldown: the next cart activity after that (a day later)
  is a new episode; activity right after a reminder is not another one.
- **Browse abandoned**: a product viewed opens an episode for its sku; viewing it again restarts
  the two hours; adding that sku to the cart, or any order, ends it. The 7-day cooldown counts
  across skus, so a customer who browsed five products gets one reminder a week (the first sku
  to fall due; the others end as COOLDOWN).
- **Order completed**: fires at once, once per order id (KEEP: a second event for the same
  order changes nothing; a keyed trigger without cooldown never fires twice for a key).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Final

from google.protobuf import duration_pb2

from sendtime.triggers.v1 import triggers_pb2

CART_ABANDONED: Final = "cart-abandoned"
BROWSE_ABANDONED: Final = "browse-abandoned"
ORDER_COMPLETED: Final = "order-completed"


def _duration(value: timedelta) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(value)
    return duration


def _delivery(destinations: Sequence[str], template: str) -> triggers_pb2.DeliverySpec:
    return triggers_pb2.DeliverySpec(destinations=list(destinations), template=template)


def _exit(event_type: str, key: str = "") -> triggers_pb2.ExitMatch:
    return triggers_pb2.ExitMatch(event=triggers_pb2.EventMatch(event_type=event_type), key=key)


def cart_abandoned(
    destinations: Sequence[str],
    template: str = "",
    *,
    delay: timedelta = timedelta(hours=1),
    cooldown: timedelta = timedelta(hours=12),
) -> triggers_pb2.Trigger:
    """Cart abandoned: ``delay`` after the last cart activity, unless the customer checked out,
    ordered or emptied the cart."""
    return triggers_pb2.Trigger(
        display_name="Cart abandoned",
        entry=triggers_pb2.EventMatch(event_type="cart_item_added"),
        profile_conditions=[triggers_pb2.Condition(path="cart.items", operator=triggers_pb2.OPERATOR_EXISTS)],
        delay=triggers_pb2.Delay(after=_duration(delay)),
        exits=[_exit("checkout_started"), _exit("order_completed")],
        reentry=triggers_pb2.REENTRY_RESTART,
        cooldown=_duration(cooldown),
        delivery=_delivery(destinations, template),
    )


def browse_abandoned(
    destinations: Sequence[str],
    template: str = "",
    *,
    delay: timedelta = timedelta(hours=2),
    cooldown: timedelta = timedelta(days=7),
) -> triggers_pb2.Trigger:
    """Browse abandoned: ``delay`` after a product was last viewed, unless it went into the cart
    or the customer ordered."""
    return triggers_pb2.Trigger(
        display_name="Browse abandoned",
        entry=triggers_pb2.EventMatch(event_type="product_viewed"),
        delay=triggers_pb2.Delay(after=_duration(delay)),
        exits=[_exit("cart_item_added", key="cart_item_added.sku"), _exit("order_completed")],
        episode_key="product_viewed.sku",
        reentry=triggers_pb2.REENTRY_RESTART,
        cooldown=_duration(cooldown),
        delivery=_delivery(destinations, template),
    )


def order_completed(destinations: Sequence[str], template: str = "") -> triggers_pb2.Trigger:
    """Order completed: at once, once per order."""
    return triggers_pb2.Trigger(
        display_name="Order completed",
        entry=triggers_pb2.EventMatch(event_type="order_completed"),
        delay=triggers_pb2.Delay(after=_duration(timedelta(0))),
        episode_key="order_completed.order_id",
        reentry=triggers_pb2.REENTRY_KEEP,
        delivery=_delivery(destinations, template),
    )


# The ready-made triggers by the id they are offered under.
BUILTIN: Final[Mapping[str, Callable[[Sequence[str], str], triggers_pb2.Trigger]]] = {
    CART_ABANDONED: cart_abandoned,
    BROWSE_ABANDONED: browse_abandoned,
    ORDER_COMPLETED: order_completed,
}
