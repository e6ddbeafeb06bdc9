"""Outside JSON: one answer per edge of RFC 8259 and I-JSON (RFC 7493), and bounded decoding."""

from __future__ import annotations

import gzip
import zlib
from decimal import Decimal
from typing import Any

import pytest

from sendtime_common.json_input import (
    DEFAULT_MAX_DEPTH,
    JsonInputError,
    JsonReason,
    check_media_type,
    decode_content,
    dumps,
    parse_json,
)


def refused(data: bytes, **kwargs: Any) -> JsonInputError:
    with pytest.raises(JsonInputError) as caught:
        parse_json(data, **kwargs)
    return caught.value


def test_a_valid_body_parses_with_exact_numbers() -> None:
    value = parse_json(
        b'{"id": 9007199254740993, "price": 19.99, "big": 1E+300, "ok": [true, null, "\xc3\xa9"]}'
    )
    assert value == {
        "id": 9007199254740993,
        "price": Decimal("19.99"),
        "big": Decimal("1E+300"),
        "ok": [True, None, "é"],
    }
    # Beyond 2^53 an integer stays exact (a float would give ...992).
    assert value["id"] == 2**53 + 1
    assert isinstance(value["price"], Decimal)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"id": 1,', "Expecting property name"),
        (b"[1, 2", "Expecting ',' delimiter"),
        (b"", "Expecting value"),
        (b"{} {}", "Extra data"),
        (b"{'single': 'quotes'}", "Expecting property name"),
        (b"[01]", "Expecting ',' delimiter"),
    ],
)
def test_malformed_json_is_refused_with_its_position(data: bytes, message: str) -> None:
    error = refused(data)
    assert (error.reason, error.http_status) == (JsonReason.MALFORMED, 400)
    assert message in error.message and "line 1 column" in error.message


def test_a_duplicate_key_is_refused_with_its_path() -> None:
    error = refused(b'[{"ok": 1}, {"customer": {"email": "a@example.com", "email": "b@example.com"}}]')
    assert (error.reason, error.path) == (JsonReason.DUPLICATE_KEY, "$[1].customer.email")
    assert refused(b'{"a b": 1, "a b": 2}').path == '$["a b"]'


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_are_refused(constant: bytes) -> None:
    error = refused(b'{"amount": [1, ' + constant + b"]}")
    assert (error.reason, error.path) == (JsonReason.NOT_FINITE, "$.amount[1]")


@pytest.mark.parametrize(
    "number",
    [
        b"18446744073709551616",  # 2^64
        b"-9223372036854775809",  # below int64
        b"123456789012345678901234567890",
        b"1e309",
        b"-1.8e308",
        b"1e-400",  # below the smallest binary64: would read as 0
        b"1" * 101 + b".5",
        b"1e99999999999999999999999999",
    ],
)
def test_numbers_beyond_range_are_refused(number: bytes) -> None:
    error = refused(b'{"n": ' + number + b"}")
    assert (error.reason, error.path) == (JsonReason.NUMBER_OUT_OF_RANGE, "$.n")


def test_numbers_at_the_edges_of_the_range_are_kept_exactly() -> None:
    value = parse_json(
        b"[18446744073709551615, -9223372036854775808, 1.7976931348623157e308, 5e-324, 0e-999, -0]"
    )
    assert value == [2**64 - 1, -(2**63), Decimal("1.7976931348623157e308"), Decimal("5e-324"), 0, 0]


@pytest.mark.parametrize(
    ("data", "byte"),
    [(b'{"name": "\xff"}', 10), (b'["\xc3"]', 2), (b'["\xed\xa0\x80"]', 2)],  # the last: a UTF-8 surrogate
)
def test_invalid_utf8_is_refused_with_the_byte_offset(data: bytes, byte: int) -> None:
    error = refused(data)
    assert error.reason == JsonReason.INVALID_UTF8
    assert f"byte {byte}" in error.message


