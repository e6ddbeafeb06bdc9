"""What ``sendtime import`` reads: one input record becomes one ``Event``, or the reasons it cannot.

Pure functions and small value types, no I/O: a caller reads the records (see ``records``) and
passes their text here. A record that cannot become an event is ``Rejected`` with field
violations, like ingest's own rejections; a file that cannot be imported at all (a CSV header
without identifier columns, an unknown catalog column) raises ``BadFile``.

Every event gets a deterministic id when its record carries none: ``import:`` and a SHA-256 of
the format and the event's canonical JSON (everything but the id), so importing the same file
again sends the same ids and ingest answers DUPLICATE instead of storing a second event.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.type import money_pb2

from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.errors import FieldViolation

EVENT_ID_PREFIX = "import:"
EVENT_ID_DIGEST_CHARS = 40  # 160 bits of SHA-256
IDENTIFIER_COLUMNS = ("user_id", "email", "anonymous_id", "crm_id", "device_id")
OCCURRED_AT_COLUMN = "occurred_at"
CATALOG_CUSTOMER = ingest_pb2.CustomerIdentifiers(crm_id="catalog")
CATALOG_REQUIRED_COLUMNS = ("sku", "name", "price", "currency")
CATALOG_OPTIONAL_COLUMNS = ("category", "image_url", "url", "in_stock", OCCURRED_AT_COLUMN)
_NANOS_PER_UNIT = 1_000_000_000
_INT64_MAX = 2**63 - 1
# --typed: a plain decimal (no exponent, no leading zeros, so zip codes stay text) of at most 15
# significant digits, which a Struct's double holds exactly.
_TYPED_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?")
_MAX_TYPED_DIGITS = 15
_TRUE = frozenset({"true", "1"})
_FALSE = frozenset({"false", "0", ""})


class Format(StrEnum):
    """An input format (the value of ``--format``)."""

    JSONL = "jsonl"
    TRAITS_CSV = "traits-csv"
    CATALOG_CSV = "catalog-csv"

    @property
    def is_csv(self) -> bool:
        return self is not Format.JSONL


_EXTENSIONS = {".jsonl": Format.JSONL, ".ndjson": Format.JSONL, ".csv": Format.TRAITS_CSV}


def format_for_path(path: Path) -> Format | None:
    """The format a file's extension implies (``.jsonl``/``.ndjson``, ``.csv`` = traits); None
    when the extension says nothing (then ``--format`` is needed)."""
    return _EXTENSIONS.get(path.suffix.lower())


class BadFile(ValueError):
    """The file cannot be imported at all; the message says why and what to change."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record that is not an event, with the reasons."""

    reasons: tuple[FieldViolation, ...]


Mapped = ingest_pb2.Event | Rejected


def rejected(field: str, description: str) -> Rejected:
    return Rejected((FieldViolation(field, description),))


def describe(violation: FieldViolation) -> str:
    """``field: description``, or the description alone for a reason about the whole record."""
    return f"{violation.field}: {violation.description}" if violation.field else violation.description


# --- event ids ---------------------------------------------------------------------------------


def canonical_json(event: ingest_pb2.Event) -> str:
    """The event without its id as compact JSON with sorted keys: equal events, equal text."""
    without_id = ingest_pb2.Event()
    without_id.CopyFrom(event)
    without_id.ClearField("event_id")
    return json.dumps(json_format.MessageToDict(without_id), sort_keys=True, separators=(",", ":"))


def derive_event_id(file_format: Format, event: ingest_pb2.Event) -> str:
    """``import:`` + a SHA-256 prefix of the format and the event's canonical JSON."""
    digest = hashlib.sha256(f"{file_format.value}\n{canonical_json(event)}".encode()).hexdigest()
    return EVENT_ID_PREFIX + digest[:EVENT_ID_DIGEST_CHARS]


def _with_id(file_format: Format, event: ingest_pb2.Event) -> ingest_pb2.Event:
    if not event.event_id:
        event.event_id = derive_event_id(file_format, event)
    return event


# --- JSONL -------------------------------------------------------------------------------------


class _NotFinite(ValueError):
    pass


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _NotFinite(text)
    return value


def _no_constant(text: str) -> float:
    raise _NotFinite(text)


def parse_jsonl_line(text: str) -> Mapped:
    """One JSONL line: a ``sendtime.ingest.v1.Event`` in protobuf JSON form. The source defaults
    to EVENT_SOURCE_IMPORT; a missing event_id is derived."""
    try:
        data = json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        return rejected("", f"invalid JSON: {exc}")
    except _NotFinite:  # found by tests/fuzz: 1e999 parsed as Infinity, which no event can carry
        return rejected("", "invalid JSON: a number beyond a double, NaN or Infinity")
    except RecursionError:  # found by tests/fuzz: 50,000 nested arrays
        return rejected("", "invalid JSON: nested too deeply")
    if not isinstance(data, dict):
        return rejected("", f"must be a JSON object (an Event), not {type(data).__name__}")
    event = ingest_pb2.Event()
    try:
        json_format.ParseDict(data, event)
    except json_format.ParseError as exc:
        # The first line; the rest lists every field name of Event.
        return rejected("", f"not a sendtime.ingest.v1.Event: {str(exc).splitlines()[0]}")
    if event.source == ingest_pb2.EVENT_SOURCE_UNSPECIFIED:
        event.source = ingest_pb2.EVENT_SOURCE_IMPORT
    return _with_id(Format.JSONL, event)


