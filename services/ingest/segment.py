"""Segment's HTTP Tracking API calls as ingest events: the pure mapping behind ``POST /v1/track``,
``/v1/identify``, ``/v1/page``, ``/v1/screen``, ``/v1/alias``, ``/v1/group`` and ``/v1/batch``.

No I/O and no clock reads (the caller passes ``received_at``). docs/segment.md has the mapping
tables, and says why each choice was made.

Every call (the one of ``/v1/track``, each element of a batch) is mapped on its own, so one bad
call never fails the others. A call becomes:

- ``ACCEPTED``: its events (none, or one) go on to ingest, which validates, deduplicates and
  stores them as it does any event, and answers each with its own outcome.
- ``REJECTED``: it is not what Segment's spec says (a field of the wrong JSON type, no userId or
  anonymousId, a URL that is not http(s), an amount that is not a finite decimal, money without
  a currency), or it cannot fit what ingest accepts. ``reason`` names the field by its JSON path
  (``batch[3].properties.price``), never its value. A call that made the mapping raise
  something unexpected (a bug) is rejected too, with ``error`` set for the caller to log.

Nothing any JSON value can hold makes ``map_call`` or ``map_batch`` raise.

Clock skew is corrected the way Segment does it, ``occurred_at = timestamp + (receivedAt −
sentAt)``, by ingest itself: the event carries ``timestamp`` as ``occurred_at`` and ``sentAt``
as ``sent_at``, which is the correction ingest applies when it stamps the event
(``ingest.envelope.stamp``), keeping the sender's time in ``original_occurred_at``. A retry
sends a new ``sentAt``; left to ingest, the retry is the same event (a duplicate), where a
time corrected here would make it an idempotency conflict.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import json
import math
import re
import unicodedata
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from babel import Locale, UnknownLocaleError
from google.protobuf import struct_pb2, timestamp_pb2
from google.type import money_pb2

from ingest import payload_fields as fields
from ingest.payload_fields import PayloadError, to_money
from ingest.validation import (
    CURRENCY_CODES,
    EVENT_ID_PATTERN,
    MAX_NESTING,
    MAX_PROPERTIES,
    MAX_QUANTITY,
    MAX_TEXT_LENGTH,
    MAX_TRAITS,
    PROPERTY_NAME_PATTERN,
    is_http_url,
)
from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.errors import FieldViolation

# Segment's published limits: a call at most 32 KB, a batch request at most 500 KB. The HTTP
# layer enforces them on the bytes of a request; map_batch rejects a call of a batch that is
# larger than MAX_CALL_BYTES as compact JSON.
MAX_CALL_BYTES = 32 * 1024
MAX_BATCH_BYTES = 500 * 1024

CALL_TYPES = frozenset({"track", "identify", "page", "screen", "alias", "group"})

# Libraries by context.library.name; any other (the server libraries, curl) is SERVER.
_WEB_LIBRARIES = frozenset({"analytics.js", "analytics-next", "analytics.js-next"})
_MOBILE_LIBRARIES = frozenset(
    {
        "analytics-ios",
        "analytics-android",
        "analytics-swift",
        "analytics-kotlin",
        "analytics-react-native",
        "analytics-flutter",
        "analytics-xamarin",
    }
)
# Segment's reserved traits written in camelCase, in Sendtime's snake_case (docs/segment.md).
_TRAIT_NAMES = {"firstName": "first_name", "lastName": "last_name", "createdAt": "created_at"}
_KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_TIME_ZONES = frozenset(zoneinfo.available_timezones())
# The parts of a call that are not the call: a retry sends a new sentAt, and the write key is a
# secret that a key rotation changes.
_TRANSPORT_KEYS = ("sentAt", "writeKey", "receivedAt")


class CallOutcome(enum.StrEnum):
    """What became of one call (the module docstring says what each means)."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class MappedCall:
    """One Segment call and what it became."""

    # 0 for a single call; the position in ``batch`` for a batch.
    index: int
    # The call type (``track``, ``identify``, ...) as given, at most 64 characters; '' when a
    # batch element has none that can be read.
    type: str
    outcome: CallOutcome
    # ACCEPTED: the events for ingest (none when there is nothing to record).
    events: tuple[ingest_pb2.Event, ...] = ()
    # REJECTED: the field, as a JSON path from the request body, and what is wrong with it.
    reason: FieldViolation | None = None
    # REJECTED by an unexpected exception (a bug): for the caller to log.
    error: Exception | None = None


