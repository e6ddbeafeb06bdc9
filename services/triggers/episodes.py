"""The episode state machine, as pure decisions: what an event does to a customer's episode of
a trigger, and what happens when an episode falls due. No I/O, no clock: the caller passes the
episode it holds, what it remembers of the customer, and ``now``. docs/triggers-domain.md has
the diagram and the reasons for each rule.

An episode is a customer's wait for one key (the value at the trigger's ``episode_key`` in the
entry event; "" for a trigger without one). It is WAITING until it FIRES, EXITS (an exit event
ended it) or ENDS unfired (the profile no longer matches, the customer is suppressed, capped or
cooling down). Events are judged by when they occurred, never by when they arrived:

- an entry opens an episode whose fire time is ``occurred_at + delay.after`` (or the time at
  ``delay.until_event_time`` plus the offset, never before the entry); a new entry while it
  waits restarts the wait (RESTART, only when it occurred after the entry the wait runs from)
  or is ignored (KEEP);
- an exit ends a waiting episode when it occurred between the entry the wait runs from and the
  fire time (both included); the fire waits ``allowed_lateness`` past its fire time, so exits
  still in flight land first. An exit that occurred before the fire time but arrives after the
  fire is a LATE_EXIT: recorded, never an un-fire;
- after a fire, the same key is a new episode only once the trigger's cooldown has passed, and
  a keyed trigger without a cooldown never fires twice for a key ("once per episode": an order,
  a checkout). For a trigger without an episode key the episode is the customer's current run
  of activity: new activity after the fire (and after the cooldown) opens the next one.

Exits can arrive before the entries they follow (a browser batches its cart events; the order
comes from the server at once). So the caller passes, with an entry, the times its customer's
exits for the entry's key occurred (``known_exits``: keyed exits with that key and exits without
a key, whatever was decided when they arrived; ``EventRoles`` says which an event is). An entry
whose wait one of them falls in then opens nothing, and a restart that reaches over one exits.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from sendtime.ingest.v1 import ingest_pb2
from triggers.conditions import event_document, first_failing, timestamp_of
from triggers.trigger_validation import Reentry, TriggerDefinition

# An entry received more than this long after its fire time opens nothing: a backfill or an
# import of old events must not send a year-old cart reminder.
MAX_ENTRY_DELAY: Final = timedelta(hours=24)
# A fire time from delay.until_event_time at most this long after the entry.
MAX_UNTIL_WAIT: Final = timedelta(days=366)
_CHANNEL_NAMES: Final[Mapping[int, str]] = {number: name for name, number in ingest_pb2.Channel.items()}


class EpisodeState(enum.StrEnum):
    WAITING = "waiting"
    FIRED = "fired"
    EXITED = "exited"
    ENDED = "ended"


@dataclass(frozen=True, slots=True)
class Episode:
    """A customer's episode of a trigger for one key."""

    key: str
    state: EpisodeState
    opened_at: datetime  # when the entry that opened it occurred
    last_entry_at: datetime  # when the entry the wait runs from occurred (the opening one, or a restart)
    fire_at: datetime  # when it fires; moved by a restart and by quiet hours
    # FIRED: when it fired (now at the fire); EXITED: when the exit occurred; ENDED: when it ended.
    closed_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class IncomingEvent:
    """An event as the rules read it."""

    document: Mapping[str, Any]  # conditions.event_document(event)
    occurred_at: datetime
    received_at: datetime  # when ingest received it; occurred_at when unknown

    @classmethod
    def of(cls, event: ingest_pb2.Event) -> IncomingEvent:
        occurred_at = event.occurred_at.ToDatetime(tzinfo=UTC)
        received_at = (
            event.received_at.ToDatetime(tzinfo=UTC) if event.HasField("received_at") else occurred_at
        )
        return cls(event_document(event), occurred_at, received_at)


