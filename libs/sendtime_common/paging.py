"""AIP-158 page tokens: opaque to clients, tied to the request's filters.

A token carries the position after the last item returned and a fingerprint of the filters it
was issued for; reusing it with other filters is an error (AIP-158 requires the other request
fields to stay the same).

A token is not signed: a caller can write one. So decoding accepts only what the listings can
query with (short strings without NUL, 64-bit integers) and refuses the rest, as it refuses a
malformed token, with InvalidPageToken (tests/fuzz/test_fuzz_page_tokens.py).
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
# Our tokens are well under this; a longer one is refused before it is decoded.
MAX_PAGE_TOKEN_CHARS = 4096
MAX_POSITION_TEXT = 1000


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
    if len(token) > MAX_PAGE_TOKEN_CHARS:
        raise InvalidPageToken(f"is longer than this API's page tokens ({MAX_PAGE_TOKEN_CHARS} characters)")
    try:
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        position, fingerprint = body["p"], body["f"]
    except (binascii.Error, ValueError, KeyError, TypeError, RecursionError):
        raise InvalidPageToken("is not a page token from this API") from None
    if fingerprint != _fingerprint(filters) or not isinstance(position, list):
        raise InvalidPageToken("was issued for a request with other filters")
    if not all(_queryable(value) for value in position):
        raise InvalidPageToken("is not a page token from this API")
    return position


def _queryable(value: Any) -> bool:
    """Whether a position value is one a listing can pass to PostgreSQL as text or bigint."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    return isinstance(value, str) and len(value) <= MAX_POSITION_TEXT and "\x00" not in value


def encode_id_position(key: str, filters: dict[str, Any]) -> str:
    """A token for keyset paging by id: after ``key``, the id of the last item."""
    return encode_page_token([key], filters)


def decode_id_position(token: str, filters: dict[str, Any]) -> str | None:
    """The id ``encode_id_position`` put in ``token``; None for no token (the first page).

    Raises:
        InvalidPageToken: not such a token, or issued for other filters.
    """
    if not token:
        return None
    position = decode_page_token(token, filters)
    if len(position) != 1 or not isinstance(position[0], str):
        raise InvalidPageToken("is not a page token from this API")
    return position[0]


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
