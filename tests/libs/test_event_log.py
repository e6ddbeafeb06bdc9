"""The JetStream event log on a real, pinned nats-server."""

from __future__ import annotations

import asyncio
import signal
import uuid
from dataclasses import replace
from pathlib import Path

import devstack
from sendtime_common.event_log import (
    EventLogFull,
    EventLogUnavailable,
    JetStreamEventLog,
    JetStreamSettings,
    OutgoingMessage,
    PublishReceipt,
    RetryLater,
)
from tests.conftest import eventually


def settings(url: str) -> JetStreamSettings:
    unique = uuid.uuid4().hex[:8]
    return JetStreamSettings(url=url, stream=f"TEST_{unique}", subject_prefix=f"test.{unique}")


def message(i: int) -> OutgoingMessage:
    return OutgoingMessage(key="thing", message_id=f"m-{i}", payload=b"payload-%d" % i, headers={"h": "v"})


async def test_a_resent_message_id_is_a_duplicate(nats_url: str) -> None:
    log = await JetStreamEventLog.connect(settings(nats_url))
    try:
        first = await log.publish(message(1))
        again = await log.publish(message(1))
        assert (first.duplicate, again.duplicate) == (False, True)
        assert again.sequence == first.sequence
    finally:
        await log.close()


async def test_an_unacked_delivery_comes_back_and_an_acked_one_does_not(nats_url: str) -> None:
    config = settings(nats_url)
    log = await JetStreamEventLog.connect(config)
    try:
        for i in range(2):
            await log.publish(message(i))
        subscription = await log.subscribe("reader")
        first = await subscription.fetch(2, timeout_s=2)
        assert [d.payload for d in first] == [b"payload-0", b"payload-1"]
        assert first[0].headers["h"] == "v"
        await first[0].ack()
        await first[1].retry_later(0)
        again = await subscription.fetch(2, timeout_s=2)
        assert [(d.payload, d.attempt) for d in again] == [(b"payload-1", 2)]
        await again[0].ack()
        assert await subscription.fetch(2, timeout_s=0.3) == []
        await subscription.close()
    finally:
        await log.close()


async def test_acknowledged_messages_survive_a_killed_server(tmp_path: Path) -> None:
    """sync_interval: always — what the server acked is on disk before the ack, kill -9 or not."""
    port = devstack.free_port()
    workdir = tmp_path / "nats"
    server = devstack.start_nats(port, workdir)
    config = settings(f"nats://127.0.0.1:{port}")
    log = await JetStreamEventLog.connect(config)
    try:
        for i in range(200):
            await log.publish(message(i))
        server.send_signal(signal.SIGKILL)
        server.wait()
        server = devstack.start_nats(port, workdir)
        for _ in range(200):  # the client notices the crash and reconnects on its own
            if log.reconnects >= 1 and log.connected:
                break
            await asyncio.sleep(0.05)
        subscription = await log.subscribe("after-crash")
        seen: list[bytes] = []
        while batch := await subscription.fetch(100, timeout_s=2):
            for delivery in batch:
                seen.append(delivery.payload)
                await delivery.ack()
        assert seen == [b"payload-%d" % i for i in range(200)]
        await subscription.close()
    finally:
        await log.close()
        devstack.stop_process(server)


async def test_an_erasure_handler_that_asks_to_retry_gets_the_notice_again_in_order(
    tmp_path: Path,
) -> None:
    port = devstack.free_port()
    nats = devstack.start_nats(port, tmp_path / "nats")
    log = await JetStreamEventLog.connect(JetStreamSettings(url=f"nats://127.0.0.1:{port}"))
    handed: list[bytes] = []

    async def handle(notice: bytes) -> None:
        handed.append(notice)
        if notice == b"store down" and handed.count(notice) < 3:
            raise RetryLater("the store is down")
        if notice == b"broken":
            raise ValueError("cannot be handled")  # logged; not handed again

    try:
        for notice in (b"store down", b"broken", b"after"):
            await log.publish_erasure(notice.decode(), notice)
        following = await log.follow_erasures(handle)

        async def all_handed() -> bool:
            return b"after" in handed

        try:
            await eventually(all_handed)
        finally:
            await following.close()
    finally:
        await log.close()
        devstack.stop_process(nats)
    assert handed == [b"store down"] * 3 + [b"broken", b"after"]


async def test_a_batch_gets_one_outcome_per_message_in_order(nats_url: str) -> None:
    log = await JetStreamEventLog.connect(settings(nats_url))
    try:
        await log.publish(message(1))
        outcomes = await (await log.publish_batch([message(0), message(1), message(2)]))
        assert [(type(o), getattr(o, "duplicate", None)) for o in outcomes] == [
            (PublishReceipt, False),
            (PublishReceipt, True),  # sent before: a duplicate
            (PublishReceipt, False),
        ]
        sequences = [o.sequence for o in outcomes if isinstance(o, PublishReceipt)]
        assert sequences[0] < sequences[2]  # stored in the order sent
    finally:
        await log.close()


async def test_a_full_log_refuses_the_overflow_and_stores_the_rest(nats_url: str) -> None:
    small = replace(settings(nats_url), max_bytes=4096)  # room for some of the messages only
    log = await JetStreamEventLog.connect(small)
    try:
        big = [OutgoingMessage(key="thing", message_id=f"big-{i}", payload=b"x" * 1000) for i in range(8)]
        outcomes = await (await log.publish_batch(big))
        kinds = [type(o) for o in outcomes]
        assert PublishReceipt in kinds and EventLogFull in kinds
        assert kinds == sorted(kinds, key=lambda k: k is EventLogFull)  # stored first, then refused
    finally:
        await log.close()


async def test_with_the_server_gone_a_batch_is_unavailable_within_the_timeout(tmp_path: Path) -> None:
    port = devstack.free_port()
    server = devstack.start_nats(port, tmp_path / "nats")
    log = await JetStreamEventLog.connect(
        replace(settings(f"nats://127.0.0.1:{port}"), publish_timeout_s=0.3)
    )
    try:
        await log.publish(message(0))
        devstack.stop_process(server)
        outcomes = await asyncio.wait_for(await log.publish_batch([message(1), message(2)]), timeout=5)
        assert [type(o) for o in outcomes] == [EventLogUnavailable, EventLogUnavailable]
    finally:
        await log.close()
        devstack.stop_process(server)
