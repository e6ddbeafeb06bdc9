"""TLS and mutual TLS on the real gRPC server bootstrap and services: certificates made by a
local CA, client identities mapped to scopes, certificates rotated on disk while calls run,
plaintext only when allowed, and render calling an mTLS profile service with its certificate."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

import local_ca
from ingest.webhooks import WebhookServer, WebhookSettings
from profile_service.server import create_app as create_profile_app
from profile_service.settings import Settings as ProfileSettings
from render.server import create_app as create_render_app
from sendtime.profile.v1 import profile_pb2
from sendtime.render.v1 import render_pb2, render_pb2_grpc
from sendtime_common.auth.access import AccessInterceptor, Authenticator, MethodAccess
from sendtime_common.auth.api_keys import Scope
from sendtime_common.auth.audit import AuditTrail
from sendtime_common.auth.client import bearer_metadata
from sendtime_common.auth.key_store import KeyStore
from sendtime_common.auth.keyring import KeyRing
from sendtime_common.auth.server_auth import AuthSettings
from sendtime_common.config import ConfigError
from sendtime_common.event_log import JetStreamSettings
from sendtime_common.grpc_server import GrpcServer
from sendtime_common.identifiers import IdentifierHasher
from sendtime_common.tls import ClientTls, TlsSettings, channel
from tests.conftest import eventually, render_settings

RENDER_IDENTITY = "spiffe://sendtime.local/render"
READ, ERASE = "/test.Guarded/Read", "/test.Guarded/Erase"


@dataclass
class Pki:
    """A CA and the files a server and its clients use, in ``directory``."""

    directory: Path
    ca: local_ca.Issued

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.crt"

    def server(self, name: str = "server") -> tuple[Path, Path]:
        issued = local_ca.issue(self.ca, local_ca.LOCAL_SERVER_NAMES, server=True, client=False)
        issued.write(self.directory / f"{name}.crt", self.directory / f"{name}.key")
        return self.directory / f"{name}.crt", self.directory / f"{name}.key"

    def client(self, identity: str, name: str) -> ClientTls:
        issued = local_ca.issue(self.ca, (identity,), server=False, client=True)
        issued.write(self.directory / f"{name}.crt", self.directory / f"{name}.key")
        return ClientTls(
            ca_file=str(self.ca_file),
            cert_file=str(self.directory / f"{name}.crt"),
            key_file=str(self.directory / f"{name}.key"),
        )


def make_pki(directory: Path, name: str = "ca") -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = local_ca.make_ca(f"test {name}")
    local_ca.write_file(directory / "ca.crt", ca.certificate_pem, 0o644)
    return Pki(directory, ca)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


class Guarded:
    """Two raw-bytes methods: one needing profiles.read, one profiles.erase; answers the caller."""

    def register(self, server: grpc.aio.Server) -> None:
        async def answer(request: bytes, context: Any) -> bytes:
            return b"ok"

        handler = grpc.method_handlers_generic_handler(
            "test.Guarded",
            {
                "Read": grpc.unary_unary_rpc_method_handler(answer),
                "Erase": grpc.unary_unary_rpc_method_handler(answer),
            },
        )
        server.add_generic_rpc_handlers((handler,))


@asynccontextmanager
async def guarded_server(
    database_url: str, tls: TlsSettings, identities: dict[str, frozenset[Scope]] | None = None
) -> AsyncIterator[GrpcServer]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:  # closed also when the server refuses to start (else it outlives the test's database)
        store = KeyStore(pool)
        await store.migrate()
        ring = KeyRing(store)
        await ring.load()
        access = AccessInterceptor(
            {READ: MethodAccess(READ, Scope.PROFILES_READ), ERASE: MethodAccess(ERASE, Scope.PROFILES_ERASE)},
            Authenticator(ring, identities),
            AuditTrail(pool, "test"),
            IdentifierHasher.unkeyed(),
        )
        server = GrpcServer(
            "127.0.0.1:0", ["test.Guarded"], Guarded().register, access, tls=tls, health_address="127.0.0.1:0"
        )
        await server.start()
        try:
            yield server
        finally:
            await server.stop(0)
    finally:
        await pool.close()


async def call(target: str, tls: ClientTls, method: str, metadata: tuple[tuple[str, str], ...] = ()) -> str:
    """ "ok", or the status code's name."""
    async with channel(target, tls) as calls:
        try:
            await calls.unary_unary(method, None, None)(b"", metadata=metadata, timeout=5)
            return "ok"
        except grpc.aio.AioRpcError as exc:
            return exc.code().name


