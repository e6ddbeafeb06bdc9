"""A customer's data beyond the profile: the event history (paged), the export of everything held
on a person, and erasure."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from google.protobuf import json_format, struct_pb2

from profile_service.cache import CacheUnavailable, ProfileCache, cache_key
from profile_service.repository import ErasedCustomer, ProfileRepository
from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.identifier_proto import IdentifierKey
from sendtime_common.paging import decode_time_position, encode_time_position

log = logging.getLogger(__name__)

EVENT_TYPES = frozenset(f.name for f in ingest_pb2.Event.DESCRIPTOR.oneofs_by_name["payload"].fields)


class CustomerNotFound(Exception):
    """No customer has the identifier."""


class CustomerData:
    def __init__(
        self,
        repository: ProfileRepository,
        cache: ProfileCache,
        *,
        on_erased: Callable[[], None] = lambda: None,
        forget: Callable[[str], None] = lambda customer_id: None,
    ) -> None:
        """``on_erased`` is called after each erasure commits (to publish its notice now);
        ``forget(customer_id)`` then, to drop what the process keeps of the person outside the
        cache (the HTTP answers encoded from their profile)."""
        self._repository = repository
        self._cache = cache
        self._on_erased = on_erased
        self._forget = forget

    async def list_events(
        self,
        key: IdentifierKey,
        *,
        page_size: int,
        page_token: str,
        event_types: Sequence[str],
        start: datetime | None,
        end: datetime | None,
    ) -> tuple[list[ingest_pb2.Event], str]:
        """One page of the customer's events, newest first, and the next page's token.

        Raises:
            CustomerNotFound: no customer has ``key``.
            sendtime_common.paging.InvalidPageToken: the token is not from this listing.
        """
        customer_id = await self._repository.customer_id_of(key)
        if customer_id is None:
            raise CustomerNotFound()
        filters = {
            "customer": str(customer_id),
            "types": sorted(event_types),
            "start": start.isoformat() if start else None,
            "end": end.isoformat() if end else None,
        }
        after = decode_time_position(page_token, filters, str) if page_token else None
        rows = await self._repository.list_events(
            customer_id, event_types=event_types, start=start, end=end, after=after, limit=page_size + 1
        )
        page = rows[:page_size]
        token = ""
        if len(rows) > page_size:
            last_at, last = page[-1]
            token = encode_time_position(last_at, last.event_id, filters)
        return [event for _, event in page], token

    async def export(self, key: IdentifierKey) -> struct_pb2.Struct:
        """Everything held on the person, as one JSON document.

        Raises:
            CustomerNotFound: no customer has ``key``.
        """
        customer_id = await self._repository.customer_id_of(key)
        exported = await self._repository.export(customer_id) if customer_id else None
        if exported is None:
            raise CustomerNotFound()
        record, events = exported
        profile = json_format.MessageToDict(record.to_proto(), preserving_proto_field_name=True)
        document: dict[str, Any] = {
            "customer_id": record.stored.customer_id,
            "exported_at": datetime.now().astimezone().isoformat(),
            "profile": profile,
            "identifiers": [
                {"kind": kind.value, "value": value} for kind, value in record.stored.identifiers
            ],
            "events": [json_format.MessageToDict(e, preserving_proto_field_name=True) for e in events],
            "merges": profile.get("merges", []),
        }
        struct = struct_pb2.Struct()
        struct.update(document)
        return struct

    async def erase(self, key: IdentifierKey) -> ErasedCustomer:
        """Erase the person: their data in PostgreSQL (tombstoned against late events, with a
        notice for the services that keep copies), then their cache entries.

        Raises:
            CustomerNotFound: no customer has ``key``.
        """
        erased = await self._repository.delete_customer(key)
        if erased is None:
            raise CustomerNotFound()
        self._on_erased()
        self._forget(erased.customer_id)
        try:
            await self._cache.erase([cache_key(kind, value) for kind, value in erased.identifiers])
        except CacheUnavailable as exc:
            # Entries then live out their TTL; reads of them are what Redis-down reads are.
            log.error("cache erase failed; entries expire with their TTL", extra={"error": str(exc)})
        log.info(
            "customer erased", extra={"customer_id": erased.customer_id, "events": erased.events_deleted}
        )
        return erased
