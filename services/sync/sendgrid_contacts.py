"""Traits to SendGrid Marketing Campaigns contacts: ``PUT /v3/marketing/contacts`` (an upsert by
address), then each import job it starts followed with ``GET /v3/marketing/contacts/imports/{id}``
until it is done, so that an item is reported PUSHED only once SendGrid has applied it.

What SendGrid documents, and where. The v3 API reference pages "Add or Update a Contact",
"Import Contacts Status" and "Get All Field Definitions" (twilio.com/docs/sendgrid/api-reference/
contacts/add-or-update-a-contact, .../contacts/import-contacts-status, .../custom-fields/
get-all-field-definitions), generated from the OpenAPI files in twilio/sendgrid-oai
(spec/yaml/tsg_mc_contacts_v3.yaml, spec/yaml/tsg_mc_custom_fields_v3.yaml, read at dbe0e0d);
"Rate Limits" (.../how-to-use-the-sendgrid-v3-api/rate-limits):

- The PUT takes ``{"contacts": [...]}``, "up to 30,000 contacts, or 6MB of data, whichever is
  lower" (``maxItems: 30000``). It answers 202 ``{"job_id": ...}``: the contacts are queued, not
  yet applied; or a 4xx "containing validation errors" (``errors``: ``field``, ``message``,
  ``error_id``). A contact is found by its ``email``, which SendGrid lower-cases; "any fields
  omitted from the request will remain as they were". Custom fields must exist beforehand.
- Reserved fields, by name: ``first_name``, ``last_name`` (50 characters at most),
  ``address_line_1``, ``address_line_2`` (100), ``city`` (60), ``state_province_region``,
  ``country`` (50), ``postal_code``; ``phone_number`` is a reserved field the field definitions
  list as writable (``_rf10_T``, not ``read_only``), though the PUT's schema does not name it
  (it names ``phone_number_id``, an identifier, which this module never sends: "to update a
  contact, all of its existing identifiers must be present"). Custom fields go in
  ``custom_fields`` keyed by the field's id (``"w1"``, ``"e1_T"``), never by its name; an
  operator names them per trait (``custom_field_ids``). SendGrid's custom fields are Text,
  Number or Date.
- The job's ``status`` is ``pending`` ("not started"), ``completed`` ("finished without any
  errors"), ``errored`` ("finished with some errors") or ``failed`` ("finished with all errors,
  or the job was entirely unprocessable"); ``results`` holds ``requested_count``,
  ``created_count``, ``updated_count``, ``errored_count`` and ``errors_url``, "the download URL
  of the file which provides information about any errors".
- Every answer carries ``X-RateLimit-Limit``, ``-Remaining`` and ``-Reset`` (an epoch second);
  past the limit SendGrid answers 429. No numbers are published per endpoint: provider_http
  waits for the reset.

What SendGrid does not document, and what this module does about it:

- The errors file's layout. SendGrid's support article on contact uploads says its detailed
  error file holds "the email addresses and error reasons" (support.sendgrid.com/hc/en-us/
  articles/1260803037029). It is read as CSV with a header row: the address from the column
  named ``email`` (else the first whose name holds "email"), the reason from the first whose
  name holds "error", "reason" or "message". Only the reason's kind is kept (``error_kind``):
  quoted text, anything holding an ``@`` and long runs of digits are dropped, since a reason may
  quote the value. At most ``max_errors_file_bytes`` are read; a file cut there loses its last
  line.
- Where that file is served. The API key goes with the download only when it is on the API's own
  origin; anywhere else (a pre-signed storage link, as SendGrid's other CSV downloads are) it is
  fetched without credentials, over https, so the key never leaves for another host.
- How long a job takes. Jobs are polled with backoff (``poll_initial_s`` doubling up to
  ``poll_max_s``) for at most ``wait_budget_s`` (two minutes) after a round of PUTs. The pusher
  calls ``push`` a page of customers at a time, so a SendGrid that is behind would cost a whole
  budget a page: once ``max_pending_imports`` jobs are left unfinished, ``push`` sends nothing
  and waits for nothing (every item RETRY) until SendGrid has caught up.

Outcomes, per item:

- PUSHED: its job finished and the errors file does not name its address (and the file named as
  many addresses as ``errored_count``).
- REFUSED: without an address ("no email address": SendGrid keys contacts by address), with a
  reserved value over SendGrid's length (refused here, alone, rather than risk the whole
  request's 400), named in the errors file (with the error's kind), or in a request SendGrid
  answered 400 (every item of it, with the error's field or id, never its message).
- RETRY: its job ``failed`` and the errors file does not name it (a job "entirely
  unprocessable" is not the contact's fault; but a contact the file names is refused even in a
  failed job, since a job whose every contact is invalid fails too, and retrying those would
  never end); its job still ``pending`` when the budget ran out; the errors could not be matched
  to addresses (a file unreadable or cut short); an earlier import of the same address is
  still pending (see below); or too many imports are. A resend is harmless: it is an upsert by
  address with the same values, so SendGrid ends as after one import (one contact, each field at
  its value).

Order. A job still pending when a push gives up may apply later, after a newer push of the same
contact, and set it back. So the addresses of jobs not yet seen finished are remembered (in
memory, never logged), looked at again at the start of a later push (each at most once in
``poll_max_s``), and items for those addresses are held back (RETRY) until their earlier job
has finished. Two customers sharing one
address go in separate rounds, in the order given, each round's jobs followed to the end first.

Batches: 1,000 contacts, and at most 4 MiB of JSON, a request. Far under SendGrid's 30,000 and
6 MB: a job that small finishes soon (within the wait budget), a 400 refuses fewer items, and the
errors file stays small; 1,000 contacts of about 1 KB is one request a megabyte, so the requests
are still few. ProviderUnavailable from SendGrid (no answer, or the breaker open) is raised, as
the other destinations do: every item of this push stays pending.

Logs carry job ids and counts, never an address, a name or a value.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx2
import orjson

from sync.provider_http import ProviderAnswer, ProviderApi, ProviderError, ProviderRefused
from sync.push import ItemOutcome, ItemResult, PushItem

log = logging.getLogger(__name__)

API_BASE_URL = "https://api.sendgrid.com"
CONTACTS_PATH = "/v3/marketing/contacts"
IMPORT_PATH = "/v3/marketing/contacts/imports/{job_id}"
MAX_CONTACTS = 30_000  # SendGrid's limit for one PUT ...
MAX_REQUEST_BYTES = 6_000_000  # ... or 6 MB, whichever is lower
BATCH_SIZE = 1_000
BATCH_BYTES = 4 * 1024 * 1024
EMAIL_MAX_LENGTH = 254
# Reserved field -> its maximum length in the PUT's schema (None: the schema gives none).
RESERVED_FIELDS: Mapping[str, int | None] = {
    "first_name": 50,
    "last_name": 50,
    "address_line_1": 100,
    "address_line_2": 100,
    "city": 60,
    "state_province_region": 50,
    "postal_code": None,
    "country": 50,
    "phone_number": None,
}
# Sendtime's trait names (the pulls' names) for reserved fields SendGrid names otherwise.
TRAIT_ALIASES: Mapping[str, str] = {"phone": "phone_number", "state": "state_province_region"}
FINISHED = frozenset({"completed", "errored", "failed"})
MAX_REDIRECTS = 3
_FIELD_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]{0,99}")  # "w1", "e1_T"; reserved ids start "_rf"
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|`[^`]*`")
_DIGITS = re.compile(r"[0-9]")
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


# --- the contacts (pure) ------------------------------------------------------------------------


def reserved_field(trait: str) -> str | None:
    """The reserved field a trait goes to, by its name or Sendtime's alias; None: not one."""
    name = TRAIT_ALIASES.get(trait, trait)
    return name if name in RESERVED_FIELDS else None


