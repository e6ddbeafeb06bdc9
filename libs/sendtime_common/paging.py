"""AIP-158 page tokens: opaque to clients, tied to the request's filters.

A token carries the position after the last item returned and a fingerprint of the filters it
was issued for; reusing it with other filters is an error (AIP-158 requires the other request
fields to stay the same).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

K = TypeVar("K")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


class InvalidPageToken(ValueError):
    """The token is malformed or was issued for a request with other filters."""


def page_size(requested: int) -> int:
    """The page size to use: the default for 0, capped at the maximum.

    Raises:
        ValueError: the requested size is negative.
    """
    if requested < 0:
        raise ValueError("must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _fingerprint(filters: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(filters, sort_keys=True).encode()).hexdigest()[:16]


def encode_page_token(position: list[Any], filters: dict[str, Any]) -> str:
    body = json.dumps({"p": position, "f": _fingerprint(filters)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def decode_page_token(token: str, filters: dict[str, Any]) -> list[Any]:
    """The position a token was issued at.

    Raises:
        InvalidPageToken: it is not one of ours, or the filters differ.
    """
    try:
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        position, fingerprint = body["p"], body["f"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise InvalidPageToken("is not a page token from this API") from None
    if fingerprint != _fingerprint(filters) or not isinstance(position, list):
        raise InvalidPageToken("was issued for a request with other filters")
    return position


def encode_time_position(at: datetime, key: str | int, filters: dict[str, Any]) -> str:
    """A token for keyset paging newest first: after (``at``, ``key``) of the last item."""
    return encode_page_token([at.isoformat(), key], filters)


def decode_time_position(token: str, filters: dict[str, Any], key: Callable[[Any], K]) -> tuple[datetime, K]:
    """The (time, key) position ``encode_time_position`` put in ``token``; ``key`` converts the key.

    Raises:
        InvalidPageToken: not such a token, or issued for other filters.
    """
    position = decode_page_token(token, filters)
    try:
        at, raw_key = position
        return datetime.fromisoformat(at), key(raw_key)
    except (ValueError, TypeError):
        raise InvalidPageToken("is not a page token from this API") from None
