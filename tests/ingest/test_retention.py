"""What ingest keeps and for how long: processed ids for the dedup window, business keys while a
repeat could still be accepted, dead letters for their retention or until their person is
erased; purged in short chunks on real PostgreSQL, and a replay that races the purge still
answers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from ingest.dead_letters import DeadLetters
from ingest.retention import COUNT_FLUSH_IDS_KEPT, Retention, purge_expired
from ingest.server import IngestApp, create_app
from ingest.settings import Settings
from ingest.store import IngestStore, Rejection, StoredRejection
from sendtime.ingest.v1 import ingest_pb2
from sendtime.profile.v1 import profile_pb2
from sendtime_common.config import ConfigError
from sendtime_common.event_log import JetStreamSettings
from sendtime_common.identifiers import IdentifierHasher, IdentifierKind
from tests.conftest import LOCAL_SERVER, eventually
from tests.factories import event, identify

unkeyed_hash = IdentifierHasher.unkeyed().hash  # the services' default (IDENTIFIER_HASH_KEYS unset)


def test_retention_follows_the_settings() -> None:
    settings = Settings(
        dedup_window_hours=48, max_event_age_days=365, max_future_skew_s=300, dead_letter_retention_days=14
    )
    assert Retention.from_settings(settings) == Retention(
        processed_ids=timedelta(hours=48),
        business_keys=timedelta(days=365, minutes=5),  # a repeat older than this is rejected anyway
        dead_letters=timedelta(days=14),
    )


def test_dead_letter_retention_comes_from_the_environment() -> None:
    assert Settings().dead_letter_retention_days == 30
    assert Settings.from_env({"INGEST_DEAD_LETTER_RETENTION_DAYS": "7"}).dead_letter_retention_days == 7
    with pytest.raises(ConfigError, match="INGEST_DEAD_LETTER_RETENTION_DAYS"):
        Settings.from_env({"INGEST_DEAD_LETTER_RETENTION_DAYS": "0"})


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(database_url, min_size=1, max_size=2) as created:
        yield created


async def rows_of(pool: asyncpg.Pool, table: str, column: str, values: list[str]) -> set[str]:
    rows = await pool.fetch(f"SELECT {column} FROM {table} WHERE {column} = ANY($1::text[])", values)
    return {row[column] for row in rows}


async def test_the_purge_deletes_only_what_has_expired_in_chunks(
    pool: asyncpg.Pool,
    ingest_app: object,  # ingest_app: the session database is migrated
) -> None:
    store = IngestStore(pool, purge_chunk=2)  # 5 expired rows of each kind: three chunks each
    retention = Retention(timedelta(hours=72), timedelta(days=730), timedelta(days=30))
    tag = uuid.uuid4().hex[:8]
    old = [f"old-{tag}-{i}" for i in range(5)]
    new = [f"new-{tag}-{i}" for i in range(2)]

    # Expired rows sit just before each cutoff, kept ones just after; "now" is far in the
    # future so that no other test's rows are expired.
    now, second = datetime.now(UTC) + timedelta(days=3000), timedelta(seconds=1)
    ids_cutoff = now - retention.processed_ids
    keys_cutoff = now - retention.business_keys
    letters_cutoff = now - retention.dead_letters
    await store.record_stored([(i, None) for i in old], [], ids_cutoff - second)
    await store.record_stored([(i, None) for i in new], [], ids_cutoff + second)
    for ids, claimed_at in ((old, keys_cutoff - second), (new, keys_cutoff + second)):
        await pool.execute(
            "INSERT INTO ingest_business_keys (key_kind, key_value, event_id, stored, claimed_at)"
            " SELECT 'order_completed', unnest($1::text[]), unnest($1::text[]), true, $2",
            ids,
            claimed_at,
        )
    flush_ids = [uuid.uuid4() for _ in range(3)]
    for flush_id, flushed_at in zip(
        flush_ids, (now - COUNT_FLUSH_IDS_KEPT - second, now - second, now), strict=True
    ):
        await pool.execute(
            "INSERT INTO ingest_count_flushes (flush_id, flushed_at) VALUES ($1, $2)", flush_id, flushed_at
        )
    bad = b"\x00"
    await store.add_rejections([Rejection(i, 1, bad, bad, ()) for i in old], letters_cutoff - second)
    await store.add_rejections([Rejection(i, 1, bad, bad, ()) for i in new], letters_cutoff + second)

    purged = await purge_expired(store, retention, now)

    assert min(purged.processed_ids, purged.business_keys, purged.dead_letters) >= len(old)
    every = old + new
    assert await rows_of(pool, "ingest_processed_events", "event_id", every) == set(new)
    assert await rows_of(pool, "ingest_business_keys", "key_value", every) == set(new)
    assert await rows_of(pool, "ingest_rejected_events", "event_id", every) == set(new)
    kept = await pool.fetch(
        "SELECT flush_id FROM ingest_count_flushes WHERE flush_id = ANY($1::uuid[])", flush_ids
    )
    assert purged.count_flushes >= 1 and {r["flush_id"] for r in kept} == set(flush_ids[1:])
    again = await purge_expired(store, retention, now)
    assert (again.processed_ids, again.business_keys, again.dead_letters, again.count_flushes) == (0, 0, 0, 0)
    await pool.execute("DELETE FROM ingest_processed_events WHERE event_id = ANY($1::text[])", new)
    await pool.execute("DELETE FROM ingest_business_keys WHERE key_value = ANY($1::text[])", new)
    await pool.execute("DELETE FROM ingest_rejected_events WHERE event_id = ANY($1::text[])", new)
    await pool.execute("DELETE FROM ingest_count_flushes WHERE flush_id = ANY($1::uuid[])", flush_ids)


class PurgedDuringReplay(IngestStore):
    """The purge runs between the replay's read of the dead letter and its update."""

    async def get_rejection(self, rejection_id: int) -> StoredRejection | None:
        found = await super().get_rejection(rejection_id)
        await self._pool.execute("DELETE FROM ingest_rejected_events WHERE id = $1", rejection_id)
        return found


