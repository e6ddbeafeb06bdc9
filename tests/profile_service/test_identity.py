"""Identity limits and ranks: pure."""

from __future__ import annotations

import hashlib

import pytest

from profile_service.identity import IdentityLimits, InvalidLimits, best_identifier
from sendtime_common.identifiers import IdentifierKind, identifier_hash

EMAIL, DEVICE, USER = IdentifierKind.EMAIL, IdentifierKind.DEVICE_ID, IdentifierKind.USER_ID


def test_limits_override_the_defaults_by_kind() -> None:
    limits = IdentityLimits.parse("email=1, device_id=2")
    assert limits.violation({(EMAIL, "a"), (DEVICE, "d1"), (DEVICE, "d2")}) is None
    assert limits.violation({(EMAIL, "a"), (EMAIL, "b")}) == "at most 1 email identifiers per profile"
    assert IdentityLimits.parse("").violation({(EMAIL, f"{i}") for i in range(4)}) == (
        "at most 3 email identifiers per profile"
    )


@pytest.mark.parametrize("text", ["phone=2", "email=0", "email=many"])
def test_bad_limits_are_refused_with_the_reason(text: str) -> None:
    with pytest.raises(InvalidLimits):
        IdentityLimits.parse(text)


def test_the_most_specific_identifier_wins() -> None:
    assert best_identifier([(DEVICE, "d"), (EMAIL, "e"), (USER, "u")]) == (USER, "u")
    assert best_identifier([(DEVICE, "d"), (EMAIL, "e")]) == (EMAIL, "e")


def test_erased_identifiers_are_remembered_by_hash_only() -> None:
    digest = identifier_hash((EMAIL, "eve@example.com"))
    assert len(digest) == 32 and b"eve" not in digest
    assert digest == identifier_hash((EMAIL, "eve@example.com")) != identifier_hash((USER, "eve@example.com"))
    # As the ErasureNotice contract states it, so every service names an identifier alike.
    assert digest == hashlib.sha256(b"email:eve@example.com").digest()
