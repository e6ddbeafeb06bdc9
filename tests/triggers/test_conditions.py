"""Conditions: paths checked against the descriptors, and how each kind of value compares."""

from __future__ import annotations

import math
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction
from operator import eq, gt, le
from typing import Any, TypeAlias

import pytest
from google.protobuf import json_format, struct_pb2
from google.type import money_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from sendtime.ingest.v1 import ingest_pb2
from sendtime.profile.v1 import profile_pb2
from sendtime.triggers.v1 import triggers_pb2
from triggers.conditions import (
    EACH,
    MAX_CONDITIONS,
    Condition,
    ConditionError,
    FieldKind,
    InvalidEventType,
    PathError,
    Schema,
    compile_condition,
    compile_conditions,
    compile_path,
    event_document,
    event_type_of,
    first_failing,
    key_string,
    parse_steps,
    payload_of,
    profile_document,
    timestamp_of,
)

OP = triggers_pb2.Operator
Op: TypeAlias = triggers_pb2.Operator.ValueType
NO_VALUE = object()


def condition(path: str, operator: Op, value: Any = NO_VALUE) -> triggers_pb2.Condition:
    message = triggers_pb2.Condition(path=path, operator=operator)
    if value is not NO_VALUE:
        json_format.ParseDict(value, message.value)
    return message


def compiled(path: str, operator: Op, value: Any = NO_VALUE, schema: Schema | None = None) -> Condition:
    return compile_condition(condition(path, operator, value), schema or Schema.profile())


def cart_event(**fields: Any) -> dict[str, Any]:
    event = ingest_pb2.Event(
        event_id="e1",
        source=ingest_pb2.EVENT_SOURCE_WEB,
        context=ingest_pb2.EventContext(locale="de-AT"),
        cart_item_added=ingest_pb2.CartItemAdded(
            sku="sku-1",
            quantity=3,
            unit_price=money_pb2.Money(currency_code="EUR", units=12, nanos=500_000_000),
        ),
    )
    event.occurred_at.FromJsonString("2024-05-01T10:00:00Z")
    for name, value in fields.items():
        if isinstance(value, dict):
            event.cart_item_added.ClearField(name)  # type: ignore[arg-type]
            json_format.ParseDict(value, getattr(event.cart_item_added, name))
        else:
            setattr(event.cart_item_added, name, value)
    return event_document(event)


def profile(**fields: Any) -> dict[str, Any]:
    return profile_document(json_format.ParseDict(fields, profile_pb2.Profile()))


CART_PROFILE = profile(
    cart={"items": [{"sku": "a", "quantity": "1"}, {"sku": "b", "quantity": "4"}]},
    purchased_skus=["x", "y"],
    traits={
        "age": 42,
        "age_text": "42",
        "vip": True,
        "tags": ["vip", "eu"],
        "signup": "2024-02-01T00:00:00Z",
    },
    email={"bounce_state": "BOUNCE_STATE_SOFT"},
    consents=[{"channel": "CHANNEL_EMAIL", "subscribed": True}],
    last_seen={"timezone": "Europe/Vienna"},
)
EMPTY_PROFILE = profile()


# ---- event types ------------------------------------------------------------------------------


def test_event_type_of_names_the_payload_or_the_custom_name() -> None:
    assert event_type_of(cart_event()) == "cart_item_added"
    custom = ingest_pb2.Event(custom=ingest_pb2.CustomEvent(name="wishlist_item_added"))
    assert event_type_of(event_document(custom)) == "custom:wishlist_item_added"
    assert event_type_of({}) is None


@pytest.mark.parametrize(
    ("event_type", "problem"),
    [
        ("order_complete", "did you mean 'order_completed'?"),
        ("custom", "name the custom event"),
        ("custom:Bad-Name", "custom:<name>"),
        ("custom:", "custom:<name>"),
        ("", "unknown event type"),
    ],
)
def test_payload_of_refuses_unknown_types(event_type: str, problem: str) -> None:
    with pytest.raises(InvalidEventType, match=problem.replace("?", r"\?")):
        payload_of(event_type)