def contact_object(item: PushItem, field_map: Mapping[str, str]) -> dict[str, Any]:
    """The item as one contact of the PUT (pure): its address, the traits named like a reserved
    field (or aliased to one) as that field, the traits in ``field_map`` (trait -> custom field
    id) in ``custom_fields``. Other traits are not sent, nor are values SendGrid cannot hold (None,
    a list, an object, a boolean): SendGrid leaves a field it is not sent as it was.

    Raises:
        ValueError: SendGrid would not take the item; the text is the refusal's reason, which
            names a field, never a value.
    """
    email = item.email.strip()
    if not email:
        raise ValueError("no email address")
    if len(email) > EMAIL_MAX_LENGTH:
        raise ValueError(f"email over {EMAIL_MAX_LENGTH} characters")
    contact: dict[str, Any] = {"email": email}
    custom: dict[str, Any] = {}
    for trait, value in item.attributes.items():
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            continue
        field_id = field_map.get(trait)
        if field_id is not None:
            custom[field_id] = value
            continue
        name = reserved_field(trait)
        if name is None:
            continue
        text = str(value)
        limit = RESERVED_FIELDS[name]
        if limit is not None and len(text) > limit:
            raise ValueError(f"{name} over {limit} characters")
        contact[name] = text
    if custom:
        contact["custom_fields"] = custom
    return contact


