"""A local HubSpot for the sync tests, from HubSpot's CRM v3 reference: contacts search
(``POST /crm/v3/objects/contacts/search``) with ``filterGroups`` on ``lastmodifieddate`` (GTE,
an epoch-ms string), one sort, ``properties``, ``limit`` (at most 200) and ``after`` paging; at
most ``result_cap`` results per search (10,000 at HubSpot; ``after`` past it is a 400);
``lastmodifieddate`` answered as ISO 8601; the search limit of 4 requests a second per token,
answered 429 with HubSpot's RATE_LIMIT body (no Retry-After). On top of ProviderServer's OAuth
token endpoint and bearer check.

``answer_delay_s`` (0 by default) holds each search's answer that long: a slow HubSpot, so that
a test can stop a run of many pages part of the way through (tests/sync/test_crash.py)."""

from __future__ import annotations

import asyncio
import bisect
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from tests.sync.provider_server import ProviderServer

DEFAULT_PROPERTIES = ("createdate", "email", "firstname", "hs_object_id", "lastmodifieddate", "lastname")


def iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class HubSpotServer(ProviderServer):
    def __init__(
        self, *, result_cap: int = 10_000, searches_per_s: int = 4, answer_delay_s: float = 0.0, **kw: Any
    ) -> None:
        super().__init__(**kw)
        self.contacts: dict[str, dict[str, str]] = {}  # id -> properties, lastmodifieddate as ms text
        self.result_cap = result_cap
        self.searches_per_s = searches_per_s
        self.answer_delay_s = answer_delay_s
        self.searches: list[dict[str, Any]] = []
        self.rate_limited = 0
        self._recent: list[float] = []
        self._order: list[tuple[int, int]] | None = None  # (lastmodified ms, id), sorted; None: stale
        self.route("POST", "/crm/v3/objects/contacts/search", self._search)

    def upsert(self, contact_id: int, modified_ms: int, **properties: str) -> None:
        record = self.contacts.setdefault(str(contact_id), {"createdate": str(modified_ms)})
        record.update(properties, lastmodifieddate=str(modified_ms), hs_object_id=str(contact_id))
        self._order = None

    def _by_modified(self) -> list[tuple[int, int]]:
        """Every contact as (lastmodified ms, id), in search order; kept between searches, so
        that a search of a large CRM (make bench-sync) costs a bisection, not a sort."""
        if self._order is None:
            self._order = sorted((int(p["lastmodifieddate"]), int(i)) for i, p in self.contacts.items())
        return self._order

    async def _search(self, request: web.Request) -> web.StreamResponse:
        now = time.monotonic()
        self._recent = [t for t in self._recent if now - t < 1.0]
        if len(self._recent) >= self.searches_per_s:
            self.rate_limited += 1
            return web.json_response(
                {
                    "status": "error",
                    "message": "You have reached your secondly limit.",
                    "errorType": "RATE_LIMIT",
                    "policyName": "SECONDLY",
                },
                status=429,
            )
        self._recent.append(now)
        body = await request.json()
        self.searches.append(body)
        if self.answer_delay_s:
            await asyncio.sleep(self.answer_delay_s)
        limit = int(body.get("limit", 10))
        after = int(body.get("after", 0))
        if not 1 <= limit <= 200 or after + limit > self.result_cap:
            return web.json_response(
                {"status": "error", "message": "limit or after out of range", "category": "VALIDATION_ERROR"},
                status=400,
            )
        since = 0
        for group in body.get("filterGroups", []):
            for f in group.get("filters", []):
                assert (f["propertyName"], f["operator"]) == ("lastmodifieddate", "GTE"), f
                since = int(f["value"])
        (sort,) = body["sorts"]
        assert sort == {"propertyName": "lastmodifieddate", "direction": "ASCENDING"}
        ordered = self._by_modified()
        matching = ordered[bisect.bisect_left(ordered, (since, -1)) :]
        wanted = body.get("properties") or DEFAULT_PROPERTIES
        results = []
        for ms, contact_id in matching[after : after + limit]:
            stored = self.contacts[str(contact_id)]
            properties = {name: stored.get(name) for name in wanted}
            properties["lastmodifieddate"] = iso_ms(ms)
            properties["hs_object_id"] = str(contact_id)
            results.append(
                {
                    "id": str(contact_id),
                    "properties": properties,
                    "createdAt": iso_ms(int(stored["createdate"])),
                    "updatedAt": iso_ms(ms),
                    "archived": False,
                }
            )
        answer: dict[str, Any] = {"total": len(matching), "results": results}
        if after + limit < len(matching):  # offered past the cap too: asking for it is the 400
            answer["paging"] = {"next": {"after": str(after + limit), "link": "?after=" + str(after + limit)}}
        return web.json_response(answer)
