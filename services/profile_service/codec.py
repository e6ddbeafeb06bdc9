"""Profiles as the API shows them: ``ProfileState`` plus identity → ``sendtime.profile.v1.Profile``,
and read masks."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from google.protobuf import field_mask_pb2, timestamp_pb2
from google.type import money_pb2

from profile_service.state import Money, ProfileState
from sendtime.profile.v1 import profile_pb2
from sendtime_common.identifier_proto import KIND_TO_PROTO
from sendtime_common.identifiers import IdentifierKind

RECENT_ORDERS_LIMIT = 10
ALWAYS_RETURNED = ("name", "customer_id", "version")


@dataclass(frozen=True, slots=True)
class StoredProfile:
    """A customer as read from storage."""

    customer_id: str
    version: int
    identifiers: tuple[tuple[IdentifierKind, str], ...]
    state: ProfileState
    created_at: datetime
    updated_at: datetime


def money_to_proto(money: Money) -> money_pb2.Money:
    units = int(money.amount)  # truncates toward zero, as google.type.Money wants
    nanos = int((money.amount - units) * 1_000_000_000)
    return money_pb2.Money(currency_code=money.currency, units=units, nanos=nanos)


def _timestamp(at: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(at)
    return ts


def _sum_by_currency(amounts: Iterable[Money]) -> list[money_pb2.Money]:
    totals: dict[str, Decimal] = defaultdict(Decimal)
    for m in amounts:
        totals[m.currency] += m.amount
    return [money_to_proto(Money(amount, currency)) for currency, amount in sorted(totals.items())]


def to_proto(stored: StoredProfile) -> profile_pb2.Profile:
    """The full API form of a stored profile."""
    state = stored.state
    profile = profile_pb2.Profile(
        name=f"profiles/{stored.customer_id}",
        customer_id=stored.customer_id,
        identifiers=[
            profile_pb2.Identifier(kind=KIND_TO_PROTO[kind], value=value)
            for kind, value in sorted(stored.identifiers)
        ],
        version=stored.version,
        create_time=_timestamp(stored.created_at),
        update_time=_timestamp(stored.updated_at),
    )
    profile.traits.update({name: trait.value for name, trait in state.traits.items()})

    cart = profile.cart
    for line in state.cart:
        cart.items.append(
            profile_pb2.CartItem(
                sku=line.sku,
                name=line.name,
                quantity=line.quantity,
                unit_price=money_to_proto(line.unit_price),
            )
        )
    line_totals = _sum_by_currency(
        Money(c.unit_price.amount * c.quantity, c.unit_price.currency) for c in state.cart
    )
    if len(line_totals) == 1:  # a total only makes sense in one currency
        cart.total.CopyFrom(line_totals[0])
    if state.cart_updated_at is not None:
        cart.update_time.CopyFrom(_timestamp(state.cart_updated_at))

    for view in state.recently_viewed:
        item = profile.recently_viewed.add(
            sku=view.sku,
            name=view.name,
            category=view.category,
            url=view.url,
            view_time=_timestamp(view.viewed_at),
        )
        if view.price is not None:
            item.price.CopyFrom(money_to_proto(view.price))

    profile.orders.count = len(state.orders)
    profile.orders.lifetime_value.extend(_sum_by_currency(o.total for o in state.orders))
    for order in state.orders[:RECENT_ORDERS_LIMIT]:
        profile.orders.recent.add(
            order_id=order.order_id,
            total=money_to_proto(order.total),
            order_time=_timestamp(order.ordered_at),
        )
    return profile


class InvalidReadMask(ValueError):
    """A read mask path that names no Profile field."""


def check_read_mask(mask: field_mask_pb2.FieldMask) -> None:
    """Raises:
    InvalidReadMask: a path is not a field of Profile (the message lists the bad paths)."""
    if mask.paths and not mask.IsValidForDescriptor(profile_pb2.Profile.DESCRIPTOR):
        fields = profile_pb2.Profile.DESCRIPTOR.fields_by_name
        bad = [p for p in mask.paths if p.split(".")[0] not in fields]
        raise InvalidReadMask(f"unknown Profile field(s): {', '.join(bad) or ', '.join(mask.paths)}")


def apply_read_mask(profile: profile_pb2.Profile, mask: field_mask_pb2.FieldMask) -> profile_pb2.Profile:
    """Only the fields ``mask`` names (all when it is empty), plus the identifying ones."""
    if not mask.paths:
        return profile
    masked = profile_pb2.Profile()
    full_mask = field_mask_pb2.FieldMask(paths=[*mask.paths, *ALWAYS_RETURNED])
    full_mask.MergeMessage(profile, masked)
    return masked
