"""The JetStream event log on a real, pinned nats-server."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
import uuid
from dataclasses import replace
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import nats
import pytest
from fault_proxy import FaultProxy
from prometheus_client import REGISTRY

import devstack
from sendtime_common import event_log
from sendtime_common.config import ConfigError
from sendtime_common.consumer_lag import watch_backlog
from sendtime_common.event_log import (
    BATCH_COMMIT_HEADER,
    BATCH_ID_HEADER,
    BATCH_SEQUENCE_HEADER,
    MSG_ID_HEADER,
    ConsumerBacklog,
    EventLogFull,
    EventLogUnavailable,
    JetStreamEventLog,
    JetStreamSettings,
    OutgoingMessage,
    PublishOutcome,
    PublishReceipt,
    RetryLater,
)
from tests.conftest import eventually, times_logged


def settings(url: str) -> JetStreamSettings:
    unique = uuid.uuid4().hex[:8]
    return JetStreamSettings(
        url=url,
        stream=f"TEST_{unique}",
        subject_prefix=f"test.{unique}",
        profile_change_stream=f"TEST_CHANGES_{unique}",
        profile_change_subject_prefix=f"test-changes.{unique}",
    )


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


async def test_a_duplicate_s_receipt_points_at_the_first_copy_which_reads_back(nats_url: str) -> None:
    log = await JetStreamEventLog.connect(settings(nats_url))
    try:
        first = await log.publish(message(1))
        again = await log.publish(OutgoingMessage(key="thing", message_id="m-1", payload=b"other payload"))
        assert again.duplicate and again.sequence == first.sequence
        assert await log.read(again.sequence) == b"payload-1"  # what the log holds under the id
        await log.erase([first.sequence])
        assert await log.read(first.sequence) is None
        assert await log.read(first.sequence + 1000) is None
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


@pytest.mark.parametrize("batch_size", [1, 50], ids=["one by one", "atomic batches"])
async def test_acknowledged_messages_survive_a_killed_server(tmp_path: Path, batch_size: int) -> None:
    """sync_interval: always — what the server acked is on disk before the ack, kill -9 or not."""
    port = devstack.free_port()
    workdir = tmp_path / "nats"
    server = devstack.start_nats(port, workdir)
    config = settings(f"nats://127.0.0.1:{port}")
    log = await JetStreamEventLog.connect(config)
    try:
        for start in range(0, 200, batch_size):
            outcomes = await (await log.publish_batch([message(i) for i in range(start, start + batch_size)]))
            assert all(isinstance(o, PublishReceipt) for o in outcomes)
        server.send_signal(signal.SIGKILL)
        server.wait()
        server = devstack.start_nats(port, workdir)
        for _ in range(600):  # the client notices the crash and reconnects on its own
            if log.reconnects >= 1 and log.connected:
                break
            await asyncio.sleep(0.05)
        subscription = await log.subscribe("after-crash")
        seen: list[bytes] = []
        # Until all 200 are read, not until the first empty fetch: the restarted server may
        # answer one empty while it recovers; a lost message fails at the deadline.
        deadline = time.monotonic() + 30
        while len(seen) < 200 and time.monotonic() < deadline:
            for delivery in await subscription.fetch(100, timeout_s=2):
                seen.append(delivery.payload)
                await delivery.ack()
        assert seen == [b"payload-%d" % i for i in range(200)]
        assert await subscription.fetch(100, timeout_s=0.5) == []  # and nothing more
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


async def stored(url: str, stream: str, sequence: int) -> tuple[str, bytes, bool]:
    """The message id and payload at ``sequence``, and whether it came in an atomic batch."""
    client = await nats.connect(url)
    try:
        msg = await client.jetstream().get_msg(stream, sequence)
        headers = msg.headers or {}
        return headers[MSG_ID_HEADER], msg.data or b"", BATCH_ID_HEADER in headers
    finally:
        await client.close()


def published(count: int, *, atomically: bool) -> list[tuple[str, bytes, bool]]:
    """What ``stored`` finds for ``message(0)`` to ``message(count - 1)``."""
    return [(f"m-{i}", b"payload-%d" % i, atomically) for i in range(count)]


async def stored_receipts(
    url: str, stream: str, outcomes: list[PublishOutcome]
) -> list[tuple[str, bytes, bool]]:
    """What ``stored`` finds at each outcome's sequence; every outcome must be a fresh receipt."""
    found = []
    for outcome in outcomes:
        assert isinstance(outcome, PublishReceipt) and not outcome.duplicate, outcome
        found.append(await stored(url, stream, outcome.sequence))
    return found


