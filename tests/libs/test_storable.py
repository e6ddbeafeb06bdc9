"""What the stores after ingest cannot keep, found anywhere in a message and named by its path;
the shortcut through the wire form finds the same as the whole walk."""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.storable import (
    NOT_FINITE_DESCRIPTION,
    NUL_DESCRIPTION,
    TIMESTAMP_DESCRIPTION,
    json_carriable,
    unstorable_values,
    valid_timestamp,
)
from tests.factories import NOW, event, identify, money, order_completed


def found(message: ingest_pb2.Event) -> dict[str, str]:
    whole = {v.field: v.description for v in unstorable_values(message)}
    shortcut = {
        v.field: v.description for v in unstorable_values(message, serialized=message.SerializeToString())
    }
    assert shortcut == whole
    return whole


def properties(**values: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def test_a_valid_event_holds_nothing_unstorable() -> None:
    e = event(user_id="u-1", email="ada@example.com", identify=identify(first_name="Ada", age=36, tags=["a"]))
    e.context.user_agent = "Mozilla/5.0"
    assert found(e) == {}


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: event(user_id="u-\x001", identify=identify(a=1)), "customer.user_id"),
        (lambda: event(event_id="e\x00", user_id="u", identify=identify(a=1)), "event_id"),
        (
            lambda: event(user_id="u", order_completed=order_completed("o-1", "5", "ok", "s\x00ku")),
            "order_completed.lines[1].sku",
        ),
        (lambda: event(user_id="u", identify=identify(city="Wien\x00")), "identify.traits.city"),
        (
            lambda: event(user_id="u", identify=identify(address={"lines": ["ok", "bad\x00"]})),
            "identify.traits.address.lines[1]",
        ),
        (
            lambda: event(
                user_id="u",
                alias=ingest_pb2.Alias(other=ingest_pb2.CustomerIdentifiers(anonymous_id="a\x00")),
            ),
            "alias.other.anonymous_id",
        ),
    ],
)
def test_a_nul_in_any_string_is_named(build: object, field: str) -> None:
    assert found(build()) == {field: NUL_DESCRIPTION}  # type: ignore[operator]


def test_a_nul_in_a_property_name_is_named() -> None:
    e = event(user_id="u", custom=ingest_pb2.CustomEvent(name="x", properties=properties(**{"a\x00b": 1})))
    assert found(e) == {"custom.properties": f"names {NUL_DESCRIPTION}"}


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_infinity_are_named_however_deep(number: float) -> None:
    e = event(user_id="u", identify=identify(score=number))
    assert found(e) == {"identify.traits.score": NOT_FINITE_DESCRIPTION}
    deep = event(
        user_id="u", custom=ingest_pb2.CustomEvent(name="x", properties=properties(a={"b": [1.5, number]}))
    )
    assert found(deep) == {"custom.properties.a.b[1]": NOT_FINITE_DESCRIPTION}


def test_a_nan_whose_wire_form_holds_no_zero_byte_is_found_too() -> None:
    # A NaN from another runtime may carry a payload: no zero byte, but still [F0-FF][7F|FF] last.
    bits = struct.pack("<Q", 0x7FF8_1234_5678_9ABC)
    e = event(event_id="e-1", user_id="u", occurred_at=NOW, identify=identify(a=struct.unpack("<d", bits)[0]))
    wire = e.SerializeToString()
    assert bits in wire and b"\x00" not in wire
    assert found(e) == {"identify.traits.a": NOT_FINITE_DESCRIPTION}


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(10**15, 0), (-(10**15), 0), (253_402_300_800, 0), (0, -5), (0, 1_000_000_000)],
)
def test_timestamps_outside_the_range_are_named(seconds: int, nanos: int) -> None:
    ts = timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
    assert not valid_timestamp(ts)
    e = event(user_id="u", occurred_at=NOW, identify=identify(a=1))
    e.sent_at.CopyFrom(ts)
    assert found(e) == {"sent_at": TIMESTAMP_DESCRIPTION}


def test_every_value_is_named_not_just_the_first() -> None:
    e = event(user_id="u\x00", identify=identify(a=float("nan"), b="\x00"))
    e.occurred_at.nanos = -1
    e.context.user_agent = "\x00"
    assert set(found(e)) == {
        "customer.user_id",
        "occurred_at",
        "context.user_agent",
        "identify.traits.a",
        "identify.traits.b",
    }


def test_money_and_other_numbers_are_not_its_business() -> None:
    # Ranges are validation's rules (ingest.validation); only what no store can hold is named here.
    e = event(
        user_id="u", product_viewed=ingest_pb2.ProductViewed(sku="s", price=money("9000000000000000000"))
    )
    assert found(e) == {}


def test_a_copy_json_can_carry_leaves_out_bad_timestamps_and_nulls_non_finite_values() -> None:
    e = event(user_id="u-1", occurred_at=NOW, identify=identify(plan="pro"))
    e.identify.traits.update(
        {"score": math.nan, "nested": {"limit": math.inf, "ok": 1.5}, "list": [-math.inf]}
    )
    e.sent_at.seconds = -(10**15)
    assert "sent_at" in found(e)

    carriable = json_carriable(e)

    as_json = json_format.MessageToDict(carriable)  # the original raises SerializeToJsonError
    assert "sentAt" not in as_json and as_json["occurredAt"] == json_format.MessageToDict(e.occurred_at)
    traits = as_json["identify"]["traits"]
    assert traits == {"plan": "pro", "score": None, "nested": {"limit": None, "ok": 1.5}, "list": [None]}
    # A copy: the event keeps its values.
    assert math.isnan(e.identify.traits.fields["score"].number_value) and e.sent_at.seconds == -(10**15)
    with pytest.raises(json_format.SerializeToJsonError):
        json_format.MessageToDict(e)
    valid = event(user_id="u-1", occurred_at=NOW, identify=identify(plan="pro"))
    assert json_carriable(valid) == valid