class Reason(enum.StrEnum):
    """Why a decision was taken: a low-cardinality label for metrics and logs."""

    # on_event: entries
    OPENED = "opened"
    RESTARTED = "restarted"
    REENTRY_KEEP = "reentry_keep"
    NOT_MATCHED = "not_matched"  # neither its entry nor an exit of this episode
    NO_EPISODE_KEY = "no_episode_key"  # the entry has no value at episode_key
    NO_EVENT_TIME = "no_event_time"  # nor a time at delay.until_event_time
    FIRE_TIME_TOO_FAR = "fire_time_too_far"  # that time is more than MAX_UNTIL_WAIT away
    STALE_ENTRY = "stale_entry"  # received more than MAX_ENTRY_DELAY after its fire time
    PAUSED = "paused"  # the trigger opens nothing while paused (and fires nothing)
    AFTER_FIRE_TIME = "after_fire_time"  # occurred after the waiting episode's fire time
    OUT_OF_ORDER = "out_of_order"  # occurred before the entry the wait runs from
    BEFORE_EPISODE_END = "before_episode_end"  # occurred before the key's last episode closed
    ALREADY_FIRED = "already_fired"  # a keyed trigger without cooldown fires once per key
    EXITED_AFTER_ENTRY = "exited_after_entry"  # an exit known already occurred within its wait
    # on_event: exits
    EXITED = "exited"
    LATE_EXIT = "late_exit"  # occurred before the fire time, arrived after the fire
    EXIT_BEFORE_ENTRY = "exit_before_entry"  # the customer came back after it
    EXIT_AFTER_FIRE_TIME = "exit_after_fire_time"
    NOTHING_WAITING = "nothing_waiting"
    # on_due
    FIRED = "fired"
    NOT_WAITING = "not_waiting"
    NOT_DUE = "not_due"
    QUIET_HOURS = "quiet_hours"
    ERASED = "erased"
    UNSUBSCRIBED = "unsubscribed"
    SPAM_REPORTED = "spam_reported"
    HARD_BOUNCED = "hard_bounced"
    NO_CONSENT = "no_consent"
    # the engine, at the fire: the template's render says not to send (required data missing,
    # suppressed in render), or the template no longer exists
    RENDER_SKIPPED = "render_skipped"
    TEMPLATE_MISSING = "template_missing"
    # on_event and on_due
    PROFILE_CONDITIONS = "profile_conditions"
    COOLDOWN = "cooldown"
    FREQUENCY_CAP = "frequency_cap"


class EventAction(enum.StrEnum):
    OPEN = "open"  # store ``episode`` (a new WAITING one) for its key
    RESTART = "restart"  # store ``episode``: the wait runs from the new entry
    KEEP = "keep"  # nothing changes (REENTRY_KEEP)
    EXIT = "exit"  # store ``episode``, EXITED
    LATE_EXIT = "late_exit"  # nothing changes; count it (the fire stands)
    IGNORE = "ignore"  # nothing changes


class DueAction(enum.StrEnum):
    FIRE = "fire"  # deliver; store ``episode``, FIRED at now
    DEFER = "defer"  # store ``episode`` (its new fire time); wake at ``wake_at``
    END = "end"  # store ``episode``, ENDED unfired
    WAIT = "wait"  # not due (wake at ``wake_at``) or paused (wake on resume); nothing changes
    NONE = "none"  # the episode is not waiting: a stale wake-up; nothing changes


@dataclass(frozen=True, slots=True)
class EventDecision:
    action: EventAction
    reason: Reason
    episode: Episode | None = None  # what to store for the key; None: leave it as it is


@dataclass(frozen=True, slots=True)
class DueDecision:
    action: DueAction
    reason: Reason
    episode: Episode | None = None  # what to store; None: leave it as it is
    wake_at: datetime | None = None  # when to look at the episode again
    detail: str = ""  # e.g. which profile condition failed


