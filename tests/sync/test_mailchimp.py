"""sync.mailchimp: a member as events (pure), and the pull against a local Mailchimp
(tests/sync/mailchimp_server.py): every change once per version across pages, a page of one
second paged by offset, no member skipped when another changes during the run, the cursor."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from google.protobuf import json_format

from sendtime.ingest.v1 import ingest_pb2
from sync.mailchimp import (
    DEFAULT_MERGE_TRAITS,
    MailchimpMembers,
    MailchimpPush,
    base_url_for_key,
    changed_s,
    member_events,
    member_object,
)
from sync.provider_http import BasicAuth, ProviderApi, ProviderLimits, ProviderRefused
from sync.push import ItemOutcome, PushItem
from tests.sync.mailchimp_server import MailchimpServer, member_id

S0 = 1_796_000_000  # epoch seconds, 2026-11-30
LIST = "a1b2c3d4e5"


def _member(email: str, status: str = "subscribed", **extra: Any) -> dict[str, Any]:
    return {
        "id": member_id(email),
        "email_address": email,
        "status": status,
        "merge_fields": {"FNAME": "Ada", "LNAME": "", "BIRTHDAY": "12/10", "ADDRESS": {"addr1": "x"}},
        "language": "en",
        "location": {"country_code": "GB"},
        "last_changed": "2026-11-30T00:53:20+00:00",
        **extra,
    }


def test_a_member_becomes_traits_and_email_consent() -> None:
    identify, consent = member_events(LIST, _member("ada@example.com"), DEFAULT_MERGE_TRAITS)
    mid = member_id("ada@example.com")
    assert identify.event_id == f"mailchimp-member:{LIST}:{mid}:{S0}"
    assert identify.customer == ingest_pb2.CustomerIdentifiers(email="ada@example.com")
    assert identify.source == ingest_pb2.EVENT_SOURCE_EMAIL and identify.occurred_at.seconds == S0
    # empty merge fields and ones that are not text (an address object) say nothing
    assert json_format.MessageToDict(identify.identify.traits) == {
        "first_name": "Ada",
        "birthday": "12/10",
        "language": "en",
        "country": "GB",
    }
    assert consent.event_id == f"mailchimp-consent:{LIST}:{mid}:{S0}"
    assert consent.consent_changed == ingest_pb2.ConsentChanged(
        channel=ingest_pb2.CHANNEL_EMAIL, subscribed=True
    )


@pytest.mark.parametrize(
    ("status", "subscribed"),
    [
        ("subscribed", True),
        ("unsubscribed", False),
        ("cleaned", None),
        ("pending", None),
        ("transactional", None),
    ],
)
def test_the_status_says_what_it_says_about_marketing_consent(status: str, subscribed: bool | None) -> None:
    events = member_events(LIST, _member("bo@example.com", status), {})
    consents = [e.consent_changed.subscribed for e in events if e.HasField("consent_changed")]
    assert consents == ([] if subscribed is None else [subscribed])


def test_a_cleaned_member_is_a_hard_bounce_suppression() -> None:
    identify, cleaned = member_events(LIST, _member("gone@example.com", "cleaned"), {})
    assert identify.HasField("identify")  # its language and country; no consent either way
    assert cleaned.event_id == f"mailchimp-cleaned:{LIST}:{member_id('gone@example.com')}:{S0}"
    assert cleaned.email_suppressed.reason == ingest_pb2.SUPPRESSION_REASON_HARD_BOUNCE


def test_a_member_without_an_id_address_or_time_is_skipped() -> None:
    assert member_events(LIST, _member("x@example.com", id="nope"), DEFAULT_MERGE_TRAITS) == []
    assert member_events(LIST, _member("x@example.com", email_address=""), DEFAULT_MERGE_TRAITS) == []
    assert member_events(LIST, _member("x@example.com", last_changed=None), DEFAULT_MERGE_TRAITS) == []
    with pytest.raises(ValueError):
        member_events(
            LIST, _member("x@example.com", last_changed="2026-11-30T00:53:20"), DEFAULT_MERGE_TRAITS
        )


def test_times_and_the_data_center_of_a_key() -> None:
    assert changed_s("2026-11-30T00:53:20+00:00") == S0
    assert changed_s("2026-11-30T01:53:20+01:00") == S0
    assert base_url_for_key("0123456789abcdef0123456789abcdef-us6") == "https://us6.api.mailchimp.com"
    with pytest.raises(ValueError, match="data center"):
        base_url_for_key("0123456789abcdef0123456789abcdef")


# --- against the local Mailchimp ---------------------------------------------------------------


@pytest.fixture
async def mailchimp() -> AsyncIterator[MailchimpServer]:
    server = await MailchimpServer(list_id=LIST).start()
    yield server
    await server.stop()


def _api(server: MailchimpServer, apis: list[ProviderApi]) -> ProviderApi:
    assert server.api_key is not None
    limits = ProviderLimits(requests=100, per_s=1.0, backoff_initial_s=0.05, backoff_max_s=0.2)
    apis.append(ProviderApi("mailchimp", server.url, BasicAuth("sendtime", server.api_key), limits))
    return apis[-1]


def _pull(server: MailchimpServer, apis: list[ProviderApi], **kw: Any) -> MailchimpMembers:
    return MailchimpMembers(_api(server, apis), LIST, **kw)


async def _all(pull: MailchimpMembers, cursor_s: int) -> tuple[list[ingest_pb2.Event], int]:
    events: list[ingest_pb2.Event] = []
    cursor = cursor_s
    async for page in pull.pages(cursor_s):
        events.extend(page.events)
        assert page.cursor_s >= cursor
        cursor = page.cursor_s
    return events, cursor


def _addresses(events: list[ingest_pb2.Event]) -> set[str]:
    return {e.customer.email for e in events}


async def test_every_member_comes_across_pages_and_the_cursor_is_the_newest_change(
    mailchimp: MailchimpServer, apis: list[ProviderApi]
) -> None:
    for i in range(23):
        mailchimp.put(f"m{i}@example.com", S0 + i, FNAME=f"n{i}")
    events, cursor = await _all(_pull(mailchimp, apis, page_size=5), 0)
    assert _addresses(events) == {f"m{i}@example.com" for i in range(23)}
    assert cursor == S0 + 22
    first = mailchimp.queries[0]
    assert (first["count"], first["offset"], first["sort_dir"]) == ("5", "0", "ASC")


async def test_members_sharing_one_second_past_a_page_are_paged_by_offset(
    mailchimp: MailchimpServer, apis: list[ProviderApi]
) -> None:
    for i in range(12):
        mailchimp.put(f"same{i}@example.com", S0, FNAME="x")  # an import: one second for all
    mailchimp.put("later@example.com", S0 + 5, FNAME="y")
    events, cursor = await _all(_pull(mailchimp, apis, page_size=5, lookback_s=0), S0)
    assert _addresses(events) == {f"same{i}@example.com" for i in range(12)} | {"later@example.com"}
    assert cursor == S0 + 5
    assert [q["offset"] for q in mailchimp.queries][:3] == ["0", "5", "10"]


async def test_a_member_changing_during_the_run_makes_no_other_one_skipped(
    mailchimp: MailchimpServer, apis: list[ProviderApi]
) -> None:
    for i in range(10):
        mailchimp.put(f"m{i}@example.com", S0 + i, FNAME="x")
    pull = _pull(mailchimp, apis, page_size=4, lookback_s=0)
    seen: set[str] = set()
    async for page in pull.pages(0):
        seen |= _addresses(list(page.events))
        if "m0@example.com" in seen and "m0-moved" not in seen:
            # m1 changes now: it moves to the end of the order; offset paging would skip m4
            mailchimp.put("m1@example.com", S0 + 100, FNAME="changed")
            seen.add("m0-moved")
    assert {f"m{i}@example.com" for i in range(10)} <= seen


async def test_the_next_run_starts_a_lookback_before_the_cursor(
    mailchimp: MailchimpServer, apis: list[ProviderApi]
) -> None:
    mailchimp.put("old@example.com", S0 - 500, FNAME="o")
    mailchimp.put("recent@example.com", S0 - 30, FNAME="r")
    events, _ = await _all(_pull(mailchimp, apis, lookback_s=60), S0)
    assert _addresses(events) == {"recent@example.com"}
    assert mailchimp.queries[0]["since_last_changed"] == "2026-11-30T00:52:19+00:00"  # S0 - 60 s - 1 s


async def test_an_unknown_audience_is_a_refusal_and_a_wrong_key_too(
    mailchimp: MailchimpServer, apis: list[ProviderApi]
) -> None:
    assert mailchimp.api_key is not None
    limits = ProviderLimits(requests=100, per_s=1.0)
    for key in (mailchimp.api_key, "wrong-us6"):
        apis.append(ProviderApi("mailchimp", mailchimp.url, BasicAuth("sendtime", key), limits))
    with pytest.raises(ProviderRefused, match="HTTP 404: Resource Not Found"):
        await _all(MailchimpMembers(apis[0], "zzzz999999"), 0)
    with pytest.raises(ProviderRefused, match="HTTP 401"):
        await _all(MailchimpMembers(apis[1], LIST), 0)


def test_settings_mailchimp_would_refuse_are_refused_up_front() -> None:
    api = ProviderApi("mailchimp", "http://127.0.0.1:9", BasicAuth("u", "k-us6"), ProviderLimits(10, 1.0))
    with pytest.raises(ValueError, match="page_size 5000"):
        MailchimpMembers(api, LIST, page_size=5000)
    with pytest.raises(ValueError, match="audience"):
        MailchimpMembers(api, "../admin")


# --- pushing traits to the audience ------------------------------------------------------------


def test_an_item_is_a_member_with_its_merge_fields_and_a_status_only_if_new() -> None:
    item = PushItem("user:1", {"first_name": "Ada", "tier": "gold"}, 2, email="ada@example.com")
    assert member_object(item, {"first_name": "FNAME"}, "transactional") == {
        "email_address": "ada@example.com",
        "status_if_new": "transactional",
        "merge_fields": {"FNAME": "Ada"},  # a trait without a merge field is not sent
    }


async def test_a_push_updates_members_adds_new_ones_unsubscribed_and_refuses_per_address(
    mailchimp: MailchimpServer, apis: list[ProviderApi]
) -> None:
    mailchimp.put("known@example.com", S0, status="subscribed", FNAME="Old")
    push = MailchimpPush(_api(mailchimp, apis), LIST)
    items = [
        PushItem("user:1", {"first_name": "Known"}, 3, email="known@example.com"),
        PushItem("user:2", {"first_name": "New"}, 3, email="new@example.com"),
        PushItem("user:3", {"first_name": "Bad"}, 3, email="not-an-address"),
        PushItem("user:4", {"first_name": "Nobody"}, 3),
    ]
    results = {r.item.customer_key: (r.outcome, r.reason) for r in await push.push(items)}
    assert results == {
        "user:1": (ItemOutcome.PUSHED, ""),
        "user:2": (ItemOutcome.PUSHED, ""),
        "user:3": (ItemOutcome.REFUSED, "ERROR_GENERIC"),  # the code, not the message with the address
        "user:4": (ItemOutcome.REFUSED, "no email address"),
    }
    known = mailchimp.members[member_id("known@example.com")]
    new = mailchimp.members[member_id("new@example.com")]
    assert (known["status"], known["merge_fields"]["FNAME"]) == ("subscribed", "Known")  # consent untouched
    assert (new["status"], new["merge_fields"]["FNAME"]) == (
        "transactional",
        "New",
    )  # never subscribed by a push


async def test_a_push_goes_500_members_a_request(mailchimp: MailchimpServer, apis: list[ProviderApi]) -> None:
    push = MailchimpPush(_api(mailchimp, apis), LIST)
    items = [PushItem(f"user:{n}", {"first_name": "x"}, 1, email=f"p{n}@example.com") for n in range(620)]
    results = await push.push(items)
    assert mailchimp.batch_sizes == [500, 120]
    assert all(r.outcome == ItemOutcome.PUSHED for r in results)
