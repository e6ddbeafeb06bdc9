"""The pure parts of `sendtime import`: records, mapping lines to events, checkpoints, retries."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

from sendtime.ingest.v1 import ingest_pb2
from sendtime_cli import formats
from sendtime_cli.checkpoint import Checkpoint, CheckpointError, Counts, Fingerprint
from sendtime_cli.formats import BadFile, CatalogLayout, Format, Rejected, TraitsLayout
from sendtime_cli.importer import RetryPolicy, deliver, make_batches, retry_delay_s
from sendtime_cli.records import read_records
from sendtime_common.errors import FieldViolation, bad_request_status, retry_status

MTIME = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def reasons(mapped: formats.Mapped) -> list[str]:
    assert isinstance(mapped, Rejected), mapped
    return [formats.describe(r) for r in mapped.reasons]


# --- records -----------------------------------------------------------------------------------


def test_records_carry_line_numbers_and_offsets_and_skip_blank_lines() -> None:
    data = b'\xef\xbb\xbf{"a":1}\n\n  \n{"b":2}\r\n{"c":3}'
    records = list(read_records(io.BytesIO(data)))
    assert [(r.line, r.text) for r in records] == [(1, '{"a":1}'), (4, '{"b":2}'), (5, '{"c":3}')]
    assert records[-1].end_offset == len(data)
    # Resuming at a record's end offset continues with the next record and the right line number.
    resumed = list(read_records(io.BytesIO(data), start_offset=records[1].end_offset, start_line=5))
    assert [(r.line, r.text) for r in resumed] == [(5, '{"c":3}')]


def test_csv_records_span_quoted_line_breaks() -> None:
    data = b'user_id,note\nu1,"two\nlines, ""quoted"""\nu2,plain\n'
    records = list(read_records(io.BytesIO(data), csv=True))
    assert [(r.line, r.last_line) for r in records] == [(1, 1), (2, 3), (4, 4)]
    assert records[1].text is not None
    assert formats.parse_csv_record(records[1].text) == ["u1", 'two\nlines, "quoted"']


def test_bytes_that_are_not_utf8_make_a_record_without_text() -> None:
    (record,) = read_records(io.BytesIO(b"caf\xe9\n"))
    assert record.text is None and record.raw == b"caf\xe9"


# --- JSONL -------------------------------------------------------------------------------------


def test_jsonl_line_becomes_an_event_with_import_source_and_a_derived_id() -> None:
    line = (
        '{"customer": {"userId": "u1"}, "occurredAt": "2026-01-02T03:04:05Z", '
        '"identify": {"traits": {"a": "b"}}}'
    )
    event = formats.parse_jsonl_line(line)
    assert isinstance(event, ingest_pb2.Event)
    assert event.source == ingest_pb2.EVENT_SOURCE_IMPORT
    assert event.event_id.startswith("import:") and len(event.event_id) <= 128
    # The same event written differently (key order, spacing) gets the same id; another does not.
    same = formats.parse_jsonl_line(
        '{"identify":{"traits":{"a":"b"}},"occurredAt":"2026-01-02T03:04:05Z","customer":{"userId":"u1"}}'
    )
    other = formats.parse_jsonl_line(line.replace('"b"', '"c"'))
    assert isinstance(same, ingest_pb2.Event) and isinstance(other, ingest_pb2.Event)
    assert same.event_id == event.event_id != other.event_id


