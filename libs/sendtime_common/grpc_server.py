"""The gRPC server bootstrap every Sendtime service shares.

A server built here has OpenTelemetry tracing on every call, the access check every call but a
health check passes, the standard health service (``grpc.health.v1``) and reflection (so grpcurl
needs no proto files); it serves TLS (mutual TLS when a client CA is configured, certificates
reloaded when their files change) unless plaintext was explicitly allowed. Health is also
served on a port of its own, in plaintext, for kubelet's gRPC probes, which cannot speak TLS.
It shuts down the way Kubernetes expects: on SIGTERM it reports NOT_SERVING, stops taking new
calls, lets in-flight calls finish within a grace period, then exits.

Health means two things (docs/operations.md#health). Readiness, the overall status (service
"") and each hosted service's: SERVING while the service can do its job, which the service
says through the conditions it watches (``readiness``, sendtime_common.readiness). Liveness,
the name ``liveness``: SERVING from the end of start-up (migrations applied, listeners up) until
shutdown, whatever the dependencies do; a wedged process does not answer at all, and the
probe's timeout catches that.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from sendtime_common.answer_memo import AnswerMemo
from sendtime_common.auth.access import AccessInterceptor
from sendtime_common.call_limits import CallLimits, LoadShedder, message_size_options
from sendtime_common.handlers import ComposedInterceptor
from sendtime_common.http_gateway import CachePolicy, HttpGateway, InProcessCalls, etag_matches, etag_of
from sendtime_common.http_routes import routes_of
from sendtime_common.http_server import HttpListener, metrics_listener
from sendtime_common.internal_errors import InternalErrors
from sendtime_common.metrics import RpcMetrics
from sendtime_common.readiness import ReadinessMonitor, ReadinessSettings
from sendtime_common.shutdown import CANCEL_WAIT_S, bounded
from sendtime_common.tls import ServerCertificates, TlsSettings, warn_if_plaintext

log = logging.getLogger(__name__)

# The contracts' OpenAPI document (scripts/gen_openapi.py), served open at /openapi.json on every
# HTTP port: each port serves the routes of its own services, the document describes all of them,
# as one base URL behind the Ingress does.
OPENAPI_DOCUMENT = Path(__file__).resolve().parents[2] / "openapi" / "sendtime.openapi.json"

# Callers balance round robin over the addresses a name resolves to (service_channel), resolved
# when they connect: closing each connection after about this long (gRPC adds +-10% jitter)
# makes them resolve again, so a replica added later gets its share within minutes. Calls and
# streams on a closing connection finish there: no grace bound is set.
MAX_CONNECTION_AGE_S = 300
# How long a call may wait in gRPC core for the Python side to pick it up (core's default: 30 s,
# then CANCELLED). Long enough never to decide: the queue's bound and the callers' deadlines do.
MAX_UNREQUESTED_S = 3600

OVERALL_HEALTH = ""  # the empty service name: the server as a whole, what readiness probes ask about
LIVENESS = "liveness"  # what liveness and startup probes ask about
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# Probes and reflection are not traced: they are noise in traces, and the tracing interceptor
# cannot wrap handlers that stream with context.write() (health's Watch).
_UNTRACED_PREFIXES = ("/grpc.health.", "/grpc.reflection.")


def _traced_call(details: Any) -> bool:
    # One prefix test on the method path ("/package.Service/Method"). The instrumentation's own
    # filters.service_prefix does ABC isinstance checks and os.path work per filter and call:
    # ~60 µs a call, on every call of every service.
    method = details.method
    if isinstance(method, bytes):
        method = method.decode()
    return not method.startswith(_UNTRACED_PREFIXES)


class GrpcServer:
    """A grpc.aio server with health, reflection and tracing, serving ``service_names``; every
    call but health checks passes ``access`` (sendtime_common.auth.access.AccessInterceptor),
    which authenticates the caller and checks the scope the method declares."""

    def __init__(
        self,
        address: str,
        service_names: Sequence[str],
        register: Callable[[grpc.aio.Server], None],
        access: AccessInterceptor,
        *,
        tls: TlsSettings,
        health_address: str,
        metrics_address: str = "",
        limits: CallLimits | None = None,
        readiness: ReadinessSettings | None = None,
    ) -> None:
        """``metrics_address``: where to serve Prometheus metrics (``GET /metrics``, plaintext,
        for a key with the scope metrics.read: they name methods and routes, never a customer);
        empty: none are kept (the benchmarks measure their cost so). ``readiness``: how the
        conditions the service watches (``self.readiness``) are checked and forgiven.

        Raises:
        ConfigError: no certificate, and plaintext not allowed.
        UnusableCertificate: the certificate files are not usable.
        OSError: an address cannot be listened on.
        """
        tls.check()
        self._service_names = list(service_names)
        self._tls = tls
        self._register = register
        self._access = access
        self.http: HttpListener | None = None
        self.certificates = ServerCertificates(tls) if tls.enabled else None
        self.limits = limits or CallLimits()
        self.shedder = LoadShedder(self.limits)
        self.server = grpc.aio.server(
            # Metrics outermost, so that shed and refused calls are counted too; then shedding,
            # so that a shed call costs as little as possible; then internal errors, so that
            # nothing inside answers a bug with its exception (those three as one layer); then
            # tracing, so that calls refused for their credentials are traced too.
            interceptors=[
                ComposedInterceptor(
                    [*([RpcMetrics()] if metrics_address else []), self.shedder, InternalErrors()]
                ),
                aio_server_interceptor(filter_=_traced_call),  # type: ignore[no-untyped-call]
                access,
            ],
            options=[
                *message_size_options(self.limits.max_receive_bytes, self.limits.max_send_bytes),
                ("grpc.so_reuseport", 0),
                ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_S * 1000),
                # Calls that arrived but that the Python side has not picked up yet wait in gRPC
                # core, which picks them up one per turn of the event loop. Past this bound core
                # cancels them (CANCELLED, a code callers cannot safely retry); below gRPC's
                # defaults (1,000 soft, 3,000 hard, dropping at random in between) a burst of
                # 2,000 concurrent unary calls lost 5-10%, and one of 20,000 lost 2,116. Soft and
                # hard equal: no random early drops below the bound.
                ("grpc.server.max_pending_requests", self.limits.max_queued_calls),
                ("grpc.server.max_pending_requests_hard_limit", self.limits.max_queued_calls),
                # Core also cancels a call not picked up within 30 s: a burst of 20,000 on a
                # loaded machine came back 13,551 CANCELLED. The bound above sheds instead, and
                # a caller's deadline ends its own call sooner.
                ("grpc.server_max_unrequested_time_in_server", MAX_UNREQUESTED_S),
            ],
        )
        self.health = health_aio.HealthServicer()
        self.readiness = ReadinessMonitor(readiness or ReadinessSettings(), self._report_readiness)
        self._watching_readiness: asyncio.Task[None] | None = None
        self._ready = False  # what readiness last reported; /healthz answers it
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        register(self.server)
        reflection.enable_server_reflection(
            [
                *self._service_names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self.server,
        )
        if self.certificates is not None:
            self.port = self.server.add_secure_port(address, self.certificates.credentials())
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        self.health_port: int | None = None
        self._health_server: grpc.aio.Server | None = None
        if health_address:
            self._health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            self.health_port = self._health_server.add_insecure_port(health_address)
            if self.health_port == 0:
                raise OSError(f"cannot listen on {health_address}")
        self.metrics: HttpListener | None = None
        if metrics_address:
            self.metrics = metrics_listener(metrics_address, access)

    @property
    def tls_mode(self) -> str:
        """``mtls``, ``tls`` or ``plaintext``."""
        return "mtls" if self._tls.mutual else "tls" if self._tls.enabled else "plaintext"

    @property
    def service_names(self) -> list[str]:
        """The services hosted (besides health and reflection)."""
        return list(self._service_names)

    def serve_http(
        self,
        address: str,
        *,
        grace_s: float,
        cache_policies: Mapping[str, CachePolicy] | None = None,
        answer_memos: Mapping[str, AnswerMemo] | None = None,
        add_routes: Callable[[web.Application, InProcessCalls], None] | None = None,
    ) -> None:
        """Also serve the hosted services' HTTP routes (sendtime_common.http_gateway) on
        ``address``, with this server's TLS, interceptors and limits; ``add_routes`` adds a
        service's own HTTP routes first, given the server's handlers behind its interceptors.
        ``cache_policies`` and ``answer_memos`` are by method (``/package.Service/Method``).

        Raises:
            ValueError: the address is unusable.
        """
        calls = InProcessCalls(self._register, [self.shedder, InternalErrors(), self._access])
        gateway = HttpGateway(
            routes_of(self._service_names),
            calls,
            max_body_bytes=self.limits.max_receive_bytes,
            cache_policies=cache_policies,
            answer_memos=answer_memos,
        )
        app = web.Application(client_max_size=self.limits.max_receive_bytes)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/openapi.json", _static_json(OPENAPI_DOCUMENT.read_bytes()))
        if add_routes is not None:
            add_routes(app, calls)
        gateway.add_to(app)
        self.http = HttpListener(
            app, address, tls=self._tls, name="HTTP", grace_s=grace_s, metered=self.metrics is not None
        )

    async def start(self) -> None:
        """Start serving; then report liveness SERVING, and readiness as the conditions watched
        so far say (SERVING when there are none), checking them from now on."""
        warn_if_plaintext(self._tls, lambda: f"gRPC port {self.port}")
        for name in [LIVENESS, *self._readiness_names]:
            await self.health.set(name, NOT_SERVING)
        await self.server.start()
        if self.http is not None:
            await self.http.start()
        if self._health_server is not None:
            await self._health_server.start()
        if self.metrics is not None:
            await self.metrics.start()
        await self.readiness.evaluate()
        await self.health.set(LIVENESS, SERVING)
        self._watching_readiness = asyncio.create_task(self.readiness.run(), name="readiness")

    @property
    def _readiness_names(self) -> list[str]:
        return [OVERALL_HEALTH, *self._service_names]

    async def _report_readiness(self, ready: bool) -> None:
        self._ready = ready
        for name in self._readiness_names:
            await self.health.set(name, SERVING if ready else NOT_SERVING)

    async def _healthz(self, request: web.Request) -> web.Response:
        """Readiness over HTTP, for load balancers that cannot speak gRPC health: 200 SERVING,
        else 503 NOT_SERVING. Open, as gRPC health is: load balancers and probes carry no key."""
        if self._ready:
            return web.json_response({"status": "SERVING"})
        return web.json_response({"status": "NOT_SERVING"}, status=503)

    async def stop(self, grace_s: float) -> None:
        """Report NOT_SERVING (readiness and liveness), refuse new calls and requests, and give
        those in flight ``grace_s`` to finish; then they are cancelled. The gRPC and HTTP ports
        drain side by side, and the whole stop returns within ``grace_s`` plus a few
        ``CANCEL_WAIT_S``."""
        if self._watching_readiness is not None:
            self._watching_readiness.cancel()
            await asyncio.wait({self._watching_readiness}, timeout=CANCEL_WAIT_S)
        self._ready = False
        await self.health.enter_graceful_shutdown()
        await asyncio.gather(
            self._stop_grpc(grace_s),
            self.http.stop(grace_s) if self.http is not None else asyncio.sleep(0),
        )
        if self._health_server is not None:
            await bounded("gRPC health port", self._health_server.stop(0), CANCEL_WAIT_S)
        if self.metrics is not None:  # last: a final scrape may still see the drain
            await self.metrics.stop(0)

    async def _stop_grpc(self, grace_s: float) -> None:
        # grpc.aio cancels the calls still running at the end of the grace period and then
        # waits for them to end; a handler that ignores its cancellation must not hold the
        # shutdown past the bound (the stop goes on in the background then).
        stopping = asyncio.ensure_future(self.server.stop(grace_s))
        done, _ = await asyncio.wait({stopping}, timeout=grace_s + CANCEL_WAIT_S)
        if not done:
            log.error("gRPC calls did not end after their cancellation", extra={"grace_s": grace_s})


def _static_json(body: bytes) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A handler answering ``body``, with an ETag (a client generator or fuzzer that polls it
    gets 304) and a short shared max-age: the document changes only with a deploy."""
    etag = etag_of(body)
    headers = {"ETag": etag, "Cache-Control": "public, max-age=300"}

    async def handler(request: web.Request) -> web.Response:
        if etag_matches(request.headers.get("If-None-Match"), etag):
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, content_type="application/json", headers=headers)

    return handler


async def run_until_signalled(
    server: GrpcServer,
    *,
    grace_s: float,
    on_start: Callable[[], Awaitable[None]] | None = None,
    stop: Callable[[float], Awaitable[None]] | None = None,
) -> None:
    """Start ``server`` (then ``on_start``: background work such as consumers), serve until
    SIGTERM or SIGINT, then ``stop(grace_s)``: the app's drain of every port it serves and its
    close (pools and connections, after the last call has finished); the server's own drain
    when None."""
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    await server.start()
    if on_start is not None:
        await on_start()
    log.info(
        "serving",
        extra={
            "port": server.port,
            "health_port": server.health_port,
            "metrics_port": server.metrics.port if server.metrics is not None else None,
            "tls": server.tls_mode,
        },
    )
    await stop_requested.wait()
    log.info("draining", extra={"grace_s": grace_s})
    started = loop.time()
    await (stop or server.stop)(grace_s)
    log.info("stopped", extra={"took_s": round(loop.time() - started, 3)})
