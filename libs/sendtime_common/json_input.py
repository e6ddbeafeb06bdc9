"""JSON from outside (webhook bodies, later the HTTP face): read strictly, with one documented
answer per edge.

RFC 8259 is the grammar and I-JSON (RFC 7493) the profile: a body that is not I-JSON is refused
whole, with a machine-readable reason (``JsonReason``) and the JSON path where that is known,
never parsed leniently into something the sender did not mean. docs/limits.md ("Webhook bodies
and JSON") has the table of edges and answers.

Numbers stay exact: integers are Python ints (beyond 2^53 too), other numbers ``Decimal``,
never float. ``dumps`` writes such a value back exactly (the dead-letter store keeps webhook
items that way).

The HTTP layer around it is here too, as the HTTP face will share it: the media type check, and
``decode_content``, which undoes a ``Content-Encoding`` without ever holding more than the
caller's limit in memory (a 1 KB gzip bomb that expands to 1 GB is refused after the limit).
"""

from __future__ import annotations

import enum
import json
import re
import zlib
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

MEDIA_TYPE = "application/json"
DEFAULT_MAX_DEPTH = 64
# Long enough for any int64 or binary64 written out in full, short enough that no number costs
# more than a few microseconds to convert.
MAX_NUMBER_CHARS = 100
INT_MIN = -(2**63)  # int64 and uint64 ids both fit; anything wider fits no column or proto field
INT_MAX = 2**64 - 1
_DOUBLE_MAX = Decimal("1.7976931348623157e308")
_DOUBLE_MIN = Decimal("4.9e-324")  # the smallest binary64 above zero (subnormal)
SUPPORTED_ENCODINGS = ("gzip", "deflate")  # and identity; also the Accept-Encoding of a 415

_UTF8_BOM = b"\xef\xbb\xbf"
_OTHER_BOMS = (b"\xff\xfe", b"\xfe\xff")  # UTF-16 (and UTF-32 LE starts the same way)
# What a string may not hold, though JSON can escape it (\u0000, \ud800): NUL, which PostgreSQL
# text cannot store; a surrogate, which exists only in pairs (Python's json keeps a lone one);
# and the noncharacters I-JSON forbids. A raw control character is already a JSON syntax error.
_FORBIDDEN_CHAR = re.compile(
    "[\x00\ud800-\udfff\ufdd0-\ufdef\ufffe\uffff"
    + "".join(f"{chr(plane * 0x10000 + 0xFFFE)}{chr(plane * 0x10000 + 0xFFFF)}" for plane in range(1, 17))
    + "]"
)
# Only a \u escape or a raw noncharacter can put a forbidden character into a parsed string
# (valid UTF-8 holds no surrogate; the parser refuses raw control characters). These two find
# either in about a millisecond a megabyte, so the strings of a clean body are never visited one
# by one. A false alarm (a surrogate pair, an escaped backslash before "u0000") costs that visit.
_SUSPECT_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F]|[fF][dD][dDeE]|[fF]{3}[eEfF])")
# Noncharacters as UTF-8: U+FDD0-U+FDEF start EF B7, and every U+xFFFE/U+xFFFF ends BF BE/BF BF.
_NONCHARACTER_UTF8 = re.compile(rb"\xef\xb7|\xbf[\xbe\xbf]")
_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class JsonReason(enum.StrEnum):
    """Why a body was refused; stable, clients may branch on them."""

    MALFORMED = "JSON_MALFORMED"
    DUPLICATE_KEY = "JSON_DUPLICATE_KEY"
    NOT_FINITE = "JSON_NOT_FINITE"
    NUMBER_OUT_OF_RANGE = "JSON_NUMBER_OUT_OF_RANGE"
    INVALID_UTF8 = "JSON_INVALID_UTF8"
    UNPAIRED_SURROGATE = "JSON_UNPAIRED_SURROGATE"
    NONCHARACTER = "JSON_NONCHARACTER"
    CONTROL_CHARACTER = "JSON_CONTROL_CHARACTER"
    TOO_DEEP = "JSON_TOO_DEEP"
    BYTE_ORDER_MARK = "JSON_BYTE_ORDER_MARK"
    UNEXPECTED_TYPE = "JSON_UNEXPECTED_TYPE"
    BODY_TOO_LARGE = "BODY_TOO_LARGE"
    CONTENT_ENCODING_INVALID = "CONTENT_ENCODING_INVALID"
    UNSUPPORTED_CONTENT_ENCODING = "UNSUPPORTED_CONTENT_ENCODING"
    UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"


