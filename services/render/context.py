"""The data a template sees: ``profile``, ``vars`` and the template's fallback values.

Profiles arrive as protobuf messages; templates want plain values. Money becomes
``{"amount": 59.9, "currency": "EUR"}`` (numbers, so Liquid's math filters work), timestamps
become datetimes (so the ``date`` filter works), enums their short lower-case names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from google.type import money_pb2


def message_to_context(message: Message) -> dict[str, Any]:
    """A message's set fields as template values (unset fields are absent, so fallbacks and
    ``default`` filters apply to them)."""
    return {field.name: _field_value(field, value) for field, value in message.ListFields()}


def _field_value(field: FieldDescriptor, value: Any) -> Any:
    if field.is_repeated:  # maps do not occur in the contracts yet
        return [_single_value(field, item) for item in value]
    return _single_value(field, value)


def _single_value(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None  # always set on enum fields
        return _enum_short_name(field.enum_type, value)
    if field.type != FieldDescriptor.TYPE_MESSAGE:
        return value
    if isinstance(value, money_pb2.Money):
        return {"amount": value.units + value.nanos / 1e9, "currency": value.currency_code}
    if isinstance(value, timestamp_pb2.Timestamp):
        return value.ToDatetime(tzinfo=UTC)
    if isinstance(value, struct_pb2.Struct):
        return struct_to_dict(value)
    return message_to_context(value)


def _enum_short_name(enum: EnumDescriptor, number: int) -> str:
    """``IDENTIFIER_KIND_EMAIL`` → ``email``: the enum's type prefix is noise in a template."""
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
    name = enum.values_by_number[number].name if number in enum.values_by_number else str(number)
    return name.removeprefix(prefix).lower()


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain JSON-like values."""
    result: dict[str, Any] = json_format.MessageToDict(struct)
    return result


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` laid over ``base``: nested mappings merge, anything else in ``override`` wins."""
    merged = dict(base)
    for key, value in override.items():
        current = merged.get(key)
        if isinstance(current, Mapping) and isinstance(value, Mapping):
            merged[key] = deep_merge(current, value)
        else:
            merged[key] = value
    return merged


def fallback_paths_used(fallback: Mapping[str, Any], live: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The leaf paths of ``fallback`` that ``live`` does not provide: where the render shows a
    fallback value instead of customer data."""
    used: list[str] = []
    for key, value in fallback.items():
        path = f"{prefix}{key}"
        live_value = live.get(key) if isinstance(live, Mapping) else None
        if isinstance(value, Mapping) and value:
            used += fallback_paths_used(
                value, live_value if isinstance(live_value, Mapping) else {}, f"{path}."
            )
        elif live_value in (None, "", [], {}):
            used.append(path)
    return used


def render_context(
    fallback: Mapping[str, Any], profile: Mapping[str, Any] | None, variables: Mapping[str, Any]
) -> dict[str, Any]:
    """What a template renders with: live values over the template's fallback values."""
    live: dict[str, Any] = {"vars": variables}
    if profile is not None:
        live["profile"] = profile
    return deep_merge(fallback, live)
