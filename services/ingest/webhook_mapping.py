"""Provider webhooks as ingest events: signature checks and payload mapping.

Pure functions: no I/O, no clock reads (the caller passes ``now``), so every rule can be tested
with literal payloads. docs/webhooks.md has the mapping tables.

Mapping is strict about shape and lenient about content. A body that is not the provider's
format (not JSON, wrong JSON types, an amount that is not a decimal) raises
``WebhookPayloadError`` and the whole request is refused with 400. A well-formed event that lacks
something Sendtime needs (an order without an email) still becomes an event: ingest rejects it
with field violations and keeps it in its dead-letter store, where it can be replayed once fixed,
and the provider is not made to retry a delivery that can never succeed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal, Inexact, InvalidOperation, localcontext
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import timestamp_pb2
from google.type import money_pb2

from sendtime.ingest.v1 import ingest_pb2

SHOPIFY_HMAC_HEADER = "X-Shopify-Hmac-Sha256"
SHOPIFY_TOPIC_HEADER = "X-Shopify-Topic"
SHOPIFY_WEBHOOK_ID_HEADER = "X-Shopify-Webhook-Id"
SENDGRID_SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
SENDGRID_TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"

# The characters ingest allows in an event id (ingest.validation.EVENT_ID_PATTERN).
_ID_PART = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")
_NANOS_PER_UNIT = 1_000_000_000
_INT64_MAX = 2**63 - 1


class WebhookPayloadError(ValueError):
    """The body is not in the provider's format; the message names the offending field (never
    its value, which may be personal data)."""


class WebhookSignatureError(ValueError):
    """The request is not provably from the provider; the message says why."""


@dataclass(frozen=True, slots=True)
class MappedEvents:
    """What one webhook delivery holds: the events to ingest, and how many provider events were
    deliberately left out (types Sendtime does not model, anonymous checkouts)."""

    events: list[ingest_pb2.Event] = field(default_factory=list)
    ignored: int = 0
    # Provider event types this code does not know (newer than it), for the log.
    unknown_types: frozenset[str] = frozenset()


# --- signatures -------------------------------------------------------------------------------


def _header(headers: Mapping[str, str], name: str) -> str:
    """A header's value by case-insensitive name ('' when absent): plain dicts in tests, the
    case-insensitive multidict in the server."""
    value = headers.get(name)
    if value is None:
        lowered = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lowered), "")
    return value.strip()


def shopify_hmac(secret: str, body: bytes) -> str:
    """The ``X-Shopify-Hmac-Sha256`` value for ``body``: base64(HMAC-SHA256(secret, raw body))."""
    digest = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def verify_shopify_signature(secret: str, headers: Mapping[str, str], body: bytes) -> None:
    """Check the HMAC Shopify computes over the raw body with the app's client secret.

    Raises:
        WebhookSignatureError: the header is missing or does not match.
    """
    received = _header(headers, SHOPIFY_HMAC_HEADER)
    if not received:
        raise WebhookSignatureError(f"missing {SHOPIFY_HMAC_HEADER} header")
    expected = shopify_hmac(secret, body)
    # Constant time, so the response time does not reveal how much of a forgery was right.
    if not hmac.compare_digest(expected.encode("ascii"), received.encode("utf-8")):
        raise WebhookSignatureError("signature does not match the body")


def load_sendgrid_public_key(key: str) -> ec.EllipticCurvePublicKey:
    """The verification key as SendGrid shows it: base64 of the DER public key (PEM is accepted
    too). Loaded once at start-up, so a bad key fails the service, not every request.

    Raises:
        ValueError: not a base64 DER (or PEM) ECDSA P-256 public key.
    """
    text = key.strip()
    try:
        if text.startswith("-----BEGIN"):
            loaded = serialization.load_pem_public_key(text.encode("ascii"))
        else:
            loaded = serialization.load_der_public_key(base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error, UnsupportedAlgorithm) as exc:
        raise ValueError(f"the SendGrid verification key cannot be loaded: {exc}") from None
    if not isinstance(loaded, ec.EllipticCurvePublicKey) or not isinstance(loaded.curve, ec.SECP256R1):
        raise ValueError("the SendGrid verification key must be an ECDSA P-256 public key")
    return loaded


def verify_sendgrid_signature(
    public_key: ec.EllipticCurvePublicKey,
    headers: Mapping[str, str],
    body: bytes,
    now: datetime,
    max_age: timedelta,
) -> None:
    """Check SendGrid's Signed Event Webhook: an ECDSA (P-256, SHA-256) signature, base64 DER,
    over the timestamp header followed by the raw body. The timestamp must be within
    ``max_age`` of ``now`` (either way), so a captured request cannot be replayed later.

    Raises:
        WebhookSignatureError: a header is missing or malformed, the signature does not verify,
            or the timestamp is outside the tolerance.
    """
    signature_b64 = _header(headers, SENDGRID_SIGNATURE_HEADER)
    timestamp = _header(headers, SENDGRID_TIMESTAMP_HEADER)
    if not signature_b64:
        raise WebhookSignatureError(f"missing {SENDGRID_SIGNATURE_HEADER} header")
    if not timestamp:
        raise WebhookSignatureError(f"missing {SENDGRID_TIMESTAMP_HEADER} header")
    if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
        raise WebhookSignatureError(f"{SENDGRID_TIMESTAMP_HEADER} must be unix seconds")
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError):
        raise WebhookSignatureError(f"{SENDGRID_SIGNATURE_HEADER} is not base64") from None
    try:
        public_key.verify(signature, timestamp.encode("ascii") + body, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise WebhookSignatureError("signature does not match the timestamp and body") from None
    # Checked after the signature, so only an authentic request learns that it is stale.
    signed_at = int(timestamp)
    if abs(now.timestamp() - signed_at) > max_age.total_seconds():
        raise WebhookSignatureError(f"timestamp is more than {int(max_age.total_seconds())}s from now")


# --- JSON -------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def parse_json(body: bytes) -> Any:
    """The body as JSON. Non-integer numbers become ``Decimal`` (exact, as sent), never float.

    Raises:
        WebhookPayloadError: not UTF-8 JSON.
    """
    try:
        return json.loads(body.decode("utf-8"), parse_float=Decimal, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # The message of a JSON error holds a position, not the content.
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise WebhookPayloadError(f"the body is not valid JSON: {reason}") from None


def _object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WebhookPayloadError(f"{path}: must be an object")
    return value


def _optional_object(obj: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    value = obj.get(key)
    return {} if value is None else _object(value, f"{path}.{key}")


def _list(obj: dict[str, Any], key: str, path: str) -> list[Any]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise WebhookPayloadError(f"{path}.{key}: must be a list")
    return value


def _text(obj: dict[str, Any], key: str, path: str) -> str:
    """A string field; '' when absent or null (Shopify sends null for unset fields)."""
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise WebhookPayloadError(f"{path}.{key}: must be a string")
    return value.strip()


def _id(obj: dict[str, Any], key: str, path: str) -> str:
    """An id sent as a JSON integer or string; '' when absent or null."""
    value = obj.get(key)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise WebhookPayloadError(f"{path}.{key}: must be an integer or a string")
    return str(value).strip()


def _required_id(obj: dict[str, Any], key: str, path: str) -> str:
    value = _id(obj, key, path)
    if not value:
        raise WebhookPayloadError(f"{path}.{key}: required")
    if not _ID_PART.match(value):
        raise WebhookPayloadError(f"{path}.{key}: must be 1 to 100 letters, digits and . _ : -")
    return value


def _integer(obj: dict[str, Any], key: str, path: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, Decimal) and value == value.to_integral_value():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise WebhookPayloadError(f"{path}.{key}: must be an integer")
    return value


def _decimal(value: Any, path: str) -> Decimal:
    """An amount: a decimal string as Shopify sends money, or a JSON number (parsed exactly)."""
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise WebhookPayloadError(f'{path}: must be a decimal amount such as "19.99"')
    try:
        amount = Decimal(value.strip()) if isinstance(value, str) else Decimal(value)
    except InvalidOperation:
        raise WebhookPayloadError(f'{path}: must be a decimal amount such as "19.99"') from None
    if not amount.is_finite():
        raise WebhookPayloadError(f"{path}: must be a finite amount")
    return amount


def to_money(amount: Decimal, currency: str, path: str) -> money_pb2.Money:
    """``amount`` as google.type.Money, exactly: units and nanos carry the same sign.

    Raises:
        WebhookPayloadError: more than 9 decimal places, or beyond int64 units.
    """
    if amount.adjusted() > 18:  # checked first: int() of 1E+999999 would be slow
        raise WebhookPayloadError(f"{path}: too large")
    try:
        with localcontext() as ctx:
            ctx.prec = 60
            ctx.traps[Inexact] = True  # any rounding is an error, never a silent change
            units = int(amount)  # truncates toward zero, so the remainder has the amount's sign
            fraction = (amount - units) * _NANOS_PER_UNIT
    except (Inexact, InvalidOperation):
        raise WebhookPayloadError(f"{path}: too many digits") from None
    if fraction != fraction.to_integral_value():
        raise WebhookPayloadError(f"{path}: more than 9 decimal places")
    if abs(units) > _INT64_MAX:
        raise WebhookPayloadError(f"{path}: too large")
    return money_pb2.Money(currency_code=currency, units=units, nanos=int(fraction))


def _money_field(obj: dict[str, Any], key: str, currency: str, path: str) -> money_pb2.Money | None:
    value = obj.get(key)
    if value is None:
        return None
    return to_money(_decimal(value, f"{path}.{key}"), currency, f"{path}.{key}")


def _iso_time(obj: dict[str, Any], key: str, path: str) -> timestamp_pb2.Timestamp | None:
    """An ISO 8601 time with an offset, as Shopify sends them ("2026-11-24T07:15:03-05:00")."""
    text = _text(obj, key, path)
    if not text:
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise WebhookPayloadError(f"{path}.{key}: must be an ISO 8601 time") from None
    if at.tzinfo is None:
        raise WebhookPayloadError(f"{path}.{key}: must carry a UTC offset")
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(at)
    return ts


def _first_time(obj: dict[str, Any], keys: tuple[str, ...], path: str) -> timestamp_pb2.Timestamp | None:
    for key in keys:
        ts = _iso_time(obj, key, path)
        if ts is not None:
            return ts
    return None


def _event(
    event_id: str,
    customer: ingest_pb2.CustomerIdentifiers,
    occurred_at: timestamp_pb2.Timestamp | None,
    source: ingest_pb2.EventSource.ValueType,
) -> ingest_pb2.Event:
    event = ingest_pb2.Event(event_id=event_id, customer=customer, source=source)
    if occurred_at is not None:  # left unset, ingest rejects the event with a clear reason
        event.occurred_at.CopyFrom(occurred_at)
    return event


# --- Shopify ----------------------------------------------------------------------------------


def _shopify_customer(resource: dict[str, Any], path: str) -> ingest_pb2.CustomerIdentifiers:
    """Email and the Shopify customer id (the store's own account id, hence ``user_id``).

    ``user_id`` at the top of an order, checkout or refund is the staff member who made it,
    never the customer, so it is not read.
    """
    customer = _optional_object(resource, "customer", path)
    email = (
        _text(resource, "email", path)
        or _text(resource, "contact_email", path)
        or _text(customer, "email", f"{path}.customer")
    )
    return ingest_pb2.CustomerIdentifiers(email=email, user_id=_id(customer, "id", f"{path}.customer"))


def _shopify_lines(resource: dict[str, Any], currency: str, path: str) -> list[ingest_pb2.OrderLine]:
    """Order lines by SKU. A variant without a SKU is named ``variant:<id>``; a line with
    neither (a tip, a custom item) is left out: it names no product."""
    lines = []
    for i, raw in enumerate(_list(resource, "line_items", path)):
        item_path = f"{path}.line_items[{i}]"
        item = _object(raw, item_path)
        sku = _text(item, "sku", item_path)
        if not sku:
            variant_id = _id(item, "variant_id", item_path)
            if not variant_id:
                continue
            sku = f"variant:{variant_id}"
        line = ingest_pb2.OrderLine(
            sku=sku,
            name=_text(item, "name", item_path) or _text(item, "title", item_path),
            quantity=_integer(item, "quantity", item_path) or 0,
        )
        price = _money_field(item, "price", currency, item_path)
        if price is not None:
            line.unit_price.CopyFrom(price)
        lines.append(line)
    return lines


def _order_completed(order: dict[str, Any]) -> list[ingest_pb2.Event]:
    order_id = _required_id(order, "id", "order")
    currency = _text(order, "currency", "order")
    completed = ingest_pb2.OrderCompleted(order_id=order_id, lines=_shopify_lines(order, currency, "order"))
    total = _money_field(order, "total_price", currency, "order")
    if total is not None:
        completed.total.CopyFrom(total)
    event = _event(
        # orders/create and orders/paid report the same order: one id, so the second is a duplicate.
        f"shopify:order:{order_id}:completed",
        _shopify_customer(order, "order"),
        _first_time(order, ("processed_at", "created_at"), "order"),
        ingest_pb2.EVENT_SOURCE_SERVER,
    )
    event.order_completed.CopyFrom(completed)
    return [event]


def _order_cancelled(order: dict[str, Any]) -> list[ingest_pb2.Event]:
    order_id = _required_id(order, "id", "order")
    event = _event(
        f"shopify:order:{order_id}:cancelled",
        _shopify_customer(order, "order"),
        _first_time(order, ("cancelled_at", "updated_at"), "order"),
        ingest_pb2.EVENT_SOURCE_SERVER,
    )
    event.order_cancelled.CopyFrom(
        ingest_pb2.OrderCancelled(order_id=order_id, reason=_text(order, "cancel_reason", "order"))
    )
    return [event]


def _refund_amount(refund: dict[str, Any], path: str) -> money_pb2.Money | None:
    """Money given back: the refund's transactions of kind ``refund`` that did not fail. None
    when there is none (a restock or a note without money)."""
    total = Decimal(0)
    currencies: set[str] = set()
    for i, raw in enumerate(_list(refund, "transactions", path)):
        tx_path = f"{path}.transactions[{i}]"
        tx = _object(raw, tx_path)
        if _text(tx, "kind", tx_path) != "refund" or _text(tx, "status", tx_path) in ("failure", "error"):
            continue
        total += _decimal(tx.get("amount"), f"{tx_path}.amount")
        currencies.add(_text(tx, "currency", tx_path))
    if not currencies:
        return None
    if len(currencies) > 1:
        raise WebhookPayloadError(f"{path}.transactions: refunds in more than one currency")
    return to_money(total, currencies.pop(), f"{path}.transactions")


def _order_refunded(
    refund: dict[str, Any], customer: ingest_pb2.CustomerIdentifiers, path: str
) -> ingest_pb2.Event | None:
    refund_id = _required_id(refund, "id", path)
    amount = _refund_amount(refund, path)
    if amount is None:
        return None
    event = _event(
        # One id per refund, whichever topic reports it.
        f"shopify:refund:{refund_id}",
        customer,
        _first_time(refund, ("processed_at", "created_at"), path),
        ingest_pb2.EVENT_SOURCE_SERVER,
    )
    event.order_refunded.CopyFrom(
        ingest_pb2.OrderRefunded(order_id=_id(refund, "order_id", path), refund_id=refund_id, amount=amount)
    )
    return event


def _refund_created(refund: dict[str, Any]) -> MappedEvents:
    # A refund payload names no customer (its user_id is the staff member), so this event has no
    # identifiers and ingest rejects it into the dead-letter store; see docs/webhooks.md.
    event = _order_refunded(refund, ingest_pb2.CustomerIdentifiers(), "refund")
    return MappedEvents([event]) if event else MappedEvents(ignored=1)


def _order_updated(order: dict[str, Any]) -> MappedEvents:
    """The refunds of an updated order, with the order's customer: the way to get refunds that
    can be attributed. The update itself is not an event."""
    order_id = _required_id(order, "id", "order")
    customer = _shopify_customer(order, "order")
    events = []
    for i, raw in enumerate(_list(order, "refunds", "order")):
        event = _order_refunded(_object(raw, f"order.refunds[{i}]"), customer, f"order.refunds[{i}]")
        if event is not None:
            event.order_refunded.order_id = event.order_refunded.order_id or order_id
            events.append(event)
    return MappedEvents(events) if events else MappedEvents(ignored=1)


def _checkout_started(checkout: dict[str, Any], webhook_id: str) -> MappedEvents:
    customer = _shopify_customer(checkout, "checkout")
    if not customer.email and not customer.user_id:
        # Most checkouts start before the buyer types an email: about nobody yet, not an error.
        return MappedEvents(ignored=1)
    if not _ID_PART.match(webhook_id):
        raise WebhookPayloadError(
            f"{SHOPIFY_WEBHOOK_ID_HEADER} header: required, letters, digits and . _ : -"
        )
    checkout_id = _id(checkout, "token", "checkout") or _required_id(checkout, "id", "checkout")
    # Amounts of a checkout are in the buyer's (presentment) currency.
    currency = _text(checkout, "presentment_currency", "checkout") or _text(checkout, "currency", "checkout")
    started = ingest_pb2.CheckoutStarted(
        checkout_id=checkout_id, lines=_shopify_lines(checkout, currency, "checkout")
    )
    total = _money_field(checkout, "total_price", currency, "checkout")
    if total is not None:
        started.total.CopyFrom(total)
    event = _event(
        # Every update is a new snapshot of the checkout; a redelivery keeps its webhook id.
        f"shopify:{webhook_id}",
        customer,
        _first_time(checkout, ("updated_at", "created_at"), "checkout"),
        ingest_pb2.EVENT_SOURCE_SERVER,
    )
    event.checkout_started.CopyFrom(started)
    return MappedEvents([event])


_SHOPIFY_TOPICS: dict[str, Callable[[dict[str, Any], str], MappedEvents]] = {
    "orders/create": lambda p, _: MappedEvents(_order_completed(p)),
    "orders/paid": lambda p, _: MappedEvents(_order_completed(p)),
    "orders/cancelled": lambda p, _: MappedEvents(_order_cancelled(p)),
    "orders/updated": lambda p, _: _order_updated(p),
    "refunds/create": lambda p, _: _refund_created(p),
    "checkouts/create": _checkout_started,
    "checkouts/update": _checkout_started,
}
SHOPIFY_TOPICS = frozenset(_SHOPIFY_TOPICS)


def shopify_events(topic: str, webhook_id: str, payload: Any) -> MappedEvents:
    """The events of one Shopify webhook. A topic Sendtime does not map is ignored (answered
    200, so Shopify does not retry it or drop the subscription).

    Raises:
        WebhookPayloadError: the payload is not the topic's resource.
    """
    handler = _SHOPIFY_TOPICS.get(topic.strip())
    if handler is None:
        return MappedEvents(ignored=1)
    return handler(_object(payload, "body"), webhook_id)


# --- SendGrid ---------------------------------------------------------------------------------

_SENDGRID_EVENT_TYPES = {
    "delivered": "email_delivered",
    "open": "email_opened",
    "click": "email_clicked",
    "bounce": "email_bounced",
    "unsubscribe": "email_unsubscribed",
    "group_unsubscribe": "email_unsubscribed",
    "spamreport": "email_spam_reported",
}
# Known, deliberately not modelled: queued (processed), retried by SendGrid (deferred), never sent
# (dropped: suppressed, invalid), and re-subscribing to a group.
SENDGRID_IGNORED_TYPES = frozenset({"processed", "deferred", "dropped", "group_resubscribe"})

# SendGrid's ``type`` of a bounce event: "bounce" is a permanent rejection (SendGrid suppresses
# the address), "blocked" a temporary one. A bounce event without a type is from before SendGrid
# added the field, when only permanent bounces were reported as bounces. Any other type is left
# unspecified, so ingest rejects that one event (dead letter) instead of the whole batch failing.
_BOUNCE_TYPES = {
    "bounce": ingest_pb2.BOUNCE_TYPE_HARD,
    "": ingest_pb2.BOUNCE_TYPE_HARD,
    "blocked": ingest_pb2.BOUNCE_TYPE_SOFT,
}


def _sendgrid_event_id(raw: dict[str, Any], path: str) -> str:
    """``sendgrid:<sg_event_id>``. An sg_event_id with characters an event id cannot hold (old
    ones are base64 with + / =) is hashed instead; without one, ingest derives an id."""
    sg_event_id = _id(raw, "sg_event_id", path)
    if not sg_event_id:
        return ""
    if _ID_PART.match(sg_event_id):
        return f"sendgrid:{sg_event_id}"
    return f"sendgrid:h:{hashlib.sha256(sg_event_id.encode('utf-8')).hexdigest()[:40]}"


def _custom_arg(raw: dict[str, Any], key: str) -> str:
    """A custom argument set on the send (SendGrid posts them as top-level keys of each event).
    They are the sender's own values, so one of an unexpected type is dropped, not an error."""
    value = raw.get(key)
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return ""


def _sendgrid_event(raw: dict[str, Any], payload_field: str, path: str) -> ingest_pb2.Event:
    timestamp = _integer(raw, "timestamp", path)
    occurred_at = None
    if timestamp is not None:
        occurred_at = timestamp_pb2.Timestamp(seconds=timestamp)
    event = _event(
        _sendgrid_event_id(raw, path),
        ingest_pb2.CustomerIdentifiers(email=_text(raw, "email", path)),
        occurred_at,
        ingest_pb2.EVENT_SOURCE_EMAIL,
    )
    message = ingest_pb2.EmailMessage(
        message_id=_text(raw, "sg_message_id", path), campaign_id=_custom_arg(raw, "campaign_id")
    )
    payload = getattr(event, payload_field)
    payload.message.CopyFrom(message)
    if payload_field == "email_clicked":
        payload.url = _text(raw, "url", path)
    elif payload_field == "email_bounced":
        bounce_type = _text(raw, "type", path)
        payload.bounce_type = _BOUNCE_TYPES.get(bounce_type, ingest_pb2.BOUNCE_TYPE_UNSPECIFIED)
        payload.reason = _text(raw, "reason", path)
    if payload_field in ("email_opened", "email_clicked"):
        # Only for opens and clicks are ip and useragent the recipient's (for deliveries, the ip
        # is SendGrid's sending server).
        event.context.ip = _text(raw, "ip", path)
        event.context.user_agent = _text(raw, "useragent", path)
    return event


def sendgrid_events(payload: Any) -> MappedEvents:
    """The events of one SendGrid Event Webhook batch (a JSON array of events), in order.

    Raises:
        WebhookPayloadError: not an array of event objects, or a field has the wrong type.
    """
    if not isinstance(payload, list):
        raise WebhookPayloadError("body: must be a JSON array of events")
    events = []
    ignored = 0
    unknown: set[str] = set()
    for i, raw in enumerate(payload):
        path = f"body[{i}]"
        item = _object(raw, path)
        sendgrid_type = _text(item, "event", path)
        if not sendgrid_type:
            raise WebhookPayloadError(f"{path}.event: required")
        payload_field = _SENDGRID_EVENT_TYPES.get(sendgrid_type)
        if payload_field is None:
            ignored += 1
            if sendgrid_type not in SENDGRID_IGNORED_TYPES:
                unknown.add(sendgrid_type[:64])
            continue
        events.append(_sendgrid_event(item, payload_field, path))
    return MappedEvents(events, ignored, frozenset(unknown))
