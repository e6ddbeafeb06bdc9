"""``sendtime profile rebuild`` on the real database: a healthy history rebuilds to the same
profiles (incremental merging equals replay), and a damaged state is repaired and re-cached."""

from __future__ import annotations

import os
import subprocess

import asyncpg

from profile_service.server import ProfileApp
from sendtime.ingest.v1 import ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2_grpc
from tests.conftest import repo_root, user, wait_for_profile
from tests.factories import cart_item_added, event, identify, order_completed, product_viewed
from tests.profile_service.test_profile_service import send


def rebuild(database_url: str, redis_url: str, *args: str) -> str:
    result = subprocess.run(
        [str(repo_root() / "bin" / "sendtime"), "profile", "rebuild", *args],
        env={**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


async def test_rebuild_equals_the_incremental_profiles_and_repairs_a_damaged_one(
    profile_app: ProfileApp,
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    database_url: str,
    redis_url: str,
    unique: str,
) -> None:
    await send(
        ingest_stub,
        event(user_id=f"u-{unique}", identify=identify(first_name="Ada")),
        event(user_id=f"u-{unique}", product_viewed=product_viewed("sku-1")),
        event(user_id=f"u-{unique}", cart_item_added=cart_item_added("sku-1", 2)),
        event(user_id=f"u-{unique}", order_completed=order_completed(f"o-{unique}", "20.00", "sku-2")),
    )
    before = await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: p.orders.count == 1)

    assert rebuild(database_url, redis_url).endswith(", rebuilt 0")

    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE customers SET state = '{}'::json WHERE customer_id = $1::uuid", before.customer_id
        )
    finally:
        await conn.close()
    assert (
        rebuild(database_url, redis_url, "--customer", before.customer_id) == "checked 1 customers, rebuilt 1"
    )

    # The cache holds the repaired profile (the service's copy in process goes as soon as Redis's
    # invalidation of the CLI's write arrives: within 10 s, well inside its 60 s TTL, so only
    # the invalidation can have made way for it).
    after = await wait_for_profile(
        profile_stub, user(f"u-{unique}"), lambda p: p.version == before.version + 1, timeout_s=10
    )
    for field in ("traits", "cart", "recently_viewed", "orders"):
        assert getattr(after, field) == getattr(before, field), field
