"""The credentials a local suite (``make run``, ``make demo``, the end-to-end tests) runs with:
an admin API key for the person at the keyboard, and render's own key, which can only read
profiles. They are kept under the run directory (``.run/secrets/``, readable by the owner only)
and reused while the database still holds them as active; otherwise new ones are made."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from sendtime_common.auth.api_keys import ALL_SCOPES, Scope
from sendtime_common.auth.key_store import KeyState, KeyStore

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/sendtime"


@dataclass(frozen=True, slots=True)
class LocalCredentials:
    admin_key_file: Path
    render_key_file: Path

    @property
    def admin_key(self) -> str:
        return self.admin_key_file.read_text().strip()

    def service_env(self) -> dict[str, str]:
        """What the services need in their environment."""
        return {"PROFILE_SERVICE_API_KEY_FILE": str(self.render_key_file)}


def secrets_dir(run_dir: Path) -> Path:
    path = run_dir / "secrets"
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _write_secret(path: Path, text: str) -> None:
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text + "\n")


async def _usable(store: KeyStore, path: Path) -> bool:
    """Whether the key in ``path`` is an active key of this database."""
    try:
        record = await store.find(path.read_text().strip())
    except OSError:
        return False
    return record is not None and record.state(datetime.now(UTC)) is KeyState.ACTIVE


async def _ensure_key(store: KeyStore, path: Path, name: str, scopes: Iterable[Scope]) -> None:
    if not await _usable(store, path):
        _, key = await store.create(name, scopes, "cli:make-run")
        _write_secret(path, key)


async def _ensure(database_url: str, directory: Path) -> LocalCredentials:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        store = KeyStore(pool)
        await store.migrate()
        credentials = LocalCredentials(directory / "admin.key", directory / "render.key")
        await _ensure_key(store, credentials.admin_key_file, "local admin (make run)", ALL_SCOPES)
        await _ensure_key(store, credentials.render_key_file, "render (make run)", [Scope.PROFILES_READ])
        return credentials
    finally:
        await pool.close()


def ensure_local_credentials(env: Mapping[str, str], run_dir: Path) -> LocalCredentials:
    """The suite's keys, made in DATABASE_URL's database where missing or no longer active.
    Synchronous: call it outside an event loop.

    Raises:
        OSError, asyncpg.PostgresError: the database cannot be reached.
    """
    database_url = env.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    return asyncio.run(_ensure(database_url, secrets_dir(run_dir)))
