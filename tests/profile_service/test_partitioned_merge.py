"""A partitioned merge (issue 21) on real NATS, PostgreSQL and profile processes: the event stream
in four partitions, ingest routing each customer's events to one, profile replicas sharing the
lanes (profile_service.merge_lanes).

- Replicas join and leave under load, and one is killed with SIGKILL while the lanes move: every
  acknowledged event is merged exactly once (each customer's version and event rows equal the
  events sent), and the replica left holds every lane.
- Identity across partitions: a visitor's events (routed by the anonymous id) and the signed-in
  customer's (routed by the user id) are merged by two different replicas; an identify naming
  both stitches them into one customer, and later anonymous events still reach it.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

import devstack
from profile_service.merge_lanes import lane_holders, lanes_of
from profile_service.server import ProfileApp, create_app
from profile_service.settings import Settings as ProfileSettings
from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime_common.event_log import JetStreamEventLog, JetStreamSettings, partition_of
from tests.conftest import LOCAL_SERVER, channel, empty_database, eventually, user, wait_for_profile
from tests.factories import cart_item_added, event, identify
from tests.ingest.test_ingest_depth import ACCEPTED, ingest_service, send
from tests.render.test_profile_replicas import ProfileReplica

PARTITIONS = 4
CUSTOMERS = 40
EVENTS_EACH = 25
BATCH = 50


@pytest.fixture
def private_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A NATS of the test's own: its stream has partitions, the session's has none."""
    port = devstack.free_port()
    process = devstack.start_nats(port, tmp_path_factory.mktemp("partitioned-nats"))
    yield f"nats://127.0.0.1:{port}"
    devstack.stop_process(process)


@pytest.fixture
async def private_database() -> AsyncIterator[str]:
    async with empty_database("partitioned") as url:
        yield url


@dataclass
class Replicas:
    env: dict[str, str]
    logs: Path
    started: list[ProfileReplica]

    async def start(self) -> ProfileReplica:
        replica = ProfileReplica(self.env, self.logs / f"profile-{len(self.started)}.log")
        self.started.append(replica)
        await replica.wait_until_serving()
        return replica


@pytest.fixture
def replicas(
    private_nats: str, private_database: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replicas]:
    env = {
        "DATABASE_URL": private_database,
        "REDIS_URL": redis_url,
        "NATS_URL": private_nats,
        "NATS_EVENT_PARTITIONS": str(PARTITIONS),
        "SHUTDOWN_GRACE_SECONDS": "1",
    }
    started = Replicas(env, tmp_path_factory.mktemp("partitioned"), [])
    try:
        yield started
    finally:
        for replica in started.started:
            if replica.process.poll() is None:
                replica.process.kill()
            replica.process.wait(10)


async def merged_per_customer(admin: asyncpg.Connection) -> list[tuple[int, int]]:
    """(version, event rows) of every customer in the database."""
    rows = await admin.fetch(
        "SELECT c.version, (SELECT count(*) FROM events e WHERE e.customer_id = c.customer_id) AS events"
        " FROM customers c"
    )
    return [(r["version"], r["events"]) for r in rows]


@pytest.mark.timeout(180)
async def test_a_replica_killed_while_the_lanes_move_loses_and_doubles_no_event(
    replicas: Replicas, private_nats: str, private_database: str, redis_url: str, unique: str
) -> None:
    first = await replicas.start()
    admin = await asyncpg.connect(private_database)
    try:

        async def all_lanes_held() -> dict[int, int] | None:
            # The replica takes its lanes' locks one by one: a first look may see only some.
            held = await lane_holders(admin)
            return held if sum(held.values()) == len(lanes_of(PARTITIONS)) else None

        holders = await eventually(all_lanes_held)
        (first_pid,) = holders.keys()  # one replica holds every lane

        events = [
            event(
                event_id=f"p-{unique}-{c}-{n}",
                user_id=f"u-{unique}-{c}",
                cart_item_added=cart_item_added(f"s-{n}"),
            )
            for n in range(EVENTS_EACH)
            for c in range(CUSTOMERS)
        ]
        batches = [events[i : i + BATCH] for i in range(0, len(events), BATCH)]
        settings = JetStreamSettings(url=private_nats, event_partitions=PARTITIONS)
        async with ingest_service(database_url=private_database, redis_url=redis_url, event_log=settings) as (
            ingest,
            stub,
        ):
            assert isinstance(ingest.event_log, JetStreamEventLog)
            assert ingest.event_log.event_partitions == PARTITIONS  # read from the stream

            async def load() -> None:
                for batch in batches:
                    results = await send(stub, *batch)
                    assert [r.outcome for r in results] == [ACCEPTED] * len(batch), results
                    await asyncio.sleep(0.15)

            loading = asyncio.create_task(load())
            await asyncio.sleep(1.0)
            second = await replicas.start()

            async def lanes_moving() -> bool | None:
                held = await lane_holders(admin)
                return len(held) >= 2 or None  # the second took a lane; the first still holds some

            await eventually(lanes_moving, timeout_s=30)
            os.kill(first.process.pid, signal.SIGKILL)
            assert first.process.wait(10) == -signal.SIGKILL
            third = await replicas.start()
            await loading

        async def all_merged() -> list[tuple[int, int]] | None:
            per_customer = await merged_per_customer(admin)
            done = len(per_customer) == CUSTOMERS and all(e == EVENTS_EACH for _, e in per_customer)
            return per_customer if done else None

        per_customer = await eventually(all_merged, timeout_s=60)
        # Each customer's version counts the merges that changed it: one per event, none twice.
        assert per_customer == [(EVENTS_EACH, EVENTS_EACH)] * CUSTOMERS

        async def shared_by_the_two_left() -> dict[int, int] | None:
            held = await lane_holders(admin)
            return held if first_pid not in held and sorted(held.values()) == [2, 3] else None

        await eventually(shared_by_the_two_left, timeout_s=30)
        assert second.process.poll() is None and third.process.poll() is None
    finally:
        await admin.close()


