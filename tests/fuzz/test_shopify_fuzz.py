"""Shopify's parsers under arbitrary input, topic by topic: a mapped delivery or a documented
refusal, never another exception, and never an item whose mapping failed."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.webhook_mapping import WebhookPayloadError, shopify_events
from sendtime_common.json_input import JsonInputError, parse_json
from tests.fuzz.checks import check_delivery
from tests.fuzz.conftest import fuzzing
from tests.fuzz.strategies import TOPICS, json_values, shopify_resources

webhook_ids = st.sampled_from(["", "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043"]) | st.text(max_size=20)


@pytest.mark.parametrize("topic", [*TOPICS, "products/update"])
@settings(fuzzing())
@given(resource=shopify_resources, webhook_id=webhook_ids)
def test_a_resource_of_each_topic(topic: str, resource: dict[str, Any], webhook_id: str) -> None:
    delivery = shopify_events(topic, webhook_id, resource)
    assert len(delivery.items) == 1
    check_delivery(delivery)


@settings(fuzzing())
@given(topic=st.sampled_from(TOPICS), payload=json_values)
def test_any_json_value(topic: str, payload: Any) -> None:
    try:
        delivery = shopify_events(topic, "wh-1", payload)
    except WebhookPayloadError:
        assert not isinstance(payload, dict)
        return
    check_delivery(delivery)


@settings(fuzzing())
@given(topic=st.sampled_from(TOPICS), body=st.binary(max_size=200))
def test_arbitrary_bytes_as_a_body(topic: str, body: bytes) -> None:
    try:
        payload = parse_json(body, top_level="object")
    except JsonInputError:
        return
    check_delivery(shopify_events(topic, "wh-1", payload))
