"""``sendtime import FILE``: bulk-load events into ingest through ``IngestService/SendEvents``.

The file is read in batches; a few batches are in flight at once, but the checkpoint only ever
moves past the lowest batch whose results are all in, so after an interruption the rerun starts
after the last complete batch. Lines sent again across that boundary carry the same event ids
and come back DUPLICATE. See docs/import.md.

Layers: ``formats`` and ``records`` are pure (a record to an event or reasons), ``checkpoint`` is
the state on disk, and this module is the edge: files, gRPC, retries, progress and the summary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import grpc
from google.rpc import error_details_pb2, status_pb2
from tqdm import tqdm

from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime_cli import formats
from sendtime_cli.checkpoint import Checkpoint, CheckpointError, Counts, Fingerprint, RejectedOut, Run
from sendtime_cli.checkpoint import default_path as default_checkpoint_path
from sendtime_cli.formats import BadFile, Format, Rejected
from sendtime_cli.records import Record, read_records
from sendtime_common.auth.client import authenticated_channel
from sendtime_common.config import ConfigError, secret_from_env
from sendtime_common.errors import FieldViolation, field_violations, status_of
from sendtime_common.tls import ClientTls

DEFAULT_TARGET = "127.0.0.1:50051"
MAX_BATCH_SIZE = 1000  # ingest's limit per SendEvents call
EXIT_OK, EXIT_ERROR, EXIT_REJECTED, EXIT_INTERRUPTED = 0, 1, 2, 130

Sender = Callable[[ingest_pb2.SendEventsRequest], Awaitable[ingest_pb2.SendEventsResponse]]


class ImportFailed(RuntimeError):
    """The import cannot go on (ingest unreachable, a refused batch); the message says why."""


@dataclass(frozen=True, slots=True)
class ImportOptions:
    path: Path
    format: Format | None = None  # None: by the file's extension
    target: str = DEFAULT_TARGET
    # A key with the scope events.write (SENDTIME_API_KEY, or the file SENDTIME_API_KEY_FILE).
    api_key: str = ""
    # TLS to ingest: the CA to trust (--cacert, $SENDTIME_CA_FILE; else the system's), or plaintext.
    tls: ClientTls = field(default_factory=ClientTls)
    checkpoint: Path | None = None  # None: FILE.sendtime-import.json
    restart: bool = False
    batch_size: int = 500
    max_in_flight: int = 4
    typed: bool = False
    show_rejected: int = 20
    rejected_out: Path | None = None
    quiet: bool = False
    retry_for_s: float = 60.0
    timeout_s: float = 30.0
    rate: float | None = None  # events per second; None: as fast as ingest takes them


# --- talking to ingest -------------------------------------------------------------------------


def retry_delay_s(status: status_pb2.Status) -> float | None:
    """The delay a status's ``google.rpc.RetryInfo`` asks for, if it carries one."""
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToTimedelta().total_seconds()
    return None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retry_for_s: float = 60.0  # give up after failing this long without progress
    initial_s: float = 0.2
    max_s: float = 10.0


class Backoff:
    """Exponential backoff with jitter that honours a server's RetryInfo and gives up after
    ``retry_for_s`` without progress."""

    def __init__(
        self, policy: RetryPolicy, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    ) -> None:
        self._policy = policy
        self._sleep = sleep
        self._failing_since: float | None = None
        self._next_s = policy.initial_s

    def reset(self) -> None:
        self._failing_since = None
        self._next_s = self._policy.initial_s

    async def wait(self, hint_s: float | None, reason: str) -> None:
        """Sleep before the next attempt.

        Raises:
            ImportFailed: failing for ``retry_for_s`` already.
        """
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        elapsed = now - self._failing_since
        remaining = self._policy.retry_for_s - elapsed
        if remaining <= 0:
            raise ImportFailed(f"still failing after retrying for {elapsed:.1f}s: {reason}")
        delay = max(hint_s or 0.0, self._next_s * random.uniform(0.5, 1.0))
        self._next_s = min(self._next_s * 2, self._policy.max_s)
        await self._sleep(min(delay, remaining))


class Pacer:
    """Spreads sends to at most ``rate`` events per second (``--rate``)."""

    def __init__(self, rate: float | None) -> None:
        self._rate = rate
        self._next: float | None = None

    async def wait(self, events: int) -> None:
        if not self._rate or not events:
            return
        now = time.monotonic()
        start = now if self._next is None or self._next < now else self._next
        self._next = start + events / self._rate
        if start > now:
            await asyncio.sleep(start - now)


