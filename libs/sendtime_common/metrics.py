"""Prometheus metrics: the rate, errors and duration of every RPC and HTTP route, and the
plaintext port that serves them (docs/operations.md).

Metrics live in prometheus_client's process-wide registry, as its collectors for the process
and the garbage collector do. Names of the RPC metrics are go-grpc-prometheus's, so that
dashboards written for any gRPC server read them. Labels name methods and route templates
(``/v1/{name=profiles/*}``), never a path as sent: a path holds customer identifiers, and each
distinct one would be a series of its own.

Cost: a call looks up its series once per method (or route) and status, then adds to a counter
and a histogram: a few microseconds, against the hundreds a hit on the profile service costs
(docs/benchmarks.md measures it).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from aiohttp import hdrs, web
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.aiohttp import make_aiohttp_handler

from sendtime_common.auth.access import AccessInterceptor
from sendtime_common.auth.api_keys import Scope
from sendtime_common.handlers import Behavior, Handler, WrappingInterceptor, replace_behavior

log = logging.getLogger(__name__)

SampleT = TypeVar("SampleT")

# Seconds. From a profile hit (well under a millisecond) to render's deadline and the 2 s an
# email platform waits at send time, and past it for batch calls.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)

GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    ["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
)
GRPC_HANDLING = Histogram(
    "grpc_server_handling_seconds",
    "Time from an RPC's start to its status, on the server.",
    ["grpc_service", "grpc_method", "grpc_type"],
    buckets=LATENCY_BUCKETS,
)
HTTP_REQUESTS = Counter(
    "http_server_requests_total",
    "HTTP requests answered, by listener, route template, method and status.",
    ["listener", "route", "method", "code"],
)
HTTP_DURATION = Histogram(
    "http_server_request_duration_seconds",
    "Time from an HTTP request's arrival to its answer.",
    ["listener", "route", "method"],
    buckets=LATENCY_BUCKETS,
)

ASYNCIO_TASKS = Gauge(
    "sendtime_asyncio_tasks",
    "Tasks not yet done on the service's event loop, counted at each scrape (the scrape's own included).",
)

# The key under which a handler that matches routes itself (the gateway's catch-all) names the
# route template it matched, for the labels.
ROUTE_KEY = web.RequestKey("sendtime.route", str)
UNMATCHED_ROUTE = "unmatched"

_GRPC_TYPES = {
    "unary_unary": "unary",
    "unary_stream": "server_stream",
    "stream_unary": "client_stream",
    "stream_stream": "bidi_stream",
}


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def _code_of(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The status the handler set (by ``abort`` or ``set_code``); OK when none."""
    code: Any = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # grpc.aio's servicer context answers with the number
        return _CODE_NAMES.get(code, "UNKNOWN")
    return "OK"


class _RpcSeries:
    """One method's series: its histogram, and its counter by code (looked up once each)."""

    __slots__ = ("_labels", "_handled", "histogram")

    def __init__(self, method: str, grpc_type: str) -> None:
        service, _, name = method.lstrip("/").rpartition("/")
        self._labels = (service, name, grpc_type)
        self._handled: dict[str, Any] = {}
        self.histogram = GRPC_HANDLING.labels(*self._labels)

    def done(self, started: float, code: str) -> None:
        self.histogram.observe(time.perf_counter() - started)
        counter = self._handled.get(code)
        if counter is None:
            counter = self._handled[code] = GRPC_HANDLED.labels(*self._labels, code)
        counter.inc()


class RpcMetrics(WrappingInterceptor):
    """Counts and times every call by method and status code (outermost, so that calls the
    load shedder or the access check refuse are counted too). A call whose client went away
    counts as CANCELLED."""

    def __init__(self) -> None:
        super().__init__()
        # By method, made once: a wrapper outside the tracing interceptor wraps every call anew
        # (tracing hands over a new handler each call).
        self._series: dict[str, _RpcSeries] = {}

    def wrap(self, method: str, handler: Handler) -> Handler:
        series = self._series.get(method)
        if series is None:
            kind = next(field for field in _GRPC_TYPES if getattr(handler, field) is not None)
            series = self._series[method] = _RpcSeries(method, _GRPC_TYPES[kind])
        return replace_behavior(handler, lambda behavior: _observed(series, behavior))