@pytest.mark.parametrize("escape", [rb"\ud800", rb"\udfff", rb"x\ud83d", rb"\ude00x", rb"\ude00\ud83d"])
def test_an_unpaired_surrogate_escape_is_refused(escape: bytes) -> None:
    error = refused(b'{"tags": ["ok", "' + escape + b'"]}')
    assert (error.reason, error.path) == (JsonReason.UNPAIRED_SURROGATE, "$.tags[1]")


def test_a_surrogate_pair_is_one_character() -> None:
    assert parse_json(rb'["\ud83d\ude00"]') == ["\U0001f600"]


def test_an_unpaired_surrogate_in_a_key_is_refused() -> None:
    error = refused(rb'{"\ud800": 1}')
    assert error.reason == JsonReason.UNPAIRED_SURROGATE


def test_nul_is_refused_even_escaped_and_other_escaped_controls_are_kept() -> None:
    error = refused(rb'{"note": "a\u0000b"}')
    assert (error.reason, error.path) == (JsonReason.CONTROL_CHARACTER, "$.note")
    assert parse_json(rb'["tab\there", "\u001b[0m", "\u007f\u0085"]') == ["tab\there", "\x1b[0m", "\x7f\x85"]


@pytest.mark.parametrize("raw", [b"\x00", b"\x01", b"\x1f", b"\n", b"\t"])
def test_a_raw_control_character_in_a_string_is_refused(raw: bytes) -> None:
    error = refused(b'{"note": "a' + raw + b'b"}')
    assert error.reason == JsonReason.CONTROL_CHARACTER
    assert "line 1 column 12" in error.message


@pytest.mark.parametrize(
    "data",
    [
        '["\ufffe"]'.encode(),
        '["\U0010ffff"]'.encode(),
        '["\ufdd0"]'.encode(),
        rb'["\uffff"]',
        rb'["\ud83f\udffe"]',
    ],
)
def test_noncharacters_are_refused(data: bytes) -> None:
    error = refused(data)
    assert (error.reason, error.path) == (JsonReason.NONCHARACTER, "$[0]")


def test_nesting_deeper_than_the_limit_is_refused() -> None:
    at_limit = b"[" * DEFAULT_MAX_DEPTH + b"]" * DEFAULT_MAX_DEPTH
    assert parse_json(at_limit) is not None
    error = refused(b"[" * (DEFAULT_MAX_DEPTH + 1) + b"]" * (DEFAULT_MAX_DEPTH + 1))
    assert error.reason == JsonReason.TOO_DEEP
    assert error.path == "$" + "[0]" * DEFAULT_MAX_DEPTH
    assert refused(b'{"a": {"b": {}}}', max_depth=2).path == "$.a.b"
    # Deeper than the parser's own recursion: refused, not a RecursionError.
    assert refused(b"[" * 200_000).reason == JsonReason.TOO_DEEP
    assert refused(b'{"a":' * 200_000).reason == JsonReason.TOO_DEEP


@pytest.mark.parametrize("bom", [b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff"])
def test_a_byte_order_mark_is_refused(bom: bytes) -> None:
    assert refused(bom + b"{}").reason == JsonReason.BYTE_ORDER_MARK


@pytest.mark.parametrize(
    ("data", "top_level"),
    [(b"[]", "object"), (b'"text"', "object"), (b"null", "array"), (b'{"events": []}', "array")],
)
def test_an_unexpected_top_level_type_is_refused(data: bytes, top_level: Any) -> None:
    error = refused(data, top_level=top_level)
    assert (error.reason, error.path) == (JsonReason.UNEXPECTED_TYPE, "$")
    assert top_level in error.message


def test_dumps_writes_back_exactly_what_was_parsed() -> None:
    data = '{"id":9007199254740993,"price":19.990,"e":1E+5,"s":"é\\"\\n","l":[true,false,null,-0.0]}'
    value = parse_json(data.encode())
    again = dumps(value)
    assert parse_json(again) == value
    assert (
        again
        == '{"id":9007199254740993,"price":19.990,"e":1E+5,"s":"é\\"\\n","l":[true,false,null,-0.0]}'.encode()
    )


# --- the HTTP layer ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "Application/JSON",
        "application/json; charset=utf-8",
        'application/json;charset="UTF-8"',
    ],
)
def test_json_media_types_are_accepted(content_type: str) -> None:
    check_media_type(content_type)


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/json; charset=iso-8859-1",
        "text/json",
    ],
)
def test_other_media_types_are_415(content_type: str | None) -> None:
    with pytest.raises(JsonInputError) as caught:
        check_media_type(content_type)
    assert (caught.value.reason, caught.value.http_status) == (JsonReason.UNSUPPORTED_MEDIA_TYPE, 415)


