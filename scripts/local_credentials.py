"""The credentials a local suite (``make run``, ``make demo``, the end-to-end tests) runs with:

- a local CA and a server certificate for localhost, 127.0.0.1 and ::1 (``.run/tls/``), so that
  every port serves TLS; and a client certificate for render (``spiffe://sendtime.local/render``)
  for when profile asks for one (mutual TLS);
- an admin API key for the person at the keyboard, and render's own key, which can only read
  profiles (``.run/secrets/``, readable by the owner only).

All are reused while they stay good (certificates: 30 more days and signed by the CA; keys:
active in the database), and made anew otherwise."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

import local_ca
from sendtime_common.auth.api_keys import ALL_SCOPES, Scope
from sendtime_common.auth.key_store import KeyState, KeyStore

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/sendtime"


RENDER_IDENTITY = "spiffe://sendtime.local/render"


@dataclass(frozen=True, slots=True)
class LocalTls:
    ca_file: Path
    server_cert_file: Path
    server_key_file: Path
    render_cert_file: Path
    render_key_file: Path


@dataclass(frozen=True, slots=True)
class LocalCredentials:
    admin_key_file: Path
    render_key_file: Path
    tls: LocalTls

    @property
    def admin_key(self) -> str:
        return self.admin_key_file.read_text().strip()

    def service_env(self) -> dict[str, str]:
        """What the services need in their environment: TLS on every port, and render's key and
        trust for its calls to profile."""
        return {
            "TLS_CERT_FILE": str(self.tls.server_cert_file),
            "TLS_KEY_FILE": str(self.tls.server_key_file),
            "PROFILE_SERVICE_CA_FILE": str(self.tls.ca_file),
            "PROFILE_SERVICE_API_KEY_FILE": str(self.render_key_file),
        }


def ensure_local_tls(directory: Path) -> LocalTls:
    """The local CA and the certificates it signs, made where missing or due to expire."""
    directory.mkdir(parents=True, exist_ok=True)
    tls = LocalTls(
        ca_file=directory / "ca.crt",
        server_cert_file=directory / "server.crt",
        server_key_file=directory / "server.key",
        render_cert_file=directory / "render-client.crt",
        render_key_file=directory / "render-client.key",
    )
    ca = local_ca.load(tls.ca_file, directory / "ca.key")
    if ca is None or not local_ca.still_good(ca, ca, margin=timedelta(days=60)):
        ca = local_ca.make_ca()
        ca.write(tls.ca_file, directory / "ca.key")
    server = local_ca.load(tls.server_cert_file, tls.server_key_file)
    if not local_ca.still_good(server, ca):
        local_ca.issue(ca, local_ca.LOCAL_SERVER_NAMES, server=True, client=False).write(
            tls.server_cert_file, tls.server_key_file
        )
    render = local_ca.load(tls.render_cert_file, tls.render_key_file)
    if not local_ca.still_good(render, ca):
        local_ca.issue(ca, (RENDER_IDENTITY,), server=False, client=True).write(
            tls.render_cert_file, tls.render_key_file
        )
    return tls


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


async def _ensure(database_url: str, directory: Path, tls: LocalTls) -> LocalCredentials:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        store = KeyStore(pool)
        await store.migrate()
        credentials = LocalCredentials(directory / "admin.key", directory / "render.key", tls)
        await _ensure_key(store, credentials.admin_key_file, "local admin (make run)", ALL_SCOPES)
        await _ensure_key(store, credentials.render_key_file, "render (make run)", [Scope.PROFILES_READ])
        return credentials
    finally:
        await pool.close()


def ensure_local_credentials(env: Mapping[str, str], run_dir: Path) -> LocalCredentials:
    """The suite's certificates (under ``run_dir/tls``) and keys (made in DATABASE_URL's
    database), made where missing or no longer good. Synchronous: call it outside an event loop.

    Raises:
        OSError, asyncpg.PostgresError: the database cannot be reached.
    """
    database_url = env.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    tls = ensure_local_tls(run_dir / "tls")
    return asyncio.run(_ensure(database_url, secrets_dir(run_dir), tls))
