"""Segment's HTTP Tracking API on ingest's HTTP port: ``POST /v1/track``, ``/v1/identify``,
``/v1/page``, ``/v1/screen``, ``/v1/alias``, ``/v1/group`` and ``/v1/batch``, so that a Segment
or RudderStack library, or anything speaking the same API, can send to Sendtime.

A request is a SendEvents call in all but its body: it runs behind SendEvents' guards (the key,
the ``events.write`` scope, the key's rate limit, load shedding), with the key taken from
Segment's Basic auth (the write key is the user name) or from ``Authorization: Bearer``. Then
its body (at most 32 KB for one call, 500 KB for a batch: Segment's limits) is mapped call by
call (ingest.segment) and the events go to the ingestor, at most ``max_events_per_batch`` at a
time.

The answer is per call, as the provider webhooks' is (ingest.event_answers): Segment's
libraries retry a whole request on a 5xx or 429 and drop it on another 4xx, so one bad call
must not cost the good ones. It is 200 once every call has a final outcome, and 503 with
Retry-After while an event could not be stored (a retry sends the same messageIds, so what was
stored counts as duplicate). Calls the mapping rejects are answered and logged (their field
paths only), not kept: docs/segment.md says why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import grpc
import orjson
from aiohttp import BasicAuth, web
from google.protobuf import json_format
from opentelemetry import propagate, trace

from ingest.event_answers import event_answer, outcome_counts, retry_info
from ingest.segment import (
    CALL_TYPES,
    MAX_BATCH_BYTES,
    MAX_CALL_BYTES,
    CallOutcome,
    MappedRequest,
    map_batch,
    map_call,
)
from ingest.webhooks import EventSink
from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.auth.access import current_principal
from sendtime_common.errors import bad_request_status, log_unexpected, new_error_id, retry_status
from sendtime_common.http_gateway import (
    HttpAbort,
    HttpCallContext,
    InProcessCalls,
    json_input_response,
    status_response,
)
from sendtime_common.http_server import read_json_body
from sendtime_common.json_input import JsonInputError, parse_json

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

SEND_EVENTS = f"/{ingest_pb2.DESCRIPTOR.services_by_name['IngestService'].full_name}/SendEvents"
BATCH = "batch"
# Segment's clients authenticate with Basic; curl users may prefer Bearer. A 401 offers both.
CHALLENGE = 'Basic realm="sendtime", Bearer realm="sendtime"'
# Where the events of a rejected call would have gone, for the answer and the log.
MALFORMED = "SEGMENT_CALL_MALFORMED"
MAPPING_FAILED = "SEGMENT_CALL_MAPPING_FAILED"


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class _Call:
    """What the guarded handler is handed: the route's call type and the request."""

    type: str
    request: web.Request


def credentials(request: web.Request) -> list[tuple[str, str]]:
    """The call's ``authorization`` metadata, as the access check reads it: Segment's Basic
    auth (the write key as the user name, the password empty and ignored) as ``Bearer <key>``;
    anything else as it is, for the check to accept or refuse."""
    metadata = []
    for value in request.headers.getall("Authorization", []):
        if value.strip()[:6].lower() == "basic ":
            try:
                key = BasicAuth.decode(value.strip()).login
            except ValueError:
                key = ""  # refused as a malformed key, without echoing what was sent
            metadata.append(("authorization", f"Bearer {key}"))
        else:
            metadata.append(("authorization", value))
    return metadata