def test_jsonl_line_keeps_its_own_id_and_source() -> None:
    event = formats.parse_jsonl_line('{"eventId": "mine-1", "source": "EVENT_SOURCE_CRM"}')
    assert isinstance(event, ingest_pb2.Event)
    assert (event.event_id, event.source) == ("mine-1", ingest_pb2.EVENT_SOURCE_CRM)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{oops", "invalid JSON: Expecting property name enclosed in double quotes"),
        ("[1, 2]", "must be a JSON object (an Event), not list"),
        (
            '{"colour": "red"}',
            'not a sendtime.ingest.v1.Event: Message type "sendtime.ingest.v1.Event" has no',
        ),
        ('{"source": "NOPE"}', "not a sendtime.ingest.v1.Event: Failed to parse source field"),
        ('{"occurredAt": "yesterday"}', "not a sendtime.ingest.v1.Event: Failed to parse occurredAt"),
    ],
)
def test_jsonl_parse_errors_are_rejections_with_a_reason(line: str, expected: str) -> None:
    (reason,) = reasons(formats.parse_jsonl_line(line))
    assert reason.startswith(expected)
    assert "\n" not in reason


# --- traits CSV --------------------------------------------------------------------------------


def test_traits_row_becomes_identify_with_string_traits_and_the_default_time() -> None:
    layout = TraitsLayout.from_header(["Email", "user_id", "first_name", "plan", "age"])
    event = layout.map_row([" Ada@Example.com ", "", "Ada", "", "36"], MTIME)
    assert isinstance(event, ingest_pb2.Event)
    assert event.customer == ingest_pb2.CustomerIdentifiers(email="Ada@Example.com")
    assert json_format.MessageToDict(event.identify.traits) == {
        "first_name": "Ada",
        "age": "36",
    }  # empty skipped
    assert event.occurred_at.ToDatetime(tzinfo=UTC) == MTIME
    assert event.source == ingest_pb2.EVENT_SOURCE_IMPORT
    # Deterministic: the same row at the same time has the same id; at another time another one.
    again = layout.map_row([" Ada@Example.com ", "", "Ada", "", "36"], MTIME)
    later = layout.map_row([" Ada@Example.com ", "", "Ada", "", "36"], MTIME.replace(hour=13))
    assert isinstance(again, ingest_pb2.Event) and isinstance(later, ingest_pb2.Event)
    assert again.event_id == event.event_id != later.event_id


def test_traits_typed_converts_booleans_and_plain_numbers_only() -> None:
    layout = TraitsLayout.from_header(["user_id", "vip", "age", "zip", "score", "big"], typed=True)
    event = layout.map_row(["u1", "TRUE", "36", "01234", "-2.5", "12345678901234567"], MTIME)
    assert isinstance(event, ingest_pb2.Event)
    traits = json_format.MessageToDict(event.identify.traits)
    assert traits == {"vip": True, "age": 36.0, "zip": "01234", "score": -2.5, "big": "12345678901234567"}


def test_traits_row_occurred_at_column() -> None:
    layout = TraitsLayout.from_header(["user_id", "occurred_at", "plan"])
    event = layout.map_row(["u1", "2026-02-01T10:00:00+01:00", "pro"], MTIME)
    assert isinstance(event, ingest_pb2.Event)
    assert event.occurred_at.ToJsonString() == "2026-02-01T09:00:00Z"
    assert "occurred_at" not in event.identify.traits.fields
    naive = layout.map_row(["u1", "2026-02-01 10:00", "pro"], MTIME)
    assert isinstance(naive, ingest_pb2.Event)
    assert naive.occurred_at.ToJsonString() == "2026-02-01T10:00:00Z"  # no offset: UTC


@pytest.mark.parametrize(
    ("cells", "expected"),
    [
        (
            ["", "", "pro"],
            ["customer: at least one of user_id, email, anonymous_id, crm_id, device_id is required"],
        ),
        (["u1", "", ""], ["traits: every trait cell is empty: at least one trait is required"]),
        (["u1", "last tuesday", "pro"], ["occurred_at: not an ISO 8601 time: 'last tuesday'"]),
        (["u1", "", "pro", "extra"], ["has 4 cells but the header has 3 columns"]),
    ],
)
def test_bad_traits_rows_are_rejected_with_reasons(cells: list[str], expected: list[str]) -> None:
    layout = TraitsLayout.from_header(["user_id", "occurred_at", "plan"])
    assert reasons(layout.map_row(cells, MTIME)) == expected


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (["first_name", "plan"], "at least one identifier column"),
        (["sku", "name", "price"], "use --format catalog-csv"),
        (["user_id", "plan", "Plan"], "'Plan' appears twice"),
        (["user_id", "", "plan"], "column 2 has no name"),
    ],
)
def test_bad_traits_headers_make_a_bad_file(header: list[str], message: str) -> None:
    with pytest.raises(BadFile, match=message):
        TraitsLayout.from_header(header)


