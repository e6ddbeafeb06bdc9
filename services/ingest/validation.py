"""Event validation: every reason an event is refused, as field violations.

Pure functions: no I/O, no clock reads (the caller passes ``now``). docs/ingest.md has the rules
as a table; each rule has a test in tests/ingest/test_validation.py.

An event that passes is one every store after ingest can keep and the merger can merge
(docs/limits.md, "Events: what ingest accepts, conflicts and poison"): no NUL in a string, no
NaN or Infinity, timestamps in range (``sendtime_common.storable``), amounts and quantities in
ranges the profile's sums stay exact in. And validation itself never raises, whatever the
event holds: each check reads only what the checks before it found readable.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from babel import Locale, UnknownLocaleError
from babel.core import get_global
from babel.numbers import get_currency_precision
from google.protobuf import struct_pb2
from google.type import money_pb2

from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.errors import FieldViolation
from sendtime_common.identifiers import IDENTIFIER_FIELDS, InvalidIdentifier, normalize_identifier
from sendtime_common.storable import unstorable_values, valid_timestamp

EVENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
PROPERTY_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_]{1,64}$")
CUSTOM_EVENT_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MAX_TEXT_LENGTH = 1024
MAX_URL_LENGTH = 2048
MAX_TRAITS = 100
MAX_PROPERTIES = 50
MAX_NESTING = 3
MAX_LINES = 500
# More than any order in any currency (10^15 Iranian rials are ~24 billion US dollars), and small
# enough that a profile's sums of amounts stay exact in Decimal's 28 digits.
MAX_MONEY_UNITS = 10**15
# A line of a million items is already a wholesale order; a cart's sums of quantities stay far
# inside int64.
MAX_QUANTITY = 1_000_000
# The IANA names tzdata knows. Looked up in a set: zoneinfo.ZoneInfo() opens a file named by the
# value, so "Europe" raised IsADirectoryError and a long name "File name too long".
_TIME_ZONES = frozenset(zoneinfo.available_timezones())
_NANOS_PER_UNIT = 1_000_000_000
_SOURCES = frozenset(ingest_pb2.EventSource.values())
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_MICROS_PER_SECOND = 1_000_000

_Fail = Callable[[str, str], None]  # records one violation: (field path, description)


@dataclass(frozen=True, slots=True)
class ValidationRules:
    """The configurable limits (INGEST_* settings)."""

    max_future_skew: timedelta = timedelta(minutes=5)
    max_age: timedelta = timedelta(days=730)
    max_event_bytes: int = 32 * 1024
    # None: any custom name matching the pattern; otherwise only these.
    custom_event_names: frozenset[str] | None = None


def validate_event(event: ingest_pb2.Event, now: datetime, rules: ValidationRules) -> list[FieldViolation]:
    """All the reasons ``event`` is invalid; an empty list when it is valid.

    ``event`` is as stamped by ingest (its ``occurred_at`` corrected for clock skew, its id
    derived when the sender gave none), so the time rules judge the corrected time.
    """
    violations: list[FieldViolation] = []

    def fail(field: str, description: str) -> None:
        violations.append(FieldViolation(field, description))

    if not event.event_id:
        fail("event_id", "required")
    elif not EVENT_ID_PATTERN.match(event.event_id):
        fail("event_id", "must be 1 to 128 characters of letters, digits and . _ : -")

    serialized = event.SerializeToString()
    # original_occurred_at is ingest's copy of occurred_at as sent: named once, as occurred_at.
    violations.extend(
        v for v in unstorable_values(event, serialized=serialized) if v.field != "original_occurred_at"
    )
    _check_identifiers(event.customer, "customer", fail)
    _check_times(event, now, rules, fail)

    if event.source == ingest_pb2.EVENT_SOURCE_UNSPECIFIED:
        fail("source", "required")
    elif event.source not in _SOURCES:
        fail("source", f"unknown value {event.source}")

    if event.HasField("context"):
        _check_context(event.context, fail)

    payload = event.WhichOneof("payload")
    if payload is None:
        fail("payload", "one event type is required, e.g. product_viewed, identify or custom")
    else:
        _PAYLOAD_CHECKS[payload](getattr(event, payload), payload, rules, fail)

    size = len(serialized)
    if size > rules.max_event_bytes:
        fail("event", f"is {size} bytes; at most {rules.max_event_bytes} are allowed")
    return violations


def _check_identifiers(customer: ingest_pb2.CustomerIdentifiers, field: str, fail: _Fail) -> None:
    present = [
        (kind, name, value) for kind, name in IDENTIFIER_FIELDS if (value := getattr(customer, name)).strip()
    ]
    if not present:
        fail(field, "at least one of user_id, email, anonymous_id, crm_id, device_id is required")
        return
    for kind, name, value in present:
        try:
            normalize_identifier(kind, value)
        except InvalidIdentifier as exc:
            fail(f"{field}.{name}", str(exc))


def _check_times(event: ingest_pb2.Event, now: datetime, rules: ValidationRules, fail: _Fail) -> None:
    if not event.HasField("occurred_at"):
        fail("occurred_at", "required")
        return
    occurred_at = event.occurred_at
    if not (
        valid_timestamp(occurred_at)
        and valid_timestamp(event.sent_at)
        and valid_timestamp(event.original_occurred_at)
    ):
        return  # named by unstorable_values; not readable as times
    earliest_us, latest_us = _occurred_bounds_us(now, rules)
    # In whole microseconds, as a datetime holds it (nanos truncated).
    occurred_us = occurred_at.seconds * _MICROS_PER_SECOND + occurred_at.nanos // 1000
    if occurred_us > latest_us:
        fail("occurred_at", f"is more than {int(rules.max_future_skew.total_seconds())}s in the future")
    elif occurred_us < earliest_us:
        fail("occurred_at", f"is older than the retention window of {rules.max_age.days} days")
    if event.HasField("sent_at") and event.HasField("original_occurred_at"):
        if event.sent_at.ToNanoseconds() < event.original_occurred_at.ToNanoseconds():
            fail("sent_at", "must not be before occurred_at (both by the sender's clock)")


@functools.lru_cache(maxsize=8)
def _occurred_bounds_us(now: datetime, rules: ValidationRules) -> tuple[int, int]:
    """The earliest and latest ``occurred_at`` accepted at ``now``, in microseconds since the
    epoch: worked out once for a batch's events (all judged at one ``now``), not per event."""
    epoch = _EPOCH if now.tzinfo is not None else _EPOCH.replace(tzinfo=None)
    now_us = (now - epoch) // _MICROSECOND
    return now_us - rules.max_age // _MICROSECOND, now_us + rules.max_future_skew // _MICROSECOND


