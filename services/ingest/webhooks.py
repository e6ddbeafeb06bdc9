"""Provider webhooks over HTTP: a store (Shopify) and an email provider (SendGrid) push events.

Each request is checked in this order: endpoint configured (else 404), body size (413),
signature (401: nothing is parsed or ingested), body format (400), then the events go to ingest
as one batch. Both providers retry any non-2xx answer, so the answer follows what ingest did:
200 once every event has a final outcome (accepted, duplicate, or rejected into the dead-letter
store), 503 with Retry-After while the event log cannot store some of them. Event ids are
deterministic, so a retried delivery counts the already stored events as duplicates.

Logs carry counts, topics and event ids only: never a body, an email address or a header value.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from google.rpc import error_details_pb2

from ingest.webhook_mapping import (
    SHOPIFY_TOPIC_HEADER,
    SHOPIFY_WEBHOOK_ID_HEADER,
    MappedEvents,
    WebhookPayloadError,
    WebhookSignatureError,
    load_sendgrid_public_key,
    parse_json,
    sendgrid_events,
    shopify_events,
    verify_sendgrid_signature,
    verify_shopify_signature,
)
from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.errors import field_violations
from sendtime_common.tls import TlsSettings, server_ssl_context, warn_if_plaintext, watch_ssl_context

log = logging.getLogger(__name__)

# Events handed to the sink at once: SendGrid batches can hold thousands, and the sink stores a
# batch concurrently. Matches ingest's SendEvents limit.
MAX_EVENTS_PER_SINK_CALL = 1000
DEFAULT_RETRY_AFTER_S = 1


class EventSink(Protocol):
    """Where mapped events go: ``ingest.ingestor.Ingestor`` (outcomes in input order)."""

    async def ingest_batch(self, events: list[ingest_pb2.Event]) -> list[ingest_pb2.EventResult]: ...


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    """The webhook listener. An empty secret or key turns that provider's endpoint off (404)."""

    address: str = "0.0.0.0:8081"
    # The Shopify app's client secret (or the store's webhook signing secret).
    shopify_secret: str = field(default="", repr=False)
    # SendGrid's Signed Event Webhook verification key: base64 DER ECDSA P-256 public key.
    sendgrid_public_key: str = ""
    max_body_bytes: int = 1024 * 1024
    # How far a SendGrid signature timestamp may be from now: stops replays of captured requests.
    signature_max_age_s: float = 300.0
    # How long stop() lets requests in progress finish.
    shutdown_grace_s: float = 10.0


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"webhook address must be host:port, got {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _json(status: int, body: dict[str, object], headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


def _error(status: int, message: str) -> web.Response:
    return _json(status, {"error": message})


def _retry_after_s(results: list[ingest_pb2.EventResult]) -> int:
    """The longest RetryInfo delay among the results, in whole seconds (at least 1)."""
    longest = 0.0
    for result in results:
        for detail in result.status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):  # type: ignore[arg-type]
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                longest = max(longest, info.retry_delay.ToTimedelta().total_seconds())
    return max(DEFAULT_RETRY_AFTER_S, math.ceil(longest))


