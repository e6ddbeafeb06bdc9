"""Conditions on events and profiles: paths compiled once, when a trigger is defined, and
evaluated against documents. Pure: no I/O, no clock.

A document is a message as plain JSON-like values, the way ``event_document`` and
``profile_document`` make it (``json_format.MessageToDict`` with the proto field names): set
fields only, int64 as decimal strings, enums by their full names (``BOUNCE_STATE_HARD``),
Timestamps as RFC 3339 strings, Money as ``{"currency_code", "units", "nanos"}``, Structs as
plain JSON.

A path (``cart.items[*].sku``) is checked against the message's descriptor when it is compiled,
so a typo is a field violation rather than a condition that never holds; below a Struct
(``traits``, ``custom.properties``) any name goes. The path's field type decides how values
compare (docs/triggers-domain.md has the table):

- numbers compare as numbers, exactly (``Decimal``): an int64's string ``"5"`` equals ``5`` and
  ``5.0``; a Money compares by its decimal amount (units + nanos), whatever its currency (add a
  condition on ``….currency_code`` to pin one); a Timestamp compares as an instant with an
  RFC 3339 value (``"2024-05-01T00:00:00Z"``);
- strings compare exactly (case matters); enums by name (``"BOUNCE_STATE_HARD"`` or ``"hard"``);
- below a Struct values keep their JSON types: a string is not a number, ``true`` is not ``1``;
- a proto3 scalar that is not in the document reads as its default (``email.unsubscribed`` is
  ``false`` when the profile has no ``email``), as protobuf reads it; EXISTS is true only for a
  value that is set (not the default, not null, not an empty list);
- ``[*]`` makes a path name many values: a condition holds when one of them passes, and
  NOT_EQUALS / NOT_EXISTS are the negations of EQUALS / EXISTS (``cart.items[*].sku NOT_EQUALS
  "x"``: no item is ``x``).
"""

from __future__ import annotations

import difflib
import enum
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from operator import ge, gt, le, lt
from typing import Any, Final

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from sendtime.ingest.v1 import ingest_pb2
from sendtime.profile.v1 import profile_pb2
from sendtime.triggers.v1 import triggers_pb2
from sendtime_common.errors import FieldViolation

# The ingest payload names, read from the Event's oneof so a new event type is known here at once.
PAYLOAD_NAMES: Final = tuple(f.name for f in ingest_pb2.Event.DESCRIPTOR.oneofs_by_name["payload"].fields)
CUSTOM_PREFIX: Final = "custom:"
# As ingest accepts custom event names (ingest.validation.CUSTOM_EVENT_NAME_PATTERN).
CUSTOM_EVENT_NAME: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")

MAX_PATH_CHARS: Final = 256
MAX_PATH_STEPS: Final = 16
MAX_CONDITIONS: Final = 20
MAX_IN_VALUES: Final = 100
MAX_STRING_VALUE_CHARS: Final = 1024

_NAME = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}"
_SEGMENT = rf"{_NAME}(?:\[(?:\d{{1,6}}|\*)\])*"
_PATH = re.compile(rf"{_SEGMENT}(?:\.{_SEGMENT})*")
_STEP = re.compile(r"\[(\d+|\*)\]|\.?([^.\[]+)")
PATH_FORM: Final = "a dotted path of field names, with [n] or [*] for list elements, e.g. cart.items[*].sku"

_MONEY = "google.type.Money"
_TIMESTAMP = "google.protobuf.Timestamp"
_JSON_TYPES = frozenset(
    {
        "google.protobuf.Struct",
        "google.protobuf.Value",
        "google.protobuf.ListValue",
        "google.protobuf.Duration",
    }
)
_NANOS_PER_UNIT = Decimal(1_000_000_000)


class FieldKind(enum.StrEnum):
    """What a path leads to, which decides how it compares."""

    STRING = "string"
    NUMBER = "number"
    BOOL = "bool"
    ENUM = "enum"
    MONEY = "money"
    TIMESTAMP = "timestamp"
    MESSAGE = "message"  # any other message: only EXISTS / NOT_EXISTS
    LIST = "list"  # a repeated field without [n] or [*]: EXISTS, NOT_EXISTS, CONTAINS
    JSON = "json"  # below a Struct: JSON values, typed at evaluation


