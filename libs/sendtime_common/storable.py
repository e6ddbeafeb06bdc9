"""Values an event may carry only if every store after ingest can keep them.

An event ingest acknowledges must be one the profile merger can store and merge, and one the
other consumers of the event log (render's catalog) can store too. Three kinds of value in a
valid protobuf message cannot be:

- **U+0000 in a string.** PostgreSQL's ``text`` refuses it (``invalid byte sequence for encoding
  "UTF8": 0x00``), and so does ``jsonb``; identifiers, skus and names are ``text`` columns.
- **NaN and ±Infinity in a double** (``google.protobuf.Value.number_value``: a trait or a
  property). JSON has neither: ``json_format`` refuses to turn them into JSON, and the profile
  state, the API's JSON form and ``jsonb`` are JSON.
- **A timestamp outside ``google.protobuf.Timestamp``'s range** (0001-01-01 to 9999-12-31, nanos
  0 to 999,999,999). Reading one as a time raises, wherever that happens first.

(Protobuf strings cannot hold unpaired surrogates: the Python runtime refuses to encode them, and
one on the wire is invalid UTF-8, which fails to parse before any handler sees it.)

``unstorable_values`` walks a whole message, Struct values included, and names each such value
by its field path. Pure functions; ingest calls it for every event (services/ingest/validation.py)
and the merger for an event it could not merge (to name the value in the dead letter).
``json_carriable`` copies a message without the two kinds JSON has no form for either (a dead
letter keeps its event as sent, and the HTTP face still lists it).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from sendtime_common.errors import FieldViolation

NUL = "\x00"
TIMESTAMP_MIN_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z
TIMESTAMP_MAX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z
NANOS_PER_SECOND = 1_000_000_000

NUL_DESCRIPTION = "must not contain U+0000 (NUL): PostgreSQL cannot store it"
NOT_FINITE_DESCRIPTION = "must be a finite number: JSON has no NaN or Infinity"
TIMESTAMP_DESCRIPTION = "must be a valid timestamp: 0001-01-01 to 9999-12-31, nanos 0 to 999999999"

_Fail = Callable[[str, str], None]

_STRING = FieldDescriptor.TYPE_STRING
_FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)
_MESSAGE = FieldDescriptor.TYPE_MESSAGE
_STRUCT = struct_pb2.Struct.DESCRIPTOR.full_name
_VALUE = struct_pb2.Value.DESCRIPTOR.full_name
_LIST_VALUE = struct_pb2.ListValue.DESCRIPTOR.full_name
_TIMESTAMP = timestamp_pb2.Timestamp.DESCRIPTOR.full_name


def valid_timestamp(ts: timestamp_pb2.Timestamp) -> bool:
    """Whether ``ts`` is in ``google.protobuf.Timestamp``'s range (so it converts to a time)."""
    return TIMESTAMP_MIN_SECONDS <= ts.seconds <= TIMESTAMP_MAX_SECONDS and 0 <= ts.nanos < NANOS_PER_SECOND


def unstorable_values(
    message: Message, prefix: str = "", *, serialized: bytes | None = None
) -> list[FieldViolation]:
    """One violation per value in ``message`` that the stores cannot keep (see the module),
    named by its path (``customer.user_id``, ``identify.traits.score``, ``lines[2].name``).

    ``serialized``: the message's wire form, when the caller has it, to skip what it rules out.
    A NUL in a string puts a 0x00 byte there. A NaN or an infinity ends in the bytes
    ``[F0-FF][7F|FF]`` (a double is little-endian, its exponent all ones), which valid UTF-8
    never holds either. Without them only timestamps are looked at: ~2 µs for a typical event
    instead of 10-15 µs for the whole walk.
    """
    violations: list[FieldViolation] = []

    def fail(field: str, description: str) -> None:
        violations.append(FieldViolation(field, description))

    if serialized is None:
        wanted = _WANTED[True, True]
    else:
        wanted = _WANTED[b"\x00" in serialized, _NON_FINITE_TAIL.search(serialized) is not None]
    _walk(message, prefix, fail, wanted)
    return violations


