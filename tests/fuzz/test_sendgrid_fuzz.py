"""SendGrid's parser under arbitrary input: a mapped delivery or a documented refusal, never
another exception, and never an item whose mapping failed."""

from __future__ import annotations

from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from ingest.webhook_mapping import ItemOutcome, WebhookPayloadError, sendgrid_events
from sendtime_common.json_input import JsonInputError, parse_json
from tests.fuzz.checks import check_delivery
from tests.fuzz.conftest import fuzzing
from tests.fuzz.strategies import json_values, sendgrid_items


@settings(fuzzing())
@given(st.lists(sendgrid_items, max_size=8))
@example([{"event": "open", "email": "a@example.com", "timestamp": 10**15}])  # was a 500
@example([{"event": "open", "email": "a@example.com", "timestamp": 2**63}])
def test_a_batch(batch: list[Any]) -> None:
    delivery = sendgrid_events(batch)
    assert [item.index for item in delivery.items] == list(range(len(batch)))
    check_delivery(delivery)


@settings(fuzzing())
@given(json_values)
def test_any_json_value(payload: Any) -> None:
    try:
        delivery = sendgrid_events(payload)
    except WebhookPayloadError:
        assert not isinstance(payload, list)
        return
    check_delivery(delivery)
    assert all(item.outcome != ItemOutcome.MAPPED or item.events for item in delivery.items)


@settings(fuzzing())
@given(st.binary(max_size=200))
def test_arbitrary_bytes_as_a_body(body: bytes) -> None:
    try:
        payload = parse_json(body, top_level="array")
    except JsonInputError:
        return
    check_delivery(sendgrid_events(payload))
