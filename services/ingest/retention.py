"""How long ingest keeps each of its records, and the hourly purge of what has expired.

Processed event ids are kept for the dedup window. Business keys are kept as long as an event
repeating the fact could still be accepted (the oldest event ingest takes, plus the clock skew it
allows): after that, a repeat is rejected as too old anyway. Dead letters hold customers'
personal data as sent, so they are kept only for a fixed time, replayed or not. The ids of the
outcome counts' writes are kept a day: a replica retries its own failed writes within seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from ingest.settings import Settings
from ingest.store import IngestStore

COUNT_FLUSH_IDS_KEPT = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Retention:
    processed_ids: timedelta
    business_keys: timedelta
    dead_letters: timedelta

    @classmethod
    def from_settings(cls, settings: Settings) -> Retention:
        return cls(
            processed_ids=timedelta(hours=settings.dedup_window_hours),
            business_keys=timedelta(days=settings.max_event_age_days, seconds=settings.max_future_skew_s),
            dead_letters=timedelta(days=settings.dead_letter_retention_days),
        )


@dataclass(frozen=True, slots=True)
class Purged:
    processed_ids: int
    business_keys: int
    dead_letters: int
    count_flushes: int


async def purge_expired(store: IngestStore, retention: Retention, now: datetime) -> Purged:
    """Delete what ``retention`` no longer keeps at ``now``; how many of each.

    Raises:
        ingest.store.StoreError: PostgreSQL failed (what was purged before stays purged).
    """
    return Purged(
        processed_ids=await store.purge_processed(now - retention.processed_ids),
        business_keys=await store.purge_business_keys(now - retention.business_keys),
        dead_letters=await store.purge_rejections(now - retention.dead_letters),
        count_flushes=await store.purge_count_flushes(now - COUNT_FLUSH_IDS_KEPT),
    )
