"""sync.push and sync.braze: traits to a local Braze (tests/sync/braze_server.py), 75 a request,
per-item refusals, Braze's rate limit waited out; the ledger settles what was pushed, and a
push made again after a crash leaves Braze as one push would have."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from sendtime_common.migrate import migrate
from sync.braze import BrazeAttributes, attribute_object, refused_indexes
from sync.provider_http import ApiKey, ProviderApi, ProviderLimits
from sync.push import ItemOutcome, ItemResult, PushItem, PushLedger, newest_per_customer
from sync.store import MIGRATIONS_DIR, MIGRATIONS_TABLE
from tests.conftest import empty_database
from tests.sync.braze_server import MISSING_ID, BrazeServer


def _item(n: int, version: int = 1, **attributes: object) -> PushItem:
    return PushItem(
        f"user:{n}", attributes or {"first_name": f"n{n}", "tier": "gold"}, version, external_id=str(n)
    )


def test_an_item_is_an_attribute_object_by_external_id_else_email() -> None:
    item = PushItem("user:7", {"first_name": "Ada", "city": "Leeds", "tier": "gold"}, 3, external_id="7")
    assert attribute_object(item) == {
        "first_name": "Ada",
        "home_city": "Leeds",
        "tier": "gold",
        "external_id": "7",
    }
    by_email = PushItem("email:a@example.com", {"tier": "gold"}, 1, email="a@example.com")
    assert attribute_object(by_email) == {"tier": "gold", "email": "a@example.com"}


def test_the_refused_objects_of_an_answer() -> None:
    answer = {
        "message": "success",
        "errors": [
            {"type": MISSING_ID, "input_array": "attributes", "index": 2},
            {"type": "bad event", "input_array": "events", "index": 0},
            {"type": "Invalid email 'ada@example.com'", "input_array": "attributes", "index": 4},
        ],
    }
    assert refused_indexes(answer) == {2: MISSING_ID, 4: "invalid value"}  # no address kept
    assert refused_indexes({"message": "success"}) == {} == refused_indexes(["not", "an", "object"])


def test_a_batch_carries_one_version_per_customer_the_newest() -> None:
    kept = newest_per_customer([_item(1, 1), _item(2, 5), _item(1, 3), _item(1, 2)])
    assert sorted((i.customer_key, i.version) for i in kept) == [("user:1", 3), ("user:2", 5)]


@pytest.fixture
async def braze() -> AsyncIterator[BrazeServer]:
    server = await BrazeServer().start()
    yield server
    await server.stop()


@pytest.fixture
async def destination(braze: BrazeServer) -> AsyncIterator[BrazeAttributes]:
    assert braze.api_key is not None
    limits = ProviderLimits(requests=3000, per_s=3.0, backoff_initial_s=0.05, backoff_max_s=0.2)
    api = ProviderApi("braze", braze.url, ApiKey(braze.api_key), limits)
    yield BrazeAttributes(api)
    await api.aclose()


async def test_items_go_75_a_request_and_braze_holds_each_user_once(
    braze: BrazeServer, destination: BrazeAttributes
) -> None:
    results = await destination.push([_item(n) for n in range(160)])
    assert [r.outcome for r in results] == [ItemOutcome.PUSHED] * 160
    assert braze.batch_sizes == [75, 75, 10]
    assert len(braze.users) == 160 and braze.users["external_id:42"] == {"first_name": "n42", "tier": "gold"}


async def test_an_item_braze_refuses_is_refused_alone(
    braze: BrazeServer, destination: BrazeAttributes
) -> None:
    nameless = PushItem("user:x", {"tier": "gold"}, 1)  # neither an external id nor an address
    results = await destination.push([_item(1), nameless, _item(2)])
    assert [(r.item.customer_key, r.outcome, r.reason) for r in results] == [
        ("user:1", ItemOutcome.PUSHED, ""),
        ("user:x", ItemOutcome.REFUSED, MISSING_ID),
        ("user:2", ItemOutcome.PUSHED, ""),
    ]


async def test_a_batch_braze_refuses_whole_refuses_each_item(
    braze: BrazeServer, destination: BrazeAttributes
) -> None:
    results = await destination.push([PushItem("user:a", {"x": 1}, 1), PushItem("user:b", {"x": 1}, 1)])
    assert [r.outcome for r in results] == [ItemOutcome.REFUSED] * 2 and braze.users == {}


async def test_the_rate_limit_is_waited_out_to_its_reset(
    braze: BrazeServer, destination: BrazeAttributes
) -> None:
    braze.requests_per_window, braze.window_s = 2, 1
    results = await destination.push([_item(n) for n in range(75 * 5)])
    assert braze.throttled > 0
    assert all(r.outcome == ItemOutcome.PUSHED for r in results) and len(braze.users) == 375


# --- the ledger ------------------------------------------------------------------------------------


@pytest.fixture
async def ledger() -> AsyncIterator[PushLedger]:
    async with empty_database("sync_push") as url:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        await migrate(pool, MIGRATIONS_DIR, MIGRATIONS_TABLE)
        yield PushLedger(pool)
        await pool.close()


async def test_what_the_ledger_settled_is_not_sent_again_and_a_newer_version_is(ledger: PushLedger) -> None:
    items = [_item(1, 4), _item(2, 4)]
    assert await ledger.unsettled("braze", items) == (items, [])
    await ledger.record(
        "braze",
        [
            ItemResult(items[0], ItemOutcome.PUSHED),
            ItemResult(items[1], ItemOutcome.RETRY),  # still pending
        ],
    )
    assert await ledger.unsettled("braze", [_item(1, 4), _item(1, 3), _item(2, 4)]) == ([_item(2, 4)], [])
    newer = _item(1, 5, first_name="Ada")
    assert await ledger.unsettled("braze", [newer]) == ([newer], [])
    assert await ledger.unsettled("mailchimp", [_item(1, 4)]) == ([_item(1, 4)], [])  # per destination
    # an older result recorded late never moves the ledger back
    await ledger.record("braze", [ItemResult(_item(1, 2), ItemOutcome.PUSHED)])
    assert await ledger.unsettled("braze", [_item(1, 4)]) == ([], [])


async def test_a_newer_version_with_the_values_pushed_is_unchanged_not_sent(ledger: PushLedger) -> None:
    await ledger.record("braze", [ItemResult(_item(1, 4), ItemOutcome.PUSHED)])
    same_values = _item(1, 9)  # a trait the destination does not take changed
    assert await ledger.unsettled("braze", [same_values]) == ([], [same_values])
    await ledger.record("braze", [ItemResult(same_values, ItemOutcome.UNCHANGED)])
    assert await ledger.unsettled("braze", [_item(1, 9)]) == ([], [])
    moved = PushItem(
        "user:1", {"first_name": "n1", "tier": "gold"}, 10, external_id="1", email="a@example.com"
    )
    assert await ledger.unsettled("braze", [moved]) == ([moved], [])  # an address is a value too


async def test_a_refusal_is_settled_too(ledger: PushLedger) -> None:
    await ledger.record("braze", [ItemResult(_item(3, 1), ItemOutcome.REFUSED, MISSING_ID)])
    assert await ledger.unsettled("braze", [_item(3, 1)]) == ([], [])


async def test_a_push_made_again_after_a_crash_leaves_braze_as_one_push(
    braze: BrazeServer, destination: BrazeAttributes, ledger: PushLedger
) -> None:
    items = [_item(n, 2) for n in range(10)]
    to_push, _ = await ledger.unsettled("braze", items)
    await destination.push(to_push)
    # killed here: Braze applied the batch, the ledger did not record it; started again:
    to_push, _ = await ledger.unsettled("braze", items)
    results = await destination.push(to_push)
    await ledger.record("braze", results)
    assert len(braze.users) == 10  # no second user for anyone
    assert braze.users == {f"external_id:{n}": {"first_name": f"n{n}", "tier": "gold"} for n in range(10)}
    # and once recorded, a third start sends nothing
    before = len(braze.batch_sizes)
    assert await ledger.unsettled("braze", items) == ([], [])
    assert len(braze.batch_sizes) == before
