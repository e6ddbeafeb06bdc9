"""Quiet hours in the customer's zone, and the first instant after them (DST days included)."""

from __future__ import annotations

import zoneinfo
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triggers.quiet_hours import QuietHours

NIGHT = QuietHours(21, 8, "Europe/Berlin")
BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


@pytest.mark.parametrize(
    ("quiet", "quiet_hours", "loud_hours"),
    [
        (QuietHours(21, 8, "UTC"), [21, 23, 0, 7], [8, 12, 20]),
        (QuietHours(1, 5, "UTC"), [1, 4], [0, 5, 23]),
        (QuietHours(0, 23, "UTC"), [0, 22], [23]),
    ],
)
def test_is_quiet_hour(quiet: QuietHours, quiet_hours: list[int], loud_hours: list[int]) -> None:
    assert all(quiet.is_quiet_hour(h) for h in quiet_hours)
    assert not any(quiet.is_quiet_hour(h) for h in loud_hours)


def test_the_zone_is_the_profiles_when_tzdata_knows_it() -> None:
    assert NIGHT.zone_for({"last_seen": {"timezone": "America/New_York"}}).key == "America/New_York"
    assert NIGHT.zone_for({"last_seen": {"timezone": "Mars/Olympus"}}).key == "Europe/Berlin"
    assert NIGHT.zone_for({"last_seen": {"timezone": "Europe"}}).key == "Europe/Berlin"
    assert NIGHT.zone_for({}).key == "Europe/Berlin"
    assert NIGHT.zone_for(None).key == "Europe/Berlin"


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        ("2024-06-10T12:00:00+02:00", "2024-06-10T12:00:00+02:00"),  # not quiet: now
        ("2024-06-10T21:00:00+02:00", "2024-06-11T08:00:00+02:00"),  # evening: next morning
        ("2024-06-10T23:59:59+02:00", "2024-06-11T08:00:00+02:00"),
        ("2024-06-11T03:00:00+02:00", "2024-06-11T08:00:00+02:00"),  # after midnight: this morning
        ("2024-06-11T07:59:59+02:00", "2024-06-11T08:00:00+02:00"),
        ("2024-06-11T08:00:00+02:00", "2024-06-11T08:00:00+02:00"),  # the end hour is not quiet
    ],
)
def test_next_allowed_in_berlin(now: str, expected: str) -> None:
    assert NIGHT.next_allowed(utc(now), BERLIN) == utc(expected)


def test_an_end_hour_the_clocks_skip_ends_at_the_jump() -> None:
    # Berlin, 31 March 2024: 02:00 CET jumps to 03:00 CEST (01:00 UTC).
    quiet = QuietHours(22, 2, "Europe/Berlin")
    assert quiet.next_allowed(utc("2024-03-30T23:00:00+01:00"), BERLIN) == utc("2024-03-31T01:00:00Z")


def test_a_repeated_hour_ends_at_its_first_occurrence() -> None:
    # Berlin, 27 October 2024: 03:00 CEST goes back to 02:00 CET; 02:00 comes twice.
    quiet = QuietHours(22, 2, "Europe/Berlin")
    assert quiet.next_allowed(utc("2024-10-27T01:30:00+02:00"), BERLIN) == utc("2024-10-27T02:00:00+02:00")


def test_a_day_that_never_reaches_the_allowed_hour_waits_for_the_next() -> None:
    # Only 02:00-02:59 is allowed, and on 31 March 2024 Berlin skips it.
    quiet = QuietHours(3, 2, "Europe/Berlin")
    assert quiet.next_allowed(utc("2024-03-31T00:30:00+01:00"), BERLIN) == utc("2024-04-01T02:00:00+02:00")


ZONES = ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kathmandu", "Pacific/Apia", "UTC"]


@settings(max_examples=400, deadline=None, database=None)
@given(
    start=st.integers(0, 23),
    end=st.integers(0, 23),
    zone_name=st.sampled_from(ZONES),
    now=st.datetimes(min_value=datetime(2011, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)),
)
def test_next_allowed_is_the_first_instant_outside_quiet_hours(
    start: int, end: int, zone_name: str, now: datetime
) -> None:
    if start != end:
        _check_next_allowed(QuietHours(start, end, zone_name), now)


def _check_next_allowed(quiet: QuietHours, now: datetime) -> None:
    zone = zoneinfo.ZoneInfo(quiet.default_time_zone)
    allowed = quiet.next_allowed(now, zone)
    assert allowed >= now
    assert not quiet.is_quiet(allowed, zone)
    if allowed > now:
        # Every instant before it is quiet: sampled every 10 minutes, and just before it.
        probe = now
        while probe < allowed:
            assert quiet.is_quiet(probe, zone)
            probe += timedelta(minutes=10)
        assert quiet.is_quiet(allowed - timedelta(microseconds=1), zone)
        assert allowed - now <= timedelta(hours=48)


def _transitions(zone_name: str, year: int) -> list[tuple[str, datetime]]:
    """The UTC hours at which ``zone_name``'s offset changes in ``year``."""
    zone = zoneinfo.ZoneInfo(zone_name)
    instant = datetime(year, 1, 1, tzinfo=UTC)
    found: list[tuple[str, datetime]] = []
    while instant.year == year:
        following = instant + timedelta(hours=1)
        if instant.astimezone(zone).utcoffset() != following.astimezone(zone).utcoffset():
            found.append((zone_name, following))
        instant = following
    return found


DST_CHANGES = [
    change
    for name in ("Europe/Berlin", "America/New_York", "Australia/Lord_Howe")
    for change in _transitions(name, 2024)
]


@settings(max_examples=400, deadline=None, database=None)
@given(
    start=st.integers(0, 23),
    end=st.integers(0, 23),
    change=st.sampled_from(DST_CHANGES),
    shift=st.timedeltas(min_value=timedelta(hours=-30), max_value=timedelta(hours=6)),
)
def test_next_allowed_around_dst_changes(
    start: int, end: int, change: tuple[str, datetime], shift: timedelta
) -> None:
    zone_name, instant = change
    if start != end:
        _check_next_allowed(QuietHours(start, end, zone_name), instant + shift)