def _check_context(context: ingest_pb2.EventContext, fail: _Fail) -> None:
    if context.ip:
        try:
            ipaddress.ip_address(context.ip)
        except ValueError:
            fail("context.ip", "must be an IPv4 or IPv6 address")
    _check_text(context.user_agent, "context.user_agent", fail, required=False)
    if context.locale:
        try:
            Locale.parse(context.locale, sep="-")
        except (ValueError, UnknownLocaleError):
            fail("context.locale", "must be a BCP 47 locale such as en-US or de-AT")
    if context.timezone and context.timezone not in _TIME_ZONES:
        fail("context.timezone", "must be an IANA time zone such as Europe/Vienna")


def _check_text(value: str, field: str, fail: _Fail, *, required: bool, limit: int = MAX_TEXT_LENGTH) -> None:
    if required and not value.strip():
        fail(field, "required")
    elif len(value) > limit:
        fail(field, f"must be at most {limit} characters")


def is_http_url(value: str) -> bool:
    """An absolute http or https URL with a host: what a link in an email or a page may be
    (never javascript:, data: or file:, which a template would put in front of a customer)."""
    try:
        parts = urlsplit(value)
    except ValueError:  # an unbalanced [ in the host
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


# ISO 4217 codes of the legal tender in use today somewhere (CLDR's territory data, through
# babel): no withdrawn currency (DEM), fund code (USN), metal (XAU), nor XTS or XXX.
CURRENCY_CODES = frozenset(
    code
    for currencies in get_global("territory_currencies").values()
    for code, _start, end, tender in currencies
    if end is None and tender
)


def _check_url(value: str, field: str, fail: _Fail, *, required: bool) -> None:
    _check_text(value, field, fail, required=required, limit=MAX_URL_LENGTH)
    if value.strip() and len(value) <= MAX_URL_LENGTH and not is_http_url(value.strip()):
        fail(field, "must be an http or https URL")