@dataclass(frozen=True, slots=True)
class EventRoles:
    """What an event is to a trigger, so the caller knows which episodes to load."""

    entry: bool  # it matches the entry
    entry_key: str | None  # its episode key ("" without episode_key); None: no value there
    exits_any: bool  # it matches an exit without a key: every episode of the customer
    exit_keys: frozenset[str]  # the keys it ends through keyed exits

    @property
    def is_exit(self) -> bool:
        return self.exits_any or bool(self.exit_keys)

    def exits(self, key: str) -> bool:
        """Whether it is an exit for the episode of ``key``."""
        return self.exits_any or key in self.exit_keys


def roles_of(definition: TriggerDefinition, event: IncomingEvent) -> EventRoles:
    entry = definition.entry.matches(event.document)
    exits_any = False
    exit_keys: set[str] = set()
    for exit_match in definition.exits:
        if not exit_match.event.matches(event.document):
            continue
        if exit_match.key is None:
            exits_any = True
        else:
            key = exit_match.key_of(event.document)
            if key is not None:
                exit_keys.add(key)
    entry_key = definition.entry_key(event.document) if entry else None
    return EventRoles(entry, entry_key, exits_any, frozenset(exit_keys))


def due_at(definition: TriggerDefinition, episode: Episode) -> datetime:
    """When a waiting episode falls due: its fire time plus the allowed lateness."""
    return episode.fire_at + definition.allowed_lateness


def fire_time(definition: TriggerDefinition, event: IncomingEvent) -> datetime | Reason:
    """When an episode opened (or restarted) by ``event`` fires, or why it cannot."""
    wait = definition.wait
    if wait.after is not None:
        return event.occurred_at + wait.after
    assert wait.until_event_time is not None  # a Wait has one or the other
    time = timestamp_of(wait.until_event_time.value(event.document))
    if time is None:
        return Reason.NO_EVENT_TIME
    target = time + wait.offset
    if target - event.occurred_at > MAX_UNTIL_WAIT:
        return Reason.FIRE_TIME_TOO_FAR
    return max(target, event.occurred_at)


# ---- events -----------------------------------------------------------------------------------


def on_event(
    definition: TriggerDefinition,
    event: IncomingEvent,
    episode: Episode | None,
    *,
    last_fire_time: datetime | None = None,
    known_exits: Iterable[datetime] = (),
    profile: Mapping[str, Any] | None = None,
    paused: bool = False,
    max_entry_delay: timedelta = MAX_ENTRY_DELAY,
) -> EventDecision:
    """What ``event`` does to ``episode``: the one the caller holds for the event's entry key,
    or for a key the event exits (``roles_of``); None when it holds none for the entry key.

    Args:
        last_fire_time: when this trigger last fired for the customer (any key): the cooldown.
        known_exits: when the customer's exits for this key (or without a key) occurred, as far
            as the caller knows: remembered as they arrived, or read from the profile's events.
            Only those at or after the entry matter.
        profile: the live profile document, for the profile conditions at the open; None: not
            known yet (they are then checked at the fire only).
        paused: the trigger is paused: no episode opens (waiting ones still restart and exit).
    """
    roles = roles_of(definition, event)
    if episode is not None and roles.exits(episode.key):
        return _exit(episode, event.occurred_at)
    if not roles.entry:
        return _ignore(Reason.NOTHING_WAITING if roles.is_exit and episode is None else Reason.NOT_MATCHED)
    if roles.entry_key is None:
        return _ignore(Reason.NO_EPISODE_KEY)
    if episode is not None and episode.key != roles.entry_key:
        return _ignore(Reason.NOT_MATCHED)
    fire_at = fire_time(definition, event)
    if isinstance(fire_at, Reason):
        return _ignore(fire_at)
    if event.received_at - fire_at > max_entry_delay:
        return _ignore(Reason.STALE_ENTRY)
    occurred_at = event.occurred_at
    exited_at = min((t for t in known_exits if occurred_at <= t <= fire_at), default=None)
    if episode is not None and episode.state == EpisodeState.WAITING:
        return _reenter(definition, episode, occurred_at, fire_at, exited_at)
    if paused:
        return _ignore(Reason.PAUSED)
    if episode is not None:
        assert episode.closed_at is not None  # set whenever an episode leaves WAITING
        if occurred_at <= episode.closed_at:
            return _ignore(Reason.BEFORE_EPISODE_END)
        if episode.state == EpisodeState.FIRED and definition.keyed and definition.cooldown is None:
            return _ignore(Reason.ALREADY_FIRED)
        if episode.state == EpisodeState.FIRED:
            last_fire_time = max(last_fire_time or episode.closed_at, episode.closed_at)
    if exited_at is not None:
        return _ignore(Reason.EXITED_AFTER_ENTRY)
    if _cooling_down(definition, last_fire_time, occurred_at):
        return _ignore(Reason.COOLDOWN)
    if profile is not None and first_failing(definition.profile_conditions, profile) is not None:
        return _ignore(Reason.PROFILE_CONDITIONS)
    opened = Episode(roles.entry_key, EpisodeState.WAITING, occurred_at, occurred_at, fire_at)
    return EventDecision(EventAction.OPEN, Reason.OPENED, opened)


