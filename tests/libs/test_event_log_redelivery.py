"""Redelivery after a crashed consumer within about the ack wait, and none of deliveries a live
consumer still holds (in-progress acks), on a real, pinned nats-server (issue 19)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy

from sendtime_common.config import ConfigError
from sendtime_common.event_log import Delivery, JetStreamEventLog, JetStreamSettings
from tests.conftest import repo_root
from tests.libs.test_event_log import message, settings

_HOLDING_CONSUMER = textwrap.dedent(
    """
    import asyncio, sys
    from sendtime_common.event_log import Delivery, JetStreamEventLog, JetStreamSettings

    async def main(url: str, stream: str, prefix: str, ack_wait_s: str) -> None:
        config = JetStreamSettings(
            url=url, stream=stream, subject_prefix=prefix, ack_wait_s=float(ack_wait_s),
            manage_streams=False,
        )
        log = await JetStreamEventLog.connect(config)
        subscription = await log.subscribe("merger")
        held = []
        while len(held) < 100:
            held.extend(await subscription.fetch(100 - len(held), timeout_s=2))
        print(f"holding {len(held)}", flush=True)
        await asyncio.sleep(3600)  # merging, as far as anyone can tell: in-progress acks go out

    asyncio.run(main(*sys.argv[1:]))
    """
)


async def _consumer_info(url: str, stream: str, durable: str) -> ConsumerInfo:
    client = await nats.connect(url)
    try:
        info: ConsumerInfo = await client.jetstream().consumer_info(stream, durable)
        return info
    finally:
        await client.close()


async def test_a_killed_consumer_s_batch_comes_back_to_another_within_the_ack_wait(nats_url: str) -> None:
    """kill -9 of a consumer holding a fetched batch (and sending in-progress acks for it):
    another replica fetching all along gets nothing while the holder lives, past the ack wait,
    then the whole batch within the ack wait and a margin of the kill, not the 30 s the
    consumers waited before."""
    config = replace(settings(nats_url), ack_wait_s=2.0)
    log = await JetStreamEventLog.connect(config)
    paths = (repo_root() / "gen/python", repo_root() / "libs")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in paths)}
    try:
        await (await log.publish_batch([message(i) for i in range(100)]))
        subscription = await log.subscribe("merger")
        await subscription.close()  # the durable exists before the holder starts, as in a deployment
        process = subprocess.Popen(
            [sys.executable, "-c", _HOLDING_CONSUMER, nats_url, config.stream, config.subject_prefix, "2"],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        try:
            assert process.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), timeout=30)
            assert line.strip() == "holding 100"
            subscription = await log.subscribe("merger")
            held_since = time.monotonic()
            while time.monotonic() - held_since < 2.5:  # past the ack wait: held, so not redelivered
                assert await subscription.fetch(100, timeout_s=0.25) == []
            os.kill(process.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            process.wait(timeout=10)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()

        again: list[tuple[bytes, int]] = []
        while len(again) < 100 and time.monotonic() - killed_at < 30:
            for delivery in await subscription.fetch(100, timeout_s=0.2):
                again.append((delivery.payload, delivery.attempt))
                await delivery.ack()
        redelivered_after_s = time.monotonic() - killed_at
        print(f"redelivered after {redelivered_after_s:.2f} s (ack wait 2 s)")
        # Held 2.5 s past the fetch, yet delivered only once before: in-progress is no delivery.
        assert sorted(again) == sorted((b"payload-%d" % i, 2) for i in range(100))
        # The server's ack wait is the setting, and the batch came back after about that: the
        # margin (5 s) is for a loaded machine's fetches and acks, and still far from the 30 s
        # (nats-py's default ack wait) the consumers waited before.
        assert (await _consumer_info(nats_url, config.stream, "merger")).config.ack_wait == config.ack_wait_s
        assert redelivered_after_s < config.ack_wait_s + 5
        await subscription.close()
    finally:
        await log.close()


async def test_a_slow_consumer_holding_deliveries_for_three_ack_waits_loses_none_to_another(
    nats_url: str,
) -> None:
    # 2 s: in-progress acks go every 0.5 s, so a held delivery is only lost to a loop stalled
    # for over a second, not to a loaded machine's usual lag.
    config = replace(settings(nats_url), ack_wait_s=2.0)
    slow_log = await JetStreamEventLog.connect(config)
    other_log = await JetStreamEventLog.connect(replace(config, manage_streams=False))
    try:
        await (await slow_log.publish_batch([message(i) for i in range(20)]))
        slow = await slow_log.subscribe("merger")
        held = await slow.fetch(20, timeout_s=2)
        assert len(held) == 20
        other = await other_log.subscribe("merger")
        started = time.monotonic()
        taken_by_other: list[Delivery] = []
        while time.monotonic() - started < 3 * config.ack_wait_s:  # three ack waits
            taken_by_other.extend(await other.fetch(20, timeout_s=0.25))
        assert taken_by_other == []
        for delivery in held:
            assert delivery.attempt == 1
            await delivery.ack()
        info = await _consumer_info(nats_url, config.stream, "merger")
        assert (info.num_redelivered, info.num_ack_pending, info.num_pending) == (0, 0, 0)
        await slow.close()
        await other.close()
    finally:
        await other_log.close()
        await slow_log.close()


async def test_a_durable_consumer_made_with_another_ack_wait_takes_the_setting(nats_url: str) -> None:
    """A consumer made before (30 s) is updated on subscribing, not left as nats-py finds it."""
    before = replace(settings(nats_url), ack_wait_s=30.0)
    log = await JetStreamEventLog.connect(before)
    try:
        await (await log.subscribe("merger")).close()
        assert (await _consumer_info(nats_url, before.stream, "merger")).config.ack_wait == 30.0
    finally:
        await log.close()
    log = await JetStreamEventLog.connect(replace(before, ack_wait_s=2.5))
    try:
        subscription = await log.subscribe("merger")
        assert (await _consumer_info(nats_url, before.stream, "merger")).config.ack_wait == 2.5
        await log.publish(message(1))
        (delivery,) = await subscription.fetch(1, timeout_s=2)  # still the same durable consumer
        await delivery.ack()
        await subscription.close()
    finally:
        await log.close()


async def test_a_consumer_the_server_will_not_update_is_consumed_as_it_is_and_said_so(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = replace(settings(nats_url), ack_wait_s=2.0)
    log = await JetStreamEventLog.connect(config)
    client = await nats.connect(nats_url)
    try:
        made_by_hand = ConsumerConfig(
            name="merger",
            durable_name="merger",
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.NEW,  # a policy an update cannot change
            ack_wait=30.0,
            filter_subject=f"{config.subject_prefix}.>",
        )
        await client.jetstream().add_consumer(config.stream, made_by_hand)
        subscription = await log.subscribe("merger")
        assert "could not update a durable consumer's settings" in caplog.messages
        assert (await _consumer_info(nats_url, config.stream, "merger")).config.ack_wait == 30.0
        await log.publish(message(1))
        (delivery,) = await subscription.fetch(1, timeout_s=2)
        await delivery.ack()
        await subscription.close()
    finally:
        await client.close()
        await log.close()


def test_the_ack_wait_is_a_setting_of_a_few_seconds() -> None:
    assert JetStreamSettings.from_env({}).ack_wait_s == 5.0
    assert JetStreamSettings.from_env({"NATS_ACK_WAIT_SECONDS": "2.5"}).ack_wait_s == 2.5
    for bad, says in [
        ("0.5", "at least 1"),
        ("soon", "must be a number"),
        ("inf", "at most 600"),
        ("nan", "at most 600"),
        ("3600", "at most 600"),
    ]:
        with pytest.raises(ConfigError, match=says):
            JetStreamSettings.from_env({"NATS_ACK_WAIT_SECONDS": bad})