def _check_money(money: money_pb2.Money, field: str, fail: _Fail) -> None:
    if money.currency_code not in CURRENCY_CODES:
        fail(f"{field}.currency_code", "must be an ISO 4217 currency code such as EUR or USD")
    elif money.nanos % 10 ** (9 - get_currency_precision(money.currency_code)):
        digits = get_currency_precision(money.currency_code)
        fail(f"{field}.nanos", f"{money.currency_code} has {digits} decimal places; this amount has more")
    if not -_NANOS_PER_UNIT < money.nanos < _NANOS_PER_UNIT:
        fail(f"{field}.nanos", "must be between -999999999 and 999999999")
    elif (money.units > 0 and money.nanos < 0) or (money.units < 0 and money.nanos > 0):
        fail(f"{field}.nanos", "must have the same sign as units")
    if money.units < 0 or money.nanos < 0:
        fail(field, "must not be negative")
    elif money.units > MAX_MONEY_UNITS:
        fail(f"{field}.units", f"must be at most {MAX_MONEY_UNITS} (10^15)")


def _check_required_money(holder: Any, name: str, prefix: str, fail: _Fail) -> None:
    if not holder.HasField(name):
        fail(f"{prefix}.{name}", "required")
    else:
        _check_money(getattr(holder, name), f"{prefix}.{name}", fail)


def _check_quantity(quantity: int, field: str, fail: _Fail) -> None:
    if quantity <= 0:
        fail(field, "must be positive")
    elif quantity > MAX_QUANTITY:
        fail(field, f"must be at most {MAX_QUANTITY}")


def _check_struct(struct: struct_pb2.Struct, field: str, fail: _Fail, *, max_fields: int) -> None:
    """Property names, count and nesting depth of a free-form Struct (traits, properties)."""
    if len(struct.fields) > max_fields:
        fail(field, f"at most {max_fields} entries")
    for name, value in struct.fields.items():
        if not PROPERTY_NAME_PATTERN.match(name):
            fail(field, f"name {name[:64]!r}: use 1 to 64 letters, digits and _")
        elif _depth(value) > MAX_NESTING:
            fail(f"{field}.{name}", f"nested more than {MAX_NESTING} levels deep")
        elif _longest_string(value) > MAX_TEXT_LENGTH:
            fail(f"{field}.{name}", f"strings must be at most {MAX_TEXT_LENGTH} characters")


def _depth(value: struct_pb2.Value) -> int:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return 1 + max((_depth(v) for v in value.struct_value.fields.values()), default=0)
    if kind == "list_value":
        return 1 + max((_depth(v) for v in value.list_value.values), default=0)
    return 0


def _longest_string(value: struct_pb2.Value) -> int:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return len(value.string_value)
    if kind == "struct_value":
        return max((_longest_string(v) for v in value.struct_value.fields.values()), default=0)
    if kind == "list_value":
        return max((_longest_string(v) for v in value.list_value.values), default=0)
    return 0


def _check_lines(lines: Any, total: money_pb2.Money | None, prefix: str, fail: _Fail) -> None:
    if len(lines) > MAX_LINES:
        fail(f"{prefix}.lines", f"at most {MAX_LINES} lines")
        return
    for i, line in enumerate(lines):
        line_field = f"{prefix}.lines[{i}]"
        _check_text(line.sku, f"{line_field}.sku", fail, required=True)
        _check_text(line.name, f"{line_field}.name", fail, required=False)
        _check_quantity(line.quantity, f"{line_field}.quantity", fail)
        if line.HasField("unit_price"):
            _check_money(line.unit_price, f"{line_field}.unit_price", fail)
            if total is not None and line.unit_price.currency_code != total.currency_code:
                fail(f"{line_field}.unit_price.currency_code", "must match the total's currency")


# --- one check per event type: (payload, field prefix, rules, fail) --------------------------

_Rules = ValidationRules


def _product_viewed(p: ingest_pb2.ProductViewed, prefix: str, rules: _Rules, fail: _Fail) -> None:
    _check_text(p.sku, f"{prefix}.sku", fail, required=True)
    _check_text(p.name, f"{prefix}.name", fail, required=False)
    _check_text(p.category, f"{prefix}.category", fail, required=False)
    _check_url(p.url, f"{prefix}.url", fail, required=False)
    if p.HasField("price"):
        _check_money(p.price, f"{prefix}.price", fail)