def check_custom_field_ids(custom_field_ids: Mapping[str, str], traits: Iterable[str] = ()) -> None:
    """Raises ValueError for a custom field id SendGrid does not make, or a trait in ``traits``
    that goes nowhere in SendGrid (neither a reserved field nor a custom field)."""
    for trait, field_id in custom_field_ids.items():
        if not isinstance(trait, str) or not trait:
            raise ValueError("custom_field_ids: a trait name is empty")
        if not isinstance(field_id, str) or not _FIELD_ID.fullmatch(field_id):
            raise ValueError(
                f"custom_field_ids[{trait!r}]: {field_id!r} is not a SendGrid custom field id (e.g. e1_T)"
            )
    nowhere = sorted(t for t in traits if t not in custom_field_ids and reserved_field(t) is None)
    if nowhere:
        raise ValueError(
            f"traits {', '.join(nowhere)}: neither a SendGrid reserved field nor in custom_field_ids"
        )


# --- what SendGrid answers (pure) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImportJob:
    """One answer of the import status endpoint."""

    status: str  # pending, completed, errored or failed
    requested: int | None = None
    created: int | None = None
    updated: int | None = None
    errored: int | None = None
    errors_url: str = ""

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


def import_job(answer: Any) -> ImportJob:
    """An import status answer, read (pure); a status SendGrid does not document reads as pending."""
    data: Mapping[str, Any] = answer if isinstance(answer, Mapping) else {}
    results = data.get("results")
    counts: Mapping[str, Any] = results if isinstance(results, Mapping) else {}

    def count(key: str) -> int | None:
        value = counts.get(key)
        return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    status = data.get("status")
    url = counts.get("errors_url")
    return ImportJob(
        status=status if isinstance(status, str) and status in FINISHED else "pending",
        requested=count("requested_count"),
        created=count("created_count"),
        updated=count("updated_count"),
        errored=count("errored_count"),
        errors_url=url if isinstance(url, str) else "",
    )


def error_kind(reason: str) -> str:
    """A reason from the errors file as a kind safe to keep (pure): quoted text, words holding an
    ``@`` and words with more than three digits (phone numbers, postal codes) are dropped, since
    a reason may quote the value it refused; at most 100 characters."""
    words = [
        word
        for word in _QUOTED.sub(" ", reason).split()
        if "@" not in word and len(_DIGITS.findall(word)) <= 3
    ]
    kind = " ".join(words).strip(" :;,.-")[:100]
    return kind or "errored"


