"""A local Mailchimp for the sync tests, from the Marketing API 3.0 reference: audience members
(``GET /3.0/lists/{list_id}/members``) with ``since_last_changed`` (members changed after it, to
the second), ``sort_field=last_changed``, ``sort_dir``, ``count`` (at most 1,000) and
``offset``; batch subscribe/update (``POST /3.0/lists/{list_id}``: at most 500 members,
``update_existing``, ``status_if_new`` required for a new member, per-member ``errors`` naming
the address and an ``error_code``); HTTP basic auth with any user name and the API key as
password; 404 for an unknown audience; 429 past 10 requests in flight, Mailchimp's connection
limit."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from tests.sync.provider_server import ProviderServer


def member_id(email: str) -> str:
    return hashlib.md5(email.lower().encode()).hexdigest()  # noqa: S324 - Mailchimp's own member id


class MailchimpServer(ProviderServer):
    def __init__(
        self, *, api_key: str = "0123456789abcdef0123456789abcdef-us6", list_id: str = "a1b2c3d4e5"
    ) -> None:
        super().__init__(api_key=api_key)
        self.list_id = list_id
        self.members: dict[str, dict[str, Any]] = {}  # id -> member
        self.queries: list[dict[str, str]] = []
        self.delay_s = 0.0
        self.in_flight = 0
        self.too_many = 0
        self.batch_sizes: list[int] = []
        self.route("GET", "/3.0/lists/{list_id}/members", self._members)
        self.route("POST", "/3.0/lists/{list_id}", self._batch)

    def put(self, email: str, changed_s: int, status: str = "subscribed", **merge_fields: str) -> None:
        mid = member_id(email)
        self.members[mid] = {
            "id": mid,
            "email_address": email,
            "status": status,
            "merge_fields": merge_fields,
            "language": "",
            "location": {"country_code": ""},
            "last_changed": datetime.fromtimestamp(changed_s, UTC).isoformat(),
        }

    def _authorized(self, authorization: str) -> bool:
        if not authorization.startswith("Basic "):
            return False
        _, _, key = base64.b64decode(authorization[6:]).decode().partition(":")
        return key == self.api_key

    async def _members(self, request: web.Request) -> web.StreamResponse:
        if self.in_flight >= 10:
            self.too_many += 1
            return web.json_response({"title": "Too Many Requests", "status": 429}, status=429)
        self.in_flight += 1
        try:
            await asyncio.sleep(self.delay_s)
            return self._answer(request)
        finally:
            self.in_flight -= 1

    def _answer(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["list_id"] != self.list_id:
            return web.json_response({"title": "Resource Not Found", "status": 404}, status=404)
        query = dict(request.query)
        self.queries.append(query)
        count, offset = int(query.get("count", 10)), int(query.get("offset", 0))
        if not 1 <= count <= 1000:
            return web.json_response({"title": "Invalid Resource", "status": 400}, status=400)
        since = (
            datetime.fromisoformat(query["since_last_changed"]).timestamp()
            if "since_last_changed" in query
            else -1
        )
        assert (query.get("sort_field"), query.get("sort_dir")) == ("last_changed", "ASC"), query
        chosen = sorted(
            (
                m
                for m in self.members.values()
                if datetime.fromisoformat(m["last_changed"]).timestamp() > since
            ),
            key=lambda m: (m["last_changed"], m["id"]),
        )
        return web.json_response(
            {"members": chosen[offset : offset + count], "list_id": self.list_id, "total_items": len(chosen)}
        )

    async def _batch(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["list_id"] != self.list_id:
            return web.json_response({"title": "Resource Not Found", "status": 404}, status=404)
        body = await request.json()
        members = body.get("members") or []
        self.batch_sizes.append(len(members))
        if len(members) > 500:
            return web.json_response({"title": "Invalid Resource", "status": 400}, status=400)
        new, updated, errors = [], [], []
        for member in members:
            email = str(member.get("email_address") or "")
            if "@" not in email:
                errors.append(
                    {
                        "email_address": email,
                        "error": f"{email} looks fake or invalid",
                        "error_code": "ERROR_GENERIC",
                    }
                )
                continue
            mid = member_id(email)
            existing = self.members.get(mid)
            if existing is not None and body.get("update_existing"):
                existing["merge_fields"].update(member.get("merge_fields") or {})
                updated.append(existing)
            elif existing is not None:
                errors.append(
                    {
                        "email_address": email,
                        "error": f"{email} is already a list member",
                        "error_code": "ERROR_CONTACT_EXISTS",
                    }
                )
            elif not member.get("status_if_new") and not member.get("status"):
                errors.append(
                    {"email_address": email, "error": "status required", "error_code": "ERROR_GENERIC"}
                )
            else:
                self.put(
                    email,
                    int(datetime.now(UTC).timestamp()),
                    status=member.get("status") or member["status_if_new"],
                    **(member.get("merge_fields") or {}),
                )
                new.append(self.members[mid])
        return web.json_response(
            {
                "new_members": new,
                "updated_members": updated,
                "errors": errors,
                "total_created": len(new),
                "total_updated": len(updated),
                "error_count": len(errors),
            }
        )