def _cart_item_added(p: ingest_pb2.CartItemAdded, prefix: str, rules: _Rules, fail: _Fail) -> None:
    _check_text(p.sku, f"{prefix}.sku", fail, required=True)
    _check_text(p.name, f"{prefix}.name", fail, required=False)
    _check_quantity(p.quantity, f"{prefix}.quantity", fail)
    _check_required_money(p, "unit_price", prefix, fail)


def _cart_item_removed(
    p: ingest_pb2.CartItemRemoved, prefix: str, rules: ValidationRules, fail: _Fail
) -> None:
    _check_text(p.sku, f"{prefix}.sku", fail, required=True)
    _check_quantity(p.quantity, f"{prefix}.quantity", fail)


def _order_completed(p: ingest_pb2.OrderCompleted, prefix: str, rules: _Rules, fail: _Fail) -> None:
    _check_text(p.order_id, f"{prefix}.order_id", fail, required=True)
    _check_required_money(p, "total", prefix, fail)
    _check_lines(p.lines, p.total if p.HasField("total") else None, prefix, fail)


def _identify(p: ingest_pb2.Identify, prefix: str, rules: _Rules, fail: _Fail) -> None:
    if not p.traits.fields:
        fail(f"{prefix}.traits", "at least one trait is required")
    else:
        _check_struct(p.traits, f"{prefix}.traits", fail, max_fields=MAX_TRAITS)


def _page_viewed(p: ingest_pb2.PageViewed, prefix: str, rules: _Rules, fail: _Fail) -> None:
    _check_url(p.url, f"{prefix}.url", fail, required=True)
    _check_text(p.title, f"{prefix}.title", fail, required=False)
    _check_url(p.referrer, f"{prefix}.referrer", fail, required=False)


def _product_searched(
    p: ingest_pb2.ProductSearched, prefix: str, rules: ValidationRules, fail: _Fail
) -> None:
    _check_text(p.query, f"{prefix}.query", fail, required=True)
    if p.result_count < 0:
        fail(f"{prefix}.result_count", "must not be negative")


def _checkout_started(
    p: ingest_pb2.CheckoutStarted, prefix: str, rules: ValidationRules, fail: _Fail
) -> None:
    _check_text(p.checkout_id, f"{prefix}.checkout_id", fail, required=True)
    _check_required_money(p, "total", prefix, fail)
    _check_lines(p.lines, p.total if p.HasField("total") else None, prefix, fail)


def _order_refunded(p: ingest_pb2.OrderRefunded, prefix: str, rules: _Rules, fail: _Fail) -> None:
    _check_text(p.order_id, f"{prefix}.order_id", fail, required=True)
    _check_text(p.refund_id, f"{prefix}.refund_id", fail, required=True)
    _check_required_money(p, "amount", prefix, fail)


def _order_cancelled(p: ingest_pb2.OrderCancelled, prefix: str, rules: _Rules, fail: _Fail) -> None:
    _check_text(p.order_id, f"{prefix}.order_id", fail, required=True)
    _check_text(p.reason, f"{prefix}.reason", fail, required=False)


def _alias(p: ingest_pb2.Alias, prefix: str, rules: _Rules, fail: _Fail) -> None:
    _check_identifiers(p.other, f"{prefix}.other", fail)


def _loyalty_changed(p: ingest_pb2.LoyaltyChanged, prefix: str, rules: _Rules, fail: _Fail) -> None:
    if p.points < 0:
        fail(f"{prefix}.points", "must not be negative")
    _check_text(p.tier, f"{prefix}.tier", fail, required=False, limit=64)


def _consent_changed(p: ingest_pb2.ConsentChanged, prefix: str, rules: _Rules, fail: _Fail) -> None:
    if p.channel == ingest_pb2.CHANNEL_UNSPECIFIED:
        fail(f"{prefix}.channel", "required")
    elif p.channel not in ingest_pb2.Channel.values():
        fail(f"{prefix}.channel", f"unknown value {p.channel}")