_HTTP_STATUS = {
    JsonReason.BODY_TOO_LARGE: 413,
    JsonReason.UNSUPPORTED_CONTENT_ENCODING: 415,
    JsonReason.UNSUPPORTED_MEDIA_TYPE: 415,
}


class JsonInputError(ValueError):
    """The input is refused. ``message`` and ``path`` may name keys the sender wrote, so they go
    back to the sender, never into a log; ``reason`` is safe to log."""

    def __init__(self, reason: JsonReason, message: str, path: str = "") -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.path = path

    @property
    def http_status(self) -> int:
        """400, or 413 and 415 for the body's size and encodings."""
        return _HTTP_STATUS.get(self.reason, 400)

    def to_json(self) -> dict[str, str]:
        """``{"reason", "message"[, "path"]}``, the ``error`` of an HTTP answer."""
        body = {"reason": str(self.reason), "message": self.message}
        if self.path:
            body["path"] = self.path
        return body


# --- the HTTP layer ---------------------------------------------------------------------------


def check_media_type(content_type: str | None) -> None:
    """``application/json``, with no charset or ``charset=utf-8`` (RFC 8259 JSON is UTF-8).

    Raises:
        JsonInputError: UNSUPPORTED_MEDIA_TYPE.
    """
    media_type, _, params = (content_type or "").partition(";")
    if media_type.strip().lower() != MEDIA_TYPE:
        raise JsonInputError(
            JsonReason.UNSUPPORTED_MEDIA_TYPE, f"the body must be sent as Content-Type: {MEDIA_TYPE}"
        )
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise JsonInputError(JsonReason.UNSUPPORTED_MEDIA_TYPE, "JSON must be UTF-8 (charset=utf-8)")