# The last two bytes of every non-finite double (and, rarely, of some varints: then the walk
# looks at the doubles and finds them finite).
_NON_FINITE_TAIL = re.compile(b"[\xf0-\xff][\x7f\xff]")


@dataclass(frozen=True, slots=True)
class _Wanted:
    """What can be in the message: strings with NUL, non-finite doubles (timestamps always)."""

    strings: bool
    floats: bool


_WANTED = {(s, f): _Wanted(strings=s, floats=f) for s in (False, True) for f in (False, True)}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@dataclass(frozen=True, slots=True)
class _Plan:
    """Which fields of a message type can hold something wanted: those outside any oneof, and
    per oneof (found with one WhichOneof) its members that can."""

    timestamps: tuple[str, ...]  # singular Timestamp fields: checked in place
    fields: tuple[FieldDescriptor, ...]
    oneofs: tuple[tuple[str, dict[str, FieldDescriptor]], ...]


@functools.cache
def _plan(descriptor: Descriptor, wanted: _Wanted) -> _Plan:
    relevant = [f for f in descriptor.fields if _can_hold(f, wanted, frozenset({descriptor}))]
    # Proto3 optional fields sit in synthetic oneofs of one member: walked as plain fields.
    oneofs = [o for o in descriptor.oneofs if len(o.fields) > 1]
    in_oneof = {f.name for o in oneofs for f in o.fields}
    plain = [f for f in relevant if f.name not in in_oneof]

    def timestamp(f: FieldDescriptor) -> bool:
        return not f.is_repeated and f.message_type is not None and f.message_type.full_name == _TIMESTAMP

    return _Plan(
        timestamps=tuple(f.name for f in plain if timestamp(f)),
        fields=tuple(f for f in plain if not timestamp(f)),
        oneofs=tuple(
            (o.name, members) for o in oneofs if (members := {f.name: f for f in o.fields if f in relevant})
        ),
    )


def _can_hold(field: FieldDescriptor, wanted: _Wanted, seen: frozenset[Descriptor]) -> bool:
    if field.type == _STRING:
        return wanted.strings
    if field.type in _FLOATS:
        return wanted.floats
    if field.type != _MESSAGE:
        return False
    message = field.message_type
    assert message is not None  # a message field has its message type
    if message.full_name == _TIMESTAMP:
        return True
    if message.full_name in (_STRUCT, _VALUE, _LIST_VALUE):
        return wanted.strings or wanted.floats
    if message in seen:
        return True  # a recursive type: assume so
    return any(_can_hold(f, wanted, seen | {message}) for f in message.fields)


def _walk(message: Message, prefix: str, fail: _Fail, wanted: _Wanted) -> None:
    descriptor = message.DESCRIPTOR
    name = descriptor.full_name
    if name == _STRUCT:
        _struct(message, prefix, fail)  # type: ignore[arg-type]
        return
    if name == _VALUE:
        _value(message, prefix, fail)  # type: ignore[arg-type]
        return
    if name == _LIST_VALUE:
        _list(message, prefix, fail)  # type: ignore[arg-type]
        return
    if name == _TIMESTAMP:
        if not valid_timestamp(message):  # type: ignore[arg-type]
            fail(prefix, TIMESTAMP_DESCRIPTION)
        return
    plan = _plan(descriptor, wanted)
    for field_name in plan.timestamps:  # an unset one reads as the epoch: valid
        if not valid_timestamp(getattr(message, field_name)):
            fail(_join(prefix, field_name), TIMESTAMP_DESCRIPTION)
    for field in plan.fields:
        _field(message, field, prefix, fail, wanted)
    for oneof, members in plan.oneofs:
        member = members.get(message.WhichOneof(oneof) or "")
        if member is not None:
            _field(message, member, prefix, fail, wanted)