class Operator(enum.StrEnum):
    EQUALS = "equals"
    NOT_EQUALS = "not_equals"
    GREATER_THAN = "greater_than"
    GREATER_THAN_OR_EQUAL = "greater_than_or_equal"
    LESS_THAN = "less_than"
    LESS_THAN_OR_EQUAL = "less_than_or_equal"
    IN = "in"
    EXISTS = "exists"
    NOT_EXISTS = "not_exists"
    CONTAINS = "contains"


OPERATORS: Final[Mapping[int, Operator]] = {
    triggers_pb2.OPERATOR_EQUALS: Operator.EQUALS,
    triggers_pb2.OPERATOR_NOT_EQUALS: Operator.NOT_EQUALS,
    triggers_pb2.OPERATOR_GREATER_THAN: Operator.GREATER_THAN,
    triggers_pb2.OPERATOR_GREATER_THAN_OR_EQUAL: Operator.GREATER_THAN_OR_EQUAL,
    triggers_pb2.OPERATOR_LESS_THAN: Operator.LESS_THAN,
    triggers_pb2.OPERATOR_LESS_THAN_OR_EQUAL: Operator.LESS_THAN_OR_EQUAL,
    triggers_pb2.OPERATOR_IN: Operator.IN,
    triggers_pb2.OPERATOR_EXISTS: Operator.EXISTS,
    triggers_pb2.OPERATOR_NOT_EXISTS: Operator.NOT_EXISTS,
    triggers_pb2.OPERATOR_CONTAINS: Operator.CONTAINS,
}
_ORDERINGS = frozenset(
    {
        Operator.GREATER_THAN,
        Operator.GREATER_THAN_OR_EQUAL,
        Operator.LESS_THAN,
        Operator.LESS_THAN_OR_EQUAL,
    }
)
_NEGATIONS: Final = {Operator.NOT_EQUALS: Operator.EQUALS, Operator.NOT_EXISTS: Operator.EXISTS}


# ---- documents --------------------------------------------------------------------------------


def event_document(event: ingest_pb2.Event) -> dict[str, Any]:
    """An event as the document its conditions and keys are read from."""
    document: dict[str, Any] = json_format.MessageToDict(event, preserving_proto_field_name=True)
    return document


def profile_document(profile: profile_pb2.Profile) -> dict[str, Any]:
    """A profile as the document profile conditions (and suppression) are read from."""
    document: dict[str, Any] = json_format.MessageToDict(profile, preserving_proto_field_name=True)
    return document


def event_type_of(document: Mapping[str, Any]) -> str | None:
    """The event type of an event document: its payload name, ``custom:<name>`` for a custom
    event; None when it has no payload."""
    for name in PAYLOAD_NAMES:
        if name in document:
            if name == "custom":
                custom = document[name]
                return CUSTOM_PREFIX + str(custom.get("name", "") if isinstance(custom, Mapping) else "")
            return name
    return None


class InvalidEventType(ValueError):
    """Not an event type a trigger can match; the message says why."""


