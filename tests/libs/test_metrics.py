"""Prometheus metrics: every RPC and HTTP request counted by method or route template and
status, timed, and served on the plaintext metrics port."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from sendtime_common.auth.access import AccessInterceptor
from sendtime_common.auth.api_keys import Scope
from sendtime_common.grpc_server import GrpcServer
from sendtime_common.http_server import HttpListener, metrics_listener
from sendtime_common.metrics import sample_every
from sendtime_common.rate_limit import Rate, RateLimiter, RateLimitSettings
from tests.conftest import LOCAL_SERVER, access_checked, channel, eventually

METHODS = ("/test.Metered/Echo", "/test.Metered/Fail", "/test.Metered/Count")


class MeteredService:
    """Raw bytes: Echo answers, Fail aborts NOT_FOUND, Count streams three answers."""

    async def echo(self, request: bytes, context: Any) -> bytes:
        return request

    async def fail(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        raise AssertionError("abort returned")

    async def count(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        for i in range(3):
            yield str(i).encode()

    def register(self, server: grpc.aio.Server) -> None:
        handler = grpc.method_handlers_generic_handler(
            "test.Metered",
            {
                "Echo": grpc.unary_unary_rpc_method_handler(self.echo),
                "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
                "Count": grpc.unary_stream_rpc_method_handler(self.count),
            },
        )
        server.add_generic_rpc_handlers((handler,))


@pytest.fixture
async def access(database_url: str) -> AsyncIterator[AccessInterceptor]:
    async with access_checked(database_url, METHODS) as checked:
        yield checked


async def scrape(port: int, key: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample the metrics port serves (to ``key``), by name and labels."""
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as answer,
    ):
        assert answer.status == 200
        assert answer.content_type == "text/plain"
        text = await answer.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_rpcs_are_counted_by_method_and_code_and_timed(
    access: AccessInterceptor, admin_key: str, metrics_key: str
) -> None:
    server = GrpcServer(
        "127.0.0.1:0",
        ["test.Metered"],
        MeteredService().register,
        access,
        tls=LOCAL_SERVER["tls"],
        health_address="127.0.0.1:0",
        metrics_address="127.0.0.1:0",
    )
    await server.start()
    try:
        assert server.metrics is not None
        port = server.metrics.port
        labels = {"grpc_service": "test.Metered", "grpc_type": "unary"}
        before = await scrape(port, metrics_key)
        async with channel(f"127.0.0.1:{server.port}", admin_key) as calls:
            echo = calls.unary_unary("/test.Metered/Echo", None, None)
            fail = calls.unary_unary("/test.Metered/Fail", None, None)
            count = calls.unary_stream("/test.Metered/Count", None, None)
            for _ in range(3):
                assert await echo(b"x", timeout=5) == b"x"
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await fail(b"x", timeout=5)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert [m async for m in count(b"", timeout=5)] == [b"0", b"1", b"2"]
        async with channel(f"127.0.0.1:{server.port}", "st_wrong.key") as calls:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await calls.unary_unary("/test.Metered/Echo", None, None)(b"x", timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # grpc.aio's abort sends the status before the handler's frames unwind, so a refused
        # call is counted just after its client has the answer: scraped until it shows.
        async def counted() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
            samples = await scrape(port, metrics_key)
            refused = (("Echo", "UNAUTHENTICATED"), ("Fail", "NOT_FOUND"))
            shown = all(
                value(samples, "grpc_server_handled_total", **labels, grpc_method=m, grpc_code=c)
                > value(before, "grpc_server_handled_total", **labels, grpc_method=m, grpc_code=c)
                for m, c in refused
            )
            return samples if shown else None

        after = await eventually(counted, timeout_s=5)

        def delta(name: str, **more: str) -> float:
            return value(after, name, **more) - value(before, name, **more)

        handled = "grpc_server_handled_total"
        assert delta(handled, **labels, grpc_method="Echo", grpc_code="OK") == 3
        assert delta(handled, **labels, grpc_method="Echo", grpc_code="UNAUTHENTICATED") == 1
        assert delta(handled, **labels, grpc_method="Fail", grpc_code="NOT_FOUND") == 1
        assert (
            delta(
                handled,
                grpc_service="test.Metered",
                grpc_type="server_stream",
                grpc_method="Count",
                grpc_code="OK",
            )
            == 1
        )
        assert delta("grpc_server_handling_seconds_count", **labels, grpc_method="Echo") == 4
        assert delta("grpc_server_handling_seconds_bucket", **labels, grpc_method="Echo", le="+Inf") == 4
        # The process's own collectors come with it.
        assert value(after, "process_resident_memory_bytes") > 0
    finally:
        await server.stop(grace_s=1)


async def test_http_requests_are_counted_by_route_template_never_the_path(
    access: AccessInterceptor, metrics_key: str
) -> None:
    app = web.Application()

    async def thing(request: web.Request) -> web.Response:
        if request.match_info["thing_id"] == "missing":
            raise web.HTTPNotFound()
        return web.json_response({"id": request.match_info["thing_id"]})

    app.router.add_get("/things/{thing_id}", thing)
    listener = HttpListener(app, "127.0.0.1:0", tls=LOCAL_SERVER["tls"], name="test-http", grace_s=1)
    metrics = metrics_listener("127.0.0.1:0", access)
    await listener.start()
    await metrics.start()
    try:
        before = await scrape(metrics.port, metrics_key)
        async with aiohttp.ClientSession() as session:
            for path, status in [
                ("/things/a@example.com", 200),
                ("/things/b@example.com", 200),
                ("/things/missing", 404),
                ("/nowhere/c@example.com", 404),
            ]:
                async with session.get(f"http://127.0.0.1:{listener.port}{path}") as answer:
                    assert answer.status == status
        after = await scrape(metrics.port, metrics_key)
        labels = {"listener": "test-http", "method": "GET"}
        requests = "http_server_requests_total"
        assert (
            value(after, requests, **labels, route="/things/{thing_id}", code="200")
            - value(before, requests, **labels, route="/things/{thing_id}", code="200")
            == 2
        )
        assert value(after, requests, **labels, route="/things/{thing_id}", code="404") == 1
        assert value(after, requests, **labels, route="unmatched", code="404") == 1
        assert (
            value(after, "http_server_request_duration_seconds_count", **labels, route="/things/{thing_id}")
            >= 3
        )
        exposed = "\n".join(f"{name} {sorted(labels)}" for name, labels in after)
        assert "example.com" not in exposed, "a path as sent became a label"
    finally:
        await listener.stop()
        await metrics.stop()


async def test_the_metrics_port_serves_metrics_only_to_a_key_with_the_metrics_scope(
    access: AccessInterceptor, metrics_key: str, profile_reader_key: str
) -> None:
    metrics = metrics_listener("127.0.0.1:0", access)
    await metrics.start()
    url = f"http://127.0.0.1:{metrics.port}/metrics"
    try:
        async with aiohttp.ClientSession() as session:
            for headers, status in [
                ({}, 401),
                ({"Authorization": "Basic cHJvbWV0aGV1czpwYXNz"}, 401),
                ({"Authorization": "Bearer st_wrong.key"}, 401),
                ({"Authorization": f"Bearer {profile_reader_key}"}, 403),
            ]:
                async with session.get(url, headers=headers) as answer:
                    assert answer.status == status, headers
                    assert "# TYPE" not in await answer.text()
                    if status == 401:
                        assert answer.headers["WWW-Authenticate"] == 'Bearer realm="metrics"'
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {metrics_key}"}) as session:
            async with session.get(f"http://127.0.0.1:{metrics.port}/metrics/../v1/profiles") as answer:
                assert answer.status == 404
            async with session.post(f"http://127.0.0.1:{metrics.port}/metrics", data=b"x") as answer:
                assert answer.status == 405
            async with session.get(
                f"http://127.0.0.1:{metrics.port}/metrics",
                headers={"Accept": "application/openmetrics-text; version=1.0.0"},
            ) as answer:
                assert answer.status == 200
                assert answer.content_type == "application/openmetrics-text"
                assert (await answer.text()).rstrip().endswith("# EOF")
    finally:
        await metrics.stop()


async def test_the_asyncio_task_gauge_counts_the_event_loops_unfinished_tasks(
    access: AccessInterceptor, metrics_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a soak watches for a task leak: tasks started and never finished show in the gauge,
    and leave it once they end. The tests' event loop runs other tests' background tasks too, so
    each scrape's value is compared with the tasks the gauge was read from, not with the others'."""
    read: list[set[asyncio.Task[Any]]] = []
    all_tasks = asyncio.all_tasks

    def recorded(loop: asyncio.AbstractEventLoop | None = None) -> set[asyncio.Task[Any]]:
        tasks = all_tasks(loop)
        read.append(tasks)
        return tasks

    monkeypatch.setattr(asyncio, "all_tasks", recorded)
    metrics = metrics_listener("127.0.0.1:0", access)
    await metrics.start()
    release = asyncio.Event()
    try:
        before = value(await scrape(metrics.port, metrics_key), "sendtime_asyncio_tasks")
        assert before == len(read[-1]) >= 1  # the scrape's own handler at least
        waiting = [asyncio.create_task(release.wait()) for _ in range(25)]
        during = value(await scrape(metrics.port, metrics_key), "sendtime_asyncio_tasks")
        assert during == len(read[-1]) and set(waiting) <= read[-1]
        release.set()
        await asyncio.gather(*waiting)
        after = value(await scrape(metrics.port, metrics_key), "sendtime_asyncio_tasks")
        assert after == len(read[-1]) and not set(waiting) & read[-1]
    finally:
        release.set()
        await metrics.stop()


async def test_scrapes_are_rate_limited_per_key(database_url: str, metrics_key: str) -> None:
    # A scrape every 10 s, two at once: the third scrape is refused unless 10 s pass, however
    # long the two full renders of the registry take.
    limits = RateLimitSettings(rates={Scope.METRICS_READ: Rate(0.1, 2)})
    limiter = RateLimiter(limits, "test", "")  # per replica: no Redis
    async with access_checked(database_url, METHODS, limiter) as access:
        metrics = metrics_listener("127.0.0.1:0", access)
        await metrics.start()
        try:
            headers = {"Authorization": f"Bearer {metrics_key}"}
            async with aiohttp.ClientSession(headers=headers) as session:
                statuses = []
                started = time.monotonic()
                for _ in range(3):
                    async with session.get(f"http://127.0.0.1:{metrics.port}/metrics") as answer:
                        statuses.append(answer.status)
                        retry_after = answer.headers.get("Retry-After")
                took = time.monotonic() - started
            assert statuses == [200, 200, 429]  # the burst of two, then a wait
            # The next scrape fits 10 s after the first, less the time the scrapes took between
            # the first decision and the refusal (at most ``took``), in whole seconds rounded up.
            assert retry_after is not None and math.ceil(10 - took) <= int(retry_after) <= 10
        finally:
            await metrics.stop()
            await limiter.close()


async def test_without_a_metrics_address_nothing_is_counted(
    access: AccessInterceptor, admin_key: str, metrics_key: str
) -> None:
    """The switch the benchmarks measure metrics' cost with: no port, no counting."""
    server = GrpcServer(
        "127.0.0.1:0",
        ["test.Metered"],
        MeteredService().register,
        access,
        tls=LOCAL_SERVER["tls"],
        health_address="",
    )
    metrics = metrics_listener("127.0.0.1:0", access)
    await server.start()
    await metrics.start()
    try:
        assert server.metrics is None
        labels = {
            "grpc_service": "test.Metered",
            "grpc_type": "unary",
            "grpc_method": "Echo",
            "grpc_code": "OK",
        }
        before = value(await scrape(metrics.port, metrics_key), "grpc_server_handled_total", **labels)
        async with channel(f"127.0.0.1:{server.port}", admin_key) as calls:
            assert await calls.unary_unary("/test.Metered/Echo", None, None)(b"x", timeout=5) == b"x"
        assert value(await scrape(metrics.port, metrics_key), "grpc_server_handled_total", **labels) == before
    finally:
        await server.stop(grace_s=1)
        await metrics.stop()


async def test_gauges_sampled_from_a_dependency_keep_their_last_values_while_it_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    answers: list[int | OSError] = [1, OSError("refused"), OSError("refused"), 2]
    recorded: list[int] = []
    done = asyncio.Event()

    async def read() -> int:
        answer = answers.pop(0)
        if not answers:
            done.set()
        if isinstance(answer, OSError):
            raise answer
        return answer

    sampling = asyncio.create_task(
        sample_every(0.001, read, recorded.append, unavailable=(OSError,), what="the answers")
    )
    await asyncio.wait_for(done.wait(), 5)
    await asyncio.sleep(0.01)
    sampling.cancel()
    assert recorded == [1, 2]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["cannot read the answers for the metrics"]  # once while down