@dataclass(frozen=True, slots=True)
class MappedRequest:
    """The calls of one request, in order. ``problem`` is set (and ``items`` empty) when the
    body is not a batch at all: the HTTP layer answers 400 with it."""

    items: tuple[MappedCall, ...]
    problem: FieldViolation | None = None

    @property
    def events(self) -> list[ingest_pb2.Event]:
        """The events of the accepted calls, in order."""
        return [event for item in self.items for event in item.events]

    @property
    def accepted(self) -> int:
        return sum(1 for item in self.items if item.outcome == CallOutcome.ACCEPTED)

    @property
    def rejected(self) -> int:
        return sum(1 for item in self.items if item.outcome == CallOutcome.REJECTED)


@dataclass(frozen=True, slots=True)
class _Settings:
    received_at: datetime
    key_part: str
    default_currency: str


def map_call(
    call_type: str, payload: Any, *, received_at: datetime, key_id: str, default_currency: str = ""
) -> MappedRequest:
    """One call: the body of ``POST /v1/<call_type>`` as parsed JSON. The call type is the
    route's; a ``type`` in the body is not read. Paths in reasons start at the body
    (``properties.price``).

    ``key_id`` is the API key the request was authenticated with: event ids are unique per key.
    ``default_currency`` is the currency of an amount when the call names none.

    Raises:
        ValueError: ``default_currency`` is not an ISO 4217 code (a configuration error); never
            for anything ``payload`` holds.
    """
    settings = _settings(received_at, key_id, default_currency)
    call_type = call_type.strip().lower() if isinstance(call_type, str) else ""
    return MappedRequest((_map_item(0, call_type, payload, "", None, settings, check_size=False),))


def map_batch(
    payload: Any, *, received_at: datetime, key_id: str, default_currency: str = ""
) -> MappedRequest:
    """The calls of ``POST /v1/batch``: ``{"batch": [{"type": ..., ...}, ...], "context": ...,
    "integrations": ..., "sentAt": ...}``. The batch's ``context`` and ``integrations`` are
    merged into each call (a call's own keys win), and its ``sentAt`` applies to each call that
    has none. Paths in reasons start at the body (``batch[3].properties.price``).

    Raises:
        ValueError: ``default_currency`` is not an ISO 4217 code; never for anything ``payload``
            holds.
    """
    settings = _settings(received_at, key_id, default_currency)
    if not isinstance(payload, dict):
        return MappedRequest((), FieldViolation("body", "must be a JSON object"))
    batch = payload.get("batch")
    if not isinstance(batch, list):
        return MappedRequest((), FieldViolation("batch", "required: a list of calls"))
    shared: dict[str, dict[str, Any]] = {}
    for key in ("context", "integrations"):
        value = payload.get(key)
        if value is not None and not isinstance(value, dict):
            return MappedRequest((), FieldViolation(key, "must be an object"))
        shared[key] = value or {}
    try:
        sent_at = fields.iso_time(payload, "sentAt", "")
    except PayloadError as exc:
        return MappedRequest((), _violation(exc))
    items = []
    for index, raw in enumerate(batch):
        path = f"batch[{index}]"
        call_type = ""
        if isinstance(raw, dict):
            raw_type = raw.get("type")
            call_type = raw_type.strip().lower()[:64] if isinstance(raw_type, str) else ""
            raw = _merged(raw, shared)
        items.append(_map_item(index, call_type, raw, path, sent_at, settings, check_size=True))
    return MappedRequest(tuple(items))


