"""A local SendGrid Marketing Campaigns contacts API for the sync tests, from the v3 API reference
(twilio/sendgrid-oai, spec/yaml/tsg_mc_contacts_v3.yaml): ``PUT /v3/marketing/contacts`` takes
``{"contacts": [...]}`` (1 to 30,000, each with an ``email``) and answers 202 ``{"job_id"}``; the
contacts are applied when their job finishes, upserted by lower-cased address, the fields left out
kept as they were. ``GET /v3/marketing/contacts/imports/{id}`` answers the job: ``pending`` for
``polls_until_done`` polls, then ``completed``, ``errored`` (some contacts refused) or ``failed``
(all of them, or ``fail_jobs``: unprocessable, nothing applied), with ``results`` counts and, when
contacts were refused, an ``errors_url``. Bearer API key; past ``requests_per_s`` a 429 with
``X-RateLimit-Reset`` (an epoch second) and no Retry-After, as SendGrid's rate-limit page shows.

What SendGrid does not document is this fake's choice: a contact is refused when its address is
not one, when it names a custom field id the account does not have (``custom_field_ids``) or a
field that is not a reserved one. The errors file is CSV (``email,error``), each reason quoting
the value it refused, served at a pre-signed link on a second port (another origin: no API key,
a ``signature`` in the query; ``download_authorizations`` records what came with each download),
or, with ``errors_on_api_host``, under the API itself, behind the key."""

from __future__ import annotations

import csv
import io
import math
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Self

from aiohttp import web

from tests.sync.provider_server import Handler, ProviderServer

RESERVED = frozenset(
    {
        "first_name",
        "last_name",
        "address_line_1",
        "address_line_2",
        "city",
        "state_province_region",
        "postal_code",
        "country",
        "phone_number",
    }
)
_ADDRESS = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


@dataclass
class Job:
    job_id: str
    contacts: list[dict[str, Any]]
    polls_left: int
    signature: str
    status: str = "pending"
    errors: list[tuple[str, str]] = field(default_factory=list)  # (address, reason)
    created: int = 0
    updated: int = 0


