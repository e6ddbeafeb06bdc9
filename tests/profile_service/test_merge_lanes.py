"""Lanes of the event stream shared among profile replicas (profile_service.merge_lanes): the
split is a function of the membership, and on a real PostgreSQL each lane is merged by one
replica at a time, moves when a replica joins or leaves, and survives a lost lock connection."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import asyncpg
import pytest

from profile_service.merge_lanes import Connect, MergeLanes, Subscribe, lane_holders, lanes_of, share
from profile_service.merger import EventMerger
from profile_service.server import lanes_connection
from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.event_log import (
    UNPARTITIONED,
    EventLogSubscription,
    EventLogUnavailable,
    partition_consumer,
    partition_of,
)
from sendtime_common.identifiers import routing_key
from tests.conftest import eventually

FAST_ROUNDS_S = 0.05


def test_one_partition_is_one_lane_and_more_add_the_unpartitioned_one() -> None:
    assert lanes_of(1) == [UNPARTITIONED]
    assert lanes_of(4) == [UNPARTITIONED, 0, 1, 2, 3]
    assert partition_consumer("profile-merger", UNPARTITIONED) == "profile-merger"
    assert partition_consumer("profile-merger", 3) == "profile-merger-3"


@pytest.mark.parametrize("members", [[7], [7, 3], [9, 2, 5], [1, 2, 3, 4, 5, 6, 7, 8]])
def test_every_lane_has_exactly_one_owner_whoever_computes_it(members: list[int]) -> None:
    lanes = lanes_of(8)
    shares = {m: share(lanes, list(reversed(members)), m) for m in members}
    owners = Counter(lane for mine in shares.values() for lane in mine)
    assert set(owners) == set(lanes)
    assert set(owners.values()) == {1}
    sizes = sorted(len(mine) for mine in shares.values())
    assert sizes[-1] - sizes[0] <= 1  # dealt evenly


def test_a_member_not_yet_listed_still_gets_its_share() -> None:
    assert share(lanes_of(2), [], 5) == frozenset(lanes_of(2))
    assert share(lanes_of(2), [9], 5) == frozenset({UNPARTITIONED, 1})


def test_partition_of_is_stable_and_spreads_keys_evenly() -> None:
    # CRC-32 (not Python's salted hash): the same in every process and release.
    assert partition_of("user_id:u-1", 8) == 2  # pinned: a new hash would reroute live customers
    assert partition_of("email:ada@example.com", 8) == partition_of("email:ada@example.com", 8)
    counts = Counter(partition_of(f"user_id:u-{i}", 8) for i in range(8000))
    assert set(counts) == set(range(8))
    assert min(counts.values()) > 850  # 1,000 each if perfectly even


def test_routing_key_is_the_most_lasting_identifier_in_canonical_form() -> None:
    customer = ingest_pb2.CustomerIdentifiers(anonymous_id="a-1", email="  Ada@Example.COM ")
    assert routing_key(customer) == "email:ada@example.com"
    customer.user_id = "u-1"
    assert routing_key(customer) == "user_id:u-1"
    assert routing_key(ingest_pb2.CustomerIdentifiers(device_id="d-1")) == "device_id:d-1"


# --- on PostgreSQL ------------------------------------------------------------------------------


@dataclass
class Held:
    """When a replica merged a lane: from start to let go."""

    replica: str
    lane: int
    started: float
    ended: float | None = None


@dataclass
class RecordingMerger:
    """Stands in for EventMerger: merges nothing, records when each lane was held."""

    replica: str
    held: list[Held]
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    async def merge_from(self, subscriptions: Sequence[EventLogSubscription], until: asyncio.Event) -> None:
        lane = cast(int, subscriptions[0])
        record = Held(self.replica, lane, time.monotonic())
        self.held.append(record)
        try:
            while not (until.is_set() or self.stopped.is_set()):
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.02)  # the batch in hand
        finally:
            record.ended = time.monotonic()

    def stop(self) -> None:
        self.stopped.set()

    @property
    def stopping(self) -> bool:
        return self.stopped.is_set()

    async def wait_stopping(self) -> None:
        await self.stopped.wait()


def never_two_at_once(held: list[Held]) -> None:
    for lane in lanes_of(4):
        spans = sorted((h for h in held if h.lane == lane), key=lambda h: h.started)
        for earlier, later in zip(spans, spans[1:], strict=False):
            assert earlier.ended is not None and earlier.ended <= later.started, (lane, earlier, later)


async def the_lane(lane: int) -> EventLogSubscription:
    """A lane's "subscriptions": the lane itself, which the recording merger notes."""
    return cast(EventLogSubscription, lane)


