"""`sendtime setup` (the deployment's setup Job) on a real PostgreSQL and a real NATS: every
service's migrations applied as its own role, the three streams made with the settings given, and
a second run changing only what changed."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import nats
import pytest

import devstack
import nats_auth
from sendtime_cli import setup
from sendtime_cli.database import AUTH_OWNER, SERVICES, objects_of, role_name
from sendtime_common.event_log import JetStreamEventLog, JetStreamSettings, inbox_prefix
from tests.conftest import ADMIN_DATABASE_URL, SHARES_POSTGRES_ROLES, empty_database, repo_root

pytestmark = SHARES_POSTGRES_ROLES

STREAMS = [
    JetStreamSettings().stream,
    JetStreamSettings().erasure_stream,
    JetStreamSettings().profile_change_stream,
]


@dataclass(frozen=True, slots=True)
class OwnNats:
    """A NATS of the test's own (the setup rewrites stream settings other tests rely on), with a
    user per service as on a cluster (deploy/nats/authorization.conf)."""

    url: str
    passwords: dict[str, str]

    def env(self, service: str) -> dict[str, str]:
        """How the setup Job signs in: as ``service``'s NATS user."""
        return {
            "NATS_URL": self.url,
            "NATS_USER": nats_auth.user_name(service),
            "NATS_PASSWORD": self.passwords[service],
        }


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[OwnNats]:
    passwords = {service: secrets.token_urlsafe(16) for service in nats_auth.SERVICES}
    port = devstack.free_port()
    process = devstack.start_nats(port, tmp_path / "nats", passwords=passwords)
    yield OwnNats(f"nats://127.0.0.1:{port}", passwords)
    devstack.stop_process(process)


@pytest.fixture
async def setup_database() -> AsyncIterator[str]:
    """A fresh database, with the service roles present in the cluster (roles are cluster-wide;
    made without a login here, never altered, so suites running with them are undisturbed)."""
    admin = await asyncpg.connect(ADMIN_DATABASE_URL)
    try:
        for service in SERVICES:
            role = role_name(service)
            if not await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
                await admin.execute(f"CREATE ROLE {role} NOLOGIN")
    finally:
        await admin.close()
    async with empty_database("sendtime_setup") as url:
        conn = await asyncpg.connect(url)
        try:  # what `sendtime database roles` grants in each database
            roles = ", ".join(role_name(service) for service in SERVICES)
            await conn.execute(f"GRANT USAGE, CREATE ON SCHEMA public TO {roles}")
        finally:
            await conn.close()
        yield url


def sendtime_setup(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(repo_root() / "bin" / "sendtime"), "setup"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def owners(database_url: str) -> dict[str, str]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public'")
        return {r["tablename"]: r["tableowner"] for r in rows}
    finally:
        await conn.close()


async def recorded(database_url: str, table: str) -> set[str]:
    conn = await asyncpg.connect(database_url)
    try:
        return {r["name"] for r in await conn.fetch(f"SELECT name FROM {table}")}
    finally:
        await conn.close()


async def stream_max_ages(own_nats: OwnNats) -> dict[str, float]:
    user = nats_auth.user_name("profile")
    client = await nats.connect(
        own_nats.url, user=user, password=own_nats.passwords["profile"], inbox_prefix=inbox_prefix(user)
    )
    try:
        js = client.jetstream()
        return {name: float((await js.stream_info(name)).config.max_age or 0) for name in STREAMS}
    finally:
        await client.close()


async def test_setup_migrates_every_service_as_its_role_and_makes_the_streams_idempotently(
    setup_database: str, own_nats: OwnNats
) -> None:
    # As the Job runs it (deploy/base/setup.yaml): profile's NATS user, which may make streams.
    env = {"DATABASE_URL": setup_database, **own_nats.env("profile"), "NATS_MAX_AGE_SECONDS": "3600"}
    first = sendtime_setup(env)
    assert first.returncode == 0, first.stderr
    assert f"streams ready: {', '.join(STREAMS)}" in first.stdout

    tables = await owners(setup_database)
    for service, directory, table in setup.migration_sets():
        expected = {path.stem for path in directory.glob("*.sql")}
        assert expected and await recorded(setup_database, table) == expected, table
        assert f"{table}: applied {', '.join(sorted(expected))}" in first.stdout
        made_here = set(objects_of(directory)[0]) | {table}
        assert {tables[name] for name in made_here} == {role_name(service)}, service
    ages = await stream_max_ages(own_nats)
    assert ages[STREAMS[0]] == ages[STREAMS[1]] == 3600
    assert ages[STREAMS[2]] == JetStreamSettings().profile_change_max_age_s

    # Again, with one stream setting changed: no migration runs, the streams are updated.
    again = await setup.apply_migrations(setup_database)
    assert again and all(applied == [] for applied in again.values())
    streams = await setup.apply_streams(JetStreamSettings.from_env({**env, "NATS_MAX_AGE_SECONDS": "7200"}))
    assert streams == STREAMS
    assert await owners(setup_database) == tables
    ages = await stream_max_ages(own_nats)
    assert ages[STREAMS[0]] == ages[STREAMS[1]] == 7200


async def test_after_the_setup_each_service_finds_the_streams_without_managing_them(
    own_nats: OwnNats,
) -> None:
    await setup.apply_streams(JetStreamSettings.from_env(own_nats.env("profile")))
    # As in Kubernetes: NATS_MANAGE_STREAMS=false everywhere, each service as its own user. A
    # missing stream would keep connect waiting (up to a minute), so the bound proves they exist.
    for service in nats_auth.SERVICES:
        settings = JetStreamSettings.from_env(own_nats.env(service) | {"NATS_MANAGE_STREAMS": "false"})
        log = await asyncio.wait_for(JetStreamEventLog.connect(settings), 5)
        try:
            if service == "triggers":  # the one reader of the profile change stream
                subscription = await asyncio.wait_for(log.subscribe_profile_changes("triggers-changes"), 5)
                await subscription.close()
        finally:
            await log.close()


async def test_setup_refuses_a_role_without_the_grants_of_sendtime_database_roles(
    own_nats: OwnNats,
) -> None:
    async with empty_database("sendtime_setup") as url:  # no GRANT on schema public here
        result = sendtime_setup({"DATABASE_URL": url, **own_nats.env("profile")})
        assert result.returncode == 1
        owner = role_name(AUTH_OWNER)
        assert f"{owner} may not create tables in this database: run `sendtime database roles`" in (
            result.stderr
        )
        assert await owners(url) == {}


async def test_setup_refuses_a_user_that_may_not_act_as_the_service_roles(
    setup_database: str, own_nats: OwnNats
) -> None:
    user = f"sendtime_setup_test_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(setup_database)
    try:
        await admin.execute(f"CREATE ROLE {user} LOGIN")
        await admin.execute(f"GRANT CREATE ON SCHEMA public TO {user}")
        url = setup_database.replace("postgres@", f"{user}@", 1)
        result = sendtime_setup({"DATABASE_URL": url, **own_nats.env("profile")})
    finally:
        await admin.execute(f"DROP OWNED BY {user}")
        await admin.execute(f"DROP ROLE {user}")
        await admin.close()
    assert result.returncode == 1
    assert f"{user} may not act as {role_name(AUTH_OWNER)}" in result.stderr
    assert f"GRANT {role_name(AUTH_OWNER)} TO {user}" in result.stderr
    assert await owners(setup_database) == {}  # nothing made as the wrong owner
