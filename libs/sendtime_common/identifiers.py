"""Customer identifiers as both ingest and profile resolution see them.

Both services normalize the same way, so an email written ``Ada@Example.COM `` by one source and
``ada@example.com`` by another resolves to the same customer.
"""

from __future__ import annotations

import enum
import functools
import hashlib
from typing import Protocol

from email_validator import EmailNotValidError, validate_email


class IdentifierKind(enum.StrEnum):
    """Kinds of identifier; values are stable, they appear in storage and cache keys."""

    USER_ID = "user_id"
    EMAIL = "email"
    ANONYMOUS_ID = "anonymous_id"
    CRM_ID = "crm_id"
    DEVICE_ID = "device_id"


MAX_IDENTIFIER_LENGTH = 256


def identifier_hash(key: tuple[IdentifierKind, str]) -> bytes:
    """SHA-256 of ``kind:value`` (the canonical value): how an identifier is named where its value
    must not be kept, in erasure tombstones and notices and in render's copies of profiles."""
    kind, value = key
    return hashlib.sha256(f"{kind.value}:{value}".encode()).digest()


class InvalidIdentifier(ValueError):
    """An identifier value that cannot be used; the message says why (without echoing it)."""


def normalize_identifier(kind: IdentifierKind, value: str) -> str:
    """The canonical form of an identifier value.

    Emails are checked for syntax (no DNS lookups) and lower-cased; other kinds are trimmed.

    Raises:
        InvalidIdentifier: empty, too long, or (for emails) not a well-formed address.
    """
    value = value.strip()
    if not value:
        raise InvalidIdentifier("must not be empty")
    if len(value) > MAX_IDENTIFIER_LENGTH:
        raise InvalidIdentifier(f"must be at most {MAX_IDENTIFIER_LENGTH} characters")
    if kind is IdentifierKind.EMAIL:
        return _normalize_email(value)
    return value


# Checking an address costs tens of microseconds and the same ones come again and again (every
# event of a customer carries them); failures are not cached (lru_cache does not keep raises).
@functools.lru_cache(maxsize=65536)
def _normalize_email(value: str) -> str:
    try:
        checked = validate_email(value, check_deliverability=False)
    except EmailNotValidError as exc:
        raise InvalidIdentifier(f"is not a valid email address: {exc}") from None
    # Lower-case the whole address: mailbox case-sensitivity is allowed by RFC 5321 but no real
    # provider uses it, and two spellings must not become two customers.
    return checked.normalized.lower()


class HasIdentifierFields(Protocol):
    """Anything with one string attribute per identifier kind (e.g. ``CustomerIdentifiers``)."""

    user_id: str
    email: str
    anonymous_id: str
    crm_id: str
    device_id: str


def identifiers_of(customer: HasIdentifierFields) -> dict[IdentifierKind, str]:
    """The non-empty identifiers of ``customer`` in canonical form.

    Raises:
        InvalidIdentifier: one of them cannot be normalized.
    """
    found: dict[IdentifierKind, str] = {}
    for kind in IdentifierKind:
        raw: str = getattr(customer, kind.value)
        if raw.strip():
            found[kind] = normalize_identifier(kind, raw)
    return found
