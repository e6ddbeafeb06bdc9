"""The OpenAPI 3.1 document of the contracts' HTTP routes, built from the protobuf descriptors,
never written by hand: the paths are those of sendtime_common.http_routes (what the transcoder
serves), the schemas those of protobuf's canonical JSON mapping (google.protobuf.json_format).

Mapping choices (docs/openapi.md says the same for readers of the document):

- A path variable bound to a multi-segment template (``/v1/{name=profiles/*}``) is written as
  the literal segments and one parameter for the ``*`` segment: ``/v1/profiles/{name}``. The
  parameter holds only that segment (``email:ada@example.com``); the server sets the field to
  ``profiles/email:ada@example.com``. OpenAPI path parameters cannot hold ``/`` (and
  ``allowReserved`` is for query parameters only), so keeping the whole name in one parameter
  would make every generated client, and a schemathesis run, send ``profiles%2F...``, which the
  route does not match. A ``/`` inside the segment is sent as ``%2F`` and decoded by the server.
- Query parameters (routes without a body) go by their JSON names (``readMask``,
  ``customer.kind``); the server also takes the proto names, which the document leaves out.
  A repeated field is an array, sent as the parameter repeated (``style: form, explode: true``).
- Schemas are canonical JSON: 64-bit integers as decimal strings (what json_format emits; it
  also accepts JSON numbers), enums by value name, Timestamp as RFC 3339, Duration as ``"1.5s"``,
  FieldMask as ``"a,b"`` (camelCase paths), Struct as any object, Value as any JSON, wrappers as
  the nullable scalar, bytes as base64, maps as ``additionalProperties``, Any as an object with
  ``@type``. A proto3 field is never required (an unset field is omitted); a oneof's members are
  listed in the message's description and in ``x-oneof``.
- Errors are google.rpc.Status as JSON, with the HTTP status of google/rpc/code.proto's mapping;
  every API operation needs ``Authorization: Bearer <api key>`` except the open ones (``GET
  /healthz``, ``GET /openapi.json``). GET answers carry ETag and Cache-Control, and answer a
  matching If-None-Match with 304.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FieldDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)
from google.rpc import status_pb2

from sendtime_common.http_routes import HttpRoute, QueryParameter, routes_of

OPENAPI_VERSION = "3.1.0"
SECURITY_SCHEME = "bearerAuth"
STATUS_SCHEMA = status_pb2.Status.DESCRIPTOR.full_name  # "google.rpc.Status"
OPEN_PATHS = ("/healthz", "/openapi.json")

# Decimal digits, at most as many as the type's extremes have (json_format refuses a value out of
# range with 400; the pattern keeps generated requests near the range without excluding any value).
_INT64_PATTERN = "^-?[0-9]{1,19}$"
_UINT64_PATTERN = "^[0-9]{1,20}$"

# Error responses every API operation may give: (HTTP status, component name, gRPC codes, retry).
_ERRORS: tuple[tuple[str, str, str, bool], ...] = (
    ("400", "BadRequest", "INVALID_ARGUMENT, FAILED_PRECONDITION or OUT_OF_RANGE", False),
    ("401", "Unauthenticated", "UNAUTHENTICATED: no API key, or an unknown, expired or revoked one", False),
    ("403", "PermissionDenied", "PERMISSION_DENIED: the API key lacks the operation's scope", False),
    ("404", "NotFound", "NOT_FOUND", False),
    ("409", "Conflict", "ALREADY_EXISTS or ABORTED", False),
    ("429", "TooManyRequests", "RESOURCE_EXHAUSTED: a rate limit or a quota; retry after Retry-After", True),
    ("500", "Internal", "INTERNAL, UNKNOWN or DATA_LOSS", False),
    ("503", "Unavailable", "UNAVAILABLE: retry after Retry-After", True),
    ("504", "DeadlineExceeded", "DEADLINE_EXCEEDED", False),
)

_DOUBLE: dict[str, Any] = {
    "oneOf": [
        {"type": "number"},
        {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]},
    ]
}
_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_DOUBLE: {**_DOUBLE, "format": "double"},
    FieldDescriptor.TYPE_FLOAT: {**_DOUBLE, "format": "float"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
    FieldDescriptor.TYPE_FIXED32: {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
    FieldDescriptor.TYPE_INT64: {"type": "string", "format": "int64", "pattern": _INT64_PATTERN},
    FieldDescriptor.TYPE_SINT64: {"type": "string", "format": "int64", "pattern": _INT64_PATTERN},
    FieldDescriptor.TYPE_SFIXED64: {"type": "string", "format": "int64", "pattern": _INT64_PATTERN},
    FieldDescriptor.TYPE_UINT64: {"type": "string", "format": "uint64", "pattern": _UINT64_PATTERN},
    FieldDescriptor.TYPE_FIXED64: {"type": "string", "format": "uint64", "pattern": _UINT64_PATTERN},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte", "contentEncoding": "base64"},
}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "type": [schema["type"], "null"]}


# Well-known types, inlined where a field uses them (their JSON is not an object of their fields).
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {
        "type": "string",
        "pattern": r"^-?[0-9]{1,12}(\.[0-9]{1,9})?s$",
        "description": 'Seconds with up to 9 fractional digits and the suffix "s", e.g. "1.5s";'
        " at most 315,576,000,000 s either way.",
    },
    "google.protobuf.FieldMask": {
        "type": "string",
        "description": 'Field paths in camelCase, separated by commas, e.g. "traits,cart".',
    },
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {"description": "Any JSON value."},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object", "additionalProperties": False},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {
            "@type": {"type": "string", "description": 'e.g. "type.googleapis.com/google.rpc.ErrorInfo".'}
        },
        "required": ["@type"],
        "additionalProperties": True,
        "description": "A message of the type @type names, its fields beside @type.",
    },
    "google.protobuf.DoubleValue": {"oneOf": [*_DOUBLE["oneOf"], {"type": "null"}], "format": "double"},
    "google.protobuf.FloatValue": {"oneOf": [*_DOUBLE["oneOf"], {"type": "null"}], "format": "float"},
    "google.protobuf.Int64Value": _nullable(_SCALARS[FieldDescriptor.TYPE_INT64]),
    "google.protobuf.UInt64Value": _nullable(_SCALARS[FieldDescriptor.TYPE_UINT64]),
    "google.protobuf.Int32Value": _nullable(_SCALARS[FieldDescriptor.TYPE_INT32]),
    "google.protobuf.UInt32Value": _nullable(_SCALARS[FieldDescriptor.TYPE_UINT32]),
    "google.protobuf.BoolValue": _nullable(_SCALARS[FieldDescriptor.TYPE_BOOL]),
    "google.protobuf.StringValue": _nullable(_SCALARS[FieldDescriptor.TYPE_STRING]),
    "google.protobuf.BytesValue": _nullable(_SCALARS[FieldDescriptor.TYPE_BYTES]),
}
_HEADERS: dict[str, dict[str, Any]] = {
    "ETag": {
        "description": "The entity tag of the answer; send it back in If-None-Match.",
        "schema": {"type": "string"},
    },
    "Cache-Control": {
        "description": "How long, and by whom, the answer may be cached.",
        "schema": {"type": "string"},
    },
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer", "minimum": 0},
    },
}


def comments_of(descriptor_set: descriptor_pb2.FileDescriptorSet) -> dict[str, str]:
    """The leading (else trailing) comment of each service, method, message, field, oneof, enum
    and enum value of ``descriptor_set`` by full name (``sendtime.profile.v1.Profile.name``);
    empty unless the set was built with source info (``protoc --include_source_info``)."""
    found: dict[str, str] = {}
    for file in descriptor_set.file:
        by_path: dict[tuple[int, ...], str] = {}
        for location in file.source_code_info.location:
            text = location.leading_comments or location.trailing_comments
            if text.strip():
                by_path[tuple(location.path)] = _clean_comment(text)
        prefix = f"{file.package}." if file.package else ""

        def note(name: str, path: tuple[int, ...], table: dict[tuple[int, ...], str] = by_path) -> None:
            if path in table:
                found[name] = table[path]

        def enum(e: descriptor_pb2.EnumDescriptorProto, name: str, path: tuple[int, ...]) -> None:
            note(name, path)
            for i, value in enumerate(e.value):
                note(f"{name}.{value.name}", (*path, 2, i))

        def message(m: descriptor_pb2.DescriptorProto, name: str, path: tuple[int, ...]) -> None:
            note(name, path)
            for i, field in enumerate(m.field):
                note(f"{name}.{field.name}", (*path, 2, i))
            for i, oneof in enumerate(m.oneof_decl):
                note(f"{name}.{oneof.name}", (*path, 8, i))
            for i, nested in enumerate(m.nested_type):
                message(nested, f"{name}.{nested.name}", (*path, 3, i))
            for i, nested_enum in enumerate(m.enum_type):
                enum(nested_enum, f"{name}.{nested_enum.name}", (*path, 4, i))

        for i, m in enumerate(file.message_type):
            message(m, prefix + m.name, (4, i))
        for i, e in enumerate(file.enum_type):
            enum(e, prefix + e.name, (5, i))
        for i, service in enumerate(file.service):
            note(prefix + service.name, (6, i))
            for j, method in enumerate(service.method):
                note(f"{prefix}{service.name}.{method.name}", (6, i, 2, j))
    return found


def _clean_comment(text: str) -> str:
    lines = [line[1:] if line.startswith(" ") else line for line in text.strip("\n").split("\n")]
    return "\n".join(line.rstrip() for line in lines).strip()


def _summary(comment: str) -> str:
    """The comment's first sentence, on one line."""
    flat = " ".join(comment.split())
    match = re.match(r"(.+?[.!?])(\s|$)", flat)
    return match.group(1) if match else flat


