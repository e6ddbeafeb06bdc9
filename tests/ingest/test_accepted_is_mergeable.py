"""Acknowledged means mergeable, as a property: valid events of every type, with hostile values
put into random fields (NUL, NaN, infinities, int64 extremes, timestamps out of range, unknown
enum values, huge strings). Stamping and validating such an event never raises; and an event
validation accepts holds nothing a store cannot keep, and goes through everything the merger and
the profile API do with it in memory: the fold, the state's JSON (as stored), the API form of
the profile, and the event's JSON (as ExportProfile writes it)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

import orjson
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.envelope import stamp
from ingest.validation import ValidationRules, validate_event
from profile_service.codec import StoredProfile, to_proto
from profile_service.state import ProfileState, apply_event, from_json, replay, to_json
from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.identifiers import IdentifierKind
from sendtime_common.storable import unstorable_values
from tests.factories import NOW, event
from tests.ingest.test_validation import VALID_PAYLOADS

RULES = ValidationRules()
INT64 = st.integers(-(2**63), 2**63 - 1)
HOSTILE_TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "\x00", "ok\x00", "Europe", "x" * 3000, "ada@example.com", "EUR", "de-AT"]),
)
NUMBERS = st.one_of(st.floats(), st.sampled_from([float("nan"), float("inf"), -float("inf"), 2.0**63]))
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), NUMBERS, HOSTILE_TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(HOSTILE_TEXT, inner, max_size=3)),
    max_leaves=6,
)


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return HOSTILE_TEXT
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return NUMBERS
    if kind in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_ENUM):
        return st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-2, 30))
    edges = [2**63 - 1, -(2**63), 2**62, 10**15, 10**15 + 1, 10**6, 10**6 + 1, 0, -1]
    return st.one_of(st.sampled_from(edges), INT64, st.integers(-2, 2_000_000))


def _mutate(data: st.DataObject, message: Message, depth: int = 0) -> None:
    """Put a hostile value somewhere in ``message`` (a field of it, or of a message inside)."""
    if isinstance(message, struct_pb2.Struct):
        message.update({data.draw(st.sampled_from(["a", "name", "a\x00"])): data.draw(JSON)})
        return
    if isinstance(message, timestamp_pb2.Timestamp):
        message.seconds = data.draw(st.one_of(INT64, st.integers(-62_135_596_900, 253_402_300_900)))
        message.nanos = data.draw(st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-2, 10**9)))
        return
    fields = cast(list[FieldDescriptor], list(message.DESCRIPTOR.fields))
    field = data.draw(st.sampled_from(fields))
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if depth > 3:
            return
        if field.is_repeated:
            items = getattr(message, field.name)
            _mutate(data, items[0] if len(items) and data.draw(st.booleans()) else items.add(), depth + 1)
        else:
            _mutate(data, getattr(message, field.name), depth + 1)
    elif field.is_repeated:
        getattr(message, field.name).append(data.draw(_scalar(field)))
    else:
        setattr(message, field.name, data.draw(_scalar(field)))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_an_accepted_event_is_one_the_merger_can_store_and_merge(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(VALID_PAYLOADS)))
    sent = event(user_id="u-1", occurred_at=NOW - timedelta(minutes=1), **{name: VALID_PAYLOADS[name]})
    for _ in range(data.draw(st.integers(1, 4))):
        _mutate(data, data.draw(st.sampled_from([sent, getattr(sent, name), getattr(sent, name)])))
    stamped = stamp(sent, NOW)  # neither raises, whatever the event holds
    violations = validate_event(stamped, NOW, RULES)
    if violations:
        return
    assert unstorable_values(stamped) == []
    again = ingest_pb2.Event()  # the same event twice: amounts and quantities add up
    again.CopyFrom(stamped)
    again.event_id = f"{stamped.event_id}-again"
    for state in (apply_event(ProfileState(), stamped), replay([stamped, again])):
        stored = orjson.loads(orjson.dumps(to_json(state)))  # as the customers.state column holds it
        assert from_json(stored) == state
        to_proto(StoredProfile("c-1", 1, ((IdentifierKind.USER_ID, "u-1"),), state, NOW, NOW))
    json_format.MessageToDict(stamped)
