"""Destination checks and UpdateDestination masks, without I/O."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from google.protobuf import duration_pb2, field_mask_pb2

from sendtime.triggers.v1 import triggers_pb2
from sendtime_common.errors import FieldViolation
from triggers.destination_validation import (
    DEFAULT_ACK_TIMEOUT,
    DEFAULT_PREVIOUS_SECRET_TTL,
    ack_timeout,
    apply_update,
    check_destination,
    check_destination_id,
    check_state,
    check_update_mask,
    previous_secret_ttl,
)


def webhook(**fields: Any) -> triggers_pb2.Destination:
    return triggers_pb2.Destination(
        webhook=triggers_pb2.WebhookTarget(url="https://hooks.example.com/"), **fields
    )


def fields(violations: list[FieldViolation]) -> set[str]:
    return {v.field for v in violations}


def test_a_valid_webhook_and_subscription_pass() -> None:
    assert check_destination(webhook(display_name="ESP", max_concurrency=100)) == []
    subscription = triggers_pb2.Destination(
        subscription=triggers_pb2.SubscriptionTarget(ack_timeout=duration_pb2.Duration(seconds=3600))
    )
    assert check_destination(subscription) == []
    assert check_destination_id("braze-eu") == []


@pytest.mark.parametrize("destination_id", ["", "Braze", "1st", "a" * 64, "a_b"])
def test_an_id_is_lower_case_letters_digits_and_dashes(destination_id: str) -> None:
    assert fields(check_destination_id(destination_id)) == {"destination_id"}


def test_every_bad_field_is_named() -> None:
    destination = webhook(display_name="x" * 201, max_concurrency=101)
    destination.webhook.url = ""
    destination.webhook.timeout.FromSeconds(31)
    destination.webhook.headers["Content-Type"] = "text/plain"
    assert fields(check_destination(destination)) == {
        "destination.display_name",
        "destination.max_concurrency",
        "destination.webhook.url",
        "destination.webhook.timeout",
        "destination.webhook.headers['Content-Type']",
    }
    assert fields(check_destination(triggers_pb2.Destination())) == {"destination"}
    short = triggers_pb2.Destination(
        subscription=triggers_pb2.SubscriptionTarget(ack_timeout=duration_pb2.Duration(nanos=500_000_000))
    )
    assert fields(check_destination(short)) == {"destination.subscription.ack_timeout"}


def test_a_mask_names_updatable_fields_of_the_stored_kind() -> None:
    mask = field_mask_pb2.FieldMask(paths=["state", "webhook.url", "subscription", "etag", "urll"])
    problems = {v.field: v.description for v in check_update_mask(mask, "webhook")}
    assert set(problems) == {"update_mask.paths[2]", "update_mask.paths[3]", "update_mask.paths[4]"}
    assert "fixed" in problems["update_mask.paths[2]"]
    assert "output only" in problems["update_mask.paths[3]"]
    assert "no field" in problems["update_mask.paths[4]"]
    assert fields(check_update_mask(field_mask_pb2.FieldMask(), "webhook")) == {"update_mask"}


def test_an_update_takes_the_masked_fields_and_the_state_only_when_named() -> None:
    stored = webhook(display_name="old", state=triggers_pb2.DESTINATION_STATE_ENABLED, max_concurrency=5)
    stored.webhook.headers["Authorization"] = "Bearer a"
    change = webhook(display_name="new", state=triggers_pb2.DESTINATION_STATE_DISABLED)
    change.webhook.url = "https://other.example.com/"

    request = triggers_pb2.UpdateDestinationRequest(
        destination=change, update_mask=field_mask_pb2.FieldMask(paths=["webhook.url", "display_name"])
    )
    updated = apply_update(stored, request)

    assert updated.display_name == "new" and updated.webhook.url == "https://other.example.com/"
    assert dict(updated.webhook.headers) == {"Authorization": "Bearer a"} and updated.max_concurrency == 5
    assert updated.state == triggers_pb2.DESTINATION_STATE_UNSPECIFIED  # the store keeps its own
    every = apply_update(
        stored,
        triggers_pb2.UpdateDestinationRequest(
            destination=change, update_mask=field_mask_pb2.FieldMask(paths=["*"])
        ),
    )
    assert every.state == triggers_pb2.DESTINATION_STATE_DISABLED and not every.webhook.headers
    assert every.max_concurrency == 0  # unset in the request: cleared, so the default applies
    unset = triggers_pb2.Destination(webhook=change.webhook)
    assert fields(check_state(unset, ["state"], "destination")) == {"destination.state"}


def test_durations_with_their_defaults() -> None:
    assert previous_secret_ttl(None) == DEFAULT_PREVIOUS_SECRET_TTL
    assert previous_secret_ttl(duration_pb2.Duration(seconds=0)) == timedelta(0)
    assert isinstance(previous_secret_ttl(duration_pb2.Duration(seconds=8 * 86400)), FieldViolation)
    assert isinstance(previous_secret_ttl(duration_pb2.Duration(seconds=-1)), FieldViolation)
    assert (
        ack_timeout(triggers_pb2.Destination(subscription=triggers_pb2.SubscriptionTarget()))
        == DEFAULT_ACK_TIMEOUT
    )
