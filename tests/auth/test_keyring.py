"""The key ring's check of a key, without a database: a store that holds its entries in memory."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import cast

import asyncpg
import pytest

import sendtime_common.auth.keyring as keyring_module
from sendtime_common.auth import api_keys
from sendtime_common.auth.api_keys import KEY_PREFIX, SECRET_LENGTH, IssuedKey, Scope, _checksum, new_key
from sendtime_common.auth.key_store import KeyEntry, KeyStore
from sendtime_common.auth.keyring import AuthFailure, KeyRing, Unauthenticated


class MemoryStore:
    """What the ring reads of a KeyStore: the entries and the generation number."""

    def __init__(self, entries: list[KeyEntry]) -> None:
        self.entries_held = entries
        self.generation_number = 1

    def replace_entries(self, entries: list[KeyEntry]) -> None:
        self.entries_held = entries
        self.generation_number += 1

    async def generation(self) -> int:
        return self.generation_number

    async def entries(self, now: datetime) -> tuple[int, list[KeyEntry]]:
        return self.generation_number, list(self.entries_held)


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 4, 12, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys the ring compares with a stored hash, in order."""
    compared: list[str] = []
    real = api_keys.matches

    def counting(key: str, stored_hash: bytes) -> bool:
        compared.append(key)
        return real(key, stored_hash)

    monkeypatch.setattr(keyring_module, "matches", counting)
    return compared


def entry_for(
    issued: IssuedKey, *, expires_at: datetime | None = None, revoked_at: datetime | None = None
) -> KeyEntry:
    """The entry a store would hold for ``issued`` (profiles.read)."""
    scopes = frozenset({Scope.PROFILES_READ})
    return KeyEntry(issued.key_id, issued.secret_hash, scopes, expires_at, revoked_at)


async def ring_with(store: MemoryStore, clock: Clock | None = None) -> KeyRing:
    ring = KeyRing(cast(KeyStore, store), clock=clock or Clock())
    await ring.load()
    return ring


async def test_a_key_is_hashed_once_until_the_keys_are_reloaded(hashes: list[str]) -> None:
    issued = new_key()
    store = MemoryStore([entry_for(issued)])
    ring = await ring_with(store)
    for _ in range(3):
        assert (await ring.verify(issued.key)).key_id == issued.key_id
    assert hashes == [issued.key]

    store.replace_entries(list(store.entries_held))  # any change to the keys: a reload
    await ring.refresh()
    await ring.verify(issued.key)
    assert hashes == [issued.key, issued.key]


async def test_a_remembered_key_is_refused_once_revoked_or_expired() -> None:
    revoked, expiring = new_key(), new_key()
    clock = Clock()
    store = MemoryStore(
        [
            entry_for(revoked),
            entry_for(expiring, expires_at=clock.now + timedelta(seconds=5)),
        ]
    )
    ring = await ring_with(store, clock)
    await ring.verify(revoked.key)
    await ring.verify(expiring.key)

    store.replace_entries(
        [
            entry_for(revoked, revoked_at=clock.now),
            store.entries_held[1],
        ]
    )
    await ring.refresh()
    with pytest.raises(Unauthenticated) as refused:
        await ring.verify(revoked.key)
    assert refused.value.reason is AuthFailure.REVOKED

    clock.now += timedelta(seconds=5)  # no reload: expiry is checked on every call
    with pytest.raises(Unauthenticated) as refused:
        await ring.verify(expiring.key)
    assert refused.value.reason is AuthFailure.EXPIRED


async def test_another_key_with_the_id_of_a_remembered_key_is_refused(hashes: list[str]) -> None:
    issued = new_key()
    ring = await ring_with(MemoryStore([entry_for(issued)]))
    await ring.verify(issued.key)

    body = KEY_PREFIX + issued.key_id + "x" * SECRET_LENGTH  # well formed, the same id, another secret
    forged = body + _checksum(body)
    with pytest.raises(Unauthenticated) as refused:
        await ring.verify(forged)
    assert refused.value.reason is AuthFailure.UNKNOWN
    assert hashes == [issued.key, forged]  # checked against the stored hash, not let through by id


class FailingThenWorking(MemoryStore):
    """A store whose reads first fail as a PostgreSQL restart made them fail (asyncpg's
    InternalClientError on a connection whose server went away mid-statement), then with a
    bug's exception, then work."""

    def __init__(self, entries: list[KeyEntry]) -> None:
        super().__init__(entries)
        self.failures: list[Exception] = [
            asyncpg.InternalClientError("cannot switch to state 11; another operation (2) is in progress"),
            RuntimeError("a bug"),
        ]
        self.reads = 0

    async def generation(self) -> int:
        self.reads += 1
        if self.failures:
            raise self.failures.pop(0)
        return await super().generation()


async def test_the_refresh_loop_outlives_a_broken_connection_and_a_bug() -> None:
    """It once ended for good on an error it did not expect: keys revoked afterwards stayed valid."""
    issued = new_key()
    clock = Clock()
    store = FailingThenWorking([entry_for(issued)])
    ring = KeyRing(cast(KeyStore, store), clock=clock, refresh_s=0.01)
    await ring.load()
    running = asyncio.create_task(ring.run())
    try:
        for _ in range(500):
            if not store.failures or running.done():
                break
            await asyncio.sleep(0.01)
        assert not store.failures and not running.done()
        store.replace_entries([entry_for(issued, revoked_at=clock.now)])

        async def refused() -> bool:
            try:
                await ring.verify(issued.key)
            except Unauthenticated:
                return True
            return False

        for _ in range(500):
            if await refused():
                break
            await asyncio.sleep(0.01)
        assert await refused() and not running.done()
    finally:
        ring.stop()
        await running
