"""The merger writes a fetch of events as one batch (profile_service.merge_transaction): every
outcome must equal merging the same events one at a time, and one event the database refuses
must not hold back the rest of its batch: it is set aside with why."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import asyncpg
from google.rpc import status_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from profile_service.identity import IdentityLimits
from profile_service.merger import EventMerger
from profile_service.repository import MergeResult, ProfileRepository
from profile_service.server import ProfileApp
from profile_service.state import replay, to_json
from sendtime.ingest.v1 import ingest_pb2
from sendtime.profile.v1 import profile_pb2_grpc
from sendtime_common.errors import FieldViolation, field_violations
from sendtime_common.event_log import Delivery
from sendtime_common.identifiers import IdentifierKind
from sendtime_common.storable import NUL_DESCRIPTION
from tests.conftest import user, wait_for_profile
from tests.factories import NOW, cart_item_added, event, identify, product_viewed

# A small world, so that events link, merge and hit the identity limits often.
LIMITS = IdentityLimits.parse("user_id=1,email=2")


def _event(
    namespace: str, n: int, minute: int, who: Sequence[tuple[str, int]], payload: str, alias_to: str
) -> ingest_pb2.Event:
    fields: dict[str, Any] = {}
    for kind, number in who:
        fields[kind] = f"{namespace}-{kind}{number}" + ("@example.com" if kind == "email" else "")
    payloads: dict[str, dict[str, Any]] = {
        "identify": {"identify": identify(step=n)},
        "view": {"product_viewed": product_viewed(f"sku-{n % 3}")},
        "cart": {"cart_item_added": cart_item_added(f"sku-{n % 2}", 1 + n % 3)},
        "alias": {
            "alias": ingest_pb2.Alias(
                other=ingest_pb2.CustomerIdentifiers(anonymous_id=f"{namespace}-{alias_to}")
            )
        },
    }
    fields.update(payloads[payload])
    return event(event_id=f"{namespace}-e{n}", occurred_at=NOW + timedelta(minutes=minute), **fields)


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[tuple[Any, ...]], list[int]]:
    """Event specs (built per namespace), possibly repeated, and how the arrivals are cut into
    batches."""
    identifier = st.tuples(st.sampled_from(["user_id", "email", "anonymous_id"]), st.integers(0, 2))
    specs = []
    for n in range(draw(st.integers(1, 14))):
        who = draw(st.lists(identifier, min_size=1, max_size=3, unique_by=lambda x: x[0]))
        payload = draw(st.sampled_from(["identify", "view", "cart", "alias"]))
        specs.append(
            (n, draw(st.integers(0, 5)), tuple(who), payload, f"anonymous_id{draw(st.integers(0, 2))}")
        )
    arrivals = draw(st.lists(st.sampled_from(specs), max_size=4))  # redeliveries
    ordered = draw(st.permutations([*specs, *arrivals]))
    cuts = draw(st.lists(st.integers(1, 6), min_size=1, max_size=len(ordered)))
    return ordered, cuts


async def _profiles(pool: asyncpg.Pool, namespace: str) -> set[tuple[Any, ...]]:
    """Each customer of the namespace: its identifiers, version, state, and merge counts; not its
    id, which is random."""
    rows = await pool.fetch(
        "SELECT c.version, c.state, array_agg(i.kind || ':' || i.value ORDER BY i.kind, i.value) AS ids,"
        " (SELECT count(*) FROM merges m WHERE m.survivor_id = c.customer_id) AS merges,"
        " (SELECT count(*) FROM blocked_merges b WHERE b.customer_id = c.customer_id) AS blocked,"
        " (SELECT count(*) FROM events e WHERE e.customer_id = c.customer_id) AS events"
        " FROM customers c JOIN identifiers i USING (customer_id)"
        " WHERE c.customer_id IN (SELECT customer_id FROM identifiers WHERE value LIKE $1)"
        " GROUP BY c.customer_id",
        f"{namespace}-%",
    )
    return {
        (r["version"], str(r["state"]), tuple(r["ids"]), r["merges"], r["blocked"], r["events"]) for r in rows
    }


@settings(max_examples=40, deadline=None, database=None)
@given(histories())
async def test_a_batch_merges_like_its_events_one_at_a_time(
    profile_app: ProfileApp, case: tuple[list[tuple[Any, ...]], list[int]]
) -> None:
    ordered, cuts = case
    repository = ProfileRepository(profile_app.pool, LIMITS)
    one, batched = f"one-{uuid.uuid4().hex[:8]}", f"bat-{uuid.uuid4().hex[:8]}"

    singles = [await repository.merge_event(_event(one, *spec)) for spec in ordered]

    results = []
    events = [_event(batched, *spec) for spec in ordered]
    start, cut = 0, 0
    while start < len(events):
        size = cuts[cut % len(cuts)]
        results += await repository.merge_events(events[start : start + size])
        start, cut = start + size, cut + 1

    # The same profiles (namespaces differ only in identifier values and event ids)...
    def renamed(profile: tuple[Any, ...]) -> tuple[Any, ...]:
        version, state, ids, *counts = profile
        return (version, state.replace(batched, one), tuple(i.replace(batched, one) for i in ids), *counts)

    assert await _profiles(profile_app.pool, one) == {
        renamed(p) for p in await _profiles(profile_app.pool, batched)
    }
    # ...each the replay of its customer's history...
    histories = await profile_app.pool.fetch(
        "SELECT c.state, array_agg(e.body) AS bodies FROM customers c JOIN events e USING (customer_id)"
        " WHERE e.event_id LIKE $1 GROUP BY c.customer_id",
        f"{batched}-%",
    )
    for row in histories:
        history = [ingest_pb2.Event.FromString(body) for body in row["bodies"]]
        assert row["state"] == to_json(replay(history))
    # ...and the same answer per event: duplicates and merges where they happened one at a time.
    assert [(r.duplicate, len(r.merged_customer_ids)) for r in results] == [
        (r.duplicate, len(r.merged_customer_ids)) for r in singles
    ]
    # Every event of a batch that changed something carries its customer's latest profile.
    latest = {r.customer_id: r.profile for r in results if r.profile is not None}
    for r in results:
        if r.profile is not None:
            assert r.profile.stored.version <= latest[r.customer_id].stored.version


async def test_a_batch_with_a_late_event_and_a_merge_saves_the_replayed_state(
    profile_app: ProfileApp, unique: str
) -> None:
    repository = ProfileRepository(profile_app.pool)
    early = event(user_id=f"u-{unique}", occurred_at=NOW, identify=identify(step=1))
    late_arrival = event(
        user_id=f"u-{unique}", occurred_at=NOW - timedelta(hours=1), identify=identify(step=0)
    )
    anonymous = event(anonymous_id=f"a-{unique}", occurred_at=NOW, product_viewed=product_viewed("sku-1"))
    link = event(
        user_id=f"u-{unique}",
        anonymous_id=f"a-{unique}",
        occurred_at=NOW + timedelta(minutes=1),
        cart_item_added=cart_item_added("sku-1"),
    )
    await repository.merge_event(early)
    results = await repository.merge_events([late_arrival, anonymous, link, early])

    assert [r.duplicate for r in results] == [False, False, False, True]
    survivor = results[0].customer_id
    assert results[1].customer_id == results[2].customer_id == results[3].customer_id == survivor
    assert len(results[2].merged_customer_ids) == 1
    profile = results[2].profile
    assert profile is not None
    assert profile.stored.state == replay([early, late_arrival, anonymous, link])
    # 2 after the late event; the merge takes the higher of the two customers' versions, plus one.
    assert profile.stored.version == 3
    assert [m.event_id for m in profile.merges] == [link.event_id]
    row = await profile_app.pool.fetchrow(
        "SELECT version, state FROM customers WHERE customer_id = $1", uuid.UUID(survivor)
    )
    assert row is not None and (row["version"], row["state"]) == (3, to_json(profile.stored.state))


class RecordingDelivery:
    def __init__(self, message: ingest_pb2.Event, settled: dict[str, str]) -> None:
        self.payload = message.SerializeToString()
        self.headers: Mapping[str, str] = {}
        self.attempt = 1
        self.position: int | None = None  # not from the log: nothing to erase there
        self.stored_at_s: float | None = None
        self._event_id, self._settled = message.event_id, settled

    async def ack(self) -> None:
        self._settled[self._event_id] = "acked"

    async def retry_later(self, delay_s: float) -> None:
        self._settled[self._event_id] = "retry"

    async def discard(self) -> None:
        self._settled[self._event_id] = "discarded"


class OneFetch:
    def __init__(self, deliveries: list[Delivery]) -> None:
        self._deliveries: list[Delivery] | None = deliveries

    async def fetch(self, max_messages: int, timeout_s: float) -> Sequence[Delivery]:
        deliveries, self._deliveries = self._deliveries, None
        if deliveries is None:
            await asyncio.sleep(0.01)
        return deliveries or []

    async def close(self) -> None: ...


async def test_an_event_the_database_refuses_holds_back_no_other_in_its_batch(
    profile_app: ProfileApp, profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub, unique: str
) -> None:
    # PostgreSQL text cannot hold a NUL character: this event can never be stored.
    poison = event(event_id=f"bad\x00{unique}", user_id=f"u-{unique}", identify=identify(step=0))
    good = [event(user_id=f"u-{unique}", identify=identify(step=n)) for n in (1, 2)]
    settled: dict[str, str] = {}
    subscription = OneFetch([RecordingDelivery(e, settled) for e in (good[0], poison, good[1])])
    merger = EventMerger(
        [subscription],
        ProfileRepository(profile_app.pool),
        profile_app.cache,
        profile_app.unmerged,
        batch_size=10,
    )
    task = asyncio.create_task(merger.run())
    try:
        profile = await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: p.traits["step"] == 2)
        while len(settled) < 3:
            await asyncio.sleep(0.01)
    finally:
        merger.stop()
        await task
    # Set aside at once (it failed the same way on every delivery before: retried for ever).
    assert settled == {good[0].event_id: "acked", poison.event_id: "discarded", good[1].event_id: "acked"}
    assert profile.version == 2
    status = await profile_app.pool.fetchval(
        "SELECT status FROM unmerged_events WHERE payload = $1", poison.SerializeToString()
    )
    assert field_violations(status_pb2.Status.FromString(status)) == [
        FieldViolation("event_id", NUL_DESCRIPTION)
    ]


async def test_a_replica_never_builds_on_a_state_another_replica_has_moved_past(
    profile_app: ProfileApp,
) -> None:
    # Each repository keeps the states it saved, to skip decoding them; a write by the other
    # (a version it has not seen) must be read, or that write would be lost.
    first, second = ProfileRepository(profile_app.pool), ProfileRepository(profile_app.pool)
    who = f"u-{uuid.uuid4().hex[:8]}"
    steps = [(first, "a"), (second, "b"), (first, "c"), (first, "d"), (second, "e")]
    for minute, (repository, name) in enumerate(steps):
        await repository.merge_events(
            [
                event(
                    user_id=who,
                    occurred_at=NOW + timedelta(minutes=minute),
                    identify=identify(**{name: minute}),
                )
            ]
        )
    (found,) = (await first.find_by_identifiers([(IdentifierKind.USER_ID, who)])).values()
    assert set(found.to_proto().traits) == {"a", "b", "c", "d", "e"}
    assert found.stored.version == len(steps)


class CountingRepository(ProfileRepository):
    """Counts the merge transactions running at once."""

    running = 0
    most = 0

    async def merge_events(self, *args: Any, **kwargs: Any) -> list[MergeResult]:
        type(self).running += 1
        type(self).most = max(type(self).most, type(self).running)
        try:
            await asyncio.sleep(0.05)  # long enough for the other lanes' batches to arrive
            return await super().merge_events(*args, **kwargs)
        finally:
            type(self).running -= 1


async def test_lanes_of_one_process_merge_one_transaction_at_a_time(
    profile_app: ProfileApp, profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub, unique: str
) -> None:
    settled: dict[str, str] = {}
    lanes = [
        OneFetch(
            [RecordingDelivery(event(user_id=f"u-{unique}-{lane}", identify=identify(lane=lane)), settled)]
        )
        for lane in range(4)
    ]
    merger = EventMerger(
        [],
        CountingRepository(profile_app.pool),
        profile_app.cache,
        profile_app.unmerged,
        batch_size=10,
        transactions=1,
    )
    stop = asyncio.Event()
    tasks = [asyncio.create_task(merger.merge_from([lane], stop)) for lane in lanes]
    try:
        for lane in range(4):
            await wait_for_profile(profile_stub, user(f"u-{unique}-{lane}"), lambda p: p.version == 1)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert len(settled) == 4 and set(settled.values()) == {"acked"}
    assert CountingRepository.most == 1  # four lanes with work, one transaction at a time
