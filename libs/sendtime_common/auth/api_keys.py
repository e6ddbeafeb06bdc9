"""API keys as callers hold them, and the scopes they carry (pure: no I/O).

A key reads ``sendtime_<key id><secret><checksum>``, all base62, the way GitHub's tokens are
made: the prefix lets a secret scanner (and a person) recognise a leaked key, the 12-character
key id names its record (and is safe to log and show), the 30-character secret carries 178
random bits, and a CRC32 checksum refuses a mistyped or truncated key before anything is looked
up. Only a SHA-256 of the whole key is stored: the secret is random enough that no salt or slow
hash is needed, and the stored hash is compared in constant time.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
import string
import zlib
from dataclasses import dataclass

from sendtime.auth.v1 import auth_pb2

KEY_PREFIX = "sendtime_"
KEY_ID_LENGTH = 12
SECRET_LENGTH = 30
CHECKSUM_LENGTH = 6
KEY_LENGTH = len(KEY_PREFIX) + KEY_ID_LENGTH + SECRET_LENGTH + CHECKSUM_LENGTH
BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
# What a secret scanner should look for (docs/security.md).
KEY_PATTERN = re.compile(rf"\b{KEY_PREFIX}[0-9A-Za-z]{{{KEY_LENGTH - len(KEY_PREFIX)}}}\b")
_KEY_ID_PATTERN = re.compile(rf"[0-9A-Za-z]{{{KEY_ID_LENGTH}}}")


class Scope(enum.StrEnum):
    """What a credential may do; the names are what the command line, the environment and error
    details use. Each is one ``sendtime.auth.v1.Scope`` of the contracts."""

    EVENTS_WRITE = "events.write"
    PROFILES_READ = "profiles.read"
    PROFILES_EXPORT = "profiles.export"
    PROFILES_ERASE = "profiles.erase"
    TEMPLATES_READ = "templates.read"
    TEMPLATES_WRITE = "templates.write"
    RENDER = "render"
    DEAD_LETTERS_MANAGE = "dead_letters.manage"
    KEYS_MANAGE = "keys.manage"
    AUDIT_READ = "audit.read"
    STATS_READ = "stats.read"
    TRIGGERS_READ = "triggers.read"
    TRIGGERS_WRITE = "triggers.write"
    DESTINATIONS_MANAGE = "destinations.manage"
    DELIVERIES_READ = "deliveries.read"
    DELIVERIES_SUBSCRIBE = "deliveries.subscribe"
    METRICS_READ = "metrics.read"
    SYNC_READ = "sync.read"
    SYNC_WRITE = "sync.write"

    @property
    def proto(self) -> auth_pb2.Scope.ValueType:
        return auth_pb2.Scope.Value(f"SCOPE_{self.name}")

    @classmethod
    def from_proto(cls, value: int) -> Scope:
        """Raises: ValueError: not a scope (or SCOPE_UNSPECIFIED)."""
        try:
            name = auth_pb2.Scope.Name(value)  # type: ignore[arg-type]
            return cls[name.removeprefix("SCOPE_")]
        except (ValueError, KeyError):
            raise ValueError(f"{value} is not a scope") from None

    @classmethod
    def parse(cls, text: str) -> Scope:
        """A scope by its name (``profiles.read``) or its contract name (``SCOPE_PROFILES_READ``).

        Raises: ValueError: no such scope (the message lists them).
        """
        text = text.strip()
        try:
            return cls(text)
        except ValueError:
            pass
        try:
            return cls[text.upper().removeprefix("SCOPE_")]
        except KeyError:
            raise ValueError(f"unknown scope {text!r}; scopes are {', '.join(cls)}") from None


ALL_SCOPES = frozenset(Scope)


class MalformedKey(ValueError):
    """Not a Sendtime API key: wrong prefix, length or characters, or a checksum that does not
    match (a typo). The message says which, never echoing the key."""


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A key just made: ``key`` is shown to its owner once; ``secret_hash`` is what is stored."""

    key_id: str
    key: str
    secret_hash: bytes


def _base62(value: int, length: int) -> str:
    digits = []
    for _ in range(length):
        value, digit = divmod(value, 62)
        digits.append(BASE62[digit])
    return "".join(reversed(digits))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), CHECKSUM_LENGTH)


def _random_base62(length: int) -> str:
    return "".join(secrets.choice(BASE62) for _ in range(length))


def new_key() -> IssuedKey:
    """A fresh key with a random id and secret."""
    body = KEY_PREFIX + _random_base62(KEY_ID_LENGTH) + _random_base62(SECRET_LENGTH)
    key = body + _checksum(body)
    return IssuedKey(key_id=key_id_of(key), key=key, secret_hash=secret_hash(key))


def key_id_of(key: str) -> str:
    """The key id of a well-formed key.

    Raises:
        MalformedKey: it is not one (the message says why).
    """
    if not key.startswith(KEY_PREFIX):
        raise MalformedKey(f"does not start with {KEY_PREFIX!r}")
    if len(key) != KEY_LENGTH:
        raise MalformedKey(f"has {len(key)} characters; a key has {KEY_LENGTH}")
    body, checksum = key[:-CHECKSUM_LENGTH], key[-CHECKSUM_LENGTH:]
    if not key.isascii() or not key[len(KEY_PREFIX) :].isalnum():
        raise MalformedKey("has characters other than letters and digits after the prefix")
    if not hmac.compare_digest(_checksum(body), checksum):
        raise MalformedKey("checksum does not match: the key was mistyped or cut short")
    return key[len(KEY_PREFIX) : len(KEY_PREFIX) + KEY_ID_LENGTH]


def secret_hash(key: str) -> bytes:
    """What is stored of a key: its SHA-256."""
    return hashlib.sha256(key.encode()).digest()


def matches(key: str, stored_hash: bytes) -> bool:
    """Whether ``key`` is the key ``stored_hash`` was made from (constant time)."""
    return hmac.compare_digest(secret_hash(key), stored_hash)


def valid_key_id(text: str) -> bool:
    """Whether ``text`` has the shape of a key id."""
    return _KEY_ID_PATTERN.fullmatch(text) is not None


def key_resource_name(key_id: str) -> str:
    return f"apiKeys/{key_id}"
