"""What the render tests share: the time a render that needs the live profile is given."""

from __future__ import annotations

import pytest

from render import profiles as render_profiles

# For checks that need the live profile's answer from the shared services: the 1 s default
# deadline can pass on a machine a benchmark shares, and the render then falls back
# (PROFILE_SOURCE_NONE). Deadlines and fallbacks are tested on their own.
LIVE_DEADLINE_S = 10.0


@pytest.fixture
def live_lookups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lets a live lookup use all of a render's LIVE_DEADLINE_S: profiles.py caps every
    BatchGetProfiles at LOOKUP_TIMEOUT_MAX_S (1 s) whatever the caller's deadline, and a lookup
    slower than that on a loaded machine came back DEADLINE_EXCEEDED (a TIMEOUT fallback). The
    session's render runs in this process, so the patch reaches it too, for this test only."""
    monkeypatch.setattr(render_profiles, "LOOKUP_TIMEOUT_MAX_S", LIVE_DEADLINE_S)
