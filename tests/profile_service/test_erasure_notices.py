"""Erasure notices: DeleteProfile leaves one in the outbox within its own transaction, and the
publisher puts it on the event log, where followers read it; with NATS down it waits in the
outbox and goes out once NATS is back. Real PostgreSQL and NATS."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

import devstack
from profile_service.erasure_outbox import ErasureOutbox
from profile_service.server import MIGRATIONS_DIR
from sendtime.ingest.v1 import ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime_common.event_log import JetStreamEventLog, JetStreamSettings
from sendtime_common.identifiers import IdentifierHasher, IdentifierKind
from sendtime_common.migrate import migrate
from tests.conftest import empty_database, eventually, times_logged, user, wait_for_profile
from tests.factories import event, identify
from tests.profile_service.test_profile_service import send

unkeyed_hash = IdentifierHasher.unkeyed().hash  # the services' default (IDENTIFIER_HASH_KEYS unset)


class Heard:
    """What a follower of the erasure notices has read so far."""

    def __init__(self) -> None:
        self.notices: list[profile_pb2.ErasureNotice] = []

    async def handle(self, payload: bytes) -> None:
        self.notices.append(profile_pb2.ErasureNotice.FromString(payload))

    async def wait_for(self, digest: bytes, timeout_s: float = 10) -> profile_pb2.ErasureNotice:
        async def heard() -> profile_pb2.ErasureNotice | None:
            return next((n for n in self.notices if digest in n.identifier_hashes), None)

        return await eventually(heard, timeout_s)


async def test_delete_profile_announces_the_erasure_by_identifier_hashes_and_customer_id(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    nats_url: str,
    database_url: str,
    unique: str,
) -> None:
    who = f"noticed-{unique}@example.com"
    await send(ingest_stub, event(user_id=f"u-{unique}", email=who, identify=identify(a=1)))
    profile = await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: len(p.identifiers) == 2)
    heard = Heard()
    log = await JetStreamEventLog.connect(JetStreamSettings(url=nats_url))
    following = await log.follow_erasures(heard.handle)
    try:
        await profile_stub.DeleteProfile(profile_pb2.DeleteProfileRequest(identifier=user(f"u-{unique}")))

        notice = await heard.wait_for(unkeyed_hash((IdentifierKind.EMAIL, who)))
    finally:
        await following.close()
        await log.close()
    assert set(notice.identifier_hashes) == {
        unkeyed_hash((IdentifierKind.EMAIL, who)),
        unkeyed_hash((IdentifierKind.USER_ID, f"u-{unique}")),
    }
    assert notice.erase_time.seconds > 0
    # The customer's opaque id too: triggers keeps episodes, fires and deliveries by it.
    assert notice.customer_id == profile.customer_id != ""
    assert all(who.encode() not in h for h in notice.identifier_hashes)  # hashes, never values
    outbox = await asyncpg.connect(database_url)
    try:
        # Taken out of the outbox once published: its transaction commits a moment after the
        # follower heard the notice (read at once, it was still there under load).
        async def taken_out() -> bool:
            pending = await outbox.fetchval(
                "SELECT count(*) FROM erasure_notice_outbox WHERE $1 = ANY(identifier_hashes)",
                unkeyed_hash((IdentifierKind.EMAIL, who)),
            )
            return bool(pending == 0)

        await eventually(taken_out, timeout_s=5)
    finally:
        await outbox.close()


@pytest.fixture
async def outbox_pool() -> AsyncIterator[asyncpg.Pool]:
    """A database of its own: the session's profile service publishes the shared outbox."""
    async with empty_database("sendtime_outbox") as url, asyncpg.create_pool(url, min_size=1) as pool:
        await migrate(pool, MIGRATIONS_DIR, table="schema_migrations")
        yield pool


async def test_with_nats_down_a_notice_waits_in_the_outbox_and_goes_out_when_it_is_back(
    outbox_pool: asyncpg.Pool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="profile_service.erasure_outbox")
    port = devstack.free_port()
    nats = devstack.start_nats(port, tmp_path / "nats")
    log = await JetStreamEventLog.connect(
        JetStreamSettings(url=f"nats://127.0.0.1:{port}", publish_timeout_s=0.3)
    )
    publisher = ErasureOutbox(outbox_pool, log, retry_after_s=0.2)
    running = asyncio.create_task(publisher.run())
    digest = unkeyed_hash((IdentifierKind.USER_ID, "u-outbox"))
    try:
        devstack.stop_process(nats)
        await outbox_pool.execute(
            "INSERT INTO erasure_notice_outbox (identifier_hashes, erased_at) VALUES ($1, now())", [digest]
        )
        publisher.wake()

        # Several rounds, each refused (as the publisher says; a fixed wait also passed while it
        # had not tried once): the notice stays.
        async def refused_twice() -> bool:
            return times_logged(caplog, "erasure notices not published yet; retrying") >= 2

        await eventually(refused_twice)
        assert await outbox_pool.fetchval("SELECT count(*) FROM erasure_notice_outbox") == 1

        nats = devstack.start_nats(port, tmp_path / "nats")  # the same store: the stream is kept

        async def outbox_empty() -> bool:
            return bool(await outbox_pool.fetchval("SELECT count(*) FROM erasure_notice_outbox") == 0)

        await eventually(outbox_empty)
        heard = Heard()
        following = await log.follow_erasures(heard.handle)
        try:
            notice = await heard.wait_for(digest)
        finally:
            await following.close()
        assert list(notice.identifier_hashes) == [digest]
    finally:
        publisher.stop()
        await running
        await log.close()
        devstack.stop_process(nats)
