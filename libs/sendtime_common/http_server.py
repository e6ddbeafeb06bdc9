"""Serving an aiohttp application the way every Sendtime HTTP port is served: HTTPS with the
service's certificate (reloaded when its files change) unless plaintext was explicitly allowed,
no access log (handlers write one structured line without personal data), request bodies
inflated only by the handlers (never past their limit), and a graceful stop within a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from sendtime_common.auth.access import AccessInterceptor
from sendtime_common.json_input import JsonInputError, JsonReason, check_media_type, decode_content
from sendtime_common.metrics import HttpMetrics, metrics_app
from sendtime_common.shutdown import CANCEL_WAIT_S
from sendtime_common.tls import TlsSettings, server_ssl_context, warn_if_plaintext, watch_ssl_context

log = logging.getLogger(__name__)


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``.

    Raises:
        ValueError: not of that form.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"an HTTP address must be host:port, got {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


async def read_json_body(request: web.Request, max_bytes: int) -> bytes:
    """The body of a JSON request: its media type checked, its Content-Encoding undone, at most
    ``max_bytes`` (read or inflated). The application's ``client_max_size`` must be at least
    ``max_bytes``.

    Raises:
        JsonInputError: UNSUPPORTED_MEDIA_TYPE, BODY_TOO_LARGE, UNSUPPORTED_CONTENT_ENCODING
            or CONTENT_ENCODING_INVALID.
    """
    check_media_type(request.headers.get("Content-Type"))
    too_large = JsonInputError(JsonReason.BODY_TOO_LARGE, f"the body is larger than {max_bytes} bytes")
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:  # chunked bodies have no Content-Length
        raise too_large from None
    if len(body) > max_bytes:
        raise too_large
    return decode_content(body, request.headers.get("Content-Encoding"), max_bytes)


class HttpListener:
    """One aiohttp application on one address.

    Its stop is bounded: requests in progress get the grace period, then are cancelled. That
    includes requests whose client has gone: aiohttp leaves their handlers running (it cancels
    a handler only on shutdown, and only while the client is still connected), so the listener
    keeps the task of every handler it has started, to cancel them too.
    """

    def __init__(
        self,
        app: web.Application,
        address: str,
        *,
        tls: TlsSettings,
        name: str,
        grace_s: float,
        plaintext_by_design: bool = False,
        metered: bool = True,
    ) -> None:
        """``grace_s``: how long requests in progress may finish when the listener stops,
        unless ``stop`` is given another. ``name`` also labels the listener's request metrics
        (sendtime_common.metrics.HttpMetrics; ``metered``: kept at all). ``plaintext_by_design``:
        a port that carries neither credentials nor personal data (metrics), served without the
        plaintext warning.

        Raises:
            ValueError: the address is unusable.
            ConfigError: no certificate, and plaintext not allowed.
            UnusableCertificate: the certificate files are not usable.
        """
        tls.check()
        self._handling: set[asyncio.Task[object]] = set()
        app.middlewares.append(self._track)
        if metered:
            app.middlewares.append(HttpMetrics(name).middleware)
        self._plaintext_by_design = plaintext_by_design
        self._app = app
        self._host, self._requested_port = split_address(address)
        self._tls = tls
        self._ssl = server_ssl_context(tls) if tls.enabled else None
        self._name = name
        self._grace_s = grace_s
        self._runner: web.AppRunner | None = None
        self._reloading: asyncio.Task[None] | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The bound port (the real one when the address asked for port 0)."""
        if self._port is None:
            raise RuntimeError(f"the {self._name} listener is not started")
        return self._port

    @property
    def scheme(self) -> str:
        return "https" if self._ssl is not None else "http"

    @property
    def requests_in_progress(self) -> int:
        """Handlers running, for a client still connected or not."""
        return len(self._handling)

    @web.middleware
    async def _track(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        # aiohttp runs each request's handler (middlewares included) in a task of its own.
        task = asyncio.current_task()
        assert task is not None
        self._handling.add(task)
        try:
            return await handler(request)
        finally:
            self._handling.discard(task)

    async def start(self) -> None:
        """Bind the address and serve."""
        # auto_decompress off: aiohttp would inflate any coding it knows before a size check;
        # json_input.decode_content inflates only gzip and deflate, and never past the limit.
        # shutdown_timeout: what aiohttp itself waits, twice, for a request still in progress
        # when the runner is cleaned up; stop() has drained and cancelled them by then.
        runner = web.AppRunner(
            self._app, access_log=None, shutdown_timeout=CANCEL_WAIT_S, auto_decompress=False
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._requested_port, ssl_context=self._ssl)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        if self._ssl is not None:
            self._reloading = asyncio.create_task(
                watch_ssl_context(self._ssl, self._tls), name=f"{self._name}-tls"
            )
        if not self._plaintext_by_design:
            warn_if_plaintext(self._tls, lambda: f"{self._name} port {self._port}")
        log.info(f"{self._name} listening", extra={"port": self._port, "scheme": self.scheme})

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, let requests in progress finish for up to ``grace_s`` (the
        listener's own grace period when None), cancel those still running, and close every
        connection (idle keep-alive ones at once). Returns within the grace period plus about
        two ``CANCEL_WAIT_S``, whatever the handlers do."""
        grace_s = self._grace_s if grace_s is None else grace_s
        if self._reloading is not None:
            self._reloading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reloading
            self._reloading = None
        runner, self._runner = self._runner, None
        if runner is None:
            return
        for site in list(runner.sites):
            await site.stop()  # no new connections
        if self._handling:
            await asyncio.wait(set(self._handling), timeout=grace_s)
        if self._handling:
            late = set(self._handling)
            log.warning(
                f"{self._name}: requests still in progress after the grace period, cancelled",
                extra={"requests": len(late), "grace_s": grace_s},
            )
            for task in late:
                task.cancel()
            _, stuck = await asyncio.wait(late, timeout=CANCEL_WAIT_S)
            if stuck:
                log.error(f"{self._name}: handlers ignore cancellation", extra={"requests": len(stuck)})
        await runner.cleanup()


def metrics_listener(address: str, access: AccessInterceptor) -> HttpListener:
    """The metrics port on ``address``: ``GET /metrics`` for a key with the scope metrics.read,
    checked by ``access`` (sendtime_common.metrics); plaintext by design (it carries no personal
    data; the scraper's key crosses it, so only Prometheus should reach it); not started."""
    return HttpListener(
        metrics_app(access),
        address,
        tls=TlsSettings(allow_plaintext=True),
        name="metrics",
        grace_s=0,
        plaintext_by_design=True,
    )
