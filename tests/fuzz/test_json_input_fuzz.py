"""The JSON input module under arbitrary bytes: a value or a JsonInputError, nothing else."""

from __future__ import annotations

import gzip
import zlib
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from sendtime_common import json_input
from sendtime_common.json_input import JsonInputError, check_media_type, decode_content, parse_json
from tests.fuzz.conftest import fuzzing
from tests.fuzz.strategies import any_text, json_values

# Fragments that make a JSON parser take its rarer paths.
FRAGMENTS = [
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b'"',
    b"\\",
    b"\\u",
    b"\\ud800",
    b"\\udc00",
    b"\\u0000",
    b"0",
    b"-",
    b"1e",
    b"1E400",
    b".5",
    b"NaN",
    b"Infinity",
    b"true",
    b"null",
    b"\xef\xbb\xbf",
    b"\xff",
    b"\xed\xa0\x80",
    b"\xef\xbf\xbe",
    b'"a"',
    b" ",
    b"\t",
    b"\x00",
    b"18446744073709551616",
]
json_ish = st.lists(st.sampled_from(FRAGMENTS) | st.binary(max_size=4), max_size=40).map(b"".join)


def parsed_or_refused(data: bytes) -> Any:
    try:
        value = parse_json(data)
    except JsonInputError as exc:
        assert exc.reason in json_input.JsonReason
        assert exc.http_status == 400
        return None
    # Whatever parses writes back to the same value.
    assert parse_json(json_input.dumps(value)) == value
    return value


@settings(fuzzing())
@given(st.binary(max_size=200))
@example(b"[" * 100_000)  # deeper than the C parser's recursion: once a RecursionError
@example(b'{"a": 1, "a": 2}')
@example(b'["\\ud800"]')
def test_arbitrary_bytes(data: bytes) -> None:
    parsed_or_refused(data)


@settings(fuzzing())
@given(json_ish)
def test_json_like_bytes(data: bytes) -> None:
    parsed_or_refused(data)


@settings(fuzzing())
@given(json_values, st.integers(0, 200), st.binary(max_size=3))
def test_valid_json_with_a_cut_or_an_insertion(value: Any, at: int, insert: bytes) -> None:
    text = json_input.dumps(value)
    assert parse_json(text) == value
    parsed_or_refused(text[:at] + insert + text[at:])
    parsed_or_refused(text[:at])


@settings(fuzzing())
@given(
    st.binary(max_size=100) | json_ish.map(gzip.compress) | json_ish.map(zlib.compress),
    st.sampled_from(["", "identity", "gzip", "x-gzip", "deflate", "br", "gzip, gzip"]) | any_text,
    st.integers(0, 64),
)
def test_content_decoding(body: bytes, coding: str, limit: int) -> None:
    try:
        decoded = decode_content(body, coding, limit)
    except JsonInputError as exc:
        assert exc.http_status in (400, 413, 415)
    else:
        assert decoded == body or len(decoded) <= limit


@settings(fuzzing())
@given(st.none() | any_text)
def test_media_types(content_type: str | None) -> None:
    try:
        check_media_type(content_type)
    except JsonInputError as exc:
        assert exc.http_status == 415
