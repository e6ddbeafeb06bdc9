"""The profile as a pure function of a customer's events.

``apply_event`` folds one event into a ``ProfileState``; ``replay`` folds a whole history in
event order (``event_order_key``: occurred_at, then a fixed source order, then event id). The
merger applies an event incrementally when it comes after everything folded so far, and replays
the history when it arrives late, so the state never depends on arrival order.

Which value an attribute holds does not depend on the fold order either: per attribute the value
with the latest occurred_at wins, and ties go to the source that the merge rules
(``profile_service.merge_rules``) rank higher for that attribute, then to the greater event id.
Each winner keeps its ``Provenance``. The cart, the one attribute built from a sequence of
changes, applies the changes that share an instant in the cart's own priority order.

No I/O here; states serialize to JSON for the ``customers.state`` column. See docs/profiles.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from babel.numbers import get_currency_precision
from google.protobuf import json_format
from google.type import money_pb2

from profile_service.merge_rules import DEFAULT_RULES, MergeRules
from sendtime.ingest.v1 import ingest_pb2

# Version of the state's layout. A state stored with an older layout lacks what newer code
# computes, so ``is_newer`` answers False for it and the merger replays the history.
STATE_SCHEMA = 2

RECENTLY_VIEWED_LIMIT = 20
RECENT_EMAIL_TIMES_LIMIT = 100
RECENT_EMAIL_WINDOW = timedelta(days=30)
NANOS_PER_UNIT = Decimal(1_000_000_000)

# The fold order of a history. It only has to be a total order; which value wins an attribute
# is decided by the merge rules. (These numbers are also stored in each state's ``newest`` key,
# so they stay as they are.)
SOURCE_PRIORITY: Mapping[int, int] = {
    ingest_pb2.EVENT_SOURCE_CRM: 60,
    ingest_pb2.EVENT_SOURCE_SERVER: 50,
    ingest_pb2.EVENT_SOURCE_IMPORT: 40,
    ingest_pb2.EVENT_SOURCE_EMAIL: 30,
    ingest_pb2.EVENT_SOURCE_MOBILE_APP: 20,
    ingest_pb2.EVENT_SOURCE_WEB: 10,
}
_SOURCE_OF_PRIORITY = {priority: source for source, priority in SOURCE_PRIORITY.items()}

OrderKey = tuple[datetime, int, str]
AttributeKey = tuple[datetime, int, str]

CHANNEL_NAMES: Mapping[int, str] = {
    ingest_pb2.CHANNEL_EMAIL: "email",
    ingest_pb2.CHANNEL_SMS: "sms",
    ingest_pb2.CHANNEL_PUSH: "push",
    ingest_pb2.CHANNEL_WHATSAPP: "whatsapp",
}


def event_order_key(event: ingest_pb2.Event) -> OrderKey:
    """Where an event stands in a customer's history: by occurred_at, then source (in a fixed
    order), then event id, so that ties are broken the same way everywhere."""
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
class Provenance:
    """The event that set a value."""

    source: int  # an ingest EventSource
    occurred_at: datetime
    event_id: str

    def key(self, attribute: str, rules: MergeRules) -> AttributeKey:
        """The order of competing values of ``attribute``: the greatest key wins."""
        return (self.occurred_at, rules.priority(attribute, self.source), self.event_id)


def _wins(candidate: Provenance, current: Provenance | None, attribute: str, rules: MergeRules) -> bool:
    return current is None or candidate.key(attribute, rules) > current.key(attribute, rules)


def _latest(
    candidate: Provenance, current: Provenance | None, attribute: str, rules: MergeRules
) -> Provenance:
    if current is None or _wins(candidate, current, attribute, rules):
        return candidate
    return current


@dataclass(frozen=True, slots=True)
class Trait:
    value: Any  # a JSON value
    set_by: Provenance

    @property
    def occurred_at(self) -> datetime:
        return self.set_by.occurred_at

    @property
    def event_id(self) -> str:
        return self.set_by.event_id


@dataclass(frozen=True, slots=True)
class CartLine:
    sku: str
    name: str
    quantity: int
    unit_price: Money


@dataclass(frozen=True, slots=True)
class CartOp:
    """One change to the cart: ``add`` or ``remove`` of a sku, or an ``order`` that bought
    ``skus`` (everything in the cart when it lists none)."""

    kind: str
    set_by: Provenance
    sku: str = ""
    name: str = ""
    quantity: int = 0
    unit_price: Money | None = None
    skus: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ProductView:
    sku: str
    name: str
    price: Money | None
    category: str
    url: str
    set_by: Provenance

    @property
    def viewed_at(self) -> datetime:
        return self.set_by.occurred_at


@dataclass(frozen=True, slots=True)
class OrderRecord:
    order_id: str
    total: Money
    ordered_at: datetime  # when it was first reported
    set_by: Provenance  # the report whose total counts (the latest one)
    skus: tuple[str, ...] = ()  # what was bought, from every report of the order


@dataclass(frozen=True, slots=True)
class Refund:
    refund_id: str
    order_id: str
    amount: Money
    set_by: Provenance


@dataclass(frozen=True, slots=True)
class Loyalty:
    points: int
    tier: str
    set_by: Provenance


@dataclass(frozen=True, slots=True)
class ConsentState:
    subscribed: bool
    set_by: Provenance


class BounceState:
    """Values of ``EmailState.bounce_state``."""

    UNKNOWN = ""  # no delivery or bounce seen
    NONE = "none"
    SOFT = "soft"
    HARD = "hard"


@dataclass(frozen=True, slots=True)
class EmailState:
    # Newest first, at most RECENT_EMAIL_TIMES_LIMIT, within RECENT_EMAIL_WINDOW of the first.
    recent_delivered: tuple[datetime, ...] = ()
    recent_opens: tuple[datetime, ...] = ()
    recent_clicks: tuple[datetime, ...] = ()
    # The latest of each kind, by the "email.bounce_state" order.
    last_delivery: Provenance | None = None
    last_soft_bounce: Provenance | None = None
    last_hard_bounce: Provenance | None = None
    bounce_state: str = BounceState.UNKNOWN
    bounce_set_by: Provenance | None = None
    # The latest of each kind, by the "email.unsubscribed" order.
    last_unsubscribe: Provenance | None = None
    last_opt_in: Provenance | None = None  # consent_changed(EMAIL, subscribed=true)
    unsubscribed: bool = False
    unsubscribed_set_by: Provenance | None = None
    last_spam_report: Provenance | None = None

    @property
    def spam_reported(self) -> bool:
        return self.last_spam_report is not None


@dataclass(frozen=True, slots=True)
class Seen:
    value: str
    set_by: Provenance


@dataclass(frozen=True, slots=True)
class LastSeenState:
    seen: Provenance | None = None  # the latest event with a context
    locale: Seen | None = None
    timezone: Seen | None = None
    user_agent: Seen | None = None


@dataclass(frozen=True, slots=True)
class OrderView:
    record: OrderRecord
    cancelled: bool
    refunded: Money | None  # refunds in the order's currency, at most its total; None: none


@dataclass(frozen=True, slots=True)
class OrderSummary:
    orders: tuple[OrderView, ...]  # newest first
    count: int  # every order placed, cancelled ones included
    cancelled_count: int
    last_order_time: datetime | None
    lifetime_value: tuple[Money, ...]  # per currency, by currency code
    average_order_value: tuple[Money, ...]  # per currency, by currency code


@dataclass(frozen=True, slots=True)
class ProfileState:
    traits: Mapping[str, Trait] = field(default_factory=dict)
    # The cart as it was before the latest cart instant, and the changes at that instant in
    # the cart's priority order (lowest first: the most authoritative change applies last).
    cart_base: tuple[CartLine, ...] = ()
    cart_ops: tuple[CartOp, ...] = ()
    cart_updated_at: datetime | None = None
    recently_viewed: tuple[ProductView, ...] = ()  # newest first, one per sku
    orders: tuple[OrderRecord, ...] = ()  # newest first, one per order id
    refunds: Mapping[str, Refund] = field(default_factory=dict)  # by refund id
    cancellations: Mapping[str, Provenance] = field(default_factory=dict)  # by order id
    orders_set_by: Provenance | None = None  # the latest order, refund or cancellation
    loyalty: Loyalty | None = None
    consents: Mapping[int, ConsentState] = field(default_factory=dict)  # by ingest Channel
    email: EmailState = field(default_factory=EmailState)
    last_seen: LastSeenState = field(default_factory=LastSeenState)
    # The order key of the newest event applied: an event before it needs a replay.
    newest: OrderKey | None = None
    schema: int = STATE_SCHEMA

    def is_newer(self, event: ingest_pb2.Event) -> bool:
        """Whether ``apply_event`` may fold ``event`` into this state: it comes after every
        event already applied, and the state has the current layout (when not, replay)."""
        if self.schema != STATE_SCHEMA:
            return False
        return self.newest is None or event_order_key(event) > self.newest

    @property
    def cart(self) -> tuple[CartLine, ...]:
        """The open cart: lines in the order first added."""
        lines = self.cart_base
        for op in self.cart_ops:
            lines = _apply_cart_op(lines, op)
        return lines

    @property
    def cart_set_by(self) -> Provenance | None:
        """The cart change that applied last."""
        return self.cart_ops[-1].set_by if self.cart_ops else None

    def order_summary(self) -> OrderSummary:
        """Orders with their refunds and cancellations, and the totals (O(orders + refunds))."""
        refunded: dict[str, Decimal] = {}
        currency = {o.order_id: o.total.currency for o in self.orders}
        for refund in self.refunds.values():
            if currency.get(refund.order_id) == refund.amount.currency:
                refunded[refund.order_id] = refunded.get(refund.order_id, Decimal(0)) + refund.amount.amount
        views: list[OrderView] = []
        value: dict[str, Decimal] = {}
        counted: dict[str, int] = {}
        for order in self.orders:
            cancelled = order.order_id in self.cancellations
            back = min(refunded.get(order.order_id, Decimal(0)), order.total.amount)
            views.append(OrderView(order, cancelled, Money(back, order.total.currency) if back > 0 else None))
            if not cancelled:
                cur = order.total.currency
                value[cur] = value.get(cur, Decimal(0)) + order.total.amount - back
                counted[cur] = counted.get(cur, 0) + 1
        return OrderSummary(
            orders=tuple(views),
            count=len(self.orders),
            cancelled_count=sum(1 for v in views if v.cancelled),
            last_order_time=max((o.ordered_at for o in self.orders), default=None),
            lifetime_value=tuple(Money(value[c], c) for c in sorted(value)),
            average_order_value=tuple(
                Money(_round_to_currency(value[c] / counted[c], c), c) for c in sorted(value)
            ),
        )


def _round_to_currency(amount: Decimal, currency: str) -> Decimal:
    return amount.quantize(Decimal(1).scaleb(-get_currency_precision(currency)), rounding=ROUND_HALF_EVEN)


# --- the fold ----------------------------------------------------------------------------------

_Handler = Callable[[ProfileState, ingest_pb2.Event, Provenance, MergeRules], ProfileState]


def apply_event(
    state: ProfileState, event: ingest_pb2.Event, *, rules: MergeRules = DEFAULT_RULES
) -> ProfileState:
    """The state after ``event``, assuming it comes after every event already applied (see
    ``ProfileState.is_newer``). ``rules`` break ties between values of an attribute."""
    provenance = Provenance(event.source, event.occurred_at.ToDatetime(tzinfo=UTC), event.event_id)
    handler = _HANDLERS.get(event.WhichOneof("payload") or "")
    if handler is not None:
        state = handler(state, event, provenance, rules)
    if event.HasField("context"):
        state = _context(state, event.context, provenance, rules)
    key = event_order_key(event)
    return replace(state, newest=key if state.newest is None else max(state.newest, key))


def replay(events: Iterable[ingest_pb2.Event], *, rules: MergeRules = DEFAULT_RULES) -> ProfileState:
    """The state of a whole history, whatever order ``events`` come in; duplicates count once."""
    unique = {e.event_id: e for e in events}
    state = ProfileState()
    for event in sorted(unique.values(), key=event_order_key):
        state = apply_event(state, event, rules=rules)
    return state


def _identify(
    state: ProfileState, event: ingest_pb2.Event, by: Provenance, rules: MergeRules
) -> ProfileState:
    traits = dict(state.traits)
    for name, value in json_format.MessageToDict(event.identify.traits).items():
        current = traits.get(name)
        if _wins(by, current.set_by if current else None, f"traits.{name}", rules):
            traits[name] = Trait(value, by)
    return replace(state, traits=traits)


def _product_viewed(
    state: ProfileState, event: ingest_pb2.Event, by: Provenance, rules: MergeRules
) -> ProfileState:
    p = event.product_viewed
    for current in state.recently_viewed:
        if current.sku == p.sku and not _wins(by, current.set_by, "recently_viewed", rules):
            return state
    view = ProductView(
        sku=p.sku,
        name=p.name,
        price=Money.from_proto(p.price) if p.HasField("price") else None,
        category=p.category,
        url=p.url,
        set_by=by,
    )
    views = [view, *(v for v in state.recently_viewed if v.sku != p.sku)]
    views.sort(key=lambda v: v.set_by.key("recently_viewed", rules), reverse=True)
    return replace(state, recently_viewed=tuple(views[:RECENTLY_VIEWED_LIMIT]))


# The cart --------------------------------------------------------------------------------------


def _apply_cart_op(lines: tuple[CartLine, ...], op: CartOp) -> tuple[CartLine, ...]:
    if op.kind == "add":
        assert op.unit_price is not None
        added = list(lines)
        for i, line in enumerate(added):
            if line.sku == op.sku:
                added[i] = CartLine(op.sku, op.name or line.name, line.quantity + op.quantity, op.unit_price)
                break
        else:
            added.append(CartLine(op.sku, op.name, op.quantity, op.unit_price))
        return tuple(added)
    if op.kind == "remove":
        kept: list[CartLine] = []
        for line in lines:
            if line.sku != op.sku:
                kept.append(line)
            elif line.quantity > op.quantity:
                kept.append(replace(line, quantity=line.quantity - op.quantity))
        return tuple(kept)
    # An order empties the cart of what was bought (all of it when the order lists no lines).
    bought = set(op.skus)
    return tuple(line for line in lines if bought and line.sku not in bought)


def _with_cart_op(state: ProfileState, op: CartOp, rules: MergeRules) -> ProfileState:
    at = op.set_by.occurred_at
    if state.cart_updated_at is None or at > state.cart_updated_at:
        return replace(state, cart_base=state.cart, cart_ops=(op,), cart_updated_at=at)
    # Another change at the same instant: apply the instant's changes in the cart's order.
    ops = sorted([*state.cart_ops, op], key=lambda o: o.set_by.key("cart", rules))
    return replace(state, cart_ops=tuple(ops))


def _cart_item_added(
    state: ProfileState, event: ingest_pb2.Event, by: Provenance, rules: MergeRules
) -> ProfileState:
    p = event.cart_item_added
    op = CartOp(
        "add", by, sku=p.sku, name=p.name, quantity=p.quantity, unit_price=Money.from_proto(p.unit_price)
    )
    return _with_cart_op(state, op, rules)


def _cart_item_removed(
    state: ProfileState, event: ingest_pb2.Event, by: Provenance, rules: MergeRules
) -> ProfileState:
    p = event.cart_item_removed
    return _with_cart_op(state, CartOp("remove", by, sku=p.sku, quantity=p.quantity), rules)


# Orders ----------------------------------------------------------------------------------------


def _order_sort_key(order: OrderRecord) -> tuple[datetime, str]:
    return (order.ordered_at, order.order_id)


def _with_order_event(state: ProfileState, by: Provenance, rules: MergeRules) -> ProfileState:
    return replace(state, orders_set_by=_latest(by, state.orders_set_by, "orders", rules))


def _order_completed(
    state: ProfileState, event: ingest_pb2.Event, by: Provenance, rules: MergeRules
) -> ProfileState:
    p = event.order_completed
    total = Money.from_proto(p.total)
    existing = next((o for o in state.orders if o.order_id == p.order_id), None)
    others = [o for o in state.orders if o.order_id != p.order_id]
    if existing is None:
        record = OrderRecord(
            p.order_id, total, by.occurred_at, by, tuple(sorted({line.sku for line in p.lines}))
        )
        # The first report of an order empties the cart of what was bought.
        bought = tuple(dict.fromkeys(line.sku for line in p.lines))
        state = _with_cart_op(state, CartOp("order", by, skus=bought), rules)
    else:
        # The same order reported again: the latest report's total counts; it was placed when
        # first reported.
        record = replace(
            existing,
            ordered_at=min(existing.ordered_at, by.occurred_at),
            skus=tuple(sorted({*existing.skus, *(line.sku for line in p.lines)})),
        )
        if _wins(by, existing.set_by, "orders", rules):
            record = replace(record, total=total, set_by=by)
    orders = sorted([record, *others], key=_order_sort_key, reverse=True)
    return _with_order_event(replace(state, orders=tuple(orders)), by, rules)


def _order_refunded(
    state: ProfileState, event: ingest_pb2.Event, by: Provenance, rules: MergeRules
) -> ProfileState:
    p = event.order_refunded
    current = state.refunds.get(p.refund_id)
    if _wins(by, current.set_by if current else None, "orders", rules):
        refunds = dict(state.refunds)
        refunds[p.refund_id] = Refund(p.refund_id, p.order_id, Money.from_proto(p.amount), by)
        state = replace(state, refunds=refunds)
    return _with_order_event(state, by, rules)


def _order_cancelled(
    state: ProfileState, event: ingest_pb2.Event, by: Provenance, rules: MergeRules
) -> ProfileState:
    order_id = event.order_cancelled.order_id
    current = state.cancellations.get(order_id)
    if _wins(by, current, "orders", rules):
        state = replace(state, cancellations={**state.cancellations, order_id: by})
    return _with_order_event(state, by, rules)


# Loyalty and consent ---------------------------------------------------------------------------


def _loyalty_changed(
    state: ProfileState, event: ingest_pb2.Event, by: Provenance, rules: MergeRules
) -> ProfileState:
    p = event.loyalty_changed
    if _wins(by, state.loyalty.set_by if state.loyalty else None, "loyalty", rules):
        state = replace(state, loyalty=Loyalty(p.points, p.tier, by))
    return state


def _consent_changed(
    state: ProfileState, event: ingest_pb2.Event, by: Provenance, rules: MergeRules
) -> ProfileState:
    p = event.consent_changed
    name = CHANNEL_NAMES.get(p.channel)
    if name is None:
        return state
    current = state.consents.get(p.channel)
    if _wins(by, current.set_by if current else None, f"consents.{name}", rules):
        state = replace(state, consents={**state.consents, p.channel: ConsentState(p.subscribed, by)})
    if p.channel == ingest_pb2.CHANNEL_EMAIL and p.subscribed:
        email = state.email
        email = replace(email, last_opt_in=_latest(by, email.last_opt_in, "email.unsubscribed", rules))
        state = replace(state, email=_unsubscribe_state(email, rules))
    return state


# Email engagement ------------------------------------------------------------------------------


def _with_time(times: tuple[datetime, ...], at: datetime) -> tuple[datetime, ...]:
    """``times`` (newest first) with ``at``: at most RECENT_EMAIL_TIMES_LIMIT, and none older
    than RECENT_EMAIL_WINDOW before the newest. (Both cuts keep a prefix of the sorted times, so
    the result does not depend on the order the times come in.)"""
    merged = sorted((*times, at), reverse=True)[:RECENT_EMAIL_TIMES_LIMIT]
    oldest = merged[0] - RECENT_EMAIL_WINDOW
    return tuple(t for t in merged if t >= oldest)


def _bounce_state(email: EmailState, rules: MergeRules) -> EmailState:
    """Hard after a hard bounce until a later delivery (a later soft bounce does not lift it);
    soft after a soft bounce until a later delivery; none after a delivery."""
    attribute = "email.bounce_state"

    def after_delivery(bounce: Provenance | None) -> bool:
        return bounce is not None and _wins(bounce, email.last_delivery, attribute, rules)

    if after_delivery(email.last_hard_bounce):
        return replace(email, bounce_state=BounceState.HARD, bounce_set_by=email.last_hard_bounce)
    if after_delivery(email.last_soft_bounce):
        return replace(email, bounce_state=BounceState.SOFT, bounce_set_by=email.last_soft_bounce)
    if email.last_delivery is not None:
        return replace(email, bounce_state=BounceState.NONE, bounce_set_by=email.last_delivery)
    return replace(email, bounce_state=BounceState.UNKNOWN, bounce_set_by=None)


def _unsubscribe_state(email: EmailState, rules: MergeRules) -> EmailState:
    """Unsubscribed after an unsubscribe through an email, until a later email opt-in."""
    if email.last_unsubscribe is None:
        return email
    if _wins(email.last_unsubscribe, email.last_opt_in, "email.unsubscribed", rules):
        return replace(email, unsubscribed=True, unsubscribed_set_by=email.last_unsubscribe)
    return replace(email, unsubscribed=False, unsubscribed_set_by=email.last_opt_in)


def _email_delivered(
    state: ProfileState, event: ingest_pb2.Event, by: Provenance, rules: MergeRules
) -> ProfileState:
    email = state.email
    email = replace(
        email,
        recent_delivered=_with_time(email.recent_delivered, by.occurred_at),
        last_delivery=_latest(by, email.last_delivery, "email.bounce_state", rules),
    )
    return replace(state, email=_bounce_state(email, rules))


def _email_opened(
    state: ProfileState, event: ingest_pb2.Event, by: Provenance, rules: MergeRules
) -> ProfileState:
    return replace(
        state, email=replace(state.email, recent_opens=_with_time(state.email.recent_opens, by.occurred_at))
    )


def _email_clicked(
    state: ProfileState, event: ingest_pb2.Event, by: Provenance, rules: MergeRules
) -> ProfileState:
    return replace(
        state,
        email=replace(state.email, recent_clicks=_with_time(state.email.recent_clicks, by.occurred_at)),
    )


def _email_bounced(
    state: ProfileState, event: ingest_pb2.Event, by: Provenance, rules: MergeRules
) -> ProfileState:
    # soft, or a bounce of unknown type, unless hard
    return _bounced(state, event.email_bounced.bounce_type == ingest_pb2.BOUNCE_TYPE_HARD, by, rules)


def _bounced(state: ProfileState, hard: bool, by: Provenance, rules: MergeRules) -> ProfileState:
    email = state.email
    attribute = "email.bounce_state"
    if hard:
        email = replace(email, last_hard_bounce=_latest(by, email.last_hard_bounce, attribute, rules))
    else:
        email = replace(email, last_soft_bounce=_latest(by, email.last_soft_bounce, attribute, rules))
    return replace(state, email=_bounce_state(email, rules))


def _email_unsubscribed(
    state: ProfileState, event: ingest_pb2.Event, by: Provenance, rules: MergeRules
) -> ProfileState:
    email = state.email
    email = replace(email, last_unsubscribe=_latest(by, email.last_unsubscribe, "email.unsubscribed", rules))
    return replace(state, email=_unsubscribe_state(email, rules))


def _email_spam_reported(
    state: ProfileState, event: ingest_pb2.Event, by: Provenance, rules: MergeRules
) -> ProfileState:
    email = state.email
    latest = _latest(by, email.last_spam_report, "email.spam_reported", rules)
    return replace(state, email=replace(email, last_spam_report=latest))


_SUPPRESSED_AS: Mapping[int, _Handler] = {
    ingest_pb2.SUPPRESSION_REASON_HARD_BOUNCE: lambda s, e, by, r: _bounced(s, hard=True, by=by, rules=r),
    ingest_pb2.SUPPRESSION_REASON_SOFT_BOUNCE: lambda s, e, by, r: _bounced(s, hard=False, by=by, rules=r),
    ingest_pb2.SUPPRESSION_REASON_SPAM_REPORT: lambda s, e, by, r: _email_spam_reported(s, e, by, r),
    ingest_pb2.SUPPRESSION_REASON_UNSUBSCRIBE: lambda s, e, by, r: _email_unsubscribed(s, e, by, r),
}


def _email_suppressed(
    state: ProfileState, event: ingest_pb2.Event, by: Provenance, rules: MergeRules
) -> ProfileState:
    """A suppression-list entry counts as the bounce, spam report or unsubscribe it stands for."""
    handler = _SUPPRESSED_AS.get(event.email_suppressed.reason)
    return state if handler is None else handler(state, event, by, rules)


# Last seen -------------------------------------------------------------------------------------


def _context(
    state: ProfileState, context: ingest_pb2.EventContext, by: Provenance, rules: MergeRules
) -> ProfileState:
    if not (context.locale or context.timezone or context.user_agent):
        return state
    seen = state.last_seen

    def latest(current: Seen | None, value: str) -> Seen | None:
        if value and _wins(by, current.set_by if current else None, "last_seen", rules):
            return Seen(value, by)
        return current

    return replace(
        state,
        last_seen=LastSeenState(
            seen=_latest(by, seen.seen, "last_seen", rules),
            locale=latest(seen.locale, context.locale),
            timezone=latest(seen.timezone, context.timezone),
            user_agent=latest(seen.user_agent, context.user_agent),
        ),
    )


_HANDLERS: Mapping[str, _Handler] = {
    "identify": _identify,
    "product_viewed": _product_viewed,
    "cart_item_added": _cart_item_added,
    "cart_item_removed": _cart_item_removed,
    "order_completed": _order_completed,
    "order_refunded": _order_refunded,
    "order_cancelled": _order_cancelled,
    "loyalty_changed": _loyalty_changed,
    "consent_changed": _consent_changed,
    "email_delivered": _email_delivered,
    "email_opened": _email_opened,
    "email_clicked": _email_clicked,
    "email_bounced": _email_bounced,
    "email_unsubscribed": _email_unsubscribed,
    "email_spam_reported": _email_spam_reported,
    "email_suppressed": _email_suppressed,
}


# --- JSON form, for the customers.state column -------------------------------------------------
#
# Every key is optional when reading, so states stored by older code still load (with
# ``schema`` 1, which makes the merger replay them on their next event).

Json = dict[str, Any]


def _money_json(m: Money | None) -> Json | None:
    return None if m is None else {"amount": str(m.amount), "currency": m.currency}


def _money_from(d: Mapping[str, str]) -> Money:
    return Money(Decimal(d["amount"]), d["currency"])


def _optional_money_from(d: Mapping[str, str] | None) -> Money | None:
    return None if d is None else _money_from(d)


def _time(s: str) -> datetime:
    return datetime.fromisoformat(s)


def _prov_json(p: Provenance | None) -> Json | None:
    return (
        None if p is None else {"source": p.source, "at": p.occurred_at.isoformat(), "event_id": p.event_id}
    )


def _prov_from(d: Mapping[str, Any] | None) -> Provenance | None:
    return None if d is None else Provenance(int(d["source"]), _time(d["at"]), str(d["event_id"]))


def _prov(d: Mapping[str, Any]) -> Provenance:
    p = _prov_from(d)
    assert p is not None
    return p


def _legacy_prov(at: str, event_id: str = "", source: int = ingest_pb2.EVENT_SOURCE_UNSPECIFIED) -> Json:
    return {"source": source, "at": at, "event_id": event_id}


def _seen_json(s: Seen | None) -> Json | None:
    return None if s is None else {"value": s.value, "set_by": _prov_json(s.set_by)}


def _seen_from(d: Mapping[str, Any] | None) -> Seen | None:
    return None if d is None else Seen(str(d["value"]), _prov(d["set_by"]))


def _times_json(times: tuple[datetime, ...]) -> list[str]:
    return [t.isoformat() for t in times]


def _times_from(items: Iterable[str]) -> tuple[datetime, ...]:
    return tuple(_time(t) for t in items)


def _line_json(c: CartLine) -> Json:
    return {"sku": c.sku, "name": c.name, "quantity": c.quantity, "unit_price": _money_json(c.unit_price)}


def _line_from(c: Mapping[str, Any]) -> CartLine:
    return CartLine(c["sku"], c["name"], int(c["quantity"]), _money_from(c["unit_price"]))


def to_json(state: ProfileState) -> dict[str, Any]:
    """A JSON-compatible form of ``state``; ``from_json`` reads it back unchanged."""
    email = state.email
    return {
        "schema": state.schema,
        "traits": {
            name: {"value": t.value, "set_by": _prov_json(t.set_by)} for name, t in state.traits.items()
        },
        "cart_base": [_line_json(c) for c in state.cart_base],
        "cart_ops": [
            {
                "kind": op.kind,
                "set_by": _prov_json(op.set_by),
                "sku": op.sku,
                "name": op.name,
                "quantity": op.quantity,
                "unit_price": _money_json(op.unit_price),
                "skus": list(op.skus),
            }
            for op in state.cart_ops
        ],
        "cart_updated_at": state.cart_updated_at.isoformat() if state.cart_updated_at else None,
        "recently_viewed": [
            {
                "sku": v.sku,
                "name": v.name,
                "price": _money_json(v.price),
                "category": v.category,
                "url": v.url,
                "set_by": _prov_json(v.set_by),
            }
            for v in state.recently_viewed
        ],
        "orders": [
            {
                "order_id": o.order_id,
                "total": _money_json(o.total),
                "ordered_at": o.ordered_at.isoformat(),
                "set_by": _prov_json(o.set_by),
                "skus": list(o.skus),
            }
            for o in state.orders
        ],
        "refunds": {
            r.refund_id: {
                "order_id": r.order_id,
                "amount": _money_json(r.amount),
                "set_by": _prov_json(r.set_by),
            }
            for r in state.refunds.values()
        },
        "cancellations": {order_id: _prov_json(p) for order_id, p in state.cancellations.items()},
        "orders_set_by": _prov_json(state.orders_set_by),
        "loyalty": None
        if state.loyalty is None
        else {
            "points": state.loyalty.points,
            "tier": state.loyalty.tier,
            "set_by": _prov_json(state.loyalty.set_by),
        },
        "consents": {
            str(channel): {"subscribed": c.subscribed, "set_by": _prov_json(c.set_by)}
            for channel, c in state.consents.items()
        },
        "email": {
            "recent_delivered": _times_json(email.recent_delivered),
            "recent_opens": _times_json(email.recent_opens),
            "recent_clicks": _times_json(email.recent_clicks),
            "last_delivery": _prov_json(email.last_delivery),
            "last_soft_bounce": _prov_json(email.last_soft_bounce),
            "last_hard_bounce": _prov_json(email.last_hard_bounce),
            "bounce_state": email.bounce_state,
            "bounce_set_by": _prov_json(email.bounce_set_by),
            "last_unsubscribe": _prov_json(email.last_unsubscribe),
            "last_opt_in": _prov_json(email.last_opt_in),
            "unsubscribed": email.unsubscribed,
            "unsubscribed_set_by": _prov_json(email.unsubscribed_set_by),
            "last_spam_report": _prov_json(email.last_spam_report),
        },
        "last_seen": {
            "seen": _prov_json(state.last_seen.seen),
            "locale": _seen_json(state.last_seen.locale),
            "timezone": _seen_json(state.last_seen.timezone),
            "user_agent": _seen_json(state.last_seen.user_agent),
        },
        "newest": None
        if state.newest is None
        else [state.newest[0].isoformat(), state.newest[1], state.newest[2]],
    }


def _trait_from(t: Mapping[str, Any]) -> Trait:
    if "set_by" in t:
        return Trait(t["value"], _prov(t["set_by"]))
    # Layout 1: {"value", "occurred_at", "source_priority", "event_id"}.
    source = _SOURCE_OF_PRIORITY.get(int(t.get("source_priority", 0)), ingest_pb2.EVENT_SOURCE_UNSPECIFIED)
    return Trait(t["value"], _prov(_legacy_prov(t["occurred_at"], t.get("event_id", ""), source)))


def _view_from(v: Mapping[str, Any]) -> ProductView:
    set_by = v.get("set_by") or _legacy_prov(v["viewed_at"])
    return ProductView(
        v["sku"],
        v.get("name", ""),
        _optional_money_from(v.get("price")),
        v.get("category", ""),
        v.get("url", ""),
        _prov(set_by),
    )


def _order_from(o: Mapping[str, Any]) -> OrderRecord:
    set_by = o.get("set_by") or _legacy_prov(o["ordered_at"])
    return OrderRecord(
        o["order_id"],
        _money_from(o["total"]),
        _time(o["ordered_at"]),
        _prov(set_by),
        tuple(o.get("skus", ())),
    )


def from_json(data: Mapping[str, Any]) -> ProfileState:
    """The state stored by ``to_json``, by this code or an older one (missing keys default)."""
    newest = data.get("newest")
    email = data.get("email") or {}
    seen = data.get("last_seen") or {}
    loyalty = data.get("loyalty")
    return ProfileState(
        traits={name: _trait_from(t) for name, t in (data.get("traits") or {}).items()},
        # Layout 1 kept the cart itself under "cart".
        cart_base=tuple(_line_from(c) for c in (data.get("cart_base") or data.get("cart") or [])),
        cart_ops=tuple(
            CartOp(
                kind=op["kind"],
                set_by=_prov(op["set_by"]),
                sku=op.get("sku", ""),
                name=op.get("name", ""),
                quantity=int(op.get("quantity", 0)),
                unit_price=_optional_money_from(op.get("unit_price")),
                skus=tuple(op.get("skus", ())),
            )
            for op in data.get("cart_ops") or []
        ),
        cart_updated_at=_time(data["cart_updated_at"]) if data.get("cart_updated_at") else None,
        recently_viewed=tuple(_view_from(v) for v in data.get("recently_viewed") or []),
        orders=tuple(_order_from(o) for o in data.get("orders") or []),
        refunds={
            refund_id: Refund(refund_id, r["order_id"], _money_from(r["amount"]), _prov(r["set_by"]))
            for refund_id, r in (data.get("refunds") or {}).items()
        },
        cancellations={order_id: _prov(p) for order_id, p in (data.get("cancellations") or {}).items()},
        orders_set_by=_prov_from(data.get("orders_set_by")),
        loyalty=None
        if loyalty is None
        else Loyalty(int(loyalty["points"]), str(loyalty["tier"]), _prov(loyalty["set_by"])),
        consents={
            int(channel): ConsentState(bool(c["subscribed"]), _prov(c["set_by"]))
            for channel, c in (data.get("consents") or {}).items()
        },
        email=EmailState(
            recent_delivered=_times_from(email.get("recent_delivered", ())),
            recent_opens=_times_from(email.get("recent_opens", ())),
            recent_clicks=_times_from(email.get("recent_clicks", ())),
            last_delivery=_prov_from(email.get("last_delivery")),
            last_soft_bounce=_prov_from(email.get("last_soft_bounce")),
            last_hard_bounce=_prov_from(email.get("last_hard_bounce")),
            bounce_state=str(email.get("bounce_state", BounceState.UNKNOWN)),
            bounce_set_by=_prov_from(email.get("bounce_set_by")),
            last_unsubscribe=_prov_from(email.get("last_unsubscribe")),
            last_opt_in=_prov_from(email.get("last_opt_in")),
            unsubscribed=bool(email.get("unsubscribed", False)),
            unsubscribed_set_by=_prov_from(email.get("unsubscribed_set_by")),
            last_spam_report=_prov_from(email.get("last_spam_report")),
        ),
        last_seen=LastSeenState(
            seen=_prov_from(seen.get("seen")),
            locale=_seen_from(seen.get("locale")),
            timezone=_seen_from(seen.get("timezone")),
            user_agent=_seen_from(seen.get("user_agent")),
        ),
        newest=None if newest is None else (_time(newest[0]), int(newest[1]), str(newest[2])),
        schema=int(data.get("schema", 1)),
    )
