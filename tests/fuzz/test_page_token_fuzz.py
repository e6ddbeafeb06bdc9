"""Fuzzing page tokens (AIP-158): a token is text the caller sends back, so it may be anything.
Decoding gives a position the listings can query with, or InvalidPageToken (INVALID_ARGUMENT
on page_token), never another exception (INTERNAL) and never a value the database refuses."""

from __future__ import annotations

import base64
import json
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from sendtime_common.paging import (
    MAX_PAGE_TOKEN_CHARS,
    InvalidPageToken,
    decode_page_token,
    decode_time_position,
    encode_page_token,
)
from tests.fuzz.conftest import fuzzing

FILTERS: dict[str, Any] = {"state": 1}
JSON_VALUES: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)


def token_of(body: str) -> str:
    return base64.urlsafe_b64encode(body.encode(errors="surrogatepass")).decode().rstrip("=")


def storable(value: Any) -> bool:
    """What PostgreSQL takes as a text or bigint parameter."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    return isinstance(value, str) and "\x00" not in value and len(value) <= 1000


TOKENS = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda raw: base64.urlsafe_b64encode(raw).decode()),
    st.builds(lambda position: token_of(json.dumps({"p": position, "f": ""})), JSON_VALUES),
    st.builds(lambda position: encode_page_token(position, FILTERS), st.lists(JSON_VALUES, max_size=3)),
)


@settings(fuzzing())
@given(TOKENS)
@example(token_of("[" * 100_000))
@example(encode_page_token(["2026-01-01T00:00:00", 1e999], FILTERS))
@example(encode_page_token(["2026-01-01T00:00:00", "a\x00b"], FILTERS))
@example(encode_page_token(["2026-01-01T00:00:00", 2**80], FILTERS))
@example("A" * (MAX_PAGE_TOKEN_CHARS + 1))
def test_any_page_token_is_a_usable_position_or_invalid(token: str) -> None:
    for key in (int, str):
        try:
            at, position_key = decode_time_position(token, FILTERS, key)
        except InvalidPageToken as exc:
            assert str(exc)
            continue
        assert at.year >= 1 and storable(position_key)
    try:
        position = decode_page_token(token, FILTERS)
    except InvalidPageToken:
        return
    assert all(storable(value) for value in position)