class WebhookServer:
    """An aiohttp server for ``POST /webhooks/shopify``, ``POST /webhooks/sendgrid`` and
    ``GET /healthz``, feeding ``sink``."""

    def __init__(
        self,
        sink: EventSink,
        settings: WebhookSettings,
        *,
        tls: TlsSettings,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        """Check the configuration here, so that a bad one fails start-up, not every request.
        HTTPS with the service's certificate (reloaded when its files change) unless plaintext is
        allowed and no certificate is set.

        Raises:
            ValueError: the address or the SendGrid key is unusable.
            ConfigError: no certificate, and plaintext not allowed.
            UnusableCertificate: the certificate files are not usable.
        """
        tls.check()
        self._sink = sink
        self._settings = settings
        self._tls = tls
        self._ssl = server_ssl_context(tls) if tls.enabled else None
        self._reloading: asyncio.Task[None] | None = None
        self._clock = clock
        self._host, self._requested_port = _split_address(settings.address)
        self._sendgrid_key: ec.EllipticCurvePublicKey | None = (
            load_sendgrid_public_key(settings.sendgrid_public_key) if settings.sendgrid_public_key else None
        )
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The bound port (the real one when the address asked for port 0)."""
        if self._port is None:
            raise RuntimeError("the webhook server is not started")
        return self._port

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=self._settings.max_body_bytes)
        app.router.add_post("/webhooks/shopify", self._shopify)
        app.router.add_post("/webhooks/sendgrid", self._sendgrid)
        app.router.add_get("/healthz", self._healthz)
        return app

    async def start(self) -> None:
        """Bind the address and serve."""
        # No access log: one structured line per webhook is written below instead.
        runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=self._settings.shutdown_grace_s)
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
            self._reloading = asyncio.create_task(watch_ssl_context(self._ssl, self._tls), name="webhook-tls")
        warn_if_plaintext(self._tls, lambda: f"webhook port {self._port}")
        log.info(
            "webhooks listening",
            extra={
                "port": self._port,
                "shopify": bool(self._settings.shopify_secret),
                "sendgrid": self._sendgrid_key is not None,
            },
        )

    async def stop(self) -> None:
        """Stop accepting, let requests in progress finish, close."""
        if self._reloading is not None:
            self._reloading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reloading
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, request: web.Request) -> web.Response:
        return _json(200, {"status": "ok"})

    async def _read_body(self, request: web.Request) -> bytes | web.Response:
        """The raw body (signatures are over the exact bytes), or a 413 answer."""
        limit = self._settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return _error(413, f"the body is larger than {limit} bytes")
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:  # chunked bodies have no Content-Length
            return _error(413, f"the body is larger than {limit} bytes")

    async def _shopify(self, request: web.Request) -> web.Response:
        secret = self._settings.shopify_secret
        if not secret:
            return _error(404, "the Shopify webhook is not configured")
        body = await self._read_body(request)
        if isinstance(body, web.Response):
            return body
        try:
            verify_shopify_signature(secret, request.headers, body)
        except WebhookSignatureError as exc:
            log.warning("webhook refused", extra={"provider": "shopify", "reason": str(exc)})
            return _error(401, f"invalid signature: {exc}")
        topic = request.headers.get(SHOPIFY_TOPIC_HEADER, "").strip()
        webhook_id = request.headers.get(SHOPIFY_WEBHOOK_ID_HEADER, "").strip()
        try:
            if not topic:
                raise WebhookPayloadError(f"missing {SHOPIFY_TOPIC_HEADER} header")
            mapped = shopify_events(topic, webhook_id, parse_json(body))
        except WebhookPayloadError as exc:
            log.warning(
                "webhook malformed", extra={"provider": "shopify", "topic": topic[:64], "reason": str(exc)}
            )
            return _error(400, str(exc))
        return await self._ingest(
            mapped, {"provider": "shopify", "topic": topic[:64], "webhook_id": webhook_id[:64]}
        )

    async def _sendgrid(self, request: web.Request) -> web.Response:
        key = self._sendgrid_key
        if key is None:
            return _error(404, "the SendGrid webhook is not configured")
        body = await self._read_body(request)
        if isinstance(body, web.Response):
            return body
        max_age = timedelta(seconds=self._settings.signature_max_age_s)
        try:
            verify_sendgrid_signature(key, request.headers, body, self._clock(), max_age)
        except WebhookSignatureError as exc:
            log.warning("webhook refused", extra={"provider": "sendgrid", "reason": str(exc)})
            return _error(401, f"invalid signature: {exc}")
        try:
            mapped = sendgrid_events(parse_json(body))
        except WebhookPayloadError as exc:
            log.warning("webhook malformed", extra={"provider": "sendgrid", "reason": str(exc)})
            return _error(400, str(exc))
        if mapped.unknown_types:
            log.warning(
                "unknown SendGrid event types ignored",
                extra={"provider": "sendgrid", "types": sorted(mapped.unknown_types)},
            )
        return await self._ingest(mapped, {"provider": "sendgrid"})

    async def _ingest(self, mapped: MappedEvents, about: dict[str, object]) -> web.Response:
        """Hand the events to the sink and answer with the counts (503 while any must be retried)."""
        results: list[ingest_pb2.EventResult] = []
        try:
            for start in range(0, len(mapped.events), MAX_EVENTS_PER_SINK_CALL):
                results.extend(
                    await self._sink.ingest_batch(mapped.events[start : start + MAX_EVENTS_PER_SINK_CALL])
                )
        except Exception:
            log.exception("webhook events could not be ingested", extra=about)
            return _error(500, "the events could not be ingested")

        outcomes = Counter(r.outcome for r in results)
        counts = {
            "accepted": outcomes[ingest_pb2.EVENT_OUTCOME_ACCEPTED],
            "duplicate": outcomes[ingest_pb2.EVENT_OUTCOME_DUPLICATE],
            "rejected": outcomes[ingest_pb2.EVENT_OUTCOME_REJECTED],
            "ignored": mapped.ignored,
        }
        for result in results:
            if result.outcome == ingest_pb2.EVENT_OUTCOME_REJECTED:
                # Field paths only: a violation's description could quote what was sent.
                fields = sorted({v.field for v in field_violations(result.status)})
                log.warning(
                    "webhook event rejected", extra={**about, "event_id": result.event_id, "fields": fields}
                )

        retry = outcomes[ingest_pb2.EVENT_OUTCOME_RETRY]
        if retry:
            after = _retry_after_s(results)
            log.warning("webhook events must be retried", extra={**about, **counts, "retry": retry})
            return _json(
                503,
                {**counts, "retry": retry, "error": "the event log is unavailable; retry the delivery"},
                headers={"Retry-After": str(after)},
            )
        log.info("webhook ingested", extra={**about, **counts})
        return _json(200, dict(counts))
