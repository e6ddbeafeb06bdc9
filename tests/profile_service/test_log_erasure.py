"""Erasing a person erases their raw events from the event log too (not after the stream's max
age): the ones merged before the erasure, and a late one the merger drops after it. Another
person's events stay. Real NATS JetStream, PostgreSQL and the services."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import nats
import nats.js.errors
import pytest
from nats.js import JetStreamContext

from profile_service.server import ProfileApp
from sendtime.ingest.v1 import ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime_common.event_log import JetStreamSettings
from tests.conftest import eventually, user, wait_for_profile
from tests.factories import cart_item_added, event, identify, timestamp
from tests.profile_service.test_profile_service import send

STREAM = JetStreamSettings().stream


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    client = await nats.connect(nats_url)
    yield client.jetstream()
    await client.close()


async def in_log(js: JetStreamContext, position: int) -> bool:
    try:
        await js.get_msg(STREAM, position)
        return True
    except nats.js.errors.NotFoundError:
        return False


async def test_an_erased_persons_events_are_erased_from_the_log_and_a_late_one_too(
    profile_app: ProfileApp,
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    js: JetStreamContext,
    unique: str,
) -> None:
    ada = [
        event(
            user_id=f"ada-{unique}", email=f"ada-{unique}@example.com", identify=identify(first_name="Ada")
        ),
        event(user_id=f"ada-{unique}", cart_item_added=cart_item_added("TRAIL-42")),
    ]
    grace = event(user_id=f"grace-{unique}", identify=identify(first_name="Grace"))
    await send(ingest_stub, *ada, grace)
    await wait_for_profile(profile_stub, user(f"ada-{unique}"), lambda p: len(p.cart.items) == 1)
    await wait_for_profile(profile_stub, user(f"grace-{unique}"), lambda p: "first_name" in p.traits)
    rows = await profile_app.pool.fetch(
        "SELECT event_id, log_position FROM events WHERE event_id = ANY($1::text[])",
        [e.event_id for e in [*ada, grace]],
    )
    positions = {row["event_id"]: row["log_position"] for row in rows}
    assert len(positions) == 3 and all(positions.values())
    for position in positions.values():
        assert await in_log(js, position)

    await profile_stub.DeleteProfile(profile_pb2.DeleteProfileRequest(identifier=user(f"ada-{unique}")))

    async def ada_gone_from_the_log() -> bool:
        return not any([await in_log(js, positions[e.event_id]) for e in ada])

    await eventually(ada_gone_from_the_log, timeout_s=10)
    assert await in_log(js, positions[grace.event_id])  # another person's events stay

    # A late event of Ada's (it happened before the erasure): the merger drops it, and it is
    # erased from the log as well.
    before = (await js.stream_info(STREAM)).state.last_seq
    late = event(user_id=f"ada-{unique}", identify=identify(first_name="Ada"))
    late.occurred_at.CopyFrom(timestamp(datetime.now(UTC) - timedelta(minutes=5)))
    await send(ingest_stub, late)
    late_position = before + 1
    assert await in_log(js, late_position)

    async def late_gone_from_the_log() -> bool:
        return not await in_log(js, late_position)

    await eventually(late_gone_from_the_log, timeout_s=10)

    async def outbox_empty() -> bool:  # taken out in the transaction that erased it
        return not await profile_app.pool.fetchval("SELECT count(*) FROM log_erasure_outbox")

    await eventually(outbox_empty, timeout_s=5)
