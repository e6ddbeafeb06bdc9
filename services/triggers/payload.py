"""The body of a fire's webhook: what a receiver gets when a trigger fires (pure; no I/O).

Standard Webhooks style (an event ``type``, a ``timestamp``, the event's ``data``)::

    {
      "type": "trigger.fired",
      "timestamp": "2026-12-05T09:00:05.000000Z",          # when it fired
      "data": {
        "trigger": "triggers/cart-abandoned",
        "profile": "profiles/5b0e...",                       # the customer's opaque id
        "episode_key": "",                                   # "" for a trigger without a key
        "fire_time": "2026-12-05T09:00:00.000000Z",         # when the episode was due to fire
        "fired_at": "2026-12-05T09:00:05.000000Z",
        "message": {                                         # only with a template
          "subject": "...", "html": "...", "text": "...",
          "template": "templates/abandoned-cart",
          "template_version": "3",                           # int64s as strings (proto3 JSON)
          "profile_version": "42"
        },
        "variables": {...}                                   # the trigger's delivery.variables
      }
    }

Times are RFC 3339 in UTC with microseconds. Versions are strings, as protobuf's JSON writes
int64: the payload is kept as a ``google.protobuf.Struct`` (numbers are doubles there), and a
string reads back the same on every attempt. The body holds personal data (the rendered
message); it is erased with the customer.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

from sendtime.render.v1 import render_pb2
from triggers.trigger_validation import trigger_name

EVENT_TYPE: Final = "trigger.fired"


def rfc3339(at: datetime) -> str:
    """``at`` in UTC as ``2026-12-05T09:00:05.000000Z``."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def fired_payload(
    *,
    trigger_id: str,
    customer_id: str,
    episode_key: str,
    fire_time: datetime,
    fired_at: datetime,
    variables: Mapping[str, Any],
    template: str = "",
    rendered: render_pb2.RenderResponse | None = None,
) -> dict[str, Any]:
    """The webhook body of a fire; ``rendered`` is the template's render (with ``template``
    its name), None for a trigger without a template."""
    data: dict[str, Any] = {
        "trigger": trigger_name(trigger_id),
        "profile": f"profiles/{customer_id}",
        "episode_key": episode_key,
        "fire_time": rfc3339(fire_time),
        "fired_at": rfc3339(fired_at),
    }
    if rendered is not None:
        data["message"] = {
            "subject": rendered.subject,
            "html": rendered.html,
            "text": rendered.text,
            "template": template,
            "template_version": str(rendered.template_version),
            "profile_version": str(rendered.profile_version),
        }
    data["variables"] = dict(variables)
    return {"type": EVENT_TYPE, "timestamp": rfc3339(fired_at), "data": data}
