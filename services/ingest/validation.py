"""Event validation: every reason an event is refused, as field violations.

Pure functions: no I/O, no clock reads (the caller passes ``now``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from babel.numbers import list_currencies
from google.type import money_pb2

from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.errors import FieldViolation
from sendtime_common.identifiers import IdentifierKind, InvalidIdentifier, normalize_identifier

EVENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
TRAIT_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_]{1,64}$")
MAX_TEXT_LENGTH = 1024
MAX_TRAITS = 100
_CURRENCIES = frozenset(list_currencies())
_NANOS_PER_UNIT = 1_000_000_000

_Fail = Callable[[str, str], None]  # records one violation: (field path, description)


def validate_event(
    event: ingest_pb2.Event, now: datetime, max_future_skew: timedelta
) -> list[FieldViolation]:
    """All the reasons ``event`` is invalid; an empty list when it is valid."""
    violations: list[FieldViolation] = []

    def fail(field: str, description: str) -> None:
        violations.append(FieldViolation(field, description))

    if not event.event_id:
        fail("event_id", "required")
    elif not EVENT_ID_PATTERN.match(event.event_id):
        fail("event_id", "must be 1 to 128 characters of letters, digits and . _ : -")

    _check_customer(event, fail)

    if not event.HasField("occurred_at"):
        fail("occurred_at", "required")
    else:
        occurred_at = event.occurred_at.ToDatetime(tzinfo=now.tzinfo)
        if occurred_at > now + max_future_skew:
            fail("occurred_at", f"is more than {int(max_future_skew.total_seconds())}s in the future")

    if event.source == ingest_pb2.EVENT_SOURCE_UNSPECIFIED:
        fail("source", "required")
    elif event.source not in ingest_pb2.EventSource.values():
        fail("source", f"unknown value {event.source}")

    payload = event.WhichOneof("payload")
    if payload is None:
        fail("payload", f"one of {', '.join(_PAYLOAD_CHECKS)} is required")
    else:
        _PAYLOAD_CHECKS[payload](getattr(event, payload), payload, fail)
    return violations


def _check_customer(event: ingest_pb2.Event, fail: _Fail) -> None:
    customer = event.customer
    present = [kind for kind in IdentifierKind if getattr(customer, kind.value).strip()]
    if not present:
        fail("customer", "at least one of user_id, email, anonymous_id, crm_id, device_id is required")
        return
    for kind in present:
        try:
            normalize_identifier(kind, getattr(customer, kind.value))
        except InvalidIdentifier as exc:
            fail(f"customer.{kind.value}", str(exc))


def _check_text(value: str, field: str, fail: _Fail, *, required: bool) -> None:
    if required and not value.strip():
        fail(field, "required")
    elif len(value) > MAX_TEXT_LENGTH:
        fail(field, f"must be at most {MAX_TEXT_LENGTH} characters")


def _check_money(money: money_pb2.Money, field: str, fail: _Fail) -> None:
    if money.currency_code not in _CURRENCIES:
        fail(f"{field}.currency_code", "must be an ISO 4217 currency code such as EUR or USD")
    if not -_NANOS_PER_UNIT < money.nanos < _NANOS_PER_UNIT:
        fail(f"{field}.nanos", "must be between -999999999 and 999999999")
    elif (money.units > 0 and money.nanos < 0) or (money.units < 0 and money.nanos > 0):
        fail(f"{field}.nanos", "must have the same sign as units")
    if money.units < 0 or money.nanos < 0:
        fail(field, "must not be negative")


def _check_quantity(quantity: int, field: str, fail: _Fail) -> None:
    if quantity <= 0:
        fail(field, "must be positive")


def _check_product_viewed(p: ingest_pb2.ProductViewed, prefix: str, fail: _Fail) -> None:
    _check_text(p.sku, f"{prefix}.sku", fail, required=True)
    _check_text(p.name, f"{prefix}.name", fail, required=False)
    _check_text(p.category, f"{prefix}.category", fail, required=False)
    _check_text(p.url, f"{prefix}.url", fail, required=False)
    if p.HasField("price"):
        _check_money(p.price, f"{prefix}.price", fail)


def _check_cart_item_added(p: ingest_pb2.CartItemAdded, prefix: str, fail: _Fail) -> None:
    _check_text(p.sku, f"{prefix}.sku", fail, required=True)
    _check_text(p.name, f"{prefix}.name", fail, required=False)
    _check_quantity(p.quantity, f"{prefix}.quantity", fail)
    if not p.HasField("unit_price"):
        fail(f"{prefix}.unit_price", "required")
    else:
        _check_money(p.unit_price, f"{prefix}.unit_price", fail)


def _check_cart_item_removed(p: ingest_pb2.CartItemRemoved, prefix: str, fail: _Fail) -> None:
    _check_text(p.sku, f"{prefix}.sku", fail, required=True)
    _check_quantity(p.quantity, f"{prefix}.quantity", fail)


def _check_order_completed(p: ingest_pb2.OrderCompleted, prefix: str, fail: _Fail) -> None:
    _check_text(p.order_id, f"{prefix}.order_id", fail, required=True)
    if not p.HasField("total"):
        fail(f"{prefix}.total", "required")
    else:
        _check_money(p.total, f"{prefix}.total", fail)
    for i, line in enumerate(p.lines):
        line_field = f"{prefix}.lines[{i}]"
        _check_text(line.sku, f"{line_field}.sku", fail, required=True)
        _check_text(line.name, f"{line_field}.name", fail, required=False)
        _check_quantity(line.quantity, f"{line_field}.quantity", fail)
        if line.HasField("unit_price"):
            _check_money(line.unit_price, f"{line_field}.unit_price", fail)
            if p.HasField("total") and line.unit_price.currency_code != p.total.currency_code:
                fail(f"{line_field}.unit_price.currency_code", "must match the order total's currency")


def _check_identify(p: ingest_pb2.Identify, prefix: str, fail: _Fail) -> None:
    traits = p.traits.fields
    if not traits:
        fail(f"{prefix}.traits", "at least one trait is required")
    elif len(traits) > MAX_TRAITS:
        fail(f"{prefix}.traits", f"at most {MAX_TRAITS} traits per event")
    for name in traits:
        if not TRAIT_NAME_PATTERN.match(name):
            fail(f"{prefix}.traits", f"trait name {name[:64]!r}: use 1 to 64 letters, digits and _")


_PAYLOAD_CHECKS: dict[str, Callable[[Any, str, _Fail], None]] = {
    "product_viewed": _check_product_viewed,
    "cart_item_added": _check_cart_item_added,
    "cart_item_removed": _check_cart_item_removed,
    "order_completed": _check_order_completed,
    "identify": _check_identify,
}
