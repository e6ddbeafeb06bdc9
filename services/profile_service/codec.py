"""Profiles as the API shows them: ``ProfileState`` plus identity → ``sendtime.profile.v1.Profile``,
the fields that depend on the time of the read (``as_of``), and read masks."""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import ua_parser
from google.protobuf import field_mask_pb2, timestamp_pb2
from google.type import money_pb2

from profile_service.state import (
    CHANNEL_NAMES,
    RECENT_EMAIL_WINDOW,
    BounceState,
    Money,
    ProfileState,
    Provenance,
)
from sendtime.profile.v1 import profile_pb2
from sendtime_common.identifier_proto import KIND_TO_PROTO
from sendtime_common.identifiers import IdentifierKind

RECENT_ORDERS_LIMIT = 10
PURCHASED_SKUS_LIMIT = 200
ALWAYS_RETURNED = ("name", "customer_id", "version")
# Returned only when a read mask names it; an empty mask returns every other field.
ONLY_WHEN_ASKED = "provenance"

_BOUNCE_STATES = {
    BounceState.UNKNOWN: profile_pb2.BOUNCE_STATE_UNSPECIFIED,
    BounceState.NONE: profile_pb2.BOUNCE_STATE_NONE,
    BounceState.SOFT: profile_pb2.BOUNCE_STATE_SOFT,
    BounceState.HARD: profile_pb2.BOUNCE_STATE_HARD,
}


@dataclass(frozen=True, slots=True)
class StoredProfile:
    """A customer as read from storage."""

    customer_id: str
    version: int
    identifiers: tuple[tuple[IdentifierKind, str], ...]
    state: ProfileState
    created_at: datetime
    updated_at: datetime


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
NEVER_CHANGES = 2**63 - 1  # as_of_until's "until" for a read-time copy nothing will change


_INT64_MAX = 2**63 - 1


def money_to_proto(money: Money) -> money_pb2.Money:
    """Raises: ValueError: the amount is beyond ``google.type.Money``'s int64 units (see
    ``_sums_in_range``: single amounts are bounded at ingest, sums are not)."""
    units = int(money.amount)  # truncates toward zero, as google.type.Money wants
    nanos = int((money.amount - units) * 1_000_000_000)
    return money_pb2.Money(currency_code=money.currency, units=units, nanos=nanos)


def _sums_in_range(amounts: Iterable[Money]) -> list[Money]:
    """The sums that fit ``google.type.Money`` (int64 units). Ingest bounds each amount
    (10^15 units) and quantity (10^6), but a cart of a few such lines, or thousands of such
    orders, adds up past 9.2 * 10^18: such a total is left out of the profile rather than make
    it unreadable."""
    return [m for m in amounts if abs(int(m.amount)) <= _INT64_MAX]