_FINAL_OUTCOMES = frozenset(
    {
        ingest_pb2.EVENT_OUTCOME_ACCEPTED,
        ingest_pb2.EVENT_OUTCOME_DUPLICATE,
        ingest_pb2.EVENT_OUTCOME_REJECTED,
        # Another event was stored under the line's id: kept by ingest for review; a rejected
        # line here, with the reason.
        ingest_pb2.EVENT_OUTCOME_CONFLICT,
    }
)
_RETRYABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
)


async def deliver(
    events: Sequence[ingest_pb2.Event], send: Sender, policy: RetryPolicy
) -> list[ingest_pb2.EventResult]:
    """Final results (ACCEPTED, DUPLICATE, REJECTED or CONFLICT) for ``events``, in their order. Events
    answered RETRY, and whole calls that failed transiently, are sent again with the same ids
    after a backoff.

    Raises:
        ImportFailed: still failing after ``policy.retry_for_s``, or ingest refused the call.
    """
    final: dict[int, ingest_pb2.EventResult] = {}
    pending = list(range(len(events)))
    backoff = Backoff(policy)
    while pending:
        try:
            response = await send(ingest_pb2.SendEventsRequest(events=[events[i] for i in pending]))
        except grpc.aio.AioRpcError as exc:
            status = status_of(exc)
            hint = retry_delay_s(status) if status is not None else None
            code = exc.code()
            reason = f"{code.name}: {exc.details()}"
            if code in _RETRYABLE_CODES or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and hint is not None):
                await backoff.wait(hint, reason)
                continue
            advice = (
                " (the batch may be too large: try a smaller --batch-size)"
                if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)
                else ""
            )
            raise ImportFailed(f"ingest refused a batch: {reason}{advice}") from exc
        if len(response.results) != len(pending):
            raise ImportFailed(f"ingest answered {len(response.results)} results for {len(pending)} events")
        retry: list[int] = []
        hint_s: float | None = None
        reason = ""
        for index, result in zip(pending, response.results, strict=True):
            if result.outcome == ingest_pb2.EVENT_OUTCOME_RETRY:
                retry.append(index)
                delay = retry_delay_s(result.status)
                hint_s = max(hint_s or 0.0, delay or 0.0)
                reason = f"RETRY: {result.status.message}"
            elif result.outcome in _FINAL_OUTCOMES:
                final[index] = result
            else:
                name = ingest_pb2.EventOutcome.Name(result.outcome)
                raise ImportFailed(f"ingest answered {name} for event {result.event_id}")
        if len(retry) < len(pending):
            backoff.reset()  # progress: the patience starts over
        pending = retry
        if pending:
            await backoff.wait(hint_s, reason)
    return [final[i] for i in range(len(events))]


# --- lines and batches -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Line:
    """One input record and what it became: an event to send, or the reasons it is none."""

    record: Record
    event: ingest_pb2.Event | None
    reasons: tuple[FieldViolation, ...] = ()


@dataclass(frozen=True, slots=True)
class Batch:
    index: int
    lines: list[Line]

    @property
    def events(self) -> list[ingest_pb2.Event]:
        return [line.event for line in self.lines if line.event is not None]

    @property
    def end_offset(self) -> int:
        return self.lines[-1].record.end_offset

    @property
    def last_line(self) -> int:
        return self.lines[-1].record.last_line


def map_record(
    record: Record, file_format: Format, mapper: formats.RowMapper | None, default_occurred_at: datetime
) -> Line:
    """The line a record makes (a pure function of the record and the layout)."""
    if record.text is None:
        return Line(record, None, (FieldViolation("", "not valid UTF-8"),))
    mapped: formats.Mapped
    if file_format is Format.JSONL:
        mapped = formats.parse_jsonl_line(record.text)
    else:
        assert mapper is not None
        try:
            cells = formats.parse_csv_record(record.text)
        except Exception as exc:  # csv.Error: a cell over the size limit, a NUL byte
            return Line(record, None, (FieldViolation("", f"not a CSV row: {exc}"),))
        mapped = mapper.map_row(cells, default_occurred_at)
    if isinstance(mapped, Rejected):
        return Line(record, None, mapped.reasons)
    return Line(record, mapped)


