"""Identifiers as the contracts carry them (``sendtime.profile.v1.Identifier``).

Profile and render check a requested identifier the same way, so a request both accept means the
same customer to both, and a bad one gets the same field violation from either.
"""

from __future__ import annotations

import uuid

from sendtime.profile.v1 import profile_pb2
from sendtime_common.errors import FieldViolation
from sendtime_common.identifiers import IdentifierKind, InvalidIdentifier, normalize_identifier

KIND_TO_PROTO = {
    IdentifierKind.USER_ID: profile_pb2.IDENTIFIER_KIND_USER_ID,
    IdentifierKind.EMAIL: profile_pb2.IDENTIFIER_KIND_EMAIL,
    IdentifierKind.ANONYMOUS_ID: profile_pb2.IDENTIFIER_KIND_ANONYMOUS_ID,
    IdentifierKind.CRM_ID: profile_pb2.IDENTIFIER_KIND_CRM_ID,
    IdentifierKind.DEVICE_ID: profile_pb2.IDENTIFIER_KIND_DEVICE_ID,
}
PROTO_TO_KIND = {v: k for k, v in KIND_TO_PROTO.items()}

IdentifierKey = tuple[IdentifierKind, str]


def parse_identifier(identifier: profile_pb2.Identifier, field: str) -> IdentifierKey | FieldViolation:
    """The identifier's kind and canonical value, or why it cannot be used (``field`` names it
    in the request, e.g. ``identifiers[3]``)."""
    kind = PROTO_TO_KIND.get(identifier.kind)
    if kind is None:
        return FieldViolation(
            f"{field}.kind", "required: one of USER_ID, EMAIL, ANONYMOUS_ID, CRM_ID, DEVICE_ID"
        )
    try:
        return kind, normalize_identifier(kind, identifier.value)
    except InvalidIdentifier as exc:
        return FieldViolation(f"{field}.value", str(exc))


PROFILE_NAME_PREFIX = "profiles/"
_KIND_NAMES = ", ".join(kind.value for kind in IdentifierKind)


def parse_profile_name(name: str, field: str) -> IdentifierKey | uuid.UUID | FieldViolation:
    """A profile's name: ``profiles/{customer_id}`` (the customer id), or an identifier alias
    ``profiles/{kind}:{value}`` such as ``profiles/email:ada@example.com`` (its canonical key)."""
    resource_id = name.removeprefix(PROFILE_NAME_PREFIX)
    if not name.startswith(PROFILE_NAME_PREFIX) or not resource_id:
        return _not_a_name(field)
    kind_name, colon, value = resource_id.partition(":")
    if not colon:
        try:
            return uuid.UUID(hex=resource_id) if len(resource_id) == 36 else _not_a_name(field)
        except ValueError:
            return _not_a_name(field)
    try:
        kind = IdentifierKind(kind_name)
    except ValueError:
        return FieldViolation(field, f"the identifier kind must be one of {_KIND_NAMES}")
    try:
        return kind, normalize_identifier(kind, value)
    except InvalidIdentifier as exc:
        return FieldViolation(field, str(exc))


def _not_a_name(field: str) -> FieldViolation:
    return FieldViolation(
        field, f"must be profiles/{{customer_id}} or profiles/{{kind}}:{{value}}, a kind of {_KIND_NAMES}"
    )


def requested_customer(
    identifier: profile_pb2.Identifier | None, name: str, identifier_field: str, name_field: str
) -> IdentifierKey | uuid.UUID | FieldViolation:
    """The customer a request names by ``identifier`` (None: unset) or by a profile ``name``:
    exactly one of the two."""
    if identifier is not None and name:
        return FieldViolation(name_field, f"set {name_field} or {identifier_field}, not both")
    if name:
        return parse_profile_name(name, name_field)
    if identifier is None:
        return FieldViolation(identifier_field, f"required (or {name_field})")
    return parse_identifier(identifier, identifier_field)