def _timestamp(at: datetime) -> timestamp_pb2.Timestamp:
    # Integer arithmetic on the (aware) datetime: half the cost of Timestamp.FromDatetime, and
    # a profile has dozens of timestamps.
    seconds, micros = divmod((at - _EPOCH) // _MICROSECOND, 1_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=micros * 1000)


def _sum_by_currency(amounts: Iterable[Money]) -> list[money_pb2.Money]:
    totals: dict[str, Decimal] = defaultdict(Decimal)
    for m in amounts:
        totals[m.currency] += m.amount
    return [money_to_proto(m) for m in _sums_in_range(Money(a, c) for c, a in sorted(totals.items()))]


def _provenance(p: Provenance) -> profile_pb2.Provenance:
    return profile_pb2.Provenance(
        source=p.source,  # type: ignore[arg-type]
        occur_time=_timestamp(p.occurred_at),
        event_id=p.event_id,
    )


# --- user agents -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserAgentInfo:
    device: str  # "desktop", "mobile", "tablet", "other"; "" for no user agent
    os: str  # e.g. "iOS"; "" when unknown
    browser: str  # e.g. "Mobile Safari"; "" when unknown


# Bots, TVs and game consoles: neither phones, tablets nor computers.
_NOT_PERSONAL_DEVICES = re.compile(r"\bTV\b|SMART-TV|PlayStation|Xbox|Nintendo", re.IGNORECASE)
_MOBILE_DEVICES = frozenset({"iPhone", "iPod", "Generic Smartphone", "Generic Feature Phone"})
_MOBILE_OS = frozenset(
    {"iOS", "Android", "BlackBerry OS", "KaiOS", "Firefox OS", "Symbian OS", "Tizen", "HarmonyOS", "Sailfish"}
)
_DESKTOP_OS = frozenset(
    {
        "Mac OS X",
        "macOS",
        "Linux",
        "Ubuntu",
        "Debian",
        "Fedora",
        "Chrome OS",
        "ChromeOS",
        "FreeBSD",
        "OpenBSD",
    }
)


def _device_class(user_agent: str, device: ua_parser.Device | None, os: str) -> str:
    """The device class (docs/profiles.md): bots, TVs and consoles are "other"; iPads, Kindles
    and devices the parser calls tablets are "tablet"; phones and mobile operating systems
    "mobile"; Macs, Windows, Linux and ChromeOS "desktop"; anything else "other"."""
    family = device.family if device else ""
    brand = (device.brand or "") if device else ""
    if family == "Spider" or _NOT_PERSONAL_DEVICES.search(user_agent):
        return "other"
    if family == "iPad" or family.startswith("Kindle") or "tablet" in f"{family} {brand}".lower():
        return "tablet"
    if family in _MOBILE_DEVICES or os in _MOBILE_OS or os.startswith(("Windows Phone", "Windows Mobile")):
        return "mobile"
    if family == "Mac" or os in _DESKTOP_OS or os.startswith("Windows"):
        return "desktop"
    return "other"


@functools.lru_cache(maxsize=4096)
def describe_user_agent(user_agent: str) -> UserAgentInfo:
    """Device class, operating system and browser of a user agent (parses are cached: a
    customer's events mostly carry the same few user agents)."""
    if not user_agent:
        return UserAgentInfo("", "", "")
    parsed = ua_parser.parse(user_agent)
    os = parsed.os.family if parsed.os and parsed.os.family != "Other" else ""
    browser = parsed.user_agent.family if parsed.user_agent and parsed.user_agent.family != "Other" else ""
    return UserAgentInfo(_device_class(user_agent, parsed.device, os), os, browser)


# --- the profile -------------------------------------------------------------------------------


def to_proto(stored: StoredProfile) -> profile_pb2.Profile:
    """The full API form of a stored profile, provenance included. The fields that depend on
    the time of the read (``Cart.abandoned``, the 30-day email counts) are set by ``as_of``."""
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
    provenance = profile.provenance

    profile.traits.update({name: trait.value for name, trait in state.traits.items()})
    for name, trait in state.traits.items():
        provenance[f"traits.{name}"].CopyFrom(_provenance(trait.set_by))

    _fill_cart(profile, state)
    _fill_orders(profile, state)
    profile.purchased_skus.extend(
        list(dict.fromkeys(sku for order in state.orders for sku in order.skus))[:PURCHASED_SKUS_LIMIT]
    )

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
    if state.recently_viewed:
        provenance["recently_viewed"].CopyFrom(_provenance(state.recently_viewed[0].set_by))

    if state.loyalty is not None:
        profile.loyalty.points = state.loyalty.points
        profile.loyalty.tier = state.loyalty.tier
        profile.loyalty.update_time.CopyFrom(_timestamp(state.loyalty.set_by.occurred_at))
        provenance["loyalty"].CopyFrom(_provenance(state.loyalty.set_by))

    for channel, consent in sorted(state.consents.items()):
        profile.consents.add(
            channel=channel,
            subscribed=consent.subscribed,
            update_time=_timestamp(consent.set_by.occurred_at),
        )
        provenance[f"consents.{CHANNEL_NAMES[channel]}"].CopyFrom(_provenance(consent.set_by))

    _fill_email(profile, state)
    _fill_last_seen(profile, state)
    return profile


def _fill_cart(profile: profile_pb2.Profile, state: ProfileState) -> None:
    cart = profile.cart
    lines = state.cart
    for line in lines:
        cart.items.append(
            profile_pb2.CartItem(
                sku=line.sku,
                name=line.name,
                quantity=line.quantity,
                unit_price=money_to_proto(line.unit_price),
            )
        )
    currencies = {c.unit_price.currency for c in lines}
    line_totals = _sum_by_currency(
        Money(c.unit_price.amount * c.quantity, c.unit_price.currency) for c in lines
    )
    if len(currencies) == 1 and len(line_totals) == 1:  # a total only makes sense in one currency
        cart.total.CopyFrom(line_totals[0])
    if state.cart_updated_at is not None:
        cart.update_time.CopyFrom(_timestamp(state.cart_updated_at))
    if state.cart_set_by is not None:
        profile.provenance["cart"].CopyFrom(_provenance(state.cart_set_by))


def _fill_orders(profile: profile_pb2.Profile, state: ProfileState) -> None:
    summary = state.order_summary()
    orders = profile.orders
    orders.count = summary.count
    orders.cancelled_count = summary.cancelled_count
    orders.lifetime_value.extend(money_to_proto(m) for m in _sums_in_range(summary.lifetime_value))
    orders.average_order_value.extend(money_to_proto(m) for m in _sums_in_range(summary.average_order_value))
    if summary.last_order_time is not None:
        orders.last_order_time.CopyFrom(_timestamp(summary.last_order_time))
    for view in summary.orders[:RECENT_ORDERS_LIMIT]:
        order = orders.recent.add(
            order_id=view.record.order_id,
            total=money_to_proto(view.record.total),
            order_time=_timestamp(view.record.ordered_at),
            cancelled=view.cancelled,
        )
        if view.refunded is not None:
            order.refunded.CopyFrom(money_to_proto(view.refunded))
    if state.orders_set_by is not None:
        profile.provenance["orders"].CopyFrom(_provenance(state.orders_set_by))


def _fill_email(profile: profile_pb2.Profile, state: ProfileState) -> None:
    email = state.email
    out = profile.email
    for times, last, recent in (
        (email.recent_delivered, out.last_delivered_time, out.recent_delivered_times),
        (email.recent_opens, out.last_open_time, out.recent_open_times),
        (email.recent_clicks, out.last_click_time, out.recent_click_times),
    ):
        if times:
            last.CopyFrom(_timestamp(times[0]))
            recent.extend(_timestamp(t) for t in times)
    if email.bounce_state != BounceState.UNKNOWN:
        out.bounce_state = _BOUNCE_STATES[email.bounce_state]
    if email.unsubscribed:
        out.unsubscribed = True
    if email.spam_reported:
        out.spam_reported = True
    if email.bounce_set_by is not None:
        profile.provenance["email.bounce_state"].CopyFrom(_provenance(email.bounce_set_by))
    if email.unsubscribed_set_by is not None:
        profile.provenance["email.unsubscribed"].CopyFrom(_provenance(email.unsubscribed_set_by))
    if email.last_spam_report is not None:
        profile.provenance["email.spam_reported"].CopyFrom(_provenance(email.last_spam_report))


def _fill_last_seen(profile: profile_pb2.Profile, state: ProfileState) -> None:
    seen = state.last_seen
    if seen.seen is None:
        return
    out = profile.last_seen
    out.seen_time.CopyFrom(_timestamp(seen.seen.occurred_at))
    out.locale = seen.locale.value if seen.locale else ""
    out.timezone = seen.timezone.value if seen.timezone else ""
    agent = describe_user_agent(seen.user_agent.value if seen.user_agent else "")
    out.device, out.os, out.browser = agent.device, agent.os, agent.browser
    profile.provenance["last_seen"].CopyFrom(_provenance(seen.seen))


# --- read time ---------------------------------------------------------------------------------


def as_of(
    profile: profile_pb2.Profile, now: datetime, *, cart_abandoned_after: timedelta
) -> profile_pb2.Profile:
    """A copy of ``profile`` with the fields that depend on the time of the read set for ``now``
    (timezone-aware): ``cart.abandoned`` (items, and idle longer than ``cart_abandoned_after``),
    and the email counts of the 30 days before ``now`` (the recent times lists are cut to those
    days too; times slightly after ``now``, from senders' clocks, count)."""
    return as_of_until(profile, micros(now), cart_abandoned_after=cart_abandoned_after)[0]


def as_of_until(
    profile: profile_pb2.Profile, now_us: int, *, cart_abandoned_after: timedelta
) -> tuple[profile_pb2.Profile, int]:
    """``as_of`` for ``now_us`` (microseconds since the epoch), and until when its answer holds:
    the same for every read from ``now_us`` up to, not including, the second value (the moment
    the cart turns abandoned, or the oldest recent email time leaves the 30 days), which is
    ``NEVER_CHANGES`` when nothing will change."""
    # Compared in whole microseconds, as datetimes would be (Timestamp.ToDatetime drops the
    # nanoseconds past them): a read of a hot profile did this dozens of times a second.
    out = profile_pb2.Profile()
    out.CopyFrom(profile)
    until = NEVER_CHANGES
    cart = out.cart
    if cart.items and cart.HasField("update_time"):
        turns_abandoned_us = _micros(cart.update_time) + cart_abandoned_after // _MICROSECOND + 1
        cart.abandoned = now_us >= turns_abandoned_us
        if not cart.abandoned:
            until = turns_abandoned_us
    else:
        cart.abandoned = False
    email = out.email
    window_us = RECENT_EMAIL_WINDOW // _MICROSECOND
    since_us = now_us - window_us
    for times, field in (
        (email.recent_open_times, "opens_30d"),
        (email.recent_click_times, "clicks_30d"),
        (email.recent_delivered_times, "delivered_30d"),
    ):
        if not times:
            setattr(email, field, 0)
            continue
        kept = [t for t in times if _micros(t) > since_us]
        if len(kept) != len(times):
            del times[:]
            times.extend(kept)
        setattr(email, field, len(kept))
        if kept:
            until = min(until, min(_micros(t) for t in kept) + window_us)
    return out, until


def micros(at: datetime) -> int:
    """Microseconds since the epoch of a timezone-aware ``at``."""
    return (at - _EPOCH) // _MICROSECOND


def _micros(at: timestamp_pb2.Timestamp) -> int:
    """Microseconds since the epoch, as ``at.ToDatetime()`` holds them."""
    return at.seconds * 1_000_000 + at.nanos // 1000


# --- read masks --------------------------------------------------------------------------------


class InvalidReadMask(ValueError):
    """A read mask path that names no Profile field."""


def check_read_mask(mask: field_mask_pb2.FieldMask) -> None:
    """Raises:
    InvalidReadMask: a path is not a field of Profile (the message lists the bad paths)."""
    if mask.paths and not mask.IsValidForDescriptor(profile_pb2.Profile.DESCRIPTOR):
        fields = profile_pb2.Profile.DESCRIPTOR.fields_by_name
        bad = [p for p in mask.paths if p.split(".")[0] not in fields]
        raise InvalidReadMask(f"unknown Profile field(s): {', '.join(bad) or ', '.join(mask.paths)}")


def apply_read_mask(
    profile: profile_pb2.Profile, mask: field_mask_pb2.FieldMask, into: profile_pb2.Profile | None = None
) -> profile_pb2.Profile:
    """Only the fields ``mask`` names, plus the identifying ones (``ALWAYS_RETURNED``). An empty
    mask means every field except provenance (``ONLY_WHEN_ASKED``), which a mask must name.

    ``into``: an empty profile to fill (a response's, which saves copying the result into it);
    without it, the result may be ``profile`` itself."""
    if not mask.paths:
        if not profile.provenance and into is None:
            return profile
        masked = profile_pb2.Profile() if into is None else into
        masked.CopyFrom(profile)
        masked.ClearField("provenance")
        return masked
    masked = profile_pb2.Profile() if into is None else into
    full_mask = field_mask_pb2.FieldMask(paths=[*mask.paths, *ALWAYS_RETURNED])
    full_mask.MergeMessage(profile, masked)
    return masked