def _field(message: Message, field: FieldDescriptor, prefix: str, fail: _Fail, wanted: _Wanted) -> None:
    path = _join(prefix, field.name)
    if field.is_repeated:
        values = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            _map(field, values, path, fail, wanted)
        else:
            for i, item in enumerate(values):
                _item(field, item, f"{path}[{i}]", fail, wanted)
    elif field.type != _MESSAGE or message.HasField(field.name):
        _item(field, getattr(message, field.name), path, fail, wanted)


def _item(field: FieldDescriptor, value: object, path: str, fail: _Fail, wanted: _Wanted) -> None:
    if field.type == _STRING:
        if NUL in value:  # type: ignore[operator]
            fail(path, NUL_DESCRIPTION)
    elif field.type == _MESSAGE:
        _walk(value, path, fail, wanted)  # type: ignore[arg-type]
    elif field.type in _FLOATS and not math.isfinite(value):  # type: ignore[arg-type]
        fail(path, NOT_FINITE_DESCRIPTION)


def _map(field: FieldDescriptor, entries: object, path: str, fail: _Fail, wanted: _Wanted) -> None:
    entry = field.message_type
    assert entry is not None  # a map field's entries are messages
    key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
    for key, value in entries.items():  # type: ignore[attr-defined]
        if key_field.type == _STRING and NUL in key:
            fail(path, f"keys {NUL_DESCRIPTION}")
        _item(value_field, value, f"{path}[{key!r}]", fail, wanted)


def _struct(struct: struct_pb2.Struct, prefix: str, fail: _Fail) -> None:
    for key, value in struct.fields.items():
        if NUL in key:
            fail(prefix, f"names {NUL_DESCRIPTION}")
            continue
        _value(value, _join(prefix, key), fail)


def _value(value: struct_pb2.Value, path: str, fail: _Fail) -> None:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        if NUL in value.string_value:
            fail(path, NUL_DESCRIPTION)
    elif kind == "number_value":
        if not math.isfinite(value.number_value):
            fail(path, NOT_FINITE_DESCRIPTION)
    elif kind == "struct_value":
        _struct(value.struct_value, path, fail)
    elif kind == "list_value":
        _list(value.list_value, path, fail)


def _list(values: struct_pb2.ListValue, path: str, fail: _Fail) -> None:
    for i, item in enumerate(values.values):
        _value(item, f"{path}[{i}]", fail)


def json_carriable(message: Message) -> Message:
    """A copy of ``message`` that proto3 JSON can carry: without the timestamps outside
    Timestamp's range (left unset) and with null for each NaN or infinity in a Struct value
    (JSON numbers have neither). A dead letter keeps an event as it was sent, such values
    included, and the HTTP face still shows it; the copy's other values are untouched."""
    carriable = type(message)()
    carriable.CopyFrom(message)
    _make_carriable(carriable)
    return carriable


def _make_carriable(message: Message) -> None:
    if message.DESCRIPTOR.full_name == _VALUE:
        value: struct_pb2.Value = message  # type: ignore[assignment]
        if value.WhichOneof("kind") == "number_value" and not math.isfinite(value.number_value):
            value.null_value = struct_pb2.NULL_VALUE
            return
    for field, held in message.ListFields():
        if field.type != _MESSAGE:
            continue
        assert field.message_type is not None  # a message field has its message type
        if field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            items = list(held.values()) if value_field.type == _MESSAGE else []
        elif field.is_repeated:
            items = list(held)
        elif field.message_type.full_name == _TIMESTAMP and not valid_timestamp(held):
            message.ClearField(field.name)
            continue
        else:
            items = [held]
        for item in items:
            if item.DESCRIPTOR.full_name == _TIMESTAMP:
                if not valid_timestamp(item):
                    item.Clear()  # in a list or map there is no unset: the epoch stands in
            else:
                _make_carriable(item)
