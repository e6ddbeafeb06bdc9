"""A merge held up by a slow database, for several ack waits, is not redelivered to another
replica: the merger's deliveries are kept with in-progress acks (issue 19)."""

from __future__ import annotations

import time

import asyncpg
import nats
from nats.js.api import ConsumerInfo

from profile_service.server import create_app as create_profile_app
from profile_service.settings import Settings as ProfileSettings
from sendtime_common.event_log import Delivery, JetStreamEventLog, JetStreamSettings
from tests.conftest import LOCAL_SERVER, eventually
from tests.factories import event, identify
from tests.profile_service.test_unmerged_events import _merged, publish_event

# In-progress acks go out every quarter of the ack wait: 4 s leaves seconds, not a fraction of
# one, for a stalled process to send the next before NATS would redeliver (3 ack waits: 12 s).
ACK_WAIT_S = 4.0


async def test_a_merge_blocked_for_three_ack_waits_is_not_redelivered_and_merges_once(
    nats_url: str, redis_url: str, database_url: str, unique: str
) -> None:
    bus = JetStreamSettings(
        url=nats_url,
        stream=f"SLOW_{unique}",
        subject_prefix=f"slow.{unique}",
        erasure_stream=f"SLOW_ERASURES_{unique}",
        erasure_subject=f"slow-erasures.{unique}",
        profile_change_stream=f"SLOW_CHANGES_{unique}",
        profile_change_subject_prefix=f"slow-changes.{unique}",
        ack_wait_s=ACK_WAIT_S,
    )
    # One delivery before an unknown failure is set aside: a redelivery would show there too.
    app = await create_profile_app(
        ProfileSettings(
            **LOCAL_SERVER,
            database_url=database_url,
            redis_url=redis_url,
            event_log=bus,
            merge_max_deliveries=1,
        )
    )
    await app.start()
    other_replica = await JetStreamEventLog.connect(bus)
    blocker = await asyncpg.connect(database_url)
    try:
        other = await other_replica.subscribe("profile-merger")
        lock = blocker.transaction()
        await lock.start()
        await blocker.execute("LOCK TABLE events IN EXCLUSIVE MODE")  # reads pass, the merge's insert waits
        slow = event(user_id=f"u-{unique}", identify=identify(step=1))
        position = await publish_event(app, slow)
        await eventually(lambda: _waiting_on_the_lock(blocker))
        taken_by_other: list[Delivery] = []
        blocked_at = time.monotonic()
        while time.monotonic() - blocked_at < 3 * ACK_WAIT_S:
            taken_by_other.extend(await other.fetch(10, timeout_s=0.25))
        await lock.rollback()
        await eventually(lambda: _merged(app, slow))
        assert taken_by_other == []
        # Acked after the cache refresh, which follows the commit.
        info = await eventually(lambda: _settled(nats_url, bus.stream))
        assert info.num_redelivered == 0
        assert not await app.pool.fetchval(
            "SELECT count(*) FROM unmerged_events WHERE log_position = $1", position
        )
        await other.close()
    finally:
        await blocker.close()
        await other_replica.close()
        await app.stop(grace_s=1)


async def _waiting_on_the_lock(connection: asyncpg.Connection) -> bool:
    waiting = await connection.fetchval(
        "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
        " WHERE c.relname = 'events' AND NOT l.granted"
    )
    return bool(waiting)


async def _settled(url: str, stream: str) -> ConsumerInfo | None:
    info = await _consumer_info(url, stream)
    return info if info.num_ack_pending == 0 else None


async def _consumer_info(url: str, stream: str) -> ConsumerInfo:
    client = await nats.connect(url)
    try:
        info: ConsumerInfo = await client.jetstream().consumer_info(stream, "profile-merger")
        return info
    finally:
        await client.close()