def test_every_payload_name_is_a_valid_event_type_but_bare_custom() -> None:
    names = [f.name for f in ingest_pb2.Event.DESCRIPTOR.oneofs_by_name["payload"].fields]
    assert "cart_item_added" in names and "custom" in names
    for name in names:
        if name != "custom":
            assert payload_of(name) == name
    assert payload_of("custom:wishlist_item_added") == "custom"


# ---- paths ------------------------------------------------------------------------------------


def test_parse_steps_reads_names_indexes_and_each() -> None:
    assert parse_steps("a.b[0].c") == ("a", "b", 0, "c")
    assert parse_steps("items[*].sku") == ("items", EACH, "sku")
    assert parse_steps("t.x[1][*]") == ("t", "x", 1, EACH)


@pytest.mark.parametrize(
    "text", ["a.", ".a", "a..b", "a[", "a[-1]", "a[x]", "a b", "a.[0]", "[0]", "a/b", "é"]
)
def test_parse_steps_refuses_malformed_paths(text: str) -> None:
    with pytest.raises(PathError, match="dotted path"):
        parse_steps(text)


def test_parse_steps_limits() -> None:
    with pytest.raises(PathError, match="required"):
        parse_steps("")
    with pytest.raises(PathError, match="at most 256 characters"):
        parse_steps("a" * 60 + "." + "b" * 60 + "." + "c" * 60 + "." + "d" * 60 + ".e" * 10)
    with pytest.raises(PathError, match="at most 16 steps"):
        parse_steps(".".join(["a"] * 17))


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("cart_item_added.unit_price", FieldKind.MONEY),
        ("cart_item_added.unit_price.units", FieldKind.NUMBER),
        ("cart_item_added.unit_price.currency_code", FieldKind.STRING),
        ("cart_item_added.quantity", FieldKind.NUMBER),
        ("occurred_at", FieldKind.TIMESTAMP),
        ("source", FieldKind.ENUM),
        ("context", FieldKind.MESSAGE),
        ("customer.email", FieldKind.STRING),
    ],
)
def test_event_paths_lead_to_their_field_kinds(text: str, kind: FieldKind) -> None:
    assert compile_path(text, Schema.event("cart_item_added")).kind == kind


@pytest.mark.parametrize(
    ("text", "kind", "element_kind"),
    [
        ("cart.items", FieldKind.LIST, FieldKind.MESSAGE),
        ("purchased_skus", FieldKind.LIST, FieldKind.STRING),
        ("cart.items[*].sku", FieldKind.STRING, None),
        ("cart.items[0].unit_price", FieldKind.MONEY, None),
        ("email.bounce_state", FieldKind.ENUM, None),
        ("email.recent_open_times", FieldKind.LIST, FieldKind.TIMESTAMP),
        ("traits.plan", FieldKind.JSON, None),
        ("traits.a.b[3][*].c", FieldKind.JSON, None),
        ("provenance", FieldKind.JSON, None),
        ("orders.count", FieldKind.NUMBER, None),
    ],
)
def test_profile_paths_lead_to_their_field_kinds(
    text: str, kind: FieldKind, element_kind: FieldKind | None
) -> None:
    path = compile_path(text, Schema.profile())
    assert (path.kind, path.element_kind) == (kind, element_kind)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("cart.itemz", "cart has no field 'itemz'; did you mean 'items'?"),
        ("kart", "the profile has no field 'kart'; did you mean 'cart'?"),
        ("cart.items.sku", "cart.items is a list: name an element, e.g. cart.items[*].sku"),
        ("cart[0]", "cart is not a list"),
        ("cart.items[*].sku.x", "cart.items[*].sku has no fields"),
        ("cart.update_time.seconds", "cart.update_time has no fields"),
    ],
)
def test_profile_paths_are_checked_against_the_descriptor(text: str, problem: str) -> None:
    with pytest.raises(PathError) as raised:
        compile_path(text, Schema.profile())
    assert str(raised.value) == problem


