"""The credentials a local suite (``make run``, ``make demo``, the end-to-end tests) runs with:

- a local CA and a server certificate for localhost, 127.0.0.1 and ::1 (``.run/tls/``), so that
  every port serves TLS; and a client certificate for render (``spiffe://sendtime.local/render``)
  for when profile asks for one (mutual TLS);
- an admin API key for the person at the keyboard, render's own key, which can only read
  profiles, the triggers service's two: one that can only read profiles, one that can only
  render, and the sync service's two: one that can only send events, one that can only read
  profiles (``.run/secrets/``, readable by the owner only); and the key triggers seals webhook
  secrets with;
- a NATS user per service (devstack's NATS) and a PostgreSQL role per service, each with only
  what its service needs (passwords in ``.run/secrets/``).

All are reused while they stay good (certificates: 30 more days and signed by the CA; keys:
active in the database), and made anew otherwise."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
from redis.exceptions import RedisError

import local_ca
import nats_auth
import redis_acl
from sendtime_cli import database
from sendtime_common.auth.api_keys import ALL_SCOPES, Scope
from sendtime_common.auth.key_store import KeyState, KeyStore

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/sendtime"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


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
    triggers_profile_key_file: Path
    triggers_render_key_file: Path
    sync_ingest_key_file: Path  # sync to ingest: events.write only
    sync_profile_key_file: Path  # sync to profile (push connectors): profiles.read only
    prometheus_key_file: Path  # what a Prometheus scrapes the metrics ports with (metrics.read)
    tls: LocalTls
    run_dir: Path
    own_nats: bool  # devstack's NATS, with a user per service
    # Each service's DATABASE_URL (its own role, sendtime_cli.database); empty: all use DATABASE_URL.
    database_urls: Mapping[str, str]
    # Each Redis user's URL (its own ACL user, redis_acl); empty: all use REDIS_URL.
    redis_urls: Mapping[str, str]

    @property
    def admin_key(self) -> str:
        return self.admin_key_file.read_text().strip()

    def service_env(self, service: str) -> dict[str, str]:
        """What ``service`` needs in its environment: TLS on every port, its own keys and trust
        for its calls to other services, and its NATS user on devstack's NATS."""
        env = {
            "IDENTIFIER_HASH_KEYS_FILE": str(identifier_hash_keys(self.run_dir)),
            "TLS_CERT_FILE": str(self.tls.server_cert_file),
            "TLS_KEY_FILE": str(self.tls.server_key_file),
            "PROFILE_SERVICE_CA_FILE": str(self.tls.ca_file),
            "PROFILE_SERVICE_API_KEY_FILE": str(self.render_key_file),
        }
        if service == "triggers":
            env |= {
                "PROFILE_SERVICE_API_KEY_FILE": str(self.triggers_profile_key_file),
                "RENDER_SERVICE_CA_FILE": str(self.tls.ca_file),
                "RENDER_SERVICE_API_KEY_FILE": str(self.triggers_render_key_file),
                "TRIGGERS_SECRET_KEYS_FILE": str(triggers_secret_keys(self.run_dir)),
            }
        if service == "sync":
            env |= {
                "INGEST_SERVICE_CA_FILE": str(self.tls.ca_file),
                "INGEST_SERVICE_API_KEY_FILE": str(self.sync_ingest_key_file),
                "PROFILE_SERVICE_API_KEY_FILE": str(self.sync_profile_key_file),
            }
        if self.own_nats:
            env.update(nats_service_env(self.run_dir, service))
        if service in self.database_urls:
            env["DATABASE_URL"] = self.database_urls[service]
        if service in ("ingest", "profile", "triggers", "sync") and service in self.redis_urls:
            env["REDIS_URL"] = self.redis_urls[service]
        if service == "render" and "render" in self.redis_urls:
            env["RENDER_REDIS_URL"] = self.redis_urls["render"]
        return env


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


def nats_passwords(run_dir: Path) -> dict[str, Path]:
    """Each service's password for devstack's NATS (``.run/secrets/nats-<service>.password``),
    made once: the service name and the file holding its password."""
    directory = secrets_dir(run_dir)
    files = {}
    for service in nats_auth.SERVICES:
        path = directory / f"nats-{service}.password"
        if not path.exists() or not path.read_text().strip():
            _write_secret(path, secrets.token_urlsafe(24))
        files[service] = path
    return files


def identifier_hash_keys(run_dir: Path) -> Path:
    """The file holding the key every service names erased people with (IDENTIFIER_HASH_KEYS):
    32 random bytes, base64, made once."""
    path = secrets_dir(run_dir) / "identifier-hash-keys"
    if not path.exists() or not path.read_text().strip():
        _write_secret(path, base64.b64encode(secrets.token_bytes(32)).decode())
    return path


def triggers_secret_keys(run_dir: Path) -> Path:
    """The file holding the key triggers seals webhooks' signing secrets with
    (TRIGGERS_SECRET_KEYS): 32 random bytes, base64, made once."""
    path = secrets_dir(run_dir) / "triggers-secret-keys"
    if not path.exists() or not path.read_text().strip():
        _write_secret(path, base64.b64encode(secrets.token_bytes(32)).decode())
    return path


