"""sync.sendgrid: a suppression-list entry as an event (pure), and the pull against a local
SendGrid (tests/sync/sendgrid_server.py): every entry of every list once, windows split until
each answer is whole, a busy second paged by offset, an entry removed mid-run skipping none,
per-list cursors, the rate limit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from sendtime.ingest.v1 import ingest_pb2
from sync.provider_http import ApiKey, ProviderApi, ProviderLimits
from sync.sendgrid import SendGridSuppressions, SuppressionsPage, address_hash, entry_event
from tests.sync.sendgrid_server import SendGridServer

NOW = 1_796_000_000


def test_an_entry_becomes_a_suppression_event_with_the_address_hashed_in_its_id() -> None:
    event = entry_event(
        "bounces", {"created": NOW - 5, "email": "Ada@Example.com", "reason": "550", "status": "5.1.1"}
    )
    assert event is not None
    assert event.event_id == f"sendgrid-bounces:{address_hash('ada@example.com')}:{NOW - 5}"
    assert "ada" not in event.event_id.lower()
    assert event.customer.email == "Ada@Example.com"  # ingest normalizes addresses
    assert (event.source, event.occurred_at.seconds) == (ingest_pb2.EVENT_SOURCE_EMAIL, NOW - 5)
    assert event.email_suppressed.reason == ingest_pb2.SUPPRESSION_REASON_HARD_BOUNCE
    reasons = {
        name: entry_event(name, {"created": NOW, "email": "a@example.com"}).email_suppressed.reason  # type: ignore[union-attr]
        for name in ("blocks", "invalid_emails", "spam_reports", "unsubscribes")
    }
    assert reasons == {
        "blocks": ingest_pb2.SUPPRESSION_REASON_SOFT_BOUNCE,
        "invalid_emails": ingest_pb2.SUPPRESSION_REASON_HARD_BOUNCE,
        "spam_reports": ingest_pb2.SUPPRESSION_REASON_SPAM_REPORT,
        "unsubscribes": ingest_pb2.SUPPRESSION_REASON_UNSUBSCRIBE,
    }
    assert entry_event("bounces", {"created": NOW}) is None
    assert entry_event("bounces", {"email": "a@example.com", "created": "yesterday"}) is None


@pytest.fixture
async def sendgrid() -> AsyncIterator[SendGridServer]:
    server = await SendGridServer().start()
    yield server
    await server.stop()


def _pull(server: SendGridServer, apis: list[ProviderApi], **kw: Any) -> SendGridSuppressions:
    assert server.api_key is not None
    limits = ProviderLimits(requests=1000, per_s=1.0, backoff_initial_s=0.05, backoff_max_s=0.2, attempts=8)
    apis.append(ProviderApi("sendgrid", server.url, ApiKey(server.api_key), limits))
    kw.setdefault("clock", lambda: NOW)
    return SendGridSuppressions(apis[-1], **kw)


async def _all(
    pull: SendGridSuppressions, cursor: Any = None
) -> tuple[list[ingest_pb2.Event], list[SuppressionsPage]]:
    pages = [page async for page in pull.pull(cursor)]
    return [e for p in pages for e in p.events], pages


async def test_every_entry_of_every_list_comes_and_each_list_keeps_its_cursor(
    sendgrid: SendGridServer, apis: list[ProviderApi]
) -> None:
    for i in range(30):
        sendgrid.add("bounces", f"b{i}@example.com", NOW - 10_000 + i * 100)
    sendgrid.add("unsubscribes", "u@example.com", NOW - 500)
    sendgrid.add("spam_reports", "recent@example.com", NOW - 10)  # within the lag: next run
    events, pages = await _all(_pull(sendgrid, apis, page_limit=8))
    assert {e.customer.email for e in events} == {f"b{i}@example.com" for i in range(30)} | {"u@example.com"}
    assert len(events) == 31  # windows are whole and disjoint: nothing twice
    until = NOW - 60
    assert pages[-1].cursor == {
        name: until for name in ("bounces", "blocks", "invalid_emails", "spam_reports", "unsubscribes")
    }
    # windows ascend: the cursor of a list never moves back
    bounce_ends = [p.cursor["bounces"] for p in pages if "bounces" in p.cursor]
    assert bounce_ends == sorted(bounce_ends)
    assert all(int(q["limit"]) == 8 for _, q in sendgrid.queries)


async def test_the_next_run_takes_what_came_after_the_cursor_and_the_lookback(
    sendgrid: SendGridServer, apis: list[ProviderApi]
) -> None:
    sendgrid.add("blocks", "old@example.com", NOW - 5000)
    _, pages = await _all(_pull(sendgrid, apis))
    cursor = pages[-1].cursor
    sendgrid.add("blocks", "late@example.com", NOW - 100)  # created before the last run's end: lookback
    later = _pull(sendgrid, apis, lookback_s=120, clock=lambda: NOW + 600)
    events, _ = await _all(later, cursor)
    assert [e.customer.email for e in events] == ["late@example.com"]


async def test_more_entries_in_one_second_than_a_page_are_paged_by_offset(
    sendgrid: SendGridServer, apis: list[ProviderApi]
) -> None:
    for i in range(20):
        sendgrid.add("unsubscribes", f"import{i}@example.com", NOW - 3000)  # one import, one second
    events, _ = await _all(_pull(sendgrid, apis, page_limit=8, lists=["unsubscribes"]))
    assert sorted(e.customer.email for e in events) == sorted(f"import{i}@example.com" for i in range(20))
    offsets = [
        q["offset"] for _, q in sendgrid.queries if q["start_time"] == q["end_time"] == str(NOW - 3000)
    ]
    assert offsets == ["0", "8", "16"]  # the one-second window, full, then its next pages


async def test_an_entry_removed_during_the_run_makes_none_skipped(
    sendgrid: SendGridServer, apis: list[ProviderApi]
) -> None:
    for i in range(24):
        sendgrid.add("bounces", f"b{i}@example.com", NOW - 10_000 + i * 100)
    seen: set[str] = set()
    async for page in _pull(sendgrid, apis, page_limit=5, lists=["bounces"]).pull(None):
        seen |= {e.customer.email for e in page.events}
        # Taken off the list after the first page: offset paging (newest first) would now skip
        # the entry that moves up into the first page's last place.
        sendgrid.remove("bounces", "b23@example.com")
    assert {f"b{i}@example.com" for i in range(23)} <= seen


async def test_the_rate_limit_is_waited_out_and_nothing_is_missed(
    sendgrid: SendGridServer, apis: list[ProviderApi]
) -> None:
    sendgrid.requests_per_s = 4
    for i in range(40):
        sendgrid.add("spam_reports", f"s{i}@example.com", NOW - 9000 + i * 50)
    pull = _pull(sendgrid, apis, page_limit=10, lists=["spam_reports"], lookback_s=0)
    events, _ = await _all(pull, {"spam_reports": NOW - 10_000})  # a range of hours, not of years
    assert sendgrid.throttled > 0
    assert len({e.customer.email for e in events}) == 40


def test_settings_sendgrid_would_refuse_are_refused_up_front() -> None:
    api = ProviderApi("sendgrid", "http://127.0.0.1:9", ApiKey("k"), ProviderLimits(10, 1.0))
    with pytest.raises(ValueError, match="unknown suppression lists"):
        SendGridSuppressions(api, lists=["bounces", "everything"])
    with pytest.raises(ValueError, match="page_limit 1000"):
        SendGridSuppressions(api, page_limit=1000)