def payload_of(event_type: str) -> str:
    """The payload field an event type names (``custom`` for ``custom:<name>``).

    Raises:
        InvalidEventType: neither an ingest payload name nor ``custom:<name>``.
    """
    if event_type.startswith(CUSTOM_PREFIX):
        if not CUSTOM_EVENT_NAME.fullmatch(event_type.removeprefix(CUSTOM_PREFIX)):
            raise InvalidEventType(
                "a custom event type is custom:<name>, the name 1 to 64 of a-z, 0-9 and _, starting "
                "with a letter"
            )
        return "custom"
    if event_type == "custom":
        raise InvalidEventType("name the custom event: custom:<name>, e.g. custom:wishlist_item_added")
    if event_type not in PAYLOAD_NAMES:
        typed = [name for name in PAYLOAD_NAMES if name != "custom"]
        close = difflib.get_close_matches(event_type, typed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise InvalidEventType(
            f"unknown event type '{event_type}'{hint}: one of {', '.join(typed)}, or custom:<name>"
        )
    return event_type


# ---- paths ------------------------------------------------------------------------------------


class _Each:
    """``[*]``: every element of a list."""

    def __repr__(self) -> str:
        return "[*]"


EACH: Final = _Each()
Step = str | int | _Each


class PathError(ValueError):
    """A path that cannot be compiled; the message is a field violation's description."""


@dataclass(frozen=True, slots=True)
class Schema:
    """What a path starts at: an event (of one type) or a profile."""

    root: Descriptor
    noun: str  # "the event", "the profile": for messages
    payload: str | None = None  # an event schema's payload field; other payload fields are refused

    @classmethod
    def event(cls, event_type: str) -> Schema:
        """Paths into events of ``event_type`` (raises ``InvalidEventType``)."""
        return cls(ingest_pb2.Event.DESCRIPTOR, "the event", payload_of(event_type))

    @classmethod
    def profile(cls) -> Schema:
        return cls(profile_pb2.Profile.DESCRIPTOR, "the profile")


_NO_DEFAULT: Final = object()


@dataclass(frozen=True, slots=True)
class Path:
    """A compiled path: its steps and what it leads to."""

    text: str
    steps: tuple[Step, ...]
    kind: FieldKind
    element_kind: FieldKind | None = None  # a LIST's elements
    enum_type: EnumDescriptor | None = None  # an ENUM's (or a LIST of enums') type
    # A missing key at a step from here on reads as ``default`` (a proto3 scalar reached through
    # singular messages only); len(steps) + 1: never.
    defaults_from: int = 0
    default: Any = None

    @property
    def many(self) -> bool:
        """Whether the path can name more than one value (it has ``[*]``)."""
        return any(step is EACH for step in self.steps)

    def values(self, document: Mapping[str, Any], *, defaults: bool = True) -> list[Any]:
        """The values at the path (several through ``[*]``); [] when there is none. With
        ``defaults``, a proto3 scalar missing from the document reads as its default."""
        found: list[Any] = []
        self._collect(document, 0, defaults, found)
        return found

    def value(self, document: Mapping[str, Any]) -> Any:
        """The first value at the path without defaults; None when there is none."""
        found = self.values(document, defaults=False)
        return found[0] if found else None

    def _collect(self, value: Any, i: int, defaults: bool, found: list[Any]) -> None:
        if i == len(self.steps):
            found.append(value)
            return
        step = self.steps[i]
        if isinstance(step, str):
            if isinstance(value, Mapping) and step in value:
                self._collect(value[step], i + 1, defaults, found)
            elif defaults and i >= self.defaults_from:
                found.append(self.default)
        elif isinstance(step, int):
            if isinstance(value, list) and step < len(value):
                self._collect(value[step], i + 1, defaults, found)
        elif isinstance(value, list):
            for item in value:
                self._collect(item, i + 1, defaults, found)


def parse_steps(text: str) -> tuple[Step, ...]:
    """The steps of a path, checked for form only.

    Raises:
        PathError: empty, too long, or not of the path form.
    """
    if not text:
        raise PathError("required")
    if len(text) > MAX_PATH_CHARS:
        raise PathError(f"must be at most {MAX_PATH_CHARS} characters")
    if not _PATH.fullmatch(text):
        raise PathError(f"must be {PATH_FORM}")
    steps: list[Step] = []
    for match in _STEP.finditer(text):
        index, name = match.groups()
        if name is not None:
            steps.append(name)
        elif index == "*":
            steps.append(EACH)
        else:
            steps.append(int(index))
    if len(steps) > MAX_PATH_STEPS:
        raise PathError(f"must have at most {MAX_PATH_STEPS} steps")
    return tuple(steps)


def compile_path(text: str, schema: Schema) -> Path:
    """``text`` checked against the schema's message and compiled.

    Raises:
        PathError: malformed, or naming a field the message does not have (with a suggestion),
            or indexing what is not a list.
    """
    steps = parse_steps(text)
    node = _Node(schema.root, None, repeated=False)
    defaults_from = 0
    for i, step in enumerate(steps):
        if node.is_json:
            break
        walked = _text_of(steps[:i])
        if isinstance(step, str):
            if i == 0 and schema.payload is not None and _is_other_payload(step, schema.payload):
                raise PathError(f"{schema.noun} is a {schema.payload} event; it has no {step}")
            node = node.child(step, walked or schema.noun)
            if node.field is not None and (node.repeated or node.field.containing_oneof is not None):
                defaults_from = i + 1
        else:
            node = node.element(walked)
            defaults_from = i + 1
    kind, element_kind, enum_type = node.kind()
    never = len(steps) + 1
    if node.is_json or kind not in _SCALARS or node.field is None or node.field.has_presence:
        return Path(text, steps, kind, element_kind, enum_type, never)
    return Path(text, steps, kind, element_kind, enum_type, defaults_from, _default_of(node.field))


_SCALARS = frozenset({FieldKind.STRING, FieldKind.NUMBER, FieldKind.BOOL, FieldKind.ENUM})


def _is_other_payload(name: str, payload: str) -> bool:
    return name != payload and name in PAYLOAD_NAMES


def _text_of(steps: Sequence[Step]) -> str:
    text = ""
    for step in steps:
        if isinstance(step, str):
            text += f".{step}" if text else step
        else:
            text += f"[{step}]" if isinstance(step, int) else "[*]"
    return text


_NUMBER_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_DOUBLE,
        FieldDescriptor.TYPE_FLOAT,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_SFIXED64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
    }
)


