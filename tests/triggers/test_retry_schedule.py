"""The retry schedule, answers' outcomes, Retry-After and disabling: pure functions."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from triggers.retry_schedule import (
    DEFAULT_DELAYS,
    Decision,
    FailureReason,
    Outcome,
    RetrySchedule,
    Step,
    classify,
    decide,
    parse_retry_after,
    should_disable,
)

NOW = datetime(2026, 12, 5, 8, 0, tzinfo=UTC)
SCHEDULE = RetrySchedule()


def test_the_published_schedule() -> None:
    assert SCHEDULE.attempts == 8
    assert [d.total_seconds() for d in DEFAULT_DELAYS] == [
        0,
        5,
        5 * 60,
        30 * 60,
        2 * 3600,
        5 * 3600,
        10 * 3600,
        10 * 3600,
    ]


@pytest.mark.parametrize("attempt", range(2, 9))
def test_each_delay_is_jittered_within_ten_percent(attempt: int) -> None:
    base = DEFAULT_DELAYS[attempt - 1]
    rng = random.Random(attempt)
    delays = [SCHEDULE.delay_before(attempt, rng) for _ in range(2000)]
    assert all(base * 0.9 <= d <= base * 1.1 for d in delays)
    # Spread over the range, not bunched: both tenths at the edges are reached.
    assert min(delays) < base * 0.92 and max(delays) > base * 1.08


def test_the_first_attempt_is_at_once() -> None:
    assert SCHEDULE.delay_before(1, random.Random(1)) == timedelta(0)


def test_there_is_no_ninth_attempt() -> None:
    with pytest.raises(ValueError):
        SCHEDULE.delay_before(9, random.Random(1))


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.DELIVERED),
        (202, Outcome.DELIVERED),
        (204, Outcome.DELIVERED),
        (299, Outcome.DELIVERED),
        (410, Outcome.GONE),
        (0, Outcome.FAILED),
        (301, Outcome.FAILED),
        (400, Outcome.FAILED),
        (401, Outcome.FAILED),
        (404, Outcome.FAILED),
        (413, Outcome.FAILED),
        (429, Outcome.FAILED),
        (500, Outcome.FAILED),
        (503, Outcome.FAILED),
    ],
)
def test_answers_are_classified_as_svix_does(status: int, outcome: Outcome) -> None:
    assert classify(status) == outcome


def test_a_2xx_is_delivered() -> None:
    assert decide(SCHEDULE, 3, 200, None, NOW, random.Random(1)) == Decision(Step.DELIVERED)


def test_a_410_fails_the_delivery_and_disables_the_destination() -> None:
    decision = decide(SCHEDULE, 1, 410, None, NOW, random.Random(1))
    assert decision == Decision(Step.FAILED, failure=FailureReason.GONE)
    assert decision.disables_destination


@pytest.mark.parametrize("status", [0, 400, 429, 500, 503])
def test_a_failure_is_retried_after_the_next_delay(status: int) -> None:
    for attempts_made in range(1, 8):
        decision = decide(SCHEDULE, attempts_made, status, None, NOW, random.Random(attempts_made))
        assert decision.step == Step.RETRY and not decision.disables_destination
        assert decision.next_attempt_time is not None
        base = DEFAULT_DELAYS[attempts_made]
        assert NOW + base * 0.9 <= decision.next_attempt_time <= NOW + base * 1.1


def test_after_the_eighth_attempt_the_delivery_fails() -> None:
    decision = decide(SCHEDULE, 8, 503, timedelta(seconds=10), NOW, random.Random(1))
    assert decision == Decision(Step.FAILED, failure=FailureReason.ATTEMPTS_EXHAUSTED)
    assert not decision.disables_destination


def test_a_longer_retry_after_is_honoured_without_jitter() -> None:
    decision = decide(SCHEDULE, 1, 429, timedelta(minutes=2), NOW, random.Random(1))
    assert decision.next_attempt_time == NOW + timedelta(minutes=2)


def test_a_shorter_retry_after_leaves_the_schedule() -> None:
    decision = decide(SCHEDULE, 3, 503, timedelta(seconds=1), NOW, random.Random(1))
    assert decision.next_attempt_time is not None
    assert decision.next_attempt_time >= NOW + timedelta(minutes=27)


def test_a_retry_after_past_the_cap_counts_as_the_cap() -> None:
    decision = decide(SCHEDULE, 1, 503, timedelta(days=30), NOW, random.Random(1))
    assert decision.next_attempt_time == NOW + timedelta(hours=24)
    capped = RetrySchedule(max_retry_after=timedelta(hours=1))
    assert decide(capped, 1, 503, timedelta.max, NOW, random.Random(1)).next_attempt_time == NOW + timedelta(
        hours=1
    )


@pytest.mark.parametrize(
    ("header", "delay"),
    [
        (None, None),
        ("120", timedelta(seconds=120)),
        (" 0 ", timedelta(0)),
        (format_datetime(NOW + timedelta(minutes=10), usegmt=True), timedelta(minutes=10)),
        ("Sat, 05 Dec 2026 08:30:00 GMT", timedelta(minutes=30)),
        ("Sat, 05 Dec 2026 08:30:00 -0000", timedelta(minutes=30)),
        ("Sat, 05 Dec 2026 07:00:00 GMT", timedelta(0)),  # past: at once, as far as it asks
        ("-5", None),
        ("1.5", None),
        ("soon", None),
        ("", None),
        ("9" * 5000, timedelta.max),
    ],
)
def test_retry_after_is_read_as_seconds_or_an_http_date(header: str | None, delay: timedelta | None) -> None:
    assert parse_retry_after(header, NOW) == delay


def test_a_schedule_is_checked() -> None:
    with pytest.raises(ValueError):
        RetrySchedule(delays=())
    with pytest.raises(ValueError):
        RetrySchedule(delays=(timedelta(0), timedelta(seconds=-1)))
    with pytest.raises(ValueError):
        RetrySchedule(jitter=1.0)


DAY = timedelta(days=1)


@pytest.mark.parametrize(
    ("last_success", "failing_since", "now", "disabled"),
    [
        (None, None, NOW, False),  # never attempted
        (NOW - 10 * DAY, None, NOW, False),  # the last attempt succeeded
        (None, NOW - 5 * DAY, NOW, True),  # never succeeded, failing for 5 days
        (None, NOW - 5 * DAY + timedelta(seconds=1), NOW, False),
        (NOW - 9 * DAY, NOW - 6 * DAY, NOW, True),
        (NOW - 9 * DAY, NOW - 4 * DAY, NOW, False),
        (NOW - 1 * DAY, NOW - 6 * DAY, NOW, False),  # a success since the failures began
    ],
)
def test_a_destination_failing_for_five_days_since_its_last_success_is_disabled(
    last_success: datetime | None, failing_since: datetime | None, now: datetime, disabled: bool
) -> None:
    assert should_disable(last_success, failing_since, now) == disabled


def test_the_disabling_span_is_configurable() -> None:
    assert should_disable(None, NOW - timedelta(hours=2), NOW, disable_after=timedelta(hours=1))
    assert not should_disable(None, NOW - timedelta(days=6), NOW, disable_after=timedelta(days=7))