def _observed(series: _RpcSeries, behavior: Behavior) -> Behavior:
    # A streaming method is an async generator, or a coroutine that writes with
    # context.write() (health's Watch): each is wrapped as what it is.
    if inspect.isasyncgenfunction(behavior):

        async def observed_stream(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            started = time.perf_counter()
            code = "UNKNOWN"
            try:
                async for response in behavior(request, context):
                    yield response
                code = _code_of(context)
            except grpc.aio.AbortError:
                code = _code_of(context)
                raise
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            finally:
                series.done(started, code)

        return observed_stream

    async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started = time.perf_counter()
        code = "UNKNOWN"
        try:
            response = await behavior(request, context)
            code = _code_of(context)
            return response
        except grpc.aio.AbortError:
            code = _code_of(context)
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            series.done(started, code)

    return observed


class HttpMetrics:
    """aiohttp middleware counting and timing each request of one listener by route template,
    method and status."""

    def __init__(self, listener: str) -> None:
        self._listener = listener
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def _of(self, route: str, method: str, status: int) -> tuple[Any, Any]:
        key = (route, method, status)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = (
                HTTP_REQUESTS.labels(self._listener, route, method, str(status)),
                HTTP_DURATION.labels(self._listener, route, method),
            )
        return series

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:  # aiohttp's own answers (404 of the router, 413, ...)
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's code for it)
            raise
        finally:
            counter, histogram = self._of(_route_of(request), request.method, status)
            counter.inc()
            histogram.observe(time.perf_counter() - started)


def _route_of(request: web.Request) -> str:
    route: str | None = request.get(ROUTE_KEY)  # the gateway's catch-all names what it matched
    if route is not None:
        return route
    resource = request.match_info.route.resource
    return UNMATCHED_ROUTE if resource is None else resource.canonical


def metrics_app(access: AccessInterceptor) -> web.Application:
    """The metrics port's application: ``GET /metrics`` (Prometheus text, or OpenMetrics when
    asked for) for an API key with the scope ``metrics.read``, within its rate, nothing else. The
    metrics name no customer, but they tell traffic and errors, and building them costs the
    service's event loop: so not for anyone who can reach the port. A refusal costs no more than
    a key lookup (an unknown key is looked for at most once a second)."""
    app = web.Application(client_max_size=1024)
    serve = make_aiohttp_handler(REGISTRY)

    async def scrape(request: web.Request) -> web.StreamResponse:
        refusal = await access.admit_http(request.headers.get(hdrs.AUTHORIZATION), Scope.METRICS_READ)
        if refusal is None:
            # Counted here, on the event loop that serves the scrape: the service's one loop (a
            # collector could be called from another thread, where there is no loop to count).
            ASYNCIO_TASKS.set(len(asyncio.all_tasks()))
            return await serve(request)
        headers = {}
        if refusal.status == 401:
            headers[hdrs.WWW_AUTHENTICATE] = 'Bearer realm="metrics"'
        if refusal.retry_after_s is not None:
            headers[hdrs.RETRY_AFTER] = str(max(1, math.ceil(refusal.retry_after_s)))
        return web.Response(status=refusal.status, text=refusal.message + "\n", headers=headers)

    app.router.add_get("/metrics", scrape)
    return app


async def sample_every(
    every_s: float,
    read: Callable[[], Awaitable[SampleT]],
    record: Callable[[SampleT], None],
    *,
    unavailable: tuple[type[BaseException], ...],
    what: str,
) -> None:
    """Hand ``record`` what ``read()`` returns every ``every_s`` seconds until cancelled: for
    gauges read from a dependency, since a scrape cannot wait on one. While ``read`` raises one
    of ``unavailable`` the gauges keep their last values and one warning names ``what``."""
    warned = False
    while True:
        try:
            sample = await read()
        except unavailable as exc:
            if not warned:
                log.warning("cannot read %s for the metrics", what, extra={"error": str(exc)})
                warned = True
        else:
            record(sample)
            warned = False
        await asyncio.sleep(every_s)