def split_keys(unique: str, first_lanes: frozenset[int], second_lanes: frozenset[int]) -> tuple[str, str]:
    """An anonymous id routed to a partition of the first replica and a user id routed to one of
    the second's."""
    anonymous = next(
        f"a-{unique}-{i}"
        for i in range(1000)
        if partition_of(f"anonymous_id:a-{unique}-{i}", PARTITIONS) in first_lanes
    )
    user_id = next(
        f"u-{unique}-{i}"
        for i in range(1000)
        if partition_of(f"user_id:u-{unique}-{i}", PARTITIONS) in second_lanes
    )
    return anonymous, user_id


@pytest.fixture
async def two_replicas_in_process(
    private_nats: str, database_url: str, redis_url: str
) -> AsyncIterator[tuple[ProfileApp, ProfileApp]]:
    settings = ProfileSettings(
        **LOCAL_SERVER,
        database_url=database_url,
        redis_url=redis_url,
        event_log=JetStreamSettings(url=private_nats, event_partitions=PARTITIONS),
    )
    apps = [await create_app(settings), await create_app(settings)]
    for app in apps:
        await app.start()
    try:
        yield apps[0], apps[1]
    finally:
        for app in apps:
            await app.stop(grace_s=1)


async def test_identity_is_stitched_across_partitions_merged_by_two_replicas(
    two_replicas_in_process: tuple[ProfileApp, ProfileApp],
    private_nats: str,
    database_url: str,
    redis_url: str,
    admin_key: str,
    unique: str,
) -> None:
    first, second = two_replicas_in_process

    async def split() -> bool | None:
        owned = first.lanes.owned | second.lanes.owned
        both = bool(first.lanes.owned and second.lanes.owned)
        return (owned == frozenset(lanes_of(PARTITIONS)) and both) or None

    await eventually(split, timeout_s=20)
    anonymous_id, user_id = split_keys(unique, first.lanes.owned, second.lanes.owned)
    settings = JetStreamSettings(url=private_nats, event_partitions=PARTITIONS)
    async with (
        ingest_service(database_url=database_url, redis_url=redis_url, event_log=settings) as (_, stub),
        channel(f"127.0.0.1:{first.grpc.port}", admin_key) as calls,
    ):
        profiles = profile_pb2_grpc.ProfileServiceStub(calls)
        anonymous = profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_ANONYMOUS_ID, value=anonymous_id)
        browsing = [
            event(anonymous_id=anonymous_id, cart_item_added=cart_item_added(f"a-{n}")) for n in range(3)
        ]
        signed_in = [event(user_id=user_id, cart_item_added=cart_item_added(f"u-{n}")) for n in range(3)]
        await send_accepted(stub, *browsing, *signed_in)
        visitor = await wait_for_profile(profiles, anonymous, lambda p: len(p.cart.items) == 3)
        customer = await wait_for_profile(profiles, user(user_id), lambda p: len(p.cart.items) == 3)
        assert visitor.customer_id != customer.customer_id  # two people, as far as anyone knows yet

        # The sign-in names both; it goes to the user id's partition, the second replica's.
        await send_accepted(
            stub, event(user_id=user_id, anonymous_id=anonymous_id, identify=identify(first_name="Ada"))
        )
        stitched = await wait_for_profile(
            profiles, anonymous, lambda p: "first_name" in p.traits and p.traits["first_name"] == "Ada"
        )
        # Browsing after the sign-in, still routed by the anonymous id to the first replica.
        await send_accepted(stub, event(anonymous_id=anonymous_id, cart_item_added=cart_item_added("a-late")))
        final = await wait_for_profile(profiles, user(user_id), lambda p: len(p.cart.items) == 7)
        assert final.customer_id == stitched.customer_id
        by_anonymous = await wait_for_profile(profiles, anonymous, lambda p: len(p.cart.items) == 7)
        assert by_anonymous.customer_id == final.customer_id
        assert {item.sku for item in final.cart.items} == {"a-0", "a-1", "a-2", "u-0", "u-1", "u-2", "a-late"}


async def send_accepted(stub: ingest_pb2_grpc.IngestServiceAsyncStub, *events: ingest_pb2.Event) -> None:
    results = await send(stub, *events)
    assert [r.outcome for r in results] == [ACCEPTED] * len(events), results