def _scalar_kind(field: FieldDescriptor) -> FieldKind:
    if field.type in _NUMBER_TYPES:
        return FieldKind.NUMBER
    if field.type == FieldDescriptor.TYPE_BOOL:
        return FieldKind.BOOL
    if field.type == FieldDescriptor.TYPE_ENUM:
        return FieldKind.ENUM
    return FieldKind.STRING  # string, bytes


def _default_of(field: FieldDescriptor) -> Any:
    kind = _scalar_kind(field)
    if kind == FieldKind.ENUM:
        assert field.enum_type is not None  # set on enum fields
        return field.enum_type.values_by_number[0].name
    return {FieldKind.NUMBER: 0, FieldKind.BOOL: False, FieldKind.STRING: ""}[kind]


class _Node:
    """Where a path has got to in the descriptors: a message, a field's value, or a repeated
    field before its index."""

    def __init__(self, message: Descriptor | None, field: FieldDescriptor | None, *, repeated: bool) -> None:
        self.message = message  # the message the path is at (None: a scalar, or below a Struct)
        self.field = field  # the field the path is at (None: the root)
        self.repeated = repeated  # a repeated field not yet indexed

    @property
    def is_json(self) -> bool:
        if self.field is not None and self.field.message_type is not None:
            message_type = self.field.message_type
            return message_type.full_name in _JSON_TYPES or message_type.GetOptions().map_entry
        return False

    def child(self, name: str, walked: str) -> _Node:
        """The field ``name`` of the message at ``walked`` (a path, or the schema's noun)."""
        if self.repeated:
            raise PathError(f"{walked} is a list: name an element, e.g. {walked}[*].{name}")
        if self.message is None or self.message.full_name == _TIMESTAMP:
            raise PathError(f"{walked} has no fields")
        field = self.message.fields_by_name.get(name)
        if field is None:
            raise PathError(
                _with_suggestion(f"{walked} has no field '{name}'", name, self.message.fields_by_name)
            )
        return _Node(field.message_type, field, repeated=field.is_repeated)

    def element(self, walked: str) -> _Node:
        if not self.repeated:
            raise PathError(f"{walked} is not a list")
        return _Node(self.message, self.field, repeated=False)

    def kind(self) -> tuple[FieldKind, FieldKind | None, EnumDescriptor | None]:
        if self.is_json:
            return FieldKind.JSON, None, None
        single = self._single_kind()
        enum_type = self.field.enum_type if self.field is not None else None
        if self.repeated:
            return FieldKind.LIST, single, enum_type
        return single, None, enum_type

    def _single_kind(self) -> FieldKind:
        if self.field is None:
            return FieldKind.MESSAGE
        if self.message is None:
            return _scalar_kind(self.field)
        if self.message.full_name == _MONEY:
            return FieldKind.MONEY
        if self.message.full_name == _TIMESTAMP:
            return FieldKind.TIMESTAMP
        return FieldKind.MESSAGE


