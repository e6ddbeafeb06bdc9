"""The HTTP routes the contracts declare (``google.api.http``, AIP-127), and how a request's
path, query string and body become the RPC's request message.

Pure: read from service descriptors, shared by the transcoder (sendtime_common.http_gateway)
and the OpenAPI generator (sendtime_common.openapi), so that the document and the server can
never disagree.

The rules, those of Google's HTTP transcoding (and of grpc-gateway and Envoy):

- A path template's variable binds a request field: ``/v1/{name=profiles/*}`` matches
  ``/v1/profiles/email:ada@example.com`` and sets ``name`` to ``profiles/email:ada@example.com``.
  ``*`` is one path segment; a segment is percent-decoded, so ``%2F`` in it stands for ``/``.
  A custom verb (``/v1/{template_name=templates/*}:render``) follows the last segment.
- ``body: "*"``: the JSON body is the request message, less the fields the path binds.
  No body: the fields the path does not bind come from the query string, by their JSON name
  (``readMask``) or proto name (``read_mask``); a nested field by its dotted path
  (``customer.kind``); a repeated one by repeating the parameter.
- JSON is protobuf's canonical mapping (int64 as strings, enums by name, Timestamp as
  RFC 3339, FieldMask as ``"traits,cart"``).
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor

from sendtime_common.errors import FieldViolation

HTTP_METHODS = ("get", "put", "post", "delete", "patch")

# Messages whose canonical JSON is a string (or a number): a query parameter can carry them.
_STRING_JSON_MESSAGES = frozenset(
    {
        "google.protobuf.FieldMask",
        "google.protobuf.Timestamp",
        "google.protobuf.Duration",
        "google.protobuf.StringValue",
        "google.protobuf.BytesValue",
        "google.protobuf.BoolValue",
        "google.protobuf.Int32Value",
        "google.protobuf.Int64Value",
        "google.protobuf.UInt32Value",
        "google.protobuf.UInt64Value",
        "google.protobuf.FloatValue",
        "google.protobuf.DoubleValue",
    }
)
_MAX_QUERY_DEPTH = 3
# googleapis' stubs type the extension as a plain FieldDescriptor, which Extensions[] refuses.
_HTTP_EXTENSION: Any = annotations_pb2.http  # customer.kind is 2


class RouteError(ValueError):
    """A path template the transcoder does not support (a contract bug: found at start)."""


@dataclass(frozen=True, slots=True)
class PathVariable:
    """``{name=profiles/*}``: the field ``name``, bound to ``profiles/`` and one segment."""

    field: str
    literal_prefix: str  # "profiles/" (the segments before the *), or "" for a bare {id}


@dataclass(frozen=True, slots=True)
class QueryParameter:
    """A request field the query string may set: ``json_path`` (``customer.kind``) names it."""

    json_path: str
    proto_path: str
    field: FieldDescriptor

    @property
    def repeated(self) -> bool:
        return bool(self.field.is_repeated)


@dataclass(frozen=True, slots=True)
class HttpRoute:
    """One HTTP binding of one RPC."""

    http_method: str  # upper case: GET, POST, ...
    template: str  # as in the contract: /v1/{name=profiles/*}
    method: MethodDescriptor
    body: str  # "*" (the whole request), or "" (none: the query string)
    variables: tuple[PathVariable, ...]
    pattern: re.Pattern[str]

    @property
    def grpc_method(self) -> str:
        """``/sendtime.profile.v1.ProfileService/GetProfile``."""
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def openapi_path(self) -> str:
        """The template with each variable's literal segments spelled out, so that a client
        fills in an id, not a name with a slash: ``/v1/profiles/{name}``."""
        path = self.template
        for variable in self.variables:
            path = re.sub(
                r"\{" + re.escape(variable.field) + r"(=[^}]*)?\}",
                variable.literal_prefix + "{" + variable.field + "}",
                path,
            )
        return path

    def match(self, raw_path: str) -> dict[str, str] | None:
        """The path variables' values for ``raw_path`` (still percent-encoded), or None when it
        is not this route's path."""
        found = self.pattern.fullmatch(raw_path)
        if found is None:
            return None
        values: dict[str, str] = {}
        for i, variable in enumerate(self.variables):
            segment = urllib.parse.unquote(found.group(f"v{i}"), errors="strict")
            values[variable.field] = variable.literal_prefix + segment
        return values

    def query_parameters(self) -> list[QueryParameter]:
        """The fields the query string may set (none when the body is the whole request)."""
        if self.body == "*":
            return []
        bound = {v.field for v in self.variables}
        return [p for p in _query_parameters(self.method.input_type, "", "", 0) if p.proto_path not in bound]


def compile_template(template: str) -> tuple[tuple[PathVariable, ...], re.Pattern[str]]:
    """The variables of a path template and a pattern matching percent-encoded paths.

    Raises:
        RouteError: a template this transcoder does not support (``**``, nested variables).
    """
    if not template.startswith("/"):
        raise RouteError(f"{template}: must start with /")
    last_segment_start = max(template.rfind("}"), template.rfind("/")) + 1
    last_segment, colon, verb = template[last_segment_start:].partition(":")
    path = template[:last_segment_start] + last_segment
    variables: list[PathVariable] = []
    regex = ""
    for piece in re.split(r"(\{[^}]*\})", path):
        if not piece.startswith("{"):
            if "{" in piece or "}" in piece or "*" in piece:
                raise RouteError(f"{template}: unsupported segment {piece!r}")
            regex += re.escape(piece)
            continue
        if not regex.endswith("/"):
            raise RouteError(f"{template}: a variable must be a whole path segment")
        field, _, bound = piece[1:-1].partition("=")
        bound = bound or "*"
        *literals, last = bound.split("/")
        if last != "*" or any(not s or "*" in s for s in literals):
            raise RouteError(f"{template}: only {{field}} and {{field=literal/.../*}} are supported")
        prefix = "".join(f"{s}/" for s in literals)
        regex += re.escape(prefix) + f"(?P<v{len(variables)}>[^/]+)"
        variables.append(PathVariable(field, prefix))
    if colon:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", verb):
            raise RouteError(f"{template}: unsupported custom verb {verb!r}")
        regex += re.escape(":" + verb)
    return tuple(variables), re.compile(regex)


def routes_of(service_names: Iterable[str]) -> list[HttpRoute]:
    """Every HTTP binding of the named services' RPCs, in contract order.

    Raises:
        RouteError: a binding the transcoder does not support.
    """
    pool = descriptor_pool.Default()
    routes: list[HttpRoute] = []
    for service_name in service_names:
        for method in pool.FindServiceByName(service_name).methods:
            options = method.GetOptions()
            if not options.HasExtension(_HTTP_EXTENSION):
                continue
            rule: http_pb2.HttpRule = options.Extensions[_HTTP_EXTENSION]
            for binding in [rule, *rule.additional_bindings]:
                routes.append(_route(method, binding))
    return routes


def _route(method: MethodDescriptor, rule: http_pb2.HttpRule) -> HttpRoute:
    kind = rule.WhichOneof("pattern")
    if kind not in HTTP_METHODS:
        raise RouteError(f"{method.full_name}: unsupported HTTP binding {kind}")
    if method.client_streaming or method.server_streaming:
        raise RouteError(f"{method.full_name}: a streaming RPC has no HTTP binding here")
    if rule.body not in ("", "*"):
        raise RouteError(f'{method.full_name}: body must be "*" or absent')
    template = getattr(rule, kind)
    variables, pattern = compile_template(template)
    for variable in variables:
        field = method.input_type.fields_by_name.get(variable.field)
        if field is None or field.type != FieldDescriptor.TYPE_STRING:
            raise RouteError(f"{method.full_name}: {variable.field} is not a string field of the request")
    return HttpRoute(kind.upper(), template, method, rule.body, variables, pattern)


def _query_parameters(
    message: Descriptor, json_prefix: str, proto_prefix: str, depth: int
) -> list[QueryParameter]:
    parameters: list[QueryParameter] = []
    for field in message.fields:
        json_path, proto_path = json_prefix + field.json_name, proto_prefix + field.name
        nested_type = field.message_type
        if nested_type is None or nested_type.full_name in _STRING_JSON_MESSAGES:
            parameters.append(QueryParameter(json_path, proto_path, field))
        elif (
            not field.is_repeated
            and not nested_type.GetOptions().map_entry
            and nested_type.full_name.startswith("sendtime.")
            and depth + 1 < _MAX_QUERY_DEPTH
        ):
            nested = _query_parameters(nested_type, json_path + ".", proto_path + ".", depth + 1)
            parameters.extend(nested)
    return parameters


def query_index(route: HttpRoute) -> dict[str, QueryParameter]:
    """The route's query parameters by JSON and by proto path: what ``query_to_json`` looks a
    parameter up in (a server computes it once per route)."""
    by_name: dict[str, QueryParameter] = {}
    for parameter in route.query_parameters():
        by_name[parameter.json_path] = parameter
        by_name[parameter.proto_path] = parameter
    return by_name


def query_to_json(
    route: HttpRoute,
    query: Iterable[tuple[str, str]],
    index: Mapping[str, QueryParameter] | None = None,
) -> tuple[dict[str, Any], list[FieldViolation]]:
    """The query string as a JSON object for the request message (canonical JSON), and a
    violation per parameter the route does not take. ``index``: the route's ``query_index``,
    when the caller keeps it."""
    by_name = query_index(route) if index is None else index
    values: dict[str, Any] = {}
    violations: list[FieldViolation] = []
    seen: set[str] = set()
    for name, value in query:
        found = by_name.get(name)
        if found is None:
            violations.append(FieldViolation(name, "is not a parameter of this route"))
            continue
        parameter = found
        if parameter.json_path in seen and not parameter.repeated:
            violations.append(FieldViolation(name, "is given more than once"))
            continue
        seen.add(parameter.json_path)
        *parents, leaf = parameter.json_path.split(".")
        target = values
        for parent in parents:
            target = target.setdefault(parent, {})
        converted = _scalar(parameter.field, value)
        if parameter.repeated:
            target.setdefault(leaf, []).append(converted)
        else:
            target[leaf] = converted
    return values, violations


def _scalar(field: FieldDescriptor, value: str) -> Any:
    """A query value as the JSON value json_format expects for ``field`` (it takes numbers as
    strings, and bools only as booleans)."""
    if field.type == FieldDescriptor.TYPE_BOOL:
        return {"true": True, "false": False}.get(value, value)
    if field.message_type is not None and field.message_type.full_name == "google.protobuf.BoolValue":
        return {"true": True, "false": False}.get(value, value)
    return value


def set_path_values(body: Mapping[str, Any], values: Mapping[str, str], route: HttpRoute) -> dict[str, Any]:
    """``body`` with the path's values in place of any the body gave for the same fields."""
    merged = dict(body)
    for field_name, value in values.items():
        field = route.method.input_type.fields_by_name[field_name]
        merged.pop(field.name, None)
        merged[field.json_name] = value
    return merged