def _settings(received_at: datetime, key_id: str, default_currency: str) -> _Settings:
    if default_currency and default_currency not in CURRENCY_CODES:
        raise ValueError("default_currency must be an ISO 4217 currency code such as EUR or USD")
    # Key ids are 12 base62 characters; anything else is hashed into a part an event id can hold.
    key_part = key_id if _KEY_ID.match(key_id) else "k" + hashlib.sha256(key_id.encode()).hexdigest()[:16]
    return _Settings(received_at, key_part, default_currency)


def _merged(call: dict[str, Any], shared: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The call with the batch's context and integrations under its own (as Segment merges
    them: key by key, the call's keys win). A call's own value of the wrong type is kept, for
    the mapping to reject."""
    merged = dict(call)
    for key, batch_value in shared.items():
        own = call.get(key)
        if batch_value and (own is None or isinstance(own, dict)):
            merged[key] = {**batch_value, **(own or {})}
    return merged


def _violation(exc: PayloadError) -> FieldViolation:
    """A PayloadError's "path: description" as a field violation; the path from the body root."""
    path, _, description = str(exc).partition(": ")
    return FieldViolation(path.lstrip(".") or "body", description)


def _map_item(
    index: int,
    call_type: str,
    raw: Any,
    path: str,
    sent_at: timestamp_pb2.Timestamp | None,
    settings: _Settings,
    *,
    check_size: bool,
) -> MappedCall:
    """One call, whatever it holds: the other calls of the batch go on."""
    try:
        events = _map(call_type, raw, path, sent_at, settings, check_size)
    except PayloadError as exc:
        return MappedCall(index, call_type, CallOutcome.REJECTED, reason=_violation(exc))
    except Exception as exc:  # a bug, or a Python value no JSON holds: rejected, never raised
        reason = FieldViolation(path or "body", "could not be mapped")
        return MappedCall(index, call_type, CallOutcome.REJECTED, reason=reason, error=exc)
    return MappedCall(index, call_type, CallOutcome.ACCEPTED, tuple(events))


def _map(
    call_type: str,
    raw: Any,
    path: str,
    batch_sent_at: timestamp_pb2.Timestamp | None,
    settings: _Settings,
    check_size: bool,
) -> list[ingest_pb2.Event]:
    call = fields.as_object(raw, path or "body")
    if call_type not in CALL_TYPES:
        raise PayloadError(f"{path}.type: must be one of {', '.join(sorted(CALL_TYPES))}")
    if check_size and len(_canonical(call)) > MAX_CALL_BYTES:
        raise PayloadError(f"{path}: larger than {MAX_CALL_BYTES // 1024} KB")
    context = fields.optional_object(call, "context", path)
    context_path = f"{path}.context"
    event = ingest_pb2.Event(
        event_id=_event_id(call, path, settings),
        customer=_customer(call_type, call, context, path),
        source=_source(context, context_path),
    )
    occurred_at = fields.first_time(call, ("timestamp", "originalTimestamp"), path)
    if occurred_at is None:
        # No time of the sender's: Segment's own rule, the time it was received.
        event.occurred_at.FromDatetime(settings.received_at)
    else:
        event.occurred_at.CopyFrom(occurred_at)
        sent_at = fields.iso_time(call, "sentAt", path) or batch_sent_at
        if sent_at is not None:
            event.sent_at.CopyFrom(sent_at)  # ingest corrects occurred_at by it
    _set_context(event.context, context, context_path)
    if event.context.ByteSize() == 0:
        event.ClearField("context")
    return _CALLS[call_type](event, call, context, path, settings)


# --- identity, ids, times ----------------------------------------------------------------------


def _customer(
    call_type: str, call: dict[str, Any], context: dict[str, Any], path: str
) -> ingest_pb2.CustomerIdentifiers:
    user_id = fields.id_text(call, "userId", path)
    anonymous_id = fields.id_text(call, "anonymousId", path)
    if call_type == "alias":
        if not user_id:
            raise PayloadError(f"{path}.userId: required for an alias")
    elif not user_id and not anonymous_id:
        raise PayloadError(f"{path}.userId: userId or anonymousId is required")
    email = ""
    if call_type == "identify":
        email = fields.text(fields.optional_object(call, "traits", path), "email", f"{path}.traits")
    if not email:
        context_traits = fields.optional_object(context, "traits", f"{path}.context")
        email = fields.text(context_traits, "email", f"{path}.context.traits")
    return ingest_pb2.CustomerIdentifiers(user_id=user_id, anonymous_id=anonymous_id, email=email)


def _event_id(call: dict[str, Any], path: str, settings: _Settings) -> str:
    """``segment:<key id>:<messageId>``. A messageId an event id cannot hold (other characters,
    too long) is hashed (``…:h:<sha-256 prefix>``); a call without one gets a digest of its
    canonical JSON without sentAt and writeKey (``…:c:<sha-256 prefix>``), so that its retry is
    the same event."""
    message_id = fields.id_text(call, "messageId", path)
    prefix = f"segment:{settings.key_part}:"
    if message_id:
        if EVENT_ID_PATTERN.match(prefix + message_id):
            return prefix + message_id
        return f"{prefix}h:{hashlib.sha256(message_id.encode('utf-8', 'surrogatepass')).hexdigest()[:40]}"
    content = {k: v for k, v in call.items() if k not in _TRANSPORT_KEYS}
    return f"{prefix}c:{hashlib.sha256(_canonical(content)).hexdigest()[:40]}"


def _canonical(value: Any) -> bytes:
    """Compact JSON with sorted keys: a call's size and its digest."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return text.encode("utf-8", "surrogatepass")


def _source(context: dict[str, Any], path: str) -> ingest_pb2.EventSource.ValueType:
    library = fields.text(fields.optional_object(context, "library", path), "name", f"{path}.library").lower()
    if library in _WEB_LIBRARIES:
        return ingest_pb2.EVENT_SOURCE_WEB
    if library in _MOBILE_LIBRARIES:
        return ingest_pb2.EVENT_SOURCE_MOBILE_APP
    return ingest_pb2.EVENT_SOURCE_SERVER


def _set_context(target: ingest_pb2.EventContext, context: dict[str, Any], path: str) -> None:
    """ip, userAgent, locale and timezone. They enrich an event but are not the event: a value
    ingest would refuse (an ip that is no address, locale ``xx``) is left out, not a reason to
    lose the call."""
    ip = fields.text(context, "ip", path)
    try:
        target.ip = str(ipaddress.ip_address(ip)) if ip else ""
    except ValueError:
        pass
    user_agent = fields.text(context, "userAgent", path)
    if len(user_agent) <= MAX_TEXT_LENGTH and _storable(user_agent):
        target.user_agent = user_agent
    locale = fields.text(context, "locale", path).replace("_", "-")
    if locale and len(locale) <= 64:
        try:
            Locale.parse(locale, sep="-")
            target.locale = locale
        except (ValueError, TypeError, UnknownLocaleError):
            pass
    timezone = fields.text(context, "timezone", path)
    if timezone in _TIME_ZONES:
        target.timezone = timezone


def _storable(text: str) -> bool:
    """No NUL (PostgreSQL cannot store it) and no lone surrogate (not UTF-8)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --- values --------------------------------------------------------------------------------


def _amount(value: Any, path: str) -> Decimal:
    """A JSON number (or decimal string) as an exact Decimal; a float (a caller that parsed with
    json.loads) as the shortest decimal that reads back as it."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PayloadError(f"{path}: must be a finite amount")
        value = Decimal(repr(value))
    return fields.decimal(value, path)


def _money(
    obj: dict[str, Any], key: str, currency: str, path: str, *, negative: bool = False
) -> money_pb2.Money | None:
    """An amount field as Money (None when absent or null). Without a currency, the call is
    rejected: ingest takes money only with its ISO 4217 code."""
    value = obj.get(key)
    if value is None:
        return None
    amount = _amount(value, f"{path}.{key}")
    if amount < 0:
        if not negative:
            raise PayloadError(f"{path}.{key}: must not be negative")
        amount = -amount
    if not currency:
        raise PayloadError(f"{path}.currency: required with {key} (no currency and no default currency)")
    return to_money(amount, currency, f"{path}.{key}")


def _quantity(obj: dict[str, Any], path: str) -> int:
    """``quantity``: 1 when absent (one product), else a whole number from 1 to MAX_QUANTITY."""
    value = obj.get("quantity")
    if value is None:
        return 1
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, Decimal) and value.is_finite() and value.adjusted() <= 18 and value == int(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_QUANTITY:
        raise PayloadError(f"{path}.quantity: must be a whole number from 1 to {MAX_QUANTITY}")
    return value


def _sku(obj: dict[str, Any], path: str) -> str:
    """``sku``, else ``product_id``: Sendtime keys products by SKU."""
    sku = fields.text(obj, "sku", path) or fields.id_text(obj, "product_id", path)
    if not sku:
        raise PayloadError(f"{path}.sku: required (sku or product_id)")
    return sku


def _currency(props: dict[str, Any], path: str, settings: _Settings) -> str:
    return fields.currency(props, "currency", path) or settings.default_currency


def _struct(obj: dict[str, Any], path: str, max_fields: int) -> struct_pb2.Struct:
    """A JSON object as a Struct within ingest's limits for properties and traits: names of 1-64
    [A-Za-z0-9_], at most ``max_fields``, nested at most MAX_NESTING deep, strings at most
    MAX_TEXT_LENGTH, numbers finite."""
    if len(obj) > max_fields:
        raise PayloadError(f"{path}: at most {max_fields} entries")
    struct = struct_pb2.Struct()
    for name, value in obj.items():
        if not isinstance(name, str) or not PROPERTY_NAME_PATTERN.match(name):
            raise PayloadError(f"{path}[{_quoted(name)}]: names must be 1 to 64 letters, digits and _")
        struct.fields[name].CopyFrom(_value(value, f"{path}.{name}", MAX_NESTING))
    return struct


def _quoted(name: Any) -> str:
    return json.dumps(str(name)[:64])


def _value(value: Any, path: str, levels: int) -> struct_pb2.Value:
    if value is None:
        return struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)
    if isinstance(value, bool):
        return struct_pb2.Value(bool_value=value)
    if isinstance(value, int | float | Decimal):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise PayloadError(f"{path}: must be a finite number")
        return struct_pb2.Value(number_value=number)
    if isinstance(value, str):
        if len(value) > MAX_TEXT_LENGTH:
            raise PayloadError(f"{path}: must be at most {MAX_TEXT_LENGTH} characters")
        if not _storable(value):
            raise PayloadError(f"{path}: must not hold NUL or unpaired surrogates")
        return struct_pb2.Value(string_value=value)
    if isinstance(value, dict | list):
        if levels <= 0:
            raise PayloadError(f"{path}: nested more than {MAX_NESTING} levels deep")
        if isinstance(value, list):
            items = [_value(v, f"{path}[{i}]", levels - 1) for i, v in enumerate(value)]
            return struct_pb2.Value(list_value=struct_pb2.ListValue(values=items))
        struct = struct_pb2.Struct()
        for key, item in value.items():
            if not isinstance(key, str) or not _storable(key):
                raise PayloadError(f"{path}: names must be text")
            struct.fields[key].CopyFrom(_value(item, f"{path}.{key}", levels - 1))
        return struct_pb2.Value(struct_value=struct)
    raise PayloadError(f"{path}: must be a JSON value")


def _custom(event: ingest_pb2.Event, name: str, properties: dict[str, Any], path: str) -> None:
    event.custom.name = name
    event.custom.properties.CopyFrom(_struct(properties, path, MAX_PROPERTIES))


def custom_event_name(name: str) -> str:
    """A Segment event name as a custom event name (``[a-z][a-z0-9_]{0,63}``): accents dropped,
    camelCase split, runs of other characters as one ``_``, ``event_`` before a leading digit;
    '' when nothing is left or the name is too long. "Video Played" → ``video_played``."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    split = re.sub(r"(?<=[a-z])(?=[A-Z])", "_", ascii_name)
    snake = re.sub(r"[^a-z0-9]+", "_", split.lower()).strip("_")
    if snake[:1].isdigit():
        snake = f"event_{snake}"
    return snake if len(snake) <= 64 else ""


# --- track ------------------------------------------------------------------------------------


def _lines(props: dict[str, Any], currency: str, path: str) -> list[ingest_pb2.OrderLine]:
    lines = []
    for i, raw in enumerate(fields.list_field(props, "products", path)):
        line_path = f"{path}.products[{i}]"
        product = fields.as_object(raw, line_path)
        line = ingest_pb2.OrderLine(
            sku=_sku(product, line_path),
            name=fields.text(product, "name", line_path),
            quantity=_quantity(product, line_path),
        )
        price = _money(product, "price", currency, line_path)
        if price is not None:
            line.unit_price.CopyFrom(price)
        lines.append(line)
    return lines


def _total(
    props: dict[str, Any],
    currency: str,
    lines: list[ingest_pb2.OrderLine],
    path: str,
    *,
    negative: bool = False,
) -> money_pb2.Money:
    """``total``, else ``value``, else ``revenue`` (which leaves out shipping and tax), else the
    sum of the products' price × quantity when every product has a price."""
    for key in ("total", "value", "revenue"):
        money = _money(props, key, currency, path, negative=negative)
        if money is not None:
            return money
    if lines and all(line.HasField("unit_price") for line in lines):
        total = Decimal(0)
        for line in lines:
            unit = Decimal(line.unit_price.units) + Decimal(line.unit_price.nanos).scaleb(-9)
            total = fields.EXACT.add(total, fields.EXACT.multiply(unit, line.quantity))
        return to_money(total, currency, f"{path}.products")
    raise PayloadError(f"{path}.total: required (or value, revenue, or products that all have a price)")


def _order_id(props: dict[str, Any], path: str, keys: tuple[str, ...] = ("order_id",)) -> str:
    for key in keys:
        value = fields.id_text(props, key, path)
        if value:
            return value
    raise PayloadError(f"{path}.{keys[0]}: required")


def _product_viewed(event: ingest_pb2.Event, props: dict[str, Any], path: str, settings: _Settings) -> None:
    viewed = ingest_pb2.ProductViewed(
        sku=_sku(props, path),
        name=fields.text(props, "name", path),
        category=fields.text(props, "category", path),
        url=fields.url(props, "url", path) or fields.url(props, "image_url", path),
    )
    price = _money(props, "price", _currency(props, path, settings), path)
    if price is not None:
        viewed.price.CopyFrom(price)
    event.product_viewed.CopyFrom(viewed)


def _product_added(event: ingest_pb2.Event, props: dict[str, Any], path: str, settings: _Settings) -> None:
    price = _money(props, "price", _currency(props, path, settings), path)
    if price is None:
        raise PayloadError(f"{path}.price: required")
    event.cart_item_added.CopyFrom(
        ingest_pb2.CartItemAdded(
            sku=_sku(props, path),
            name=fields.text(props, "name", path),
            quantity=_quantity(props, path),
            unit_price=price,
        )
    )


def _product_removed(event: ingest_pb2.Event, props: dict[str, Any], path: str, settings: _Settings) -> None:
    event.cart_item_removed.CopyFrom(
        ingest_pb2.CartItemRemoved(sku=_sku(props, path), quantity=_quantity(props, path))
    )


def _checkout_started(event: ingest_pb2.Event, props: dict[str, Any], path: str, settings: _Settings) -> None:
    checkout_id = _order_id(props, path, ("checkout_id", "cart_id", "order_id"))
    currency = _currency(props, path, settings)
    lines = _lines(props, currency, path)
    event.checkout_started.CopyFrom(
        ingest_pb2.CheckoutStarted(
            checkout_id=checkout_id, total=_total(props, currency, lines, path), lines=lines
        )
    )


def _order_completed(event: ingest_pb2.Event, props: dict[str, Any], path: str, settings: _Settings) -> None:
    order_id = _order_id(props, path)
    currency = _currency(props, path, settings)
    lines = _lines(props, currency, path)
    event.order_completed.CopyFrom(
        ingest_pb2.OrderCompleted(order_id=order_id, total=_total(props, currency, lines, path), lines=lines)
    )


def _order_refunded(event: ingest_pb2.Event, props: dict[str, Any], path: str, settings: _Settings) -> None:
    order_id = _order_id(props, path)
    currency = _currency(props, path, settings)
    # A refund's amount is often sent negative (money going out): read as its size.
    amount = _total(props, currency, _lines(props, currency, path), path, negative=True)
    event.order_refunded.CopyFrom(
        ingest_pb2.OrderRefunded(
            order_id=order_id,
            # Segment's spec has no refund id: without one, each call is its own refund.
            refund_id=fields.id_text(props, "refund_id", path) or event.event_id,
            amount=amount,
        )
    )


def _order_cancelled(event: ingest_pb2.Event, props: dict[str, Any], path: str, settings: _Settings) -> None:
    event.order_cancelled.CopyFrom(
        ingest_pb2.OrderCancelled(order_id=_order_id(props, path), reason=fields.text(props, "reason", path))
    )


def _products_searched(
    event: ingest_pb2.Event, props: dict[str, Any], path: str, settings: _Settings
) -> None:
    query = fields.text(props, "query", path)
    if not query:
        raise PayloadError(f"{path}.query: required")
    event.product_searched.query = query


def _as_custom(name: str) -> Callable[[ingest_pb2.Event, dict[str, Any], str, _Settings], None]:
    def mapping(event: ingest_pb2.Event, props: dict[str, Any], path: str, settings: _Settings) -> None:
        _custom(event, name, props, path)

    return mapping


# Segment's e-commerce v2 events by name, lower-cased with single spaces (Segment matches the
# names case-insensitively). The others are custom events.
_ECOMMERCE: dict[str, Callable[[ingest_pb2.Event, dict[str, Any], str, _Settings], None]] = {
    "product viewed": _product_viewed,
    "product added": _product_added,
    "product removed": _product_removed,
    "cart viewed": _as_custom("cart_viewed"),
    "checkout started": _checkout_started,
    "order completed": _order_completed,
    "order updated": _as_custom("order_updated"),
    "order refunded": _order_refunded,
    "order cancelled": _order_cancelled,
    "products searched": _products_searched,
}
ECOMMERCE_EVENTS = frozenset(_ECOMMERCE)


def _track(
    event: ingest_pb2.Event, call: dict[str, Any], context: dict[str, Any], path: str, settings: _Settings
) -> list[ingest_pb2.Event]:
    name = fields.text(call, "event", path)
    if not name:
        raise PayloadError(f"{path}.event: required")
    props = fields.optional_object(call, "properties", path)
    props_path = f"{path}.properties"
    mapping = _ECOMMERCE.get(" ".join(name.lower().split()))
    if mapping is not None:
        mapping(event, props, props_path, settings)
    else:
        custom_name = custom_event_name(name)
        if not custom_name:
            raise PayloadError(f"{path}.event: must make a custom event name of 1 to 64 letters and digits")
        _custom(event, custom_name, props, props_path)
    return [event]


# --- the other calls ----------------------------------------------------------------------------


def _identify(
    event: ingest_pb2.Event, call: dict[str, Any], context: dict[str, Any], path: str, settings: _Settings
) -> list[ingest_pb2.Event]:
    traits = fields.optional_object(call, "traits", path)
    traits_path = f"{path}.traits"
    if call.get("traits") is None:
        # RudderStack's libraries send an identify's traits in context.traits only.
        traits = fields.optional_object(context, "traits", f"{path}.context")
        traits_path = f"{path}.context.traits"
    renamed: dict[str, Any] = {}
    for name, value in traits.items():
        sendtime_name = _TRAIT_NAMES.get(name, name)
        if sendtime_name != name and sendtime_name in traits:
            continue  # first_name sent as well as firstName: the snake_case one wins
        renamed[sendtime_name] = value
    if renamed:
        event.identify.traits.CopyFrom(_struct(renamed, traits_path, MAX_TRAITS))
        return [event]
    # Without traits, an identify only says that its identifiers are one person.
    customer = event.customer
    present = [(kind, getattr(customer, kind)) for kind in ("user_id", "anonymous_id", "email")]
    present = [(kind, value) for kind, value in present if value]
    if len(present) < 2:
        return []
    first_kind, first_value = present[0]
    event.customer.CopyFrom(ingest_pb2.CustomerIdentifiers(**{first_kind: first_value}))
    event.alias.other.CopyFrom(ingest_pb2.CustomerIdentifiers(**dict(present[1:])))
    return [event]


def _page(
    event: ingest_pb2.Event, call: dict[str, Any], context: dict[str, Any], path: str, settings: _Settings
) -> list[ingest_pb2.Event]:
    props = fields.optional_object(call, "properties", path)
    props_path = f"{path}.properties"
    page = fields.optional_object(context, "page", f"{path}.context")
    page_path = f"{path}.context.page"
    url = fields.url(props, "url", props_path) or fields.url(page, "url", page_path)
    if not url:
        return _named_custom(event, "page", call, props, path)
    referrer = fields.text(props, "referrer", props_path) or fields.text(page, "referrer", page_path)
    event.page_viewed.CopyFrom(
        ingest_pb2.PageViewed(
            url=url,
            title=fields.text(props, "title", props_path)
            or fields.text(page, "title", page_path)
            or fields.text(call, "name", path),
            # A referrer that is not http(s) (android-app://…) is left out, not a reason to
            # lose the page view.
            referrer=referrer if is_http_url(referrer) else "",
        )
    )
    return [event]


def _named_custom(
    event: ingest_pb2.Event, name: str, call: dict[str, Any], props: dict[str, Any], path: str
) -> list[ingest_pb2.Event]:
    """A page (without a URL) or a screen: its properties, with the call's name and category
    where the properties have none."""
    merged = dict(props)
    for key in ("name", "category"):
        value = fields.text(call, key, path)
        if value and key not in merged:
            merged[key] = value
    _custom(event, name, merged, f"{path}.properties")
    return [event]


def _screen(
    event: ingest_pb2.Event, call: dict[str, Any], context: dict[str, Any], path: str, settings: _Settings
) -> list[ingest_pb2.Event]:
    return _named_custom(event, "screen", call, fields.optional_object(call, "properties", path), path)


def _alias(
    event: ingest_pb2.Event, call: dict[str, Any], context: dict[str, Any], path: str, settings: _Settings
) -> list[ingest_pb2.Event]:
    previous_id = fields.id_text(call, "previousId", path)
    if not previous_id:
        raise PayloadError(f"{path}.previousId: required")
    # Segment's previousId is most often the anonymousId of the visitor who just signed up; it
    # is linked as one (docs/segment.md says why not as a user id).
    event.alias.other.anonymous_id = previous_id
    return [event]


def _group(
    event: ingest_pb2.Event, call: dict[str, Any], context: dict[str, Any], path: str, settings: _Settings
) -> list[ingest_pb2.Event]:
    group_id = fields.id_text(call, "groupId", path)
    if not group_id:
        raise PayloadError(f"{path}.groupId: required")
    properties: dict[str, Any] = {"group_id": group_id}
    traits = fields.optional_object(call, "traits", path)
    if traits:
        properties["traits"] = traits
    _custom(event, "group", properties, path)
    return [event]


_CALLS: dict[
    str,
    Callable[[ingest_pb2.Event, dict[str, Any], dict[str, Any], str, _Settings], list[ingest_pb2.Event]],
] = {
    "track": _track,
    "identify": _identify,
    "page": _page,
    "screen": _screen,
    "alias": _alias,
    "group": _group,
}
