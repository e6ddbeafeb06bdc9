"""Customer identifiers as both ingest and profile resolution see them.

Both services normalize the same way, so an email written ``Ada@Example.COM `` by one source and
``ada@example.com`` by another resolves to the same customer.

Identity strings are checked so that what looks alike is alike (docs/limits.md, "Identity
strings"):

- ASCII spaces, tabs and line breaks around a value are trimmed;
- every value is put in Unicode normalization form C, so a precomposed ``é`` and ``e`` with a
  combining accent are one identifier;
- a value holding an invisible, control, formatting or bidi character, or any space but U+0020,
  is refused, never stripped: stripping would make ``bob`` and ``bo<zero-width space>b`` one
  customer, keeping them would make two that look the same;
- a value that mixes scripts is refused unless Unicode TR 39's "Highly Restrictive" level allows
  the mix (one script; or Latin with Han and Japanese kana, with Han and Bopomofo, or with Han
  and Hangul), so ``pаypal`` with a Cyrillic ``а`` is refused. An email is checked by part (the
  local part, each domain label), as browsers check domain labels;
- whole-script confusables (``раура`` written all in Cyrillic) are accepted: they are a
  different string for a different person, and merging them by their TR 39 skeleton would merge
  people who are distinct.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import hashlib
import hmac
import logging
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Protocol

import regex
from email_validator import EmailNotValidError, validate_email
from fontTools.unicodedata import script_extension

from sendtime_common.config import ConfigError, secret_from_env

log = logging.getLogger(__name__)


class IdentifierKind(enum.StrEnum):
    """Kinds of identifier; values are stable, they appear in storage and cache keys."""

    USER_ID = "user_id"
    EMAIL = "email"
    ANONYMOUS_ID = "anonymous_id"
    CRM_ID = "crm_id"
    DEVICE_ID = "device_id"


# Each kind in order with its field name (on CustomerIdentifiers), as plain tuples: iterating an
# Enum class and reading a member's ``value`` cost ~2 µs an event.
IDENTIFIER_FIELDS: tuple[tuple[IdentifierKind, str], ...] = tuple(
    (kind, kind.value) for kind in IdentifierKind
)

MAX_IDENTIFIER_LENGTH = 256
# Trimmed from both ends of a value (sources pad them); any other hidden character, at an end
# or not, is refused.
TRIMMED = " \t\r\n"


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
    """The canonical form of an identifier value: trimmed of ASCII spaces, tabs and line breaks
    at both ends, in NFC; emails also checked for syntax (no DNS lookups) and lower-cased.

    Raises:
        InvalidIdentifier: empty, too long, holding a hidden character or a mix of scripts, or
            (for emails) not a well-formed address.
    """
    value = value.strip(TRIMMED)
    if not value:
        raise InvalidIdentifier("must not be empty")
    if len(value) > MAX_IDENTIFIER_LENGTH:
        raise InvalidIdentifier(f"must be at most {MAX_IDENTIFIER_LENGTH} characters")
    if not value.isascii():
        value = _checked_text(value)
    elif not value.isprintable():  # ASCII: one script; only control characters to refuse
        raise InvalidIdentifier(_hidden_reason(value))
    if kind is IdentifierKind.EMAIL:
        return _normalize_email(value)
    return value


# Hidden characters: controls, formats (zero-width, bidi, BOM), surrogates, private use and
# unassigned code points (\p{C}); line and paragraph separators; spaces other than U+0020; and
# the rest of Default_Ignorable_Code_Point (variation selectors, Hangul fillers...).
_HIDDEN = regex.compile(r"[\p{C}\p{Zl}\p{Zp}\p{Default_Ignorable_Code_Point}]|[^\P{Zs} ]")
_COMMON = frozenset({"Zyyy", "Zinh"})  # Common and Inherited: compatible with every script
# TR 39's composite scripts: Han with what Japanese, Chinese (Bopomofo) and Korean add to it.
_HAN_COMPOSITES = frozenset({"Jpan", "Hanb", "Kore"})


def _hidden_reason(value: str) -> str:
    hidden = next(c for c in value if not c.isprintable() or _HIDDEN.match(c))
    # The code point, not the value: reasons reach logs and dead letters.
    return f"must not hold invisible, control or bidi characters (U+{ord(hidden):04X})"


@functools.lru_cache(maxsize=16384)
def _checked_text(value: str) -> str:
    """A non-ASCII value in NFC, checked for hidden characters and mixed scripts.

    Raises:
        InvalidIdentifier: it holds either.
    """
    value = unicodedata.normalize("NFC", value)
    if _HIDDEN.search(value):
        raise InvalidIdentifier(_hidden_reason(value))
    parts = value.rpartition("@")[::2] if "@" in value else (value,)
    for part in [parts[0], *parts[1].split(".")] if len(parts) == 2 else parts:
        if not highly_restrictive(part):
            raise InvalidIdentifier(
                "must not mix scripts (Unicode TR 39, Highly Restrictive: one script, or Latin "
                "with Han and kana, Han and Bopomofo, or Han and Hangul)"
            )
    return value


def _augmented_scripts(char: str) -> frozenset[str] | None:
    """TR 39's augmented script set of ``char`` (its Script_Extensions, with the composite
    scripts Han belongs to); None for Common and Inherited, which go with any script."""
    scripts = frozenset(script_extension(char))
    if scripts <= _COMMON:
        return None
    if "Hani" in scripts:
        scripts |= _HAN_COMPOSITES
    if scripts & {"Hira", "Kana"}:
        scripts |= {"Jpan"}
    if "Hang" in scripts:
        scripts |= {"Kore"}
    if "Bopo" in scripts:
        scripts |= {"Hanb"}
    return scripts


def _resolved_scripts(text: str) -> frozenset[str] | None:
    """TR 39's resolved script set: the scripts every character belongs to; None when every
    character is Common or Inherited (any script), empty when the text mixes scripts."""
    resolved: frozenset[str] | None = None
    for char in text:
        scripts = _augmented_scripts(char)
        if scripts is not None:
            resolved = scripts if resolved is None else resolved & scripts
            if not resolved:
                break
    return resolved


def highly_restrictive(text: str) -> bool:
    """Whether ``text`` meets TR 39's "Highly Restrictive" level: single-script, or Latin with
    one of Han + Hiragana + Katakana, Han + Bopomofo, Han + Hangul."""
    resolved = _resolved_scripts(text)
    if resolved is None or resolved:
        return True
    without_latin = "".join(c for c in text if "Latn" not in script_extension(c))
    rest = _resolved_scripts(without_latin)
    return rest is None or bool(rest & _HAN_COMPOSITES)


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
    for kind, field in IDENTIFIER_FIELDS:
        raw: str = getattr(customer, field)
        if raw.strip():
            found[kind] = normalize_identifier(kind, raw)
    return found


def routing_key(customer: HasIdentifierFields) -> str:
    """Which partition of the event stream a customer's events go to is chosen by this key: the
    first identifier the event has, in ``IdentifierKind``'s order (the most lasting first), in
    canonical form. An event that first knows only an anonymous id and a later one with the user
    id may land in two partitions; the merge stitches them all the same (docs/architecture.md)."""
    for kind, field in IDENTIFIER_FIELDS:
        raw: str = getattr(customer, field)
        if raw.strip():
            try:
                return f"{field}:{normalize_identifier(kind, raw)}"
            except InvalidIdentifier:  # refused by validation before it is published
                return f"{field}:{raw}"
    return ""


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
