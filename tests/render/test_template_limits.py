"""What one template may cost (issue 15): the loop and output bombs a caller can send are refused
with RESOURCE_EXHAUSTED naming the limit, well within the call's deadline, while the replica's
health checks keep answering, each waiting for at most 50 ms of the event loop's work (CPU time:
a loaded machine stretches the wall clock, not what the loop did); a template that would run past
its time budget is stopped; an oversized source is refused before it is compiled; inline
templates need templates.write."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from render.server import RenderApp
from render.templates import RenderClock, TemplateCompiler, TemplateError, TemplateLimits, render_part
from sendtime.render.v1 import render_pb2, render_pb2_grpc
from sendtime_common.auth.api_keys import Scope
from sendtime_common.errors import field_violations, status_of
from tests.conftest import RenderServiceFactory, channel, user
from tests.keys import issue_key

LOOP_BOMB = "{% for i in (1..30000000) %}x{% endfor %}"
NESTED_BOMB = "{% for i in (1..3000) %}{% for j in (1..3000) %}x{% endfor %}{% endfor %}"
OUTPUT_BOMB = "{% for i in (1..9000) %}" + "x" * 100 + "{% endfor %}"  # 900 KB, under the loop limit
# Within the loop and output limits, but each append copies a string that keeps growing.
TIME_BOMB = (
    '{% assign s = "" %}{% for i in (1..9000) %}{% assign s = s | append: "0123456789abcdefghij" %}'
    "{% endfor %}"
)


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = status_of(error)
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError(f"no ErrorInfo in {status}")


def inline(subject: str = "Hi", html: str = "", text: str = "") -> render_pb2.RenderRequest:
    return render_pb2.RenderRequest(
        customer=user("limits-nobody"),
        template=render_pb2.Template(
            subject=subject, html=html, text=text, fallback=_struct({"profile": {"traits": {}}})
        ),
    )


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    built = struct_pb2.Struct()
    built.update(values)
    return built


@dataclass
class HealthChecks:
    """Health checks made while some work ran on the event loop the replica serves from."""

    during_work: int = 0  # checks started while the work was in flight
    # The most CPU the loop's thread used from a check falling due to its answer.
    most_loop_cpu_s: float = 0.0
    slowest_s: float = 0.0  # wall clock, for the message only: a loaded machine stretches it


async def health_checks_while(
    render_app: RenderApp, work: Callable[[], Awaitable[object]]
) -> tuple[object, HealthChecks]:
    """Run ``work`` while checking health every 5 ms; its result (or error) and the checks.

    The replica runs in this process, on this event loop, so ``time.thread_time()`` from a
    check's pause to its answer is the work the loop did before it could answer: a render holding
    the loop shows up there whether or not the machine is loaded, which the check's wall-clock
    time does not tell apart from the process waiting for a core. (Timing the check alone misses
    a render that took the loop while the checker paused: the check, once sent, was quick.)"""
    checks = HealthChecks()
    working = False
    done = asyncio.Event()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{render_app.grpc.health_port}") as probe:
        health = health_pb2_grpc.HealthStub(probe)
        await health.Check(health_pb2.HealthCheckRequest())  # connected before measuring

        async def check() -> None:
            # From the pause before a check to its answer: the loop does the render whenever the
            # render gets it, and a check falling due then waits for all of the render's turn.
            while not done.is_set():
                cpu_started, started = time.thread_time(), time.monotonic()
                await asyncio.sleep(0.005)
                checks.during_work += working
                await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                checks.most_loop_cpu_s = max(checks.most_loop_cpu_s, time.thread_time() - cpu_started)
                checks.slowest_s = max(checks.slowest_s, time.monotonic() - started - 0.005)

        checking = asyncio.create_task(check())
        await asyncio.sleep(0.05)
        working = True
        try:
            result: object = await work()
        except grpc.aio.AioRpcError as exc:
            result = exc
        working = False
        await asyncio.sleep(0.05)
        done.set()
        await checking
    return result, checks


@pytest.mark.parametrize(
    ("part", "source", "limit"),
    [
        ("text", LOOP_BOMB, "loop_iterations"),
        ("html", NESTED_BOMB, "loop_iterations"),
        ("text", OUTPUT_BOMB, "output_bytes"),
        ("html", TIME_BOMB, "render_time_s"),
    ],
)
async def test_a_template_bomb_is_refused_naming_its_limit_and_health_keeps_answering(
    render_app: RenderApp,
    render_stub: render_pb2_grpc.RenderServiceAsyncStub,
    part: str,
    source: str,
    limit: str,
) -> None:
    request = inline(**{part: source})
    started = time.monotonic()
    result, checks = await health_checks_while(render_app, lambda: render_stub.Render(request, timeout=2))
    took = time.monotonic() - started
    assert isinstance(result, grpc.aio.AioRpcError), result
    assert result.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(result)
    assert (info.reason, info.metadata["limit"], info.metadata["part"]) == (
        "TEMPLATE_LIMIT_EXCEEDED",
        limit,
        part,
    )
    assert info.metadata["setting"].startswith("RENDER_TEMPLATE_")
    assert limit in (result.details() or "")
    assert took < 1.0, f"the bomb took {took:.2f}s to refuse"
    assert checks.during_work >= 1
    # The render's budget is 40 ms of work: a check waits for at most that and its own handling.
    assert checks.most_loop_cpu_s < 0.05, (
        f"a health check waited for {checks.most_loop_cpu_s * 1000:.0f} ms of the loop's work"
        f" ({checks.slowest_s * 1000:.0f} ms on the wall clock)"
    )


async def test_a_source_over_the_size_limit_is_refused_before_it_is_compiled(
    render_stub: render_pb2_grpc.RenderServiceAsyncStub,
) -> None:
    too_large = "x" * (TemplateLimits().max_source_bytes + 1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await render_stub.Render(inline(html=too_large))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = status_of(caught.value)
    assert status is not None
    (violation,) = field_violations(status)
    assert violation.field == "template.html"
    assert "RENDER_TEMPLATE_MAX_SOURCE_BYTES" in violation.description


@pytest.fixture
async def renderer_only(
    render_app: RenderApp, database_url: str
) -> AsyncIterator[render_pb2_grpc.RenderServiceAsyncStub]:
    """A stub whose key may render, and nothing else."""
    key = await issue_key(database_url, [Scope.RENDER], "render only")
    async with channel(f"127.0.0.1:{render_app.grpc.port}", key) as calls:
        yield render_pb2_grpc.RenderServiceStub(calls)


async def test_an_inline_template_needs_the_template_writing_scope(
    renderer_only: render_pb2_grpc.RenderServiceAsyncStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await renderer_only.Render(inline(subject="Hi {{ profile.traits.first_name }}"))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(caught.value).metadata["scope"] == "templates.write"


async def test_inline_templates_can_be_switched_off(
    render_service: RenderServiceFactory, render_app: RenderApp
) -> None:
    async with render_service(f"127.0.0.1:{render_app.grpc.port}", inline_templates=False) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Render(inline())
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value).reason == "INLINE_TEMPLATES_OFF"


async def test_a_template_within_the_limits_renders_as_before(
    render_stub: render_pb2_grpc.RenderServiceAsyncStub,
) -> None:
    answer = await render_stub.Render(
        inline(
            subject="{% for i in (1..3) %}{{ i }}{% endfor %}", text="{% for i in (1..5000) %}.{% endfor %}"
        )
    )
    assert answer.subject == "123" and answer.text == "." * 5000


class Sleepy:
    """A value that takes ``seconds`` to print without working: as if the process were
    descheduled mid-render."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __str__(self) -> str:
        time.sleep(self.seconds)
        return "awake"


def test_the_time_budget_counts_work_not_time_the_process_spent_elsewhere() -> None:
    """A 40 ms budget failed one of 1,200 harmless renders in CI: wall-clock time counted the
    process being descheduled (or collecting garbage) against the template."""
    compiled = TemplateCompiler(cache_size=0).compile("Hi", "{% for s in slow %}{{ s }} {% endfor %}", "")
    clock = RenderClock(0.04)
    rendered = render_part(compiled.html, "html", {"slow": [Sleepy(0.005)] * 40}, clock)  # 200 ms
    assert rendered == "awake " * 40
    assert clock.used_s() < 0.04

    spinning = TemplateCompiler(cache_size=0).compile("Hi", TIME_BOMB, "")
    with pytest.raises(TemplateError) as caught:
        render_part(spinning.html, "html", {}, RenderClock(0.04))
    assert caught.value.limit == "render_time_s"


def test_garbage_collection_is_not_counted_against_a_render() -> None:
    heap = [[i] for i in range(1_000_000)]  # a full collection walks every one
    clock = RenderClock(10.0)
    started = time.perf_counter()
    gc.collect()
    collecting = time.perf_counter() - started
    assert clock.used_s() < 0.2 * collecting + 0.002, (clock.used_s(), collecting)
    del heap
