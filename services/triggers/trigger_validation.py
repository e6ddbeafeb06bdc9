"""Checks on triggers, before they are stored: pure, no I/O.

``validate_trigger`` turns a ``Trigger`` message into a ``TriggerDefinition`` (what the episode
rules read: paths compiled, durations as timedeltas, defaults filled in), or raises
``InvalidTrigger`` with every field violation, named by path (``trigger.entry.conditions[2].path``).
``validate_create_trigger`` and ``validate_update_trigger`` do the same for the requests;
an update's mask names the fields it replaces (``UPDATABLE_PATHS``); output-only and unknown
paths are refused. docs/triggers-domain.md lists the rules.
"""

from __future__ import annotations

import difflib
import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final

from google.protobuf import duration_pb2, field_mask_pb2, json_format

from sendtime.ingest.v1 import ingest_pb2
from sendtime.triggers.v1 import triggers_pb2
from sendtime_common.errors import FieldViolation
from triggers.conditions import (
    Condition,
    FieldKind,
    InvalidEventType,
    Path,
    PathError,
    Schema,
    all_hold,
    compile_conditions,
    compile_path,
    event_type_of,
    key_string,
)
from triggers.quiet_hours import TIME_ZONES, QuietHours

NAME_PREFIX: Final = "triggers/"
TRIGGER_ID: Final = re.compile(r"[a-z][a-z0-9-]{0,62}")
DESTINATION_NAME: Final = re.compile(r"destinations/[a-z][a-z0-9-]{0,62}")
TEMPLATE_NAME: Final = re.compile(r"templates/[a-z][a-z0-9-]{0,62}")
MAX_DISPLAY_NAME_CHARS: Final = 200
MAX_WAIT: Final = timedelta(days=90)  # delay.after, delay.offset (either way), cooldown, cap window
MIN_CAP_WINDOW: Final = timedelta(minutes=1)
MAX_FIRES: Final = 1000
MAX_EXITS: Final = 20
MAX_DESTINATIONS: Final = 10
MAX_VARIABLES_BYTES: Final = 16 * 1024
MAX_ALLOWED_LATENESS: Final = timedelta(minutes=10)
DEFAULT_ALLOWED_LATENESS: Final = timedelta(seconds=5)
_MAX_DURATION_SECONDS = 315_576_000_000  # google.protobuf.Duration's range

# Paths an UpdateTrigger mask may name: the fields a client sets, and the parts of them that can
# change alone. delay is replaced whole (after and until_event_time are one oneof).
UPDATABLE_PATHS: Final = frozenset(
    {
        "display_name",
        "entry",
        "entry.event_type",
        "entry.conditions",
        "profile_conditions",
        "delay",
        "exits",
        "episode_key",
        "reentry",
        "cooldown",
        "frequency_cap",
        "frequency_cap.max_fires",
        "frequency_cap.window",
        "quiet_hours",
        "quiet_hours.start_hour",
        "quiet_hours.end_hour",
        "quiet_hours.default_time_zone",
        "delivery",
        "delivery.destinations",
        "delivery.template",
        "delivery.variables",
        "allowed_lateness",
    }
)
OUTPUT_ONLY_PATHS: Final = frozenset({"name", "state", "create_time", "update_time", "etag"})
_TOP_LEVEL_UPDATABLE = sorted(p for p in UPDATABLE_PATHS if "." not in p)


class Reentry(enum.StrEnum):
    """What a new entry does while an episode of its key waits."""

    RESTART = "restart"  # the wait starts again from the new entry
    KEEP = "keep"  # the wait keeps its fire time


_REENTRY: Final = {
    triggers_pb2.REENTRY_UNSPECIFIED: Reentry.RESTART,
    triggers_pb2.REENTRY_RESTART: Reentry.RESTART,
    triggers_pb2.REENTRY_KEEP: Reentry.KEEP,
}


