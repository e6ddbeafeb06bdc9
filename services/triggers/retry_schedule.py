"""When a webhook delivery is attempted again, and when it, or its destination, is given up.

The published schedule (Svix's, which the Standard Webhooks spec follows): an attempt at once,
then after 5 s, 5 min, 30 min, 2 h, 5 h, 10 h and 10 h: 8 attempts over about 28 hours. Each
delay is scaled by a random factor in [0.9, 1.1] so that deliveries failed together (a
receiver's outage) do not all come back in the same second.

What an answer means:

- 2xx: delivered.
- 410 Gone: the receiver says the endpoint is gone for good; the delivery fails at once and the
  destination is disabled.
- Anything else (3xx, which are not followed; other 4xx; 429; 5xx; no answer: a timeout, a
  refused connection, a TLS or DNS failure): the delivery is tried again on the schedule, as
  Svix does. A 400 or 401 is usually the receiver's deploy or configuration (a secret not yet
  rotated on its side), fixed within hours, and the schedule is finite.

A ``Retry-After`` on a failed answer (seconds, or an HTTP date) is honoured when it asks for
longer than the schedule's delay, up to 24 hours.

A destination whose attempts have all failed for ``disable_after`` (5 days by default) since its
last success is disabled (``should_disable``).
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

DEFAULT_DELAYS = (
    timedelta(0),
    timedelta(seconds=5),
    timedelta(minutes=5),
    timedelta(minutes=30),
    timedelta(hours=2),
    timedelta(hours=5),
    timedelta(hours=10),
    timedelta(hours=10),
)
DEFAULT_JITTER = 0.1
DEFAULT_MAX_RETRY_AFTER = timedelta(hours=24)
DEFAULT_DISABLE_AFTER = timedelta(days=5)
# Seconds past any sane Retry-After: int() of a longer digit string is slow, or refused.
_RETRY_AFTER_MAX_DIGITS = 12


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    """``delays[n]`` comes before attempt ``n + 1``; the first is the first attempt's (0)."""

    delays: tuple[timedelta, ...] = DEFAULT_DELAYS
    # Each delay is scaled by a factor drawn from [1 - jitter, 1 + jitter].
    jitter: float = DEFAULT_JITTER
    # A Retry-After longer than this counts as this long.
    max_retry_after: timedelta = DEFAULT_MAX_RETRY_AFTER

    def __post_init__(self) -> None:
        """Raises:
        ValueError: no attempts, a negative delay, or a jitter outside [0, 1).
        """
        if not self.delays:
            raise ValueError("a retry schedule has at least one attempt")
        if any(delay < timedelta(0) for delay in self.delays):
            raise ValueError("a retry schedule's delays are not negative")
        if not 0 <= self.jitter < 1:
            raise ValueError("a retry schedule's jitter is in [0, 1)")

    @property
    def attempts(self) -> int:
        """How many attempts a delivery gets."""
        return len(self.delays)

    def delay_before(self, attempt: int, rng: random.Random) -> timedelta:
        """The jittered delay before attempt number ``attempt`` (1 is the first).

        Raises:
            ValueError: there is no such attempt.
        """
        if not 1 <= attempt <= self.attempts:
            raise ValueError(f"attempt {attempt} is not in 1..{self.attempts}")
        return self.delays[attempt - 1] * rng.uniform(1 - self.jitter, 1 + self.jitter)


class Outcome(enum.StrEnum):
    """What one attempt's answer means."""

    DELIVERED = "delivered"
    GONE = "gone"
    FAILED = "failed"


def classify(http_status: int) -> Outcome:
    """The outcome of an answer with ``http_status`` (0: there was no answer)."""
    if 200 <= http_status < 300:
        return Outcome.DELIVERED
    if http_status == 410:
        return Outcome.GONE
    return Outcome.FAILED


class Step(enum.StrEnum):
    """Where a delivery goes after an attempt."""

    DELIVERED = "delivered"
    RETRY = "retry"
    FAILED = "failed"


class FailureReason(enum.StrEnum):
    """Why a delivery failed for good."""

    GONE = "gone"  # the receiver answered 410
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"


@dataclass(frozen=True, slots=True)
class Decision:
    step: Step
    # When the next attempt is due (RETRY only).
    next_attempt_time: datetime | None = None
    # Why it failed (FAILED only).
    failure: FailureReason | None = None

    @property
    def disables_destination(self) -> bool:
        """The answer was 410: the destination is disabled too."""
        return self.failure == FailureReason.GONE


def parse_retry_after(value: str | None, now: datetime) -> timedelta | None:
    """A ``Retry-After`` header (RFC 9110 10.2.3: delay seconds, or an HTTP date) as a delay
    from ``now``: ``None`` when absent or unreadable, zero for a date already past."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        if len(text) > _RETRY_AFTER_MAX_DIGITS:
            return timedelta.max
        return timedelta(seconds=int(text))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000": the zone is unknown; HTTP dates are GMT
        when = when.replace(tzinfo=UTC)
    return max(when - now, timedelta(0))


def decide(
    schedule: RetrySchedule,
    attempts_made: int,
    http_status: int,
    retry_after: timedelta | None,
    now: datetime,
    rng: random.Random,
) -> Decision:
    """What follows the attempt that made ``attempts_made`` attempts in all, answered with
    ``http_status`` (0: no answer) and ``retry_after`` (parsed; ``None`` when absent), at
    ``now``."""
    outcome = classify(http_status)
    if outcome == Outcome.DELIVERED:
        return Decision(Step.DELIVERED)
    if outcome == Outcome.GONE:
        return Decision(Step.FAILED, failure=FailureReason.GONE)
    if attempts_made >= schedule.attempts:
        return Decision(Step.FAILED, failure=FailureReason.ATTEMPTS_EXHAUSTED)
    delay = schedule.delay_before(attempts_made + 1, rng)
    if retry_after is not None:
        # Not jittered: the receiver named the time it can take the delivery again.
        delay = max(delay, min(retry_after, schedule.max_retry_after))
    return Decision(Step.RETRY, next_attempt_time=now + delay)


def should_disable(
    last_success_time: datetime | None,
    failing_since: datetime | None,
    now: datetime,
    disable_after: timedelta = DEFAULT_DISABLE_AFTER,
) -> bool:
    """Whether a destination is disabled: its attempts have failed since ``failing_since`` (the
    first failure after its last success, or ever; ``None`` when the last attempt succeeded),
    with no success since, for at least ``disable_after``."""
    if failing_since is None:
        return False
    if last_success_time is not None and last_success_time >= failing_since:
        return False
    return now - failing_since >= disable_after
