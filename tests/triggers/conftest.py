"""Fixtures of the triggers store's tests: one migrated database for the run, emptied before
each test that uses it (the firers' claims see every due episode in it)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from sendtime.triggers.v1 import triggers_pb2_grpc
from sendtime_common.database import create_pool
from tests.conftest import channel
from tests.triggers.store_support import Stores, migrated_database
from triggers.secret_box import SecretBox
from triggers.server import TriggersApp

_TABLES = (
    "triggers_triggers, triggers_destinations, triggers_episodes, triggers_known_exits, triggers_fires,"
    " triggers_customer_fires, triggers_deliveries, triggers_delivery_attempts, triggers_replicas"
)


@pytest.fixture(scope="session")
async def store_url() -> AsyncIterator[str]:
    async with migrated_database("sendtime_triggers_store") as url:
        yield url


@pytest.fixture(scope="session")
def box() -> SecretBox:
    return SecretBox.generate()


@pytest.fixture(scope="session")
async def store_pool(store_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(store_url, min_size=1, max_size=8)
    yield pool
    await pool.close()


@pytest.fixture
async def stores(store_pool: asyncpg.Pool, box: SecretBox) -> Stores:
    """Replica A's stores, on an empty database."""
    await store_pool.execute(f"TRUNCATE {_TABLES}")
    return Stores.on(store_pool, box, "replica-a")


# --- The triggers service, served (tests/triggers/test_service_*.py) -----------------------------


@pytest.fixture(scope="session")
async def trigger_stub(
    triggers_app: TriggersApp, admin_key: str
) -> AsyncIterator[triggers_pb2_grpc.TriggerServiceAsyncStub]:
    async with channel(f"127.0.0.1:{triggers_app.grpc.port}", admin_key) as calls:
        yield triggers_pb2_grpc.TriggerServiceStub(calls)


@pytest.fixture(scope="session")
async def destination_stub(
    triggers_app: TriggersApp, admin_key: str
) -> AsyncIterator[triggers_pb2_grpc.DestinationServiceAsyncStub]:
    async with channel(f"127.0.0.1:{triggers_app.grpc.port}", admin_key) as calls:
        yield triggers_pb2_grpc.DestinationServiceStub(calls)


@pytest.fixture(scope="session")
async def delivery_stub(
    triggers_app: TriggersApp, admin_key: str
) -> AsyncIterator[triggers_pb2_grpc.DeliveryServiceAsyncStub]:
    async with channel(f"127.0.0.1:{triggers_app.grpc.port}", admin_key) as calls:
        yield triggers_pb2_grpc.DeliveryServiceStub(calls)
