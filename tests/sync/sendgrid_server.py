"""A local SendGrid for the sync tests, from the v3 API reference for the suppression lists:
``GET /v3/suppression/{bounces,blocks,invalid_emails,spam_reports,unsubscribes}`` with
``start_time`` and ``end_time`` (epoch seconds, inclusive), ``limit`` (at most 500) and
``offset``, newest first; Bearer API key; 429 with ``X-RateLimit-Reset`` (an epoch second)
past ``requests_per_s``."""

from __future__ import annotations

import math
import time
from typing import Any

from aiohttp import web

from tests.sync.provider_server import ProviderServer

LISTS = ("bounces", "blocks", "invalid_emails", "spam_reports", "unsubscribes")


class SendGridServer(ProviderServer):
    def __init__(self, *, api_key: str = "SG.test-key", requests_per_s: int = 1000) -> None:
        super().__init__(api_key=api_key)
        self.lists: dict[str, list[dict[str, Any]]] = {name: [] for name in LISTS}
        self.queries: list[tuple[str, dict[str, str]]] = []
        self.requests_per_s = requests_per_s
        self.throttled = 0
        self._second: tuple[int, int] = (0, 0)
        for name in LISTS:
            self.route("GET", f"/v3/suppression/{name}", self._list)

    def add(self, name: str, email: str, created: int, **extra: Any) -> None:
        self.lists[name].append({"created": created, "email": email, **extra})

    def remove(self, name: str, email: str) -> None:
        self.lists[name] = [e for e in self.lists[name] if e["email"] != email]

    async def _list(self, request: web.Request) -> web.StreamResponse:
        now = time.time()
        second = int(now)
        count = self._second[1] + 1 if self._second[0] == second else 1
        self._second = (second, count)
        if count > self.requests_per_s:
            self.throttled += 1
            headers = {
                "X-RateLimit-Limit": str(self.requests_per_s),
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": str(math.ceil(now + 0.001)),
            }
            return web.json_response(
                {"errors": [{"field": None, "message": "too many requests"}]}, status=429, headers=headers
            )
        name = request.path.rsplit("/", 1)[1]
        query = dict(request.query)
        self.queries.append((name, query))
        limit, offset = int(query.get("limit", 500)), int(query.get("offset", 0))
        if not 1 <= limit <= 500:
            return web.json_response(
                {"errors": [{"field": "limit", "message": "limit must be 1-500"}]}, status=400
            )
        start, end = int(query.get("start_time", 0)), int(query.get("end_time", 2**40))
        chosen = sorted(
            (e for e in self.lists[name] if start <= e["created"] <= end),
            key=lambda e: (-e["created"], e["email"]),
        )
        return web.json_response(chosen[offset : offset + limit])
