"""Checks on destinations, before they are stored: pure, no I/O. The URL's SSRF check, which
resolves the host, is ``ssrf.UrlPolicy.destination_url_violations``; the extra headers' rules
are ``delivery.header_violations``.

An UpdateDestination mask names the fields it replaces (``UPDATABLE_PATHS``). A destination's
kind is fixed: a mask naming the other kind's fields is refused.
"""

from __future__ import annotations

import difflib
from datetime import timedelta
from typing import Final

from google.protobuf import duration_pb2, field_mask_pb2

from sendtime.triggers.v1 import triggers_pb2
from sendtime_common.errors import FieldViolation
from triggers.delivery import header_violations
from triggers.destination_store import DESTINATION_ID

MAX_DISPLAY_NAME_CHARS: Final = 200
MIN_TIMEOUT: Final = timedelta(seconds=1)
MAX_TIMEOUT: Final = timedelta(seconds=30)
MIN_ACK_TIMEOUT: Final = timedelta(seconds=1)
MAX_ACK_TIMEOUT: Final = timedelta(hours=1)
DEFAULT_ACK_TIMEOUT: Final = timedelta(seconds=30)
MAX_CONCURRENCY: Final = 100
MAX_PREVIOUS_SECRET_TTL: Final = timedelta(days=7)
DEFAULT_PREVIOUS_SECRET_TTL: Final = timedelta(hours=24)

UPDATABLE_PATHS: Final = frozenset(
    {
        "display_name",
        "state",
        "max_concurrency",
        "webhook",
        "webhook.url",
        "webhook.headers",
        "webhook.timeout",
        "subscription",
        "subscription.ack_timeout",
    }
)
OUTPUT_ONLY_PATHS: Final = frozenset(
    {"name", "disabled_reason", "create_time", "update_time", "etag", "webhook.previous_secret_expire_time"}
)
_TOP_LEVEL_UPDATABLE: Final = sorted(p for p in UPDATABLE_PATHS if "." not in p)


def check_destination_id(destination_id: str, field: str = "destination_id") -> list[FieldViolation]:
    if not destination_id:
        return [FieldViolation(field, "required")]
    if not DESTINATION_ID.fullmatch(destination_id):
        return [
            FieldViolation(field, "must be 1 to 63 lower-case letters, digits and -, starting with a letter")
        ]
    return []


def check_destination(
    destination: triggers_pb2.Destination, field: str = "destination"
) -> list[FieldViolation]:
    """Why ``destination`` cannot be stored, but for its URL's reachability; [] when it can.
    Output-only fields are not read."""
    violations: list[FieldViolation] = []
    if len(destination.display_name) > MAX_DISPLAY_NAME_CHARS:
        violations.append(
            FieldViolation(f"{field}.display_name", f"at most {MAX_DISPLAY_NAME_CHARS} characters")
        )
    if destination.max_concurrency and not 1 <= destination.max_concurrency <= MAX_CONCURRENCY:
        violations.append(
            FieldViolation(f"{field}.max_concurrency", f"1 to {MAX_CONCURRENCY} (0: the default, 10)")
        )
    kind = destination.WhichOneof("kind")
    if kind is None:
        violations.append(FieldViolation(field, "required: a webhook or a subscription"))
    elif kind == "webhook":
        webhook = destination.webhook
        if not webhook.url:
            violations.append(FieldViolation(f"{field}.webhook.url", "required"))
        violations.extend(header_violations(webhook.headers, f"{field}.webhook.headers"))
        if webhook.HasField("timeout"):
            violations.extend(
                _duration_violations(webhook.timeout, f"{field}.webhook.timeout", MIN_TIMEOUT, MAX_TIMEOUT)
            )
    elif destination.subscription.HasField("ack_timeout"):
        violations.extend(
            _duration_violations(
                destination.subscription.ack_timeout,
                f"{field}.subscription.ack_timeout",
                MIN_ACK_TIMEOUT,
                MAX_ACK_TIMEOUT,
            )
        )
    return violations