def _reenter(
    definition: TriggerDefinition,
    episode: Episode,
    occurred_at: datetime,
    fire_at: datetime,
    exited_at: datetime | None,
) -> EventDecision:
    """A new entry while the episode of its key waits."""
    if occurred_at > episode.fire_at:
        # Judged by occurrence, the episode fired before this entry; the fire is only waiting
        # for its lateness. The entry belongs to no episode (and cannot open one later: it
        # occurred before the fire closes the episode).
        return _ignore(Reason.AFTER_FIRE_TIME)
    if definition.reentry == Reentry.KEEP:
        return EventDecision(EventAction.KEEP, Reason.REENTRY_KEEP)
    if occurred_at <= episode.last_entry_at:
        return _ignore(Reason.OUT_OF_ORDER)
    if exited_at is not None:
        # An exit that arrived first occurred after this entry and before the restarted wait
        # ends: in occurrence order the restart happened, then the first such exit ended it.
        exited = replace(episode, state=EpisodeState.EXITED, closed_at=exited_at)
        return EventDecision(EventAction.EXIT, Reason.EXITED_AFTER_ENTRY, exited)
    restarted = replace(episode, last_entry_at=occurred_at, fire_at=fire_at)
    return EventDecision(EventAction.RESTART, Reason.RESTARTED, restarted)


def _exit(episode: Episode, occurred_at: datetime) -> EventDecision:
    if episode.state == EpisodeState.WAITING:
        if occurred_at < episode.last_entry_at:
            return _ignore(Reason.EXIT_BEFORE_ENTRY)
        if occurred_at > episode.fire_at:
            return _ignore(Reason.EXIT_AFTER_FIRE_TIME)
        exited = replace(episode, state=EpisodeState.EXITED, closed_at=occurred_at)
        return EventDecision(EventAction.EXIT, Reason.EXITED, exited)
    if episode.state == EpisodeState.FIRED:
        if occurred_at < episode.last_entry_at:
            return _ignore(Reason.EXIT_BEFORE_ENTRY)
        if occurred_at > episode.fire_at:
            return _ignore(Reason.EXIT_AFTER_FIRE_TIME)
        return EventDecision(EventAction.LATE_EXIT, Reason.LATE_EXIT)
    return _ignore(Reason.NOTHING_WAITING)


def _ignore(reason: Reason) -> EventDecision:
    return EventDecision(EventAction.IGNORE, reason)


def _cooling_down(definition: TriggerDefinition, last_fire_time: datetime | None, at: datetime) -> bool:
    cooldown = definition.cooldown
    return cooldown is not None and last_fire_time is not None and at < last_fire_time + cooldown


# ---- due episodes -----------------------------------------------------------------------------


