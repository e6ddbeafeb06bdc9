"""How much of a render's deadline is kept back to render the fallback (render.renderer)."""

from __future__ import annotations

import pytest

from render.renderer import fallback_reserve


def test_the_configured_reserve_is_kept_from_a_long_deadline() -> None:
    assert fallback_reserve(0.1, 1.0) == pytest.approx(0.1)
    assert fallback_reserve(0.1, 2.0) == pytest.approx(0.1)  # Braze's 2 s


def test_a_short_deadline_keeps_a_tenth_but_at_least_20_ms() -> None:
    assert fallback_reserve(0.1, 0.5) == pytest.approx(0.05)
    assert fallback_reserve(0.1, 0.15) == pytest.approx(0.02)  # not 15 ms
    assert fallback_reserve(0.1, 0.01) == pytest.approx(0.02)


def test_a_reserve_configured_lower_is_kept() -> None:
    assert fallback_reserve(0.005, 1.0) == pytest.approx(0.005)
