"""The in-memory delivery log, and a destination's health as attempts are recorded."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from sendtime.triggers.v1 import triggers_pb2
from triggers.delivery_log import AttemptRecord, DeliveryLog, DestinationHealth, MemoryDeliveryLog
from triggers.retry_schedule import FailureReason

T0 = datetime(2026, 12, 5, 8, 0, tzinfo=UTC)
MS = timedelta(milliseconds=1)


def attempt(minutes: int, status: int, error: str = "") -> AttemptRecord:
    return AttemptRecord(T0 + timedelta(minutes=minutes), 40 * MS, status, error)


def test_health_keeps_the_last_success_and_the_start_of_the_failures_since() -> None:
    health = DestinationHealth()
    health = health.after(attempt(0, 503))
    assert health == DestinationHealth(None, T0)
    health = health.after(attempt(5, 0, "connection refused"))
    assert health == DestinationHealth(None, T0)  # the failures began at the first
    health = health.after(attempt(10, 204))
    assert health == DestinationHealth(T0 + timedelta(minutes=10), None)
    health = health.after(attempt(15, 410))
    assert health == DestinationHealth(T0 + timedelta(minutes=10), T0 + timedelta(minutes=15))


def test_an_attempt_as_in_the_contract() -> None:
    proto = attempt(0, 0, "no answer within 10 s").to_proto()
    assert proto.start_time.ToDatetime(UTC) == T0
    assert proto.latency.ToTimedelta() == 40 * MS
    assert (proto.http_status, proto.error) == (0, "no answer within 10 s")


async def test_the_memory_log_records_attempts_and_outcomes() -> None:
    memory = MemoryDeliveryLog()
    log: DeliveryLog = memory  # what the dispatcher sees
    assert memory.state("deliveries/1") == triggers_pb2.DELIVERY_STATE_PENDING

    assert await log.record_attempt("deliveries/1", "destinations/d1", attempt(0, 503)) == DestinationHealth(
        None, T0
    )
    await log.schedule_next("deliveries/1", T0 + timedelta(seconds=5))
    assert memory.next_attempt_time("deliveries/1") == T0 + timedelta(seconds=5)
    await log.record_attempt("deliveries/1", "destinations/d1", attempt(1, 200))
    await log.mark_delivered("deliveries/1")
    assert memory.state("deliveries/1") == triggers_pb2.DELIVERY_STATE_DELIVERED
    assert memory.next_attempt_time("deliveries/1") is None
    assert [a.http_status for a in memory.attempts("deliveries/1")] == [503, 200]

    await log.record_attempt("deliveries/2", "destinations/d1", attempt(2, 410))
    await log.mark_failed("deliveries/2", FailureReason.GONE)
    assert memory.state("deliveries/2") == triggers_pb2.DELIVERY_STATE_FAILED
    assert memory.failure("deliveries/2") == FailureReason.GONE

    with pytest.raises(KeyError):
        await log.mark_delivered("deliveries/never-attempted")


async def test_enabling_a_destination_again_forgets_its_failures() -> None:
    log = MemoryDeliveryLog()
    await log.record_attempt("deliveries/1", "destinations/d1", attempt(0, 204))
    await log.record_attempt("deliveries/2", "destinations/d1", attempt(5, 503))
    await log.disable_destination("destinations/d1", "every attempt failed for 5 days since the last success")
    assert log.disabled_reason("destinations/d1") is not None

    log.enable_destination("destinations/d1")
    assert log.disabled_reason("destinations/d1") is None
    assert log.health("destinations/d1") == DestinationHealth(T0, None)