def build_document(
    service_names: Iterable[str],
    *,
    title: str,
    version: str,
    servers: Sequence[Mapping[str, Any]] = (),
    description: str = "",
    comments: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the named services' HTTP routes (services without any are
    left out), with a schema in ``components.schemas`` for every message and enum they reach.

    ``comments`` (from :func:`comments_of`) supply descriptions; without them the document has
    none from the contracts.

    Raises:
        KeyError: a service the default descriptor pool does not hold.
        sendtime_common.http_routes.RouteError: a binding the transcoder does not support.
    """
    builder = _Builder(comments or {})
    pool = descriptor_pool.Default()
    services = [pool.FindServiceByName(name) for name in service_names]
    routes = routes_of(s.full_name for s in services)
    paths: dict[str, dict[str, Any]] = {}
    bindings_seen: dict[str, int] = {}
    for route in routes:
        key = route.method.full_name
        bindings_seen[key] = bindings_seen.get(key, 0) + 1
        operation = builder.operation(route, bindings_seen[key])
        path_item = paths.setdefault(route.openapi_path, {})
        if route.http_method.lower() in path_item:
            raise ValueError(f"{route.http_method} {route.openapi_path} is bound twice")
        path_item[route.http_method.lower()] = operation
    paths.update(_open_paths())
    builder.schema_ref(descriptor_pool.Default().FindMessageTypeByName(STATUS_SCHEMA))
    tags = [
        {"name": service.name, **builder.describe(service.full_name)}
        for service in services
        if any(route.method.containing_service is service for route in routes)
    ]
    info: dict[str, Any] = {"title": title, "version": version}
    if description:
        info["description"] = description
    document: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": info,
        "tags": [*tags, {"name": "Server", "description": "Health and this document; no API key."}],
        "paths": paths,
        "components": {
            "schemas": builder.schemas,
            "responses": _error_responses(),
            "headers": _HEADERS,
            "securitySchemes": {
                SECURITY_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key: `Authorization: Bearer <api key>`.",
                }
            },
        },
        "security": [{SECURITY_SCHEME: []}],
    }
    if servers:
        document["servers"] = [dict(server) for server in servers]
    return document


def _error_responses() -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for _, name, codes, retry in _ERRORS:
        response: dict[str, Any] = {
            "description": f"google.rpc.Status: {codes}.",
            "content": {"application/json": {"schema": {"$ref": _schema_pointer(STATUS_SCHEMA)}}},
        }
        if retry:
            response["headers"] = {"Retry-After": {"$ref": "#/components/headers/Retry-After"}}
        responses[name] = response
    responses["Error"] = {
        "description": "google.rpc.Status, with the HTTP status of google/rpc/code.proto's mapping.",
        "content": {"application/json": {"schema": {"$ref": _schema_pointer(STATUS_SCHEMA)}}},
    }
    return responses


def _open_paths() -> dict[str, Any]:
    health = {
        "type": "object",
        "properties": {"status": {"type": "string"}},
        "additionalProperties": True,
    }
    return {
        "/healthz": {
            "get": {
                "operationId": "Server_Healthz",
                "tags": ["Server"],
                "summary": "Whether the server is serving.",
                "security": [],
                "responses": {
                    "200": {
                        "description": "Serving.",
                        "content": {"application/json": {"schema": health}},
                    },
                    "503": {
                        "description": "Not serving (starting or shutting down).",
                        "content": {"application/json": {"schema": health}},
                    },
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "Server_OpenApi",
                "tags": ["Server"],
                "summary": "This document.",
                "security": [],
                "responses": {
                    "200": {
                        "description": "The OpenAPI document.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    }


def _schema_pointer(full_name: str) -> str:
    return f"#/components/schemas/{full_name}"


class _Builder:
    """Collects a schema per message and enum reached, as operations are built."""

    def __init__(self, comments: Mapping[str, str]) -> None:
        self.comments = comments
        self.schemas: dict[str, Any] = {}

    def describe(self, full_name: str) -> dict[str, str]:
        text = self.comments.get(full_name)
        return {"description": text} if text else {}

    def operation(self, route: HttpRoute, binding: int) -> dict[str, Any]:
        method = route.method
        service: ServiceDescriptor = method.containing_service
        # Further bindings of one RPC get a number, as grpc-gateway's generator does.
        operation_id = f"{service.name}_{method.name}" + (str(binding) if binding > 1 else "")
        operation: dict[str, Any] = {"operationId": operation_id, "tags": [service.name]}
        comment = self.comments.get(method.full_name, "")
        if comment:
            operation["summary"] = _summary(comment)
            operation["description"] = comment
        operation["x-grpc-method"] = route.grpc_method
        parameters = [self._path_parameter(route, v.field, v.literal_prefix) for v in route.variables]
        parameters += [self._query_parameter(p) for p in route.query_parameters()]
        is_get = route.http_method == "GET"
        if is_get:
            parameters.append(
                {
                    "name": "If-None-Match",
                    "in": "header",
                    "required": False,
                    "description": "An ETag of an earlier answer: 304 when the answer would be the same.",
                    "schema": {"type": "string"},
                }
            )
        if parameters:
            operation["parameters"] = parameters
        if route.body == "*":
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": self.schema_ref(method.input_type)}},
            }
        operation["responses"] = self._responses(method, is_get)
        return operation

    def _path_parameter(self, route: HttpRoute, field_name: str, literal_prefix: str) -> dict[str, Any]:
        field = route.method.input_type.fields_by_name[field_name]
        text = f"`{field.json_name}`"
        if literal_prefix:
            text = (
                f"The part of `{field.json_name}` after `{literal_prefix}`: the server sets"
                f' `{field.json_name}` to "{literal_prefix}" followed by this one segment'
                ' (a "/" in it percent-encoded as %2F)'
            )
        comment = self.comments.get(field.full_name)
        return {
            "name": field_name,
            "in": "path",
            "required": True,
            "description": text + "." + (f"\n\n{comment}" if comment else ""),
            "schema": {"type": "string", "minLength": 1},
        }

    def _query_parameter(self, parameter: QueryParameter) -> dict[str, Any]:
        field = parameter.field
        schema = self._value_schema(field, query=True)
        if parameter.repeated:
            schema = {"type": "array", "items": schema}
        result: dict[str, Any] = {
            "name": parameter.json_path,
            "in": "query",
            "required": False,
            "schema": schema,
        }
        if parameter.repeated:
            result["style"] = "form"
            result["explode"] = True
        comment = self.comments.get(field.full_name)
        if comment:
            result["description"] = comment
        return result

    def _responses(self, method: MethodDescriptor, is_get: bool) -> dict[str, Any]:
        ok: dict[str, Any] = {
            "description": "OK.",
            "content": {"application/json": {"schema": self.schema_ref(method.output_type)}},
        }
        caching = {
            "ETag": {"$ref": "#/components/headers/ETag"},
            "Cache-Control": {"$ref": "#/components/headers/Cache-Control"},
        }
        responses: dict[str, Any] = {"200": ok}
        if is_get:
            ok["headers"] = caching
            responses["304"] = {
                "description": "Not modified: If-None-Match named the current ETag.",
                "headers": caching,
            }
        for status, name, _, _ in _ERRORS:
            responses[status] = {"$ref": f"#/components/responses/{name}"}
        responses["default"] = {"$ref": "#/components/responses/Error"}
        return responses

    def schema_ref(self, message: Descriptor) -> dict[str, Any]:
        """A reference to ``message``'s schema (added, with what it reaches, when new); a
        well-known type's schema is given inline."""
        well_known = _WELL_KNOWN.get(message.full_name)
        if well_known is not None:
            return dict(well_known)
        if message.full_name not in self.schemas:
            self.schemas[message.full_name] = {}  # placeholder: recursive messages stop here
            self.schemas[message.full_name] = self._message_schema(message)
        return {"$ref": _schema_pointer(message.full_name)}

    def _enum_ref(self, enum: EnumDescriptor) -> dict[str, Any]:
        if enum.full_name == "google.protobuf.NullValue":
            return {"type": "null"}
        if enum.full_name not in self.schemas:
            schema: dict[str, Any] = {"type": "string", "enum": [v.name for v in enum.values]}
            lines = [self.comments.get(enum.full_name, "")]
            for value in enum.values:
                value_comment = self.comments.get(f"{enum.full_name}.{value.name}")
                if value_comment:
                    lines.append(f"- `{value.name}`: {' '.join(value_comment.split())}")
            text = "\n".join(line for line in lines if line)
            if text:
                schema["description"] = text
            self.schemas[enum.full_name] = schema
        return {"$ref": _schema_pointer(enum.full_name)}

    def _message_schema(self, message: Descriptor) -> dict[str, Any]:
        properties: dict[str, Any] = {}
        oneofs: dict[str, list[str]] = {}
        for declared in message.oneofs:
            # proto3 `optional` makes a synthetic oneof of one field named "_<field>".
            if len(declared.fields) == 1 and declared.name == f"_{declared.fields[0].name}":
                continue
            oneofs[declared.name] = [f.json_name for f in declared.fields]
        for field in message.fields:
            schema = self._field_schema(field)
            comment = self.comments.get(field.full_name, "")
            containing = field.containing_oneof
            if containing is not None and containing.name in oneofs:
                comment += ("\n\n" if comment else "") + f"A member of the oneof `{containing.name}`."
            if comment:
                # A well-known type's own description (the Duration format) stays, after the field's.
                own = schema.get("description")
                schema = {**schema, "description": comment + (f"\n\n{own}" if own else "")}
            properties[field.json_name] = schema
        result: dict[str, Any] = {"type": "object", "properties": properties}
        text = self.comments.get(message.full_name, "")
        for name, members in oneofs.items():
            oneof_comment = self.comments.get(f"{message.full_name}.{name}", "")
            listed = ", ".join(f"`{m}`" for m in members)
            text += ("\n\n" if text else "") + f"At most one of {listed} (oneof `{name}`)."
            if oneof_comment:
                text += f" {' '.join(oneof_comment.split())}"
        if oneofs:
            result["x-oneof"] = oneofs
        if text:
            result["description"] = text
        return result

    def _field_schema(self, field: FieldDescriptor) -> dict[str, Any]:
        message_type = field.message_type
        if message_type is not None and message_type.GetOptions().map_entry:
            value = message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self._value_schema(value)}
        schema = self._value_schema(field)
        if field.is_repeated:
            return {"type": "array", "items": schema}
        return schema

    def _value_schema(self, field: FieldDescriptor, *, query: bool = False) -> dict[str, Any]:
        """The schema of one value of ``field`` (an element, for a repeated field). In a query
        string a wrapper cannot be null: its schema there is the plain scalar's."""
        if field.message_type is not None:
            schema = self.schema_ref(field.message_type)
            return _without_null(schema) if query else schema
        if field.enum_type is not None:
            return self._enum_ref(field.enum_type)
        return dict(_SCALARS[field.type])


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A wrapper's schema less its null (a query parameter is a string, never null)."""
    if isinstance(schema.get("type"), list):
        return {**schema, "type": next(t for t in schema["type"] if t != "null")}
    if "oneOf" in schema:
        return {**schema, "oneOf": [s for s in schema["oneOf"] if s != {"type": "null"}]}
    return schema
