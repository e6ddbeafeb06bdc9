"""`sendtime database roles` on a real PostgreSQL: each service's role owns its own tables
(also ones an administrator made before the roles existed) and can do nothing to the others';
the key and audit tables are the profile service's, and the others may only read keys, move a
key's last use forward and append audit records."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from ingest.server import MIGRATIONS_DIR as INGEST_MIGRATIONS
from profile_service.server import MIGRATIONS_DIR as PROFILE_MIGRATIONS
from render.server import MIGRATIONS_DIR as RENDER_MIGRATIONS
from sendtime_cli.database import SERVICES, role_name, setup_roles
from sendtime_common.migrate import migrate
from tests.conftest import SHARES_POSTGRES_ROLES, empty_database, repo_root
from tests.keys import issue_key
from triggers.store import MIGRATIONS_DIR as TRIGGERS_MIGRATIONS

pytestmark = SHARES_POSTGRES_ROLES

PASSWORDS = {service: secrets.token_urlsafe(16) for service in SERVICES}


def as_role(url: str, service: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{role_name(service)}:{PASSWORDS[service]}@{host}").geturl()


@pytest.fixture
async def roles_database() -> AsyncIterator[str]:
    """A fresh database where an administrator already migrated the profile service (as before
    the roles existed), then `setup_roles` ran; the others migrate as their own roles."""
    async with empty_database("sendtime_roles") as url:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
        try:
            await migrate(pool, PROFILE_MIGRATIONS, table="schema_migrations")
        finally:
            await pool.close()
        await setup_roles(url, PASSWORDS)
        for service, directory, table in [
            ("ingest", INGEST_MIGRATIONS, "ingest_schema_migrations"),
            ("render", RENDER_MIGRATIONS, "render_schema_migrations"),
            ("triggers", TRIGGERS_MIGRATIONS, "triggers_schema_migrations"),
        ]:
            pool = await asyncpg.create_pool(as_role(url, service), min_size=1, max_size=1)
            try:
                await migrate(pool, directory, table=table)
            finally:
                await pool.close()
        yield url


async def refused(url: str, service: str, statement: str) -> bool:
    conn = await asyncpg.connect(as_role(url, service))
    try:
        await conn.execute(statement)
        return False
    except asyncpg.InsufficientPrivilegeError:
        return True
    finally:
        await conn.close()


async def test_each_service_owns_its_tables_and_the_key_tables_are_profiles(roles_database: str) -> None:
    conn = await asyncpg.connect(roles_database)
    try:
        rows = await conn.fetch("SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public'")
        owners = {row["tablename"]: row["tableowner"] for row in rows}
    finally:
        await conn.close()
    assert owners["customers"] == owners["identifiers"] == owners["schema_migrations"] == "sendtime_profile"
    assert owners["api_keys"] == owners["audit_events"] == "sendtime_profile"
    assert owners["ingest_rejected_events"] == "sendtime_ingest"
    assert owners["render_templates"] == "sendtime_render"
    assert owners["triggers_destinations"] == owners["triggers_schema_migrations"] == "sendtime_triggers"


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO customers DEFAULT VALUES",
        "SELECT * FROM identifiers",
        "DELETE FROM events",
        "UPDATE erasure_tombstones SET identifier_hash = identifier_hash",
        "SELECT * FROM ingest_rejected_events",
        "UPDATE api_keys SET scopes = '{keys.manage}'",
        "DELETE FROM audit_events",
        "SELECT * FROM audit_events",
        "DROP TABLE render_templates",  # not even its own tables can be dropped by another
    ],
)
async def test_render_cannot_touch_what_is_not_its_own(roles_database: str, statement: str) -> None:
    if "render_templates" in statement:
        assert await refused(roles_database, "ingest", statement)
    else:
        assert await refused(roles_database, "render", statement)


@pytest.mark.parametrize(
    ("service", "statement"),
    [
        ("render", "SELECT signing_keys FROM triggers_destinations"),
        ("ingest", "DELETE FROM triggers_deliveries"),
        ("profile", "SELECT * FROM triggers_triggers"),
        ("triggers", "SELECT * FROM customers"),
        ("triggers", "SELECT * FROM render_templates"),
        ("triggers", "UPDATE api_keys SET scopes = '{keys.manage}'"),
    ],
)
async def test_only_triggers_touches_the_triggers_tables_and_it_nothing_else(
    roles_database: str, service: str, statement: str
) -> None:
    assert await refused(roles_database, service, statement)


async def test_ingest_render_and_triggers_may_read_keys_note_their_use_and_append_audit_records(
    roles_database: str,
) -> None:
    key = await issue_key(roles_database)
    for service in ("ingest", "render", "triggers"):
        conn = await asyncpg.connect(as_role(roles_database, service))
        try:
            assert await conn.fetchval("SELECT count(*) FROM api_keys") == 1
            await conn.execute("UPDATE api_keys SET last_used_at = now()")
            await conn.execute(
                "INSERT INTO audit_events (service, principal, method, target, outcome)"
                " VALUES ($1, 'apiKeys/x', 'm', '', 'OK')",
                service,
            )
        finally:
            await conn.close()
    assert key
    assert await refused(roles_database, "ingest", "UPDATE api_keys SET secret_hash = ''")
    assert await refused(roles_database, "render", "INSERT INTO api_keys (key_id) VALUES ('x')")


async def test_the_command_line_sets_up_the_roles(tmp_path: Path) -> None:
    async with empty_database("sendtime_roles_cli") as url:
        assert "roles ready" in run_roles(tmp_path, url)
        assert await refused(url, "render", "SELECT * FROM api_keys WHERE false") is False
        assert await refused(url, "render", "DELETE FROM api_keys")


def run_roles(tmp_path: Path, database_url: str) -> str:
    env = {**os.environ, "DATABASE_URL": database_url}
    for service, password in PASSWORDS.items():
        path = tmp_path / f"{service}.password"
        path.write_text(password)
        env[f"SENDTIME_{service.upper()}_DB_PASSWORD_FILE"] = str(path)
    result = subprocess.run(
        [str(repo_root() / "bin" / "sendtime"), "database", "roles"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (
        "roles ready: sendtime_ingest, sendtime_profile, sendtime_render, sendtime_triggers" in result.stdout
    )
    return result.stdout
