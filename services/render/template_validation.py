"""Checks on stored templates, before they are stored: pure, no I/O.

A template is checked when it is saved rather than when it is sent, so a typo costs an editor a
field violation instead of costing a campaign a broken message. Syntax errors and unknown filters
come from ``render.templates.TemplateCompiler`` (the compiler sends use); on top of that, every
variable the template reads must be one the render context can have:

- ``profile`` (a ``sendtime.profile.v1.Profile``; its second segment must be one of the message's
  fields, anything under ``profile.traits`` goes), ``vars`` (the request's campaign variables) and
  ``recommendations``;
- roots (and ``profile`` fields) that the template's own ``fallback`` values define.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from google.protobuf import duration_pb2, struct_pb2

from render.context import struct_to_dict
from render.templates import PARTS, InvalidTemplate, TemplateCompiler
from sendtime.ingest.v1 import ingest_pb2
from sendtime.profile.v1 import profile_pb2
from sendtime.render.v1 import render_pb2
from sendtime_common.errors import FieldViolation

NAME_PREFIX = "templates/"
TEMPLATE_ID = re.compile(r"[a-z][a-z0-9-]{0,62}")
MAX_DISPLAY_NAME_CHARS = 200
CONTEXT_ROOTS = ("profile", "vars", "recommendations")
PROFILE_FIELDS = frozenset(profile_pb2.Profile.DESCRIPTOR.fields_by_name)
MAX_DATA_AGE_S = 24 * 60 * 60
DATA_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*")


class InvalidName(ValueError):
    """Not a ``templates/{template_id}`` name."""


def template_name(template_id: str) -> str:
    return f"{NAME_PREFIX}{template_id}"


def parse_name(name: str) -> str:
    """The id in ``templates/{template_id}``.

    Raises:
        InvalidName: the name has another shape or an invalid id.
    """
    template_id = name.removeprefix(NAME_PREFIX)
    if template_id == name or not TEMPLATE_ID.fullmatch(template_id):
        raise InvalidName("must look like templates/abandoned-cart (an id of 1 to 63 of a-z, 0-9 and -)")
    return template_id


def check_template_id(template_id: str, field: str = "template_id") -> list[FieldViolation]:
    if not template_id:
        return [FieldViolation(field, "required")]
    if not TEMPLATE_ID.fullmatch(template_id):
        return [
            FieldViolation(field, "must be 1 to 63 lower-case letters, digits and -, starting with a letter")
        ]
    return []


def check_display_name(display_name: str, field: str = "display_name") -> list[FieldViolation]:
    if len(display_name) > MAX_DISPLAY_NAME_CHARS:
        return [FieldViolation(field, f"must be at most {MAX_DISPLAY_NAME_CHARS} characters")]
    return []


def check_template(
    content: render_pb2.Template, compiler: TemplateCompiler, field: str = "content"
) -> list[FieldViolation]:
    """Every reason ``content`` cannot be stored (or previewed), in field order; [] when it can.

    ``field`` is where the content sits in the request; violations name ``{field}.html`` etc.
    """
    violations: list[FieldViolation] = []
    if not content.subject.strip():
        violations.append(FieldViolation(f"{field}.subject", "required"))
    known = _KnownNames.of(content.fallback)
    violations.extend(_check_parts(content, compiler, known, field))
    fallback = struct_to_dict(content.fallback)
    for i, path in enumerate(content.required_data):
        problem = _check_data_path(path, known) or _defined_by_fallback(path, fallback)
        if problem:
            violations.append(FieldViolation(f"{field}.required_data[{i}]", problem))
    if content.HasField("max_data_age"):
        problem = _check_max_data_age(content.max_data_age)
        if problem:
            violations.append(FieldViolation(f"{field}.max_data_age", problem))
    if content.channel not in ingest_pb2.Channel.values():
        violations.append(FieldViolation(f"{field}.channel", f"unknown channel {content.channel}"))
    return violations


class _KnownNames:
    """The top-level names (and ``profile`` fields) a template may read."""

    def __init__(self, roots: Iterable[str], profile_fields: Iterable[str]) -> None:
        self.roots = frozenset(roots)
        self.profile_fields = frozenset(profile_fields)

    @classmethod
    def of(cls, fallback: struct_pb2.Struct) -> _KnownNames:
        profile = fallback.fields.get("profile")
        fallback_profile_fields = (
            profile.struct_value.fields.keys()
            if profile is not None and profile.WhichOneof("kind") == "struct_value"
            else ()
        )
        return cls([*CONTEXT_ROOTS, *fallback.fields.keys()], [*PROFILE_FIELDS, *fallback_profile_fields])

    def problem(self, segments: Sequence[Any]) -> str | None:
        """Why a variable with these segments cannot be in the context; None if it can."""
        root = segments[0]
        if not isinstance(root, str):  # ``[vars.key].x``: named at render time, cannot be checked
            return None
        if root not in self.roots:
            return _with_suggestion("the render context has no", root, self.roots)
        if root == "profile" and len(segments) > 1 and isinstance(segments[1], str):
            if segments[1] not in self.profile_fields:
                return _with_suggestion("the profile has no field", segments[1], self.profile_fields)
        return None


def _with_suggestion(prefix: str, name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    if close:
        return f"{prefix} '{name}'; did you mean '{close[0]}'?"
    return f"{prefix} '{name}'"


def _check_parts(
    content: render_pb2.Template, compiler: TemplateCompiler, known: _KnownNames, field: str
) -> list[FieldViolation]:
    sources = {"subject": content.subject, "html": content.html, "text": content.text}
    violations: list[FieldViolation] = []
    compiled: dict[str, Any] = {}
    try:
        whole = compiler.compile(content.subject, content.html, content.text)
        compiled = {part: getattr(whole, part) for part in PARTS}
    except InvalidTemplate as exc:
        violations.extend(FieldViolation(f"{field}.{e.part}", e.detail) for e in exc.errors)
        broken = {e.part for e in exc.errors}
        for part in PARTS:  # the other parts are still checked, each alone in its own slot
            if part not in broken and sources[part]:
                alone = compiler.compile(*(sources[p] if p == part else "" for p in PARTS))
                compiled[part] = getattr(alone, part)
    for part, template in compiled.items():
        violations.extend(
            FieldViolation(f"{field}.{part}", description)
            for description in _unknown_variables(template, sources[part], known)
        )
    order = {f"{field}.{p}": i for i, p in enumerate(PARTS)}
    return sorted(violations, key=lambda v: order[v.field])  # stable: positions stay in order


def _unknown_variables(template: Any, source: str, known: _KnownNames) -> list[str]:
    """One description per distinct unknown variable, at its first use, in source order.

    (``template`` is a ``liquid.BoundTemplate``; python-liquid ships no type information.)
    """
    found: list[str] = []
    seen: set[str] = set()
    variables = [v for uses in template.analyze().globals.values() for v in uses]
    for variable in sorted(variables, key=lambda v: v.span.index):
        path = str(variable)
        if path in seen:
            continue
        seen.add(path)
        problem = known.problem(variable.segments)
        if problem is None:
            continue
        line, column = variable.span.line_col(source)
        detail = f"line {line}, column {column + 1}: unknown variable '{path}'"
        found.append(f"{detail}: {problem}")
    return found


def _check_data_path(path: str, known: _KnownNames) -> str | None:
    if not DATA_PATH.fullmatch(path):
        return "must be a dotted path into the render context, e.g. profile.cart.items"
    problem = known.problem(path.split("."))
    if problem is None:
        return None
    return f"unknown variable '{path}': {problem}"


def _defined_by_fallback(path: str, fallback: Mapping[str, Any]) -> str | None:
    """Required data is checked in the render context, fallbacks included: a fallback value for
    it would let a message go out with made-up data (a cart the customer does not have)."""
    value: Any = fallback
    for key in path.split("."):
        value = value.get(key) if isinstance(value, Mapping) else None
    if value in (None, "", [], {}):
        return None
    return "the fallback gives it a value, so it is never missing; remove one of the two"


def _check_max_data_age(age: duration_pb2.Duration) -> str | None:
    if abs(age.nanos) >= 1_000_000_000 or (age.seconds > 0 > age.nanos) or (age.seconds < 0 < age.nanos):
        return "is not a valid duration"
    if age.seconds < 0 or age.nanos < 0:
        return "must not be negative"
    if age.seconds > MAX_DATA_AGE_S or (age.seconds == MAX_DATA_AGE_S and age.nanos > 0):
        return f"must be at most 1 day ({MAX_DATA_AGE_S}s)"
    return None
