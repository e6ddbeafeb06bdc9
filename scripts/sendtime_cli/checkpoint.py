"""The checkpoint of an import: how far every line's result is final, with the counts so far.

One JSON file (by default next to the input, ``FILE.sendtime-import.json``), replaced atomically
after each batch (a temporary file, fsync, ``os.replace``, fsync of the directory), so a crash,
``kill -9`` or power cut leaves either the previous or the next state, never a torn one. A
fingerprint of the input (size, mtime, SHA-256 of the first 64 KiB) keeps a changed file from
being resumed at a wrong offset.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

VERSION = 1
SUFFIX = ".sendtime-import.json"
HEAD_BYTES = 64 * 1024
# Rejected lines kept in the checkpoint for the summary (the rest are only counted; all of them
# go to --rejected-out).
KEPT_REJECTED = 1000


class CheckpointError(RuntimeError):
    """The checkpoint cannot be read or written; the message names the file."""


def default_path(input_path: Path) -> Path:
    return input_path.with_name(input_path.name + SUFFIX)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True, slots=True)
class Fingerprint:
    size: int
    mtime_ns: int
    head_sha256: str

    @classmethod
    def of(cls, path: Path) -> Fingerprint:
        """Raises:
        OSError: the file cannot be read."""
        with open(path, "rb") as stream:
            head = stream.read(HEAD_BYTES)
            stat = os.fstat(stream.fileno())
        return cls(size=stat.st_size, mtime_ns=stat.st_mtime_ns, head_sha256=hashlib.sha256(head).hexdigest())

    def changes_since(self, earlier: Fingerprint) -> list[str]:
        """What differs from ``earlier``, in words; empty when it is the same file."""
        changes = []
        if self.size != earlier.size:
            changes.append(f"size {earlier.size} -> {self.size} bytes")
        if self.mtime_ns != earlier.mtime_ns:
            changes.append("modification time")
        if self.head_sha256 != earlier.head_sha256:
            changes.append("content of the first 64 KiB")
        return changes


@dataclass(slots=True)
class Counts:
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0

    @property
    def lines(self) -> int:
        return self.accepted + self.duplicate + self.rejected

    def add(self, other: Counts) -> None:
        self.accepted += other.accepted
        self.duplicate += other.duplicate
        self.rejected += other.rejected


@dataclass(slots=True)
class RejectedLine:
    line: int
    reasons: list[str]


@dataclass(slots=True)
class Run:
    """One invocation that made progress: where it started and what it counted."""

    started_at: str
    from_line: int  # the first line it read
    target: str
    counts: Counts = field(default_factory=Counts)
    finished_at: str | None = None


@dataclass(slots=True)
class RejectedOut:
    """The --rejected-out file and its size at the last checkpoint: a resumed import cuts it back
    to that size before appending, so no rejected line is written twice."""

    path: str
    size: int


@dataclass(slots=True)
class Checkpoint:
    """The state of one import. ``offset``/``line``: every line before byte ``offset`` (up to and
    including line ``line``) has its final result, counted in ``counts``."""

    path: Path
    input: str
    format: str
    options: dict[str, Any]
    fingerprint: Fingerprint
    offset: int = 0
    line: int = 0
    counts: Counts = field(default_factory=Counts)
    rejected: list[RejectedLine] = field(default_factory=list)
    rejected_out: RejectedOut | None = None
    runs: list[Run] = field(default_factory=list)
    complete: bool = False
    created_at: str = field(default_factory=_now)
    updated_at: str = field(default_factory=_now)

    @classmethod
    def load(cls, path: Path) -> Checkpoint | None:
        """The checkpoint in ``path``; None when there is none.

        Raises:
            CheckpointError: it exists but is unreadable or not a checkpoint of this version.
        """
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read the checkpoint {path}: {exc}") from exc
        try:
            if data["version"] != VERSION:
                raise CheckpointError(
                    f"the checkpoint {path} has version {data['version']}, this sendtime writes {VERSION}"
                )
            rejected_out = data.get("rejected_out")
            return cls(
                path=path,
                input=data["input"],
                format=data["format"],
                options=dict(data["options"]),
                fingerprint=Fingerprint(**data["fingerprint"]),
                offset=int(data["offset"]),
                line=int(data["line"]),
                counts=Counts(**data["counts"]),
                rejected=[RejectedLine(int(r["line"]), list(r["reasons"])) for r in data["rejected"]],
                rejected_out=RejectedOut(**rejected_out) if rejected_out else None,
                runs=[Run(**{**r, "counts": Counts(**r["counts"])}) for r in data["runs"]],
                complete=bool(data["complete"]),
                created_at=data["created_at"],
                updated_at=data["updated_at"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"the checkpoint {path} is damaged ({exc!r}): use --restart") from exc

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"version": VERSION}
        data.update({name: value for name, value in asdict(self).items() if name != "path"})
        return data

    def save(self) -> None:
        """Replace the file atomically.

        Raises:
            CheckpointError: it cannot be written.
        """
        self.updated_at = _now()
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(temporary, "w", encoding="utf-8") as stream:
                json.dump(self.to_json(), stream, indent=1)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, self.path)
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)  # the rename itself survives a power cut
            finally:
                os.close(directory)
        except OSError as exc:
            raise CheckpointError(
                f"cannot write the checkpoint {self.path}: {exc} (choose another place with --checkpoint)"
            ) from exc

    def why_not_resumable(self, fingerprint: Fingerprint, file_format: str, options: dict[str, Any]) -> str:
        """Why this checkpoint does not fit the file and options at hand; empty when it does."""
        changes = fingerprint.changes_since(self.fingerprint)
        if changes:
            return f"the file changed since the checkpoint was written ({', '.join(changes)})"
        if file_format != self.format:
            return f"the checkpoint is for --format {self.format}, not {file_format}"
        if options != self.options:
            mismatched = ", ".join(f"{k}={self.options.get(k)!r}" for k in sorted(self.options))
            return f"the checkpoint was written with other options ({mismatched})"
        return ""

    def keep_rejected(self, line: int, reasons: list[str]) -> None:
        """Remember a rejected line for the summary (the first KEPT_REJECTED only)."""
        if len(self.rejected) < KEPT_REJECTED:
            self.rejected.append(RejectedLine(line, reasons))
