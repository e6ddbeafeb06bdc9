"""Trigger validation: every rule's violation, with its path, and the definition a valid trigger
becomes; UpdateTrigger masks."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from google.protobuf import field_mask_pb2, json_format

from sendtime.triggers.v1 import triggers_pb2
from triggers.conditions import FieldKind
from triggers.quiet_hours import QuietHours
from triggers.trigger_validation import (
    DEFAULT_ALLOWED_LATENESS,
    UPDATABLE_PATHS,
    FrequencyCap,
    InvalidName,
    InvalidTrigger,
    Reentry,
    apply_update,
    check_update_mask,
    parse_trigger_name,
    trigger_name,
    validate_create_trigger,
    validate_trigger,
    validate_update_trigger,
)

FULL: dict[str, Any] = {
    "display_name": "Checkout abandoned",
    "entry": {
        "event_type": "checkout_started",
        "conditions": [
            {"path": "checkout_started.total", "operator": "OPERATOR_GREATER_THAN_OR_EQUAL", "value": 20}
        ],
    },
    "profile_conditions": [{"path": "orders.count", "operator": "OPERATOR_LESS_THAN", "value": 10}],
    "delay": {"after": "3600s"},
    "exits": [
        {
            "event": {"event_type": "order_completed"},
            "key": "order_completed.order_id",
        },
        {"event": {"event_type": "custom:checkout_cancelled"}},
    ],
    "episode_key": "checkout_started.checkout_id",
    "reentry": "REENTRY_KEEP",
    "cooldown": "43200s",
    "frequency_cap": {"max_fires": 3, "window": "86400s"},
    "quiet_hours": {"start_hour": 21, "end_hour": 8, "default_time_zone": "Europe/Berlin"},
    "delivery": {
        "destinations": ["destinations/esp", "destinations/crm"],
        "template": "templates/checkout",
        "variables": {"discount": "TEN"},
    },
    "allowed_lateness": "30s",
}
MINIMAL: dict[str, Any] = {
    "entry": {"event_type": "cart_item_added"},
    "delay": {"after": "0s"},
    "delivery": {"destinations": ["destinations/esp"]},
}


def trigger(base: dict[str, Any] | None = None, **changes: Any) -> triggers_pb2.Trigger:
    fields = {**(FULL if base is None else base), **changes}
    return json_format.ParseDict({k: v for k, v in fields.items() if v is not None}, triggers_pb2.Trigger())


def violations_of(message: triggers_pb2.Trigger) -> list[tuple[str, str]]:
    with pytest.raises(InvalidTrigger) as raised:
        validate_trigger(message)
    return [(v.field, v.description) for v in raised.value.violations]


def test_a_full_trigger_becomes_its_definition() -> None:
    definition = validate_trigger(trigger())
    assert definition.entry.event_type == "checkout_started"
    assert len(definition.entry.conditions) == 1
    assert len(definition.profile_conditions) == 1
    assert definition.wait.after == timedelta(hours=1) and definition.wait.until_event_time is None
    assert [e.event.event_type for e in definition.exits] == ["order_completed", "custom:checkout_cancelled"]
    assert definition.exits[0].key is not None and definition.exits[0].key.text == "order_completed.order_id"
    assert definition.exits[1].key is None
    assert definition.episode_key is not None and definition.episode_key.kind == FieldKind.STRING
    assert definition.reentry == Reentry.KEEP
    assert definition.cooldown == timedelta(hours=12)
    assert definition.frequency_cap == FrequencyCap(3, timedelta(days=1))
    assert definition.quiet_hours == QuietHours(21, 8, "Europe/Berlin")
    assert definition.delivery.destinations == ("destinations/esp", "destinations/crm")
    assert definition.delivery.template == "templates/checkout"
    assert definition.delivery.variables == {"discount": "TEN"}
    assert definition.allowed_lateness == timedelta(seconds=30)
    assert definition.display_name == "Checkout abandoned"


def test_a_minimal_trigger_gets_the_defaults() -> None:
    definition = validate_trigger(trigger(MINIMAL))
    assert definition.reentry == Reentry.RESTART
    assert definition.allowed_lateness == DEFAULT_ALLOWED_LATENESS == timedelta(seconds=5)
    assert definition.cooldown is None and definition.frequency_cap is None and definition.quiet_hours is None
    assert definition.episode_key is None and not definition.keyed
    assert definition.entry_key({}) == ""
    assert definition.wait.after == timedelta(0)
    assert definition.delivery.template == ""


KEEP: dict[str, Any] = {**MINIMAL, "reentry": "REENTRY_KEEP"}
AN_EXIT: dict[str, Any] = {"event": {"event_type": "order_completed"}}
A_CONDITION: dict[str, Any] = {"path": "orders.count", "operator": "OPERATOR_LESS_THAN", "value": 10}


@pytest.mark.parametrize(
    ("base", "changes", "lateness"),
    [
        (KEEP, {"episode_key": "cart_item_added.sku"}, timedelta(0)),
        (KEEP, {"allowed_lateness": "2s"}, timedelta(seconds=2)),  # as set
        (KEEP, {"exits": [AN_EXIT]}, timedelta(seconds=5)),
        (KEEP, {"profile_conditions": [A_CONDITION]}, timedelta(seconds=5)),
        (MINIMAL, {"reentry": "REENTRY_RESTART"}, timedelta(seconds=5)),
    ],
)
def test_the_default_lateness_is_waited_only_where_a_late_event_can_change_the_fire(
    base: dict[str, Any], changes: dict[str, Any], lateness: timedelta
) -> None:
    """No exit, no profile condition, no restart: a late event changes nothing, and an order
    confirmation is sent at once rather than 5 s later."""
    assert validate_trigger(trigger(base, **changes)).allowed_lateness == lateness


def test_output_only_fields_are_not_read() -> None:
    message = trigger(MINIMAL, name="whatever", state="TRIGGER_STATE_PAUSED", etag="x")
    validate_trigger(message)


def test_until_event_time_paths() -> None:
    custom = {**MINIMAL, "entry": {"event_type": "custom:appointment_booked"}}
    definition = validate_trigger(
        trigger(custom, delay={"until_event_time": "custom.properties.starts_at", "offset": "-86400s"})
    )
    assert definition.wait.until_event_time is not None
    assert definition.wait.offset == timedelta(days=-1)
    definition = validate_trigger(trigger(MINIMAL, delay={"until_event_time": "occurred_at"}))
    assert definition.wait.offset == timedelta(0)


def test_one_episode_key_per_value_kind() -> None:
    for key in ("cart_item_added.sku", "cart_item_added.quantity", "source"):
        assert validate_trigger(trigger(MINIMAL, episode_key=key)).keyed


def d(value: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**value, **changes}


# (description, change to FULL as keyword arguments, expected violations)
CASES: list[tuple[str, dict[str, Any], list[tuple[str, str]]]] = [
    (
        "display name",
        {"display_name": "x" * 201},
        [("trigger.display_name", "must be at most 200 characters")],
    ),
    ("no entry", {"entry": None}, [("trigger.entry", "required")]),
    (
        "no entry type",
        {"entry": {"conditions": []}},
        [("trigger.entry.event_type", "required, e.g. cart_item_added or custom:wishlist_item_added")],
    ),
    (
        "bare custom",
        {"entry": {"event_type": "custom"}},
        [
            (
                "trigger.entry.event_type",
                "name the custom event: custom:<name>, e.g. custom:wishlist_item_added",
            )
        ],
    ),
    (
        "entry condition path",
        {
            "entry": {
                "event_type": "checkout_started",
                "conditions": [
                    {"path": "checkout_started.total", "operator": "OPERATOR_EXISTS"},
                    {"path": "checkout_started.totl", "operator": "OPERATOR_EXISTS"},
                    {"path": "order_completed.total", "operator": "OPERATOR_EXISTS"},
                ],
            }
        },
        [
            (
                "trigger.entry.conditions[1].path",
                "checkout_started has no field 'totl'; did you mean 'total'?",
            ),
            (
                "trigger.entry.conditions[2].path",
                "the event is a checkout_started event; it has no order_completed",
            ),
        ],
    ),
    (
        "conditions still checked when the type is unknown",
        {
            "entry": {
                "event_type": "nope",
                "conditions": [{"path": "contxt.locale", "operator": "OPERATOR_EXISTS"}],
            }
        },
        [
            ("trigger.entry.event_type", "unknown event type 'nope': one of"),
            ("trigger.entry.conditions[0].path", "the event has no field 'contxt'; did you mean 'context'?"),
        ],
    ),
    (
        "profile condition",
        {"profile_conditions": [{"path": "cart.items", "operator": "OPERATOR_IN", "value": ["a"]}]},
        [("trigger.profile_conditions[0].operator", "cart.items is a list: IN compares one value")],
    ),
    ("no delay", {"delay": None}, [("trigger.delay", "required")]),
    ("empty delay", {"delay": {}}, [("trigger.delay", "set delay.after")]),
    ("negative delay", {"delay": {"after": "-1s"}}, [("trigger.delay.after", "must not be negative")]),
    (
        "long delay",
        {"delay": {"after": f"{91 * 86400}s"}},
        [("trigger.delay.after", "must be at most 90 days")],
    ),
    (
        "offset with after",
        {"delay": {"after": "60s", "offset": "60s"}},
        [("trigger.delay.offset", "applies only to delay.until_event_time")],
    ),
    (
        "offset too far",
        {"delay": {"until_event_time": "occurred_at", "offset": f"-{91 * 86400}s"}},
        [("trigger.delay.offset", "must be within 90 days either way")],
    ),
    (
        "until a number",
        {"delay": {"until_event_time": "checkout_started.total.units"}},
        [
            (
                "trigger.delay.until_event_time",
                "must lead to a time (RFC 3339); checkout_started.total.units is",
            )
        ],
    ),
    (
        "until many",
        {"delay": {"until_event_time": "checkout_started.lines[*].name"}},
        [("trigger.delay.until_event_time", "must name one value: a time (RFC 3339), without [*]")],
    ),
    ("until empty", {"delay": {"until_event_time": ""}}, [("trigger.delay.until_event_time", "required")]),
    (
        "too many exits",
        {"exits": [{"event": {"event_type": "order_completed"}}] * 21},
        [("trigger.exits", "at most 20 exits are allowed")],
    ),
    (
        "exit without event",
        {"exits": [{"key": "order_completed.order_id"}]},
        [("trigger.exits[0].event", "required")],
    ),
    (
        "exit key on another payload",
        {"exits": [{"event": {"event_type": "order_completed"}, "key": "checkout_started.checkout_id"}]},
        [("trigger.exits[0].key", "the event is a order_completed event; it has no checkout_started")],
    ),
    (
        "exit key to a message",
        {"exits": [{"event": {"event_type": "order_completed"}, "key": "order_completed.total"}]},
        [
            (
                "trigger.exits[0].key",
                "must lead to a string, a number or a boolean; order_completed.total is a money",
            )
        ],
    ),
    (
        "exit key without an episode key",
        {
            "episode_key": None,
            "exits": [{"event": {"event_type": "order_completed"}, "key": "order_completed.order_id"}],
        },
        [("trigger.exits[0].key", "the trigger has no episode_key for it to match; leave it empty")],
    ),
    (
        "exit condition",
        {
            "exits": [
                {
                    "event": {
                        "event_type": "order_completed",
                        "conditions": [{"path": "order_completed.total", "operator": "OPERATOR_EQUALS"}],
                    }
                }
            ]
        },
        [("trigger.exits[0].event.conditions[0].value", "required with EQUALS")],
    ),
    (
        "episode key into a list",
        {"episode_key": "checkout_started.lines[*].sku"},
        [("trigger.episode_key", "must name one value: a string, a number or a boolean, without [*]")],
    ),
    (
        "episode key malformed",
        {"episode_key": "checkout_started..id"},
        [("trigger.episode_key", "must be a dotted path")],
    ),
    ("reentry", {"reentry": 7}, [("trigger.reentry", "unknown value 7")]),
    ("cooldown", {"cooldown": "-5s"}, [("trigger.cooldown", "must not be negative")]),
    ("cooldown long", {"cooldown": f"{91 * 86400}s"}, [("trigger.cooldown", "must be at most 90 days")]),
    (
        "cap",
        {"frequency_cap": {"max_fires": 0, "window": "59s"}},
        [
            ("trigger.frequency_cap.max_fires", "must be 1 to 1000"),
            ("trigger.frequency_cap.window", "must be at least 1 minute"),
        ],
    ),
    ("cap window", {"frequency_cap": {"max_fires": 1}}, [("trigger.frequency_cap.window", "required")]),
    (
        "cap window long",
        {"frequency_cap": {"max_fires": 1, "window": f"{91 * 86400}s"}},
        [("trigger.frequency_cap.window", "must be at most 90 days")],
    ),
    (
        "quiet hours",
        {"quiet_hours": {"start_hour": 24, "end_hour": -1}},
        [
            ("trigger.quiet_hours.start_hour", "must be 0 to 23"),
            ("trigger.quiet_hours.end_hour", "must be 0 to 23"),
            ("trigger.quiet_hours.default_time_zone", "required"),
        ],
    ),
    (
        "quiet hours equal",
        {"quiet_hours": {"start_hour": 0, "end_hour": 0, "default_time_zone": "Europe"}},
        [
            ("trigger.quiet_hours.end_hour", "must differ from start_hour"),
            ("trigger.quiet_hours.default_time_zone", "must be an IANA time zone"),
        ],
    ),
    ("no delivery", {"delivery": None}, [("trigger.delivery", "required")]),
    (
        "no destinations",
        {"delivery": {"template": "templates/x"}},
        [("trigger.delivery.destinations", "must name 1 to 10 destinations")],
    ),
    (
        "eleven destinations",
        {"delivery": {"destinations": [f"destinations/d{i}" for i in range(11)]}},
        [("trigger.delivery.destinations", "must name 1 to 10 destinations")],
    ),
    (
        "bad destination",
        {"delivery": {"destinations": ["destinations/a", "webhooks/a", "destinations/a"], "template": "x"}},
        [
            ("trigger.delivery.destinations[1]", "must look like destinations/esp-webhook"),
            ("trigger.delivery.destinations[2]", "repeats destinations[0]"),
            ("trigger.delivery.template", "must look like templates/abandoned-cart"),
        ],
    ),
    (
        "variables",
        {"delivery": {"destinations": ["destinations/a"], "variables": {"x": "y" * 17000}}},
        [("trigger.delivery.variables", "at most 16384 are allowed")],
    ),
    ("lateness", {"allowed_lateness": "601s"}, [("trigger.allowed_lateness", "must be at most 10 minutes")]),
    (
        "lateness negative",
        {"allowed_lateness": "-1s"},
        [("trigger.allowed_lateness", "must not be negative")],
    ),
]


@pytest.mark.parametrize(("changes", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_violations(changes: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    found = violations_of(trigger(**changes))
    assert len(found) == len(expected), found
    for (field, description), (want_field, want_description) in zip(found, expected, strict=True):
        assert field == want_field
        assert want_description in description, description


def test_an_invalid_duration_is_refused() -> None:
    message = trigger(MINIMAL)
    message.delay.after.seconds = 5
    message.delay.after.nanos = -1
    assert violations_of(message) == [("trigger.delay.after", "is not a valid duration")]


def test_a_zero_cooldown_is_none() -> None:
    assert validate_trigger(trigger(MINIMAL, cooldown="0s")).cooldown is None


def test_every_violation_is_reported_at_once() -> None:
    found = violations_of(trigger(MINIMAL, entry=None, delay=None, delivery=None))
    assert [f for f, _ in found] == ["trigger.entry", "trigger.delay", "trigger.delivery"]


# ---- create -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("trigger_id", "problem"),
    [
        ("", "required"),
        ("Cart", "must be 1 to 63 lower-case letters"),
        ("1cart", "must be 1 to 63 lower-case letters"),
        ("a" * 64, "must be 1 to 63 lower-case letters"),
    ],
)
def test_create_checks_the_id(trigger_id: str, problem: str) -> None:
    request = triggers_pb2.CreateTriggerRequest(trigger_id=trigger_id, trigger=trigger(MINIMAL))
    with pytest.raises(InvalidTrigger) as raised:
        validate_create_trigger(request)
    assert [(v.field, v.description[: len(problem)]) for v in raised.value.violations] == [
        ("trigger_id", problem)
    ]


def test_create_needs_a_trigger_and_reports_everything() -> None:
    with pytest.raises(InvalidTrigger) as raised:
        validate_create_trigger(triggers_pb2.CreateTriggerRequest(trigger_id="x"))
    assert [v.field for v in raised.value.violations] == ["trigger"]
    request = triggers_pb2.CreateTriggerRequest(trigger_id="X", trigger=trigger(MINIMAL, delay=None))
    with pytest.raises(InvalidTrigger) as raised:
        validate_create_trigger(request)
    assert [v.field for v in raised.value.violations] == ["trigger_id", "trigger.delay"]


def test_create_returns_the_definition() -> None:
    request = triggers_pb2.CreateTriggerRequest(trigger_id="cart-abandoned-2", trigger=trigger(MINIMAL))
    assert validate_create_trigger(request).entry.event_type == "cart_item_added"


def test_names() -> None:
    assert trigger_name("cart") == "triggers/cart"
    assert parse_trigger_name("triggers/cart-1") == "cart-1"
    for bad in ("cart", "triggers/", "triggers/Cart", "templates/cart", "triggers/a/b"):
        with pytest.raises(InvalidName):
            parse_trigger_name(bad)


# ---- update -----------------------------------------------------------------------------------


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


def update(patch: triggers_pb2.Trigger, *paths: str) -> triggers_pb2.UpdateTriggerRequest:
    return triggers_pb2.UpdateTriggerRequest(
        name="triggers/checkout", trigger=patch, update_mask=mask(*paths)
    )


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("state", "state is output only: use PauseTrigger or ResumeTrigger"),
        ("name", "name is output only"),
        ("etag", "etag is output only"),
        ("update_time", "update_time is output only"),
        ("delay.after", "delay.after cannot be changed alone: update delay"),
        ("exits.key", "exits.key cannot be changed alone: update exits"),
        ("dellay", "Trigger has no field 'dellay' to update; did you mean 'delay'?"),
        ("", "Trigger has no field '' to update"),
    ],
)
def test_update_mask_refusals(path: str, problem: str) -> None:
    assert [(v.field, v.description) for v in check_update_mask(mask("delay", path))] == [
        ("update_mask.paths[1]", problem)
    ]


def test_update_mask_accepts_the_updatable_paths() -> None:
    assert check_update_mask(mask(*sorted(UPDATABLE_PATHS))) == []
    assert check_update_mask(mask("*")) == []
    assert [(v.field, v.description[:8]) for v in check_update_mask(mask())] == [("update_mask", "required")]


def test_every_client_field_of_trigger_is_updatable() -> None:
    fields = set(triggers_pb2.Trigger.DESCRIPTOR.fields_by_name)
    assert fields == {p for p in UPDATABLE_PATHS if "." not in p} | {
        "name",
        "state",
        "create_time",
        "update_time",
        "etag",
    }


def test_apply_update_replaces_only_the_masked_fields() -> None:
    stored = trigger()
    patch = triggers_pb2.Trigger(delivery=triggers_pb2.DeliverySpec(template="templates/other"))
    patch.delay.after.seconds = 7200
    updated = apply_update(stored, update(patch, "delivery.template", "delay"))
    assert updated.delivery.template == "templates/other"
    assert list(updated.delivery.destinations) == ["destinations/esp", "destinations/crm"]
    assert updated.delay.after.seconds == 7200
    assert updated.exits == stored.exits
    assert stored.delivery.template == "templates/checkout"  # the stored message is not changed


def test_apply_update_clears_what_the_patch_leaves_unset() -> None:
    updated = apply_update(trigger(), update(triggers_pb2.Trigger(), "quiet_hours", "exits", "cooldown"))
    assert not updated.HasField("quiet_hours") and not updated.exits and not updated.HasField("cooldown")


def test_apply_update_switches_the_delay_oneof() -> None:
    patch = triggers_pb2.Trigger(delay=triggers_pb2.Delay(until_event_time="occurred_at"))
    updated = apply_update(trigger(), update(patch, "delay"))
    assert updated.delay.WhichOneof("wait") == "until_event_time"


def test_a_star_mask_replaces_every_client_field_but_not_the_output_only_ones() -> None:
    stored = trigger(name="triggers/checkout", etag="e1")
    updated = apply_update(stored, update(trigger(MINIMAL, name="ignored"), "*"))
    expected = trigger(MINIMAL, name="triggers/checkout", etag="e1")
    assert updated == expected


def test_validate_update_checks_the_whole_updated_trigger() -> None:
    # The entry's type changes; the stored episode key and exits still name checkout_started.
    patch = trigger(MINIMAL)
    with pytest.raises(InvalidTrigger) as raised:
        validate_update_trigger(update(patch, "entry"), trigger())
    assert [v.field for v in raised.value.violations] == ["trigger.episode_key"]
    updated, definition = validate_update_trigger(
        update(trigger(MINIMAL), "entry", "episode_key", "exits"), trigger()
    )
    assert updated.entry.event_type == "cart_item_added" and definition.episode_key is None


@pytest.mark.parametrize(
    ("request_change", "fields"),
    [
        (lambda r: setattr(r, "name", "checkout"), ["name"]),
        (lambda r: r.update_mask.paths.append("state"), ["update_mask.paths[1]"]),
        (lambda r: r.update_mask.Clear(), ["update_mask"]),
    ],
)
def test_validate_update_checks_the_request(
    request_change: Callable[[triggers_pb2.UpdateTriggerRequest], None], fields: list[str]
) -> None:
    request = update(trigger(), "display_name")
    request_change(request)
    with pytest.raises(InvalidTrigger) as raised:
        validate_update_trigger(request, trigger())
    assert [v.field for v in raised.value.violations] == fields
