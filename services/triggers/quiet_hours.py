"""Quiet hours: the hours of a customer's local day when nothing fires, and the first instant
after them. Pure: times are passed in.

The customer's zone is the profile's ``last_seen.timezone`` when it is a zone tzdata knows, the
trigger's ``default_time_zone`` otherwise. Quiet hours run from ``start_hour``:00 to
``end_hour``:00 local time (over midnight when ``end_hour`` < ``start_hour``). A fire due in
them waits until they end: the first instant whose local hour is outside them, which on a day
the clocks skip the end hour (a DST gap) is the instant of the jump.
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any, Final

# The IANA names tzdata knows. Looked up in a set, as ingest does: zoneinfo.ZoneInfo() opens a
# file named by the value, so "Europe" would raise IsADirectoryError.
TIME_ZONES: Final = frozenset(zoneinfo.available_timezones())


@dataclass(frozen=True, slots=True)
class QuietHours:
    start_hour: int  # 0-23, local
    end_hour: int  # 0-23, local, != start_hour
    default_time_zone: str  # one of TIME_ZONES

    def is_quiet_hour(self, hour: int) -> bool:
        """Whether local ``hour`` (0-23) is in the quiet hours."""
        if self.start_hour < self.end_hour:
            return self.start_hour <= hour < self.end_hour
        return hour >= self.start_hour or hour < self.end_hour

    def zone_for(self, profile: Mapping[str, Any] | None) -> zoneinfo.ZoneInfo:
        """The customer's zone: the profile document's ``last_seen.timezone`` if tzdata knows
        it, else the default zone."""
        last_seen = profile.get("last_seen") if profile is not None else None
        name = last_seen.get("timezone") if isinstance(last_seen, Mapping) else None
        if isinstance(name, str) and name in TIME_ZONES:
            return zoneinfo.ZoneInfo(name)
        return zoneinfo.ZoneInfo(self.default_time_zone)

    def is_quiet(self, instant: datetime, zone: zoneinfo.ZoneInfo) -> bool:
        return self.is_quiet_hour(instant.astimezone(zone).hour)

    def next_allowed(self, now: datetime, zone: zoneinfo.ZoneInfo) -> datetime:
        """``now`` when it is outside the quiet hours in ``zone``, else the first instant after
        them (in UTC)."""
        if not self.is_quiet(now, zone):
            return now
        today = now.astimezone(zone).date()
        for days in range(3):
            # fold=0: an end hour the clocks skip maps to the instant of the jump, and one they
            # repeat to its first occurrence; either is the first instant past the quiet hours.
            local_end = datetime.combine(today + timedelta(days=days), time(self.end_hour), tzinfo=zone)
            candidate = local_end.astimezone(UTC)
            if candidate > now and not self.is_quiet(candidate, zone):
                return candidate
        raise AssertionError("quiet hours end within two days")  # pragma: no cover - start != end