# --- CSV values --------------------------------------------------------------------------------


def parse_csv_record(text: str) -> list[str]:
    """The cells of one CSV record (which may span lines inside quotes)."""
    rows = list(csv.reader(io.StringIO(text, newline="")))
    return rows[0] if rows else []


def parse_timestamp(text: str) -> datetime:
    """An ISO 8601 time such as ``2026-03-01T09:30:00+01:00``, ``...Z`` or ``2026-03-01``;
    without an offset it is UTC.

    Raises:
        ValueError: not such a time.
    """
    value = datetime.fromisoformat(text.strip())
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def timestamp(at: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(at)
    return stamp


def decimal_to_money(amount: str, currency: str) -> money_pb2.Money:
    """An exact ``google.type.Money`` from a decimal string such as ``"19.99"``.

    Raises:
        ValueError: not a plain decimal, more than 9 decimal places, or too large.
    """
    try:
        value = Decimal(amount.strip())
    except InvalidOperation:
        raise ValueError(f"not a decimal number: {amount!r}") from None
    if not value.is_finite():
        raise ValueError(f"not a decimal number: {amount!r}")
    units = int(value)  # toward zero, so units and nanos share the sign, as Money requires
    nanos = (value - units) * _NANOS_PER_UNIT
    if nanos != nanos.to_integral_value():
        raise ValueError(f"at most 9 decimal places: {amount!r}")
    if abs(units) > _INT64_MAX:
        raise ValueError(f"too large: {amount!r}")
    return money_pb2.Money(currency_code=currency.strip().upper(), units=units, nanos=int(nanos))


def parse_bool(text: str) -> bool:
    """``true``/``1`` or ``false``/``0``/empty, in any case.

    Raises:
        ValueError: anything else.
    """
    folded = text.strip().lower()
    if folded in _TRUE:
        return True
    if folded in _FALSE:
        return False
    raise ValueError(f"must be true, false, 1 or 0, not {text!r}")


def typed_value(text: str) -> str | float | bool:
    """``--typed``: ``true``/``false`` become booleans, plain decimals of at most 15 significant
    digits numbers; everything else (``007``, ``1e3``, long ids) stays text."""
    folded = text.lower()
    if folded in ("true", "false"):
        return folded == "true"
    if _TYPED_NUMBER.fullmatch(text) and len(text.lstrip("-0.").replace(".", "")) <= _MAX_TYPED_DIGITS:
        return float(text)
    return text


# --- CSV layouts -------------------------------------------------------------------------------


class RowMapper(Protocol):
    """Turns the cells of one CSV data row into an event (a layout made from the header)."""

    def map_row(self, cells: Sequence[str], default_occurred_at: datetime) -> Mapped: ...


def _header_names(header: Sequence[str]) -> list[str]:
    names = [name.strip() for name in header]
    if not any(names):
        raise BadFile("the first line must be a header row naming the columns")
    for position, name in enumerate(names, start=1):
        if not name:
            raise BadFile(f"header column {position} has no name")
    seen: set[str] = set()
    for name in names:
        if name.lower() in seen:
            raise BadFile(f"header column {name!r} appears twice")
        seen.add(name.lower())
    return names


def _cells_by_column(names: Sequence[str], cells: Sequence[str]) -> dict[str, str] | Rejected:
    if len(cells) > len(names):
        return rejected("", f"has {len(cells)} cells but the header has {len(names)} columns")
    # Missing trailing cells are empty (spreadsheets drop them).
    return {name: cell.strip() for name, cell in zip(names, cells, strict=False)}


def _occurred_at(cells: Mapping[str, str], default: datetime) -> datetime | Rejected:
    text = cells.get(OCCURRED_AT_COLUMN, "")
    if not text:
        return default
    try:
        return parse_timestamp(text)
    except ValueError:
        return rejected(OCCURRED_AT_COLUMN, f"not an ISO 8601 time: {text!r}")


@dataclass(frozen=True, slots=True)
class TraitsLayout:
    """A traits CSV: identifier columns, an optional ``occurred_at``, every other column a trait.
    Each row becomes an ``identify`` event."""

    names: tuple[str, ...]  # as in the header; identifier and occurred_at columns lower-cased
    typed: bool = False

    @classmethod
    def from_header(cls, header: Sequence[str], *, typed: bool = False) -> TraitsLayout:
        """Raises:
        BadFile: no header, unnamed or repeated columns, or no identifier column."""
        names = [
            name.lower() if name.lower() in (*IDENTIFIER_COLUMNS, OCCURRED_AT_COLUMN) else name
            for name in _header_names(header)
        ]
        if not any(name in IDENTIFIER_COLUMNS for name in names):
            hint = " (for a product catalog use --format catalog-csv)" if "sku" in names else ""
            raise BadFile(
                f"the header needs at least one identifier column: {', '.join(IDENTIFIER_COLUMNS)}{hint}"
            )
        return cls(tuple(names), typed)

    @property
    def trait_columns(self) -> tuple[str, ...]:
        return tuple(n for n in self.names if n not in IDENTIFIER_COLUMNS and n != OCCURRED_AT_COLUMN)

    def map_row(self, cells: Sequence[str], default_occurred_at: datetime) -> Mapped:
        by_column = _cells_by_column(self.names, cells)
        if isinstance(by_column, Rejected):
            return by_column
        customer = ingest_pb2.CustomerIdentifiers(
            **{name: by_column[name] for name in IDENTIFIER_COLUMNS if by_column.get(name)}
        )
        if not any(by_column.get(name) for name in IDENTIFIER_COLUMNS):
            return rejected("customer", f"at least one of {', '.join(IDENTIFIER_COLUMNS)} is required")
        occurred_at = _occurred_at(by_column, default_occurred_at)
        if isinstance(occurred_at, Rejected):
            return occurred_at
        traits = struct_pb2.Struct()
        for name in self.trait_columns:
            value = by_column.get(name, "")
            if value:
                traits[name] = typed_value(value) if self.typed else value
        if not traits.fields:
            return rejected("traits", "every trait cell is empty: at least one trait is required")
        event = ingest_pb2.Event(
            customer=customer,
            occurred_at=timestamp(occurred_at),
            source=ingest_pb2.EVENT_SOURCE_IMPORT,
            identify=ingest_pb2.Identify(traits=traits),
        )
        return _with_id(Format.TRAITS_CSV, event)


@dataclass(frozen=True, slots=True)
class CatalogLayout:
    """A catalog CSV: sku, name, price, currency and optionally category, image_url, url,
    in_stock, occurred_at. Each row becomes a ``product_upserted`` event of the customer
    ``{"crm_id": "catalog"}``."""

    names: tuple[str, ...]  # lower-cased

    @classmethod
    def from_header(cls, header: Sequence[str]) -> CatalogLayout:
        """Raises:
        BadFile: no header, unnamed, repeated, missing or unknown columns."""
        names = [name.lower() for name in _header_names(header)]
        missing = [name for name in CATALOG_REQUIRED_COLUMNS if name not in names]
        if missing:
            raise BadFile(f"the header lacks the required column(s): {', '.join(missing)}")
        unknown = [
            name for name in names if name not in (*CATALOG_REQUIRED_COLUMNS, *CATALOG_OPTIONAL_COLUMNS)
        ]
        if unknown:
            known = ", ".join((*CATALOG_REQUIRED_COLUMNS, *CATALOG_OPTIONAL_COLUMNS))
            raise BadFile(f"unknown column(s) {', '.join(unknown)}: a catalog has only {known}")
        return cls(tuple(names))

    def map_row(self, cells: Sequence[str], default_occurred_at: datetime) -> Mapped:
        by_column = _cells_by_column(self.names, cells)
        if isinstance(by_column, Rejected):
            return by_column
        reasons: list[FieldViolation] = []
        price: money_pb2.Money | None = None
        if not by_column.get("price"):
            reasons.append(FieldViolation("price", "required"))
        else:
            try:
                price = decimal_to_money(by_column["price"], by_column.get("currency", ""))
            except ValueError as exc:
                reasons.append(FieldViolation("price", str(exc)))
        in_stock = False
        try:
            in_stock = parse_bool(by_column.get("in_stock", ""))
        except ValueError as exc:
            reasons.append(FieldViolation("in_stock", str(exc)))
        occurred_at = _occurred_at(by_column, default_occurred_at)
        if isinstance(occurred_at, Rejected):
            reasons.extend(occurred_at.reasons)
        if reasons or price is None or isinstance(occurred_at, Rejected):
            return Rejected(tuple(reasons))
        event = ingest_pb2.Event(
            customer=CATALOG_CUSTOMER,
            occurred_at=timestamp(occurred_at),
            source=ingest_pb2.EVENT_SOURCE_IMPORT,
            product_upserted=ingest_pb2.ProductUpserted(
                sku=by_column.get("sku", ""),
                name=by_column.get("name", ""),
                price=price,
                category=by_column.get("category", ""),
                image_url=by_column.get("image_url", ""),
                url=by_column.get("url", ""),
                in_stock=in_stock,
            ),
        )
        return _with_id(Format.CATALOG_CSV, event)


def layout_for(file_format: Format, header: Sequence[str], *, typed: bool) -> RowMapper:
    """The row mapper for a CSV format, from its header row.

    Raises:
        BadFile: the header does not fit the format.
    """
    if file_format is Format.TRAITS_CSV:
        return TraitsLayout.from_header(header, typed=typed)
    if file_format is Format.CATALOG_CSV:
        return CatalogLayout.from_header(header)
    raise ValueError(f"{file_format} is not a CSV format")
