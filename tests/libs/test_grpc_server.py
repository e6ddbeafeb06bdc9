"""The shared server bootstrap: health, reflection, and a graceful drain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sendtime_common.auth.access import AccessInterceptor, Authenticator, MethodAccess
from sendtime_common.auth.api_keys import Scope
from sendtime_common.auth.audit import AuditTrail
from sendtime_common.auth.key_store import KeyStore
from sendtime_common.auth.keyring import KeyRing
from sendtime_common.grpc_server import GrpcServer
from sendtime_common.identifiers import IdentifierHasher
from tests.conftest import LOCAL_SERVER, channel

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


TEST_METHODS = ("/test.Slow/Wait", "/test.Burst/Pause")


@pytest.fixture
async def access(database_url: str) -> AsyncIterator[AccessInterceptor]:
    """The access check every service has, with rules for the test methods."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    store = KeyStore(pool)
    await store.migrate()
    ring = KeyRing(store)
    await ring.load()
    yield AccessInterceptor(
        {method: MethodAccess(method, Scope.RENDER) for method in TEST_METHODS},
        Authenticator(ring),
        AuditTrail(pool, "test"),
        IdentifierHasher.unkeyed(),
    )
    await pool.close()


class SlowService:
    """A raw-bytes service whose one method waits until released."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def wait(self, request: bytes, context: Any) -> bytes:
        self.started.set()
        await self.release.wait()
        return b"done:" + request

    def register(self, server: grpc.aio.Server) -> None:
        handler = grpc.method_handlers_generic_handler(
            "test.Slow", {"Wait": grpc.unary_unary_rpc_method_handler(self.wait)}
        )
        server.add_generic_rpc_handlers((handler,))


async def test_stop_reports_not_serving_and_lets_in_flight_calls_finish(
    access: AccessInterceptor, admin_key: str
) -> None:
    service = SlowService()
    server = GrpcServer(
        "127.0.0.1:0",
        ["test.Slow"],
        service.register,
        access,
        tls=LOCAL_SERVER["tls"],
        health_address="127.0.0.1:0",
    )
    await server.start()
    async with channel(f"127.0.0.1:{server.port}", admin_key) as calls:
        health = health_pb2_grpc.HealthStub(calls)
        assert (await health.Check(health_pb2.HealthCheckRequest(service=""))).status == SERVING
        assert (await health.Check(health_pb2.HealthCheckRequest(service="test.Slow"))).status == SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == SERVING

        wait = calls.unary_unary("/test.Slow/Wait", None, None)  # raw bytes both ways
        in_flight = asyncio.ensure_future(wait(b"x", timeout=10))
        await service.started.wait()

        stopping = asyncio.create_task(server.stop(grace_s=10))
        assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
        watch.cancel()  # an open watch would otherwise hold the drain for the whole grace period
        assert not in_flight.done()

        service.release.set()
        assert await in_flight == b"done:x"
        await stopping

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await wait(b"y", timeout=2)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_reflection_lists_the_services(access: AccessInterceptor, admin_key: str) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    server = GrpcServer(
        "127.0.0.1:0",
        ["test.Slow"],
        SlowService().register,
        access,
        tls=LOCAL_SERVER["tls"],
        health_address="127.0.0.1:0",
    )
    await server.start()
    try:
        async with channel(f"127.0.0.1:{server.port}", admin_key) as calls:
            stub = reflection_pb2_grpc.ServerReflectionStub(calls)
            call = stub.ServerReflectionInfo()
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            await call.done_writing()
            names = {s.name async for r in call for s in r.list_services_response.service}
        assert names == {"test.Slow", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    finally:
        await server.stop(grace_s=0)


async def test_service_calls_are_traced_and_health_checks_are_not(
    span_exporter: Any, access: AccessInterceptor, admin_key: str
) -> None:
    service = SlowService()
    service.release.set()
    server = GrpcServer(
        "127.0.0.1:0",
        ["test.Slow"],
        service.register,
        access,
        tls=LOCAL_SERVER["tls"],
        health_address="127.0.0.1:0",
    )
    await server.start()
    try:
        async with channel(f"127.0.0.1:{server.port}", admin_key) as calls:
            assert await calls.unary_unary("/test.Slow/Wait", None, None)(b"x") == b"done:x"
            health = health_pb2_grpc.HealthStub(calls)
            checked = await health.Check(health_pb2.HealthCheckRequest())
            watch = health.Watch(health_pb2.HealthCheckRequest())
            watched = await watch.read()  # a streaming handler the tracing interceptor cannot wrap
            watch.cancel()
    finally:
        await server.stop(grace_s=1)
    assert checked.status == watched.status == SERVING
    names = [span.name for span in span_exporter.get_finished_spans()]
    assert "/test.Slow/Wait" in names
    assert not [name for name in names if name.startswith("/grpc.")]


async def test_a_burst_of_calls_beyond_grpcs_default_pending_limit_is_served_not_cancelled(
    access: AccessInterceptor, admin_key: str
) -> None:
    # gRPC core cancels calls the application has not picked up yet beyond 1,000 by default.
    async def pause(request: bytes, context: Any) -> bytes:
        await asyncio.sleep(0.05)
        return request

    def register(server: grpc.aio.Server) -> None:
        handler = grpc.method_handlers_generic_handler(
            "test.Burst", {"Pause": grpc.unary_unary_rpc_method_handler(pause)}
        )
        server.add_generic_rpc_handlers((handler,))

    server = GrpcServer(
        "127.0.0.1:0", ["test.Burst"], register, access, tls=LOCAL_SERVER["tls"], health_address="127.0.0.1:0"
    )
    await server.start()
    try:
        async with channel(f"127.0.0.1:{server.port}", admin_key) as calls:
            method = calls.unary_unary("/test.Burst/Pause", None, None)

            async def call(n: int) -> str:
                try:
                    answer: bytes = await method(b"%d" % n, timeout=30)
                    return answer.decode()
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name

            answers = await asyncio.gather(*(call(n) for n in range(4000)))
    finally:
        await server.stop(0)
    assert answers == [str(n) for n in range(4000)]
