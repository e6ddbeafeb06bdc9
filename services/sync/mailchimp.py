"""Mailchimp audience members, pulled by last change (Marketing API 3.0), as ingest events.

``GET /3.0/lists/{list_id}/members`` with ``since_last_changed``, sorted by ``last_changed``
ascending, ``page_size`` at a time (Mailchimp allows 1,000). Mailchimp keeps times to the
second and answers members changed *after* ``since_last_changed``, so each page asks from one
second before the newest change it has taken: the members of that second come again (the same
event ids: duplicates, never a gap). When a whole page shares one second, the next page takes
the following ones of that second by ``offset``. Offset paging over the whole result would skip
a member whenever another one changed during the run and moved to the end of the order.

- **Cursor**: the newest ``last_changed`` taken (epoch seconds), kept by the runner once ingest
  has answered the page; a run reads back ``lookback_s`` before it.
- A member becomes an Identify event (source email) for its ``email_address`` with the mapped
  merge fields, language and country as traits, and its ``status`` becomes email consent:
  ``subscribed`` true, ``unsubscribed`` false. ``cleaned`` (Mailchimp gave up on the address
  after it bounced) is an email_suppressed hard bounce. ``pending``, ``transactional`` and
  ``archived`` say nothing about marketing consent and make no event.
- Event ids: ``mailchimp-member:<list id>:<member id>:<last_changed s>``,
  ``mailchimp-consent:...`` and ``mailchimp-cleaned:...`` (the member id is the MD5 of the
  lower-cased address).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from sendtime.ingest.v1 import ingest_pb2
from sync.hubspot import check_trait_map
from sync.provider_http import ProviderApi, ProviderRefused
from sync.push import ItemOutcome, ItemResult, PushItem, batches

MAX_PAGE_SIZE = 1000
# Mailchimp merge field tag -> Sendtime trait (the audience's own tags may differ: configurable).
DEFAULT_MERGE_TRAITS: Mapping[str, str] = {
    "FNAME": "first_name",
    "LNAME": "last_name",
    "PHONE": "phone",
    "BIRTHDAY": "birthday",
}
CONSENT_BY_STATUS = {"subscribed": True, "unsubscribed": False}
_DATA_CENTER = re.compile(r"-([a-z]{2,4}[0-9]{1,3})$")
_LIST_ID = re.compile(r"[A-Za-z0-9]{1,32}")


def base_url_for_key(api_key: str) -> str:
    """The API root an API key belongs to: its data center is the key's suffix ("…-us6").

    Raises:
        ValueError: the key has no data center suffix.
    """
    found = _DATA_CENTER.search(api_key)
    if found is None:
        raise ValueError("a Mailchimp API key ends in its data center, e.g. -us6")
    return f"https://{found.group(1)}.api.mailchimp.com"


@dataclass(frozen=True, slots=True)
class MembersPage:
    events: Sequence[ingest_pb2.Event]
    records: int
    cursor_s: int

    @property
    def cursor(self) -> dict[str, int]:
        return {"last_changed_s": self.cursor_s}


def changed_s(value: str) -> int:
    """Mailchimp's ``last_changed`` ("2026-11-24T08:00:00+00:00") as epoch seconds.

    Raises:
        ValueError: not an ISO 8601 time with an offset.
    """
    when = datetime.fromisoformat(value)
    if when.tzinfo is None:
        raise ValueError(f"{value!r}: no UTC offset")
    return int(when.timestamp())


def member_events(
    list_id: str, member: Mapping[str, Any], merge_traits: Mapping[str, str]
) -> list[ingest_pb2.Event]:
    """The events one member version becomes (pure); none without an id, an address or a time.

    Raises:
        ValueError: ``last_changed`` is not a time.
    """
    member_id = str(member.get("id") or "")
    email = str(member.get("email_address") or "").strip()
    last_changed = member.get("last_changed")
    if not re.fullmatch(r"[0-9a-f]{32}", member_id) or not email or not isinstance(last_changed, str):
        return []
    seconds = changed_s(last_changed)
    occurred_at = timestamp_pb2.Timestamp(seconds=seconds)
    customer = ingest_pb2.CustomerIdentifiers(email=email)
    merge = _object(member.get("merge_fields"))
    traits: dict[str, str] = {}
    for tag, trait in merge_traits.items():
        value = merge.get(tag)
        if isinstance(value, str | int | float) and not isinstance(value, bool) and str(value).strip():
            traits[trait] = str(value).strip()
    language = member.get("language")
    if isinstance(language, str) and language:
        traits["language"] = language
    location = _object(member.get("location"))
    country = location.get("country_code")
    if isinstance(country, str) and country:
        traits["country"] = country
    events = []
    if traits:
        struct = struct_pb2.Struct()
        struct.update(traits)
        events.append(
            ingest_pb2.Event(
                event_id=f"mailchimp-member:{list_id}:{member_id}:{seconds}",
                customer=customer,
                occurred_at=occurred_at,
                source=ingest_pb2.EVENT_SOURCE_EMAIL,
                identify=ingest_pb2.Identify(traits=struct),
            )
        )
    status = str(member.get("status"))
    if status == "cleaned":
        events.append(
            ingest_pb2.Event(
                event_id=f"mailchimp-cleaned:{list_id}:{member_id}:{seconds}",
                customer=customer,
                occurred_at=occurred_at,
                source=ingest_pb2.EVENT_SOURCE_EMAIL,
                email_suppressed=ingest_pb2.EmailSuppressed(reason=ingest_pb2.SUPPRESSION_REASON_HARD_BOUNCE),
            )
        )
    subscribed = CONSENT_BY_STATUS.get(status)
    if subscribed is not None:
        events.append(
            ingest_pb2.Event(
                event_id=f"mailchimp-consent:{list_id}:{member_id}:{seconds}",
                customer=customer,
                occurred_at=occurred_at,
                source=ingest_pb2.EVENT_SOURCE_EMAIL,
                consent_changed=ingest_pb2.ConsentChanged(
                    channel=ingest_pb2.CHANNEL_EMAIL, subscribed=subscribed
                ),
            )
        )
    return events


def _object(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


class MailchimpMembers:
    """The members pull of one audience (see the module's text), over one ``ProviderApi`` to
    the key's data center (HTTP basic with the key, or an OAuth token)."""

    def __init__(
        self,
        api: ProviderApi,
        list_id: str,
        merge_traits: Mapping[str, str] = DEFAULT_MERGE_TRAITS,
        *,
        page_size: int = 500,
        lookback_s: float = 120.0,
    ) -> None:
        check_trait_map(merge_traits)
        if not _LIST_ID.fullmatch(list_id):
            raise ValueError("a Mailchimp audience (list) id is 1 to 32 letters and digits")
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size {page_size}: 1 to {MAX_PAGE_SIZE}")
        self._api = api
        self._list_id = list_id
        self._merge_traits = dict(merge_traits)
        self._page_size = page_size
        self._lookback_s = round(lookback_s)

    def pull(self, cursor: Any) -> AsyncIterator[MembersPage]:
        """``pages`` from a stored cursor (``MembersPage.cursor``; None: every member)."""
        since = cursor.get("last_changed_s", 0) if isinstance(cursor, dict) else 0
        return self.pages(int(since))

    async def pages(self, cursor_s: int) -> AsyncIterator[MembersPage]:
        """The members changed since ``cursor_s`` (less the lookback), a page at a time.

        Raises:
            ProviderRefused, ProviderUnavailable: from the API (sync.provider_http).
        """
        newest_taken = max(0, cursor_s - self._lookback_s)  # the second the next page starts at
        offset = 0
        reached = cursor_s
        while True:
            answer = (
                await self._api.request("GET", self._path(), params=self._query(newest_taken, offset))
            ).json()
            members = answer.get("members") if isinstance(answer, dict) else None
            if not isinstance(members, list):
                raise ProviderRefused(self._api.provider, "members answer without members")
            events: list[ingest_pb2.Event] = []
            seconds: list[int] = []
            for member in members:
                if not isinstance(member, dict):
                    continue
                events.extend(member_events(self._list_id, member, self._merge_traits))
                if isinstance(member.get("last_changed"), str):
                    seconds.append(changed_s(member["last_changed"]))
            if seconds:
                reached = max(reached, *seconds)
            yield MembersPage(events, len(members), reached)
            if len(members) < self._page_size or not seconds:
                return
            last = seconds[-1]
            if last == newest_taken:  # the whole page in one second: the next ones of that second
                offset += len(members)
            else:
                newest_taken, offset = last, 0

    def _path(self) -> str:
        return f"/3.0/lists/{self._list_id}/members"

    def _query(self, newest_taken_s: int, offset: int) -> dict[str, str | int]:
        since = datetime.fromtimestamp(max(0, newest_taken_s - 1), UTC).isoformat()
        return {
            "since_last_changed": since,
            "sort_field": "last_changed",
            "sort_dir": "ASC",
            "count": self._page_size,
            "offset": offset,
            "fields": "members.id,members.email_address,members.status,members.merge_fields,"
            "members.language,members.location.country_code,members.last_changed,total_items",
        }


# --- pushing traits -----------------------------------------------------------------------------

PUSH_BATCH_SIZE = 500  # Mailchimp's batch subscribe/update takes at most 500 members
# Sendtime trait -> the audience's merge field tag.
DEFAULT_PUSH_FIELDS: Mapping[str, str] = {"first_name": "FNAME", "last_name": "LNAME", "phone": "PHONE"}


def member_object(item: PushItem, fields: Mapping[str, str], status_if_new: str) -> dict[str, Any]:
    """The item as a member of Mailchimp's batch subscribe/update (pure): its merge fields, and
    the status a member new to the audience gets (never its consent: see MailchimpPush)."""
    merge = {fields[trait]: value for trait, value in item.attributes.items() if trait in fields}
    return {"email_address": item.email, "status_if_new": status_if_new, "merge_fields": merge}


class MailchimpPush:
    """Traits to one audience's members: ``POST /3.0/lists/{list_id}`` with ``update_existing``,
    500 members a request. Items are matched to the answer's ``errors`` by address (Mailchimp
    names no index): those are REFUSED with the error code, the rest PUSHED. A member new to the
    audience is added with ``status_if_new`` (``transactional`` by default: in the audience, not
    subscribed to marketing), so a push never subscribes anyone; consent comes from the pull.
    Items without an address are refused here: Mailchimp keys members by address."""

    keyed_by_email = True

    def __init__(
        self,
        api: ProviderApi,
        list_id: str,
        fields: Mapping[str, str] = DEFAULT_PUSH_FIELDS,
        *,
        status_if_new: str = "transactional",
    ) -> None:
        if not _LIST_ID.fullmatch(list_id):
            raise ValueError("a Mailchimp audience (list) id is 1 to 32 letters and digits")
        if status_if_new not in ("transactional", "subscribed", "unsubscribed", "pending"):
            raise ValueError(
                f"status_if_new {status_if_new!r}: transactional, subscribed, unsubscribed or pending"
            )
        self._api = api
        self._list_id = list_id
        self._fields = dict(fields)
        self._status_if_new = status_if_new

    async def push(self, items: Sequence[PushItem]) -> list[ItemResult]:
        """Raises: ProviderUnavailable (a batch's items stay pending), ProviderRefused."""
        results = [ItemResult(i, ItemOutcome.REFUSED, "no email address") for i in items if not i.email]
        for batch in batches([i for i in items if i.email], PUSH_BATCH_SIZE):
            body = {
                "members": [member_object(item, self._fields, self._status_if_new) for item in batch],
                "update_existing": True,
            }
            answer = (await self._api.request("POST", f"/3.0/lists/{self._list_id}", json=body)).json()
            refused = _errors_by_address(answer)
            for item in batch:
                code = refused.get(item.email.strip().lower())
                results.append(
                    ItemResult(item, ItemOutcome.REFUSED, code)
                    if code
                    else ItemResult(item, ItemOutcome.PUSHED)
                )
        return results


def _errors_by_address(answer: Any) -> dict[str, str]:
    """A batch answer's ``errors``: lower-cased address -> Mailchimp's error code."""
    found: dict[str, str] = {}
    errors = answer.get("errors") if isinstance(answer, dict) else None
    for error in errors if isinstance(errors, list) else []:
        if isinstance(error, dict) and isinstance(error.get("email_address"), str):
            found[error["email_address"].strip().lower()] = str(error.get("error_code") or "ERROR")[:100]
    return found