@dataclass(frozen=True, slots=True)
class EventMatcher:
    """Events of one type whose conditions hold."""

    event_type: str  # a payload name, or custom:<name>
    conditions: tuple[Condition, ...] = ()

    def matches(self, document: Mapping[str, Any]) -> bool:
        return event_type_of(document) == self.event_type and all_hold(self.conditions, document)


@dataclass(frozen=True, slots=True)
class ExitMatcher:
    event: EventMatcher
    key: Path | None = None  # None: any episode of the customer

    def key_of(self, document: Mapping[str, Any]) -> str | None:
        """The episode key this exit names (None when it has no key path, or no value there)."""
        return key_string(self.key.value(document)) if self.key is not None else None


@dataclass(frozen=True, slots=True)
class Wait:
    """How long an episode waits: ``after`` its entry, or until the time at ``until_event_time``
    plus ``offset``."""

    after: timedelta | None = None
    until_event_time: Path | None = None
    offset: timedelta = timedelta(0)


@dataclass(frozen=True, slots=True)
class FrequencyCap:
    max_fires: int
    window: timedelta


@dataclass(frozen=True, slots=True)
class Delivery:
    destinations: tuple[str, ...]  # destinations/{id}
    template: str = ""  # templates/{id}, or "" for a fire without a message
    variables: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TriggerDefinition:
    """A valid trigger, as the episode rules read it."""

    entry: EventMatcher
    wait: Wait
    delivery: Delivery
    profile_conditions: tuple[Condition, ...] = ()
    exits: tuple[ExitMatcher, ...] = ()
    episode_key: Path | None = None  # None: one episode per customer at a time (key "")
    reentry: Reentry = Reentry.RESTART
    cooldown: timedelta | None = None
    frequency_cap: FrequencyCap | None = None
    quiet_hours: QuietHours | None = None
    allowed_lateness: timedelta = DEFAULT_ALLOWED_LATENESS
    display_name: str = ""

    @property
    def keyed(self) -> bool:
        return self.episode_key is not None

    def entry_key(self, document: Mapping[str, Any]) -> str | None:
        """The episode key of an entry event: "" for a trigger without episode_key, None when
        the event has no value at the key path (such an entry opens nothing)."""
        if self.episode_key is None:
            return ""
        return key_string(self.episode_key.value(document))


class InvalidTrigger(ValueError):
    """A trigger or a request that cannot be stored; ``violations`` says why, field by field."""

    def __init__(self, violations: Sequence[FieldViolation]) -> None:
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))
        self.violations = list(violations)


class InvalidName(ValueError):
    """Not a ``triggers/{trigger_id}`` name."""


def trigger_name(trigger_id: str) -> str:
    return f"{NAME_PREFIX}{trigger_id}"


def parse_trigger_name(name: str) -> str:
    """The id in ``triggers/{trigger_id}``.

    Raises:
        InvalidName: the name has another shape or an invalid id.
    """
    trigger_id = name.removeprefix(NAME_PREFIX)
    if trigger_id == name or not TRIGGER_ID.fullmatch(trigger_id):
        raise InvalidName("must look like triggers/cart-abandoned (an id of 1 to 63 of a-z, 0-9 and -)")
    return trigger_id


def check_trigger_id(trigger_id: str, field: str = "trigger_id") -> list[FieldViolation]:
    if not trigger_id:
        return [FieldViolation(field, "required")]
    if not TRIGGER_ID.fullmatch(trigger_id):
        return [
            FieldViolation(field, "must be 1 to 63 lower-case letters, digits and -, starting with a letter")
        ]
    return []


def validate_create_trigger(request: triggers_pb2.CreateTriggerRequest) -> TriggerDefinition:
    """The definition of the trigger to create (its name, state and times are ignored).

    Raises:
        InvalidTrigger: the id or the trigger is invalid (every violation at once).
    """
    violations = check_trigger_id(request.trigger_id)
    if not request.HasField("trigger"):
        raise InvalidTrigger([*violations, FieldViolation("trigger", "required")])
    checker = _Checker("trigger")
    definition = checker.trigger(request.trigger)
    violations.extend(checker.violations)
    if violations:
        raise InvalidTrigger(violations)
    assert definition is not None  # built whenever nothing was refused
    return definition


