"""Fixtures the sync tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from sync.provider_http import ProviderApi


@pytest.fixture
async def apis() -> AsyncIterator[list[ProviderApi]]:
    """The provider APIs a test makes, closed after it."""
    made: list[ProviderApi] = []
    yield made
    for api in made:
        await api.aclose()
