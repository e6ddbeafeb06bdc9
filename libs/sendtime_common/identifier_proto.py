"""Identifiers as the contracts carry them (``sendtime.profile.v1.Identifier``).

Profile and render check a requested identifier the same way, so a request both accept means the
same customer to both, and a bad one gets the same field violation from either.
"""

from __future__ import annotations

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