class SendGridContactsServer(ProviderServer):
    def __init__(
        self,
        *,
        api_key: str = "SG.contacts-key",
        custom_field_ids: tuple[str, ...] = ("e1_T", "e2_N"),
        polls_until_done: int = 1,
        requests_per_s: int = 1000,
    ) -> None:
        super().__init__(api_key=api_key)
        self.contacts: dict[str, dict[str, Any]] = {}  # lower-cased address -> contact
        self.custom_field_ids = set(custom_field_ids)
        self.polls_until_done = polls_until_done
        self.requests_per_s = requests_per_s
        self.fail_jobs = False
        self.errors_on_api_host = False
        self.jobs: dict[str, Job] = {}
        self.batch_sizes: list[int] = []
        self.request_bytes: list[int] = []
        self.polls = 0
        self.throttled = 0
        self.download_authorizations: list[str] = []
        self.download_port = 0
        self._second: tuple[int, int] = (0, 0)
        self.route("PUT", "/v3/marketing/contacts", self._upsert)
        self.route("GET", "/v3/marketing/contacts/imports/{job_id}", self._status)
        self.route("GET", "/v3/marketing/contacts/imports/{job_id}/errors.csv", self._errors_file)
        self.route("GET", "/downloads/{job_id}/errors.csv", self._presigned_errors_file)

    async def start(self, port: int = 0) -> Self:
        """The API, and the same routes on a second port: the download host's origin."""
        await super().start(port)
        assert self._runner is not None
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.download_port = next(int(a[1]) for a in self._runner.addresses if int(a[1]) != self.port)
        return self

    def _api(self, handler: Handler) -> Handler:
        if handler == self._presigned_errors_file:
            return handler  # a pre-signed link: its signature is its authorization
        return super()._api(handler)

    def finish_jobs(self) -> None:
        """Every pending job finishes at its next poll."""
        for job in self.jobs.values():
            job.polls_left = 0

    # --- the routes -----------------------------------------------------------------------------

    def _throttle(self) -> web.StreamResponse | None:
        now = time.time()
        second = int(now)
        count = self._second[1] + 1 if self._second[0] == second else 1
        self._second = (second, count)
        if count <= self.requests_per_s:
            return None
        self.throttled += 1
        headers = {
            "X-RateLimit-Limit": str(self.requests_per_s),
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": str(math.ceil(now + 0.001)),
        }
        return web.json_response(
            {"errors": [{"field": None, "message": "too many requests"}]}, status=429, headers=headers
        )

    async def _upsert(self, request: web.Request) -> web.StreamResponse:
        throttled = self._throttle()
        if throttled is not None:
            return throttled
        raw = await request.read()
        try:
            body = await request.json()
        except ValueError:
            return _bad_request("body", "invalid JSON")
        contacts = body.get("contacts") if isinstance(body, dict) else None
        if not isinstance(contacts, list) or not 1 <= len(contacts) <= 30_000:
            return _bad_request("contacts", "1 to 30000 contacts")
        for index, contact in enumerate(contacts):
            if not isinstance(contact, dict) or not contact.get("email"):
                return _bad_request(f"contacts[{index}].email", "an identifier is required")
        self.batch_sizes.append(len(contacts))
        self.request_bytes.append(len(raw))
        job_id = secrets.token_hex(8)
        self.jobs[job_id] = Job(job_id, contacts, self.polls_until_done, secrets.token_urlsafe(12))
        return web.json_response({"job_id": job_id}, status=202)

    async def _status(self, request: web.Request) -> web.StreamResponse:
        throttled = self._throttle()
        if throttled is not None:
            return throttled
        self.polls += 1
        job = self.jobs.get(request.match_info["job_id"])
        if job is None:
            return web.json_response({"errors": [{"field": "id", "message": "not found"}]}, status=404)
        if job.status == "pending":
            if job.polls_left > 0:
                job.polls_left -= 1
            else:
                self._finish(job)
        results: dict[str, Any] = {"requested_count": len(job.contacts)}
        if job.status != "pending":
            results.update(
                created_count=job.created,
                updated_count=job.updated,
                deleted_count=0,
                errored_count=len(job.errors) if job.status != "failed" else len(job.contacts),
            )
            if job.errors:
                results["errors_url"] = self._errors_url(job)
        return web.json_response(
            {"id": job.job_id, "status": job.status, "job_type": "upsert", "results": results}
        )

    async def _errors_file(self, request: web.Request) -> web.StreamResponse:
        job = self.jobs.get(request.match_info["job_id"])
        if job is None or not self.errors_on_api_host:
            return web.json_response({"errors": [{"field": None, "message": "not found"}]}, status=404)
        return _csv(job)

    async def _presigned_errors_file(self, request: web.Request) -> web.StreamResponse:
        self.download_authorizations.append(request.headers.get("Authorization", ""))
        job = self.jobs.get(request.match_info["job_id"])
        if job is None or request.query.get("signature") != job.signature:
            return web.Response(status=403, text="signature does not match")
        return _csv(job)

    # --- the job --------------------------------------------------------------------------------

    def _finish(self, job: Job) -> None:
        if self.fail_jobs:
            job.status = "failed"
            return
        for contact in job.contacts:
            address = str(contact["email"])
            reason = self._refusal(contact)
            if reason:
                job.errors.append((address, reason))
                continue
            key = address.strip().lower()
            kept = self.contacts.get(key)
            if kept is None:
                kept = self.contacts[key] = {"email": key}
                job.created += 1
            else:
                job.updated += 1
            for name, value in contact.items():
                if name == "custom_fields":
                    kept.setdefault("custom_fields", {}).update(value)
                elif name != "email":
                    kept[name] = value
        if not job.errors:
            job.status = "completed"
        else:
            job.status = "failed" if len(job.errors) == len(job.contacts) else "errored"

    def _refusal(self, contact: dict[str, Any]) -> str:
        address = str(contact["email"])
        if not _ADDRESS.fullmatch(address.strip()):
            return f"email '{address}' is not a valid email address"
        for field_id in contact.get("custom_fields") or {}:
            if field_id not in self.custom_field_ids:
                return f"custom field ID '{field_id}' does not exist"
        for name in contact:
            if name not in RESERVED and name not in ("email", "custom_fields"):
                return f"unknown field '{name}'"
        return ""

    def _errors_url(self, job: Job) -> str:
        if self.errors_on_api_host:
            return f"{self.url}/v3/marketing/contacts/imports/{job.job_id}/errors.csv"
        download = f"http://127.0.0.1:{self.download_port}/downloads/{job.job_id}/errors.csv"
        return f"{download}?signature={job.signature}"


def _bad_request(field_name: str, message: str) -> web.StreamResponse:
    return web.json_response(
        {"errors": [{"field": field_name, "message": message, "error_id": "invalid"}]}, status=400
    )


def _csv(job: Job) -> web.StreamResponse:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["email", "error"])
    writer.writerows(job.errors)
    return web.Response(body=out.getvalue().encode(), content_type="text/csv")