def errors_by_email(data: bytes, *, cut_short: bool = False) -> dict[str, str]:
    """The errors file (CSV with a header row, see the module's text) as lower-cased address ->
    error kind (pure); empty when no column holds addresses. ``cut_short``: the file was read only
    in part, so its last line may be incomplete and is not read."""
    text = data.decode("utf-8", errors="replace").removeprefix("\ufeff")
    if cut_short:
        text = text[: text.rfind("\n") + 1]
    found: dict[str, str] = {}
    rows = csv.reader(io.StringIO(text))
    try:
        header = [name.strip().lower() for name in next(rows, [])]
        email_column = _column(header, exact="email", containing=("email",))
        if email_column is None:
            return {}
        reason_column = _column(header, containing=("error", "reason", "message"), besides=email_column)
        for row in rows:
            if len(row) <= email_column or not row[email_column].strip():
                continue
            reason = row[reason_column] if reason_column is not None and reason_column < len(row) else ""
            found[row[email_column].strip().lower()] = error_kind(reason)
    except csv.Error:
        pass  # what was read before the malformed line stands
    return found


def _column(
    header: Sequence[str], *, exact: str = "", containing: Sequence[str], besides: int | None = None
) -> int | None:
    if exact and exact in header:
        return header.index(exact)
    for index, name in enumerate(header):
        if index != besides and any(word in name for word in containing):
            return index
    return None


def refusal_kind(answer: ProviderAnswer | None) -> str:
    """A 400's kind (pure): its first error's ``field``, else its ``error_id``; never its
    ``message``, which may quote a value."""
    try:
        data = answer.json() if answer is not None else None
    except ValueError:
        data = None
    errors = data.get("errors") if isinstance(data, dict) else None
    first = errors[0] if isinstance(errors, list) and errors else errors
    if isinstance(first, dict):
        if isinstance(first.get("field"), str) and first["field"]:
            return f"invalid {first['field']}"[:100]
        if isinstance(first.get("error_id"), str) and first["error_id"]:
            return str(first["error_id"])[:100]
    return "request refused"


# --- the destination ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    index: int  # the item's place in the push, for the results' order
    item: PushItem
    contact: dict[str, Any]
    address: str  # lower-cased, as SendGrid keeps it


@dataclass(slots=True)
class _Unfinished:
    addresses: frozenset[str]  # lower-cased
    looked_at: float  # monotonic


@dataclass(frozen=True, slots=True)
class _Job:
    job_id: str
    entries: Sequence[_Entry]


