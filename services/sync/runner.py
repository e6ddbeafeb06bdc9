"""One run of a pull connector: from its durable cursor, page by page (the next page fetched
while this one is sent), each page's events to ingest and then the page's cursor kept, so that
a run killed at any point starts again with no gap (the cursor never passes an event ingest has
not answered) and no double apply (what is sent again has the same event ids: ingest answers
DUPLICATE).

A failure ends the run where it is: what was kept stays kept, and the connector's state records
the error (a kind and a provider's error code, no personal data) and when to try again, later
after each failure in a row (``retry_delay_s``). That holds for an answer not in the provider's
documented shape and for a bug too (logged with an error id): a connector never runs again at
once after a failure, so a failing one never loops against its provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.errors import log_unexpected, new_error_id
from sync.ingest_sink import Delivered, IngestRefused, IngestSink, IngestUnavailable
from sync.profiles import ProfilesUnavailable
from sync.provider_http import ProviderRefused, ProviderUnavailable
from sync.store import ConnectorState, ConnectorStore

log = logging.getLogger(__name__)


class PulledPage(Protocol):
    @property
    def events(self) -> Sequence[ingest_pb2.Event]: ...

    @property
    def records(self) -> int: ...

    @property
    def cursor(self) -> Any: ...  # JSON: where the connector has got to once this page is in


Pull = Callable[[Any], AsyncIterator[PulledPage]]  # from a cursor (None: the beginning)


@dataclass
class RunReport:
    connector_id: str
    pages: int = 0
    records: int = 0
    accepted: int = 0
    duplicates: int = 0
    refused: int = 0
    # A push run's: customers whose attributes the provider took, refused, or already held (not
    # sent), and customers not pushable (gone, or with neither a user id nor an address).
    pushed: int = 0
    items_refused: int = 0
    unchanged: int = 0
    skipped: int = 0
    error: str = ""  # empty: the run went to the end

    def add(self, page: PulledPage, delivered: Delivered) -> None:
        self.pages += 1
        self.records += page.records
        self.accepted += delivered.accepted
        self.duplicates += delivered.duplicates
        self.refused += sum(delivered.refused.values())


def retry_delay_s(interval_s: float, failures_in_a_row: int, rng: random.Random | None = None) -> float:
    """When to try a failing connector again: its interval, doubled with each failure in a row
    (at most 16 times), with 10% jitter so that connectors failing together spread out."""
    delay: float = interval_s * 2 ** min(max(failures_in_a_row - 1, 0), 4)
    return delay * (0.9 + 0.2 * (rng or random).random())


async def run_pull(
    connector_id: str,
    pull: Pull,
    sink: IngestSink,
    store: ConnectorStore,
    interval_s: float,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> RunReport:
    """One run (see the module's text); what it did. Never raises for a provider or ingest
    failure: that is the report's ``error``, and the stored state's."""
    report = RunReport(connector_id)

    async def pages(state: ConnectorState) -> None:
        async for page in fetched_ahead(pull(state.cursor)):
            delivered = await sink.send(page.events)
            await store.page_done(
                connector_id, page.cursor, page.records, delivered.answered, sum(delivered.refused.values())
            )
            report.add(page, delivered)

    await run_recorded(report, pages, store, interval_s, now)
    log.info(
        "connector run",
        extra={
            "connector_id": connector_id,
            "pages": report.pages,
            "records": report.records,
            "accepted": report.accepted,
            "duplicates": report.duplicates,
            "refused": report.refused,
        },
    )
    return report


async def fetched_ahead(pages: AsyncIterator[PulledPage]) -> AsyncIterator[PulledPage]:
    """Each page, the next one already being fetched while the caller sends this one to ingest,
    so that the provider's rate, not ingest's answers, bounds a long run. Nothing is kept ahead
    of ingest: a cursor is still written only once its own page is answered, and a failure to
    fetch the next page surfaces after this one is done."""
    ahead: asyncio.Future[PulledPage] = asyncio.ensure_future(anext(pages))
    try:
        while True:
            try:
                page = await ahead
            except StopAsyncIteration:
                return
            ahead = asyncio.ensure_future(anext(pages))
            yield page
    finally:
        ahead.cancel()
        with contextlib.suppress(BaseException):
            await ahead


# The failures a run ends with, recorded, and tried again later: a provider, ingest or the
# profile service refusing or away.
RUN_FAILURES: tuple[type[Exception], ...] = (
    ProviderUnavailable,
    ProviderRefused,
    IngestUnavailable,
    IngestRefused,
    ProfilesUnavailable,
)


async def run_recorded(
    report: RunReport,
    work: Callable[[ConnectorState], Awaitable[None]],
    store: ConnectorStore,
    interval_s: float,
    now: Callable[[], datetime],
) -> None:
    """Run ``work`` from the connector's stored state, and store how it went: the next run an
    interval on after a success, later after each failure in a row (``retry_delay_s``). A
    failure is the report's ``error``: a kind and a provider's error code, no personal data."""
    connector_id = report.connector_id
    state = await store.load(connector_id)
    await store.run_started(connector_id)
    try:
        await work(state)
    except RUN_FAILURES as exc:
        report.error = f"{type(exc).__name__}: {exc}"
    except ValueError as exc:  # an answer not in the provider's documented shape (not JSON, a bad date)
        report.error = f"malformed answer from the provider: {type(exc).__name__}"
    except Exception as exc:  # a bug: logged with an id; the run counts as failed, tried again later
        error_id = new_error_id()
        log_unexpected(
            log,
            "connector run failed unexpectedly",
            exc,
            {"connector_id": connector_id, "error_id": error_id},
        )
        report.error = f"internal error {error_id}"
    if report.error:
        failures = state.consecutive_failures + 1
        log.warning(
            "connector run failed",
            extra={"connector_id": connector_id, "error": report.error, "failures_in_a_row": failures},
        )
        await store.run_failed(
            connector_id, report.error, now() + timedelta(seconds=retry_delay_s(interval_s, failures))
        )
    else:
        await store.run_succeeded(connector_id, now() + timedelta(seconds=interval_s))
