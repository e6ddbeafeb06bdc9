"""sync.hubspot: a contact as events (pure), and the pull against a local HubSpot
(tests/sync/hubspot_server.py): every change once per version, across pages, across the
search's result cap, through its rate limit, and again from a cursor with no gap."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from google.protobuf import json_format

from sendtime.ingest.v1 import ingest_pb2
from sync.hubspot import DEFAULT_TRAITS, HubSpotContacts, check_trait_map, contact_events, modified_ms
from sync.provider_http import OAuthRefreshToken, ProviderApi, ProviderLimits, ProviderRefused
from tests.sync.hubspot_server import HubSpotServer, iso_ms

T0 = 1_796_000_000_000  # epoch ms, 2026-11-30


def _contact(contact_id: str, ms: int, **properties: str | None) -> dict[str, object]:
    return {"id": contact_id, "properties": {"lastmodifieddate": iso_ms(ms), **properties}}


def test_a_contact_becomes_an_identify_event_for_its_crm_id_and_email() -> None:
    contact = _contact("51", T0, email="ada@example.com", firstname="Ada", lastname="", city=None)
    (event,) = contact_events(contact, DEFAULT_TRAITS)
    assert event.event_id == f"hubspot-contact:51:{T0}"
    assert (event.customer.crm_id, event.customer.email) == ("51", "ada@example.com")
    assert event.source == ingest_pb2.EVENT_SOURCE_CRM
    assert event.occurred_at.ToMilliseconds() == T0
    # empty and missing properties say nothing (a cleared field does not erase a trait)
    assert json_format.MessageToDict(event.identify.traits) == {"first_name": "Ada"}


def test_the_same_contact_version_is_the_same_event_id_and_a_new_version_another() -> None:
    first = contact_events(_contact("51", T0, firstname="Ada"), DEFAULT_TRAITS)
    again = contact_events(_contact("51", T0, firstname="Ada"), DEFAULT_TRAITS)
    later = contact_events(_contact("51", T0 + 1, firstname="Ada"), DEFAULT_TRAITS)
    assert [e.event_id for e in first] == [e.event_id for e in again] != [e.event_id for e in later]


def test_the_email_opt_out_becomes_email_consent() -> None:
    contact = _contact("7", T0, email="bo@example.com", hs_email_optout="true")
    (consent,) = contact_events(contact, DEFAULT_TRAITS)  # no mapped property: no identify
    assert consent.event_id == f"hubspot-consent:7:{T0}"
    assert consent.consent_changed == ingest_pb2.ConsentChanged(
        channel=ingest_pb2.CHANNEL_EMAIL, subscribed=False
    )
    opted_in = contact_events(_contact("7", T0, email="bo@example.com", hs_email_optout="false"), {})
    assert opted_in[0].consent_changed.subscribed
    assert contact_events(_contact("7", T0, hs_email_optout="true"), {}) == []  # no address to consent for


def test_a_contact_without_an_id_or_date_is_skipped_and_a_bad_date_raises() -> None:
    assert contact_events({"properties": {"firstname": "x"}}, DEFAULT_TRAITS) == []
    assert contact_events({"id": "5", "properties": {"firstname": "x"}}, DEFAULT_TRAITS) == []
    with pytest.raises(ValueError):
        contact_events({"id": "5", "properties": {"lastmodifieddate": "yesterday"}}, DEFAULT_TRAITS)


def test_dates_as_hubspot_sends_them() -> None:
    assert modified_ms("2026-11-30T00:53:20.000Z") == T0
    assert modified_ms(str(T0)) == T0
    assert modified_ms("2026-11-30T00:53:20") == T0  # no zone: UTC


def test_a_trait_map_ingest_would_refuse_is_refused_up_front() -> None:
    check_trait_map({"firstname": "first_name"})
    with pytest.raises(ValueError, match="'first name'"):
        check_trait_map({"firstname": "first name"})


# --- against the local HubSpot -----------------------------------------------------------------


@pytest.fixture
async def hubspot() -> AsyncIterator[HubSpotServer]:
    server = await HubSpotServer(result_cap=40).start()
    yield server
    await server.stop()


def _pull(server: HubSpotServer, apis: list[ProviderApi], **kw: Any) -> HubSpotContacts:
    credentials = OAuthRefreshToken(
        server.token_url, server.client_id, server.client_secret, server.refresh_token
    )
    limits = ProviderLimits(requests=100, per_s=1.0, backoff_initial_s=0.05, backoff_max_s=0.5, attempts=8)
    api = ProviderApi("hubspot", server.url, credentials, limits)
    apis.append(api)
    return HubSpotContacts(api, result_cap=server.result_cap, **kw)  # the local HubSpot's cap: 40


async def _all(pull: HubSpotContacts, cursor_ms: int) -> tuple[list[ingest_pb2.Event], int, int]:
    events: list[ingest_pb2.Event] = []
    pages = 0
    cursor = cursor_ms
    async for page in pull.pages(cursor_ms):
        events.extend(page.events)
        assert page.cursor_ms >= cursor  # never moves back
        cursor = page.cursor_ms
        pages += 1
    return events, cursor, pages


async def test_every_contact_comes_once_across_pages_and_the_cursor_is_the_newest(
    hubspot: HubSpotServer, apis: list[ProviderApi]
) -> None:
    for i in range(25):
        hubspot.upsert(100 + i, T0 + i * 1000, firstname=f"n{i}", email=f"c{i}@example.com")
    events, cursor, pages = await _all(_pull(hubspot, apis, page_size=10), 0)
    assert sorted(e.customer.crm_id for e in events) == sorted(str(100 + i) for i in range(25))
    assert cursor == T0 + 24_000 and pages == 3
    search = hubspot.searches[0]
    assert (
        search["limit"] == 10
        and "firstname" in search["properties"]
        and "hs_email_optout" in search["properties"]
    )


async def test_the_next_run_takes_what_changed_since_the_cursor_and_the_lookback(
    hubspot: HubSpotServer, apis: list[ProviderApi]
) -> None:
    for i in range(5):
        hubspot.upsert(i, T0 + i * 60_000, firstname=f"n{i}")
    _, cursor, _ = await _all(_pull(hubspot, apis, page_size=10, lookback_s=90), 0)
    hubspot.upsert(2, T0 + 10 * 60_000, firstname="renamed")
    events, second_cursor, _ = await _all(_pull(hubspot, apis, page_size=10, lookback_s=90), cursor)
    # the lookback reads again contact 4 (modified 0 s before the cursor; 3 was 60 s, also within
    # 90 s): same versions, same event ids, which ingest answers DUPLICATE
    assert [(e.customer.crm_id, e.event_id) for e in events] == [
        ("3", f"hubspot-contact:3:{T0 + 180_000}"),
        ("4", f"hubspot-contact:4:{T0 + 240_000}"),
        ("2", f"hubspot-contact:2:{T0 + 600_000}"),
    ]
    assert second_cursor == T0 + 600_000
    assert hubspot.searches[-1]["filterGroups"][0]["filters"][0]["value"] == str(cursor - 90_000)


async def test_more_changes_than_one_search_answers_are_taken_by_searching_again(
    hubspot: HubSpotServer, apis: list[ProviderApi]
) -> None:
    # The local HubSpot caps a search at 40 results (10,000 at HubSpot): 95 changes need three.
    for i in range(95):
        hubspot.upsert(1000 + i, T0 + (i // 3) * 10, firstname="x")  # three contacts per millisecond
    events, cursor, _ = await _all(_pull(hubspot, apis, page_size=10, lookback_s=0), 0)
    assert {e.customer.crm_id for e in events} == {str(1000 + i) for i in range(95)}
    assert cursor == T0 + 31 * 10
    restarts = [s for s in hubspot.searches if "after" not in s]
    assert len(restarts) >= 3  # each restarted from the newest date reached: some came twice
    assert all(int(s.get("after", 0)) + s["limit"] <= 40 for s in hubspot.searches)  # never a 400


async def test_more_changes_in_one_millisecond_than_a_search_answers_is_refused_not_a_loop(
    hubspot: HubSpotServer, apis: list[ProviderApi]
) -> None:
    for i in range(45):
        hubspot.upsert(i, T0, firstname="x")
    with pytest.raises(ProviderRefused, match="modified in one millisecond"):
        await _all(_pull(hubspot, apis, page_size=10), 0)


async def test_the_search_rate_limit_is_waited_out_and_nothing_is_missed(
    hubspot: HubSpotServer, apis: list[ProviderApi]
) -> None:
    hubspot.searches_per_s = 2
    for i in range(30):
        hubspot.upsert(i, T0 + i, firstname="x")
    events, _, _ = await _all(_pull(hubspot, apis, page_size=5), 0)
    assert hubspot.rate_limited > 0
    assert sorted(int(e.customer.crm_id) for e in events) == list(range(30))


async def test_a_page_size_hubspot_would_refuse_is_refused_up_front(apis: list[ProviderApi]) -> None:
    credentials = OAuthRefreshToken("http://127.0.0.1:9/token", "i", "s", "r")
    apis.append(ProviderApi("hubspot", "http://127.0.0.1:9", credentials, ProviderLimits(4, 1.0)))
    with pytest.raises(ValueError, match="page_size 500"):
        HubSpotContacts(apis[0], page_size=500)