def _with_suggestion(prefix: str, name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f"{prefix}; did you mean '{close[0]}'?" if close else prefix


# ---- values -----------------------------------------------------------------------------------

# A value made comparable: (tag, value), tags "n" number (Decimal), "s" string, "b" bool,
# "t" instant (ns since the epoch). Values compare only within a tag.
Comparable = tuple[str, Any]


def timestamp_nanos(text: str) -> int | None:
    """An RFC 3339 time as nanoseconds since the epoch; None when it is not one."""
    timestamp = timestamp_pb2.Timestamp()
    try:
        timestamp.FromJsonString(text)
    except ValueError:
        return None
    return timestamp.ToNanoseconds()


def timestamp_of(value: Any) -> datetime | None:
    """A document's time value (an RFC 3339 string) as an aware datetime; None otherwise."""
    if not isinstance(value, str):
        return None
    timestamp = timestamp_pb2.Timestamp()
    try:
        timestamp.FromJsonString(value)
    except ValueError:
        return None
    return timestamp.ToDatetime(tzinfo=UTC)


def _decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value)) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = Decimal(value)
        except InvalidOperation:
            return None
        return number if number.is_finite() else None
    return None


def _money_amount(value: Any) -> Decimal | None:
    if not isinstance(value, Mapping):
        return None
    units = _decimal(value.get("units", 0))
    nanos = _decimal(value.get("nanos", 0))
    if units is None or nanos is None:
        return None
    return units + nanos / _NANOS_PER_UNIT


def _comparable(value: Any, kind: FieldKind, as_time: bool) -> Comparable | None:
    """A document value of ``kind`` made comparable; None when it is not of that kind.
    ``as_time``: a JSON string is read as an RFC 3339 instant (the operand is one)."""
    if kind == FieldKind.NUMBER:
        number = _decimal(value)
        return None if number is None else ("n", number)
    if kind == FieldKind.MONEY:
        amount = _money_amount(value)
        return None if amount is None else ("n", amount)
    if kind == FieldKind.TIMESTAMP:
        nanos = timestamp_nanos(value) if isinstance(value, str) else None
        return None if nanos is None else ("t", nanos)
    if kind in (FieldKind.STRING, FieldKind.ENUM):
        return ("s", value) if isinstance(value, str) else None
    if kind == FieldKind.BOOL:
        return ("b", value) if isinstance(value, bool) else None
    if kind == FieldKind.JSON:
        if isinstance(value, bool):
            return ("b", value)
        if isinstance(value, int | float):
            number = _decimal(value)
            return None if number is None else ("n", number)
        if isinstance(value, str):
            if as_time:
                nanos = timestamp_nanos(value)
                return None if nanos is None else ("t", nanos)
            return ("s", value)
    return None


def key_string(value: Any) -> str | None:
    """A document value as an episode key: strings as they are, numbers in their shortest form
    (``"12"`` for an int64 12 and for a Struct's 12.0), booleans as true/false; None for no
    value, an empty string, or a list or an object."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value or None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else repr(value)
    return None


# ---- conditions -------------------------------------------------------------------------------


class ConditionError(ValueError):
    """A condition that cannot be compiled: ``field`` is ``path``, ``operator`` or ``value``."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(description)
        self.field = field
        self.description = description


@dataclass(frozen=True, slots=True)
class Condition:
    """A compiled condition."""

    path: Path
    operator: Operator
    # EXISTS, NOT_EXISTS: None; IN: a frozenset of comparables; otherwise one comparable.
    operand: Any = None

    def holds(self, document: Mapping[str, Any]) -> bool:
        """Whether the condition holds for ``document``."""
        positive = _NEGATIONS.get(self.operator)
        if positive is not None:
            return not Condition(self.path, positive, self.operand).holds(document)
        if self.operator == Operator.EXISTS:
            return any(_is_set(value) for value in self.path.values(document, defaults=False))
        return any(self._passes(value) for value in self.path.values(document))

    def _passes(self, value: Any) -> bool:
        kind = self.path.kind
        if self.operator == Operator.CONTAINS:
            return self._contains(value)
        if self.operator == Operator.IN:
            return _comparable(value, kind, as_time=False) in self.operand
        tag, operand = self.operand
        found = _comparable(value, kind, as_time=tag == "t")
        if found is None or found[0] != tag:
            return False
        if self.operator == Operator.EQUALS:
            return bool(found[1] == operand)
        return _ORDER_TESTS[self.operator](found[1], operand)

    def _contains(self, value: Any) -> bool:
        if isinstance(value, list):
            kind = self.path.element_kind or FieldKind.JSON
            return any(_comparable(item, kind, as_time=False) == self.operand for item in value)
        tag, operand = self.operand
        return tag == "s" and isinstance(value, str) and operand in value


