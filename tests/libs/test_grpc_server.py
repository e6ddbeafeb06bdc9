"""The shared server bootstrap: health, reflection, and a graceful drain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ingest.server import IngestApp
from profile_service.server import ProfileApp
from sendtime_common.auth.access import AccessInterceptor
from sendtime_common.call_limits import MIB, CallLimits
from sendtime_common.config import ConfigError
from sendtime_common.errors import details_of, status_of
from sendtime_common.grpc_server import GrpcServer
from tests.conftest import LOCAL_SERVER, access_checked, channel

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


TEST_METHODS = ("/test.Slow/Wait", "/test.Burst/Pause", "/test.Burst/Follow")


@pytest.fixture
async def access(database_url: str) -> AsyncIterator[AccessInterceptor]:
    """The access check every service has, with rules for the test methods."""
    async with access_checked(database_url, TEST_METHODS) as checked:
        yield checked


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
        "127.0.0.1:0",
        ["test.Burst"],
        register,
        access,
        tls=LOCAL_SERVER["tls"],
        health_address="127.0.0.1:0",
        limits=CallLimits(max_concurrent_calls=5000),  # not shedding: this is about the queue
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


class BurstService:
    """A unary method that pauses (counting how many run at once) and a stream that follows
    until released."""

    def __init__(self) -> None:
        self.running = 0
        self.most_running = 0
        self.release = asyncio.Event()

    async def pause(self, request: bytes, context: Any) -> bytes:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(0.05)
        finally:
            self.running -= 1
        return request

    async def follow(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield b"following"
        await self.release.wait()

    def register(self, server: grpc.aio.Server) -> None:
        handler = grpc.method_handlers_generic_handler(
            "test.Burst",
            {
                "Pause": grpc.unary_unary_rpc_method_handler(self.pause),
                "Follow": grpc.unary_stream_rpc_method_handler(self.follow),
            },
        )
        server.add_generic_rpc_handlers((handler,))


def overload_details(error: grpc.aio.AioRpcError) -> tuple[dict[str, str], float]:
    """The ErrorInfo metadata and RetryInfo delay of a shed call (asserting both are there)."""
    status = status_of(error)
    assert status is not None
    (info,) = details_of(status, error_details_pb2.ErrorInfo)
    (retry,) = details_of(status, error_details_pb2.RetryInfo)
    assert info.reason == "OVERLOADED"
    return dict(info.metadata), retry.retry_delay.ToTimedelta().total_seconds()


async def test_calls_past_the_concurrent_bound_are_shed_at_once_with_retry_info(
    access: AccessInterceptor, admin_key: str
) -> None:
    service = BurstService()
    server = GrpcServer(
        "127.0.0.1:0",
        ["test.Burst"],
        service.register,
        access,
        tls=LOCAL_SERVER["tls"],
        health_address="127.0.0.1:0",
        limits=CallLimits(max_concurrent_calls=50, retry_after_s=0.2),
    )
    await server.start()
    try:
        async with channel(f"127.0.0.1:{server.port}", admin_key) as calls:
            method = calls.unary_unary("/test.Burst/Pause", None, None)
            health = health_pb2_grpc.HealthStub(calls)

            async def call(n: int) -> bytes | grpc.aio.AioRpcError:
                try:
                    answer: bytes = await method(b"%d" % n, timeout=30)
                    return answer
                except grpc.aio.AioRpcError as exc:
                    return exc

            burst = asyncio.gather(*(call(n) for n in range(2000)))
            checks = [await health.Check(health_pb2.HealthCheckRequest(), timeout=5) for _ in range(20)]
            answers = await burst
    finally:
        await server.stop(0)
    assert all(check.status == SERVING for check in checks)  # health is never shed
    served = [a for a in answers if isinstance(a, bytes)]
    shed = [a for a in answers if not isinstance(a, bytes)]
    assert served and shed
    assert {a.code() for a in shed} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    for error in shed:
        metadata, delay_s = overload_details(error)
        assert metadata == {"limit": "50", "setting": "GRPC_MAX_CONCURRENT_CALLS"}
        assert 0.2 <= delay_s <= 0.4
    assert service.most_running == 50
    assert server.shedder.shed_total == len(shed)


async def test_open_streams_have_a_bound_of_their_own(access: AccessInterceptor, admin_key: str) -> None:
    service = BurstService()
    server = GrpcServer(
        "127.0.0.1:0",
        ["test.Burst"],
        service.register,
        access,
        tls=LOCAL_SERVER["tls"],
        health_address="127.0.0.1:0",
        limits=CallLimits(max_concurrent_calls=1, max_concurrent_streams=2),
    )
    await server.start()
    try:
        async with channel(f"127.0.0.1:{server.port}", admin_key) as calls:
            follow = calls.unary_stream("/test.Burst/Follow", None, None)
            open_streams = [follow(b"", timeout=30) for _ in range(2)]
            assert [await stream.read() for stream in open_streams] == [b"following", b"following"]
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await follow(b"", timeout=5).read()
            assert await calls.unary_unary("/test.Burst/Pause", None, None)(b"short", timeout=5) == b"short"
            service.release.set()
            assert [[m async for m in stream] for stream in open_streams] == [[], []]
    finally:
        await server.stop(0)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert overload_details(refused.value)[0] == {"limit": "2", "setting": "GRPC_MAX_CONCURRENT_STREAMS"}


def test_call_limits_come_from_the_environment_over_a_services_defaults() -> None:
    defaults = CallLimits(max_receive_bytes=32 * MIB)
    assert CallLimits.from_env({}, defaults) == defaults
    limits = CallLimits.from_env(
        {
            "GRPC_MAX_CONCURRENT_CALLS": "64",
            "GRPC_MAX_CONCURRENT_STREAMS": "8",
            "GRPC_MAX_QUEUED_CALLS": "5000",
            "GRPC_SHED_RETRY_AFTER_MS": "500",
            "GRPC_MAX_SEND_BYTES": str(8 * MIB),
        },
        defaults,
    )
    assert limits == CallLimits(64, 8, 5000, 0.5, 32 * MIB, 8 * MIB)
    with pytest.raises(ConfigError, match="GRPC_MAX_CONCURRENT_CALLS must be at least 1"):
        CallLimits.from_env({"GRPC_MAX_CONCURRENT_CALLS": "0"})
    with pytest.raises(ConfigError, match="GRPC_MAX_RECEIVE_BYTES must be an integer"):
        CallLimits.from_env({"GRPC_MAX_RECEIVE_BYTES": "4MB"})


async def test_a_bug_in_a_handler_answers_internal_with_an_error_id_and_nothing_else(
    access: AccessInterceptor, admin_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    """grpc.aio's own answer was UNKNOWN, "Unexpected <class 'RuntimeError'>: <its message>"."""

    async def fail(request: bytes, context: Any) -> bytes:
        raise RuntimeError("duplicate key value (email)=(ada@example.com)")

    async def fail_later(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield b"first"
        raise KeyError("ada@example.com")

    def register(server: grpc.aio.Server) -> None:
        handler = grpc.method_handlers_generic_handler(
            "test.Burst",
            {
                "Pause": grpc.unary_unary_rpc_method_handler(fail),
                "Follow": grpc.unary_stream_rpc_method_handler(fail_later),
            },
        )
        server.add_generic_rpc_handlers((handler,))

    server = GrpcServer(
        "127.0.0.1:0", ["test.Burst"], register, access, tls=LOCAL_SERVER["tls"], health_address="127.0.0.1:0"
    )
    await server.start()
    try:
        async with channel(f"127.0.0.1:{server.port}", admin_key) as calls:
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await calls.unary_unary("/test.Burst/Pause", None, None)(b"x", timeout=5)
            stream = calls.unary_stream("/test.Burst/Follow", None, None)(b"x", timeout=5)
            assert await stream.read() == b"first"
            with pytest.raises(grpc.aio.AioRpcError) as streamed:
                await stream.read()
    finally:
        await server.stop(0)
    error_ids = []
    for error in (unary.value, streamed.value):
        assert error.code() == grpc.StatusCode.INTERNAL
        status = status_of(error)
        assert status is not None
        (info,) = details_of(status, error_details_pb2.ErrorInfo)
        assert info.reason == "INTERNAL_ERROR" and set(info.metadata) == {"error_id"}
        error_id = info.metadata["error_id"]
        assert error.details() == f"internal error {error_id}; quote this id when reporting it"
        error_ids.append(error_id)
    logged = [r for r in caplog.records if r.getMessage() == "unexpected error in a handler"]
    assert [r.__dict__["error_id"] for r in logged] == error_ids
    assert [r.__dict__["exception"] for r in logged] == ["builtins.RuntimeError", "builtins.KeyError"]
    assert all("in fail" in r.__dict__["traceback"] for r in logged)
    assert "ada@example.com" not in caplog.text


async def test_a_request_that_does_not_decode_is_invalid_argument_before_any_handler(
    profile_app: ProfileApp, ingest_app: IngestApp, admin_key: str
) -> None:
    """Before, grpc.aio answered UNKNOWN, "Unexpected <class 'DecodeError'>"."""
    # GetProfileRequest{identifier: Identifier{value: b"\xff"}}: a string that is not UTF-8.
    not_utf8 = bytes([0x0A, 0x03, 0x12, 0x01, 0xFF])
    async with channel(f"127.0.0.1:{profile_app.grpc.port}", admin_key) as calls:
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await calls.unary_unary("/sendtime.profile.v1.ProfileService/GetProfile", None, None)(not_utf8)
    async with channel(f"127.0.0.1:{ingest_app.grpc.port}", admin_key) as calls:
        stream = calls.stream_stream("/sendtime.ingest.v1.IngestService/StreamEvents", None, None)()  # type: ignore[call-arg]
        await stream.write(b"\x0a\x02\x0a")  # truncated: a length past the end
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            await stream.read()
    for error, type_name in [
        (unary.value, "sendtime.profile.v1.GetProfileRequest"),
        (streamed.value, "sendtime.ingest.v1.StreamEventsRequest"),
    ]:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        status = status_of(error)
        assert status is not None
        (info,) = details_of(status, error_details_pb2.ErrorInfo)
        assert (info.reason, dict(info.metadata)) == ("REQUEST_UNDECODABLE", {"type": type_name})


async def test_a_new_channel_reaches_a_server_restarted_on_an_address_an_old_channel_saw_refused(
    access: AccessInterceptor, admin_key: str
) -> None:
    """With gRPC's global connection pool the new channel took over the old one's failure and
    answered UNAVAILABLE "Connection refused" at once (a CI run lost a test to a port reused so)."""

    def health_server(address: str) -> GrpcServer:
        return GrpcServer(
            address, ["test.Slow"], SlowService().register, access, tls=LOCAL_SERVER["tls"], health_address=""
        )

    def check(calls: grpc.aio.Channel) -> Any:
        return health_pb2_grpc.HealthStub(calls).Check(health_pb2.HealthCheckRequest(), timeout=5)

    first = health_server("127.0.0.1:0")
    await first.start()
    address = f"127.0.0.1:{first.port}"
    async with channel(address, admin_key) as old:
        assert (await check(old)).status == SERVING
        await first.stop(grace_s=0)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await check(old)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        second = health_server(address)
        await second.start()
        try:
            async with channel(address, admin_key) as new:
                assert (await check(new)).status == SERVING
        finally:
            await second.stop(grace_s=0)