def test_event_paths_may_not_read_another_payload() -> None:
    with pytest.raises(PathError, match="the event is a cart_item_added event; it has no order_completed"):
        compile_path("order_completed.order_id", Schema.event("cart_item_added"))
    assert (
        compile_path("custom.properties.list_id", Schema.event("custom:wishlist_item_added")).kind == "json"
    )


def test_values_follow_indexes_each_and_missing_steps() -> None:
    schema = Schema.profile()
    assert compile_path("cart.items[1].sku", schema).values(CART_PROFILE) == ["b"]
    assert compile_path("cart.items[2].sku", schema).values(CART_PROFILE) == []
    assert compile_path("cart.items[*].sku", schema).values(CART_PROFILE) == ["a", "b"]
    assert compile_path("cart.items[*].sku", schema).values(EMPTY_PROFILE) == []
    assert compile_path("traits.tags[0]", schema).values(CART_PROFILE) == ["vip"]
    assert compile_path("traits.nothing.here", schema).values(CART_PROFILE) == []


def test_a_missing_proto3_scalar_reads_as_its_default() -> None:
    schema = Schema.profile()
    assert compile_path("email.unsubscribed", schema).values(EMPTY_PROFILE) == [False]
    assert compile_path("email.bounce_state", schema).values(EMPTY_PROFILE) == ["BOUNCE_STATE_UNSPECIFIED"]
    assert compile_path("orders.count", schema).values(EMPTY_PROFILE) == [0]
    assert compile_path("email.unsubscribed", schema).values(EMPTY_PROFILE, defaults=False) == []
    # A message (Money, Timestamp) has presence: no default.
    assert compile_path("cart.total", schema).values(EMPTY_PROFILE) == []
    # Through a list, the element must exist; its missing scalars read as defaults.
    items = profile(cart={"items": [{"sku": "a"}]})
    assert compile_path("cart.items[*].quantity", schema).values(items) == [0]
    # A payload of another type is absent, not a default.
    custom = event_document(ingest_pb2.Event(custom=ingest_pb2.CustomEvent(name="x")))
    assert compile_path("cart_item_added.quantity", Schema.event("cart_item_added")).values(custom) == []


# ---- evaluation -------------------------------------------------------------------------------

EVENT = cart_event()
CART = Schema.event("cart_item_added")

