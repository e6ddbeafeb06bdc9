"""Readers of fields of JSON payloads from outside (provider webhooks, Segment calls): each reads
one field, checks its JSON type and its value, and raises ``PayloadError`` naming the field by
its JSON path, never its value (which may be personal data).

Pure functions. Shared by ``ingest.webhook_mapping`` and ``ingest.segment``. Numbers are read
as ``json_input.parse_json`` gives them: ints and ``Decimal``, never float; amounts stay exact.
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Context, Decimal, Inexact, InvalidOperation, localcontext
from typing import Any

from google.protobuf import timestamp_pb2
from google.type import money_pb2

from ingest.validation import CURRENCY_CODES, is_http_url

# The characters ingest allows in an event id (ingest.validation.EVENT_ID_PATTERN), short enough
# to be a part of one.
ID_PART = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")
NANOS_PER_UNIT = 1_000_000_000
INT64_MAX = 2**63 - 1


class PayloadError(ValueError):
    """A field is not what the payload's format says; the message names the field by its JSON
    path (never its value, which may be personal data)."""


def as_object(value: Any, path: str) -> dict[str, Any]:
    """``value`` when it is a JSON object."""
    if not isinstance(value, dict):
        raise PayloadError(f"{path}: must be an object")
    return value


def optional_object(obj: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    """An object field; {} when absent or null."""
    value = obj.get(key)
    return {} if value is None else as_object(value, f"{path}.{key}")


def list_field(obj: dict[str, Any], key: str, path: str) -> list[Any]:
    """A list field; [] when absent or null."""
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise PayloadError(f"{path}.{key}: must be a list")
    return value


def text(obj: dict[str, Any], key: str, path: str) -> str:
    """A string field; '' when absent or null (Shopify sends null for unset fields)."""
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise PayloadError(f"{path}.{key}: must be a string")
    return value.strip()


def id_text(obj: dict[str, Any], key: str, path: str) -> str:
    """An id sent as a JSON integer or string; '' when absent or null."""
    value = obj.get(key)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise PayloadError(f"{path}.{key}: must be an integer or a string")
    return str(value).strip()


def required_id(obj: dict[str, Any], key: str, path: str) -> str:
    """An id that can be part of an event id (``ID_PART``); required."""
    value = id_text(obj, key, path)
    if not value:
        raise PayloadError(f"{path}.{key}: required")
    if not ID_PART.match(value):
        raise PayloadError(f"{path}.{key}: must be 1 to 100 letters, digits and . _ : -")
    return value


def integer(
    obj: dict[str, Any], key: str, path: str, *, low: int = -INT64_MAX - 1, high: int = INT64_MAX
) -> int | None:
    """An integer field within [low, high] (a JSON number such as 1.7E+9 too); None when absent."""
    value = obj.get(key)
    if value is None:
        return None
    # 1.7E+9 is an integer written as a JSON number with an exponent; adjusted() first, so that
    # 1E+999999 is never expanded.
    if isinstance(value, Decimal) and value.adjusted() <= 18 and value == value.to_integral_value():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError(f"{path}.{key}: must be an integer")
    if not low <= value <= high:
        raise PayloadError(f"{path}.{key}: must be between {low} and {high}")
    return value


def decimal(value: Any, path: str) -> Decimal:
    """An amount: a decimal string as Shopify sends money, or a JSON number (parsed exactly).
    At most 18 digits before the point and 9 after, so that sums of amounts stay exact."""
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise PayloadError(f'{path}: must be a decimal amount such as "19.99"')
    if isinstance(value, str) and not value.isascii():  # Decimal() also reads other scripts' digits
        raise PayloadError(f'{path}: must be a decimal amount such as "19.99"')
    try:
        amount = Decimal(value.strip()) if isinstance(value, str) else Decimal(value)
    except InvalidOperation:
        raise PayloadError(f'{path}: must be a decimal amount such as "19.99"') from None
    if not amount.is_finite():
        raise PayloadError(f"{path}: must be a finite amount")
    if not amount.is_zero() and amount.adjusted() > 18:
        raise PayloadError(f"{path}: too large")
    try:
        amount.quantize(_NANO, context=EXACT)  # raises Inexact rather than round
    except (Inexact, InvalidOperation):
        raise PayloadError(f"{path}: more than 9 decimal places") from None
    return amount


_NANO = Decimal("1E-9")
# Wide enough for any amount decimal lets through, and for sums of a million of them; any
# rounding raises Inexact instead of silently changing an amount.
EXACT = Context(prec=60, traps=[Inexact, InvalidOperation])


def currency(obj: dict[str, Any], key: str, path: str) -> str:
    """An ISO 4217 code in use ('' when absent: ingest then rejects the money that needs one)."""
    code = text(obj, key, path)
    if code and code not in CURRENCY_CODES:
        raise PayloadError(f"{path}.{key}: must be an ISO 4217 currency code such as EUR or USD")
    return code


def url(obj: dict[str, Any], key: str, path: str) -> str:
    """An http or https URL ('' when absent)."""
    url = text(obj, key, path)
    if url and not is_http_url(url):
        raise PayloadError(f"{path}.{key}: must be an http or https URL")
    return url


def to_money(amount: Decimal, currency: str, path: str) -> money_pb2.Money:
    """``amount`` as google.type.Money, exactly: units and nanos carry the same sign.

    Raises:
        PayloadError: more than 9 decimal places, or beyond int64 units.
    """
    if amount.adjusted() > 18:  # checked first: int() of 1E+999999 would be slow
        raise PayloadError(f"{path}: too large")
    try:
        with localcontext() as ctx:
            ctx.prec = 60
            ctx.traps[Inexact] = True  # any rounding is an error, never a silent change
            units = int(amount)  # truncates toward zero, so the remainder has the amount's sign
            fraction = (amount - units) * NANOS_PER_UNIT
    except (Inexact, InvalidOperation):
        raise PayloadError(f"{path}: too many digits") from None
    if fraction != fraction.to_integral_value():
        raise PayloadError(f"{path}: more than 9 decimal places")
    if abs(units) > INT64_MAX:
        raise PayloadError(f"{path}: too large")
    return money_pb2.Money(currency_code=currency, units=units, nanos=int(fraction))


def money_field(obj: dict[str, Any], key: str, currency: str, path: str) -> money_pb2.Money | None:
    """An amount field as Money in ``currency``; None when absent or null."""
    value = obj.get(key)
    if value is None:
        return None
    return to_money(decimal(value, f"{path}.{key}"), currency, f"{path}.{key}")


def iso_time(obj: dict[str, Any], key: str, path: str) -> timestamp_pb2.Timestamp | None:
    """An ISO 8601 time with an offset, as Shopify sends them ("2026-11-24T07:15:03-05:00")."""
    value = text(obj, key, path)
    if not value:
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise PayloadError(f"{path}.{key}: must be an ISO 8601 time") from None
    if at.tzinfo is None:
        raise PayloadError(f"{path}.{key}: must carry a UTC offset")
    ts = timestamp_pb2.Timestamp()
    try:
        ts.FromDatetime(at)  # 0001-01-01T00:00+01:00 is in year 0 in UTC
    except (ValueError, OverflowError):
        raise PayloadError(f"{path}.{key}: must be between the years 1 and 9999 in UTC") from None
    return ts


def first_time(obj: dict[str, Any], keys: tuple[str, ...], path: str) -> timestamp_pb2.Timestamp | None:
    """The first of ``keys`` that holds a time (``iso_time``); None when none does."""
    for key in keys:
        ts = iso_time(obj, key, path)
        if ts is not None:
            return ts
    return None