# --- catalog CSV -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("price", "units", "nanos"),
    [
        ("19.99", 19, 990_000_000),
        ("0.1", 0, 100_000_000),
        ("1234567890123.000000001", 1234567890123, 1),
        ("-0.5", 0, -500_000_000),
        ("7", 7, 0),
    ],
)
def test_money_is_exact(price: str, units: int, nanos: int) -> None:
    money = formats.decimal_to_money(price, " eur ")
    assert (money.currency_code, money.units, money.nanos) == ("EUR", units, nanos)
    assert Decimal(money.units) + Decimal(money.nanos) / 10**9 == Decimal(price)


@pytest.mark.parametrize("price", ["1.0000000001", "abc", "NaN", "Infinity", "1,50", "1e30"])
def test_money_refuses_what_it_cannot_hold_exactly(price: str) -> None:
    with pytest.raises(ValueError):
        formats.decimal_to_money(price, "EUR")


def test_catalog_row_becomes_product_upserted_for_the_catalog_customer() -> None:
    layout = CatalogLayout.from_header(["SKU", "name", "price", "currency", "category", "in_stock", "url"])
    event = layout.map_row(["sku-1", "Runner", "129.95", "eur", "shoes/running", "1", "https://x/1"], MTIME)
    assert isinstance(event, ingest_pb2.Event)
    assert event.customer == ingest_pb2.CustomerIdentifiers(crm_id="catalog")
    product = event.product_upserted
    assert (product.sku, product.name, product.category, product.in_stock) == (
        "sku-1",
        "Runner",
        "shoes/running",
        True,
    )
    assert (product.price.currency_code, product.price.units, product.price.nanos) == (
        "EUR",
        129,
        950_000_000,
    )
    assert event.event_id.startswith("import:")


def test_bad_catalog_rows_name_every_bad_cell() -> None:
    layout = CatalogLayout.from_header(["sku", "name", "price", "currency", "in_stock"])
    assert reasons(layout.map_row(["s", "n", "12,50", "EUR", "maybe"], MTIME)) == [
        "price: not a decimal number: '12,50'",
        "in_stock: must be true, false, 1 or 0, not 'maybe'",
    ]
    assert reasons(layout.map_row(["s", "n", "", "EUR", ""], MTIME)) == ["price: required"]


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (["sku", "name", "price"], "lacks the required column\\(s\\): currency"),
        (["sku", "name", "price", "currency", "colour"], "unknown column\\(s\\) colour"),
    ],
)
def test_bad_catalog_headers_make_a_bad_file(header: list[str], message: str) -> None:
    with pytest.raises(BadFile, match=message):
        CatalogLayout.from_header(header)


def test_bad_rows_keep_their_line_numbers_in_batches() -> None:
    data = b"user_id,plan\nu1,pro\n,pro\n\nu3,\nu4,free\n"
    layout = formats.layout_for(Format.TRAITS_CSV, ["user_id", "plan"], typed=False)
    records = read_records(io.BytesIO(data), start_offset=len(b"user_id,plan\n"), start_line=2, csv=True)
    batches = list(make_batches(records, Format.TRAITS_CSV, layout, MTIME, batch_size=2))
    assert [[line.record.line for line in b.lines] for b in batches] == [[2, 3], [5, 6]]
    rejected = {
        line.record.line: [formats.describe(r) for r in line.reasons]
        for b in batches
        for line in b.lines
        if line.event is None
    }
    assert rejected == {
        3: ["customer: at least one of user_id, email, anonymous_id, crm_id, device_id is required"],
        5: ["traits: every trait cell is empty: at least one trait is required"],
    }
    assert batches[0].end_offset == data.index(b"\n\nu3") + 1 and batches[1].last_line == 6