_ORDER_TESTS: Final[Mapping[Operator, Callable[[Any, Any], bool]]] = {
    Operator.GREATER_THAN: gt,
    Operator.GREATER_THAN_OR_EQUAL: ge,
    Operator.LESS_THAN: lt,
    Operator.LESS_THAN_OR_EQUAL: le,
}


def _is_set(value: Any) -> bool:
    return value is not None and value != []


def all_hold(conditions: Iterable[Condition], document: Mapping[str, Any]) -> bool:
    return all(condition.holds(document) for condition in conditions)


def first_failing(conditions: Sequence[Condition], document: Mapping[str, Any]) -> int | None:
    """The index of the first condition that does not hold; None when all do."""
    for i, condition in enumerate(conditions):
        if not condition.holds(document):
            return i
    return None


def compile_condition(condition: triggers_pb2.Condition, schema: Schema) -> Condition:
    """A Condition message checked and compiled.

    Raises:
        ConditionError: the path, the operator or the value is invalid, or the value does not
            suit the operator and the field.
    """
    try:
        path = compile_path(condition.path, schema)
    except PathError as exc:
        raise ConditionError("path", str(exc)) from None
    operator = OPERATORS.get(condition.operator)
    if operator is None:
        if condition.operator == triggers_pb2.OPERATOR_UNSPECIFIED:
            raise ConditionError("operator", "required")
        raise ConditionError("operator", f"unknown operator {condition.operator}")
    value = condition.value if condition.HasField("value") else None
    return Condition(path, operator, _operand(path, operator, value))


def compile_conditions(
    conditions: Sequence[triggers_pb2.Condition], schema: Schema, field: str
) -> tuple[tuple[Condition, ...], list[FieldViolation]]:
    """Conditions compiled, with a violation for each invalid one (``{field}[2].path``)."""
    if len(conditions) > MAX_CONDITIONS:
        return (), [FieldViolation(field, f"at most {MAX_CONDITIONS} conditions are allowed")]
    compiled: list[Condition] = []
    violations: list[FieldViolation] = []
    for i, condition in enumerate(conditions):
        try:
            compiled.append(compile_condition(condition, schema))
        except ConditionError as exc:
            violations.append(FieldViolation(f"{field}[{i}].{exc.field}", exc.description))
    return tuple(compiled), violations


def _operand(path: Path, operator: Operator, value: struct_pb2.Value | None) -> Any:
    kind = path.kind
    value_kind = value.WhichOneof("kind") if value is not None else None
    if operator in (Operator.EXISTS, Operator.NOT_EXISTS):
        if value_kind not in (None, "null_value"):
            raise ConditionError("value", f"must be unset: {operator.name} takes no value")
        return None
    if value is None or value_kind is None:
        raise ConditionError("value", f"required with {operator.name}")
    if kind == FieldKind.MESSAGE:
        raise ConditionError(
            "operator",
            f"{path.text} is a message: only EXISTS and NOT_EXISTS test it; name one of its fields",
        )
    if operator == Operator.CONTAINS:
        return _contains_operand(path, value)
    if kind == FieldKind.LIST:
        raise ConditionError(
            "operator",
            f"{path.text} is a list: {operator.name} compares one value; use {path.text}[*] for any "
            "element, or CONTAINS",
        )
    if operator == Operator.IN:
        if value_kind != "list_value":
            raise ConditionError("value", "must be a list for IN")
        items = value.list_value.values
        if not 1 <= len(items) <= MAX_IN_VALUES:
            raise ConditionError("value", f"must hold 1 to {MAX_IN_VALUES} values")
        operands: set[Comparable] = set()
        for i, item in enumerate(items):
            try:
                operands.add(_equality_operand(kind, path.enum_type, item))
            except ConditionError as exc:
                raise ConditionError("value", f"[{i}] {exc.description}") from None
        return frozenset(operands)
    if operator in _ORDERINGS:
        return _ordering_operand(kind, operator, value)
    return _equality_operand(kind, path.enum_type, value)


def _scalar(value: struct_pb2.Value) -> bool | float | str:
    value_kind = value.WhichOneof("kind")
    if value_kind == "null_value":
        raise ConditionError("value", "must not be null; test a missing value with NOT_EXISTS")
    if value_kind in ("struct_value", "list_value"):
        raise ConditionError("value", "must be a string, a number or a boolean")
    scalar: bool | float | str = getattr(value, str(value_kind))
    if isinstance(scalar, float) and not math.isfinite(scalar):
        raise ConditionError("value", "must be a finite number")
    if isinstance(scalar, str) and len(scalar) > MAX_STRING_VALUE_CHARS:
        raise ConditionError("value", f"must be at most {MAX_STRING_VALUE_CHARS} characters")
    return scalar


