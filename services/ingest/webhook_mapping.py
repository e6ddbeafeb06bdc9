"""Provider webhooks as ingest events: signature checks and payload mapping.

Pure functions: no I/O, no clock reads (the caller passes ``now``), so every rule can be tested
with literal payloads. docs/webhooks.md has the mapping tables.

Every item of a delivery (the one resource of a Shopify webhook, each element of a SendGrid
batch) is mapped on its own, so one bad item never fails the others. Only a body that is not
the provider's envelope (a Shopify body that is not an object, a SendGrid body that is not an
array) raises ``WebhookPayloadError`` and refuses the whole delivery. An item becomes:

- ``MAPPED``: events for ingest. A well-formed item that lacks something Sendtime needs (an order
  without an email) still becomes an event: ingest rejects it with field violations into its
  dead-letter store, where it can be replayed once fixed.
- ``IGNORED``: deliberately not modelled (SendGrid's ``processed``, an anonymous checkout).
- ``UNKNOWN_TYPE``: a Shopify topic or SendGrid event type this code does not map; quarantined
  in the dead-letter store as received, and mapped again when replayed (after an upgrade).
- ``MALFORMED``: not the provider's format (a field of the wrong type, an amount that is not an
  exact decimal, a URL that is not http(s), a currency that is not ISO 4217); the message names
  the field, never its value. Dead-lettered as received.
- ``FAILED``: mapping raised something unexpected (a bug); dead-lettered as received, with the
  exception for the caller to log.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import timestamp_pb2
from google.type import money_pb2

from ingest import payload_fields as fields
from ingest.payload_fields import PayloadError
from ingest.payload_fields import to_money as to_money  # re-exported: callers import it from here
from sendtime.ingest.v1 import ingest_pb2
from sendtime_common import json_input

SHOPIFY_HMAC_HEADER = "X-Shopify-Hmac-Sha256"
SHOPIFY_TOPIC_HEADER = "X-Shopify-Topic"
SHOPIFY_WEBHOOK_ID_HEADER = "X-Shopify-Webhook-Id"
SENDGRID_SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
SENDGRID_TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"

# What google.protobuf.Timestamp can hold: 0001-01-01 to 9999-12-31 (UTC).
_TIMESTAMP_MIN_S = -62_135_596_800
_TIMESTAMP_MAX_S = 253_402_300_799


# The body is not in the provider's format; the message names the offending field (never its
# value, which may be personal data). The field readers of ingest.payload_fields raise it.
WebhookPayloadError = PayloadError


class WebhookSignatureError(ValueError):
    """The request is not provably from the provider; the message says why."""


class Provider(enum.StrEnum):
    SHOPIFY = "shopify"
    SENDGRID = "sendgrid"


class ItemOutcome(enum.StrEnum):
    """What became of one item of a delivery (the module docstring says what each means)."""

    MAPPED = "mapped"
    IGNORED = "ignored"
    UNKNOWN_TYPE = "unknown_type"
    MALFORMED = "malformed"
    FAILED = "failed"


# The ErrorInfo reason of an item that was not mapped, in the HTTP answer and the dead letter.
ITEM_REASONS = {
    ItemOutcome.UNKNOWN_TYPE: "WEBHOOK_UNKNOWN_TYPE",
    ItemOutcome.MALFORMED: "WEBHOOK_ITEM_MALFORMED",
    ItemOutcome.FAILED: "WEBHOOK_ITEM_MAPPING_FAILED",
}


@dataclass(frozen=True, slots=True)
class MappedItem:
    """One item of a delivery and what it became."""

    index: int
    outcome: ItemOutcome
    # The Shopify topic or SendGrid event type ('' when the item has none), at most 64 characters.
    type: str
    # The item as parsed: what the dead-letter store keeps of an item that was not mapped.
    raw: Any
    events: list[ingest_pb2.Event] = field(default_factory=list)
    # UNKNOWN_TYPE and MALFORMED: what is wrong, naming fields, never their values.
    problem: str = ""
    # FAILED: what mapping raised.
    error: Exception | None = None


@dataclass(frozen=True, slots=True)
class MappedDelivery:
    """The items of one webhook delivery, in order."""

    provider: Provider
    items: list[MappedItem]
    # X-Shopify-Webhook-Id ('' for SendGrid): kept with a dead-lettered item.
    webhook_id: str = ""

    @property
    def events(self) -> list[ingest_pb2.Event]:
        """The events of the mapped items, in order."""
        return [e for item in self.items for e in item.events]


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
    # Constant time, so the response time does not reveal how much of a forgery was right. A
    # base64 value is ASCII; a header byte that is not UTF-8 reaches here as a lone surrogate
    # (aiohttp decodes with surrogateescape), which encoding would raise on: a 500, not a 401.
    if not received.isascii() or not hmac.compare_digest(expected.encode("ascii"), received.encode("ascii")):
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
    customer = fields.optional_object(resource, "customer", path)
    email = (
        fields.text(resource, "email", path)
        or fields.text(resource, "contact_email", path)
        or fields.text(customer, "email", f"{path}.customer")
    )
    return ingest_pb2.CustomerIdentifiers(
        email=email, user_id=fields.id_text(customer, "id", f"{path}.customer")
    )


def _shopify_lines(resource: dict[str, Any], currency: str, path: str) -> list[ingest_pb2.OrderLine]:
    """Order lines by SKU. A variant without a SKU is named ``variant:<id>``; a line with
    neither (a tip, a custom item) is left out: it names no product."""
    lines = []
    for i, raw in enumerate(fields.list_field(resource, "line_items", path)):
        item_path = f"{path}.line_items[{i}]"
        item = fields.as_object(raw, item_path)
        sku = fields.text(item, "sku", item_path)
        if not sku:
            variant_id = fields.id_text(item, "variant_id", item_path)
            if not variant_id:
                continue
            sku = f"variant:{variant_id}"
        line = ingest_pb2.OrderLine(
            sku=sku,
            name=fields.text(item, "name", item_path) or fields.text(item, "title", item_path),
            quantity=fields.integer(item, "quantity", item_path) or 0,
        )
        price = fields.money_field(item, "price", currency, item_path)
        if price is not None:
            line.unit_price.CopyFrom(price)
        lines.append(line)
    return lines


def _order_completed(order: dict[str, Any]) -> list[ingest_pb2.Event]:
    order_id = fields.required_id(order, "id", "order")
    currency = fields.currency(order, "currency", "order")
    completed = ingest_pb2.OrderCompleted(order_id=order_id, lines=_shopify_lines(order, currency, "order"))
    total = fields.money_field(order, "total_price", currency, "order")
    if total is not None:
        completed.total.CopyFrom(total)
    event = _event(
        # orders/create and orders/paid report the same order: one id, so the second is a duplicate.
        f"shopify:order:{order_id}:completed",
        _shopify_customer(order, "order"),
        fields.first_time(order, ("processed_at", "created_at"), "order"),
        ingest_pb2.EVENT_SOURCE_SERVER,
    )
    event.order_completed.CopyFrom(completed)
    return [event]


def _order_cancelled(order: dict[str, Any]) -> list[ingest_pb2.Event]:
    order_id = fields.required_id(order, "id", "order")
    event = _event(
        f"shopify:order:{order_id}:cancelled",
        _shopify_customer(order, "order"),
        fields.first_time(order, ("cancelled_at", "updated_at"), "order"),
        ingest_pb2.EVENT_SOURCE_SERVER,
    )
    event.order_cancelled.CopyFrom(
        ingest_pb2.OrderCancelled(order_id=order_id, reason=fields.text(order, "cancel_reason", "order"))
    )
    return [event]


def _refund_amount(refund: dict[str, Any], path: str) -> money_pb2.Money | None:
    """Money given back: the refund's transactions of kind ``refund`` that did not fail. None
    when there is none (a restock or a note without money)."""
    total = Decimal(0)
    currencies: set[str] = set()
    for i, raw in enumerate(fields.list_field(refund, "transactions", path)):
        tx_path = f"{path}.transactions[{i}]"
        tx = fields.as_object(raw, tx_path)
        if fields.text(tx, "kind", tx_path) != "refund" or fields.text(tx, "status", tx_path) in (
            "failure",
            "error",
        ):
            continue
        total = fields.EXACT.add(total, fields.decimal(tx.get("amount"), f"{tx_path}.amount"))
        currencies.add(fields.currency(tx, "currency", tx_path))
    if not currencies:
        return None
    if len(currencies) > 1:
        raise WebhookPayloadError(f"{path}.transactions: refunds in more than one currency")
    return to_money(total, currencies.pop(), f"{path}.transactions")


def _order_refunded(
    refund: dict[str, Any], customer: ingest_pb2.CustomerIdentifiers, path: str
) -> ingest_pb2.Event | None:
    refund_id = fields.required_id(refund, "id", path)
    amount = _refund_amount(refund, path)
    if amount is None:
        return None
    event = _event(
        # One id per refund, whichever topic reports it.
        f"shopify:refund:{refund_id}",
        customer,
        fields.first_time(refund, ("processed_at", "created_at"), path),
        ingest_pb2.EVENT_SOURCE_SERVER,
    )
    event.order_refunded.CopyFrom(
        ingest_pb2.OrderRefunded(
            order_id=fields.id_text(refund, "order_id", path), refund_id=refund_id, amount=amount
        )
    )
    return event


def _refund_created(refund: dict[str, Any]) -> list[ingest_pb2.Event]:
    # A refund payload names no customer (its user_id is the staff member), so this event has no
    # identifiers and ingest rejects it into the dead-letter store; see docs/webhooks.md.
    event = _order_refunded(refund, ingest_pb2.CustomerIdentifiers(), "refund")
    return [event] if event else []


def _order_updated(order: dict[str, Any]) -> list[ingest_pb2.Event]:
    """The refunds of an updated order, with the order's customer: the way to get refunds that
    can be attributed. The update itself is not an event."""
    order_id = fields.required_id(order, "id", "order")
    customer = _shopify_customer(order, "order")
    events = []
    for i, raw in enumerate(fields.list_field(order, "refunds", "order")):
        event = _order_refunded(fields.as_object(raw, f"order.refunds[{i}]"), customer, f"order.refunds[{i}]")
        if event is not None:
            event.order_refunded.order_id = event.order_refunded.order_id or order_id
            events.append(event)
    return events


def _checkout_started(checkout: dict[str, Any], webhook_id: str) -> list[ingest_pb2.Event]:
    customer = _shopify_customer(checkout, "checkout")
    if not customer.email and not customer.user_id:
        # Most checkouts start before the buyer types an email: about nobody yet, not an error.
        return []
    if not fields.ID_PART.match(webhook_id):
        raise WebhookPayloadError(
            f"{SHOPIFY_WEBHOOK_ID_HEADER} header: required, letters, digits and . _ : -"
        )
    checkout_id = fields.id_text(checkout, "token", "checkout") or fields.required_id(
        checkout, "id", "checkout"
    )
    # Amounts of a checkout are in the buyer's (presentment) currency.
    currency = fields.currency(checkout, "presentment_currency", "checkout") or fields.currency(
        checkout, "currency", "checkout"
    )
    started = ingest_pb2.CheckoutStarted(
        checkout_id=checkout_id, lines=_shopify_lines(checkout, currency, "checkout")
    )
    total = fields.money_field(checkout, "total_price", currency, "checkout")
    if total is not None:
        started.total.CopyFrom(total)
    event = _event(
        # Every update is a new snapshot of the checkout; a redelivery keeps its webhook id.
        f"shopify:{webhook_id}",
        customer,
        fields.first_time(checkout, ("updated_at", "created_at"), "checkout"),
        ingest_pb2.EVENT_SOURCE_SERVER,
    )
    event.checkout_started.CopyFrom(started)
    return [event]


# A customer's profile fields as traits: (the customer field, or the default address's) -> trait.
_SHOPIFY_CUSTOMER_TRAITS = (("first_name", "first_name"), ("last_name", "last_name"), ("phone", "phone"))
_SHOPIFY_ADDRESS_TRAITS = (
    ("city", "city"),
    ("province_code", "state"),
    ("country_code", "country"),
    ("zip", "postal_code"),
)
# Shopify's marketing consent states: what each says about contacting the customer now; a state
# not listed (pending double opt-in, redacted, invalid) says nothing yet.
_SHOPIFY_CONSENT = {"subscribed": True, "not_subscribed": False, "unsubscribed": False}
_SHOPIFY_CONSENT_CHANNELS = (
    ("email_marketing_consent", ingest_pb2.CHANNEL_EMAIL, "email"),
    ("sms_marketing_consent", ingest_pb2.CHANNEL_SMS, "sms"),
)


def _customer_updated(customer: dict[str, Any]) -> list[ingest_pb2.Event]:
    """customers/create and customers/update: the customer's fields as an identify event (one
    per version: its id carries ``updated_at``), and each marketing consent as a consent event
    (one per consent change: its id and time are the consent's ``consent_updated_at``, so an
    update that did not touch the consent repeats the same event, a duplicate)."""
    customer_id = fields.required_id(customer, "id", "customer")
    who = ingest_pb2.CustomerIdentifiers(
        email=fields.text(customer, "email", "customer"), user_id=customer_id
    )
    updated = fields.first_time(customer, ("updated_at", "created_at"), "customer")
    events = []
    traits = {trait: fields.text(customer, key, "customer") for key, trait in _SHOPIFY_CUSTOMER_TRAITS}
    address = fields.optional_object(customer, "default_address", "customer")
    for key, trait in _SHOPIFY_ADDRESS_TRAITS:
        traits[trait] = fields.text(address, key, "customer.default_address")
    present = {trait: value for trait, value in traits.items() if value}  # empty: nothing said
    if present:
        event = _event(
            f"shopify:customer:{customer_id}:{_ms(updated)}", who, updated, ingest_pb2.EVENT_SOURCE_SERVER
        )
        event.identify.traits.update(present)
        events.append(event)
    for key, channel, name in _SHOPIFY_CONSENT_CHANNELS:
        consent = fields.optional_object(customer, key, "customer")
        subscribed = _SHOPIFY_CONSENT.get(fields.text(consent, "state", f"customer.{key}"))
        if subscribed is None:
            continue
        at = fields.iso_time(consent, "consent_updated_at", f"customer.{key}") or updated
        event = _event(
            f"shopify:customer:{customer_id}:{name}-consent:{_ms(at)}",
            who,
            at,
            ingest_pb2.EVENT_SOURCE_SERVER,
        )
        event.consent_changed.CopyFrom(ingest_pb2.ConsentChanged(channel=channel, subscribed=subscribed))
        events.append(event)
    return events


def _ms(at: timestamp_pb2.Timestamp | None) -> str:
    """A time in an event id: epoch milliseconds ('unknown' when missing: ingest then rejects the
    event for its missing ``occurred_at``)."""
    return "unknown" if at is None else str(at.ToMilliseconds())


# Each maps the topic's resource and webhook id to its events; none: deliberately ignored.
_SHOPIFY_TOPICS: dict[str, Callable[[dict[str, Any], str], list[ingest_pb2.Event]]] = {
    "orders/create": lambda p, _: _order_completed(p),
    "orders/paid": lambda p, _: _order_completed(p),
    "orders/cancelled": lambda p, _: _order_cancelled(p),
    "orders/updated": lambda p, _: _order_updated(p),
    "refunds/create": lambda p, _: _refund_created(p),
    "checkouts/create": _checkout_started,
    "checkouts/update": _checkout_started,
    "customers/create": lambda p, _: _customer_updated(p),
    "customers/update": lambda p, _: _customer_updated(p),
}
SHOPIFY_TOPICS = frozenset(_SHOPIFY_TOPICS)


def _item(
    index: int, item_type: str, raw: Any, unknown: bool, mapping: Callable[[], list[ingest_pb2.Event]]
) -> MappedItem:
    """One item through ``mapping``, whatever it raises: the other items of the delivery go on."""
    if unknown:
        return MappedItem(
            index,
            ItemOutcome.UNKNOWN_TYPE,
            item_type,
            raw,
            problem=f"type {item_type!r} is not one Sendtime maps",
        )
    try:
        events = mapping()
    except WebhookPayloadError as exc:
        return MappedItem(index, ItemOutcome.MALFORMED, item_type, raw, problem=str(exc))
    except Exception as exc:  # a bug: the caller logs it; the item is dead-lettered, not lost
        return MappedItem(index, ItemOutcome.FAILED, item_type, raw, problem="mapping failed", error=exc)
    if not events:
        return MappedItem(index, ItemOutcome.IGNORED, item_type, raw)
    return MappedItem(index, ItemOutcome.MAPPED, item_type, raw, events)


def shopify_events(topic: str, webhook_id: str, payload: Any) -> MappedDelivery:
    """The one item of a Shopify webhook: its topic's resource. A topic Sendtime does not map
    is UNKNOWN_TYPE (quarantined, answered 200, so Shopify neither retries it nor drops the
    subscription).

    Raises:
        WebhookPayloadError: the payload is not a JSON object.
    """
    resource = fields.as_object(payload, "body")
    topic = topic.strip()
    handler = _SHOPIFY_TOPICS.get(topic)
    item = _item(
        0, topic[:64], resource, handler is None, lambda: handler(resource, webhook_id) if handler else []
    )
    return MappedDelivery(Provider.SHOPIFY, [item], webhook_id)


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
    sg_event_id = fields.id_text(raw, "sg_event_id", path)
    if not sg_event_id:
        return ""
    if fields.ID_PART.match(sg_event_id):
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
    timestamp = fields.integer(raw, "timestamp", path, low=_TIMESTAMP_MIN_S, high=_TIMESTAMP_MAX_S)
    occurred_at = None
    if timestamp is not None:
        occurred_at = timestamp_pb2.Timestamp(seconds=timestamp)
    event = _event(
        _sendgrid_event_id(raw, path),
        ingest_pb2.CustomerIdentifiers(email=fields.text(raw, "email", path)),
        occurred_at,
        ingest_pb2.EVENT_SOURCE_EMAIL,
    )
    message = ingest_pb2.EmailMessage(
        message_id=fields.text(raw, "sg_message_id", path), campaign_id=_custom_arg(raw, "campaign_id")
    )
    payload = getattr(event, payload_field)
    payload.message.CopyFrom(message)
    if payload_field == "email_clicked":
        payload.url = fields.url(raw, "url", path)
    elif payload_field == "email_bounced":
        bounce_type = fields.text(raw, "type", path)
        payload.bounce_type = _BOUNCE_TYPES.get(bounce_type, ingest_pb2.BOUNCE_TYPE_UNSPECIFIED)
        payload.reason = fields.text(raw, "reason", path)
    if payload_field in ("email_opened", "email_clicked"):
        # Only for opens and clicks are ip and useragent the recipient's (for deliveries, the ip
        # is SendGrid's sending server).
        event.context.ip = fields.text(raw, "ip", path)
        event.context.user_agent = fields.text(raw, "useragent", path)
    return event


def _sendgrid_item(index: int, raw: Any) -> MappedItem:
    path = f"body[{index}]"
    if not isinstance(raw, dict):
        return MappedItem(index, ItemOutcome.MALFORMED, "", raw, problem=f"{path}: must be an object")
    sendgrid_type = raw.get("event")
    if not isinstance(sendgrid_type, str) or not sendgrid_type.strip():
        return MappedItem(index, ItemOutcome.MALFORMED, "", raw, problem=f"{path}.event: required, a string")
    sendgrid_type = sendgrid_type.strip()
    payload_field = _SENDGRID_EVENT_TYPES.get(sendgrid_type)
    if payload_field is None and sendgrid_type in SENDGRID_IGNORED_TYPES:
        return MappedItem(index, ItemOutcome.IGNORED, sendgrid_type, raw)
    return _item(
        index,
        sendgrid_type[:64],
        raw,
        payload_field is None,
        lambda: [_sendgrid_event(raw, payload_field, path)] if payload_field else [],
    )


def sendgrid_events(payload: Any) -> MappedDelivery:
    """The items of one SendGrid Event Webhook batch (a JSON array of events), in order.

    Raises:
        WebhookPayloadError: the payload is not a JSON array.
    """
    if not isinstance(payload, list):
        raise WebhookPayloadError("body: must be a JSON array of events")
    return MappedDelivery(Provider.SENDGRID, [_sendgrid_item(i, raw) for i, raw in enumerate(payload)])


def map_item(provider: Provider, item_type: str, webhook_id: str, raw: Any) -> MappedItem:
    """One item mapped again, as a delivery would map it now: a dead letter's replay.

    Raises:
        WebhookPayloadError: a Shopify item that is not an object.
    """
    if provider == Provider.SHOPIFY:
        return shopify_events(item_type, webhook_id, raw).items[0]
    return _sendgrid_item(0, raw)


def quarantine_id(provider: Provider, item_type: str, raw: Any) -> str:
    """The dead letter's event id for an item that was not mapped: a digest of what was
    received, so a redelivery of the same item finds the dead letter it already has."""
    digest = hashlib.sha256(f"{provider}\0{item_type}\0".encode() + json_input.dumps(raw)).hexdigest()
    return f"{provider}:q:{digest[:40]}"


def item_identifiers(provider: Provider, raw: Any) -> ingest_pb2.CustomerIdentifiers:
    """The identifiers an item names, as far as they can be read whatever its shape (never
    raises): a dead-lettered item is found by them when its person is erased."""

    def text(obj: Any, key: str) -> str:
        value = obj.get(key) if isinstance(obj, dict) else None
        return value.strip() if isinstance(value, str) else ""

    if provider == Provider.SENDGRID:
        return ingest_pb2.CustomerIdentifiers(email=text(raw, "email"))
    customer = raw.get("customer") if isinstance(raw, dict) else None
    customer_id = customer.get("id") if isinstance(customer, dict) else None
    return ingest_pb2.CustomerIdentifiers(
        email=text(raw, "email") or text(raw, "contact_email") or text(customer, "email"),
        user_id=str(customer_id)
        if isinstance(customer_id, int | str) and not isinstance(customer_id, bool)
        else "",
    )