def make_batches(
    records: Iterator[Record],
    file_format: Format,
    mapper: formats.RowMapper | None,
    default_occurred_at: datetime,
    batch_size: int,
) -> Iterator[Batch]:
    lines: list[Line] = []
    index = 0
    for record in records:
        lines.append(map_record(record, file_format, mapper, default_occurred_at))
        if len(lines) == batch_size:
            yield Batch(index, lines)
            index, lines = index + 1, []
    if lines:
        yield Batch(index, lines)


def mtime_of(fingerprint: Fingerprint) -> datetime:
    """The file's modification time (to the microsecond): the occurred_at of CSV rows without one,
    fixed per file so a rerun derives the same event ids."""
    seconds, nanos = divmod(fingerprint.mtime_ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, UTC) + timedelta(microseconds=nanos // 1000)


# --- progress and summary ----------------------------------------------------------------------


class Progress:
    """A tqdm bar over the file's bytes with lines/s and the counts; silent when disabled."""

    def __init__(self, total_bytes: int, start_offset: int, enabled: bool, stream: TextIO) -> None:
        self._started = time.monotonic()
        self._position = start_offset
        self._bar = tqdm(
            total=total_bytes,
            initial=start_offset,
            desc="importing",
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=stream,
            disable=not enabled,
            dynamic_ncols=True,
            bar_format=(
                "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}"
            ),
        )

    def update(self, offset: int, lines_this_run: int, counts: Counts) -> None:
        elapsed = max(time.monotonic() - self._started, 1e-6)
        self._bar.set_postfix_str(
            f"{lines_this_run / elapsed:,.0f} lines/s, accepted {counts.accepted:,}, "
            f"duplicate {counts.duplicate:,}, rejected {counts.rejected:,}",
            refresh=False,
        )
        self._bar.update(offset - self._position)
        self._position = offset

    def close(self) -> None:
        self._bar.close()


def exit_code(counts: Counts) -> int:
    return EXIT_REJECTED if counts.rejected else EXIT_OK


def summary(checkpoint: Checkpoint, run: Run | None, show_rejected: int, rejected_out: Path | None) -> str:
    c = checkpoint.counts
    state = "complete" if checkpoint.complete else f"stopped after line {checkpoint.line}"
    width = len(f"{c.lines:,}")
    out = [
        f"{checkpoint.input} ({checkpoint.format}): {state}",
        f"  lines      {c.lines:>{width},}",
        f"  accepted   {c.accepted:>{width},}",
        f"  duplicate  {c.duplicate:>{width},}",
        f"  rejected   {c.rejected:>{width},}",
    ]
    if run is not None and len(checkpoint.runs) > 1:
        r = run.counts
        out.append(
            f"  this run (from line {run.from_line}): {r.lines:,} lines, accepted {r.accepted:,}, "
            f"duplicate {r.duplicate:,}, rejected {r.rejected:,}"
        )
    if c.rejected:
        out.append(f"rejected lines ({c.rejected:,}):")
        shown = checkpoint.rejected[: max(show_rejected, 0)]
        out.extend(f"  line {r.line}: {'; '.join(r.reasons)}" for r in shown)
        if c.rejected > len(shown):
            out.append(f"  ... and {c.rejected - len(shown):,} more")
        if rejected_out is not None:
            out.append(f"all rejected lines: {rejected_out}")
        elif c.rejected > len(shown):
            out.append("  (--show-rejected N shows more; --rejected-out PATH writes them all)")
    return "\n".join(out)


# --- the import --------------------------------------------------------------------------------


@dataclass
class _Session:
    """One run of an import: its checkpoint, progress bar and --rejected-out file."""

    checkpoint: Checkpoint
    run: Run
    progress: Progress
    rejected_out: TextIO | None = None
    lines_this_run: int = 0

    def commit(self, batch: Batch, results: list[ingest_pb2.EventResult]) -> None:
        """Count a batch whose results are final and move the checkpoint past it."""
        counts = Counts()
        outcomes = iter(results)
        for line in batch.lines:
            reasons = line.reasons
            if line.event is not None:
                result = next(outcomes)
                if result.outcome == ingest_pb2.EVENT_OUTCOME_ACCEPTED:
                    counts.accepted += 1
                    continue
                if result.outcome == ingest_pb2.EVENT_OUTCOME_DUPLICATE:
                    counts.duplicate += 1
                    continue
                reasons = tuple(field_violations(result.status)) or (
                    FieldViolation("", result.status.message or "rejected by ingest"),
                )
            counts.rejected += 1
            described = [formats.describe(r) for r in reasons]
            self.checkpoint.keep_rejected(line.record.line, described)
            if self.rejected_out is not None:
                raw = line.record.raw.decode("utf-8", errors="replace")
                entry = {"line": line.record.line, "reasons": described, "raw": raw}
                self.rejected_out.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.checkpoint.counts.add(counts)
        self.run.counts.add(counts)
        self.checkpoint.offset = batch.end_offset
        self.checkpoint.line = batch.last_line
        if self.rejected_out is not None and self.checkpoint.rejected_out is not None:
            self.rejected_out.flush()
            self.checkpoint.rejected_out.size = self.rejected_out.tell()
        self.checkpoint.save()
        self.lines_this_run += len(batch.lines)
        self.progress.update(batch.end_offset, self.lines_this_run, self.checkpoint.counts)


async def _pump(
    batches: Iterator[Batch],
    deliver_batch: Callable[[Batch], Coroutine[Any, Any, list[ingest_pb2.EventResult]]],
    commit: Callable[[Batch, list[ingest_pb2.EventResult]], None],
    max_in_flight: int,
) -> None:
    """Deliver batches with at most ``max_in_flight`` at once; commit them strictly in order."""
    in_flight: dict[asyncio.Task[list[ingest_pb2.EventResult]], Batch] = {}
    finished: dict[int, tuple[Batch, list[ingest_pb2.EventResult]]] = {}
    next_to_commit = 0

    async def collect() -> None:
        nonlocal next_to_commit
        done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            batch = in_flight.pop(task)
            finished[batch.index] = (batch, task.result())  # a failed batch raises here
        while next_to_commit in finished:
            commit(*finished.pop(next_to_commit))
            next_to_commit += 1

    try:
        for batch in batches:
            while len(in_flight) >= max_in_flight:
                await collect()
            in_flight[asyncio.create_task(deliver_batch(batch))] = batch
        while in_flight:
            await collect()
    finally:
        for task in in_flight:
            task.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)


