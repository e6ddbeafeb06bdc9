"""Reading an input file as records with their line numbers and byte offsets, so an import can
stop after any record and continue from its end offset later.

A record is one line; for CSV, a quoted cell may hold line breaks, so a record runs on until
its quotes are balanced. Blank records are skipped (they are not events). Bytes that are not
UTF-8 make a record with ``text=None``, which the importer rejects.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class Record:
    line: int  # the 1-based line it starts on
    last_line: int  # the line it ends on (the same, except for CSV cells with line breaks)
    end_offset: int  # the byte offset just after it: where reading continues
    text: str | None  # without the line break; None when the bytes are not UTF-8
    raw: bytes


def read_records(
    stream: BinaryIO, *, start_offset: int = 0, start_line: int = 1, csv: bool = False
) -> Iterator[Record]:
    """The non-blank records from ``start_offset`` on (which must be a record boundary, with
    ``start_line`` the line there). A UTF-8 byte order mark at the start of the file is ignored."""
    stream.seek(start_offset)
    offset, line = start_offset, start_line
    while True:
        chunk = stream.readline()
        if not chunk:
            return
        first_line, last_line = line, line
        if offset == 0 and chunk.startswith(_BOM):
            chunk = chunk[len(_BOM) :]
            offset += len(_BOM)
        end = offset + len(chunk)
        if csv:
            # Quotes escaped as "" keep the count even: an odd count means an open quoted cell.
            quotes = chunk.count(b'"')
            while quotes % 2:
                more = stream.readline()
                if not more:
                    break
                chunk += more
                end += len(more)
                last_line += 1
                quotes += more.count(b'"')
        raw = chunk.rstrip(b"\r\n")
        offset, line = end, last_line + 1
        if not raw.strip():
            continue
        try:
            text: str | None = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        yield Record(first_line, last_line, end, text, raw)
