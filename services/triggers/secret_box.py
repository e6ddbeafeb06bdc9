"""Webhook signing secrets at rest: sealed with AES-256-GCM under a key only the triggers
service holds (``TRIGGERS_SECRET_KEYS``), so a database dump, a backup or a replica, or anyone
who can read the tables, has no secret to sign webhooks with. The service has to be able to
sign, so a one-way hash (as for API keys) will not do.

A sealed value is ``0x01``, the first 8 bytes of the SHA-256 of the key that sealed it (so the
key is found without trying each), a 12-byte random nonce, then the ciphertext and its tag. The
associated data names what the value belongs to (a destination's id): a sealed value copied
onto another row does not open there.

Several keys allow rotation: new values are sealed with the first, and values sealed with the
others still open. A value sealed with a key since removed cannot be opened (``SealedWithUnknownKey``);
rotating the destination's secret makes a new one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Sequence
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES: Final = 32
_VERSION: Final = b"\x01"
_KEY_ID_BYTES: Final = 8
_NONCE_BYTES: Final = 12


class SealedWithUnknownKey(ValueError):
    """The value was sealed with a key this box does not hold (removed, or another deployment's)."""


class CannotOpen(ValueError):
    """The value is damaged, or it belongs to something else than the associated data names."""


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:_KEY_ID_BYTES]


class SecretBox:
    def __init__(self, keys: Sequence[bytes]) -> None:
        """``keys``: 32 bytes each, the one new values are sealed with first.

        Raises:
            ValueError: no key, or a key that is not 32 bytes.
        """
        if not keys:
            raise ValueError("at least one key")
        for position, key in enumerate(keys, start=1):
            if len(key) != KEY_BYTES:
                raise ValueError(f"key {position} has {len(key)} bytes; {KEY_BYTES} wanted")
        self._current = keys[0]
        self._keys = {_key_id(key): AESGCM(key) for key in reversed(keys)}

    @classmethod
    def parse(cls, text: str) -> SecretBox:
        """From ``TRIGGERS_SECRET_KEYS``: comma-separated keys, each the base64 of 32 random
        bytes (``head -c 32 /dev/urandom | base64``), the current one first.

        Raises:
            ValueError: none given, or a key that is not base64 of 32 bytes (by position).
        """
        keys = []
        for position, entry in enumerate((e.strip() for e in text.split(",") if e.strip()), start=1):
            try:
                keys.append(base64.b64decode(entry, validate=True))
            except binascii.Error:
                raise ValueError(f"key {position} is not base64") from None
        return cls(keys)

    @classmethod
    def generate(cls) -> SecretBox:
        """A box with a new random key (tests, local runs)."""
        return cls([os.urandom(KEY_BYTES)])

    def seal(self, plaintext: bytes, associated_data: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        key_id = _key_id(self._current)
        sealed = self._keys[key_id].encrypt(nonce, plaintext, associated_data)
        return _VERSION + key_id + nonce + sealed

    def open(self, sealed: bytes, associated_data: bytes) -> bytes:
        """Raises:
        SealedWithUnknownKey: sealed with a key this box does not hold.
        CannotOpen: damaged, or sealed for other associated data.
        """
        header = len(_VERSION) + _KEY_ID_BYTES + _NONCE_BYTES
        if len(sealed) <= header or not sealed.startswith(_VERSION):
            raise CannotOpen("not a sealed value")
        key_id = sealed[len(_VERSION) : len(_VERSION) + _KEY_ID_BYTES]
        cipher = self._keys.get(key_id)
        if cipher is None:
            raise SealedWithUnknownKey("sealed with a key that is no longer configured")
        nonce = sealed[len(_VERSION) + _KEY_ID_BYTES : header]
        try:
            return cipher.decrypt(nonce, sealed[header:], associated_data)
        except InvalidTag:
            raise CannotOpen("damaged, or sealed for something else") from None