def _open_rejected_out(
    options: ImportOptions, checkpoint: Checkpoint, resuming: bool, err: TextIO
) -> TextIO | None:
    if options.rejected_out is None:
        checkpoint.rejected_out = None
        return None
    path = options.rejected_out.resolve()
    previous = checkpoint.rejected_out
    if resuming and previous is not None and previous.path == str(path) and path.exists():
        os.truncate(path, previous.size)  # drop what was written after the last checkpoint
        stream = open(path, "a", encoding="utf-8")  # closed by the caller
    else:
        if resuming and checkpoint.counts.rejected:
            print(
                f"note: {path} gets only the rejected lines after line {checkpoint.line}; "
                f"earlier ones are listed in the summary",
                file=err,
            )
        stream = open(path, "w", encoding="utf-8")
    checkpoint.rejected_out = RejectedOut(str(path), stream.tell())
    return stream


def _resume_hint(checkpoint: Checkpoint) -> str:
    if not checkpoint.line:
        return "no batch was complete yet; run the same command again to start the import"
    return (
        f"every line up to line {checkpoint.line} is done (checkpoint {checkpoint.path}); "
        f"run the same command again to continue after it"
    )


async def run_import(
    options: ImportOptions,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    send: Sender | None = None,
) -> int:
    """Import ``options.path``; the exit code (0, 1, 2). ``send`` replaces the gRPC call (tests);
    by default a channel to ``options.target`` is used. Cancellation (Ctrl-C, SIGTERM) leaves the
    checkpoint at the last complete batch and is re-raised."""
    out = out or sys.stdout
    err = err or sys.stderr

    def fail(message: str) -> int:
        print(f"sendtime import: error: {message}", file=err)
        return EXIT_ERROR

    path = options.path
    file_format = options.format or formats.format_for_path(path)
    if file_format is None:
        return fail(f"cannot tell the format of {path} from its extension: use --format")
    if not 1 <= options.batch_size <= MAX_BATCH_SIZE:
        return fail(f"--batch-size must be 1 to {MAX_BATCH_SIZE}")
    try:
        fingerprint = Fingerprint.of(path)
        checkpoint_path = options.checkpoint or default_checkpoint_path(path)
        previous = Checkpoint.load(checkpoint_path)
    except OSError as exc:
        return fail(f"cannot read {path}: {exc.strerror or exc}")
    except CheckpointError as exc:
        return fail(str(exc))
    import_options = {"typed": options.typed} if file_format is Format.TRAITS_CSV else {}

    resuming = previous is not None and not options.restart
    if previous is not None and resuming:
        why = previous.why_not_resumable(fingerprint, file_format.value, import_options)
        if why:
            return fail(
                f"cannot continue importing {path}: {why}. --restart imports the whole file from the "
                f"beginning (lines imported before come back DUPLICATE); --checkpoint PATH starts a new "
                f"checkpoint and keeps the old one ({previous.path})."
            )
        if previous.complete:
            print(
                f"{path} was already imported completely ({previous.updated_at}); nothing to do. "
                f"--restart imports it again.",
                file=err,
            )
            written = Path(previous.rejected_out.path) if previous.rejected_out is not None else None
            print(summary(previous, None, options.show_rejected, written), file=out)
            return exit_code(previous.counts)
        checkpoint = previous
    else:
        checkpoint = Checkpoint(
            path=checkpoint_path,
            input=str(path.resolve()),
            format=file_format.value,
            options=import_options,
            fingerprint=fingerprint,
        )

    try:
        stream: BinaryIO = open(path, "rb")  # closed below
    except OSError as exc:
        return fail(f"cannot read {path}: {exc.strerror or exc}")
    rejected_out: TextIO | None = None
    progress: Progress | None = None
    try:
        mapper: formats.RowMapper | None = None
        start_offset, start_line = checkpoint.offset, checkpoint.line + 1
        if file_format.is_csv:
            header = next(read_records(stream, csv=True), None)
            if header is None or header.text is None:
                raise BadFile("a CSV file needs a header row (UTF-8) on its first line")
            mapper = formats.layout_for(
                file_format, formats.parse_csv_record(header.text), typed=options.typed
            )
            if start_offset < header.end_offset:
                start_offset, start_line = header.end_offset, header.last_line + 1
        if not options.quiet:
            if resuming:
                c = checkpoint.counts
                print(
                    f"resuming {path} after line {checkpoint.line} ({c.accepted:,} accepted, "
                    f"{c.duplicate:,} duplicate, {c.rejected:,} rejected so far)",
                    file=err,
                )
            elif previous is not None:
                print(f"restarting {path} from the beginning", file=err)
        run = Run(
            started_at=datetime.now(UTC).isoformat(timespec="seconds"),
            from_line=start_line,
            target=options.target,
        )
        checkpoint.runs.append(run)
        rejected_out = _open_rejected_out(options, checkpoint, resuming, err)
        progress = Progress(fingerprint.size, start_offset, not options.quiet and err.isatty(), err)
        session = _Session(checkpoint, run, progress, rejected_out)
        records = read_records(
            stream, start_offset=start_offset, start_line=start_line, csv=file_format.is_csv
        )
        batches = make_batches(records, file_format, mapper, mtime_of(fingerprint), options.batch_size)
        policy = RetryPolicy(retry_for_s=options.retry_for_s)
        pacer = Pacer(options.rate)

        async def pump(sender: Sender) -> None:
            async def deliver_batch(batch: Batch) -> list[ingest_pb2.EventResult]:
                events = batch.events
                await pacer.wait(len(events))
                return await deliver(events, sender, policy) if events else []

            await _pump(batches, deliver_batch, session.commit, options.max_in_flight)

        if send is not None:
            await pump(send)
        else:
            async with authenticated_channel(options.target, options.api_key, options.tls) as channel:
                stub = ingest_pb2_grpc.IngestServiceStub(channel)

                async def send_over_grpc(
                    request: ingest_pb2.SendEventsRequest,
                ) -> ingest_pb2.SendEventsResponse:
                    return await stub.SendEvents(request, timeout=options.timeout_s)

                await pump(send_over_grpc)
        run.finished_at = datetime.now(UTC).isoformat(timespec="seconds")
        checkpoint.complete = True
        checkpoint.save()
        progress.close()
        progress = None
        print(summary(checkpoint, run, options.show_rejected, options.rejected_out), file=out)
        return exit_code(checkpoint.counts)
    except BadFile as exc:
        return fail(f"{path}: {exc}")
    except CheckpointError as exc:
        return fail(str(exc))
    except OSError as exc:  # the --rejected-out file, or the input going away
        return fail(f"{exc.filename or path}: {exc.strerror or exc}\n{_resume_hint(checkpoint)}")
    except ImportFailed as exc:
        return fail(f"ingest at {options.target}: {exc}\n{_resume_hint(checkpoint)}")
    except asyncio.CancelledError:
        print(f"\nsendtime import: interrupted: {_resume_hint(checkpoint)}", file=err)
        raise
    finally:
        if progress is not None:
            progress.close()
        if rejected_out is not None:
            rejected_out.close()
        stream.close()


