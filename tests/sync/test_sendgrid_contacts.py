"""sync.sendgrid_contacts: an item as a SendGrid contact, an import status and an errors file read
(pure), and the push against a local SendGrid (tests/sync/sendgrid_contacts_server.py): batches by
count and size, each import followed to its end, refused contacts refused with their error's kind
and the others pushed, an import still pending retried and its contacts held back until it ends, a
failed import retried, a 400 refusing its batch, the rate limit waited out, the API key never sent
to another host."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from sync.provider_http import ApiKey, ProviderAnswer, ProviderApi, ProviderLimits
from sync.push import ItemOutcome, PushItem
from sync.sendgrid_contacts import (
    BATCH_SIZE,
    SendGridContacts,
    contact_object,
    error_kind,
    errors_by_email,
    import_job,
    refusal_kind,
)
from tests.sync.provider_server import Scripted
from tests.sync.sendgrid_contacts_server import SendGridContactsServer

FIELD_IDS = {"tier": "e1_T", "orders": "e2_N"}


def _item(n: int, version: int = 1, email: str | None = None, **attributes: Any) -> PushItem:
    return PushItem(
        f"user:{n}",
        attributes or {"first_name": f"n{n}", "tier": "gold"},
        version,
        external_id=str(n),
        email=f"p{n}@example.com" if email is None else email,
    )


# --- pure -----------------------------------------------------------------------------------------


def test_an_item_is_a_contact_with_reserved_fields_by_trait_name_and_custom_fields_by_id() -> None:
    traits = {
        "first_name": "Ada",
        "last_name": "Lovelace",
        "city": "London",
        "state": "Greater London",
        "phone": "+44 20 7946 0000",
        "postal_code": 12345,
        "tier": "gold",
        "orders": 3,
        "favourite_colour": "green",  # neither reserved nor mapped: not sent
        "email": "other@example.com",  # the address is the item's, never a trait's
    }
    item = PushItem("user:1", traits, 1, external_id="1", email=" Ada@Example.com ")
    assert contact_object(item, FIELD_IDS) == {
        "email": "Ada@Example.com",  # SendGrid lower-cases it
        "first_name": "Ada",
        "last_name": "Lovelace",
        "city": "London",
        "state_province_region": "Greater London",
        "phone_number": "+44 20 7946 0000",
        "postal_code": "12345",
        "custom_fields": {"e1_T": "gold", "e2_N": 3},
    }
    # an operator may send a reserved-looking trait to a custom field instead
    assert contact_object(_item(2, city="Leeds"), {"city": "e3_T"}) == {
        "email": "p2@example.com",
        "custom_fields": {"e3_T": "Leeds"},
    }


def test_values_sendgrid_cannot_hold_are_left_out() -> None:
    item = _item(1, first_name=None, last_name=["a", "b"], city={"name": "x"}, tier=True, orders=2.5)
    assert contact_object(item, FIELD_IDS) == {"email": "p1@example.com", "custom_fields": {"e2_N": 2.5}}


def test_an_item_without_an_address_or_with_a_value_past_sendgrids_length_is_refused_by_field() -> None:
    with pytest.raises(ValueError, match="^no email address$"):
        contact_object(_item(1, email="  "), FIELD_IDS)
    with pytest.raises(ValueError, match="^first_name over 50 characters$"):
        contact_object(_item(1, first_name="A" * 51), FIELD_IDS)
    with pytest.raises(ValueError, match="^email over 254 characters$"):
        contact_object(_item(1, email="a" * 250 + "@x.io"), FIELD_IDS)


def test_an_import_status_answer_is_read() -> None:
    answer = {
        "id": "9b1a2c3d",
        "status": "errored",
        "job_type": "upsert",
        "results": {
            "requested_count": 1200,
            "created_count": 1100,
            "updated_count": 95,
            "deleted_count": 0,
            "errored_count": 5,
            "errors_url": "https://example.com/errors.csv",
        },
    }
    job = import_job(answer)
    assert (job.status, job.finished, job.requested, job.created, job.updated, job.errored) == (
        "errored",
        True,
        1200,
        1100,
        95,
        5,
    )
    assert job.errors_url == "https://example.com/errors.csv"
    assert import_job({"status": "pending"}).finished is False
    assert import_job({"status": "queued?"}).status == "pending"  # undocumented: not finished
    assert import_job(["not", "an", "object"]).status == "pending"


def test_the_errors_file_names_addresses_and_keeps_only_each_errors_kind() -> None:
    data = (
        b"\xef\xbb\xbfEmail,Error Reason\r\n"
        b"Bob@Example.com,\"email 'Bob@Example.com' is not valid\"\r\n"
        b"carol@example.com,custom field ID 'e9_T' does not exist\r\n"
        b",row without an address\r\n"
    )
    assert errors_by_email(data) == {
        "bob@example.com": "email is not valid",
        "carol@example.com": "custom field ID does not exist",
    }
    assert errors_by_email(b"email_address,reason\ndan@example.com,too long\n") == {
        "dan@example.com": "too long"
    }
    assert errors_by_email(b"email\neve@example.com\n") == {"eve@example.com": "errored"}
    assert errors_by_email(b"id,error\n1,bad\n") == {}  # no column of addresses
    # read only in part: the last line may be cut short and is not read
    assert errors_by_email(b"email,error\nf@example.com,bad\ng@exam", cut_short=True) == {
        "f@example.com": "bad"
    }


def test_an_error_kind_keeps_no_address_quoted_value_or_number() -> None:
    assert error_kind("invalid email: ada@example.com") == "invalid email"
    assert error_kind('first_name "Ada Lovelace" over 50 characters') == "first_name over 50 characters"
    assert error_kind("phone_number +442079460000 invalid") == "phone_number invalid"
    assert error_kind("'ada@example.com'") == "errored"
    assert len(error_kind("x" * 500)) == 100


def test_a_400s_kind_is_its_field_or_error_id_never_its_message() -> None:
    def answer(body: Any) -> ProviderAnswer:
        return ProviderAnswer(400, {}, orjson.dumps(body))

    assert refusal_kind(answer({"errors": [{"field": "contacts", "message": "ada@example.com"}]})) == (
        "invalid contacts"
    )
    assert refusal_kind(answer({"errors": [{"field": None, "error_id": "too_big", "message": "x"}]})) == (
        "too_big"
    )
    assert refusal_kind(answer({"errors": [{"message": "ada@example.com"}]})) == "request refused"
    assert refusal_kind(ProviderAnswer(400, {}, b"<html>")) == "request refused"


def test_settings_sendgrid_would_refuse_are_refused_up_front() -> None:
    api = ProviderApi("sendgrid", "http://127.0.0.1:9", ApiKey("k"), ProviderLimits(10, 1.0))
    with pytest.raises(ValueError, match="not a SendGrid custom field id"):
        SendGridContacts(api, {"tier": "_rf0_T"})  # a reserved field's id: set it by name
    with pytest.raises(ValueError, match="not a SendGrid custom field id"):
        SendGridContacts(api, {"tier": "e1 T; DROP"})
    with pytest.raises(ValueError, match="traits favourite_colour: neither"):
        SendGridContacts(api, FIELD_IDS, traits=["first_name", "phone", "tier", "favourite_colour"])
    with pytest.raises(ValueError, match="batch_size 30001"):
        SendGridContacts(api, batch_size=30_001)
    with pytest.raises(ValueError, match="batch_bytes"):
        SendGridContacts(api, batch_bytes=7_000_000)
    SendGridContacts(api, FIELD_IDS, traits=["first_name", "phone", "state", "tier", "orders"])


# --- against the local SendGrid -------------------------------------------------------------------


@pytest.fixture
async def sendgrid() -> AsyncIterator[SendGridContactsServer]:
    server = await SendGridContactsServer(polls_until_done=2).start()
    yield server
    await server.stop()


def _destination(
    server: SendGridContactsServer,
    apis: list[ProviderApi],
    field_ids: dict[str, str] = FIELD_IDS,
    **kw: Any,
) -> SendGridContacts:
    assert server.api_key is not None
    limits = ProviderLimits(requests=1000, per_s=1.0, backoff_initial_s=0.05, backoff_max_s=0.2, attempts=8)
    apis.append(ProviderApi("sendgrid", server.url, ApiKey(server.api_key), limits))
    kw.setdefault("wait_budget_s", 10.0)
    kw.setdefault("poll_initial_s", 0.01)
    kw.setdefault("poll_max_s", 0.05)
    return SendGridContacts(apis[-1], field_ids, api_base_url=server.url, **kw)


async def test_items_go_1000_a_request_and_each_import_is_followed_to_its_end(
    sendgrid: SendGridContactsServer, apis: list[ProviderApi]
) -> None:
    results = await _destination(sendgrid, apis).push([_item(n) for n in range(2500)])
    assert BATCH_SIZE == 1000 and sendgrid.batch_sizes == [1000, 1000, 500]
    assert [r.outcome for r in results] == [ItemOutcome.PUSHED] * 2500
    assert [r.item.customer_key for r in results] == [f"user:{n}" for n in range(2500)]  # in order
    assert {job.status for job in sendgrid.jobs.values()} == {"completed"}
    assert sendgrid.polls >= 3 * 3  # each job: pending twice, then completed
    assert len(sendgrid.contacts) == 2500


async def test_a_batch_also_stays_under_its_byte_budget(
    sendgrid: SendGridContactsServer, apis: list[ProviderApi]
) -> None:
    items = [_item(n, first_name="x" * 40, tier="t" * 200) for n in range(40)]
    destination = _destination(sendgrid, apis, batch_bytes=2048)
    results = await destination.push([*items, _item(99, tier="t" * 5000)])
    assert len(sendgrid.batch_sizes) > 1 and max(sendgrid.request_bytes) <= 2048
    assert sum(sendgrid.batch_sizes) == 40
    assert [r.outcome for r in results[:40]] == [ItemOutcome.PUSHED] * 40
    assert (results[40].outcome, results[40].reason) == (ItemOutcome.REFUSED, "contact over 2,048 bytes")


async def test_a_pushed_contact_holds_its_reserved_and_custom_fields_and_keeps_the_others(
    sendgrid: SendGridContactsServer, apis: list[ProviderApi]
) -> None:
    sendgrid.contacts["ada@example.com"] = {
        "email": "ada@example.com",
        "city": "Paris",
        "custom_fields": {"e2_N": 7},
    }
    item = _item(1, email="Ada@Example.com", first_name="Ada", phone="+44 20 7946 0000", tier="gold")
    results = await _destination(sendgrid, apis).push([item])
    assert [(r.outcome, r.reason) for r in results] == [(ItemOutcome.PUSHED, "")]
    assert sendgrid.contacts == {
        "ada@example.com": {
            "email": "ada@example.com",
            "city": "Paris",  # not sent: left as it was
            "first_name": "Ada",
            "phone_number": "+44 20 7946 0000",
            "custom_fields": {"e2_N": 7, "e1_T": "gold"},
        }
    }


async def test_contacts_sendgrid_refuses_are_refused_with_the_kind_and_the_others_pushed(
    sendgrid: SendGridContactsServer, apis: list[ProviderApi]
) -> None:
    # e9_T: a custom field the account does not have
    destination = _destination(sendgrid, apis, {**FIELD_IDS, "favourite_colour": "e9_T"})
    items = [
        _item(1),
        _item(2, email="not-an-address"),
        _item(3, first_name="Bea", favourite_colour="green"),
        _item(4, email=""),
        _item(5),
    ]
    results = {r.item.customer_key: (r.outcome, r.reason) for r in await destination.push(items)}
    assert results == {
        "user:1": (ItemOutcome.PUSHED, ""),
        "user:2": (ItemOutcome.REFUSED, "email is not a valid email address"),  # never the value
        "user:3": (ItemOutcome.REFUSED, "custom field ID does not exist"),
        "user:4": (ItemOutcome.REFUSED, "no email address"),  # not sent: SendGrid keys by address
        "user:5": (ItemOutcome.PUSHED, ""),
    }
    assert sendgrid.batch_sizes == [4] and set(sendgrid.contacts) == {"p1@example.com", "p5@example.com"}
    # the errors file was on another origin: fetched without the API key
    assert sendgrid.download_authorizations == [""]


async def test_an_errors_file_under_the_api_itself_is_read_with_the_key(
    sendgrid: SendGridContactsServer, apis: list[ProviderApi]
) -> None:
    sendgrid.errors_on_api_host = True
    results = await _destination(sendgrid, apis).push([_item(1), _item(2, email="nobody")])
    assert [(r.outcome, r.reason) for r in results] == [
        (ItemOutcome.PUSHED, ""),
        (ItemOutcome.REFUSED, "email is not a valid email address"),
    ]
    assert sendgrid.download_authorizations == []
    assert any(seen.path.endswith("/errors.csv") for seen in sendgrid.seen)


async def test_an_import_still_pending_is_retried_and_its_contacts_held_back_until_it_ends(
    sendgrid: SendGridContactsServer, apis: list[ProviderApi]
) -> None:
    sendgrid.polls_until_done = 10_000
    destination = _destination(sendgrid, apis, wait_budget_s=0.2)
    first = await destination.push([_item(1, 1), _item(2, 1)])
    assert [(r.outcome, r.reason) for r in first] == [(ItemOutcome.RETRY, "import still pending")] * 2
    # the next run: a newer version of user:1 must not overtake the pending import of its contact
    second = await destination.push([_item(1, 2, first_name="newer"), _item(3, 1)])
    assert [(r.item.customer_key, r.outcome) for r in second] == [
        ("user:1", ItemOutcome.RETRY),
        ("user:3", ItemOutcome.RETRY),  # user:3's own import is pending too now
    ]
    assert second[0].reason == "an earlier import of this contact is still pending"
    assert sendgrid.batch_sizes == [2, 1]
    # the first imports end (and apply); the next run sends user:1's newer version
    sendgrid.finish_jobs()
    sendgrid.polls_until_done = 0
    third = await destination.push([_item(1, 2, first_name="newer")])
    assert [r.outcome for r in third] == [ItemOutcome.PUSHED]
    assert sendgrid.contacts["p1@example.com"]["first_name"] == "newer"
    assert sendgrid.batch_sizes == [2, 1, 1]


async def test_with_too_many_imports_pending_nothing_more_is_sent_until_they_end(
    sendgrid: SendGridContactsServer, apis: list[ProviderApi]
) -> None:
    sendgrid.polls_until_done = 10_000
    destination = _destination(sendgrid, apis, wait_budget_s=0.1, max_pending_imports=1)
    await destination.push([_item(1)])
    results = await destination.push([_item(2), _item(3)])
    assert [(r.outcome, r.reason) for r in results] == [
        (ItemOutcome.RETRY, "too many imports still pending")
    ] * 2
    assert sendgrid.batch_sizes == [1]  # nothing added to SendGrid's queue
    sendgrid.finish_jobs()
    sendgrid.polls_until_done = 0
    await asyncio.sleep(0.06)  # poll_max_s: the pending import is looked at again
    results = await destination.push([_item(2), _item(3)])
    assert [r.outcome for r in results] == [ItemOutcome.PUSHED] * 2
    assert sendgrid.batch_sizes == [1, 2]


async def test_a_failed_import_is_retried(sendgrid: SendGridContactsServer, apis: list[ProviderApi]) -> None:
    sendgrid.fail_jobs = True
    results = await _destination(sendgrid, apis).push([_item(1), _item(2)])
    assert [(r.outcome, r.reason) for r in results] == [(ItemOutcome.RETRY, "import failed")] * 2
    assert sendgrid.contacts == {}


async def test_an_import_of_contacts_all_invalid_fails_and_refuses_each(
    sendgrid: SendGridContactsServer, apis: list[ProviderApi]
) -> None:
    results = await _destination(sendgrid, apis).push([_item(1, email="nobody")])
    assert [job.status for job in sendgrid.jobs.values()] == ["failed"]
    assert [(r.outcome, r.reason) for r in results] == [
        (ItemOutcome.REFUSED, "email is not a valid email address")
    ]


async def test_a_request_sendgrid_refuses_refuses_each_of_its_items_with_the_kind(
    sendgrid: SendGridContactsServer, apis: list[ProviderApi]
) -> None:
    body = orjson.dumps({"errors": [{"field": "contacts", "message": "'p1@example.com' is bad"}]})
    sendgrid.script.append(Scripted(400, {"Content-Type": "application/json"}, body))
    results = await _destination(sendgrid, apis, batch_size=2).push([_item(n) for n in range(3)])
    assert [(r.outcome, r.reason) for r in results] == [
        (ItemOutcome.REFUSED, "invalid contacts"),
        (ItemOutcome.REFUSED, "invalid contacts"),
        (ItemOutcome.PUSHED, ""),  # the next batch went through
    ]


async def test_two_customers_sharing_an_address_go_in_separate_imports_in_order(
    sendgrid: SendGridContactsServer, apis: list[ProviderApi]
) -> None:
    items = [_item(1, email="Shared@example.com", first_name="One"), _item(2, email="shared@example.com")]
    results = await _destination(sendgrid, apis).push([*items, _item(3)])
    assert [r.outcome for r in results] == [ItemOutcome.PUSHED] * 3
    assert sendgrid.batch_sizes == [2, 1]
    assert sendgrid.contacts["shared@example.com"]["first_name"] == "n2"  # the later one, applied later


async def test_the_rate_limit_is_waited_out_to_its_reset(
    sendgrid: SendGridContactsServer, apis: list[ProviderApi]
) -> None:
    sendgrid.requests_per_s, sendgrid.polls_until_done = 2, 0
    results = await _destination(sendgrid, apis, batch_size=20).push([_item(n) for n in range(60)])
    assert sendgrid.throttled > 0 and sendgrid.batch_sizes == [20, 20, 20]
    assert all(r.outcome == ItemOutcome.PUSHED for r in results) and len(sendgrid.contacts) == 60
