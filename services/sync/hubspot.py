"""HubSpot CRM contacts, pulled by last-modified date (CRM v3 search), as ingest events.

Each run searches ``/crm/v3/objects/contacts/search`` for contacts whose ``lastmodifieddate``
is at or after the cursor less ``lookback_s``, sorted by it ascending, ``page_size`` at a time
(HubSpot allows 200) with its ``after`` paging. A search answers at most 10,000 results
(``after`` past them is a 400), so when the next page would pass ``SEARCH_RESULT_CAP`` the run
starts a new search from the last modified date it reached.

- **Cursor**: the newest ``lastmodifieddate`` (epoch ms) among the contacts handed on; the
  runner keeps it durably once ingest has acknowledged their events, never before. A run
  killed before then starts again from the old cursor and sends the same events again:
- **No double apply**: each contact version becomes events with deterministic ids
  (``hubspot-contact:<id>:<lastmodified ms>``), which ingest answers DUPLICATE the second time.
- **No gap**: the search is inclusive (GTE) and reaches back ``lookback_s`` before the cursor:
  HubSpot's search index shows a change a few seconds after it was made, possibly after later
  ones; those found again are duplicates.

A contact becomes an Identify event (source crm) carrying the mapped properties as traits, for
``crm_id`` (the contact's id) and ``email``; ``hs_email_optout`` (HubSpot's "opted out of all
email") becomes a ConsentChanged on email as well.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from sendtime.ingest.v1 import ingest_pb2
from sync.provider_http import ProviderApi, ProviderRefused

SEARCH_PATH = "/crm/v3/objects/contacts/search"
SEARCH_RESULT_CAP = 10_000  # HubSpot: a search pages through at most this many results
MAX_PAGE_SIZE = 200
# HubSpot contact property -> Sendtime trait. Properties not listed are not read.
DEFAULT_TRAITS: Mapping[str, str] = {
    "firstname": "first_name",
    "lastname": "last_name",
    "phone": "phone",
    "company": "company",
    "jobtitle": "job_title",
    "city": "city",
    "state": "state",
    "country": "country",
    "zip": "postal_code",
    "lifecyclestage": "lifecycle_stage",
    "hs_language": "language",
}
OPT_OUT = "hs_email_optout"
_TRAIT_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")


@dataclass(frozen=True, slots=True)
class ContactsPage:
    """One page's events, and the cursor to keep once ingest has acknowledged them."""

    events: Sequence[ingest_pb2.Event]
    records: int  # contacts on the page
    cursor_ms: int

    @property
    def cursor(self) -> dict[str, int]:
        return {"lastmodified_ms": self.cursor_ms}


def check_trait_map(traits: Mapping[str, str]) -> None:
    """Raises ValueError naming a trait name ingest would refuse."""
    for prop, trait in traits.items():
        if not _TRAIT_NAME.fullmatch(trait):
            raise ValueError(f"trait name {trait!r} for HubSpot property {prop!r}: 1 to 64 of [A-Za-z0-9_]")


def modified_ms(value: str) -> int:
    """HubSpot's ``lastmodifieddate`` (ISO 8601, as v3 answers it, or epoch ms) as epoch ms.

    Raises:
        ValueError: neither.
    """
    if value.isdigit():
        return int(value)
    when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return round(when.timestamp() * 1000)


