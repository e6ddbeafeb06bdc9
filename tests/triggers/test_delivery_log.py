"""The delivery log, as the dispatcher writes it, in memory and in PostgreSQL (the same tests
for both), and a destination's health as attempts are recorded."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

import pytest

from sendtime.triggers.v1 import triggers_pb2
from tests.triggers.store_support import Stores, insert_delivery, webhook
from triggers.delivery_log import AttemptRecord, DeliveryLog, DestinationHealth, MemoryDeliveryLog
from triggers.retry_schedule import FailureReason
from triggers.signing import SigningKeys, new_signing_secret

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


# ---- the DeliveryLog Protocol, in memory and in PostgreSQL ---------------------------------------


class LogUnderTest(Protocol):
    """A DeliveryLog and what a test reads back from it."""

    @property
    def log(self) -> DeliveryLog: ...

    async def new_delivery(self, destination: str) -> str: ...
    async def state(self, delivery: str) -> triggers_pb2.DeliveryState.ValueType: ...
    async def attempts(self, delivery: str) -> list[AttemptRecord]: ...
    async def next_attempt_time(self, delivery: str) -> datetime | None: ...
    async def failure(self, delivery: str) -> FailureReason | None: ...
    async def disabled_reason(self, destination: str) -> str | None: ...
    async def health(self, destination: str) -> DestinationHealth: ...
    async def enable(self, destination: str) -> None: ...


@dataclass
class InMemory:
    log: MemoryDeliveryLog
    made: int = 0

    async def new_delivery(self, destination: str) -> str:
        self.made += 1
        return f"deliveries/{self.made}"

    async def state(self, delivery: str) -> triggers_pb2.DeliveryState.ValueType:
        return self.log.state(delivery)

    async def attempts(self, delivery: str) -> list[AttemptRecord]:
        return self.log.attempts(delivery)

    async def next_attempt_time(self, delivery: str) -> datetime | None:
        return self.log.next_attempt_time(delivery)

    async def failure(self, delivery: str) -> FailureReason | None:
        return self.log.failure(delivery)

    async def disabled_reason(self, destination: str) -> str | None:
        return self.log.disabled_reason(destination)

    async def health(self, destination: str) -> DestinationHealth:
        return self.log.health(destination)

    async def enable(self, destination: str) -> None:
        self.log.enable_destination(destination)


@dataclass
class InPostgres:
    stores: Stores

    @property
    def log(self) -> DeliveryLog:
        return self.stores.deliveries

    async def new_delivery(self, destination: str) -> str:
        destination_id = destination.removeprefix("destinations/")
        exists = await self.stores.pool.fetchval(
            "SELECT 1 FROM triggers_destinations WHERE id = $1", destination_id
        )
        if not exists:
            await self.stores.destinations.create(
                destination_id, webhook(), signing_keys=SigningKeys(new_signing_secret())
            )
        return await insert_delivery(self.stores.pool, destination)

    async def state(self, delivery: str) -> triggers_pb2.DeliveryState.ValueType:
        return (await self.stores.deliveries.get(_id(delivery))).state

    async def attempts(self, delivery: str) -> list[AttemptRecord]:
        return [
            AttemptRecord(a.start_time.ToDatetime(UTC), a.latency.ToTimedelta(), a.http_status, a.error)
            for a in (await self.stores.deliveries.get(_id(delivery))).attempts
        ]

    async def next_attempt_time(self, delivery: str) -> datetime | None:
        got = await self.stores.deliveries.get(_id(delivery))
        return got.next_attempt_time.ToDatetime(UTC) if got.HasField("next_attempt_time") else None

    async def failure(self, delivery: str) -> FailureReason | None:
        reason = await self.stores.pool.fetchval(
            "SELECT failure_reason FROM triggers_deliveries WHERE id = $1", _id(delivery)
        )
        return FailureReason(reason) if reason else None

    async def disabled_reason(self, destination: str) -> str | None:
        got = await self.stores.destinations.get(destination.removeprefix("destinations/"))
        return got.disabled_reason if got.state == triggers_pb2.DESTINATION_STATE_DISABLED else None

    async def health(self, destination: str) -> DestinationHealth:
        return await self.stores.destinations.health(destination.removeprefix("destinations/"))

    async def enable(self, destination: str) -> None:
        destination_id = destination.removeprefix("destinations/")
        stored = await self.stores.destinations.get(destination_id)
        stored.state = triggers_pb2.DESTINATION_STATE_ENABLED
        await self.stores.destinations.update(destination_id, stored, etag=stored.etag)


def _id(delivery: str) -> int:
    return int(delivery.removeprefix("deliveries/"))


@pytest.fixture(params=["memory", "postgres"])
def under_test(request: pytest.FixtureRequest) -> LogUnderTest:
    if request.param == "memory":
        return InMemory(MemoryDeliveryLog())
    stores: Stores = request.getfixturevalue("stores")
    return InPostgres(stores)


async def test_the_log_records_attempts_and_outcomes(under_test: LogUnderTest) -> None:
    log = under_test.log  # what the dispatcher sees
    first = await under_test.new_delivery("destinations/d1")
    assert await under_test.state(first) == triggers_pb2.DELIVERY_STATE_PENDING

    assert await log.record_attempt(first, "destinations/d1", attempt(0, 503)) == DestinationHealth(None, T0)
    await log.schedule_next(first, T0 + timedelta(seconds=5))
    assert await under_test.next_attempt_time(first) == T0 + timedelta(seconds=5)
    assert await under_test.state(first) == triggers_pb2.DELIVERY_STATE_PENDING
    health = await log.record_attempt(first, "destinations/d1", attempt(1, 200))
    assert health == DestinationHealth(T0 + timedelta(minutes=1), None)
    await log.mark_delivered(first)
    assert await under_test.state(first) == triggers_pb2.DELIVERY_STATE_DELIVERED
    assert await under_test.next_attempt_time(first) is None
    assert [a.http_status for a in await under_test.attempts(first)] == [503, 200]
    assert await under_test.attempts(first) == [attempt(0, 503), attempt(1, 200)]

    second = await under_test.new_delivery("destinations/d1")
    await log.record_attempt(second, "destinations/d1", attempt(2, 410))
    await log.mark_failed(second, FailureReason.GONE)
    assert await under_test.state(second) == triggers_pb2.DELIVERY_STATE_FAILED
    assert await under_test.failure(second) == FailureReason.GONE
    assert await under_test.next_attempt_time(second) is None
    assert await under_test.health("destinations/d1") == DestinationHealth(
        T0 + timedelta(minutes=1), T0 + timedelta(minutes=2)
    )


async def test_an_attempt_without_an_answer_keeps_its_error(under_test: LogUnderTest) -> None:
    delivery = await under_test.new_delivery("destinations/d1")
    failed = attempt(0, 0, "address refused: 10.0.0.1 is a private address")
    await under_test.log.record_attempt(delivery, "destinations/d1", failed)
    assert await under_test.attempts(delivery) == [failed]


async def test_each_destination_has_its_own_health(under_test: LogUnderTest) -> None:
    one = await under_test.new_delivery("destinations/d1")
    two = await under_test.new_delivery("destinations/d2")
    await under_test.log.record_attempt(one, "destinations/d1", attempt(0, 503))
    await under_test.log.record_attempt(two, "destinations/d2", attempt(1, 204))
    assert await under_test.health("destinations/d1") == DestinationHealth(None, T0)
    assert await under_test.health("destinations/d2") == DestinationHealth(T0 + timedelta(minutes=1), None)


async def test_enabling_a_destination_again_forgets_its_failures(under_test: LogUnderTest) -> None:
    log = under_test.log
    first = await under_test.new_delivery("destinations/d1")
    second = await under_test.new_delivery("destinations/d1")
    await log.record_attempt(first, "destinations/d1", attempt(0, 204))
    await log.record_attempt(second, "destinations/d1", attempt(5, 503))
    await log.disable_destination("destinations/d1", "every attempt failed for 5 days since the last success")
    assert await under_test.disabled_reason("destinations/d1") is not None
    assert await under_test.state(second) == triggers_pb2.DELIVERY_STATE_PENDING  # kept

    await under_test.enable("destinations/d1")
    assert await under_test.disabled_reason("destinations/d1") is None
    assert await under_test.health("destinations/d1") == DestinationHealth(T0, None)


async def test_the_memory_log_knows_only_deliveries_it_recorded() -> None:
    with pytest.raises(KeyError):
        await MemoryDeliveryLog().mark_delivered("deliveries/never-attempted")


async def test_attempts_recorded_at_once_make_the_health_their_order_makes(under_test: LogUnderTest) -> None:
    """Attempts recorded at the same moment (PostgreSQL: one statement for all): each is
    appended to its delivery, and each destination's health is what its attempts in order
    make of it; every caller is told its destination's health after them."""
    log = under_test.log
    d1 = [await under_test.new_delivery("destinations/d1") for _ in range(4)]
    d2 = [await under_test.new_delivery("destinations/d2") for _ in range(2)]
    made = [
        (d1[0], "destinations/d1", attempt(0, 503)),
        (d2[0], "destinations/d2", attempt(1, 503)),
        (d1[1], "destinations/d1", attempt(2, 204)),
        (d1[2], "destinations/d1", attempt(3, 0, "timed out")),
        (d2[1], "destinations/d2", attempt(4, 500)),
        (d1[3], "destinations/d1", attempt(5, 503)),
    ]
    told = await asyncio.gather(*(log.record_attempt(*one) for one in made))
    d1_after = DestinationHealth(T0 + timedelta(minutes=2), T0 + timedelta(minutes=3))
    d2_after = DestinationHealth(None, T0 + timedelta(minutes=1))
    assert await under_test.health("destinations/d1") == d1_after
    assert await under_test.health("destinations/d2") == d2_after
    assert told[-1] == d1_after and told[-2] == d2_after
    for delivery, _, recorded in made:
        assert await under_test.attempts(delivery) == [recorded]