EVALUATIONS: list[tuple[str, Op, Any, dict[str, Any], Schema, bool]] = [
    # Money compares by its amount; int64 strings as numbers.
    ("cart_item_added.unit_price", OP.OPERATOR_GREATER_THAN, 12, EVENT, CART, True),
    ("cart_item_added.unit_price", OP.OPERATOR_EQUALS, 12.5, EVENT, CART, True),
    ("cart_item_added.unit_price", OP.OPERATOR_LESS_THAN_OR_EQUAL, 12.4, EVENT, CART, False),
    ("cart_item_added.unit_price.units", OP.OPERATOR_EQUALS, 12, EVENT, CART, True),
    ("cart_item_added.unit_price.currency_code", OP.OPERATOR_EQUALS, "EUR", EVENT, CART, True),
    ("cart_item_added.quantity", OP.OPERATOR_EQUALS, 3, EVENT, CART, True),
    ("cart_item_added.quantity", OP.OPERATOR_GREATER_THAN_OR_EQUAL, 3.0, EVENT, CART, True),
    ("cart_item_added.quantity", OP.OPERATOR_IN, [1, 3], EVENT, CART, True),
    ("cart_item_added.quantity", OP.OPERATOR_IN, [1, 2], EVENT, CART, False),
    # Timestamps as instants, whatever the offset they are written with.
    ("occurred_at", OP.OPERATOR_GREATER_THAN, "2024-05-01T09:59:59Z", EVENT, CART, True),
    ("occurred_at", OP.OPERATOR_EQUALS, "2024-05-01T12:00:00+02:00", EVENT, CART, True),
    ("occurred_at", OP.OPERATOR_IN, ["2024-05-01T10:00:00.000Z"], EVENT, CART, True),
    # Enums by full or short name.
    ("source", OP.OPERATOR_EQUALS, "web", EVENT, CART, True),
    ("source", OP.OPERATOR_EQUALS, "EVENT_SOURCE_WEB", EVENT, CART, True),
    ("source", OP.OPERATOR_NOT_EQUALS, "server", EVENT, CART, True),
    # Strings exactly; CONTAINS a substring.
    ("cart_item_added.sku", OP.OPERATOR_EQUALS, "SKU-1", EVENT, CART, False),
    ("context.locale", OP.OPERATOR_CONTAINS, "de", EVENT, CART, True),
    ("context.timezone", OP.OPERATOR_NOT_EXISTS, NO_VALUE, EVENT, CART, True),
    ("context.locale", OP.OPERATOR_EXISTS, None, EVENT, CART, True),
    # Lists: [*] is any element; NOT_EQUALS is "none equals".
    ("cart.items[*].sku", OP.OPERATOR_EQUALS, "b", CART_PROFILE, Schema.profile(), True),
    ("cart.items[*].sku", OP.OPERATOR_NOT_EQUALS, "b", CART_PROFILE, Schema.profile(), False),
    ("cart.items[*].sku", OP.OPERATOR_NOT_EQUALS, "c", CART_PROFILE, Schema.profile(), True),
    ("cart.items[*].quantity", OP.OPERATOR_GREATER_THAN, 3, CART_PROFILE, Schema.profile(), True),
    ("cart.items[*].quantity", OP.OPERATOR_GREATER_THAN, 4, CART_PROFILE, Schema.profile(), False),
    ("cart.items", OP.OPERATOR_EXISTS, NO_VALUE, CART_PROFILE, Schema.profile(), True),
    ("cart.items", OP.OPERATOR_EXISTS, NO_VALUE, EMPTY_PROFILE, Schema.profile(), False),
    ("cart.items", OP.OPERATOR_NOT_EXISTS, NO_VALUE, EMPTY_PROFILE, Schema.profile(), True),
    ("purchased_skus", OP.OPERATOR_CONTAINS, "y", CART_PROFILE, Schema.profile(), True),
    ("purchased_skus", OP.OPERATOR_CONTAINS, "z", CART_PROFILE, Schema.profile(), False),
    # Defaults: a profile without email is not unsubscribed, and has no unsubscribed value.
    ("email.unsubscribed", OP.OPERATOR_EQUALS, False, EMPTY_PROFILE, Schema.profile(), True),
    ("email.unsubscribed", OP.OPERATOR_EXISTS, NO_VALUE, EMPTY_PROFILE, Schema.profile(), False),
    ("email.bounce_state", OP.OPERATOR_NOT_EQUALS, "hard", CART_PROFILE, Schema.profile(), True),
    ("email.bounce_state", OP.OPERATOR_IN, ["soft", "hard"], CART_PROFILE, Schema.profile(), True),
    ("orders.count", OP.OPERATOR_LESS_THAN, 1, EMPTY_PROFILE, Schema.profile(), True),
    ("consents[*].channel", OP.OPERATOR_EQUALS, "email", CART_PROFILE, Schema.profile(), True),
    ("cart.total", OP.OPERATOR_GREATER_THAN, 0, EMPTY_PROFILE, Schema.profile(), False),
    ("cart.total", OP.OPERATOR_NOT_EQUALS, 0, EMPTY_PROFILE, Schema.profile(), True),
    # Below a Struct, JSON types: numbers as numbers, a string is not a number, true is not 1.
    ("traits.age", OP.OPERATOR_EQUALS, 42, CART_PROFILE, Schema.profile(), True),
    ("traits.age", OP.OPERATOR_GREATER_THAN, 41.5, CART_PROFILE, Schema.profile(), True),
    ("traits.age_text", OP.OPERATOR_EQUALS, 42, CART_PROFILE, Schema.profile(), False),
    ("traits.age_text", OP.OPERATOR_EQUALS, "42", CART_PROFILE, Schema.profile(), True),
    ("traits.vip", OP.OPERATOR_EQUALS, True, CART_PROFILE, Schema.profile(), True),
    ("traits.vip", OP.OPERATOR_EQUALS, 1, CART_PROFILE, Schema.profile(), False),
    ("traits.tags", OP.OPERATOR_CONTAINS, "eu", CART_PROFILE, Schema.profile(), True),
    ("traits.tags[*]", OP.OPERATOR_IN, ["us", "eu"], CART_PROFILE, Schema.profile(), True),
    ("traits.signup", OP.OPERATOR_LESS_THAN, "2024-03-01T00:00:00Z", CART_PROFILE, Schema.profile(), True),
    ("traits.signup", OP.OPERATOR_CONTAINS, "2024-02", CART_PROFILE, Schema.profile(), True),
    ("traits.age", OP.OPERATOR_LESS_THAN, "2024-03-01T00:00:00Z", CART_PROFILE, Schema.profile(), False),
    ("traits.missing", OP.OPERATOR_NOT_EQUALS, "x", CART_PROFILE, Schema.profile(), True),
    ("traits.missing", OP.OPERATOR_EQUALS, "x", CART_PROFILE, Schema.profile(), False),
    ("traits.missing", OP.OPERATOR_NOT_EXISTS, None, CART_PROFILE, Schema.profile(), True),
]


