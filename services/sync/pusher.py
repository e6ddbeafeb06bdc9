"""One run of a push connector: the customers marked pending for it (sync.push.PendingPushes),
a page at a time in customer order, each page's live profiles read (sync.profiles; the next
page's while this one is pushed), what the destination does not hold yet pushed, the results
recorded in the ledger, then the marks settled.

Per customer of a page:

- **gone** (no customer has the id: erased, or merged into another, whose own change marks it)
  or **not pushable** (neither a user id nor an address; no address, for a destination that
  keys people by address): the mark is settled, nothing sent;
- **already pushed** at this version, or **unchanged** (the values pushed last time): settled,
  nothing sent (unchanged is recorded in the ledger at the new version);
- otherwise **pushed** or **refused** by the provider: recorded, settled; or **retry** (the
  batch did not get through): the mark stays for the next run.

A mark is deleted only once the version pushed reaches it, so a change that lands during a run
is pushed by the next one. The ledger is written before the marks are deleted: a run killed in
between finds the marks again and the ledger says they are settled. A run killed after the
provider applied a batch and before the ledger recorded it pushes that batch again with the same
values (sync.push). A failure (the provider or the profile service away, the key refused) ends
the run with what was settled kept (sync.runner.run_recorded).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from sendtime.profile.v1 import profile_pb2
from sync.profile_attributes import push_item
from sync.profiles import ProfileSource
from sync.push import Destination, ItemOutcome, ItemResult, PendingMark, PendingPushes, PushItem, PushLedger
from sync.runner import RunReport, run_recorded
from sync.store import ConnectorState, ConnectorStore

log = logging.getLogger(__name__)

PAGE_SIZE = 500  # customers a page: one ledger read, one ledger write and one delete for them


async def run_push(
    connector_id: str,
    destination: Destination,
    attribute_names: Sequence[str],
    pending: PendingPushes,
    ledger: PushLedger,
    profiles: ProfileSource,
    store: ConnectorStore,
    interval_s: float,
    *,
    page_size: int = PAGE_SIZE,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> RunReport:
    """One run (see the module's text); what it did. Never raises for a provider or profile
    service failure: that is the report's ``error``, and the stored state's."""
    report = RunReport(connector_id)
    customers = 0

    async def read(after: str) -> tuple[list[PendingMark], dict[str, profile_pb2.Profile | None]]:
        marks = await pending.page(connector_id, after, page_size)
        return marks, (await profiles.get_many([m.customer_key for m in marks]) if marks else {})

    async def pages(_: ConnectorState) -> None:
        nonlocal customers
        # The next page is read (its marks and live profiles) while this one is pushed, so that
        # the provider's rate, not the profile reads, bounds a long run.
        next_page: asyncio.Task[tuple[list[PendingMark], dict[str, profile_pb2.Profile | None]]] | None
        next_page = asyncio.create_task(read(""))
        try:
            while next_page is not None:
                marks, profiles_by_id = await next_page
                next_page = None
                if not marks:
                    return
                if len(marks) == page_size:
                    next_page = asyncio.create_task(read(marks[-1].customer_key))
                await push_page(marks, profiles_by_id)
                customers += len(marks)
        finally:
            if next_page is not None:
                next_page.cancel()
                with contextlib.suppress(BaseException):
                    await next_page

    async def push_page(
        marks: list[PendingMark], profiles_by_id: dict[str, profile_pb2.Profile | None]
    ) -> None:
        settled: dict[str, int] = {}
        items: list[PushItem] = []
        for mark in marks:
            profile = profiles_by_id[mark.customer_key]
            item = None if profile is None else push_item(profile, attribute_names)
            if item is not None and destination.keyed_by_email and not item.email:
                item = None  # the provider keys people by address: nowhere to put this one
            if item is None:
                settled[mark.customer_key] = mark.profile_version if profile is None else profile.version
                report.skipped += 1
            else:
                items.append(item)
        to_push, unchanged = await ledger.unsettled(connector_id, items)
        results = [ItemResult(item, ItemOutcome.UNCHANGED) for item in unchanged]
        if to_push:
            results += await destination.push(to_push)
        await ledger.record(connector_id, results)
        retry = {r.item.customer_key for r in results if r.outcome == ItemOutcome.RETRY}
        settled.update((i.customer_key, i.version) for i in items if i.customer_key not in retry)
        await pending.settle(connector_id, settled)
        pushed = sum(r.outcome == ItemOutcome.PUSHED for r in results)
        refused = sum(r.outcome == ItemOutcome.REFUSED for r in results)
        await store.push_page_done(connector_id, pushed, refused)
        report.pages += 1
        report.pushed += pushed
        report.items_refused += refused
        report.unchanged += len(unchanged)

    await run_recorded(report, pages, store, interval_s, now)
    log.info(
        "connector run",
        extra={
            "connector_id": connector_id,
            "pages": report.pages,
            "customers": customers,
            "pushed": report.pushed,
            "refused": report.items_refused,
            "unchanged": report.unchanged,
            "skipped": report.skipped,
        },
    )
    return report
