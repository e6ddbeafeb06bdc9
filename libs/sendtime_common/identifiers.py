"""Customer identifiers as both ingest and profile resolution see them.

Both services normalize the same way, so an email written ``Ada@Example.COM `` by one source and
``ada@example.com`` by another resolves to the same customer.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import hashlib
import hmac
import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

from email_validator import EmailNotValidError, validate_email

from sendtime_common.config import ConfigError, secret_from_env

log = logging.getLogger(__name__)


class IdentifierKind(enum.StrEnum):
    """Kinds of identifier; values are stable, they appear in storage and cache keys."""

    USER_ID = "user_id"
    EMAIL = "email"
    ANONYMOUS_ID = "anonymous_id"
    CRM_ID = "crm_id"
    DEVICE_ID = "device_id"


MAX_IDENTIFIER_LENGTH = 256


UNKEYED = "unkeyed"  # in IDENTIFIER_HASH_KEYS: plain SHA-256, as releases before keyed hashes
MIN_HASH_KEY_BYTES = 32


class IdentifierHasher:
    """How an identifier is named where its value must not be kept: erasure tombstones and
    notices, dead letters' index, render's copies of profiles.

    A keyed hash, HMAC-SHA256 of ``kind:value`` under a deployment secret, so nobody holding
    the hashes can test guesses (every email address of a leaked list, say) against them, as
    they could against a plain SHA-256. Several keys allow rotation: new hashes use the first,
    and records made under the others still match (``all_hashes``). ``unkeyed`` stands for
    plain SHA-256, for local runs and for records made before keys were set.
    """

    def __init__(self, keys: Sequence[bytes | None], *, configured: bool = True) -> None:
        """``keys``: the current key first; None for plain SHA-256. ``configured`` False: no
        keys were set at all (``IDENTIFIER_HASH_KEYS`` empty), which a service refuses to start
        with (``check_configured``)."""
        if not keys:
            raise ValueError("at least one key (or None for unkeyed hashes)")
        self._keys = tuple(keys)
        self.configured = configured

    @classmethod
    def unkeyed(cls) -> IdentifierHasher:
        return cls([None])

    @classmethod
    def parse(cls, text: str) -> IdentifierHasher:
        """From ``IDENTIFIER_HASH_KEYS``: comma-separated keys, each base64 of at least 32 random
        bytes or ``unkeyed``, the current one first; empty: unkeyed, and not ``configured``.

        Raises:
            ValueError: a key is not base64 or is too short (the message names its position).
        """
        entries = [entry.strip() for entry in text.split(",") if entry.strip()]
        keys: list[bytes | None] = []
        for position, entry in enumerate(entries, start=1):
            if entry == UNKEYED:
                keys.append(None)
                continue
            try:
                key = base64.b64decode(entry, validate=True)
            except binascii.Error:
                raise ValueError(f"key {position} is not base64") from None
            if len(key) < MIN_HASH_KEY_BYTES:
                raise ValueError(f"key {position} has {len(key)} bytes; at least {MIN_HASH_KEY_BYTES} wanted")
            keys.append(key)
        return cls(keys or [None], configured=bool(keys))

    @property
    def keyed(self) -> bool:
        """Whether new hashes are keyed."""
        return self._keys[0] is not None

    def check_configured(self) -> None:
        """What a service does at start: refuse to run with no keys set, and warn when new
        hashes are unkeyed (``IDENTIFIER_HASH_KEYS=unkeyed``: for local development only).

        Raises:
            ConfigError: IDENTIFIER_HASH_KEYS is not set.
        """
        if not self.configured:
            raise ConfigError(
                "IDENTIFIER_HASH_KEYS is not set: set it (every service the same) to a base64 key of 32+ "
                "random bytes, e.g. `head -c 32 /dev/urandom | base64`, or to `unkeyed` for local "
                "development only"
            )
        if not self.keyed:
            log.warning(
                "IDENTIFIER_HASH_KEYS is unkeyed: erased people are named by plain SHA-256, which anyone "
                "holding the hashes can match against a list of emails; for local development only"
            )

    def hash(self, identifier: tuple[IdentifierKind, str]) -> bytes:
        """The identifier's hash under the current key."""
        return _hash(self._keys[0], identifier)

    def all_hashes(self, identifier: tuple[IdentifierKind, str]) -> list[bytes]:
        """Its hash under every key, the current one first: what a record of it may hold."""
        return [_hash(key, identifier) for key in self._keys]


def _hash(key: bytes | None, identifier: tuple[IdentifierKind, str]) -> bytes:
    kind, value = identifier
    message = f"{kind.value}:{value}".encode()
    return hashlib.sha256(message).digest() if key is None else hmac.digest(key, message, "sha256")


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


def hasher_from_env(env: Mapping[str, str]) -> IdentifierHasher:
    """The hasher ``IDENTIFIER_HASH_KEYS`` (or the file ``IDENTIFIER_HASH_KEYS_FILE``) configures
    (every service must use the same keys).

    Raises:
        ConfigError: a key is unusable.
    """
    try:
        return IdentifierHasher.parse(secret_from_env(env, "IDENTIFIER_HASH_KEYS"))
    except ValueError as exc:
        raise ConfigError(f"IDENTIFIER_HASH_KEYS: {exc}") from None
