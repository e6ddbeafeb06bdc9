"""The profile as a pure function of a customer's events.

``apply_event`` folds one event into a ``ProfileState``; ``replay`` folds a whole history in
event order (occurred_at, then source priority, then event id). Folding events in that order
makes the result independent of arrival order: the merger applies an event incrementally when it
is the newest one, and replays the history when it arrives late.

No I/O here; states serialize to JSON for the ``customers.state`` column.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from google.protobuf import json_format
from google.type import money_pb2

from sendtime.ingest.v1 import ingest_pb2

RECENTLY_VIEWED_LIMIT = 20
NANOS_PER_UNIT = Decimal(1_000_000_000)

# Ties on occurred_at go to the more authoritative source: people maintaining the CRM over
# backend systems over imports over engagement data over browsing.
SOURCE_PRIORITY: Mapping[int, int] = {
    ingest_pb2.EVENT_SOURCE_CRM: 60,
    ingest_pb2.EVENT_SOURCE_SERVER: 50,
    ingest_pb2.EVENT_SOURCE_IMPORT: 40,
    ingest_pb2.EVENT_SOURCE_EMAIL: 30,
    ingest_pb2.EVENT_SOURCE_MOBILE_APP: 20,
    ingest_pb2.EVENT_SOURCE_WEB: 10,
}

OrderKey = tuple[datetime, int, str]


def event_order_key(event: ingest_pb2.Event) -> OrderKey:
    """Where an event stands in a customer's history: by occurred_at, then source priority,
    then event id (so that ties are broken the same way everywhere)."""
    return (
        event.occurred_at.ToDatetime(tzinfo=UTC),
        SOURCE_PRIORITY.get(event.source, 0),
        event.event_id,
    )


@dataclass(frozen=True, slots=True)
class Money:
    amount: Decimal
    currency: str

    @classmethod
    def from_proto(cls, money: money_pb2.Money) -> Money:
        return cls(Decimal(money.units) + Decimal(money.nanos) / NANOS_PER_UNIT, money.currency_code)


@dataclass(frozen=True, slots=True)
class Trait:
    value: Any  # a JSON value
    occurred_at: datetime
    source_priority: int
    event_id: str

    @property
    def order_key(self) -> OrderKey:
        return (self.occurred_at, self.source_priority, self.event_id)


@dataclass(frozen=True, slots=True)
class CartLine:
    sku: str
    name: str
    quantity: int
    unit_price: Money


@dataclass(frozen=True, slots=True)
class ProductView:
    sku: str
    name: str
    price: Money | None
    category: str
    url: str
    viewed_at: datetime


@dataclass(frozen=True, slots=True)
class OrderRecord:
    order_id: str
    total: Money
    ordered_at: datetime


@dataclass(frozen=True, slots=True)
class ProfileState:
    traits: Mapping[str, Trait] = field(default_factory=dict)
    cart: tuple[CartLine, ...] = ()
    cart_updated_at: datetime | None = None
    recently_viewed: tuple[ProductView, ...] = ()  # newest first, one per sku
    orders: tuple[OrderRecord, ...] = ()  # newest first, one per order id
    # The order key of the newest event applied: an event before it needs a replay.
    newest: OrderKey | None = None

    def is_newer(self, event: ingest_pb2.Event) -> bool:
        """Whether ``event`` comes after every event already applied."""
        return self.newest is None or event_order_key(event) > self.newest


def apply_event(state: ProfileState, event: ingest_pb2.Event) -> ProfileState:
    """The state after ``event``, assuming it comes after every event already applied."""
    occurred_at = event.occurred_at.ToDatetime(tzinfo=UTC)
    payload = event.WhichOneof("payload")
    if payload == "identify":
        state = _identify(state, event, occurred_at)
    elif payload == "product_viewed":
        state = _product_viewed(state, event.product_viewed, occurred_at)
    elif payload == "cart_item_added":
        state = _cart_item_added(state, event.cart_item_added, occurred_at)
    elif payload == "cart_item_removed":
        state = _cart_item_removed(state, event.cart_item_removed, occurred_at)
    elif payload == "order_completed":
        state = _order_completed(state, event.order_completed, occurred_at)
    key = event_order_key(event)
    return replace(state, newest=key if state.newest is None else max(state.newest, key))


def replay(events: Iterable[ingest_pb2.Event]) -> ProfileState:
    """The state of a whole history, whatever order ``events`` come in; duplicates count once."""
    unique = {e.event_id: e for e in events}
    state = ProfileState()
    for event in sorted(unique.values(), key=event_order_key):
        state = apply_event(state, event)
    return state


def _identify(state: ProfileState, event: ingest_pb2.Event, occurred_at: datetime) -> ProfileState:
    traits = dict(state.traits)
    priority = SOURCE_PRIORITY.get(event.source, 0)
    incoming = json_format.MessageToDict(event.identify.traits)
    for name, value in incoming.items():
        candidate = Trait(value, occurred_at, priority, event.event_id)
        current = traits.get(name)
        # Latest occurred_at wins, never latest arrival; ties go to the higher-priority source.
        if current is None or candidate.order_key > current.order_key:
            traits[name] = candidate
    return replace(state, traits=traits)


def _product_viewed(state: ProfileState, p: ingest_pb2.ProductViewed, at: datetime) -> ProfileState:
    view = ProductView(
        sku=p.sku,
        name=p.name,
        price=Money.from_proto(p.price) if p.HasField("price") else None,
        category=p.category,
        url=p.url,
        viewed_at=at,
    )
    others = [v for v in state.recently_viewed if v.sku != p.sku]
    views = sorted([view, *others], key=lambda v: v.viewed_at, reverse=True)
    return replace(state, recently_viewed=tuple(views[:RECENTLY_VIEWED_LIMIT]))


def _cart_item_added(state: ProfileState, p: ingest_pb2.CartItemAdded, at: datetime) -> ProfileState:
    price = Money.from_proto(p.unit_price)
    lines = list(state.cart)
    for i, line in enumerate(lines):
        if line.sku == p.sku:
            lines[i] = CartLine(p.sku, p.name or line.name, line.quantity + p.quantity, price)
            break
    else:
        lines.append(CartLine(p.sku, p.name, p.quantity, price))
    return replace(state, cart=tuple(lines), cart_updated_at=at)


def _cart_item_removed(state: ProfileState, p: ingest_pb2.CartItemRemoved, at: datetime) -> ProfileState:
    lines: list[CartLine] = []
    for line in state.cart:
        if line.sku == p.sku:
            remaining = line.quantity - p.quantity
            if remaining > 0:
                lines.append(replace(line, quantity=remaining))
        else:
            lines.append(line)
    return replace(state, cart=tuple(lines), cart_updated_at=at)


def _order_completed(state: ProfileState, p: ingest_pb2.OrderCompleted, at: datetime) -> ProfileState:
    if any(o.order_id == p.order_id for o in state.orders):
        return state  # the same order reported again under another event id
    order = OrderRecord(p.order_id, Money.from_proto(p.total), at)
    orders = sorted([order, *state.orders], key=lambda o: o.ordered_at, reverse=True)
    # Checking out empties the cart of what was bought (all of it when the order lists no lines).
    bought = {line.sku for line in p.lines}
    cart = tuple(line for line in state.cart if bought and line.sku not in bought)
    return replace(state, orders=tuple(orders), cart=cart, cart_updated_at=at)


# --- JSON form, for the customers.state column -------------------------------------------------


def _money_json(m: Money | None) -> dict[str, str] | None:
    return None if m is None else {"amount": str(m.amount), "currency": m.currency}


def _money_from(d: Mapping[str, str]) -> Money:
    return Money(Decimal(d["amount"]), d["currency"])


def _optional_money_from(d: Mapping[str, str] | None) -> Money | None:
    return None if d is None else _money_from(d)


def _time(s: str) -> datetime:
    return datetime.fromisoformat(s)


def to_json(state: ProfileState) -> dict[str, Any]:
    """A JSON-compatible form of ``state``; ``from_json`` reads it back unchanged."""
    return {
        "traits": {
            name: {
                "value": t.value,
                "occurred_at": t.occurred_at.isoformat(),
                "source_priority": t.source_priority,
                "event_id": t.event_id,
            }
            for name, t in state.traits.items()
        },
        "cart": [
            {"sku": c.sku, "name": c.name, "quantity": c.quantity, "unit_price": _money_json(c.unit_price)}
            for c in state.cart
        ],
        "cart_updated_at": state.cart_updated_at.isoformat() if state.cart_updated_at else None,
        "recently_viewed": [
            {
                "sku": v.sku,
                "name": v.name,
                "price": _money_json(v.price),
                "category": v.category,
                "url": v.url,
                "viewed_at": v.viewed_at.isoformat(),
            }
            for v in state.recently_viewed
        ],
        "orders": [
            {"order_id": o.order_id, "total": _money_json(o.total), "ordered_at": o.ordered_at.isoformat()}
            for o in state.orders
        ],
        "newest": None
        if state.newest is None
        else [state.newest[0].isoformat(), state.newest[1], state.newest[2]],
    }


def from_json(data: Mapping[str, Any]) -> ProfileState:
    """The state stored by ``to_json``."""
    newest = data.get("newest")
    return ProfileState(
        traits={
            name: Trait(t["value"], _time(t["occurred_at"]), int(t["source_priority"]), t["event_id"])
            for name, t in data.get("traits", {}).items()
        },
        cart=tuple(
            CartLine(c["sku"], c["name"], int(c["quantity"]), _money_from(c["unit_price"]))
            for c in data.get("cart", [])
        ),
        cart_updated_at=_time(data["cart_updated_at"]) if data.get("cart_updated_at") else None,
        recently_viewed=tuple(
            ProductView(
                v["sku"],
                v["name"],
                _optional_money_from(v["price"]),
                v["category"],
                v["url"],
                _time(v["viewed_at"]),
            )
            for v in data.get("recently_viewed", [])
        ),
        orders=tuple(
            OrderRecord(o["order_id"], _money_from(o["total"]), _time(o["ordered_at"]))
            for o in data.get("orders", [])
        ),
        newest=None if newest is None else (_time(newest[0]), int(newest[1]), str(newest[2])),
    )
