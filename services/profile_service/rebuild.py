"""Rebuilding profiles from their event history (``sendtime profile rebuild``).

The stored state is a cache of the fold of a customer's events; after a change to the merge
rules, or to repair a state, replaying the history gives the state the events imply. A customer
whose state already equals its replay is left alone, so a rebuild of a healthy database changes
nothing (and proves it).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from profile_service.cache import CacheUnavailable, ProfileCache
from profile_service.repository import ProfileRepository

log = logging.getLogger(__name__)


@dataclass
class RebuildReport:
    customers: int = 0
    changed: int = 0


async def rebuild_profiles(
    repository: ProfileRepository,
    cache: ProfileCache,
    *,
    customer_ids: list[uuid.UUID] | None = None,
    batch_size: int = 500,
) -> RebuildReport:
    """Replay every customer's history (or only ``customer_ids``) and save what differs; the
    changed profiles are written to the cache, whose versioned writes cannot regress it."""
    report = RebuildReport()
    after: uuid.UUID | None = None
    while True:
        if customer_ids is not None:
            batch, customer_ids = customer_ids[:batch_size], customer_ids[batch_size:]
        else:
            batch = await repository.customer_ids(after, batch_size)
        if not batch:
            return report
        after = batch[-1]
        changed = [record for record in [await repository.rebuild(c) for c in batch] if record is not None]
        report.customers += len(batch)
        report.changed += len(changed)
        if changed:
            log.info("profiles rebuilt", extra={"changed": [r.stored.customer_id for r in changed]})
            try:
                await cache.put(record.to_proto() for record in changed)
            except CacheUnavailable as exc:
                log.warning("cache refresh after rebuild failed", extra={"error": str(exc)})