def test_format_by_extension() -> None:
    assert formats.format_for_path(Path("a.JSONL")) is Format.JSONL
    assert formats.format_for_path(Path("a.ndjson")) is Format.JSONL
    assert formats.format_for_path(Path("a.csv")) is Format.TRAITS_CSV
    assert formats.format_for_path(Path("a.txt")) is None


# --- checkpoint --------------------------------------------------------------------------------


def test_checkpoint_round_trips_and_notices_a_changed_file(tmp_path: Path) -> None:
    data = tmp_path / "in.jsonl"
    data.write_text("{}\n")
    fingerprint = Fingerprint.of(data)
    checkpoint = Checkpoint(tmp_path / "cp.json", str(data), "jsonl", {}, fingerprint, offset=3, line=1)
    checkpoint.counts.add(Counts(accepted=1))
    checkpoint.keep_rejected(7, ["customer: required"])
    checkpoint.save()
    assert not list(tmp_path.glob("*.tmp"))
    loaded = Checkpoint.load(tmp_path / "cp.json")
    assert loaded is not None and loaded.to_json() == checkpoint.to_json()
    assert loaded.why_not_resumable(fingerprint, "jsonl", {}) == ""
    assert "--format jsonl" in loaded.why_not_resumable(fingerprint, "traits-csv", {})
    data.write_text("{}\n{}\n")
    assert "the file changed" in loaded.why_not_resumable(Fingerprint.of(data), "jsonl", {})


def test_damaged_checkpoint_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "cp.json").write_text(json.dumps({"version": 1}))
    with pytest.raises(CheckpointError, match="damaged"):
        Checkpoint.load(tmp_path / "cp.json")
    assert Checkpoint.load(tmp_path / "missing.json") is None


# --- delivery with retries ---------------------------------------------------------------------


def _events(n: int) -> list[ingest_pb2.Event]:
    return [ingest_pb2.Event(event_id=f"e{i}") for i in range(n)]


def _result(event: ingest_pb2.Event, outcome: int, **kw: object) -> ingest_pb2.EventResult:
    return ingest_pb2.EventResult(event_id=event.event_id, outcome=outcome, **kw)  # type: ignore[arg-type]


async def test_retry_outcomes_are_resent_with_the_same_ids_after_the_retry_delay() -> None:
    sent: list[list[str]] = []

    async def send(request: ingest_pb2.SendEventsRequest) -> ingest_pb2.SendEventsResponse:
        sent.append([e.event_id for e in request.events])
        retry = retry_status(grpc.StatusCode.UNAVAILABLE, "log down", "EVENT_LOG_UNAVAILABLE", 0.01)
        results = []
        for e in request.events:
            if e.event_id == "e1" and len(sent) == 1:
                results.append(_result(e, ingest_pb2.EVENT_OUTCOME_RETRY, status=retry))
            elif e.event_id == "e2":
                bad = bad_request_status("invalid", [FieldViolation("customer", "required")])
                results.append(_result(e, ingest_pb2.EVENT_OUTCOME_REJECTED, status=bad))
            else:
                results.append(_result(e, ingest_pb2.EVENT_OUTCOME_ACCEPTED))
        return ingest_pb2.SendEventsResponse(results=results)

    results = await deliver(_events(3), send, RetryPolicy(retry_for_s=5))
    assert sent == [["e0", "e1", "e2"], ["e1"]]
    assert [r.outcome for r in results] == [
        ingest_pb2.EVENT_OUTCOME_ACCEPTED,
        ingest_pb2.EVENT_OUTCOME_ACCEPTED,
        ingest_pb2.EVENT_OUTCOME_REJECTED,
    ]
    assert retry_delay_s(retry_status(grpc.StatusCode.UNAVAILABLE, "m", "R", 1.5)) == 1.5