async def server_certificate_serial(port: int, ca_file: Path) -> int:
    """The serial number of the certificate a new TLS connection to ``port`` is shown."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.set_alpn_protocols(["h2"])  # gRPC's TLS wants ALPN
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    return x509.load_der_x509_certificate(der).serial_number


async def test_a_server_with_a_certificate_serves_tls_and_health_in_plaintext_on_its_own_port(
    pki: Pki, database_url: str, admin_key: str
) -> None:
    cert, key = pki.server()
    async with guarded_server(database_url, TlsSettings(cert_file=str(cert), key_file=str(key))) as server:
        assert server.tls_mode == "tls"
        target = f"127.0.0.1:{server.port}"
        trusted = ClientTls(ca_file=str(pki.ca_file))
        assert await call(target, trusted, READ, bearer_metadata(admin_key)) == "ok"
        assert await call(target, trusted, READ) == "UNAUTHENTICATED"
        assert (
            await call(target, ClientTls(plaintext=True), READ, bearer_metadata(admin_key)) == "UNAVAILABLE"
        )
        stranger = make_pki(pki.directory / "other", "other")
        assert (
            await call(target, ClientTls(ca_file=str(stranger.ca_file)), READ, bearer_metadata(admin_key))
            == "UNAVAILABLE"
        )

        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as probe:
            reply = await health_pb2_grpc.HealthStub(probe).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as caught:  # the health port serves health only
                await probe.unary_unary(READ, None, None)(b"", metadata=bearer_metadata(admin_key))
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_without_a_certificate_a_server_refuses_to_start_unless_plaintext_is_allowed(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConfigError, match="ALLOW_PLAINTEXT"):
        async with guarded_server(database_url, TlsSettings()):
            pass
    with caplog.at_level(logging.WARNING, logger="sendtime_common.tls"):
        async with guarded_server(database_url, TlsSettings(allow_plaintext=True)) as server:
            assert server.tls_mode == "plaintext"
    assert any("PLAINTEXT" in record.getMessage() for record in caplog.records)


async def test_mutual_tls_maps_a_client_certificate_to_its_scopes(
    pki: Pki, database_url: str, admin_key: str
) -> None:
    cert, key = pki.server()
    tls = TlsSettings(cert_file=str(cert), key_file=str(key), client_ca_file=str(pki.ca_file))
    identities = {RENDER_IDENTITY: frozenset({Scope.PROFILES_READ})}
    async with guarded_server(database_url, tls, identities) as server:
        assert server.tls_mode == "mtls"
        target = f"127.0.0.1:{server.port}"
        render = pki.client(RENDER_IDENTITY, "render")
        assert await call(target, render, READ) == "ok"
        assert await call(target, render, ERASE) == "PERMISSION_DENIED"
        assert await call(target, render, ERASE, bearer_metadata(admin_key)) == "ok"  # a key's scopes win

        unmapped = pki.client("spiffe://sendtime.local/someone-else", "unmapped")
        assert await call(target, unmapped, READ) == "UNAUTHENTICATED"
        assert (
            await call(target, ClientTls(ca_file=str(pki.ca_file)), READ, bearer_metadata(admin_key))
            == "UNAVAILABLE"
        )
        outsider = make_pki(pki.directory / "outsider", "outsider")
        forged = outsider.client(RENDER_IDENTITY, "forged")  # the right name, the wrong CA
        assert (
            await call(
                target,
                ClientTls(ca_file=str(pki.ca_file), cert_file=forged.cert_file, key_file=forged.key_file),
                READ,
            )
            == "UNAVAILABLE"
        )


async def test_a_certificate_rotated_on_disk_is_served_to_new_connections_while_calls_run(
    pki: Pki, database_url: str, admin_key: str
) -> None:
    cert, key = pki.server()
    first_serial = x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
    async with guarded_server(database_url, TlsSettings(cert_file=str(cert), key_file=str(key))) as server:
        target = f"127.0.0.1:{server.port}"
        trusted = ClientTls(ca_file=str(pki.ca_file))
        assert await server_certificate_serial(server.port, pki.ca_file) == first_serial
        outcomes: list[str] = []
        stop = asyncio.Event()

        async def keep_calling() -> None:
            async with channel(target, trusted) as calls:  # one connection, open across the rotation
                method = calls.unary_unary(READ, None, None)
                while not stop.is_set():
                    try:
                        await method(b"", metadata=bearer_metadata(admin_key), timeout=5)
                        outcomes.append("ok")
                    except grpc.aio.AioRpcError as exc:
                        outcomes.append(exc.code().name)
                    await asyncio.sleep(0.005)

        async def answered(calls: int) -> bool:
            return len(outcomes) >= calls

        callers = [asyncio.create_task(keep_calling()) for _ in range(4)]
        # Calls run on the open connections before the rotation (however long they take)...
        await eventually(partial(answered, 30))
        # A bad rotation first: a new certificate with the old key. It is refused, the old one kept.
        renewed = local_ca.issue(pki.ca, local_ca.LOCAL_SERVER_NAMES, server=True, client=False)
        local_ca.write_file(cert, renewed.certificate_pem, 0o644)
        assert await server_certificate_serial(server.port, pki.ca_file) == first_serial
        assert server.certificates is not None and server.certificates.reloads == 0
        local_ca.write_file(key, renewed.key_pem, 0o600)  # now the pair is whole: served from here on
        assert await server_certificate_serial(server.port, pki.ca_file) == renewed.certificate.serial_number
        assert server.certificates.reloads == 1
        assert await call(target, trusted, READ, bearer_metadata(admin_key)) == "ok"  # a new connection
        await eventually(partial(answered, len(outcomes) + 30))  # ...and after it
        stop.set()
        await asyncio.gather(*callers)
    assert len(outcomes) > 50 and set(outcomes) == {"ok"}


async def test_render_reads_an_mtls_profile_service_with_its_certificate_alone(
    pki: Pki, database_url: str, redis_url: str, nats_url: str, admin_key: str, unique: str
) -> None:
    cert, key = pki.server()
    profile_app = await create_profile_app(
        ProfileSettings(
            address="127.0.0.1:0",
            health_address="127.0.0.1:0",
            tls=TlsSettings(cert_file=str(cert), key_file=str(key), client_ca_file=str(pki.ca_file)),
            database_url=database_url,
            redis_url=redis_url,
            consumer_name=f"mtls-{unique}",
            event_log=JetStreamSettings(url=nats_url),
            auth=AuthSettings(mtls_identities={RENDER_IDENTITY: frozenset({Scope.PROFILES_READ})}),
        )
    )
    await profile_app.grpc.start()
    render = await create_render_app(
        render_settings(
            f"localhost:{profile_app.grpc.port}",
            database_url,
            nats_url,
            redis_url="",
            profile_api_key="",
            profile_tls=pki.client(RENDER_IDENTITY, "render"),
        )
    )
    await render.grpc.start()
    try:

        async def render_nobody() -> render_pb2.RenderResponse:
            async with channel(f"127.0.0.1:{render.grpc.port}", ClientTls(plaintext=True)) as calls:
                answer: render_pb2.RenderResponse = await render_pb2_grpc.RenderServiceStub(calls).Render(
                    render_pb2.RenderRequest(
                        customer=profile_pb2.Identifier(
                            kind=profile_pb2.IDENTIFIER_KIND_USER_ID, value=f"nobody-{unique}"
                        ),
                        template=render_pb2.Template(subject="Hi {{ profile.traits.first_name }}"),
                    ),
                    metadata=bearer_metadata(admin_key),
                    timeout=5,
                )
                return answer

        # Profile answered (not found): render's certificate was accepted and mapped to profiles.read.
        assert (await render_nobody()).fallback_reason == render_pb2.FALLBACK_REASON_PROFILE_NOT_FOUND

        # Its certificate renewed on disk: render reopens the channel with it and goes on.
        before = render.profile_channel.stub
        watching = asyncio.create_task(render.profile_channel.watch(interval_s=0.05))
        pki.client(RENDER_IDENTITY, "render")
        while render.profile_channel.stub is before:
            await asyncio.sleep(0.05)
        watching.cancel()
        assert (await render_nobody()).fallback_reason == render_pb2.FALLBACK_REASON_PROFILE_NOT_FOUND
    finally:
        await render.stop(grace_s=1)
        await profile_app.stop(grace_s=1)


async def test_webhooks_serve_https_and_reload_a_rotated_certificate(pki: Pki) -> None:
    cert, key = pki.server()

    class NoEvents:
        async def ingest_batch(self, events: list[Any]) -> list[Any]:
            return []

        async def quarantine(self, provider: Any, webhook_id: str, items: Any) -> None:
            return None

    server = WebhookServer(
        NoEvents(),
        WebhookSettings(address="127.0.0.1:0", shopify_secret="s"),
        tls=TlsSettings(cert_file=str(cert), key_file=str(key)),
        quarantine=NoEvents(),
    )
    await server.start()
    try:
        trusted = ssl.create_default_context(cafile=str(pki.ca_file))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"https://localhost:{server.port}/healthz", ssl=trusted) as reply:
                assert reply.status == 200
            with pytest.raises(aiohttp.ClientError):
                async with http.get(f"http://localhost:{server.port}/healthz") as reply:
                    await reply.read()
        renewed = local_ca.issue(pki.ca, local_ca.LOCAL_SERVER_NAMES, server=True, client=False)
        renewed.write(cert, key)

        # The listener looks once a second: until it has (a fixed wait raced it on a busy machine).
        async def reloaded() -> bool:
            served = await server_certificate_serial(server.port, pki.ca_file)
            return served == renewed.certificate.serial_number

        await eventually(reloaded, timeout_s=10)
    finally:
        await server.stop()
