"""``sendtime setup``: the shared setup a deployment runs once per release, before the services
(deploy/base/setup.yaml runs it as a Kubernetes Job).

- **Migrations.** Every service's migrations (and the key and audit tables, the profile
  service's), each applied as the service's own role (``sendtime database roles``) where that role
  exists, so that the tables stay its own; as the connecting user where it does not (one role for
  everything, as in a local cluster). DATABASE_URL connects as an administrator, or as a member of
  every service role.
- **JetStream streams.** The events, erasure notices and profile changes streams, made or brought
  up to date with the ``NATS_*`` settings (``JetStreamSettings``). The services then run with
  ``NATS_MANAGE_STREAMS=false`` and only wait for the streams, so no replica's start rewrites
  another's configuration.

Both steps are idempotent: run again, they change nothing unless a migration or a stream setting
is new.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import asyncpg

from sendtime_cli.database import AUTH_OWNER, SERVICES, SERVICES_DIR, role_name
from sendtime_common.auth.key_store import MIGRATIONS_DIR as AUTH_MIGRATIONS_DIR
from sendtime_common.auth.key_store import MIGRATIONS_TABLE as AUTH_MIGRATIONS_TABLE
from sendtime_common.config import ConfigError
from sendtime_common.event_log import EventLogUnavailable, JetStreamEventLog, JetStreamSettings
from sendtime_common.migrate import migrate

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/sendtime"


class SetupError(Exception):
    """The setup cannot go on; the message says what to fix."""


def migration_sets() -> list[tuple[str, Path, str]]:
    """(owning service, migrations directory, table recording them), in the order they run:
    the key and audit tables first, as every service reads them."""
    return [
        (AUTH_OWNER, AUTH_MIGRATIONS_DIR, AUTH_MIGRATIONS_TABLE),
        *(
            (service, SERVICES_DIR / package / "migrations", table)
            for service, (package, table) in SERVICES.items()
        ),
    ]


async def _owner_role(conn: asyncpg.Connection, service: str) -> str | None:
    """The role ``service``'s tables are made as: its own role when it exists, else None (the
    connecting user).

    Raises:
        SetupError: the role exists but the connecting user may not act as it, or it may not
            create tables in this database's schema ``public``.
    """
    role = role_name(service)
    if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
        return None
    if not await conn.fetchval("SELECT pg_has_role(current_user, $1, 'MEMBER')", role):
        user = await conn.fetchval("SELECT current_user")
        raise SetupError(
            f"{user} may not act as {role}: connect as an administrator (DATABASE_URL), "
            f"or GRANT {role} TO {user}"
        )
    if not await conn.fetchval("SELECT has_schema_privilege($1, 'public', 'CREATE')", role):
        raise SetupError(
            f"{role} may not create tables in this database: run `sendtime database roles` here first"
        )
    return role


async def apply_migrations(database_url: str) -> dict[str, list[str]]:
    """Apply every service's pending migrations: the names applied now, per migrations table.

    Raises:
        SetupError: a service's role exists and DATABASE_URL's user may not act as it, or the
            role may not create tables here.
        OSError, asyncpg.PostgresError: the database failed (a failed migration is rolled back).
    """
    applied: dict[str, list[str]] = {}
    for service, directory, table in migration_sets():
        conn = await asyncpg.connect(database_url)
        try:
            role = await _owner_role(conn, service)
        finally:
            await conn.close()

        # Set at connection start, so it outlasts the pool's reset between acquires.
        acting_as = {"role": role} if role else None
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1, server_settings=acting_as)
        try:
            applied[table] = await migrate(pool, directory, table=table)
        finally:
            await pool.close()
    return applied


async def apply_streams(settings: JetStreamSettings) -> list[str]:
    """Make the streams, or bring them up to ``settings``: their names.

    Raises:
        EventLogUnavailable: NATS refused the connection or the stream configuration.
    """
    managing = replace(settings, manage_streams=True)
    log = await JetStreamEventLog.connect(managing)
    await log.close()
    return [managing.stream, managing.erasure_stream, managing.profile_change_stream]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(handler=_run)


def run(env: Mapping[str, str]) -> int:
    """The whole setup with the settings in ``env``; 0 when both steps are done, 1 otherwise
    (the reason on stderr)."""
    try:
        stream_settings = JetStreamSettings.from_env(env)
        applied = asyncio.run(apply_migrations(env.get("DATABASE_URL") or DEFAULT_DATABASE_URL))
        for table, names in applied.items():
            print(f"{table}: " + (f"applied {', '.join(names)}" if names else "up to date"))
        streams = asyncio.run(apply_streams(stream_settings))
    except (ConfigError, SetupError, EventLogUnavailable, OSError, asyncpg.PostgresError) as exc:
        print(f"sendtime setup: {exc}", file=sys.stderr)
        return 1
    print(f"streams ready: {', '.join(streams)}")
    return 0


def _run(args: argparse.Namespace) -> int:
    return run(os.environ)
