"""Ingest's dedup tables on real PostgreSQL: what recording a stored event confirms."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from ingest.store import IngestStore
from tests.ingest.migrated import migrated_pool


@pytest.fixture
async def store() -> AsyncIterator[IngestStore]:
    async with migrated_pool("sendtime_ingest_store", max_size=2) as pool:
        yield IngestStore(pool)


async def test_recording_a_stored_event_keeps_its_business_key_from_a_later_claim(store: IngestStore) -> None:
    tag = uuid.uuid4().hex[:8]
    kept, abandoned = ("order", f"{tag}-1"), ("order", f"{tag}-2")
    stale_at_once = timedelta(0)  # any claim not confirmed as stored counts as abandoned
    first = await store.claim_business_keys({kept: "e1", abandoned: "e2"}, stale_at_once)
    assert first == {kept: "e1", abandoned: "e2"}

    await store.record_stored([("e1", b"fingerprint-1")], [kept], datetime.now(UTC))  # e2's publish failed

    again = await store.claim_business_keys({kept: "e3", abandoned: "e4"}, stale_at_once)
    assert again == {kept: "e1", abandoned: "e4"}
    assert await store.seen_event_ids(["e1", "e2", "e3"]) == {"e1": b"fingerprint-1"}