def _email_message(p: Any, prefix: str, fail: _Fail) -> None:
    if not p.HasField("message"):
        fail(f"{prefix}.message", "required")
        return
    _check_text(p.message.message_id, f"{prefix}.message.message_id", fail, required=True, limit=256)
    _check_text(p.message.campaign_id, f"{prefix}.message.campaign_id", fail, required=False, limit=256)


def _email_event(p: Any, prefix: str, rules: _Rules, fail: _Fail) -> None:
    _email_message(p, prefix, fail)


def _email_clicked(p: ingest_pb2.EmailClicked, prefix: str, rules: _Rules, fail: _Fail) -> None:
    _email_message(p, prefix, fail)
    _check_url(p.url, f"{prefix}.url", fail, required=True)


def _email_bounced(p: ingest_pb2.EmailBounced, prefix: str, rules: _Rules, fail: _Fail) -> None:
    _email_message(p, prefix, fail)
    if p.bounce_type == ingest_pb2.BOUNCE_TYPE_UNSPECIFIED:
        fail(f"{prefix}.bounce_type", "required: BOUNCE_TYPE_HARD or BOUNCE_TYPE_SOFT")
    elif p.bounce_type not in ingest_pb2.BounceType.values():
        fail(f"{prefix}.bounce_type", f"unknown value {p.bounce_type}")
    _check_text(p.reason, f"{prefix}.reason", fail, required=False)


def _email_suppressed(p: ingest_pb2.EmailSuppressed, prefix: str, rules: _Rules, fail: _Fail) -> None:
    if p.reason == ingest_pb2.SUPPRESSION_REASON_UNSPECIFIED:
        fail(
            f"{prefix}.reason",
            "required: SUPPRESSION_REASON_HARD_BOUNCE, _SOFT_BOUNCE, _SPAM_REPORT or _UNSUBSCRIBE",
        )
    elif p.reason not in ingest_pb2.SuppressionReason.values():
        fail(f"{prefix}.reason", f"unknown value {p.reason}")


def _product_upserted(
    p: ingest_pb2.ProductUpserted, prefix: str, rules: ValidationRules, fail: _Fail
) -> None:
    _check_text(p.sku, f"{prefix}.sku", fail, required=True)
    _check_text(p.name, f"{prefix}.name", fail, required=True)
    _check_required_money(p, "price", prefix, fail)
    _check_text(p.category, f"{prefix}.category", fail, required=False)
    _check_url(p.image_url, f"{prefix}.image_url", fail, required=False)
    _check_url(p.url, f"{prefix}.url", fail, required=False)


def _custom(p: ingest_pb2.CustomEvent, prefix: str, rules: _Rules, fail: _Fail) -> None:
    if not p.name:
        fail(f"{prefix}.name", "required")
    elif not CUSTOM_EVENT_NAME_PATTERN.match(p.name):
        fail(f"{prefix}.name", "must be 1 to 64 lower-case letters, digits and _, starting with a letter")
    elif rules.custom_event_names is not None and p.name not in rules.custom_event_names:
        fail(f"{prefix}.name", "is not a known custom event (INGEST_CUSTOM_EVENT_NAMES)")
    _check_struct(p.properties, f"{prefix}.properties", fail, max_fields=MAX_PROPERTIES)


_PAYLOAD_CHECKS: dict[str, Callable[[Any, str, ValidationRules, _Fail], None]] = {
    "product_viewed": _product_viewed,
    "cart_item_added": _cart_item_added,
    "cart_item_removed": _cart_item_removed,
    "order_completed": _order_completed,
    "identify": _identify,
    "page_viewed": _page_viewed,
    "product_searched": _product_searched,
    "checkout_started": _checkout_started,
    "order_refunded": _order_refunded,
    "order_cancelled": _order_cancelled,
    "alias": _alias,
    "loyalty_changed": _loyalty_changed,
    "consent_changed": _consent_changed,
    "email_delivered": _email_event,
    "email_opened": _email_event,
    "email_clicked": _email_clicked,
    "email_bounced": _email_bounced,
    "email_unsubscribed": _email_event,
    "email_spam_reported": _email_event,
    "email_suppressed": _email_suppressed,
    "product_upserted": _product_upserted,
    "custom": _custom,
}
# Every event type of the contract has its check (a test asserts this too).
assert set(_PAYLOAD_CHECKS) == {f.name for f in ingest_pb2.Event.DESCRIPTOR.oneofs_by_name["payload"].fields}
