"""`sendtime keys` against the real database, and the services honouring what it does."""

from __future__ import annotations

import asyncio
import getpass
import os
import subprocess
import time

import grpc

from ingest.server import IngestApp
from profile_service.server import ProfileApp
from sendtime.auth.v1 import auth_pb2, auth_pb2_grpc
from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime_common.auth.api_keys import KEY_PATTERN, key_id_of
from tests.auth.test_rate_limits import decided_in_redis
from tests.conftest import channel, eventually, repo_root


def keys(database_url: str, *args: str, expect: int = 0) -> str:
    result = subprocess.run(
        [str(repo_root() / "bin" / "sendtime"), "keys", *args],
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == expect, result.stdout + result.stderr
    return result.stdout + result.stderr


async def stats_answer(ingest_app: IngestApp, key: str) -> str:
    async with channel(f"127.0.0.1:{ingest_app.grpc.port}", key) as calls:
        try:
            await ingest_pb2_grpc.IngestServiceStub(calls).GetIngestStats(ingest_pb2.GetIngestStatsRequest())
            return "OK"
        except grpc.aio.AioRpcError as exc:
            return exc.code().name


async def test_create_list_rotate_and_revoke_from_the_command_line(
    database_url: str, ingest_app: IngestApp, profile_app: ProfileApp, admin_key: str
) -> None:
    key = keys(database_url, "create", "--name", "ops dashboard", "--scope", "stats.read", "--quiet").strip()
    assert KEY_PATTERN.fullmatch(key)
    key_id = key_id_of(key)
    assert await stats_answer(ingest_app, key) == "OK"

    listing = keys(database_url, "list")
    assert key_id in listing and "ops dashboard" in listing and key not in listing
    shown = keys(database_url, "show", key_id)
    assert "stats.read" in shown and f"cli:{getpass.getuser()}" in shown and "state:     active" in shown

    rotated = keys(database_url, "rotate", key_id)
    (new_key,) = KEY_PATTERN.findall(rotated)
    assert f"old key {key_id}: revoked" in rotated
    assert await stats_answer(ingest_app, new_key) == "OK"
    started = time.monotonic()
    while await stats_answer(ingest_app, key) != "UNAUTHENTICATED":
        assert time.monotonic() - started < 5
        await asyncio.sleep(0.05)

    keys(database_url, "revoke", f"apiKeys/{key_id_of(new_key)}")
    started = time.monotonic()
    while await stats_answer(ingest_app, new_key) != "UNAUTHENTICATED":
        assert time.monotonic() - started < 5
        await asyncio.sleep(0.05)
    assert key_id_of(new_key) not in keys(database_url, "list")
    assert key_id_of(new_key) in keys(database_url, "list", "--all")

    async with channel(f"127.0.0.1:{profile_app.grpc.port}", admin_key) as calls:
        audit = auth_pb2_grpc.AuditServiceStub(calls)
        recorded = await audit.ListAuditEvents(
            auth_pb2.ListAuditEventsRequest(principal=f"cli:{getpass.getuser()}", page_size=1000)
        )
    assert [(r.method, r.target) for r in recorded.audit_events[:3]] == [
        ("sendtime keys revoke", f"apiKeys/{key_id_of(new_key)}"),
        ("sendtime keys rotate", f"apiKeys/{key_id}"),
        ("sendtime keys create", "ops dashboard"),
    ]


def test_bad_arguments_are_refused_before_anything_is_made(database_url: str) -> None:
    assert "unknown scope 'profiles.delete'" in keys(
        database_url, "create", "--name", "x", "--scope", "profiles.delete", expect=1
    )
    assert "not a duration" in keys(
        database_url, "create", "--name", "x", "--scope", "render", "--expires-in", "soon", expect=1
    )
    assert "not a key id" in keys(database_url, "revoke", "nope", expect=1)
    assert "no key AAAAAAAAAAAA" in keys(database_url, "revoke", "AAAAAAAAAAAA", expect=1)


async def test_a_key_gets_its_own_rate_limits_from_the_command_line(
    database_url: str, ingest_app: IngestApp
) -> None:
    made = keys(
        database_url,
        "create",
        "--name",
        "nightly export",
        "--scope",
        "stats.read",
        "--rate-limit",
        # One call, then one every 10 s: the second call is refused however slow the first.
        "stats.read=6/min burst 1",
    )
    (key,) = KEY_PATTERN.findall(made)
    assert "limits:    stats.read 6/min burst 1" in made
    limiter = ingest_app.auth.limiter
    assert limiter is not None
    await eventually(lambda: decided_in_redis(limiter))
    assert [await stats_answer(ingest_app, key) for _ in range(2)] == ["OK", "RESOURCE_EXHAUSTED"]
    assert limiter.shared  # both decided in Redis, none in process after a slow answer

    key_id = key_id_of(key)
    assert "limits:    the defaults" in keys(database_url, "rate-limit", key_id, "--defaults")

    async def default_again() -> bool:  # every replica within about a second
        return await stats_answer(ingest_app, key) == "OK"

    await eventually(default_again, timeout_s=15)
    assert "limits:    stats.read 2/s burst 5" in keys(
        database_url, "rate-limit", key_id, "stats.read=2/s burst 5"
    )
    assert "limits:    stats.read 2/s burst 5" in keys(database_url, "show", key_id)

    assert "render is not one of the key's scopes" in keys(
        database_url, "rate-limit", key_id, "render=5/s", expect=1
    )
    assert "give SCOPE=RATE limits, or --defaults" in keys(database_url, "rate-limit", key_id, expect=1)
    assert "is not a rate" in keys(database_url, "rate-limit", key_id, "stats.read=lots", expect=1)
    assert "not SCOPE=RATE" in keys(
        database_url, "create", "--name", "x", "--scope", "render", "--rate-limit", "5/s", expect=1
    )