def nats_service_env(run_dir: Path, service: str) -> dict[str, str]:
    """How ``service`` signs in to devstack's NATS: its user, its password file, and whether it
    manages the streams (profile does)."""
    return {
        "NATS_USER": nats_auth.user_name(service),
        "NATS_PASSWORD_FILE": str(nats_passwords(run_dir)[service]),
        "NATS_MANAGE_STREAMS": "true" if service == "profile" else "false",
    }


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


async def _usable(store: KeyStore, path: Path, scopes: frozenset[Scope]) -> bool:
    """Whether the key in ``path`` is an active key of this database holding ``scopes`` (a key
    made before a scope existed is made again: the admin key must hold every scope)."""
    try:
        record = await store.find(path.read_text().strip())
    except OSError:
        return False
    return (
        record is not None and record.state(datetime.now(UTC)) is KeyState.ACTIVE and scopes <= record.scopes
    )


async def _ensure_key(store: KeyStore, path: Path, name: str, scopes: Iterable[Scope]) -> None:
    scopes = frozenset(scopes)
    if not await _usable(store, path, scopes):
        _, key = await store.create(name, scopes, "cli:make-run")
        _write_secret(path, key)


def _password(path: Path) -> str:
    if not path.exists() or not path.read_text().strip():
        _write_secret(path, secrets.token_urlsafe(24))
    return path.read_text().strip()


def with_user(database_url: str, user: str, password: str) -> str:
    parts = urlsplit(database_url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{quote(user)}:{quote(password, safe='')}@{host}"))


async def _database_roles(database_url: str, run_dir: Path) -> dict[str, str]:
    """A role per service (sendtime_cli.database) where DATABASE_URL's user may make roles:
    each service's DATABASE_URL. Empty where it may not (then every service uses DATABASE_URL)."""
    conn = await asyncpg.connect(database_url)
    try:
        may = await conn.fetchval(
            "SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user"
        )
    finally:
        await conn.close()
    if not may:
        return {}
    directory = secrets_dir(run_dir)
    passwords = {service: _password(directory / f"db-{service}.password") for service in database.SERVICES}
    await database.setup_roles(database_url, passwords)
    return {
        service: with_user(database_url, database.role_name(service), password)
        for service, password in passwords.items()
    }


async def _redis_users(redis_url: str, run_dir: Path) -> dict[str, str]:
    """An ACL user per service that uses Redis (redis_acl): each one's Redis URL. Empty where
    REDIS_URL's user may not manage ACLs (then the services use REDIS_URL)."""
    directory = secrets_dir(run_dir)
    passwords = {
        service: _password(directory / f"redis-{service}.password") for service in redis_acl.SERVICES
    }
    try:
        await redis_acl.setup_users(redis_url, passwords)
    except RedisError:
        return {}
    return {
        service: with_user(redis_url, redis_acl.user_name(service), password)
        for service, password in passwords.items()
    }


async def _ensure(
    database_url: str, redis_url: str, run_dir: Path, tls: LocalTls, own_nats: bool
) -> LocalCredentials:
    directory = secrets_dir(run_dir)
    database_urls = await _database_roles(database_url, run_dir)
    redis_urls = await _redis_users(redis_url, run_dir)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        store = KeyStore(pool)
        await store.migrate()
        credentials = LocalCredentials(
            directory / "admin.key",
            directory / "render.key",
            directory / "triggers-profile.key",
            directory / "triggers-render.key",
            directory / "sync-ingest.key",
            directory / "sync-profile.key",
            directory / "prometheus.key",
            tls,
            run_dir,
            own_nats,
            database_urls,
            redis_urls,
        )
        await _ensure_key(store, credentials.admin_key_file, "local admin (make run)", ALL_SCOPES)
        await _ensure_key(store, credentials.render_key_file, "render (make run)", [Scope.PROFILES_READ])
        await _ensure_key(
            store,
            credentials.triggers_profile_key_file,
            "triggers to profile (make run)",
            [Scope.PROFILES_READ],
        )
        await _ensure_key(
            store, credentials.triggers_render_key_file, "triggers to render (make run)", [Scope.RENDER]
        )
        await _ensure_key(
            store, credentials.sync_ingest_key_file, "sync to ingest (make run)", [Scope.EVENTS_WRITE]
        )
        await _ensure_key(
            store, credentials.sync_profile_key_file, "sync to profile (make run)", [Scope.PROFILES_READ]
        )
        await _ensure_key(
            store, credentials.prometheus_key_file, "prometheus (make run)", [Scope.METRICS_READ]
        )
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
    redis_url = env.get("REDIS_URL") or DEFAULT_REDIS_URL
    tls = ensure_local_tls(run_dir / "tls")
    return asyncio.run(_ensure(database_url, redis_url, run_dir, tls, own_nats=not env.get("NATS_URL")))
