"""A local Braze for the sync tests, from Braze's REST reference for ``POST /users/track``:
Bearer REST API key; at most 75 attribute objects a request; each object must name its user
(``external_id``, ``braze_id``, ``user_alias``, ``email`` or ``phone``), else a non-fatal error
with its array and index; 201 ``{"message": "success", "attributes_processed": n}`` (with
``errors`` for the objects not taken), 400 when none could be taken; Braze creates a user it
does not have. The rate limit answers 429 with ``X-RateLimit-Limit``, ``-Remaining`` and
``-Reset`` (an epoch second), and no Retry-After, as Braze documents."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from aiohttp import web

from tests.sync.provider_server import ProviderServer

IDENTIFIERS = ("external_id", "braze_id", "user_alias", "email", "phone")
MISSING_ID = "'external_id', 'braze_id', 'user_alias', 'email' or 'phone' is required"


class BrazeServer(ProviderServer):
    def __init__(
        self, *, api_key: str = "braze-rest-key", requests_per_window: int = 3000, window_s: int = 3
    ) -> None:
        super().__init__(api_key=api_key)
        self.users: dict[str, dict[str, Any]] = {}  # "external_id:<id>" or "email:<address>" -> attributes
        self.applied: list[tuple[str, str, Any]] = []  # (user, attribute, value), every time one is set
        self.requests_per_window = requests_per_window
        self.window_s = window_s
        self.throttled = 0
        self.batch_sizes: list[int] = []
        self._window: tuple[int, int] = (0, 0)  # (window start, requests in it)
        # A test's: with ``release_answers`` given, a request is applied, ``applied_one`` set,
        # and the answer held until ``release_answers`` is set (a crash between Braze applying a
        # batch and the pusher hearing so).
        self.release_answers: asyncio.Event | None = None
        self.applied_one = asyncio.Event()
        self.route("POST", "/users/track", self._track)

    async def _track(self, request: web.Request) -> web.StreamResponse:
        now = time.time()
        start = int(now // self.window_s) * self.window_s
        count = self._window[1] + 1 if self._window[0] == start else 1
        self._window = (start, count)
        headers = {
            "X-RateLimit-Limit": str(self.requests_per_window),
            "X-RateLimit-Remaining": str(max(0, self.requests_per_window - count)),
            "X-RateLimit-Reset": str(math.ceil(start + self.window_s)),
        }
        if count > self.requests_per_window:
            self.throttled += 1
            return web.json_response({"message": "Rate limit exceeded"}, status=429, headers=headers)
        body = await request.json()
        attributes = body.get("attributes") or []
        self.batch_sizes.append(len(attributes))
        if len(attributes) > 75:
            return web.json_response({"message": "More than 75 attributes in one request"}, status=400)
        errors = []
        processed = 0
        for index, obj in enumerate(attributes):
            ids = [(k, obj[k]) for k in IDENTIFIERS if obj.get(k)]
            if not ids:
                errors.append({"type": MISSING_ID, "input_array": "attributes", "index": index})
                continue
            kind, value = ids[0]
            user = self.users.setdefault(f"{kind}:{value}", {})
            for name, attr in obj.items():
                if name not in IDENTIFIERS and not name.startswith("_"):
                    user[name] = attr
                    self.applied.append((f"{kind}:{value}", name, attr))
            processed += 1
        if attributes and not processed:
            return web.json_response(
                {"message": "No valid attributes", "errors": errors}, status=400, headers=headers
            )
        answer: dict[str, Any] = {"message": "success", "attributes_processed": processed}
        if errors:
            answer["errors"] = errors
        self.applied_one.set()
        if self.release_answers is not None:
            await self.release_answers.wait()
        return web.json_response(answer, status=201, headers=headers)