# --- the command line --------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _batch_size(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_BATCH_SIZE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_BATCH_SIZE}, not {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, metavar="FILE", help="the file to import")
    parser.add_argument(
        "--format",
        choices=[f.value for f in Format],
        help="the file's format (default: by extension: .jsonl/.ndjson = jsonl, .csv = traits-csv)",
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("INGEST_TARGET") or DEFAULT_TARGET,
        help=f"ingest's address (default: $INGEST_TARGET or {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--cacert",
        type=Path,
        default=os.environ.get("SENDTIME_CA_FILE") or None,
        metavar="FILE",
        help="the CA certificate (PEM) that signed ingest's certificate (default: $SENDTIME_CA_FILE, "
        "else the system's trusted roots); `make run` makes .run/tls/ca.crt",
    )
    parser.add_argument(
        "--plaintext", action="store_true", help="talk to an ingest that serves plaintext (ALLOW_PLAINTEXT)"
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        metavar="PATH",
        help="the checkpoint file (default: FILE.sendtime-import.json)",
    )
    parser.add_argument(
        "--restart", action="store_true", help="ignore the checkpoint and import the file from the beginning"
    )
    parser.add_argument(
        "--batch-size",
        type=_batch_size,
        default=500,
        metavar="N",
        help="events per SendEvents call (default 500)",
    )
    parser.add_argument(
        "--max-in-flight", type=_positive_int, default=4, metavar="N", help="batches sent at once (default 4)"
    )
    parser.add_argument(
        "--typed",
        action="store_true",
        help="traits-csv: true/false become booleans and plain numbers numbers (default: all text)",
    )
    parser.add_argument(
        "--show-rejected",
        type=int,
        default=20,
        metavar="N",
        help="rejected lines listed in the summary (default 20)",
    )
    parser.add_argument(
        "--rejected-out",
        type=Path,
        metavar="PATH",
        help="write every rejected line as JSONL {line, reasons, raw}",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bar or notes, only the summary"
    )
    parser.add_argument(
        "--retry-for",
        type=_positive_float,
        default=60.0,
        metavar="SECONDS",
        help="give up when ingest keeps failing this long (default 60)",
    )
    parser.add_argument(
        "--timeout", type=_positive_float, default=30.0, metavar="SECONDS", help="per call (default 30)"
    )
    parser.add_argument(
        "--rate",
        type=_positive_float,
        metavar="EVENTS_PER_S",
        help="send at most this many events per second",
    )
    parser.set_defaults(handler=main)


