"""Who must not get a message, and messages that must not go out: pure rules over the profile
and the render context."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sendtime.ingest.v1 import ingest_pb2
from sendtime.profile.v1 import profile_pb2
from sendtime.render.v1 import render_pb2


@dataclass(frozen=True, slots=True)
class Skip:
    reason: int  # render_pb2.SkipReason
    detail: str


def suppression(profile: profile_pb2.Profile, channel: int) -> Skip | None:
    """Why this customer must not be contacted on ``channel`` (email when unspecified)."""
    channel = channel or ingest_pb2.CHANNEL_EMAIL
    if channel == ingest_pb2.CHANNEL_EMAIL:
        if profile.email.unsubscribed:
            return Skip(render_pb2.SKIP_REASON_UNSUBSCRIBED, "the customer unsubscribed from email")
        if profile.email.spam_reported:
            return Skip(render_pb2.SKIP_REASON_SPAM_REPORTED, "the customer reported an email as spam")
        if profile.email.bounce_state == profile_pb2.BOUNCE_STATE_HARD:
            return Skip(render_pb2.SKIP_REASON_HARD_BOUNCED, "the customer's address bounced hard")
    for consent in profile.consents:
        if consent.channel == channel and not consent.subscribed:
            name = ingest_pb2.Channel.Name(channel).removeprefix("CHANNEL_").lower()  # type: ignore[arg-type]
            return Skip(render_pb2.SKIP_REASON_NO_CONSENT, f"no consent for {name}")
    return None


def missing_required(context: Mapping[str, Any], required: Sequence[str]) -> Skip | None:
    """The first required path that is missing or empty in the render context."""
    for path in required:
        value: Any = context
        for part in path.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if value in (None, "", [], {}):
            return Skip(render_pb2.SKIP_REASON_REQUIRED_DATA_MISSING, f"{path} is missing or empty")
    return None
