"""Standard Webhooks signatures (https://www.standardwebhooks.com), made with the
``standardwebhooks`` library that receivers verify with.

A signing secret is ``whsec_`` and the base64 of 24 to 64 random bytes. Each attempt carries
three headers: ``webhook-id`` (the delivery's, the same on every attempt, so a receiver can
drop a repeat), ``webhook-timestamp`` (seconds since the epoch, fresh per attempt: receivers
refuse one more than 5 minutes from their clock) and ``webhook-signature``, ``v1,<base64>`` of
the HMAC-SHA256 of ``{id}.{timestamp}.{body}``. During a secret rotation the header holds two
signatures, the new secret's and the previous one's, separated by a space, until the previous
one expires: a receiver that still has only the previous secret keeps verifying.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from standardwebhooks import Webhook

SECRET_PREFIX = "whsec_"
# The spec's bounds on a secret's size; 32 bytes is the HMAC-SHA256 block's useful size.
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64
DEFAULT_SECRET_BYTES = 32
WEBHOOK_ID_PREFIX = "msg_"

WEBHOOK_ID_HEADER = "webhook-id"
WEBHOOK_TIMESTAMP_HEADER = "webhook-timestamp"
WEBHOOK_SIGNATURE_HEADER = "webhook-signature"

# Crockford's base32, in ASCII order, so that ids compare as the times they hold.
_SORTABLE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_RANDOM_BITS = 80


class InvalidSecret(ValueError):
    """A signing secret is not ``whsec_`` and the base64 of 24 to 64 bytes."""


def new_signing_secret(size: int = DEFAULT_SECRET_BYTES) -> str:
    """A new secret: ``whsec_`` and the base64 of ``size`` bytes from the OS's CSPRNG.

    Raises:
        ValueError: ``size`` is outside 24 to 64.
    """
    if not MIN_SECRET_BYTES <= size <= MAX_SECRET_BYTES:
        raise ValueError(f"a signing secret holds {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes, not {size}")
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(size)).decode("ascii")


def secret_bytes(secret: str) -> bytes:
    """The key a secret holds, checked strictly (the library's own decoder skips stray
    characters, so a damaged secret would sign with a key nobody has).

    Raises:
        InvalidSecret: no ``whsec_`` prefix, not base64, or not 24 to 64 bytes.
    """
    if not secret.startswith(SECRET_PREFIX):
        raise InvalidSecret(f"a signing secret starts with {SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except binascii.Error:
        raise InvalidSecret("a signing secret is base64 after its prefix") from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise InvalidSecret(f"a signing secret holds {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes")
    return key


def new_webhook_id(now: datetime | None = None) -> str:
    """``msg_`` and 26 characters that sort as the time they were made (a ULID: 48 bits of
    milliseconds, then 80 random bits; ids of one millisecond are in no order among themselves)."""
    millis = int((now or datetime.now(UTC)).timestamp() * 1000)
    value = (millis << _RANDOM_BITS) | secrets.randbits(_RANDOM_BITS)
    chars = []
    for _ in range(26):
        chars.append(_SORTABLE_ALPHABET[value & 31])
        value >>= 5
    return WEBHOOK_ID_PREFIX + "".join(reversed(chars))


@dataclass(frozen=True, slots=True)
class SigningKeys:
    """A destination's secrets: the current one, and during a rotation the previous one with
    the time it stops signing."""

    current: str = field(repr=False)
    previous: str = field(default="", repr=False)
    previous_expire_time: datetime | None = None

    def __post_init__(self) -> None:
        """Raises:
        InvalidSecret: a secret is malformed.
        ValueError: a previous secret without an expiry (it would sign forever).
        """
        secret_bytes(self.current)
        if self.previous:
            secret_bytes(self.previous)
            if self.previous_expire_time is None:
                raise ValueError("a previous secret needs the time it expires")

    def in_use(self, at: datetime) -> tuple[str, ...]:
        """The secrets that sign at ``at``: the current one first, then the previous one until
        it expires."""
        if self.previous and self.previous_expire_time is not None and at < self.previous_expire_time:
            return (self.current, self.previous)
        return (self.current,)

    def rotated(self, new_secret: str, previous_ttl: timedelta, now: datetime) -> SigningKeys:
        """These keys after a rotation to ``new_secret``: the current secret keeps signing too
        for ``previous_ttl`` (none when zero). A secret older than the current one is dropped
        at once, as only two signatures are sent.

        Raises:
            InvalidSecret: ``new_secret`` is malformed.
        """
        if previous_ttl <= timedelta(0):
            return SigningKeys(new_secret)
        return SigningKeys(new_secret, self.current, now + previous_ttl)


def signature_headers(keys: SigningKeys, webhook_id: str, body: bytes, at: datetime) -> dict[str, str]:
    """The three Standard Webhooks headers of one attempt sending ``body`` at ``at`` (an aware
    datetime; whole seconds are signed, as the timestamp header holds)."""
    seconds = int(at.timestamp())
    # The library reads the timestamp as UTC whatever its zone, so it gets one in UTC.
    timestamp = datetime.fromtimestamp(seconds, UTC)
    text = body.decode("utf-8")  # the library signs text; the bytes sent are these, UTF-8
    signatures = [Webhook(secret).sign(webhook_id, timestamp, text) for secret in keys.in_use(at)]
    return {
        WEBHOOK_ID_HEADER: webhook_id,
        WEBHOOK_TIMESTAMP_HEADER: str(seconds),
        WEBHOOK_SIGNATURE_HEADER: " ".join(signatures),
    }
