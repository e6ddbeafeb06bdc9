"""Fuzzing the event parsers: every event type's validation, and the import file formats.

Events are built from the contract itself (every field of every event type, of its declared
type, with extreme values); import lines and CSV rows are arbitrary text. Validation answers
with field violations, the importers with an event or a rejection, never another exception.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ingest.validation import ValidationRules, validate_event
from sendtime.ingest.v1 import ingest_pb2
from sendtime_cli.formats import BadFile, Format, Rejected, layout_for, parse_csv_record, parse_jsonl_line
from tests.factories import NOW
from tests.fuzz.conftest import fuzzing

INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
TEXT = st.text(max_size=40) | st.sampled_from(["", " ", "\x00", "\ud800", "EUR", "https://x", "a" * 3000])
JSON_LIKE: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=10,
)


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type in INT_RANGES:
        low, high = INT_RANGES[field.type]
        return st.integers(low, high)
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=32 if field.type == FieldDescriptor.TYPE_FLOAT else 64)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        return st.integers(-1, len(field.enum_type.values) + 1)  # unknown values too
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=20)
    return TEXT


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor``'s type with a random subset of fields set."""
    message_class: Any = _message_class(descriptor)
    if descriptor.full_name == "google.protobuf.Struct":
        return st.dictionaries(TEXT, JSON_LIKE, max_size=4).map(_struct)
    if descriptor.full_name == "google.protobuf.Timestamp":
        seconds = st.integers(-62135596800, 253402300799)  # what a Timestamp may hold
        return st.builds(lambda s, n: message_class(seconds=s, nanos=n), seconds, st.integers(0, 999_999_999))

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message: Message = message_class()
        for field in descriptor.fields:
            if not draw(st.booleans()) or (depth > 3 and field.type == FieldDescriptor.TYPE_MESSAGE):
                continue
            if field.containing_oneof is not None and message.WhichOneof(field.containing_oneof.name):
                continue
            try:
                _set(draw, message, field, depth)
            except UnicodeEncodeError:  # protobuf itself refuses an unpaired surrogate
                continue
        return message

    return build()


def _set(draw: st.DrawFn, message: Any, field: FieldDescriptor, depth: int) -> None:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        inner = field.message_type
        assert inner is not None
        if field.is_repeated:
            if not inner.GetOptions().map_entry:
                getattr(message, field.name).extend(draw(st.lists(messages(inner, depth + 1), max_size=3)))
        else:
            getattr(message, field.name).CopyFrom(draw(messages(inner, depth + 1)))
    elif field.is_repeated:
        getattr(message, field.name).extend(draw(st.lists(_scalar(field), max_size=3)))
    else:
        setattr(message, field.name, draw(_scalar(field)))


def _message_class(descriptor: Descriptor) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    try:
        struct.update(values)
    except (ValueError, TypeError):  # a Struct cannot hold some values (NaN keys are fine)
        return struct_pb2.Struct()
    return struct


EVENTS: st.SearchStrategy[ingest_pb2.Event] = messages(ingest_pb2.Event.DESCRIPTOR)  # type: ignore[assignment]


def _with_time_zone(zone: str) -> ingest_pb2.Event:
    event = ingest_pb2.Event()
    event.context.timezone = zone
    return event


@settings(fuzzing())
@given(EVENTS)
@example(_with_time_zone("a" * 300))  # found: zoneinfo raised OSError ("File name too long")
@example(_with_time_zone("Europe"))  # IsADirectoryError
def test_validating_any_event_gives_field_violations(event: ingest_pb2.Event) -> None:
    for violation in validate_event(event, NOW, ValidationRules()):
        assert violation.field and violation.description


@settings(fuzzing())
@given(st.text(max_size=300) | EVENTS.map(lambda e: _json(e)))
@example('{"customer": {"userId": "u"}, "identify": {"traits": {"a": 1e999}}}')
@example("[" * 50_000)
def test_any_jsonl_line_is_an_event_or_a_rejection(line: str) -> None:
    mapped = parse_jsonl_line(line)
    if isinstance(mapped, Rejected):
        assert all(reason.description for reason in mapped.reasons)
    else:
        for violation in validate_event(mapped, NOW, ValidationRules()):
            assert violation.field


def _json(event: ingest_pb2.Event) -> str:
    from google.protobuf import json_format

    try:
        return json_format.MessageToJson(event)
    except (ValueError, TypeError, json_format.Error):  # NaN and the like have no JSON form
        return "{}"


@settings(fuzzing())
@given(
    header=st.lists(
        st.sampled_from(["user_id", "email", "occurred_at", "first_name", "vip", ""]) | TEXT, max_size=5
    ),
    row=st.text(max_size=200),
    typed=st.booleans(),
    file_format=st.sampled_from([Format.TRAITS_CSV, Format.CATALOG_CSV]),
)
def test_any_csv_row_is_an_event_or_a_rejection(
    header: list[str], row: str, typed: bool, file_format: Format
) -> None:
    try:
        layout = (
            layout_for(file_format, header, typed=typed)
            if file_format is Format.TRAITS_CSV
            else layout_for(file_format, header, typed=False)
        )
    except BadFile as exc:
        assert str(exc)
        return
    mapped = layout.map_row(parse_csv_record(row), datetime(2026, 1, 1, tzinfo=UTC))
    if isinstance(mapped, Rejected):
        assert all(reason.description for reason in mapped.reasons)
