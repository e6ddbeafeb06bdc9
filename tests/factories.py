"""Builders for test events: valid by default, each field overridable."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2
from google.type import money_pb2

from sendtime.ingest.v1 import ingest_pb2

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def money(amount: str, currency: str = "EUR") -> money_pb2.Money:
    value = Decimal(amount)
    units = int(value)
    return money_pb2.Money(currency_code=currency, units=units, nanos=int((value - units) * 1_000_000_000))


def timestamp(at: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(at)
    return ts


def event(
    *,
    event_id: str | None = None,
    user_id: str = "",
    email: str = "",
    anonymous_id: str = "",
    occurred_at: datetime | None = None,
    source: int = ingest_pb2.EVENT_SOURCE_WEB,
    **payload: object,
) -> ingest_pb2.Event:
    """An event; pass exactly one payload as keyword, e.g. ``identify=identify(first_name="Ada")``."""
    built = ingest_pb2.Event(
        event_id=event_id if event_id is not None else f"evt-{uuid.uuid4().hex}",
        customer=ingest_pb2.CustomerIdentifiers(user_id=user_id, email=email, anonymous_id=anonymous_id),
        occurred_at=timestamp(occurred_at or datetime.now(UTC) - timedelta(seconds=1)),
        source=source,  # type: ignore[arg-type]
    )
    for name, value in payload.items():
        getattr(built, name).CopyFrom(value)
    return built


def identify(**traits: Any) -> ingest_pb2.Identify:
    struct = struct_pb2.Struct()
    struct.update(traits)
    return ingest_pb2.Identify(traits=struct)


def product_viewed(sku: str, name: str = "", price: str = "10.00") -> ingest_pb2.ProductViewed:
    return ingest_pb2.ProductViewed(sku=sku, name=name or sku, price=money(price), category="shoes")


def cart_item_added(
    sku: str, quantity: int = 1, price: str = "10.00", name: str = ""
) -> ingest_pb2.CartItemAdded:
    return ingest_pb2.CartItemAdded(sku=sku, name=name or sku, quantity=quantity, unit_price=money(price))


def cart_item_removed(sku: str, quantity: int = 1) -> ingest_pb2.CartItemRemoved:
    return ingest_pb2.CartItemRemoved(sku=sku, quantity=quantity)


def order_completed(order_id: str, total: str, *skus: str) -> ingest_pb2.OrderCompleted:
    return ingest_pb2.OrderCompleted(
        order_id=order_id,
        total=money(total),
        lines=[ingest_pb2.OrderLine(sku=s, quantity=1) for s in skus],
    )
