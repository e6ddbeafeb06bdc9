"""SendGrid's suppression lists, pulled by creation time (v3 API), as ``email_suppressed`` events.

Five lists: ``bounces`` (hard bounces), ``blocks`` (refused for now: soft), ``invalid_emails``
(never deliverable: hard), ``spam_reports`` and ``unsubscribes`` (global unsubscribes), each
``GET /v3/suppression/<list>?start_time=&end_time=&limit=&offset=`` with both times inclusive
epoch seconds and at most 500 entries a page.

Each run covers, per list, from that list's cursor (less ``lookback_s``) to ``lag_s`` before
now. The range is asked for in windows: a window whose answer is a full page is split in two
and each half asked for again, so every answer is a whole window and the cursor can be its end.
(Paging by ``offset`` through a list that entries are removed from during the run would skip
one.) Only a single second holding more than a page of entries is paged by offset.

- **Cursor**: per list, the end of the last window whose events ingest answered.
- Event ids: ``sendgrid-<list>:<address hash>:<created>``, the address hashed (an id is logged,
  an address never is); the same entry is the same event, a duplicate the second time.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import timestamp_pb2

from sendtime.ingest.v1 import ingest_pb2
from sync.provider_http import ProviderApi, ProviderRefused

PAGE_LIMIT = 500
LISTS: Mapping[str, int] = {
    "bounces": ingest_pb2.SUPPRESSION_REASON_HARD_BOUNCE,
    "blocks": ingest_pb2.SUPPRESSION_REASON_SOFT_BOUNCE,
    "invalid_emails": ingest_pb2.SUPPRESSION_REASON_HARD_BOUNCE,
    "spam_reports": ingest_pb2.SUPPRESSION_REASON_SPAM_REPORT,
    "unsubscribes": ingest_pb2.SUPPRESSION_REASON_UNSUBSCRIBE,
}


@dataclass(frozen=True, slots=True)
class SuppressionsPage:
    events: Sequence[ingest_pb2.Event]
    records: int
    cursor: dict[str, int] = field(default_factory=dict)  # list -> done up to (epoch s, inclusive)


def address_hash(email: str) -> str:
    return hashlib.sha256(email.strip().lower().encode()).hexdigest()[:24]


def entry_event(list_name: str, entry: Mapping[str, Any]) -> ingest_pb2.Event | None:
    """One list entry as an event (pure); None without an address or a creation time."""
    email = entry.get("email")
    created = entry.get("created")
    if (
        not isinstance(email, str)
        or not email.strip()
        or not isinstance(created, int)
        or isinstance(created, bool)
    ):
        return None
    return ingest_pb2.Event(
        event_id=f"sendgrid-{list_name.replace('_', '-')}:{address_hash(email)}:{created}",
        customer=ingest_pb2.CustomerIdentifiers(email=email.strip()),
        occurred_at=timestamp_pb2.Timestamp(seconds=created),
        source=ingest_pb2.EVENT_SOURCE_EMAIL,
        email_suppressed=ingest_pb2.EmailSuppressed(reason=LISTS[list_name]),  # type: ignore[arg-type]
    )


class SendGridSuppressions:
    """The suppressions pull (see the module's text), over one ``ProviderApi`` to
    ``https://api.sendgrid.com`` with an API key that may read suppressions."""

    def __init__(
        self,
        api: ProviderApi,
        *,
        lists: Sequence[str] = tuple(LISTS),
        page_limit: int = PAGE_LIMIT,
        lookback_s: int = 120,
        lag_s: int = 60,
        clock: Callable[[], float] = time.time,
    ) -> None:
        unknown = [name for name in lists if name not in LISTS]
        if unknown:
            raise ValueError(f"unknown suppression lists {unknown}: of {sorted(LISTS)}")
        if not 1 <= page_limit <= PAGE_LIMIT:
            raise ValueError(f"page_limit {page_limit}: 1 to {PAGE_LIMIT}")
        self._api = api
        self._lists = list(lists)
        self._limit = page_limit
        self._lookback_s = lookback_s
        self._lag_s = lag_s
        self._clock = clock

    def pull(self, cursor: Any) -> AsyncIterator[SuppressionsPage]:
        """``pages`` from a stored cursor (None: every entry ever)."""
        done = {k: int(v) for k, v in cursor.items()} if isinstance(cursor, dict) else {}
        return self.pages(done)

    async def pages(self, done: Mapping[str, int]) -> AsyncIterator[SuppressionsPage]:
        """Each list's entries created after its cursor (less the lookback), window by window.

        Raises:
            ProviderRefused, ProviderUnavailable: from the API (sync.provider_http).
        """
        cursor = dict(done)
        until = int(self._clock()) - self._lag_s
        for name in self._lists:
            start = max(0, cursor.get(name, -1) + 1 - self._lookback_s)
            if start > until:
                continue
            async for end, entries in self._windows(name, start, until):
                cursor[name] = end
                events = [e for e in (entry_event(name, x) for x in entries if isinstance(x, dict)) if e]
                yield SuppressionsPage(events, len(entries), dict(cursor))

    async def _windows(self, name: str, start: int, end: int) -> AsyncIterator[tuple[int, list[Any]]]:
        """(window end, its entries) for [start, end] in ascending windows, each answered whole."""
        pending = [(start, end)]
        while pending:
            low, high = pending.pop()
            entries = await self._get(name, low, high, 0)
            if len(entries) < self._limit:
                yield high, entries
            elif low == high:  # more than a page in one second: by offset within it
                offset = 0
                taken: list[Any] = []
                while len(entries) == self._limit:
                    taken.extend(entries)
                    offset += self._limit
                    entries = await self._get(name, low, high, offset)
                yield high, taken + entries
            else:
                middle = (low + high) // 2
                pending.extend([(middle + 1, high), (low, middle)])  # the lower half first

    async def _get(self, name: str, start: int, end: int, offset: int) -> list[Any]:
        params = {"start_time": start, "end_time": end, "limit": self._limit, "offset": offset}
        answer = (await self._api.request("GET", f"/v3/suppression/{name}", params=params)).json()
        if not isinstance(answer, list):
            raise ProviderRefused(self._api.provider, f"{name}: the answer is not a list")
        return answer
