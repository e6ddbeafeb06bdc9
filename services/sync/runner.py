"""One run of a pull connector: from its durable cursor, page by page, each page's events to
ingest and then the page's cursor kept, so that a run killed at any point starts again with no
gap (the cursor never passes an event ingest has not answered) and no double apply (what is
sent again has the same event ids: ingest answers DUPLICATE).

A failure ends the run where it is: what was kept stays kept, and the connector's state records
the error (a kind and a provider's error code, no personal data) and when to try again, later
after each failure in a row (``retry_delay_s``). That holds for an answer not in the provider's
documented shape and for a bug too (logged with an error id): a connector never runs again at
once after a failure, so a failing one never loops against its provider.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.errors import log_unexpected, new_error_id
from sync.ingest_sink import Delivered, IngestRefused, IngestSink, IngestUnavailable
from sync.provider_http import ProviderRefused, ProviderUnavailable
from sync.store import ConnectorStore

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
    state = await store.load(connector_id)
    await store.run_started(connector_id)
    report = RunReport(connector_id)
    try:
        async for page in pull(state.cursor):
            delivered = await sink.send(page.events)
            await store.page_done(
                connector_id, page.cursor, page.records, delivered.answered, sum(delivered.refused.values())
            )
            report.add(page, delivered)
    except (ProviderUnavailable, ProviderRefused, IngestUnavailable, IngestRefused) as exc:
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