def connecting(database_url: str, opened: list[asyncpg.Connection] | None = None) -> Connect:
    """Opens the lanes' connection (into ``opened``, where given)."""

    async def connect(application_name: str) -> asyncpg.Connection:
        connection = await asyncpg.connect(
            database_url, server_settings={"application_name": application_name}
        )
        if opened is not None:
            opened.append(connection)
        return connection

    return connect


def replica(
    name: str, group: str, held: list[Held], connect: Connect, lanes: int = 4, subscribe: Subscribe = the_lane
) -> MergeLanes:
    """A replica's lanes of a stream of ``lanes`` partitions, with a merger recording into ``held``."""
    merger = cast(EventMerger, RecordingMerger(name, held))
    return MergeLanes(merger, group, lanes_of(lanes), subscribe, connect, rebalance_every_s=FAST_ROUNDS_S)


async def owning(lanes: MergeLanes, expected: Sequence[int]) -> None:
    await eventually(lambda: asyncio.sleep(0, lanes.owned == frozenset(expected) or None))


async def test_a_joining_replica_takes_its_share_and_a_leaving_one_gives_all_back(
    database_url: str, unique: str
) -> None:
    held: list[Held] = []
    connect = connecting(database_url)
    first = replica("first", f"lanes-{unique}", held, connect)
    first_task = asyncio.create_task(first.run())
    await owning(first, lanes_of(4))

    # Another deployment on the same database (another consumer name) shares nothing with it.
    other = replica("other", f"other-{unique}", [], connect)
    other_task = asyncio.create_task(other.run())
    second = replica("second", f"lanes-{unique}", held, connect)
    second_task = asyncio.create_task(second.run())
    try:
        # Five lanes dealt to two: whichever has the lower member id gets three.
        await eventually(lambda: asyncio.sleep(0, {len(first.owned), len(second.owned)} == {2, 3} or None))
        assert first.owned | second.owned == frozenset(lanes_of(4))
        await owning(other, lanes_of(4))

        first.stop()
        await first_task
        await owning(second, lanes_of(4))
    finally:
        for lanes in (first, second, other):
            lanes.stop()
        await asyncio.gather(first_task, second_task, other_task, return_exceptions=True)
    never_two_at_once(held)
    moved = {h.lane for h in held if h.replica == "second"}
    assert moved == set(lanes_of(4))


async def test_a_lost_lock_connection_keeps_the_lanes_merging_and_takes_the_locks_again(
    database_url: str, unique: str
) -> None:
    held: list[Held] = []
    connections: list[asyncpg.Connection] = []
    lanes = replica("only", f"lanes-{unique}", held, connecting(database_url, connections), lanes=2)
    task = asyncio.create_task(lanes.run())
    try:
        await owning(lanes, lanes_of(2))
        admin = await asyncpg.connect(database_url)
        try:
            pid = connections[0].get_server_pid()
            await admin.execute("SELECT pg_terminate_backend($1)", pid)

            async def locks_taken_again() -> bool | None:
                if len(connections) < 2:
                    return None
                taken = (await lane_holders(admin)).get(connections[1].get_server_pid())
                return taken == len(lanes_of(2)) or None

            await eventually(locks_taken_again)
        finally:
            await admin.close()
        assert len(held) == 3 and all(h.ended is None for h in held)  # never stopped merging
    finally:
        lanes.stop()
        await task


async def test_a_lane_whose_subscription_fails_is_unlocked_and_taken_at_a_later_round(
    database_url: str, unique: str
) -> None:
    held: list[Held] = []
    failures = [2]  # the event log refuses the first two subscriptions (NATS away, say)

    async def subscribe(lane: int) -> EventLogSubscription:
        if failures[0]:
            failures[0] -= 1
            raise EventLogUnavailable("JetStream did not answer")
        return await the_lane(lane)

    lanes = replica("only", f"lanes-{unique}", held, connecting(database_url), lanes=2, subscribe=subscribe)
    task = asyncio.create_task(lanes.run())
    try:
        await owning(lanes, lanes_of(2))
        assert not task.done()  # the failed rounds did not end it
    finally:
        lanes.stop()
        await task
    assert failures == [0] and sorted(h.lane for h in held) == sorted(lanes_of(2))


async def test_the_lock_connection_has_tcp_keepalives_so_a_cut_off_replica_loses_its_lanes(
    database_url: str,
) -> None:
    connection = await lanes_connection(database_url, "sendtime-merge-lanes:test")
    try:
        settings = {
            name: await connection.fetchval(f"SHOW {name}")
            for name in (
                "application_name",
                "tcp_keepalives_idle",
                "tcp_keepalives_interval",
                "tcp_keepalives_count",
            )
        }
    finally:
        await connection.close()
    assert settings == {
        "application_name": "sendtime-merge-lanes:test",
        "tcp_keepalives_idle": "10",
        "tcp_keepalives_interval": "5",
        "tcp_keepalives_count": "3",
    }
