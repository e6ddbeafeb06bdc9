"""The credentials ``make run`` gives each service (scripts/local_credentials.py): each caller
calls with a key of its own that holds only the scope it needs, and trusts the local CA."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

import local_credentials
from local_credentials import LocalCredentials, LocalTls
from sendtime_common.auth.api_keys import Scope
from sendtime_common.auth.key_store import KeyStore

# Who calls whom locally (scripts/suite.py points each *_SERVICE_TARGET at the suite's callee).
CALLS = {
    "render": {"PROFILE_SERVICE": "render.key"},
    "triggers": {"PROFILE_SERVICE": "triggers-profile.key", "RENDER_SERVICE": "triggers-render.key"},
    "sync": {"INGEST_SERVICE": "sync-ingest.key", "PROFILE_SERVICE": "sync-profile.key"},
}
SCOPES = {
    "render.key": {Scope.PROFILES_READ},
    "triggers-profile.key": {Scope.PROFILES_READ},
    "triggers-render.key": {Scope.RENDER},
    "sync-ingest.key": {Scope.EVENTS_WRITE},
    "sync-profile.key": {Scope.PROFILES_READ},
}


def credentials(run_dir: Path) -> LocalCredentials:
    secrets, tls = run_dir / "secrets", run_dir / "tls"
    return LocalCredentials(
        secrets / "admin.key",
        secrets / "render.key",
        secrets / "triggers-profile.key",
        secrets / "triggers-render.key",
        secrets / "sync-ingest.key",
        secrets / "sync-profile.key",
        secrets / "prometheus.key",
        LocalTls(*(tls / name for name in ("ca.crt", "server.crt", "server.key", "r.crt", "r.key"))),
        run_dir,
        own_nats=False,
        database_urls={},
        redis_urls={},
    )


@pytest.mark.parametrize("service", sorted(CALLS))
def test_each_caller_calls_with_its_own_key_and_trusts_the_local_ca(tmp_path: Path, service: str) -> None:
    given = credentials(tmp_path)
    env = given.service_env(service)
    for callee, key_file in CALLS[service].items():
        assert env[f"{callee}_API_KEY_FILE"] == str(tmp_path / "secrets" / key_file)
        assert env[f"{callee}_CA_FILE"] == str(given.tls.ca_file)
        assert f"{callee}_CERT_FILE" not in env  # the suite's profile asks no client certificate
    called = {name.removesuffix("_API_KEY_FILE") for name in env if name.endswith("_API_KEY_FILE")}
    assert called == set(CALLS[service])  # no key for a service it does not call


async def test_the_callers_keys_hold_only_their_scopes(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def none(*_: object) -> dict[str, str]:
        return {}

    # Keys only: no roles or ACL users (the other services' tests share this PostgreSQL and Redis).
    monkeypatch.setattr(local_credentials, "_database_roles", none)
    monkeypatch.setattr(local_credentials, "_redis_users", none)
    tls = local_credentials.ensure_local_tls(tmp_path / "tls")
    made = await local_credentials._ensure(database_url, "", tmp_path, tls, own_nats=False)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        store = KeyStore(pool)
        for key_file, scopes in SCOPES.items():
            record = await store.find((made.run_dir / "secrets" / key_file).read_text().strip())
            assert record is not None and set(record.scopes) == scopes, key_file
    finally:
        await pool.close()