def options_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> ImportOptions:
    """Raises: ConfigError: no API key is set."""
    api_key = secret_from_env(env, "SENDTIME_API_KEY")
    if not api_key:
        raise ConfigError(
            "set SENDTIME_API_KEY (or SENDTIME_API_KEY_FILE) to a key with the scope events.write"
        )
    return ImportOptions(
        path=args.file,
        format=Format(args.format) if args.format else None,
        target=args.target,
        api_key=api_key,
        tls=ClientTls(ca_file=str(args.cacert or ""), plaintext=args.plaintext),
        checkpoint=args.checkpoint,
        restart=args.restart,
        batch_size=args.batch_size,
        max_in_flight=args.max_in_flight,
        typed=args.typed,
        show_rejected=args.show_rejected,
        rejected_out=args.rejected_out,
        quiet=args.quiet,
        retry_for_s=args.retry_for,
        timeout_s=args.timeout,
        rate=args.rate,
    )


def main(args: argparse.Namespace) -> int:
    """Run the import; SIGTERM and Ctrl-C stop it at a clean point (exit 130)."""
    try:
        options = options_from_args(args, os.environ)
    except ConfigError as exc:
        print(f"sendtime import: {exc}", file=sys.stderr)
        return 1

    async def run() -> int:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError):  # not on Windows
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        return await run_import(options)

    try:
        return asyncio.run(run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        return EXIT_INTERRUPTED