def validate_trigger(trigger: triggers_pb2.Trigger, field: str = "trigger") -> TriggerDefinition:
    """``trigger`` as a definition; its name, state, times and etag are not read.

    Raises:
        InvalidTrigger: every field violation, named from ``field`` (``trigger.delay.after``).
    """
    checker = _Checker(field)
    definition = checker.trigger(trigger)
    if checker.violations:
        raise InvalidTrigger(checker.violations)
    assert definition is not None  # built whenever nothing was refused
    return definition


def check_update_mask(mask: field_mask_pb2.FieldMask, field: str = "update_mask") -> list[FieldViolation]:
    """Why an UpdateTrigger mask cannot be applied; [] when it can."""
    if not mask.paths:
        return [FieldViolation(field, "required: the fields to change, e.g. delay,exits (or *)")]
    violations: list[FieldViolation] = []
    for i, path in enumerate(mask.paths):
        problem = _mask_path_problem(path)
        if problem:
            violations.append(FieldViolation(f"{field}.paths[{i}]", problem))
    return violations


def _mask_path_problem(path: str) -> str | None:
    if path == "*" or path in UPDATABLE_PATHS:
        return None
    top = path.split(".", 1)[0]
    if top in OUTPUT_ONLY_PATHS:
        if top == "state":
            return "state is output only: use PauseTrigger or ResumeTrigger"
        return f"{top} is output only"
    if top in UPDATABLE_PATHS:
        return f"{path} cannot be changed alone: update {top}"
    close = difflib.get_close_matches(path, sorted(UPDATABLE_PATHS), n=1)
    suggestion = f"; did you mean '{close[0]}'?" if close else ""
    return f"Trigger has no field '{path}' to update{suggestion}"


def apply_update(
    stored: triggers_pb2.Trigger, request: triggers_pb2.UpdateTriggerRequest
) -> triggers_pb2.Trigger:
    """``stored`` with the fields of the request's mask taken from ``request.trigger`` (a field
    the request leaves unset is cleared). The mask must have passed ``check_update_mask``."""
    updated = triggers_pb2.Trigger()
    updated.CopyFrom(stored)
    paths = list(request.update_mask.paths)
    if "*" in paths:
        paths = _TOP_LEVEL_UPDATABLE
    mask = field_mask_pb2.FieldMask(paths=paths)
    mask.MergeMessage(request.trigger, updated, replace_message_field=True, replace_repeated_field=True)
    return updated


def validate_update_trigger(
    request: triggers_pb2.UpdateTriggerRequest, stored: triggers_pb2.Trigger
) -> tuple[triggers_pb2.Trigger, TriggerDefinition]:
    """The stored trigger as updated, and its definition. The whole updated trigger is checked
    (a change to ``entry`` can make the stored ``episode_key`` invalid); violations name the
    request's ``trigger`` fields.

    Raises:
        InvalidTrigger: the name or the mask is invalid, or the updated trigger is.
    """
    violations: list[FieldViolation] = []
    try:
        parse_trigger_name(request.name)
    except InvalidName as exc:
        violations.append(FieldViolation("name", str(exc)))
    violations.extend(check_update_mask(request.update_mask))
    if violations:
        raise InvalidTrigger(violations)
    updated = apply_update(stored, request)
    return updated, validate_trigger(updated)


# ---- the checks ------------------------------------------------------------------------------


def _timedelta(duration: duration_pb2.Duration) -> timedelta | None:
    """A valid Duration as a timedelta (sub-microsecond parts dropped); None when invalid."""
    seconds, nanos = duration.seconds, duration.nanos
    if abs(seconds) > _MAX_DURATION_SECONDS or abs(nanos) >= 1_000_000_000:
        return None
    if (seconds > 0 and nanos < 0) or (seconds < 0 and nanos > 0):
        return None
    return timedelta(seconds=seconds, microseconds=int(nanos / 1000))


