"""From a live profile to what a push connector sends (pure): the traits it names, and the
computed attributes Sendtime derives from events (orders, loyalty, engagement, consent).

A connector's ``traits`` option lists names. A name in ``COMPUTED`` is computed from the
profile; any other is a trait (``Profile.traits``). A name the profile has no value for is left
out of the push rather than sent empty: an absent trait says nothing, and sending ``null``
would erase what the destination holds from another source.

A customer is pushed by the store's user id (``external_id``) or email address; one with
neither (an anonymous visitor) is not pushable: ``push_item`` answers None and the push settles
their mark without sending anything. Their next change (an address learnt) marks them again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import UTC
from decimal import Decimal
from typing import Any, Final

from google.protobuf import json_format, timestamp_pb2

from sendtime.ingest.v1 import ingest_pb2
from sendtime.profile.v1 import profile_pb2
from sync.push import PushItem

# What a push reads of a profile (GetProfile's read mask): nothing else leaves the service.
READ_PATHS: Final = ("identifiers", "traits", "orders", "loyalty", "consents", "email", "last_seen")


def _time(stamp: timestamp_pb2.Timestamp) -> str | None:
    """RFC 3339 in UTC, seconds; None for an unset time."""
    if not stamp.seconds and not stamp.nanos:
        return None
    return stamp.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _money(amounts: Iterable[Any]) -> float | None:
    """The amount in the customer's first currency (the one they first ordered in)."""
    for money in amounts:
        return float(Decimal(money.units) + Decimal(money.nanos) / Decimal(10**9))
    return None


def _email_subscribed(profile: profile_pb2.Profile) -> bool | None:
    for consent in profile.consents:
        if consent.channel == ingest_pb2.CHANNEL_EMAIL:
            return bool(consent.subscribed)
    return None


_BOUNCE_NAMES: Final = {
    profile_pb2.BOUNCE_STATE_NONE: "none",
    profile_pb2.BOUNCE_STATE_SOFT: "soft",
    profile_pb2.BOUNCE_STATE_HARD: "hard",
}

COMPUTED: Final[Mapping[str, Callable[[profile_pb2.Profile], Any]]] = {
    "orders_count": lambda p: p.orders.count if p.HasField("orders") else None,
    "lifetime_value": lambda p: _money(p.orders.lifetime_value),
    "average_order_value": lambda p: _money(p.orders.average_order_value),
    "last_order_at": lambda p: _time(p.orders.last_order_time),
    "loyalty_tier": lambda p: p.loyalty.tier or None,
    "loyalty_points": lambda p: p.loyalty.points if p.HasField("loyalty") else None,
    "email_subscribed": _email_subscribed,
    "email_bounce_state": lambda p: _BOUNCE_NAMES.get(p.email.bounce_state),
    "last_seen_at": lambda p: _time(p.last_seen.seen_time),
    "timezone": lambda p: p.last_seen.timezone or None,
    "locale": lambda p: p.last_seen.locale or None,
}


def selected_attributes(profile: profile_pb2.Profile, names: Iterable[str]) -> dict[str, Any]:
    """The named attributes the profile has a value for."""
    traits = json_format.MessageToDict(profile.traits) if profile.HasField("traits") else {}
    selected: dict[str, Any] = {}
    for name in names:
        compute = COMPUTED.get(name)
        value = compute(profile) if compute else traits.get(name)
        if value is not None:
            selected[name] = value
    return selected


def _identifier(profile: profile_pb2.Profile, kind: profile_pb2.IdentifierKind.ValueType) -> str:
    """The customer's identifier of ``kind`` (the first linked), or empty."""
    return next((i.value for i in profile.identifiers if i.kind == kind), "")


def push_item(profile: profile_pb2.Profile, names: Iterable[str]) -> PushItem | None:
    """The customer's push at the profile's version; None when they have no user id or email."""
    external_id = _identifier(profile, profile_pb2.IDENTIFIER_KIND_USER_ID)
    email = _identifier(profile, profile_pb2.IDENTIFIER_KIND_EMAIL)
    if not external_id and not email:
        return None
    return PushItem(
        profile.customer_id,
        selected_attributes(profile, names),
        profile.version,
        external_id=external_id,
        email=email,
    )
