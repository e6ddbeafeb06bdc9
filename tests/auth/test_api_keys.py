"""The API key format and the scopes (pure)."""

from __future__ import annotations

import math

import pytest

from sendtime.auth.v1 import auth_pb2
from sendtime_common.auth.api_keys import (
    BASE62,
    KEY_LENGTH,
    KEY_PATTERN,
    KEY_PREFIX,
    SECRET_LENGTH,
    MalformedKey,
    Scope,
    key_id_of,
    matches,
    new_key,
    secret_hash,
)


def test_a_new_key_has_the_prefix_an_id_and_enough_random_bits() -> None:
    issued = new_key()
    assert issued.key.startswith(KEY_PREFIX) and len(issued.key) == KEY_LENGTH
    assert KEY_PATTERN.fullmatch(issued.key)
    assert key_id_of(issued.key) == issued.key_id == issued.key[len(KEY_PREFIX) :][:12]
    assert SECRET_LENGTH * math.log2(len(BASE62)) >= 128
    assert new_key().key != issued.key and new_key().key_id != issued.key_id


def test_only_a_hash_is_kept_and_it_matches_the_key_only() -> None:
    issued = new_key()
    assert issued.secret_hash == secret_hash(issued.key) and issued.key.encode() not in issued.secret_hash
    assert matches(issued.key, issued.secret_hash)
    assert not matches(new_key().key, issued.secret_hash)


def test_a_secret_scanner_finds_a_key_in_text() -> None:
    issued = new_key()
    leaked = f'config = {{"token": "{issued.key}"}}'
    assert [m.group(0) for m in KEY_PATTERN.finditer(leaked)] == [issued.key]


def test_every_one_character_typo_is_caught_by_the_checksum() -> None:
    key = new_key().key
    for position in range(len(KEY_PREFIX), len(key)):
        replacement = "a" if key[position] != "a" else "b"
        typo = key[:position] + replacement + key[position + 1 :]
        with pytest.raises(MalformedKey, match="checksum"):
            key_id_of(typo)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "does not start"),
        ("Bearer", "does not start"),
        ("sk_live_" + "a" * 40, "does not start"),
        (KEY_PREFIX + "abc", "characters; a key has"),
        (KEY_PREFIX + "a" * (KEY_LENGTH - len(KEY_PREFIX) - 1) + "-", "other than letters and digits"),
        (KEY_PREFIX + "é" * (KEY_LENGTH - len(KEY_PREFIX)), "other than letters and digits"),
    ],
)
def test_malformed_keys_are_refused_with_a_reason_that_does_not_echo_them(text: str, reason: str) -> None:
    with pytest.raises(MalformedKey, match=reason) as caught:
        key_id_of(text)
    assert not text or text not in str(caught.value)


def test_truncated_keys_are_refused() -> None:
    key = new_key().key
    with pytest.raises(MalformedKey):
        key_id_of(key[:-1])


def test_every_scope_of_the_contract_has_a_name_and_back() -> None:
    contract = [value for value in auth_pb2.Scope.values() if value != auth_pb2.SCOPE_UNSPECIFIED]
    assert sorted(Scope.from_proto(value).proto for value in contract) == sorted(contract)
    assert {scope.proto for scope in Scope} == set(contract)
    with pytest.raises(ValueError):
        Scope.from_proto(auth_pb2.SCOPE_UNSPECIFIED)


def test_scopes_parse_by_name_or_contract_name() -> None:
    assert Scope.parse("profiles.erase") is Scope.PROFILES_ERASE
    assert Scope.parse("SCOPE_PROFILES_ERASE") is Scope.PROFILES_ERASE
    with pytest.raises(ValueError, match="scopes are events.write"):
        Scope.parse("profiles.delete")