@pytest.mark.parametrize(("path", "operator", "value", "document", "schema", "expected"), EVALUATIONS)
def test_conditions_evaluate(
    path: str, operator: Op, value: Any, document: dict[str, Any], schema: Schema, expected: bool
) -> None:
    assert compiled(path, operator, value, schema).holds(document) is expected


def test_exists_is_false_for_json_null_and_empty_lists() -> None:
    document = profile(traits={"nothing": None, "empty": [], "blank": ""})
    exists = {
        name: compiled(f"traits.{name}", OP.OPERATOR_EXISTS).holds(document) for name in document["traits"]
    }
    assert exists == {"nothing": False, "empty": False, "blank": True}


def test_first_failing_names_the_condition() -> None:
    conditions = [
        compiled("cart.items", OP.OPERATOR_EXISTS),
        compiled("traits.vip", OP.OPERATOR_EQUALS, False),
        compiled("traits.age", OP.OPERATOR_EQUALS, 1),
    ]
    assert first_failing(conditions, CART_PROFILE) == 1
    assert first_failing(conditions[:1], CART_PROFILE) is None


# ---- compile errors ---------------------------------------------------------------------------

ERRORS: list[tuple[str, Op, Any, str, str]] = [
    ("cart.items", OP.OPERATOR_UNSPECIFIED, NO_VALUE, "operator", "required"),
    ("cart.items", Op(99), NO_VALUE, "operator", "unknown operator 99"),
    ("cart.items", OP.OPERATOR_EXISTS, 1, "value", "must be unset: EXISTS takes no value"),
    ("traits.x", OP.OPERATOR_EQUALS, NO_VALUE, "value", "required with EQUALS"),
    ("traits.x", OP.OPERATOR_EQUALS, None, "value", "must not be null; test a missing value with NOT_EXISTS"),
    ("traits.x", OP.OPERATOR_EQUALS, {"a": 1}, "value", "must be a string, a number or a boolean"),
    ("traits.x", OP.OPERATOR_EQUALS, [1], "value", "must be a string, a number or a boolean"),
    ("traits.x", OP.OPERATOR_IN, "a", "value", "must be a list for IN"),
    ("traits.x", OP.OPERATOR_IN, [], "value", "must hold 1 to 100 values"),
    ("traits.x", OP.OPERATOR_IN, list(range(101)), "value", "must hold 1 to 100 values"),
    ("traits.x", OP.OPERATOR_IN, [1, [2]], "value", "[1] must be a string, a number or a boolean"),
    ("traits.x", OP.OPERATOR_GREATER_THAN, "soon", "value", "must be a number or an RFC 3339 time"),
    ("traits.x", OP.OPERATOR_GREATER_THAN, True, "value", "must be a number or an RFC 3339 time"),
    ("orders.count", OP.OPERATOR_GREATER_THAN, "3", "value", "must be a number for GREATER_THAN"),
    ("orders.count", OP.OPERATOR_EQUALS, "3", "value", "must be a number: the field is a number"),
    ("cart.total", OP.OPERATOR_EQUALS, True, "value", "must be a number: the field is a money"),
    ("cart.update_time", OP.OPERATOR_LESS_THAN, 5, "value", "must be an RFC 3339 time"),
    ("cart.update_time", OP.OPERATOR_EQUALS, "yesterday", "value", "must be an RFC 3339 time"),
    ("last_seen.locale", OP.OPERATOR_GREATER_THAN, 1, "operator", "compares numbers, amounts and times"),
    ("email.unsubscribed", OP.OPERATOR_EQUALS, "yes", "value", "must be true or false"),
    ("email.bounce_state", OP.OPERATOR_EQUALS, "bounced", "value", "one of none, soft, hard"),
    ("last_seen.locale", OP.OPERATOR_EQUALS, 5, "value", "must be a string"),
    ("last_seen.locale", OP.OPERATOR_CONTAINS, 5, "value", "must be a string for CONTAINS"),
    ("orders.count", OP.OPERATOR_CONTAINS, 5, "operator", "CONTAINS tests a string or a list, not a number"),
    ("cart.items", OP.OPERATOR_EQUALS, 1, "operator", "use cart.items[*] for any element"),
    ("cart.items", OP.OPERATOR_CONTAINS, "a", "operator", "is a list of messages"),
    ("cart", OP.OPERATOR_EQUALS, 1, "operator", "cart is a message: only EXISTS and NOT_EXISTS"),
    ("cart.itemz", OP.OPERATOR_EXISTS, NO_VALUE, "path", "did you mean 'items'?"),
    ("traits.x", OP.OPERATOR_EQUALS, "x" * 1025, "value", "at most 1024 characters"),
]