def on_due(
    definition: TriggerDefinition,
    episode: Episode,
    *,
    now: datetime,
    profile: Mapping[str, Any] | None,
    recent_fire_times: Iterable[datetime] = (),
    last_fire_time: datetime | None = None,
    channel: int = ingest_pb2.CHANNEL_EMAIL,
    paused: bool = False,
) -> DueDecision:
    """What happens to ``episode`` at ``now``: it fires, waits, is deferred past quiet hours, or
    ends unfired. The checks run in this order, each only if the ones before it passed:

    1. not WAITING: NONE; before its fire time plus the allowed lateness: WAIT; paused: WAIT;
    2. no profile (the person was erased): END; suppressed on ``channel`` (email: unsubscribed,
       reported spam, bounced hard; any channel: its consent withdrawn): END;
    3. a profile condition no longer holds: END;
    4. in the customer's quiet hours: DEFER to their end (the checks run again then);
    5. this trigger fired for the customer within its cooldown: END;
    6. the frequency cap is reached: END (skipped, not deferred);
    7. otherwise FIRE.

    Args:
        profile: the live profile document; None when the person was erased or is unknown.
        recent_fire_times: when the customer's fires of every trigger happened (those in the
            cap window count; others are ignored).
        last_fire_time: when this trigger last fired for the customer (any key).
        channel: the channel the delivery is for (the template's); email by default.
    """
    if episode.state != EpisodeState.WAITING:
        return DueDecision(DueAction.NONE, Reason.NOT_WAITING)
    due = due_at(definition, episode)
    if now < due:
        return DueDecision(DueAction.WAIT, Reason.NOT_DUE, wake_at=due)
    if paused:
        return DueDecision(DueAction.WAIT, Reason.PAUSED)
    if profile is None:
        return _end(episode, now, Reason.ERASED)
    suppressed = suppression_of(profile, channel)
    if suppressed is not None:
        return _end(episode, now, suppressed)
    failing = first_failing(definition.profile_conditions, profile)
    if failing is not None:
        path = definition.profile_conditions[failing].path.text
        return _end(episode, now, Reason.PROFILE_CONDITIONS, f"profile_conditions[{failing}] ({path})")
    quiet = definition.quiet_hours
    if quiet is not None:
        allowed = quiet.next_allowed(now, quiet.zone_for(profile))
        if allowed > now:
            deferred = replace(episode, fire_at=allowed)
            return DueDecision(
                DueAction.DEFER, Reason.QUIET_HOURS, deferred, wake_at=due_at(definition, deferred)
            )
    if _cooling_down(definition, last_fire_time, now):
        return _end(episode, now, Reason.COOLDOWN)
    cap = definition.frequency_cap
    if cap is not None:
        fires = sum(1 for t in recent_fire_times if now - cap.window < t <= now)
        if fires >= cap.max_fires:
            return _end(episode, now, Reason.FREQUENCY_CAP, f"{fires} fires in the window")
    fired = replace(episode, state=EpisodeState.FIRED, closed_at=now)
    return DueDecision(DueAction.FIRE, Reason.FIRED, fired)


def _end(episode: Episode, now: datetime, reason: Reason, detail: str = "") -> DueDecision:
    ended = replace(episode, state=EpisodeState.ENDED, closed_at=now)
    return DueDecision(DueAction.END, reason, ended, detail=detail)


def suppression_of(profile: Mapping[str, Any], channel: int = ingest_pb2.CHANNEL_EMAIL) -> Reason | None:
    """Why the customer must not be contacted on ``channel``, from the profile document; None
    when nothing forbids it. The rules of render's suppression (render.suppression): a consent
    never given is no refusal; a withdrawn one is."""
    if channel == ingest_pb2.CHANNEL_EMAIL:
        email = profile.get("email")
        if isinstance(email, Mapping):
            if email.get("unsubscribed") is True:
                return Reason.UNSUBSCRIBED
            if email.get("spam_reported") is True:
                return Reason.SPAM_REPORTED
            if email.get("bounce_state") == "BOUNCE_STATE_HARD":
                return Reason.HARD_BOUNCED
    channel_name = _CHANNEL_NAMES.get(channel)
    consents = profile.get("consents")
    for consent in consents if isinstance(consents, list) else ():
        if isinstance(consent, Mapping) and consent.get("channel") == channel_name:
            if consent.get("subscribed") is not True:
                return Reason.NO_CONSENT
    return None
