"""Identity limits and ranks, and how erased identifiers are named: pure."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from profile_service.identity import IdentityLimits, InvalidLimits, best_identifier
from sendtime_common.config import ConfigError
from sendtime_common.identifiers import IdentifierHasher, IdentifierKind, hasher_from_env

unkeyed_hash = IdentifierHasher.unkeyed().hash  # the services' default (IDENTIFIER_HASH_KEYS unset)

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
    digest = unkeyed_hash((EMAIL, "eve@example.com"))
    assert len(digest) == 32 and b"eve" not in digest
    assert digest == unkeyed_hash((EMAIL, "eve@example.com")) != unkeyed_hash((USER, "eve@example.com"))
    # As the ErasureNotice contract states it, so every service names an identifier alike.
    assert digest == hashlib.sha256(b"email:eve@example.com").digest()


KEY_A, KEY_B = b"a" * 32, b"b" * 32


def test_a_keyed_hash_cannot_be_recomputed_without_the_key() -> None:
    keyed = IdentifierHasher([KEY_A])
    digest = keyed.hash((EMAIL, "eve@example.com"))
    assert digest == hmac.new(KEY_A, b"email:eve@example.com", hashlib.sha256).digest()
    assert digest != unkeyed_hash((EMAIL, "eve@example.com"))  # no dictionary of plain hashes fits
    assert digest != IdentifierHasher([KEY_B]).hash((EMAIL, "eve@example.com"))
    assert keyed.keyed and not IdentifierHasher.unkeyed().keyed


def test_a_rotated_hasher_names_new_records_with_the_new_key_and_finds_old_ones() -> None:
    rotated = IdentifierHasher([KEY_B, KEY_A, None])
    eve = (EMAIL, "eve@example.com")
    assert rotated.hash(eve) == IdentifierHasher([KEY_B]).hash(eve)
    assert rotated.all_hashes(eve) == [
        IdentifierHasher([KEY_B]).hash(eve),
        IdentifierHasher([KEY_A]).hash(eve),
        unkeyed_hash(eve),
    ]


def test_hash_keys_come_from_the_environment_current_first() -> None:
    a, b = base64.b64encode(KEY_A).decode(), base64.b64encode(KEY_B).decode()
    hasher = hasher_from_env({"IDENTIFIER_HASH_KEYS": f" {b} , {a},unkeyed "})
    eve = (EMAIL, "eve@example.com")
    assert hasher.all_hashes(eve) == IdentifierHasher([KEY_B, KEY_A, None]).all_hashes(eve)
    assert not hasher_from_env({}).keyed


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("not base64!", "key 1 is not base64"),
        ("unkeyed," + base64.b64encode(b"short").decode(), "key 2 has 5 bytes"),
    ],
)
def test_an_unusable_hash_key_stops_the_service_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=f"IDENTIFIER_HASH_KEYS: {reason}"):
        hasher_from_env({"IDENTIFIER_HASH_KEYS": text})