async def test_a_batch_is_stored_as_one_atomic_batch_each_message_at_its_receipts_sequence(
    nats_url: str,
) -> None:
    config = settings(nats_url)
    log = await JetStreamEventLog.connect(config)
    try:
        outcomes = await (await log.publish_batch([message(i) for i in range(5)]))
        assert await stored_receipts(nats_url, config.stream, outcomes) == published(5, atomically=True)
        again = await log.publish(message(3))  # an id that came in a batch is in the duplicate window
        assert isinstance(outcomes[3], PublishReceipt)
        assert (again.duplicate, again.sequence) == (True, outcomes[3].sequence)
    finally:
        await log.close()


async def test_a_batch_beyond_the_servers_limit_goes_as_several_atomic_batches(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(event_log, "ATOMIC_BATCH_MAX", 3)
    config = settings(nats_url)
    log = await JetStreamEventLog.connect(config)
    try:
        outcomes = await (await log.publish_batch([message(i) for i in range(7)]))
        sequences = [o.sequence for o in outcomes if isinstance(o, PublishReceipt)]
        assert len(sequences) == 7
        assert [(await stored(nats_url, config.stream, seq))[0] for seq in sequences] == [
            f"m-{i}" for i in range(7)
        ]
    finally:
        await log.close()


async def test_with_atomic_batches_switched_off_a_batch_goes_message_by_message(nats_url: str) -> None:
    config = replace(settings(nats_url), atomic_batches=False)
    assert not JetStreamSettings.from_env({"NATS_ATOMIC_BATCHES": "false"}).atomic_batches
    log = await JetStreamEventLog.connect(config)
    try:
        outcomes = await (await log.publish_batch([message(i) for i in range(3)]))
        assert await stored_receipts(nats_url, config.stream, outcomes) == published(3, atomically=False)
    finally:
        await log.close()


async def test_a_stream_made_without_atomic_batches_is_updated_to_take_them(nats_url: str) -> None:
    config = settings(nats_url)
    await (await JetStreamEventLog.connect(replace(config, atomic_batches=False))).close()
    log = await JetStreamEventLog.connect(config)  # an upgraded ingest on the same stream
    try:
        outcomes = await (await log.publish_batch([message(i) for i in range(2)]))
        assert isinstance(outcomes[0], PublishReceipt)
        assert (await stored(nats_url, config.stream, outcomes[0].sequence))[2]  # in an atomic batch
    finally:
        await log.close()


async def test_with_the_servers_atomic_batches_all_in_use_a_batch_still_gets_stored_one_by_one(
    nats_url: str,
) -> None:
    """nats-server keeps at most 50 atomic batches open per stream (other ingest replicas'),
    and refuses one more at its commit; nothing of it is stored, so it goes event by event."""
    config = settings(nats_url)
    log = await JetStreamEventLog.connect(config)
    other = await nats.connect(nats_url)
    try:
        for n in range(50):  # begun and never committed (the server drops them after 10 s)
            await other.publish(
                f"{config.subject_prefix}.thing",
                b"open",
                headers={
                    BATCH_ID_HEADER: f"held-{n}",
                    "Nats-Batch-Sequence": "1",
                    MSG_ID_HEADER: f"held-{n}",
                },
            )
        await other.flush()

        # The stream takes the batches in a moment after the connection did (under load a batch
        # committed right away was stored atomically): wait until one more is refused, as ours
        # will be. A probe let through (the 50 not all taken in yet) is committed, holding none.
        async def one_more_refused() -> bool:
            probe = f"probe-{uuid.uuid4().hex}"
            headers = {BATCH_ID_HEADER: probe, BATCH_SEQUENCE_HEADER: "1", BATCH_COMMIT_HEADER: "1"}
            answer = await other.request(
                f"{config.subject_prefix}.thing",
                b"probe",
                headers={**headers, MSG_ID_HEADER: probe},
                timeout=5,
            )
            return "error" in json.loads(answer.data)

        await eventually(one_more_refused, timeout_s=5)
        outcomes = await (await log.publish_batch([message(i) for i in range(3)]))
        assert await stored_receipts(nats_url, config.stream, outcomes) == published(3, atomically=False)
    finally:
        await other.close()
        await log.close()


async def test_an_erasure_notice_resent_is_stored_once_and_with_the_server_gone_it_is_unavailable(
    tmp_path: Path,
) -> None:
    port = devstack.free_port()
    server = devstack.start_nats(port, tmp_path / "nats")
    url = f"nats://127.0.0.1:{port}"
    log = await JetStreamEventLog.connect(replace(JetStreamSettings(url=url), publish_timeout_s=0.3))
    client = await nats.connect(url)
    try:
        for _ in range(2):
            await log.publish_erasure("notice-1", b"erase eve")
        info = await client.jetstream().stream_info(JetStreamSettings().erasure_stream)
        assert info.state.messages == 1
        await client.close()
        devstack.stop_process(server)
        with pytest.raises(EventLogUnavailable):  # never taken as stored
            await asyncio.wait_for(log.publish_erasure("notice-2", b"erase bob"), timeout=5)
    finally:
        await client.close()
        await log.close()
        devstack.stop_process(server)


async def test_two_subscriptions_to_one_durable_consumer_fetch_side_by_side_each_message_once(
    nats_url: str,
) -> None:
    """What the merger's concurrent loops rely on: each has its own subscription."""
    log = await JetStreamEventLog.connect(settings(nats_url))
    try:
        await (await log.publish_batch([message(i) for i in range(20)]))
        first, second = await log.subscribe("shared"), await log.subscribe("shared")
        fetched = await asyncio.gather(first.fetch(10, timeout_s=5), second.fetch(10, timeout_s=5))
        assert [len(batch) for batch in fetched] == [10, 10]
        assert sorted(d.payload for batch in fetched for d in batch) == sorted(
            b"payload-%d" % i for i in range(20)
        )
        for batch in fetched:
            for delivery in batch:
                await delivery.ack()
        await first.close()
        await second.close()
    finally:
        await log.close()


async def test_profile_changes_are_stored_in_order_on_their_own_stream_and_read_by_a_durable_consumer(
    nats_url: str,
) -> None:
    config = settings(nats_url)
    log = await JetStreamEventLog.connect(config)
    try:
        outcomes = await log.publish_profile_changes([message(i) for i in range(5)])
        assert await stored_receipts(nats_url, config.profile_change_stream, outcomes) == published(
            5, atomically=True
        )
        again = await log.publish_profile_changes([message(3), message(5)])  # a resend, and a new one
        assert [(type(o), getattr(o, "duplicate", None)) for o in again] == [
            (PublishReceipt, True),
            (PublishReceipt, False),
        ]
        client = await nats.connect(nats_url)
        try:
            info = await client.jetstream().stream_info(config.profile_change_stream)
        finally:
            await client.close()
        assert info.config.subjects == [f"{config.profile_change_subject_prefix}.>"]
        assert info.config.max_age == config.profile_change_max_age_s == 24 * 3600
        assert info.state.messages == 6
        assert await log.read(1) is None  # none on the event stream

        subscription = await log.subscribe_profile_changes("triggers")
        seen: list[bytes] = []

        async def read_the_six() -> bool:  # until the six stored are in (a quiet fetch ended early)
            for delivery in await subscription.fetch(4, timeout_s=0.5):
                seen.append(delivery.payload)
                await delivery.ack()
            return len(seen) >= 6

        await eventually(read_the_six, timeout_s=10)
        await subscription.close()
        assert seen == [b"payload-%d" % i for i in range(6)]
        resumed = await log.subscribe_profile_changes("triggers")  # after the last acked one:
        await log.publish_profile_changes([message(6)])  # the next it reads is the next one stored
        # (a fetch that found nothing for a moment also passed while the server was merely slow)
        [following] = await resumed.fetch(1, timeout_s=5)
        assert following.payload == b"payload-6"
        await following.ack()
        await resumed.close()
    finally:
        await log.close()


async def test_profile_changes_go_in_atomic_batches_where_the_deployment_made_their_stream(
    nats_url: str,
) -> None:
    """In Kubernetes the setup Job makes the streams and profile only publishes to them."""
    config = settings(nats_url)
    await (await JetStreamEventLog.connect(config)).close()  # as `sendtime setup` does
    publisher = await JetStreamEventLog.connect(replace(config, manage_streams=False))
    try:
        outcomes = await publisher.publish_profile_changes([message(i) for i in range(3)])
        assert await stored_receipts(nats_url, config.profile_change_stream, outcomes) == published(
            3, atomically=True
        )
    finally:
        await publisher.close()


def test_the_profile_change_stream_s_limits_are_settings() -> None:
    env = {"NATS_PROFILE_CHANGES_MAX_AGE_SECONDS": "3600", "NATS_PROFILE_CHANGES_MAX_BYTES": "1048576"}
    config = JetStreamSettings.from_env(env)
    assert (config.profile_change_max_age_s, config.profile_change_max_bytes) == (3600, 1048576)
    assert JetStreamSettings.from_env({}).profile_change_max_age_s == 24 * 3600


async def test_a_service_that_does_not_manage_the_streams_waits_for_the_profile_change_stream_only_to_read_it(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sendtime_common.event_log")
    config = settings(nats_url)
    other = settings(nats_url)  # makes the events' and erasures' streams, and another for changes
    await (
        await JetStreamEventLog.connect(
            replace(
                config,
                profile_change_stream=other.profile_change_stream,
                profile_change_subject_prefix=other.profile_change_subject_prefix,
            )
        )
    ).close()
    # The events' and erasures' streams exist, the profile changes' not yet: connecting does not
    # wait for it (ingest and render never read it, and may not look at it).
    reader = await asyncio.wait_for(JetStreamEventLog.connect(replace(config, manage_streams=False)), 5)
    try:
        subscribing = asyncio.create_task(reader.subscribe_profile_changes("reader"))

        # It looked, found no stream, and waits (as it says; a fixed wait also passed while it
        # had not looked yet).
        async def waiting() -> bool:
            said = "waiting for the stream to be created"
            return times_logged(caplog, said, stream=config.profile_change_stream) >= 1

        await eventually(waiting, timeout_s=5)
        assert not subscribing.done()
        maker = await JetStreamEventLog.connect(config)  # the profile service makes it
        try:
            await maker.publish_profile_changes([message(1)])
        finally:
            await maker.close()
        subscription = await asyncio.wait_for(subscribing, 5)
        (delivery,) = await subscription.fetch(1, timeout_s=2)
        assert delivery.payload == b"payload-1"
        await delivery.ack()
        await subscription.close()
    finally:
        await reader.close()


async def test_a_consumers_backlog_is_read_and_reported_for_prometheus(nats_url: str) -> None:
    """Pending (stored, not delivered) and ack-pending (delivered, not acknowledged), as the
    watcher sets the gauges; and when each delivery was stored."""
    log = await JetStreamEventLog.connect(settings(nats_url))
    consumer = f"backlog-{uuid.uuid4().hex[:8]}"
    try:
        subscription = await log.subscribe(consumer)
        for i in range(3):
            await log.publish(message(i))

        async def backlog_is(expected: ConsumerBacklog) -> bool:
            return await log.backlog(consumer) == expected

        # The server counts a consumer's pending messages a moment after it stored them (under
        # load a read right after the publish acks said 2 of 3): poll until the count is exact.
        await eventually(partial(backlog_is, ConsumerBacklog(pending=3, ack_pending=0)), timeout_s=5)
        delivered = await subscription.fetch(2, timeout_s=2)
        stored_at = delivered[0].stored_at_s
        assert stored_at is not None and abs(stored_at - time.time()) < 60
        await eventually(partial(backlog_is, ConsumerBacklog(pending=1, ack_pending=2)), timeout_s=5)

        watching = asyncio.create_task(watch_backlog(consumer, partial(log.backlog, consumer), every_s=0.05))
        labels = {"consumer": consumer}

        def reported(name: str) -> float | None:
            return REGISTRY.get_sample_value(f"sendtime_consumer_{name}_messages", labels)

        async def ack_pending_reported(count: int) -> bool:
            return reported("ack_pending") == count

        await eventually(partial(ack_pending_reported, 2))
        for delivery in delivered:
            await delivery.ack()
        await eventually(partial(ack_pending_reported, 0))
        assert reported("pending") == 1
        watching.cancel()
        await subscription.close()
        with pytest.raises(EventLogUnavailable):
            await log.backlog("no-such-consumer")
    finally:
        await log.close()


async def test_usable_says_whether_jetstream_answers_for_the_stream_or_a_durable_consumer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the readiness checks ask (sendtime_common.readiness): never raises, false at once
    while the connection is down."""
    port = devstack.free_port()
    server = devstack.start_nats(port, tmp_path / "nats")
    log = await JetStreamEventLog.connect(settings(f"nats://127.0.0.1:{port}"))
    try:
        subscription = await log.subscribe("merger")
        assert await log.usable() and await log.usable("merger")
        assert await log.usable(profile_changes=True)
        assert not await log.usable("no-such-consumer")
        assert not await log.usable("merger", profile_changes=True)  # a consumer of the events only
        await subscription.close()
        await asyncio.to_thread(devstack.stop_process, server)

        async def down() -> bool:
            return not log.connected

        await eventually(down, timeout_s=30)
        # No request waits in a buffer: while disconnected, JetStream is not even asked.
        asked: list[str] = []

        async def asking(name: str) -> None:
            asked.append(name)
            raise nats.errors.TimeoutError

        monkeypatch.setattr(log._js, "stream_info", lambda *_, **__: asking("stream_info"))
        monkeypatch.setattr(log._js, "consumer_info", lambda *_, **__: asking("consumer_info"))
        assert not await log.usable() and not await log.usable("merger")
        assert asked == []
    finally:
        await log.close()
        devstack.stop_process(server)


async def test_partitions_are_kept_in_the_stream_read_by_publishers_and_route_each_key_to_one_lane(
    nats_url: str,
) -> None:
    managing = replace(settings(nats_url), event_partitions=3)
    log = await JetStreamEventLog.connect(managing)
    # A publisher that does not manage the streams learns the count from the stream's metadata.
    publisher = await JetStreamEventLog.connect(replace(managing, event_partitions=1, manage_streams=False))
    try:
        assert publisher.event_partitions == 3
        keys = [f"user_id:u-{i}" for i in range(12)]
        sent = [
            OutgoingMessage(key="thing", message_id=f"p-{i}", payload=key.encode(), partition_key=key)
            for i, key in enumerate(keys)
        ]
        sent.append(OutgoingMessage(key="thing", message_id="unkeyed", payload=b"", partition_key=""))
        assert all(isinstance(o, PublishReceipt) for o in await (await publisher.publish_batch(sent)))

        lanes = {}
        for lane in (event_log.UNPARTITIONED, 0, 1, 2):
            subscription = await log.subscribe(event_log.partition_consumer("lanes", lane), lane=lane)
            deliveries = await subscription.fetch(20, timeout_s=1)
            lanes[lane] = sorted(d.payload.decode() for d in deliveries)
            await subscription.close()
        assert lanes[event_log.UNPARTITIONED] == [""]  # no key: the unpartitioned lane
        for lane in (0, 1, 2):
            assert lanes[lane] == sorted(k for k in keys if event_log.partition_of(k, 3) == lane)
        assert sum(len(payloads) for payloads in lanes.values()) == len(sent)  # each in one lane

        # Fewer partitions than the stream has would leave a lane without a consumer: refused.
        with pytest.raises(ConfigError, match="never shrink"):
            await JetStreamEventLog.connect(replace(managing, event_partitions=2))
        grown = await JetStreamEventLog.connect(replace(managing, event_partitions=4))
        assert grown.event_partitions == 4
        await grown.close()
    finally:
        await publisher.close()
        await log.close()


def test_the_partition_count_is_a_setting_within_bounds() -> None:
    assert JetStreamSettings.from_env({}).event_partitions == 1
    assert JetStreamSettings.from_env({"NATS_EVENT_PARTITIONS": "8"}).event_partitions == 8
    for bad in ("0", "33", "many"):
        with pytest.raises(ConfigError):
            JetStreamSettings.from_env({"NATS_EVENT_PARTITIONS": bad})


async def test_a_short_publish_timeout_leaves_the_streams_and_consumers_their_own(
    nats_url: str, tmp_path: Path
) -> None:
    """Ingest, set to answer RETRY after 0.5 s, failed to start while a loaded NATS took longer
    than that to create its erasure consumer: the publish timeout was every API call's."""
    upstream = urlsplit(nats_url)
    with FaultProxy.start({"nats": (upstream.hostname or "", upstream.port or 0)}, tmp_path) as proxy:
        slow = replace(settings(f"nats://127.0.0.1:{proxy.port('nats')}"), publish_timeout_s=0.5)
        log = await JetStreamEventLog.connect(slow)
        try:
            proxy.latency("nats", 0.4)  # 0.8 s a round trip
            following = await log.follow_erasures(lambda notice: asyncio.sleep(0))
            await following.close()
        finally:
            await log.close()