def check_update_mask(
    mask: field_mask_pb2.FieldMask, stored_kind: str, field: str = "update_mask"
) -> list[FieldViolation]:
    """Why an UpdateDestination mask cannot be applied to a destination of ``stored_kind``
    (``webhook``, ``subscription``); [] when it can."""
    if not mask.paths:
        return [FieldViolation(field, "required: the fields to change, e.g. state,webhook.url (or *)")]
    violations: list[FieldViolation] = []
    for i, path in enumerate(mask.paths):
        problem = _mask_path_problem(path, stored_kind)
        if problem:
            violations.append(FieldViolation(f"{field}.paths[{i}]", problem))
    return violations


def _mask_path_problem(path: str, stored_kind: str) -> str | None:
    if path == "*":
        return None
    top = path.split(".", 1)[0]
    if path in OUTPUT_ONLY_PATHS or top in OUTPUT_ONLY_PATHS:
        return f"{path} is output only"
    if path not in UPDATABLE_PATHS:
        close = difflib.get_close_matches(path, sorted(UPDATABLE_PATHS), n=1)
        suggestion = f"; did you mean '{close[0]}'?" if close else ""
        return f"Destination has no field '{path}' to update{suggestion}"
    if top in ("webhook", "subscription") and top != stored_kind:
        return f"the destination is a {stored_kind}; its kind is fixed"
    return None


def apply_update(
    stored: triggers_pb2.Destination, request: triggers_pb2.UpdateDestinationRequest
) -> triggers_pb2.Destination:
    """``stored`` with the mask's fields taken from ``request.destination`` (a field the request
    leaves unset is cleared). The state is set only when the mask names it: otherwise it is left
    unset, so the store keeps the stored one (a dispatcher may have disabled the destination
    since it was read). The mask must have passed ``check_update_mask``."""
    updated = triggers_pb2.Destination()
    updated.CopyFrom(stored)
    paths = list(request.update_mask.paths)
    if "*" in paths:
        kind = stored.WhichOneof("kind")
        paths = [p for p in _TOP_LEVEL_UPDATABLE if p not in ("webhook", "subscription") or p == kind]
    mask = field_mask_pb2.FieldMask(paths=paths)
    mask.MergeMessage(request.destination, updated, replace_message_field=True, replace_repeated_field=True)
    if "state" not in paths:
        updated.ClearField("state")
    return updated


def check_state(destination: triggers_pb2.Destination, paths: list[str], field: str) -> list[FieldViolation]:
    """An update that names ``state`` must set one (ENABLED or DISABLED)."""
    if ("state" in paths or "*" in paths) and destination.state == triggers_pb2.DESTINATION_STATE_UNSPECIFIED:
        return [FieldViolation(f"{field}.state", "DESTINATION_STATE_ENABLED or DESTINATION_STATE_DISABLED")]
    return []


def previous_secret_ttl(
    ttl: duration_pb2.Duration | None, field: str = "previous_secret_ttl"
) -> timedelta | FieldViolation:
    """How long the previous secret keeps signing after a rotation: 0 to 7 days, default 24 h."""
    if ttl is None:
        return DEFAULT_PREVIOUS_SECRET_TTL
    if not _valid_duration(ttl):
        return FieldViolation(field, "not a valid duration")
    value = ttl.ToTimedelta()
    if not timedelta(0) <= value <= MAX_PREVIOUS_SECRET_TTL:
        return FieldViolation(field, "0 to 7 days")
    return value


def ack_timeout(destination: triggers_pb2.Destination) -> timedelta:
    """A subscription's ack timeout, with its default."""
    target = destination.subscription
    return target.ack_timeout.ToTimedelta() if target.HasField("ack_timeout") else DEFAULT_ACK_TIMEOUT


def _valid_duration(duration: duration_pb2.Duration) -> bool:
    return (duration.seconds >= 0 and duration.nanos >= 0) or (duration.seconds <= 0 and duration.nanos <= 0)


def _duration_violations(
    duration: duration_pb2.Duration, field: str, least: timedelta, most: timedelta
) -> list[FieldViolation]:
    if not _valid_duration(duration) or not least <= duration.ToTimedelta() <= most:
        return [FieldViolation(field, f"{least.total_seconds():g} s to {most.total_seconds():g} s")]
    return []
