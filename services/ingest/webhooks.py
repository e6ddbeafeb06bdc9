"""Provider webhooks over HTTP: a store (Shopify) and an email provider (SendGrid) push events.

Each request is checked in this order: endpoint configured (else 404), media type (415), body
size (413), Content-Encoding (415, or 413 when it inflates past the size limit), signature (401:
nothing is parsed or ingested), the body as I-JSON and the provider's envelope (400, with a
machine-readable reason). Then every item of the delivery is mapped on its own, and the answer
is per item.

Both providers retry any non-2xx answer, and in the end drop the delivery, good items with bad.
So one bad item never fails a delivery: the answer is 200 once every item has a final outcome
(accepted, duplicate, ignored; rejected or quarantined into the dead-letter store, where it can
be replayed), with the outcome of each item and the index and reason of each bad one. It is 503
with Retry-After only while something could not be stored (the event log, the dead-letter
store): a retry can then succeed, and event ids are deterministic, so the items stored the
first time count as duplicates. An unexpected error is 500 with an opaque error id, logged with
the exception; the body never shows the exception.

Logs carry counts, topics, indexes, reasons and event ids only: never a body, an email address
or a header value.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

from ingest.event_answers import DEFAULT_RETRY_AFTER_S, event_answer, outcome_counts, retry_info
from ingest.store import StoreError
from ingest.webhook_mapping import (
    ITEM_REASONS,
    SHOPIFY_TOPIC_HEADER,
    SHOPIFY_WEBHOOK_ID_HEADER,
    ItemOutcome,
    MappedDelivery,
    MappedItem,
    Provider,
    WebhookSignatureError,
    load_sendgrid_public_key,
    sendgrid_events,
    shopify_events,
    verify_sendgrid_signature,
    verify_shopify_signature,
)
from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.errors import log_unexpected, new_error_id
from sendtime_common.http_server import HttpListener, read_json_body
from sendtime_common.json_input import (
    SUPPORTED_ENCODINGS,
    JsonInputError,
    JsonReason,
    parse_json,
)
from sendtime_common.tls import TlsSettings

log = logging.getLogger(__name__)

# Events handed to the sink at once: SendGrid batches can hold thousands, and the sink stores a
# batch concurrently. Matches ingest's SendEvents limit.
MAX_EVENTS_PER_SINK_CALL = 1000
# Items of one SendGrid delivery: a 1 MiB body of 3-byte items would be 350,000 dead letters and
# a 25 MB answer. SendGrid's real batches hold a few thousand events at most.
MAX_ITEMS_PER_DELIVERY = 10_000


class EventSink(Protocol):
    """Where mapped events go: ``ingest.ingestor.Ingestor`` (outcomes in input order)."""

    async def ingest_batch(self, events: list[ingest_pb2.Event]) -> list[ingest_pb2.EventResult]: ...


class Quarantine(Protocol):
    """Where items that could not be mapped go: ``ingest.dead_letters.DeadLetters``."""

    async def quarantine(
        self, provider: Provider, webhook_id: str, items: Sequence[tuple[MappedItem, str]]
    ) -> None:
        """Keep each item, with the error id logged for it ('' when none).

        Raises:
            ingest.store.StoreError: the dead-letter store is unavailable.
        """
        ...


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


def _json(status: int, body: dict[str, object], headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


def _error(
    status: int, reason: str, message: str, headers: dict[str, str] | None = None, **more: object
) -> web.Response:
    """``{"error": {"reason", "message", ...}}``: ``reason`` is stable for clients to branch on."""
    return _json(status, {"error": {"reason": reason, "message": message, **more}}, headers)


def _refused(exc: JsonInputError) -> web.Response:
    headers = None
    if exc.reason == JsonReason.UNSUPPORTED_CONTENT_ENCODING:  # RFC 9110 15.5.16: say what works
        headers = {"Accept-Encoding": ", ".join(("identity", *SUPPORTED_ENCODINGS))}
    return _json(exc.http_status, {"error": exc.to_json()}, headers)


# Outcomes of items that were not mapped, as the answer names them: the sender's malformed item
# is rejected; one of a type Sendtime does not map, or whose mapping failed (a bug here), is
# quarantined. Both are in the dead-letter store.
_UNMAPPED_NAMES = {
    ItemOutcome.UNKNOWN_TYPE: "quarantined",
    ItemOutcome.FAILED: "quarantined",
    ItemOutcome.MALFORMED: "rejected",
}


@web.middleware
async def _unexpected_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A 500 with an opaque error id for anything unexpected; the exception is only logged."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as exc:
        error_id = new_error_id()
        log_unexpected(log, "webhook request failed", exc, {"error_id": error_id, "path": request.path})
        return _error(500, "INTERNAL", f"an unexpected error; error id {error_id}", error_id=error_id)


class WebhookServer:
    """An aiohttp server for ``POST /webhooks/shopify``, ``POST /webhooks/sendgrid`` and
    ``GET /healthz``, feeding events to ``sink`` and items it cannot map to ``quarantine``."""

    def __init__(
        self,
        sink: EventSink,
        settings: WebhookSettings,
        *,
        tls: TlsSettings,
        quarantine: Quarantine,
        clock: Callable[[], datetime] = _utc_now,
        metered: bool = True,
    ) -> None:
        """Check the configuration here, so that a bad one fails start-up, not every request.
        HTTPS with the service's certificate (reloaded when its files change) unless plaintext is
        allowed and no certificate is set. ``metered``: requests counted in the service's
        metrics (sendtime_common.metrics).

        Raises:
            ValueError: the address or the SendGrid key is unusable.
            ConfigError: no certificate, and plaintext not allowed.
            UnusableCertificate: the certificate files are not usable.
        """
        self._sink = sink
        self._quarantine = quarantine
        self._settings = settings
        self._clock = clock
        self._sendgrid_key: ec.EllipticCurvePublicKey | None = (
            load_sendgrid_public_key(settings.sendgrid_public_key) if settings.sendgrid_public_key else None
        )
        self._listener = HttpListener(
            self._app(),
            settings.address,
            tls=tls,
            name="webhook",
            grace_s=settings.shutdown_grace_s,
            metered=metered,
        )

    @property
    def port(self) -> int:
        """The bound port (the real one when the address asked for port 0)."""
        return self._listener.port

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=self._settings.max_body_bytes, middlewares=[_unexpected_errors])
        app.router.add_post("/webhooks/shopify", self._shopify)
        app.router.add_post("/webhooks/sendgrid", self._sendgrid)
        app.router.add_get("/healthz", self._healthz)
        return app

    async def start(self) -> None:
        """Bind the address and serve."""
        await self._listener.start()
        log.info(
            "webhooks listening",
            extra={
                "port": self._listener.port,
                "shopify": bool(self._settings.shopify_secret),
                "sendgrid": self._sendgrid_key is not None,
            },
        )

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, let requests in progress finish within ``grace_s`` (the settings'
        shutdown grace when None), cancel those still running, close."""
        await self._listener.stop(grace_s)

    async def _healthz(self, request: web.Request) -> web.Response:
        return _json(200, {"status": "ok"})

    async def _read_body(self, request: web.Request) -> bytes:
        """The body as the provider signed it (sendtime_common.http_server.read_json_body).

        Raises:
            JsonInputError: UNSUPPORTED_MEDIA_TYPE, BODY_TOO_LARGE, UNSUPPORTED_CONTENT_ENCODING
                or CONTENT_ENCODING_INVALID.
        """
        return await read_json_body(request, self._settings.max_body_bytes)

    async def _shopify(self, request: web.Request) -> web.Response:
        secret = self._settings.shopify_secret
        if not secret:
            return _error(404, "WEBHOOK_NOT_CONFIGURED", "the Shopify webhook is not configured")
        try:
            body = await self._read_body(request)
        except JsonInputError as exc:
            return self._log_refused(Provider.SHOPIFY, exc)
        try:
            verify_shopify_signature(secret, request.headers, body)
        except WebhookSignatureError as exc:
            log.warning("webhook refused", extra={"provider": "shopify", "reason": str(exc)})
            return _error(401, "SIGNATURE_INVALID", f"invalid signature: {exc}")
        topic = request.headers.get(SHOPIFY_TOPIC_HEADER, "").strip()
        webhook_id = request.headers.get(SHOPIFY_WEBHOOK_ID_HEADER, "").strip()
        if not topic:
            log.warning("webhook malformed", extra={"provider": "shopify", "reason": "WEBHOOK_TOPIC_MISSING"})
            return _error(400, "WEBHOOK_TOPIC_MISSING", f"missing {SHOPIFY_TOPIC_HEADER} header")
        try:
            payload = parse_json(body, top_level="object")
        except JsonInputError as exc:
            return self._log_refused(Provider.SHOPIFY, exc)
        about: dict[str, object] = {"provider": "shopify", "topic": topic[:64], "webhook_id": webhook_id[:64]}
        return await self._answer(shopify_events(topic, webhook_id, payload), about)

    async def _sendgrid(self, request: web.Request) -> web.Response:
        key = self._sendgrid_key
        if key is None:
            return _error(404, "WEBHOOK_NOT_CONFIGURED", "the SendGrid webhook is not configured")
        try:
            body = await self._read_body(request)
        except JsonInputError as exc:
            return self._log_refused(Provider.SENDGRID, exc)
        max_age = timedelta(seconds=self._settings.signature_max_age_s)
        try:
            verify_sendgrid_signature(key, request.headers, body, self._clock(), max_age)
        except WebhookSignatureError as exc:
            log.warning("webhook refused", extra={"provider": "sendgrid", "reason": str(exc)})
            return _error(401, "SIGNATURE_INVALID", f"invalid signature: {exc}")
        try:
            payload = parse_json(body, top_level="array")
        except JsonInputError as exc:
            return self._log_refused(Provider.SENDGRID, exc)
        if len(payload) > MAX_ITEMS_PER_DELIVERY:
            log.warning("webhook refused", extra={"provider": "sendgrid", "reason": "WEBHOOK_TOO_MANY_ITEMS"})
            return _error(
                413, "WEBHOOK_TOO_MANY_ITEMS", f"a delivery may hold at most {MAX_ITEMS_PER_DELIVERY} events"
            )
        return await self._answer(sendgrid_events(payload), {"provider": "sendgrid"})

    @staticmethod
    def _log_refused(provider: Provider, exc: JsonInputError) -> web.Response:
        # The reason only: the message and path may quote keys the sender wrote.
        log.warning("webhook refused", extra={"provider": str(provider), "reason": str(exc.reason)})
        return _refused(exc)

    async def _answer(self, delivery: MappedDelivery, about: dict[str, object]) -> web.Response:
        """Dead-letter the items that were not mapped, ingest the events of the others, and
        answer per item (503 while anything must be retried)."""
        unmapped = [item for item in delivery.items if item.outcome in ITEM_REASONS]
        error_ids: dict[int, str] = {}
        for item in unmapped:
            if item.error is not None:
                error_ids[item.index] = new_error_id()
                log_unexpected(
                    log,
                    "webhook item could not be mapped",
                    item.error,
                    {**about, "index": item.index, "error_id": error_ids[item.index]},
                )
        if unmapped:
            # One line a delivery, however many items: a batch can hold thousands.
            log.warning(
                "webhook items not mapped",
                extra={
                    **about,
                    "reasons": dict(Counter(ITEM_REASONS[item.outcome] for item in unmapped)),
                    "types": sorted({item.type for item in unmapped})[:10],
                    "indexes": [item.index for item in unmapped[:20]],
                },
            )
            try:
                await self._quarantine.quarantine(
                    delivery.provider,
                    delivery.webhook_id,
                    [(item, error_ids.get(item.index, "")) for item in unmapped],
                )
            except StoreError as exc:
                # Nothing is ingested either: the whole delivery comes again.
                log.warning("dead-letter store unavailable", extra={**about, "error": str(exc)})
                return _error(
                    503,
                    "DEAD_LETTER_STORE_UNAVAILABLE",
                    "the dead-letter store is unavailable; retry the delivery",
                    headers={"Retry-After": str(DEFAULT_RETRY_AFTER_S)},
                )

        events = delivery.events
        results: list[ingest_pb2.EventResult] = []
        for start in range(0, len(events), MAX_EVENTS_PER_SINK_CALL):
            results.extend(await self._sink.ingest_batch(events[start : start + MAX_EVENTS_PER_SINK_CALL]))

        answers: list[dict[str, Any]] = []
        remaining = iter(results)
        for item in delivery.items:
            if item.outcome == ItemOutcome.MAPPED:
                answers.extend(event_answer(item.index, next(remaining), about) for _ in item.events)
            elif item.outcome == ItemOutcome.IGNORED:
                answers.append({"index": item.index, "outcome": "ignored", "type": item.type})
            else:
                answer = {
                    "index": item.index,
                    "outcome": _UNMAPPED_NAMES[item.outcome],
                    "type": item.type,
                    "reason": ITEM_REASONS[item.outcome],
                    "message": item.problem,
                }
                if item.index in error_ids:
                    answer["error_id"] = error_ids[item.index]
                answers.append(answer)

        counts, retry = outcome_counts(answers)
        if retry:
            after, reason = retry_info(results)
            log.warning("webhook events must be retried", extra={**about, **counts, "retry": retry})
            return _json(
                503,
                {
                    "error": {
                        "reason": reason,
                        "message": "some events could not be stored; retry the delivery",
                    },
                    **counts,
                    "retry": retry,
                    "items": answers,
                },
                headers={"Retry-After": str(after)},
            )
        log.info("webhook ingested", extra={**about, **counts})
        return _json(200, {**counts, "items": answers})