def decode_content(body: bytes, content_encoding: str | None, max_bytes: int) -> bytes:
    """``body`` with its ``Content-Encoding`` undone: identity, gzip or deflate (zlib, or raw
    deflate as some clients send it). At most ``max_bytes + 1`` bytes are ever inflated.

    Raises:
        JsonInputError: UNSUPPORTED_CONTENT_ENCODING (any other coding, or more than one),
            BODY_TOO_LARGE (it expands past ``max_bytes``), CONTENT_ENCODING_INVALID (corrupt
            or truncated).
    """
    codings = [c.strip().lower() for c in (content_encoding or "").split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return body
    if len(codings) > 1 or codings[0] not in ("gzip", "x-gzip", "deflate"):
        raise JsonInputError(
            JsonReason.UNSUPPORTED_CONTENT_ENCODING,
            f"Content-Encoding must be one of identity, {', '.join(SUPPORTED_ENCODINGS)}",
        )
    if codings[0] == "deflate":
        # RFC 9110's deflate is zlib-wrapped; raw deflate is told apart by its first byte.
        wbits = zlib.MAX_WBITS if body[:1] and body[0] & 0x0F == 8 else -zlib.MAX_WBITS
    else:
        wbits = zlib.MAX_WBITS | 16
    return _inflate(body, wbits, max_bytes)


def _inflate(data: bytes, wbits: int, max_bytes: int) -> bytes:
    out = bytearray()
    while True:  # once per gzip member: a gzip body may be several concatenated
        inflater = zlib.decompressobj(wbits)
        try:
            while data:
                out += inflater.decompress(data, max_bytes + 1 - len(out))
                if len(out) > max_bytes:
                    raise JsonInputError(
                        JsonReason.BODY_TOO_LARGE, f"the decoded body is larger than {max_bytes} bytes"
                    )
                if inflater.eof:
                    break
                data = inflater.unconsumed_tail
        except zlib.error:
            raise JsonInputError(
                JsonReason.CONTENT_ENCODING_INVALID, "the body is not valid for its Content-Encoding"
            ) from None
        if not inflater.eof:
            raise JsonInputError(JsonReason.CONTENT_ENCODING_INVALID, "the compressed body is truncated")
        data = inflater.unused_data
        if not data:
            return bytes(out)
        if wbits != zlib.MAX_WBITS | 16:
            raise JsonInputError(
                JsonReason.CONTENT_ENCODING_INVALID, "data follows the end of the compressed body"
            )


# --- parsing ----------------------------------------------------------------------------------


class _Refused:
    """What a parse hook returns for a value it refuses; the walk reports it with its path."""

    __slots__ = ("reason", "message")

    def __init__(self, reason: JsonReason, message: str) -> None:
        self.reason = reason
        self.message = message


class _DuplicateKeys(dict[str, Any]):
    """An object that named ``key`` twice, marked for the walk (which knows its path)."""

    __slots__ = ("key",)
    key: str


@dataclass(slots=True)
class _Hooks:
    """The parse hooks of one call; ``refused`` says whether any hook refused a value, so a
    clean body skips the walk's per-value checks."""

    refused: bool = False

    def integer(self, text: str) -> int | _Refused:
        if len(text) <= 20:
            value = int(text)
            if INT_MIN <= value <= INT_MAX:
                return value
        self.refused = True
        return _Refused(JsonReason.NUMBER_OUT_OF_RANGE, "integers must fit in 64 bits")

    def number(self, text: str) -> Decimal | _Refused:
        if len(text) <= MAX_NUMBER_CHARS:
            try:
                value = Decimal(text)
            except (InvalidOperation, ValueError, OverflowError):
                pass
            else:
                if value.is_zero() or _DOUBLE_MIN <= abs(value) <= _DOUBLE_MAX:
                    return value
        self.refused = True
        return _Refused(
            JsonReason.NUMBER_OUT_OF_RANGE,
            f"numbers must be in the range of IEEE 754 binary64, at most {MAX_NUMBER_CHARS} characters",
        )

    def constant(self, name: str) -> _Refused:
        self.refused = True
        return _Refused(JsonReason.NOT_FINITE, f"{name} is not a JSON number")

    def object(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) == len(pairs):
            return result
        self.refused = True
        marked = _DuplicateKeys(result)
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                marked.key = key
                break
            seen.add(key)
        return marked


_Where = tuple[Any, str | int] | None  # (the parent's _Where, key or index); None at the root


def _path(where: _Where) -> str:
    """``$.customer.tags[2]`` from the links of a walk: built only for an error."""
    parts: list[str] = []
    while where is not None:
        where, step = where
        if isinstance(step, int):
            parts.append(f"[{step}]")
        elif _PLAIN_KEY.match(step):
            parts.append(f".{step}")
        else:
            parts.append(f"[{json.dumps(step[:64])}]")
    return "$" + "".join(reversed(parts))


def _check_string(value: str, where: _Where) -> None:
    found = _FORBIDDEN_CHAR.search(value)
    if found is None:
        return
    char = found.group()
    if char == "\x00":
        raise JsonInputError(
            JsonReason.CONTROL_CHARACTER, "NUL (\\u0000) is not allowed in a string", _path(where)
        )
    if "\ud800" <= char <= "\udfff":
        raise JsonInputError(
            JsonReason.UNPAIRED_SURROGATE,
            "a string holds an unpaired surrogate (I-JSON forbids it)",
            _path(where),
        )
    raise JsonInputError(
        JsonReason.NONCHARACTER,
        f"a string holds the noncharacter U+{ord(char):04X} (I-JSON forbids it)",
        _path(where),
    )


_CONTAINERS = frozenset({dict, list, _DuplicateKeys})


def _walk(value: Any, max_depth: int, check_strings: bool, check_values: bool) -> None:
    """Depth, and (when asked) strings and refused values, with the path of the first problem.
    Iterative: the depth a parse reached is not the depth the stack has left. Unless values
    need checking, only containers are visited, and a path is built only for an error."""
    too_deep = f"nested more than {max_depth} levels deep"
    stack: list[tuple[Any, _Where, int]] = [(value, None, 0)]
    while stack:
        node, where, depth = stack.pop()
        if isinstance(node, dict):
            if depth >= max_depth:
                raise JsonInputError(JsonReason.TOO_DEEP, too_deep, _path(where))
            if isinstance(node, _DuplicateKeys):
                message = "an object names the same key twice (I-JSON forbids it)"
                raise JsonInputError(JsonReason.DUPLICATE_KEY, message, _path((where, node.key)))
            if check_strings:
                for key in node:
                    _check_string(key, (where, key))
            stack.extend(
                (item, (where, key), depth + 1)
                for key, item in node.items()
                if check_values or type(item) in _CONTAINERS
            )
        elif isinstance(node, list):
            if depth >= max_depth:
                raise JsonInputError(JsonReason.TOO_DEEP, too_deep, _path(where))
            stack.extend(
                (item, (where, i), depth + 1)
                for i, item in enumerate(node)
                if check_values or type(item) in _CONTAINERS
            )
        elif isinstance(node, _Refused):
            raise JsonInputError(node.reason, node.message, _path(where))
        elif check_strings and isinstance(node, str):
            _check_string(node, where)


TopLevel = Literal["object", "array"]


def parse_json(data: bytes, *, top_level: TopLevel | None = None, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """``data`` as an I-JSON value: dicts, lists, str, int, ``Decimal``, bool, None.

    Raises:
        JsonInputError: with one of the JSON_* reasons; ``path`` is the JSON path of the
            offending value where one is known (``$[3].email``).
    """
    if data.startswith(_UTF8_BOM) or data.startswith(_OTHER_BOMS):
        raise JsonInputError(JsonReason.BYTE_ORDER_MARK, "the body starts with a byte-order mark")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonInputError(
            JsonReason.INVALID_UTF8, f"the body is not valid UTF-8 (byte {exc.start})"
        ) from None
    hooks = _Hooks()
    try:
        value = json.loads(
            text,
            parse_int=hooks.integer,
            parse_float=hooks.number,
            parse_constant=hooks.constant,
            object_pairs_hook=hooks.object,
        )
    except json.JSONDecodeError as exc:
        # The message holds a position, never content.
        if exc.msg.startswith("Invalid control character"):
            raise JsonInputError(
                JsonReason.CONTROL_CHARACTER,
                f"a string holds an unescaped control character (line {exc.lineno} column {exc.colno})",
            ) from None
        raise JsonInputError(
            JsonReason.MALFORMED,
            f"the body is not valid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})",
        ) from None
    except RecursionError:
        raise JsonInputError(JsonReason.TOO_DEEP, f"nested more than {max_depth} levels deep") from None
    check_strings = bool(_NONCHARACTER_UTF8.search(data) or _SUSPECT_ESCAPE.search(text))
    _walk(value, max_depth, check_strings, hooks.refused or check_strings)
    if top_level == "object" and not isinstance(value, dict):
        raise JsonInputError(JsonReason.UNEXPECTED_TYPE, "the body must be a JSON object", "$")
    if top_level == "array" and not isinstance(value, list):
        raise JsonInputError(JsonReason.UNEXPECTED_TYPE, "the body must be a JSON array", "$")
    return value


def dumps(value: Any) -> bytes:
    """A value ``parse_json`` returned, as compact JSON that parses back to the same value:
    integers and ``Decimal`` exactly as they were (json.dumps cannot write a Decimal)."""
    parts: list[str] = []
    _dump(value, parts)
    return "".join(parts).encode("utf-8")


def _dump(value: Any, parts: list[str]) -> None:
    if isinstance(value, dict):
        parts.append("{")
        for i, (key, item) in enumerate(value.items()):
            parts.append("," if i else "")
            parts.append(json.dumps(key, ensure_ascii=False))
            parts.append(":")
            _dump(item, parts)
        parts.append("}")
    elif isinstance(value, list):
        parts.append("[")
        for i, item in enumerate(value):
            parts.append("," if i else "")
            _dump(item, parts)
        parts.append("]")
    elif isinstance(value, Decimal):  # finite: parse_json refuses the others
        text = str(value)
        # 1234567890123456789012e0 was a Decimal, but str() writes it as an integer, which
        # parses back as an int (here: out of range): keep a written exponent.
        parts.append(text if "." in text or "E" in text else f"{text}E0")
    else:  # str, int, bool, None
        parts.append(json.dumps(value, ensure_ascii=False))