def contact_events(contact: Mapping[str, Any], traits: Mapping[str, str]) -> list[ingest_pb2.Event]:
    """The events one contact version becomes (pure). A contact without an id or a last
    modified date is skipped (no events): HubSpot always sends both.

    Raises:
        ValueError: ``lastmodifieddate`` is not a date.
    """
    contact_id = str(contact.get("id") or "")
    properties: Mapping[str, Any] = contact.get("properties") or {}
    modified = properties.get("lastmodifieddate") or contact.get("updatedAt")
    if not contact_id.isdigit() or not isinstance(modified, str):
        return []
    ms = modified_ms(modified)
    occurred_at = timestamp_pb2.Timestamp()
    occurred_at.FromMilliseconds(ms)
    customer = ingest_pb2.CustomerIdentifiers(
        crm_id=contact_id, email=str(properties.get("email") or "").strip()
    )
    events = []
    values = {
        trait: str(properties[prop])
        for prop, trait in traits.items()
        if properties.get(prop) not in (None, "")  # cleared or never set: nothing to say
    }
    if values:
        struct = struct_pb2.Struct()
        struct.update(values)
        events.append(
            ingest_pb2.Event(
                event_id=f"hubspot-contact:{contact_id}:{ms}",
                customer=customer,
                occurred_at=occurred_at,
                source=ingest_pb2.EVENT_SOURCE_CRM,
                identify=ingest_pb2.Identify(traits=struct),
            )
        )
    opt_out = properties.get(OPT_OUT)
    if opt_out in ("true", "false") and customer.email:
        events.append(
            ingest_pb2.Event(
                event_id=f"hubspot-consent:{contact_id}:{ms}",
                customer=customer,
                occurred_at=occurred_at,
                source=ingest_pb2.EVENT_SOURCE_CRM,
                consent_changed=ingest_pb2.ConsentChanged(
                    channel=ingest_pb2.CHANNEL_EMAIL, subscribed=opt_out == "false"
                ),
            )
        )
    return events


class HubSpotContacts:
    """The contacts pull (see the module's text), over one ``ProviderApi`` to
    ``https://api.hubapi.com`` (search: 4 requests a second per token, HubSpot's limit)."""

    def __init__(
        self,
        api: ProviderApi,
        traits: Mapping[str, str] = DEFAULT_TRAITS,
        *,
        page_size: int = 100,
        lookback_s: float = 120.0,
        result_cap: int = SEARCH_RESULT_CAP,
    ) -> None:
        check_trait_map(traits)
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size {page_size}: 1 to {MAX_PAGE_SIZE}")
        self._api = api
        self._traits = dict(traits)
        self._properties = sorted({"email", "lastmodifieddate", OPT_OUT, *traits})
        self._page_size = page_size
        self._lookback_ms = round(lookback_s * 1000)
        self._result_cap = result_cap

    def pull(self, cursor: Any) -> AsyncIterator[ContactsPage]:
        """``pages`` from a stored cursor (``ContactsPage.cursor``; None: every contact)."""
        since = cursor.get("lastmodified_ms", 0) if isinstance(cursor, dict) else 0
        return self.pages(int(since))

    async def pages(self, cursor_ms: int) -> AsyncIterator[ContactsPage]:
        """The contacts changed since ``cursor_ms`` (less the lookback), a page at a time, each
        with the cursor reached so far.

        Raises:
            ProviderRefused, ProviderUnavailable: from the API (sync.provider_http).
        """
        since = max(0, cursor_ms - self._lookback_ms)
        reached = cursor_ms
        after: str | None = None
        taken = 0  # results of the current search so far
        while True:
            answer = (await self._api.request("POST", SEARCH_PATH, json=self._search(since, after))).json()
            results = answer.get("results") if isinstance(answer, dict) else None
            if not isinstance(results, list):
                raise ProviderRefused(self._api.provider, "search answer without results")
            events: list[ingest_pb2.Event] = []
            for contact in results:
                if not isinstance(contact, dict):
                    continue
                found = contact_events(contact, self._traits)
                events.extend(found)
                modified = (contact.get("properties") or {}).get("lastmodifieddate")
                if isinstance(modified, str):
                    reached = max(reached, modified_ms(modified))
            taken += len(results)
            yield ContactsPage(events, len(results), reached)
            following = ((answer.get("paging") or {}).get("next") or {}).get("after")
            if not following or not results:
                return
            if taken + self._page_size > self._result_cap:
                # A new search from the newest date reached (inclusive: duplicates, no gap).
                if reached <= since:
                    raise ProviderRefused(
                        self._api.provider,
                        f"over {self._result_cap:,} contacts modified in one millisecond: cannot page past",
                    )
                since, after, taken = reached, None, 0
            else:
                after = str(following)

    def _search(self, since_ms: int, after: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "filterGroups": [
                {"filters": [{"propertyName": "lastmodifieddate", "operator": "GTE", "value": str(since_ms)}]}
            ],
            "sorts": [{"propertyName": "lastmodifieddate", "direction": "ASCENDING"}],
            "properties": self._properties,
            "limit": self._page_size,
        }
        if after is not None:
            body["after"] = after
        return body