def _equality_operand(
    kind: FieldKind, enum_type: EnumDescriptor | None, value: struct_pb2.Value
) -> Comparable:
    scalar = _scalar(value)
    if kind == FieldKind.JSON:
        found = _comparable(scalar, FieldKind.JSON, as_time=False)
        assert found is not None  # every finite scalar is comparable as JSON
        return found
    if kind in (FieldKind.NUMBER, FieldKind.MONEY):
        if isinstance(scalar, bool) or not isinstance(scalar, float):
            raise ConditionError("value", f"must be a number: the field is a {kind}")
        return ("n", Decimal(repr(scalar)))
    if kind == FieldKind.TIMESTAMP:
        nanos = timestamp_nanos(scalar) if isinstance(scalar, str) else None
        if nanos is None:
            raise ConditionError("value", "must be an RFC 3339 time, e.g. 2024-05-01T00:00:00Z")
        return ("t", nanos)
    if kind == FieldKind.BOOL:
        if not isinstance(scalar, bool):
            raise ConditionError("value", "must be true or false")
        return ("b", scalar)
    if kind == FieldKind.ENUM:
        assert enum_type is not None  # set for enum paths
        return ("s", _enum_name(enum_type, scalar))
    if not isinstance(scalar, str):
        raise ConditionError("value", "must be a string: the field is a string")
    return ("s", scalar)


def enum_prefix(enum_type: EnumDescriptor) -> str:
    """``BounceState`` → ``BOUNCE_STATE_``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum_type.name).upper() + "_"


def _enum_name(enum_type: EnumDescriptor, scalar: bool | float | str) -> str:
    names = [v.name for v in enum_type.values]
    if isinstance(scalar, str):
        prefix = enum_prefix(enum_type)
        for candidate in (scalar.upper(), prefix + scalar.upper()):
            if candidate in enum_type.values_by_name:
                return candidate
    short = [name.removeprefix(enum_prefix(enum_type)).lower() for name in names[1:]]
    raise ConditionError("value", f"must name a value of {enum_type.name}: one of {', '.join(short)}")


def _ordering_operand(kind: FieldKind, operator: Operator, value: struct_pb2.Value) -> Comparable:
    scalar = _scalar(value)
    if kind in (FieldKind.NUMBER, FieldKind.MONEY, FieldKind.JSON) and isinstance(scalar, float):
        return ("n", Decimal(repr(scalar)))
    if kind in (FieldKind.TIMESTAMP, FieldKind.JSON) and isinstance(scalar, str):
        nanos = timestamp_nanos(scalar)
        if nanos is not None:
            return ("t", nanos)
    if kind == FieldKind.TIMESTAMP:
        raise ConditionError("value", "must be an RFC 3339 time, e.g. 2024-05-01T00:00:00Z")
    if kind in (FieldKind.NUMBER, FieldKind.MONEY, FieldKind.JSON):
        what = "a number or an RFC 3339 time" if kind == FieldKind.JSON else "a number"
        raise ConditionError("value", f"must be {what} for {operator.name}")
    raise ConditionError("operator", f"{operator.name} compares numbers, amounts and times, not a {kind}")


def _contains_operand(path: Path, value: struct_pb2.Value) -> Comparable:
    if path.kind == FieldKind.LIST:
        assert path.element_kind is not None  # set on lists
        if path.element_kind == FieldKind.MESSAGE or path.element_kind == FieldKind.MONEY:
            raise ConditionError(
                "operator", f"{path.text} is a list of messages: test their fields, e.g. {path.text}[*].sku"
            )
        return _equality_operand(path.element_kind, path.enum_type, value)
    if path.kind == FieldKind.JSON:
        return _equality_operand(FieldKind.JSON, None, value)
    if path.kind == FieldKind.STRING:
        scalar = _scalar(value)
        if not isinstance(scalar, str):
            raise ConditionError("value", "must be a string for CONTAINS")
        return ("s", scalar)
    raise ConditionError("operator", f"CONTAINS tests a string or a list, not a {path.kind}")