def _human(duration: timedelta) -> str:
    def count(n: int, unit: str) -> str:
        return f"{n} {unit}" if abs(n) == 1 else f"{n} {unit}s"

    if duration % timedelta(days=1) == timedelta(0):
        return count(duration.days, "day")
    if duration % timedelta(minutes=1) == timedelta(0):
        return count(int(duration.total_seconds() // 60), "minute")
    return f"{duration.total_seconds():g} s"


class _Checker:
    """Collects the violations of one trigger while building its definition."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.violations: list[FieldViolation] = []

    def fail(self, field: str, description: str) -> None:
        self.violations.append(FieldViolation(f"{self.prefix}.{field}", description))

    def trigger(self, trigger: triggers_pb2.Trigger) -> TriggerDefinition | None:
        if len(trigger.display_name) > MAX_DISPLAY_NAME_CHARS:
            self.fail("display_name", f"must be at most {MAX_DISPLAY_NAME_CHARS} characters")
        entry_schema = Schema(ingest_pb2.Event.DESCRIPTOR, "the event")  # any event, until the type is known
        entry: EventMatcher | None = None
        if not trigger.HasField("entry"):
            self.fail("entry", "required")
        else:
            entry, schema = self.event_match(trigger.entry, "entry")
            entry_schema = schema or entry_schema
        profile_conditions, violations = compile_conditions(
            trigger.profile_conditions, Schema.profile(), f"{self.prefix}.profile_conditions"
        )
        self.violations.extend(violations)
        wait = self.wait(trigger, entry_schema)
        episode_key = (
            self.key_path(trigger.episode_key, entry_schema, "episode_key") if trigger.episode_key else None
        )
        exits = self.exits(trigger.exits, keyed=bool(trigger.episode_key))
        reentry = _REENTRY.get(trigger.reentry)
        if reentry is None:
            self.fail("reentry", f"unknown value {trigger.reentry}")
        cooldown = self.cooldown(trigger)
        frequency_cap = (
            self.frequency_cap(trigger.frequency_cap) if trigger.HasField("frequency_cap") else None
        )
        quiet_hours = self.quiet_hours(trigger.quiet_hours) if trigger.HasField("quiet_hours") else None
        delivery = self.delivery(trigger.delivery) if trigger.HasField("delivery") else None
        if not trigger.HasField("delivery"):
            self.fail("delivery", "required")
        # Late events can change a fire only through an exit, a profile condition or a restart.
        late_events_matter = bool(trigger.exits or trigger.profile_conditions) or reentry == Reentry.RESTART
        allowed_lateness = self.allowed_lateness(trigger, late_events_matter=late_events_matter)
        if self.violations:
            return None
        assert entry is not None and wait is not None and delivery is not None and reentry is not None
        return TriggerDefinition(
            entry=entry,
            wait=wait,
            delivery=delivery,
            profile_conditions=profile_conditions,
            exits=tuple(e for e in exits if e is not None),
            episode_key=episode_key,
            reentry=reentry,
            cooldown=cooldown,
            frequency_cap=frequency_cap,
            quiet_hours=quiet_hours,
            allowed_lateness=allowed_lateness,
            display_name=trigger.display_name,
        )

    def event_match(
        self, match: triggers_pb2.EventMatch, field: str
    ) -> tuple[EventMatcher | None, Schema | None]:
        """The matcher and the schema of its events (None, None when the type is invalid; the
        conditions are then still checked against events of any type)."""
        schema: Schema | None = None
        if not match.event_type:
            self.fail(f"{field}.event_type", "required, e.g. cart_item_added or custom:wishlist_item_added")
        else:
            try:
                schema = Schema.event(match.event_type)
            except InvalidEventType as exc:
                self.fail(f"{field}.event_type", str(exc))
        conditions, violations = compile_conditions(
            match.conditions,
            schema or Schema(ingest_pb2.Event.DESCRIPTOR, "the event"),
            f"{self.prefix}.{field}.conditions",
        )
        self.violations.extend(violations)
        if schema is None:
            return None, None
        return EventMatcher(match.event_type, conditions), schema

    def path(
        self, text: str, schema: Schema, field: str, kinds: frozenset[FieldKind], what: str
    ) -> Path | None:
        """A single-valued path leading to one of ``kinds``."""
        try:
            path = compile_path(text, schema)
        except PathError as exc:
            self.fail(field, str(exc))
            return None
        if path.many:
            self.fail(field, f"must name one value: {what}, without [*]")
        elif path.kind not in kinds:
            self.fail(field, f"must lead to {what}; {text} is a {path.kind}")
        else:
            return path
        return None

    def key_path(self, text: str, schema: Schema, field: str) -> Path | None:
        return self.path(text, schema, field, _KEY_KINDS, "a string, a number or a boolean")

    def wait(self, trigger: triggers_pb2.Trigger, entry_schema: Schema) -> Wait | None:
        if not trigger.HasField("delay"):
            self.fail("delay", "required: delay.after (a fixed wait) or delay.until_event_time")
            return None
        delay = trigger.delay
        kind = delay.WhichOneof("wait")
        if kind is None:
            self.fail("delay", "set delay.after (a fixed wait; 0: at once) or delay.until_event_time")
        if kind == "after":
            after = self.duration(delay.after, "delay.after", low=timedelta(0), high=MAX_WAIT)
            if delay.HasField("offset"):
                self.fail("delay.offset", "applies only to delay.until_event_time")
            return None if after is None else Wait(after=after)
        offset: timedelta | None = timedelta(0)
        if delay.HasField("offset"):
            offset = self.duration(delay.offset, "delay.offset", low=-MAX_WAIT, high=MAX_WAIT)
        if kind is None:
            return None
        path = self.path(
            delay.until_event_time, entry_schema, "delay.until_event_time", _TIME_KINDS, "a time (RFC 3339)"
        )
        return None if path is None or offset is None else Wait(until_event_time=path, offset=offset)

    def exits(self, exits: Sequence[triggers_pb2.ExitMatch], keyed: bool) -> list[ExitMatcher | None]:
        if len(exits) > MAX_EXITS:
            self.fail("exits", f"at most {MAX_EXITS} exits are allowed")
            return []
        matchers: list[ExitMatcher | None] = []
        for i, exit_match in enumerate(exits):
            field = f"exits[{i}]"
            if not exit_match.HasField("event"):
                self.fail(f"{field}.event", "required")
                matchers.append(None)
                continue
            event, schema = self.event_match(exit_match.event, f"{field}.event")
            key: Path | None = None
            if exit_match.key:
                if not keyed:
                    self.fail(
                        f"{field}.key", "the trigger has no episode_key for it to match; leave it empty"
                    )
                elif schema is not None:
                    key = self.key_path(exit_match.key, schema, f"{field}.key")
            matchers.append(None if event is None else ExitMatcher(event, key))
        return matchers

    def duration(
        self, duration: duration_pb2.Duration, field: str, *, low: timedelta, high: timedelta
    ) -> timedelta | None:
        value = _timedelta(duration)
        if value is None:
            self.fail(field, "is not a valid duration")
        elif low < timedelta(0) and not low <= value <= high:
            self.fail(field, f"must be within {_human(high)} either way")
        elif value < low:
            self.fail(
                field, "must not be negative" if low == timedelta(0) else f"must be at least {_human(low)}"
            )
        elif value > high:
            self.fail(field, f"must be at most {_human(high)}")
        else:
            return value
        return None

    def cooldown(self, trigger: triggers_pb2.Trigger) -> timedelta | None:
        if not trigger.HasField("cooldown"):
            return None
        cooldown = self.duration(trigger.cooldown, "cooldown", low=timedelta(0), high=MAX_WAIT)
        return cooldown or None  # 0: no cooldown

    def frequency_cap(self, cap: triggers_pb2.FrequencyCap) -> FrequencyCap | None:
        max_fires_ok = 1 <= cap.max_fires <= MAX_FIRES
        if not max_fires_ok:
            self.fail("frequency_cap.max_fires", f"must be 1 to {MAX_FIRES}")
        window: timedelta | None = None
        if not cap.HasField("window"):
            self.fail("frequency_cap.window", "required, e.g. 86400s")
        else:
            window = self.duration(cap.window, "frequency_cap.window", low=MIN_CAP_WINDOW, high=MAX_WAIT)
        return FrequencyCap(cap.max_fires, window) if window is not None and max_fires_ok else None

    def quiet_hours(self, quiet: triggers_pb2.QuietHours) -> QuietHours | None:
        ok = True
        for name in ("start_hour", "end_hour"):
            if not 0 <= getattr(quiet, name) <= 23:
                self.fail(f"quiet_hours.{name}", "must be 0 to 23")
                ok = False
        if ok and quiet.start_hour == quiet.end_hour:
            self.fail("quiet_hours.end_hour", "must differ from start_hour")
            ok = False
        if not quiet.default_time_zone:
            self.fail("quiet_hours.default_time_zone", "required: an IANA zone such as Europe/Berlin")
            ok = False
        elif quiet.default_time_zone not in TIME_ZONES:
            self.fail("quiet_hours.default_time_zone", "must be an IANA time zone such as Europe/Berlin")
            ok = False
        return QuietHours(quiet.start_hour, quiet.end_hour, quiet.default_time_zone) if ok else None

    def delivery(self, delivery: triggers_pb2.DeliverySpec) -> Delivery | None:
        before = len(self.violations)
        if not 1 <= len(delivery.destinations) <= MAX_DESTINATIONS:
            self.fail("delivery.destinations", f"must name 1 to {MAX_DESTINATIONS} destinations")
        seen: dict[str, int] = {}
        for i, destination in enumerate(delivery.destinations):
            if not DESTINATION_NAME.fullmatch(destination):
                self.fail(
                    f"delivery.destinations[{i}]",
                    "must look like destinations/esp-webhook (an id of 1 to 63 of a-z, 0-9 and -)",
                )
            elif destination in seen:
                self.fail(f"delivery.destinations[{i}]", f"repeats destinations[{seen[destination]}]")
            seen.setdefault(destination, i)
        if delivery.template and not TEMPLATE_NAME.fullmatch(delivery.template):
            self.fail(
                "delivery.template",
                "must look like templates/abandoned-cart (an id of 1 to 63 of a-z, 0-9 and -), or be empty",
            )
        size = delivery.variables.ByteSize()
        if size > MAX_VARIABLES_BYTES:
            self.fail("delivery.variables", f"is {size} bytes; at most {MAX_VARIABLES_BYTES} are allowed")
        if len(self.violations) > before:
            return None
        variables: dict[str, Any] = json_format.MessageToDict(delivery.variables)
        return Delivery(tuple(delivery.destinations), delivery.template, variables)

    def allowed_lateness(self, trigger: triggers_pb2.Trigger, *, late_events_matter: bool) -> timedelta:
        """As set; unset: the default, or none for a trigger whose fire no late event can change
        (an order confirmation would only be later, for nothing)."""
        if not trigger.HasField("allowed_lateness"):
            return DEFAULT_ALLOWED_LATENESS if late_events_matter else timedelta(0)
        lateness = self.duration(
            trigger.allowed_lateness, "allowed_lateness", low=timedelta(0), high=MAX_ALLOWED_LATENESS
        )
        return DEFAULT_ALLOWED_LATENESS if lateness is None else lateness


_KEY_KINDS: Final = frozenset(
    {FieldKind.STRING, FieldKind.NUMBER, FieldKind.BOOL, FieldKind.ENUM, FieldKind.JSON}
)
_TIME_KINDS: Final = frozenset({FieldKind.TIMESTAMP, FieldKind.STRING, FieldKind.JSON})
