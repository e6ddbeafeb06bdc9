"""The webhook body of a fire (payload.fired_payload): Standard Webhooks' shape, times in UTC,
versions as strings, the message only with a template."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from google.protobuf import json_format, struct_pb2

from sendtime.render.v1 import render_pb2
from triggers.payload import EVENT_TYPE, fired_payload, rfc3339

FIRE_TIME = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)
FIRED_AT = FIRE_TIME + timedelta(seconds=5, microseconds=120)


def test_a_fire_with_a_rendered_template_carries_the_message() -> None:
    rendered = render_pb2.RenderResponse(
        subject="Ada, your cart", html="<p>x</p>", text="x", template_version=3, profile_version=42
    )
    payload = fired_payload(
        trigger_id="cart-abandoned",
        customer_id="c-1",
        episode_key="",
        fire_time=FIRE_TIME,
        fired_at=FIRED_AT,
        variables={"code": "COMEBACK10"},
        template="templates/abandoned-cart",
        rendered=rendered,
    )
    assert payload == {
        "type": EVENT_TYPE,
        "timestamp": "2026-12-05T09:00:05.000120Z",
        "data": {
            "trigger": "triggers/cart-abandoned",
            "profile": "profiles/c-1",
            "episode_key": "",
            "fire_time": "2026-12-05T09:00:00.000000Z",
            "fired_at": "2026-12-05T09:00:05.000120Z",
            "message": {
                "subject": "Ada, your cart",
                "html": "<p>x</p>",
                "text": "x",
                "template": "templates/abandoned-cart",
                "template_version": "3",
                "profile_version": "42",
            },
            "variables": {"code": "COMEBACK10"},
        },
    }


def test_a_fire_without_a_template_has_no_message_and_the_body_survives_the_struct_unchanged() -> None:
    payload = fired_payload(
        trigger_id="order-completed",
        customer_id="c-2",
        episode_key="o-17",
        fire_time=FIRE_TIME,
        fired_at=FIRED_AT,
        variables={},
    )
    assert "message" not in payload["data"] and payload["data"]["episode_key"] == "o-17"
    # Stored as JSONB and read back as a Struct (OutboundDelivery.from_proto): the same values
    # (strings, not numbers that would come back as doubles).
    struct = json_format.ParseDict(payload, struct_pb2.Struct())
    assert json_format.MessageToDict(struct) == payload


def test_times_are_utc_whatever_the_zone_given() -> None:
    berlin = timezone(timedelta(hours=1))
    assert rfc3339(datetime(2026, 12, 5, 10, 0, tzinfo=berlin)) == "2026-12-05T09:00:00.000000Z"