class SendGridContacts:
    """One SendGrid account's Marketing Campaigns contacts, as a push destination (see the
    module's text). ``custom_field_ids``: trait -> custom field id; ``traits``, when given, are
    checked to have somewhere to go; ``api_base_url``: the origin ``api`` calls, to which alone
    the API key may go with the errors file."""

    keyed_by_email = True

    def __init__(
        self,
        api: ProviderApi,
        custom_field_ids: Mapping[str, str] | None = None,
        *,
        traits: Sequence[str] = (),
        api_base_url: str = API_BASE_URL,
        batch_size: int = BATCH_SIZE,
        batch_bytes: int = BATCH_BYTES,
        wait_budget_s: float = 120.0,
        poll_initial_s: float = 2.0,
        poll_max_s: float = 30.0,
        max_pending_imports: int = 5,
        max_errors_file_bytes: int = 2 * 1024 * 1024,
    ) -> None:
        field_ids = dict(custom_field_ids or {})
        check_custom_field_ids(field_ids, traits)
        if not 1 <= batch_size <= MAX_CONTACTS:
            raise ValueError(f"batch_size {batch_size}: 1 to {MAX_CONTACTS:,}")
        if not 1024 <= batch_bytes <= MAX_REQUEST_BYTES:
            raise ValueError(f"batch_bytes {batch_bytes}: 1,024 to {MAX_REQUEST_BYTES:,}")
        if wait_budget_s < 0 or poll_initial_s <= 0 or poll_max_s < poll_initial_s:
            raise ValueError("wait_budget_s >= 0, poll_initial_s > 0 and poll_max_s >= poll_initial_s")
        if max_pending_imports < 1:
            raise ValueError(f"max_pending_imports {max_pending_imports}: at least 1")
        self._api = api
        self._field_ids = field_ids
        self._api_origin = _origin(httpx2.URL(api_base_url))
        self._batch_size = batch_size
        self._batch_bytes = batch_bytes
        self._wait_budget_s = wait_budget_s
        self._poll_initial_s = poll_initial_s
        self._poll_max_s = poll_max_s
        self._max_pending_imports = max_pending_imports
        self._max_errors_file_bytes = max_errors_file_bytes
        # Jobs not yet seen finished (see "Order" in the module's text).
        self._unfinished: dict[str, _Unfinished] = {}

    async def push(self, items: Sequence[PushItem]) -> list[ItemResult]:
        """Push ``items`` (one per customer) and follow their imports; one result per item, in order.

        Raises:
            ProviderUnavailable: SendGrid gave no answer worth having (every item stays pending).
            ProviderRefused: the key or a request was refused other than with a 400.
        """
        results: dict[int, ItemResult] = {}
        entries: list[_Entry] = []
        for index, item in enumerate(items):
            try:
                contact = contact_object(item, self._field_ids)
            except ValueError as exc:
                results[index] = ItemResult(item, ItemOutcome.REFUSED, str(exc))
                continue
            entries.append(_Entry(index, item, contact, item.email.strip().lower()))
        if entries:
            await self._look_at_unfinished_jobs()
        if len(self._unfinished) >= self._max_pending_imports:
            # SendGrid is behind: add nothing to its queue, wait no budget; the next run tries again.
            log.warning("sendgrid imports backlogged", extra={"pending_imports": len(self._unfinished)})
            for entry in entries:
                results[entry.index] = _retry(entry, "too many imports still pending")
            entries = []
        for round_entries in _rounds(entries):
            await self._push_round(round_entries, results)
        return [results[index] for index in sorted(results)]

    async def _push_round(self, entries: Sequence[_Entry], results: dict[int, ItemResult]) -> None:
        waiting: set[str] = set()
        for unfinished in self._unfinished.values():
            waiting |= unfinished.addresses
        ready: list[_Entry] = []
        for entry in entries:
            if entry.address in waiting:
                results[entry.index] = _retry(entry, "an earlier import of this contact is still pending")
            else:
                ready.append(entry)
        jobs = []
        for batch in self._batches(ready, results):
            job = await self._submit(batch, results)
            if job is not None:
                jobs.append(job)
        await self._follow(jobs, results)

    def _batches(self, entries: Sequence[_Entry], results: dict[int, ItemResult]) -> list[list[_Entry]]:
        """At most ``batch_size`` contacts and ``batch_bytes`` of JSON a batch; a contact larger
        than a whole batch is refused."""
        envelope = len(b'{"contacts":[]}')
        batches: list[list[_Entry]] = []
        batch: list[_Entry] = []
        size = envelope
        for entry in entries:
            length = len(orjson.dumps(entry.contact)) + 1  # its comma
            if envelope + length > self._batch_bytes:
                results[entry.index] = ItemResult(
                    entry.item, ItemOutcome.REFUSED, f"contact over {self._batch_bytes:,} bytes"
                )
                continue
            if batch and (len(batch) == self._batch_size or size + length > self._batch_bytes):
                batches.append(batch)
                batch, size = [], envelope
            batch.append(entry)
            size += length
        if batch:
            batches.append(batch)
        return batches

    async def _submit(self, batch: Sequence[_Entry], results: dict[int, ItemResult]) -> _Job | None:
        """PUT one batch; its job, or None when the batch is settled already (a 400, no job id)."""
        body = {"contacts": [entry.contact for entry in batch]}
        try:
            answer = await self._api.request("PUT", CONTACTS_PATH, json=body)
        except ProviderRefused as exc:
            if exc.status != 400:
                raise
            kind = refusal_kind(exc.answer)
            for entry in batch:
                results[entry.index] = ItemResult(entry.item, ItemOutcome.REFUSED, kind)
            log.warning("sendgrid contacts refused", extra={"contacts": len(batch), "kind": kind})
            return None
        try:
            data = answer.json()
        except ValueError:
            data = None
        job_id = data.get("job_id") if isinstance(data, dict) else None
        if not isinstance(job_id, str) or not job_id:
            for entry in batch:
                results[entry.index] = _retry(entry, "no import job id in the answer")
            return None
        self._unfinished[job_id] = _Unfinished(frozenset(e.address for e in batch), time.monotonic())
        return _Job(job_id, batch)

    async def _follow(self, jobs: Sequence[_Job], results: dict[int, ItemResult]) -> None:
        """Poll the jobs until each has finished or the wait budget is spent."""
        deadline = time.monotonic() + self._wait_budget_s
        interval = self._poll_initial_s
        pending = list(jobs)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for job in pending:
                    for entry in job.entries:
                        results[entry.index] = _retry(entry, "import still pending")
                log.warning(
                    "sendgrid imports still pending",
                    extra={"job_ids": [job.job_id for job in pending], "wait_budget_s": self._wait_budget_s},
                )
                return
            await asyncio.sleep(min(interval, remaining))
            interval = min(interval * 2, self._poll_max_s)
            still_pending = []
            for job in pending:
                state = await self._status(job.job_id)
                self._unfinished[job.job_id].looked_at = time.monotonic()
                if state is None:  # still remembered: the next push looks once more before sending
                    for entry in job.entries:
                        results[entry.index] = _retry(entry, "import status unreadable")
                elif state.finished:
                    await self._settle(job, state, results)
                    self._unfinished.pop(job.job_id, None)
                else:
                    still_pending.append(job)
            pending = still_pending

    async def _status(self, job_id: str) -> ImportJob | None:
        """The job's state; None when SendGrid refused to say (an unknown or expired job).

        Raises:
            ProviderUnavailable: no answer.
        """
        try:
            answer = await self._api.request("GET", IMPORT_PATH.format(job_id=quote(job_id, safe="")))
            return import_job(answer.json())
        except ProviderRefused as exc:
            log.warning("sendgrid import status refused", extra={"job_id": job_id, "status": exc.status})
            return None
        except ValueError:
            return None

    async def _settle(self, job: _Job, state: ImportJob, results: dict[int, ItemResult]) -> None:
        """A finished job's items: those the errors file names REFUSED, the others PUSHED, or RETRY
        when the job failed or its errors could not all be matched to addresses."""
        expected = (
            state.errored if state.errored is not None else (0 if state.status == "completed" else None)
        )
        named: dict[str, str] = {}
        if expected != 0 or state.status == "failed":
            named = await self._errors(state.errors_url) if state.errors_url else {}
        refused = [entry for entry in job.entries if entry.address in named]
        for entry in refused:
            results[entry.index] = ItemResult(entry.item, ItemOutcome.REFUSED, named[entry.address])
        accounted = expected is not None and len(refused) >= expected
        for entry in job.entries:
            if entry.address in named:
                continue
            if state.status == "failed":
                results[entry.index] = _retry(entry, "import failed")
            elif accounted:
                results[entry.index] = ItemResult(entry.item, ItemOutcome.PUSHED)
            else:
                results[entry.index] = _retry(entry, "import errors not matched to contacts")
        log.info(
            "sendgrid import finished",
            extra={
                "job_id": job.job_id,
                "status": state.status,
                "requested": state.requested,
                "created": state.created,
                "updated": state.updated,
                "errored": state.errored,
                "refused": len(refused),
            },
        )

    async def _errors(self, errors_url: str) -> dict[str, str]:
        """The errors file, read (see the module's text); empty when it cannot be had."""
        try:
            url = httpx2.URL(errors_url)
            if url.is_relative_url or _origin(url) == self._api_origin:
                downloaded = await self._download_from_api(url)
            else:
                downloaded = await self._download_without_key(url)
        except (ProviderError, httpx2.HTTPError, httpx2.InvalidURL, TimeoutError) as exc:
            log.warning("sendgrid errors file unreadable", extra={"error": type(exc).__name__})
            return {}
        if downloaded is None:
            return {}
        data, cut_short = downloaded
        return errors_by_email(data, cut_short=cut_short)

    async def _download_from_api(self, url: httpx2.URL) -> tuple[bytes, bool] | None:
        """On the API's origin: with the key, retries and rate limit (a redirect elsewhere is
        followed without the key)."""
        try:
            answer = await self._api.request("GET", url.raw_path.decode("ascii"))
        except ProviderRefused as exc:
            location = exc.answer.headers.get("location") if exc.answer is not None else None
            if exc.status in (301, 302, 303, 307, 308) and location:
                scheme, host, port = self._api_origin
                return await self._download_without_key(
                    httpx2.URL(f"{scheme}://{host}:{port}").join(url).join(location)
                )
            raise
        limit = self._max_errors_file_bytes
        return answer.body[:limit], len(answer.body) > limit

    async def _download_without_key(self, url: httpx2.URL) -> tuple[bytes, bool] | None:
        """Elsewhere: no credentials, https only (or http to this machine), redirects followed
        as far as ``MAX_REDIRECTS``, at most ``max_errors_file_bytes`` read, in one timeout."""
        limit = self._max_errors_file_bytes
        async with (
            asyncio.timeout(self._api.limits.timeout_s),
            httpx2.AsyncClient(timeout=self._api.limits.timeout_s, follow_redirects=False) as client,
        ):
            for _ in range(MAX_REDIRECTS + 1):
                if not (url.scheme == "https" or (url.scheme == "http" and url.host in _LOOPBACK)):
                    log.warning("sendgrid errors file not fetched", extra={"scheme": url.scheme})
                    return None
                async with client.stream("GET", url) as response:
                    if response.is_redirect and "location" in response.headers:
                        url = url.join(response.headers["location"])
                        continue
                    if response.status_code != 200:
                        log.warning("sendgrid errors file refused", extra={"status": response.status_code})
                        return None
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > limit:
                            return bytes(body[:limit]), True
                    return bytes(body), False
        return None

    async def _look_at_unfinished_jobs(self) -> None:
        """Forget the remembered jobs that have finished since (their items were left pending, and
        are sent again now), or that SendGrid no longer knows; each looked at once in ``poll_max_s``
        at most, however often ``push`` is called."""
        for job_id, unfinished in list(self._unfinished.items()):
            if time.monotonic() - unfinished.looked_at < self._poll_max_s:
                continue
            state = await self._status(job_id)
            unfinished.looked_at = time.monotonic()
            if state is None or state.finished:
                del self._unfinished[job_id]


def _retry(entry: _Entry, reason: str) -> ItemResult:
    return ItemResult(entry.item, ItemOutcome.RETRY, reason)


def _rounds(entries: Sequence[_Entry]) -> list[list[_Entry]]:
    """The entries in rounds in which each address appears once, in the order given."""
    rounds: list[list[_Entry]] = []
    seen: dict[str, int] = {}
    for entry in entries:
        n = seen.get(entry.address, 0)
        seen[entry.address] = n + 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append(entry)
    return rounds


def _origin(url: httpx2.URL) -> tuple[str, str, int]:
    default_port = {"http": 80, "https": 443}.get(url.scheme, 0)
    return url.scheme, url.host, url.port or default_port