class SegmentRoutes:
    """The Segment routes, feeding ``sink`` (the ingestor) behind SendEvents' guards."""

    def __init__(
        self,
        calls: InProcessCalls,
        sink: EventSink,
        *,
        max_events_per_batch: int,
        default_currency: str = "",
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._sink = sink
        self._max_events = max_events_per_batch
        self._default_currency = default_currency
        self._clock = clock
        self._handler = calls.handler_in_place_of(SEND_EVENTS, self._collect)

    def add_to(self, app: web.Application) -> None:
        for call_type in sorted(CALL_TYPES | {BATCH}):
            app.router.add_post(f"/v1/{call_type}", partial(self._handle, call_type))

    async def _handle(self, call_type: str, request: web.Request) -> web.StreamResponse:
        route = f"/v1/{call_type}"
        with tracer.start_as_current_span(
            f"POST {route}",
            context=propagate.extract(request.headers),
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": "POST", "http.route": route},
        ) as span:
            context = HttpCallContext(credentials(request), request.remote or "")
            try:
                response: web.StreamResponse = await self._handler.unary_unary(  # type: ignore[misc]
                    _Call(call_type, request),
                    context,  # type: ignore[arg-type]  # the in-process stand-in for a call's context
                )
            except HttpAbort as aborted:
                response = status_response(aborted.status, {"WWW-Authenticate": CHALLENGE})
            span.set_attribute("http.response.status_code", response.status)
            return response

    async def _collect(self, call: _Call, context: grpc.aio.ServicerContext[Any, Any]) -> web.Response:
        """Read, map and ingest one request; the caller has been allowed to send events."""
        principal = current_principal()
        try:
            body = await read_json_body(
                call.request, MAX_BATCH_BYTES if call.type == BATCH else MAX_CALL_BYTES
            )
            payload = parse_json(body, top_level="object")
        except JsonInputError as exc:
            log.info("segment request refused", extra={"route": call.type, "reason": str(exc.reason)})
            return json_input_response(exc)
        about: dict[str, object] = {"route": call.type, "principal": principal.name}
        received_at = self._clock()
        if call.type == BATCH:
            mapped = map_batch(
                payload,
                received_at=received_at,
                key_id=principal.key_id,
                default_currency=self._default_currency,
            )
        else:
            mapped = map_call(
                call.type,
                payload,
                received_at=received_at,
                key_id=principal.key_id,
                default_currency=self._default_currency,
            )
        if mapped.problem is not None:
            log.info("segment request refused", extra={**about, "field": mapped.problem.field})
            return status_response(bad_request_status("the body is not a Segment batch", [mapped.problem]))
        error_ids = self._log_rejected(mapped, about)
        events = mapped.events
        results: list[ingest_pb2.EventResult] = []
        for start in range(0, len(events), self._max_events):
            results.extend(await self._sink.ingest_batch(events[start : start + self._max_events]))
        answers = self._answers(mapped, results, error_ids, about)
        counts, retry = outcome_counts(answers)
        if retry:
            after, reason = retry_info(results)
            log.warning("segment events must be retried", extra={**about, **counts, "retry": retry})
            status = retry_status(
                grpc.StatusCode.UNAVAILABLE,
                "some events could not be stored; send the request again",
                reason,
                after,
            )
            body_json = {**json_format.MessageToDict(status), **counts, "retry": retry, "items": answers}
            return web.Response(
                body=orjson.dumps(body_json),
                status=503,
                content_type="application/json",
                headers={"Retry-After": str(after), "Cache-Control": "no-store"},
            )
        log.info("segment calls ingested", extra={**about, **counts})
        return web.Response(
            body=orjson.dumps({"success": True, **counts, "items": answers}),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    @staticmethod
    def _log_rejected(mapped: MappedRequest, about: dict[str, object]) -> dict[int, str]:
        """One line for the calls the mapping rejected (a batch can hold thousands), and one with
        the exception for each that a bug rejected; their error ids by index."""
        rejected = [item for item in mapped.items if item.outcome == CallOutcome.REJECTED]
        error_ids: dict[int, str] = {}
        for item in rejected:
            if item.error is not None:
                error_ids[item.index] = new_error_id()
                log_unexpected(
                    log,
                    "segment call could not be mapped",
                    item.error,
                    {**about, "index": item.index, "error_id": error_ids[item.index]},
                )
        if rejected:
            log.warning(
                "segment calls rejected",
                extra={
                    **about,
                    "rejected": len(rejected),
                    "fields": sorted({item.reason.field for item in rejected if item.reason})[:10],
                    "types": sorted({item.type for item in rejected})[:10],
                    "indexes": [item.index for item in rejected[:20]],
                },
            )
        return error_ids

    @staticmethod
    def _answers(
        mapped: MappedRequest,
        results: list[ingest_pb2.EventResult],
        error_ids: dict[int, str],
        about: dict[str, object],
    ) -> list[dict[str, Any]]:
        """One entry per call, in order (a call gives one event at most)."""
        remaining = iter(results)
        answers: list[dict[str, Any]] = []
        for item in mapped.items:
            if item.outcome == CallOutcome.ACCEPTED and item.events:
                answers.extend(
                    {**event_answer(item.index, next(remaining), about), "type": item.type}
                    for _ in item.events
                )
            elif item.outcome == CallOutcome.ACCEPTED:
                answers.append(
                    {
                        "index": item.index,
                        "type": item.type,
                        "outcome": "ignored",
                        "message": "nothing to record",
                    }
                )
            else:
                answer: dict[str, Any] = {
                    "index": item.index,
                    "type": item.type,
                    "outcome": "rejected",
                    "reason": MAPPING_FAILED if item.index in error_ids else MALFORMED,
                }
                if item.reason is not None:
                    answer["violations"] = [
                        {"field": item.reason.field, "description": item.reason.description}
                    ]
                if item.index in error_ids:
                    answer["error_id"] = error_ids[item.index]
                answers.append(answer)
        return answers