@pytest.mark.parametrize(("path", "operator", "value", "field", "problem"), ERRORS)
def test_invalid_conditions_are_refused(
    path: str, operator: Op, value: Any, field: str, problem: str
) -> None:
    with pytest.raises(ConditionError) as raised:
        compiled(path, operator, value)
    assert raised.value.field == field
    assert problem in raised.value.description


def test_non_finite_numbers_are_refused() -> None:
    message = triggers_pb2.Condition(
        path="traits.x", operator=OP.OPERATOR_EQUALS, value=struct_pb2.Value(number_value=math.inf)
    )
    with pytest.raises(ConditionError, match="finite"):
        compile_condition(message, Schema.profile())


def test_compile_conditions_names_each_violation_by_index() -> None:
    conditions = [
        condition("cart.items", OP.OPERATOR_EXISTS),
        condition("cart.itemz", OP.OPERATOR_EXISTS),
        condition("traits.x", OP.OPERATOR_IN, "a"),
    ]
    compiled_conditions, violations = compile_conditions(
        conditions, Schema.profile(), "trigger.profile_conditions"
    )
    assert len(compiled_conditions) == 1
    assert [v.field for v in violations] == [
        "trigger.profile_conditions[1].path",
        "trigger.profile_conditions[2].value",
    ]
    too_many = [condition("cart.items", OP.OPERATOR_EXISTS)] * (MAX_CONDITIONS + 1)
    _, violations = compile_conditions(too_many, Schema.profile(), "c")
    assert [(v.field, v.description) for v in violations] == [("c", "at most 20 conditions are allowed")]