async def test_a_replay_that_races_the_purge_still_answers_what_it_did(
    pool: asyncpg.Pool, ingest_app: IngestApp, unique: str
) -> None:
    store = PurgedDuringReplay(pool)
    rejected = event(user_id=f"u-{unique}", identify=identify(plan="pro"))
    await store.add_rejections(
        [Rejection(rejected.event_id, rejected.source, rejected.SerializeToString(), b"", ())],
        datetime.now(UTC),
    )
    (row,) = await pool.fetch("SELECT id FROM ingest_rejected_events WHERE event_id = $1", rejected.event_id)

    answered = await DeadLetters(store, ingest_app.ingestor, IdentifierHasher.unkeyed()).replay(
        row["id"], None
    )

    assert answered is not None
    result, dead_letter = answered
    assert result is not None and result.outcome == ingest_pb2.EVENT_OUTCOME_ACCEPTED
    assert dead_letter.state == ingest_pb2.REJECTED_EVENT_STATE_REPLAYED
    assert await IngestStore(pool).get_rejection(row["id"]) is None


async def test_an_erasure_notice_deletes_the_persons_dead_letters(
    nats_url: str, database_url: str, pool: asyncpg.Pool, unique: str
) -> None:
    erased_email, other = f"Gone.{unique}@Example.com", f"u-other-{unique}"
    bad_quantity = ingest_pb2.CartItemAdded(sku="s", quantity=0)
    theirs = [
        event(user_id=f"u-gone-{unique}", cart_item_added=bad_quantity),
        event(email=erased_email, cart_item_added=bad_quantity),  # as sent; stored normalized
    ]
    kept = event(user_id=other, cart_item_added=bad_quantity)
    settings = Settings(**LOCAL_SERVER, database_url=database_url, event_log=JetStreamSettings(url=nats_url))
    app = await create_app(settings)
    await app.start()
    try:
        results = await app.ingestor.ingest_batch([*theirs, kept])
        assert {r.outcome for r in results} == {ingest_pb2.EVENT_OUTCOME_REJECTED}
        ids = [e.event_id for e in (*theirs, kept)]
        assert await rows_of(pool, "ingest_rejected_events", "event_id", ids) == set(ids)

        # What the profile service announces once it has erased the person (user id and email).
        notice = profile_pb2.ErasureNotice(
            identifier_hashes=[
                unkeyed_hash((IdentifierKind.USER_ID, f"u-gone-{unique}")),
                unkeyed_hash((IdentifierKind.EMAIL, erased_email.lower())),
            ]
        )
        await app.event_log.publish_erasure(f"test-{unique}", notice.SerializeToString())

        async def only_kept_left() -> bool:
            return await rows_of(pool, "ingest_rejected_events", "event_id", ids) == {kept.event_id}

        await eventually(only_kept_left)
    finally:
        await app.stop(grace_s=1)
    await pool.execute("DELETE FROM ingest_rejected_events WHERE event_id = $1", kept.event_id)
