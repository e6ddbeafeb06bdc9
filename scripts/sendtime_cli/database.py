"""``sendtime database roles``: a PostgreSQL role per service, each allowed only what its
service does (run once per database, and again after an upgrade, by an administrator).

- ``sendtime_ingest``, ``sendtime_profile`` and ``sendtime_render`` may log in and create tables
  in the schema ``public``. Each service migrates and owns its own tables, and has no privilege
  at all on the others': render cannot read or write profiles, ingest cannot read templates.
  Tables made before the roles existed (by an administrator) are handed to their service.
- The key and audit tables (``sendtime_common.auth``) are made here, owned by the profile
  service (which hosts KeyService and AuditService). Ingest and render may read the keys, move
  a key's ``last_used_at`` forward, and append to the audit trail; nothing more.

Which tables are whose comes from the services' migration files, so a new migration needs no
change here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit

import asyncpg

from sendtime_common.auth.key_store import MIGRATIONS_DIR as AUTH_MIGRATIONS_DIR
from sendtime_common.auth.key_store import MIGRATIONS_TABLE as AUTH_MIGRATIONS_TABLE
from sendtime_common.migrate import migrate

SERVICES_DIR = Path(__file__).resolve().parents[2] / "services"
# service: (its package, the table that records its migrations)
SERVICES = {
    "ingest": ("ingest", "ingest_schema_migrations"),
    "profile": ("profile_service", "schema_migrations"),
    "render": ("render", "render_schema_migrations"),
    "triggers": ("triggers", "triggers_schema_migrations"),
    "sync": ("sync", "sync_schema_migrations"),
}
AUTH_OWNER = "profile"
_CREATE_TABLE = re.compile(
    r"CREATE\s+(?:UNLOGGED\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?([a-z_][a-z0-9_]*)", re.I
)
_CREATE_FUNCTION = re.compile(r"CREATE\s+(?:OR\s+REPLACE\s+)?FUNCTION\s+([a-z_][a-z0-9_]*)\s*\(", re.I)


def role_name(service: str) -> str:
    return f"sendtime_{service}"


def objects_of(migrations: Path) -> tuple[list[str], list[str]]:
    """The tables and functions a migrations directory creates."""
    tables, functions = [], []
    for path in sorted(migrations.glob("*.sql")):
        text = path.read_text()
        tables += _CREATE_TABLE.findall(text)
        functions += _CREATE_FUNCTION.findall(text)
    return tables, functions


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


async def _exists(conn: asyncpg.Connection, table: str) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"public.{table}"))


async def setup_roles(admin_url: str, passwords: Mapping[str, str]) -> None:
    """Create or update the roles (with ``passwords``: service to password) in the database of
    ``admin_url`` (a role that may create roles and owns, or is a member of the owners of,
    existing tables), hand each service its tables, and make the key and audit tables.

    Raises:
        OSError, asyncpg.PostgresError: the database failed.
    """
    database = unquote(urlsplit(admin_url).path.lstrip("/"))
    conn = await asyncpg.connect(admin_url)
    try:
        for service, password in passwords.items():
            role = role_name(service)
            exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
            verb = "ALTER" if exists else "CREATE"
            # Passwords cannot be bind parameters in DDL: quote it as a literal.
            literal = "'" + password.replace("'", "''") + "'"
            await conn.execute(
                f"{verb} ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {literal}"
            )
            await conn.execute(f"GRANT CONNECT ON DATABASE {_quote(database)} TO {role}")
            await conn.execute(f"GRANT USAGE, CREATE ON SCHEMA public TO {role}")
            package, migrations_table = SERVICES[service]
            tables, functions = objects_of(SERVICES_DIR / package / "migrations")
            for table in [migrations_table, *tables]:
                if await _exists(conn, table):
                    await conn.execute(f"ALTER TABLE {table} OWNER TO {role}")
            for function in functions:
                if await conn.fetchval("SELECT 1 FROM pg_proc WHERE proname = $1", function):
                    await conn.execute(f"ALTER FUNCTION {function}() OWNER TO {role}")
        await _setup_auth_tables(conn, admin_url, passwords)
    finally:
        await conn.close()


async def _setup_auth_tables(conn: asyncpg.Connection, admin_url: str, passwords: Mapping[str, str]) -> None:
    owner = role_name(AUTH_OWNER)
    pool = await asyncpg.create_pool(admin_url, min_size=1, max_size=1)
    try:
        await migrate(pool, AUTH_MIGRATIONS_DIR, table=AUTH_MIGRATIONS_TABLE)
    finally:
        await pool.close()
    tables, _ = objects_of(AUTH_MIGRATIONS_DIR)
    for table in [AUTH_MIGRATIONS_TABLE, *tables]:
        await conn.execute(f"ALTER TABLE {table} OWNER TO {owner}")
    readers = [role_name(s) for s in passwords if s != AUTH_OWNER]
    if readers:
        who = ", ".join(readers)
        await conn.execute(f"GRANT SELECT ON {AUTH_MIGRATIONS_TABLE}, api_keys, api_key_generation TO {who}")
        await conn.execute(f"GRANT UPDATE (last_used_at) ON api_keys TO {who}")
        await conn.execute(f"GRANT INSERT ON audit_events TO {who}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="database_command", required=True, metavar="COMMAND")
    roles = commands.add_parser(
        "roles",
        help="a least-privilege role per service (run as an administrator)",
        description=(
            "Create or update sendtime_ingest, sendtime_profile and sendtime_render in DATABASE_URL's "
            "database (connect as an administrator), hand each its tables, and make the key and audit "
            "tables. Passwords come from the files SENDTIME_INGEST_DB_PASSWORD_FILE, "
            "SENDTIME_PROFILE_DB_PASSWORD_FILE and SENDTIME_RENDER_DB_PASSWORD_FILE. See docs/security.md."
        ),
    )
    roles.set_defaults(handler=_run_roles)


def _run_roles(args: argparse.Namespace) -> int:
    passwords = {}
    for service in SERVICES:
        variable = f"SENDTIME_{service.upper()}_DB_PASSWORD_FILE"
        path = os.environ.get(variable, "")
        if not path:
            print(f"sendtime database roles: set {variable}", file=sys.stderr)
            return 1
        try:
            passwords[service] = Path(path).read_text().strip()
        except OSError as exc:
            print(f"sendtime database roles: {variable}: {exc.strerror}", file=sys.stderr)
            return 1
    admin_url = os.environ.get("DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/sendtime"
    try:
        asyncio.run(setup_roles(admin_url, passwords))
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"sendtime database roles: {exc}", file=sys.stderr)
        return 1
    print("roles ready: " + ", ".join(role_name(s) for s in passwords))
    return 0
