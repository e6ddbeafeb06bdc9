"""Hypothesis profiles of the fuzz tests, chosen by HYPOTHESIS_PROFILE.

- ``ci`` (the default, in ``make test``): a small, derandomized slice, so a run never flakes and
  the whole directory takes seconds.
- ``fuzz`` (``make fuzz``): many examples, random each run, failures kept in .hypothesis/ so
  they replay first next time. Each failure becomes an ``@example`` or a unit test.

The tests take the profile as their ``settings`` parent (``fuzzing()``) instead of loading it
globally, so other property tests in the suite keep their own settings.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz",
    max_examples=20_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def fuzzing() -> settings:
    """The profile named by HYPOTHESIS_PROFILE ('ci' when unset)."""
    return settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
