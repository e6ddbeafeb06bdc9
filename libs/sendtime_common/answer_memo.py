"""Answers already encoded as JSON, kept by what they hold, so that a hot answer is not encoded
again (sendtime_common.http_gateway).

An answer's canonical JSON (``json_format``) is a function of the message alone, and a message
is named exactly by its deterministic serialization (protobuf's own encoding, ~1 µs for a
profile, against ~50-80 µs for ``json_format.MessageToDict``). So the memo is keyed by those
bytes: it serves a body only for an answer that holds exactly what the body was encoded from,
and can never be stale, whatever changed (a new version, a field computed at read time, another
read mask). What it holds is bounded in number and in age: entries leave in the order they came,
after ``ttl_s`` at most, and a hit does not extend an entry's life.

Entries hold personal data, so each is filed under an owner (``owner(answer)``: a customer id)
and ``forget(owner)`` drops them all, for an erasure; ``clear()`` drops everything. An answer
whose owner is None is encoded and not kept (the caller cannot tell when to forget it).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.message import Message


@dataclass(frozen=True, slots=True)
class EncodedAnswer:
    """An answer as sent: its JSON body, and its ETag when its method has a cache policy."""

    body: bytes
    etag: str | None


@dataclass(frozen=True, slots=True)
class _Entry:
    encoded: EncodedAnswer
    owner: str
    expires_at: float


class AnswerMemo:
    """Encoded answers by their deterministic serialization, at most ``max_entries`` of them and
    none older than ``ttl_s``; ``owner(answer)`` files each under the person it is about (None:
    not kept)."""

    def __init__(
        self,
        max_entries: int,
        ttl_s: float,
        owner: Callable[[Message], str | None],
        *,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError("an answer memo needs room for at least one entry")
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        self._owner = owner
        self._timer = timer
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()  # oldest first
        self._by_owner: dict[str, set[bytes]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def encoded(self, answer: Message, encode: Callable[[Message], EncodedAnswer]) -> EncodedAnswer:
        """``answer`` encoded: from the memo when an answer holding the same was encoded within
        ``ttl_s``, else ``encode(answer)``, kept when it has an owner."""
        key = answer.SerializeToString(deterministic=True)
        now = self._timer()
        self._expire(now)
        entry = self._entries.get(key)
        if entry is not None:
            return entry.encoded
        encoded = encode(answer)
        owner = self._owner(answer)
        if owner is None:
            return encoded
        self._entries[key] = _Entry(encoded, owner, now + self._ttl_s)
        self._by_owner.setdefault(owner, set()).add(key)
        if len(self._entries) > self._max_entries:
            self._drop_oldest()
        return encoded

    def held_for(self, owner: str) -> int:
        """How many answers about ``owner`` are kept."""
        return len(self._by_owner.get(owner, ()))

    def forget(self, owner: str) -> None:
        """Drop every answer about ``owner`` (an erasure: nothing of theirs stays here)."""
        for key in self._by_owner.pop(owner, ()):
            self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()
        self._by_owner.clear()

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            oldest = next(iter(entries.values()))
            if oldest.expires_at > now:
                return
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        key, entry = self._entries.popitem(last=False)
        keys = self._by_owner.get(entry.owner)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_owner[entry.owner]