def test_gzip_and_deflate_bodies_are_decoded() -> None:
    body = b'{"id": 1}'
    assert decode_content(body, None, 100) == body
    assert decode_content(body, "identity", 100) == body
    assert decode_content(gzip.compress(body), "gzip", 100) == body
    assert decode_content(gzip.compress(body), "x-gzip", 100) == body
    assert decode_content(gzip.compress(body[:4]) + gzip.compress(body[4:]), "gzip", 100) == body
    assert decode_content(zlib.compress(body), "deflate", 100) == body
    raw = zlib.compressobj(wbits=-15)
    assert decode_content(raw.compress(body) + raw.flush(), "Deflate", 100) == body


def test_a_compressed_body_that_expands_past_the_limit_is_413_without_inflating_it() -> None:
    bomb = gzip.compress(b"0" * 50_000_000)  # 49 KB that inflate to 50 MB
    assert len(bomb) < 60_000
    with pytest.raises(JsonInputError) as caught:
        decode_content(bomb, "gzip", 1024 * 1024)
    assert (caught.value.reason, caught.value.http_status) == (JsonReason.BODY_TOO_LARGE, 413)
    exactly = gzip.compress(b"0" * 1024)
    assert len(decode_content(exactly, "gzip", 1024)) == 1024


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, gzip", "deflate, br", "x-custom"])
def test_unsupported_content_encodings_are_415(encoding: str) -> None:
    with pytest.raises(JsonInputError) as caught:
        decode_content(b"{}", encoding, 100)
    assert (caught.value.reason, caught.value.http_status) == (JsonReason.UNSUPPORTED_CONTENT_ENCODING, 415)


@pytest.mark.parametrize(
    ("body", "encoding"),
    [
        (b"{}", "gzip"),  # not gzip at all
        (gzip.compress(b'{"id": 1}')[:-6], "gzip"),  # truncated
        (gzip.compress(b"{}") + b"trailing", "gzip"),
        (zlib.compress(b"{}") + b"x", "deflate"),
        (b"", "gzip"),
    ],
    # Not the bodies: gzip's header holds the time, and xdist's workers must collect alike.
    ids=["not-gzip", "truncated-gzip", "gzip-then-bytes", "deflate-then-bytes", "empty-gzip"],
)
def test_a_corrupt_compressed_body_is_400(body: bytes, encoding: str) -> None:
    with pytest.raises(JsonInputError) as caught:
        decode_content(body, encoding, 100)
    assert (caught.value.reason, caught.value.http_status) == (JsonReason.CONTENT_ENCODING_INVALID, 400)


def test_an_error_as_json_names_reason_message_and_path() -> None:
    error = refused(b'{"a": NaN}')
    assert error.to_json() == {
        "reason": "JSON_NOT_FINITE",
        "message": "NaN is not a JSON number",
        "path": "$.a",
    }
    assert refused(b"[").to_json().keys() == {"reason", "message"}


def test_a_decimal_written_without_point_or_exponent_keeps_one() -> None:
    """Found by tests/fuzz: 1234567890123456789012e0 parsed as a Decimal, dumps wrote it as an
    integer, and that did not parse back (an integer beyond 64 bits)."""
    value = parse_json(b"[1234567890123456789012e0, 5e0, 0e0]")
    assert dumps(value) == b"[1234567890123456789012E0,5E0,0E0]"
    assert parse_json(dumps(value)) == value