# ---- keys and times ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ("abc", "abc"),
        ("", None),
        (None, None),
        (12, "12"),
        (12.0, "12"),
        (12.5, "12.5"),
        (True, "true"),
        (False, "false"),
        ([1], None),
        ({"a": 1}, None),
        (math.nan, None),
    ],
)
def test_key_string(value: Any, key: str | None) -> None:
    assert key_string(value) == key


def test_an_int64_key_and_a_struct_number_key_agree() -> None:
    typed = event_document(ingest_pb2.Event(product_searched=ingest_pb2.ProductSearched(result_count=7)))
    properties = struct_pb2.Struct()
    properties.update({"count": 7})
    custom = event_document(ingest_pb2.Event(custom=ingest_pb2.CustomEvent(name="x", properties=properties)))
    typed_key = key_string(
        compile_path("product_searched.result_count", Schema.event("product_searched")).value(typed)
    )
    custom_key = key_string(compile_path("custom.properties.count", Schema.event("custom:x")).value(custom))
    assert typed_key == custom_key == "7"


def test_timestamp_of_reads_rfc_3339() -> None:
    parsed = timestamp_of("2024-05-01T12:00:00+02:00")
    assert parsed is not None and parsed.isoformat() == "2024-05-01T10:00:00+00:00"
    assert timestamp_of("2024-05-01") is None
    assert timestamp_of(5) is None


# ---- properties -------------------------------------------------------------------------------

int64s = st.integers(min_value=-(2**63), max_value=2**63 - 1)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=300, deadline=None, database=None)
@given(quantity=int64s, operand=finite)
def test_int64_comparisons_are_exact(quantity: int, operand: float) -> None:
    document = cart_event(quantity=quantity)
    tests: list[tuple[Op, Callable[[Fraction, Fraction], bool]]] = [
        (OP.OPERATOR_GREATER_THAN, gt),
        (OP.OPERATOR_LESS_THAN_OR_EQUAL, le),
        (OP.OPERATOR_EQUALS, eq),
    ]
    for operator, test in tests:
        holds = compiled("cart_item_added.quantity", operator, operand, CART).holds(document)
        assert holds is test(Fraction(quantity), Fraction(operand))


@settings(max_examples=300, deadline=None, database=None)
@given(
    units=st.integers(min_value=-(10**15), max_value=10**15),
    nanos=st.integers(min_value=0, max_value=999_999_999),
    operand=finite,
)
def test_money_compares_by_its_exact_amount(units: int, nanos: int, operand: float) -> None:
    if units < 0:
        nanos = -nanos  # a Money's units and nanos share a sign
    document = cart_event(unit_price={"currency_code": "JPY", "units": units, "nanos": nanos})
    amount = Fraction(units) + Fraction(nanos, 10**9)
    # The operand as written in JSON (its shortest repr), which is what a caller means.
    written = Fraction(Decimal(repr(operand)))
    greater = compiled("cart_item_added.unit_price", OP.OPERATOR_GREATER_THAN, operand, CART).holds(document)
    equal = compiled("cart_item_added.unit_price", OP.OPERATOR_EQUALS, operand, CART).holds(document)
    assert (greater, equal) == (amount > written, amount == written)


json_scalars = st.one_of(st.booleans(), finite, st.text(max_size=5), st.none())


@settings(max_examples=300, deadline=None, database=None)
@given(value=json_scalars, operand=st.one_of(st.booleans(), finite, st.text(max_size=5)))
def test_not_equals_is_the_negation_of_equals(value: Any, operand: Any) -> None:
    document = profile(traits={"x": value})
    equals = compiled("traits.x", OP.OPERATOR_EQUALS, operand).holds(document)
    not_equals = compiled("traits.x", OP.OPERATOR_NOT_EQUALS, operand).holds(document)
    assert equals is not not_equals
    if isinstance(value, bool) or isinstance(operand, bool):
        assert equals is (type(value) is type(operand) and value == operand)
