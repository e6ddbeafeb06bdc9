"""The HTTP/JSON face of a service: the routes its contracts declare (``google.api.http``,
sendtime_common.http_routes), transcoded in process to the same RPC handlers gRPC calls reach.

No second network hop and no second policy: a request goes through the server's own
interceptors (load shedding, internal errors, access: the API key from ``Authorization:
Bearer``, its scope, its rate limit, the audit trail), so HTTP and gRPC callers meet the same
keys, scopes and limits. JSON is protobuf's canonical mapping. An error is the RPC's
``google.rpc.Status`` as JSON (``{"code": 5, "message": ..., "details": [...]}``, as
grpc-gateway answers), under the standard gRPC-to-HTTP status (400, 401, 403, 404, 409, 429 and
503 with Retry-After, ...).

A method may give a ``CachePolicy``: its answers then carry an ETag and ``Cache-Control``, and a
GET whose ``If-None-Match`` names the current ETag is answered 304 without a body. A method may
also give an ``AnswerMemo`` (sendtime_common.answer_memo): its answers' JSON and ETag are then
kept by what the answer holds, and an answer holding the same is not encoded again.

What is per route (the request message's class, its query parameters) is worked out once, when
the gateway is made; a request that carries no query string and only ASCII in its path skips
``json_format.ParseDict`` (its message is built from the path's values directly, as ParseDict
would).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import orjson
from aiohttp import web
from google.protobuf import json_format, message_factory
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry import propagate, trace

from sendtime_common.answer_memo import AnswerMemo, EncodedAnswer
from sendtime_common.errors import (
    FieldViolation,
    bad_request_status,
    details_of,
    error_info_status,
    log_unexpected,
    new_error_id,
)
from sendtime_common.handlers import Handler, WrappingInterceptor
from sendtime_common.http_routes import (
    HttpRoute,
    QueryParameter,
    query_index,
    query_to_json,
    set_path_values,
)
from sendtime_common.http_server import read_json_body
from sendtime_common.internal_errors import internal_status
from sendtime_common.json_input import SUPPORTED_ENCODINGS, JsonInputError, JsonReason, parse_json
from sendtime_common.metrics import ROUTE_KEY, UNMATCHED_ROUTE
from sendtime_common.storable import json_carriable

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

# The standard mapping (google.rpc.Code's documentation; grpc-gateway and Envoy use the same).
HTTP_STATUS: dict[int, int] = {
    code_pb2.OK: 200,
    code_pb2.CANCELLED: 499,
    code_pb2.UNKNOWN: 500,
    code_pb2.INVALID_ARGUMENT: 400,
    code_pb2.DEADLINE_EXCEEDED: 504,
    code_pb2.NOT_FOUND: 404,
    code_pb2.ALREADY_EXISTS: 409,
    code_pb2.PERMISSION_DENIED: 403,
    code_pb2.UNAUTHENTICATED: 401,
    code_pb2.RESOURCE_EXHAUSTED: 429,
    code_pb2.FAILED_PRECONDITION: 400,
    code_pb2.ABORTED: 409,
    code_pb2.OUT_OF_RANGE: 400,
    code_pb2.UNIMPLEMENTED: 501,
    code_pb2.INTERNAL: 500,
    code_pb2.UNAVAILABLE: 503,
    code_pb2.DATA_LOSS: 500,
}
ROUTE_NOT_FOUND = "ROUTE_NOT_FOUND"
METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
_JSON = "application/json"
_DETAILS_TRAILER = "grpc-status-details-bin"  # where abort_with puts the rich status


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """How a method's answers may be cached: ``etag_basis`` gives what the ETag hashes (the
    response, or a copy without what changes on every call, such as a data age), ``max_age_s``
    the Cache-Control max-age. Answers are ``private``: they hold personal data. ``weak``: the
    ETag names what the answer means, not its bytes (RFC 9110 8.8.1)."""

    max_age_s: Callable[[Message], int]
    etag_basis: Callable[[Message], bytes]
    weak: bool = False


class HttpAbort(grpc.aio.AbortError):
    """``context.abort`` on an HTTP call: the interceptors let it through as they let gRPC's."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status


class HttpCallContext:
    """What a handler and the interceptors use of ``grpc.aio.ServicerContext``, for a call
    that came over HTTP."""

    def __init__(self, metadata: Sequence[tuple[str, str]], peer: str) -> None:
        self._metadata = tuple(metadata)
        self._peer = peer
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: tuple[tuple[str, str | bytes], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None  # HTTP carries no deadline: the method's default applies

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}  # client certificates identify gRPC callers only

    def peer(self) -> str:
        return self._peer

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def details(self) -> str:
        return self._details

    def set_details(self, details: str) -> None:
        self._details = details

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self._trailing = tuple(metadata)

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._trailing

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Sequence[tuple[str, str | bytes]] = (),
    ) -> None:
        self._code = code
        self._details = details
        status = _status_from_trailer(trailing_metadata)
        if status is None:
            status = status_pb2.Status(code=code.value[0], message=details)
        raise HttpAbort(status)


def _status_from_trailer(trailing: Iterable[tuple[str, str | bytes]]) -> status_pb2.Status | None:
    for key, value in trailing:
        if key == _DETAILS_TRAILER and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None


class _HandlerRecorder:
    """Stands in the grpc.aio server a service's ``register`` adds its servicers to."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the registered handlers below are the same ones, by method

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Handler]) -> None:
        for name, handler in handlers.items():
            self.handlers[f"/{service}/{name}"] = handler


class _Details:
    """``grpc.HandlerCallDetails`` for the interceptors."""

    __slots__ = ("method", "invocation_metadata")

    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata: tuple[tuple[str, str], ...] = ()


class InProcessCalls:
    """A server's RPC handlers, each wrapped by the server's interceptors as gRPC wraps it."""

    def __init__(
        self,
        register: Callable[[Any], None],
        interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]],
    ) -> None:
        recorder = _HandlerRecorder()
        register(recorder)
        self._handlers = recorder.handlers
        self._interceptors = list(interceptors)
        self._wrapped: dict[str, Handler] = {}

    async def handler(self, method: str) -> Handler:
        """The wrapped handler of ``method`` (``/package.Service/Method``).

        Raises:
            KeyError: the server hosts no such method.
        """
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        inner = self._handlers[method]

        async def terminal(details: Any) -> Handler:
            return inner

        continuation: Callable[[Any], Awaitable[Handler]] = terminal
        for interceptor in reversed(self._interceptors):
            continuation = _continue_with(interceptor, continuation)
        # The interceptors wrap per method, not per call (their handlers read the caller from
        # the call's context), so the wrapped handler is kept.
        wrapped = await continuation(_Details(method))
        self._wrapped[method] = wrapped
        return wrapped

    def handler_in_place_of(self, method: str, behavior: Callable[..., Awaitable[Any]]) -> Handler:
        """A unary handler running ``behavior`` behind ``method``'s guards: the interceptors wrap
        it as they wrap ``method`` (its access rule and scope, the caller's rate limit, load
        shedding, internal errors), and inside it ``current_principal()`` is the caller. For an
        HTTP route that is an RPC in all but the shape of its body (Segment's calls are
        SendEvents): one policy, not a copy of it.

        Raises:
            KeyError: the server hosts no such method.
        """
        if method not in self._handlers:
            raise KeyError(method)
        handler: Handler = grpc.unary_unary_rpc_method_handler(behavior)
        for interceptor in reversed(self._interceptors):
            # Wrapped directly, not through intercept_service: that caches one handler per
            # method, and the gRPC server shares these interceptors.
            if not isinstance(interceptor, WrappingInterceptor):
                raise TypeError(f"{type(interceptor).__name__} cannot wrap a handler in place of another")
            handler = interceptor.wrap(method, handler)
        return handler


def _continue_with(
    interceptor: grpc.aio.ServerInterceptor[Any, Any], inner: Callable[[Any], Awaitable[Handler]]
) -> Callable[[Any], Awaitable[Handler]]:
    async def call(details: Any) -> Handler:
        return await interceptor.intercept_service(inner, details)

    return call


def status_response(
    status: status_pb2.Status, extra_headers: Mapping[str, str] | None = None
) -> web.Response:
    """``status`` as JSON under its HTTP status, with Retry-After when it says when to retry
    (and a Bearer challenge on a 401, unless ``extra_headers`` has one)."""
    headers = {"Cache-Control": "no-store", **(extra_headers or {})}
    retry_after = _retry_after_s(status)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if status.code == code_pb2.UNAUTHENTICATED:
        headers.setdefault("WWW-Authenticate", 'Bearer realm="sendtime"')
    body = json_format.MessageToDict(status)
    return web.Response(
        body=orjson.dumps(body), status=HTTP_STATUS.get(status.code, 500), content_type=_JSON, headers=headers
    )


def _retry_after_s(status: status_pb2.Status) -> int | None:
    """RetryInfo's delay in whole seconds (at least 1; Retry-After has no fractions)."""
    for info in details_of(status, error_details_pb2.RetryInfo):
        return max(1, math.ceil(info.retry_delay.ToTimedelta().total_seconds()))
    if status.code in (code_pb2.UNAVAILABLE, code_pb2.RESOURCE_EXHAUSTED):
        return 1
    return None


def etag_of(basis: bytes) -> str:
    """A strong ETag naming ``basis`` (a hash of it)."""
    digest = hashlib.sha256(basis).digest()[:12]
    return '"' + base64.urlsafe_b64encode(digest).decode().rstrip("=") + '"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 13.1.2: weak comparison; ``*`` matches any current representation."""
    if not if_none_match:
        return False
    candidates = [c.strip() for c in if_none_match.split(",")]
    return "*" in candidates or any(c.removeprefix("W/") == etag.removeprefix("W/") for c in candidates)


@dataclass(frozen=True, slots=True)
class _Plan:
    """What the gateway works out once per route."""

    route: HttpRoute
    message_class: type[Message]
    query: Mapping[str, QueryParameter]  # the route's query_index
    policy: CachePolicy | None
    memo: AnswerMemo | None
    encode: Callable[[Message], EncodedAnswer]  # the answer's body and ETag, under the policy


class HttpGateway:
    """Answers ``routes`` by calling ``calls`` in process."""

    def __init__(
        self,
        routes: Sequence[HttpRoute],
        calls: InProcessCalls,
        *,
        max_body_bytes: int,
        cache_policies: Mapping[str, CachePolicy] | None = None,
        answer_memos: Mapping[str, AnswerMemo] | None = None,
    ) -> None:
        """``cache_policies`` and ``answer_memos``: by method (``/package.Service/Method``)."""
        policies, memos = cache_policies or {}, answer_memos or {}
        self._plans = [
            _Plan(
                route,
                message_factory.GetMessageClass(route.method.input_type),
                query_index(route),
                policies.get(route.grpc_method),
                memos.get(route.grpc_method),
                _encoder(policies.get(route.grpc_method)),
            )
            for route in routes
        ]
        self._calls = calls
        self._max_body_bytes = max_body_bytes

    def add_to(self, app: web.Application) -> None:
        """Serve the routes from ``app`` (after the app's other routes: a catch-all)."""
        app.router.add_route("*", r"/{tail:[\s\S]*}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        request[ROUTE_KEY] = UNMATCHED_ROUTE
        raw_path = request.rel_url.raw_path
        allowed: list[str] = []
        for plan in self._plans:
            route = plan.route
            try:
                values = route.match(raw_path)
            except UnicodeDecodeError:
                return status_response(bad_request_status("the path is not valid UTF-8", []))
            if values is None:
                continue
            if route.http_method == request.method or (
                route.http_method == "GET" and request.method == "HEAD"
            ):
                request[ROUTE_KEY] = route.template
                return await self._answer(request, plan, values)
            allowed.append(route.http_method)
        if allowed:
            status = error_info_status(
                code_pb2.UNIMPLEMENTED,
                f"{request.method} is not allowed on {request.rel_url.path}; allowed: {', '.join(allowed)}",
                METHOD_NOT_ALLOWED,
                {"allowed": ",".join(allowed)},
            )
            response = status_response(status, {"Allow": ", ".join(sorted(set(allowed)))})
            response.set_status(405)
            return response
        return status_response(
            error_info_status(code_pb2.NOT_FOUND, f"no route {request.rel_url.path}", ROUTE_NOT_FOUND, {})
        )

    async def _answer(self, request: web.Request, plan: _Plan, values: dict[str, str]) -> web.StreamResponse:
        route = plan.route
        context = propagate.extract(request.headers)
        with tracer.start_as_current_span(
            f"{route.http_method} {route.template}",
            context=context,
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": request.method, "http.route": route.template},
        ) as span:
            try:
                response = await self._call(request, plan, values)
            except Exception as exc:  # noqa: BLE001 - a bug here: the caller gets an id, the log the rest
                error_id = new_error_id()
                log_unexpected(
                    log, "HTTP request failed", exc, {"error_id": error_id, "route": route.template}
                )
                response = status_response(internal_status(error_id))
            span.set_attribute("http.response.status_code", response.status)
            return response

    async def _call(self, request: web.Request, plan: _Plan, values: dict[str, str]) -> web.StreamResponse:
        route = plan.route
        message = await self._request_message(request, plan, values)
        if isinstance(message, web.Response):
            return message
        metadata = [("authorization", v) for v in request.headers.getall("Authorization", [])]
        call = HttpCallContext(metadata, request.remote or "")
        handler = await self._calls.handler(route.grpc_method)
        try:
            answer: Message = await handler.unary_unary(message, call)  # type: ignore[arg-type,misc]
        except HttpAbort as aborted:
            return status_response(aborted.status)
        return self._ok(request, plan, answer)

    async def _request_message(
        self, request: web.Request, plan: _Plan, values: dict[str, str]
    ) -> Message | web.Response:
        """The request message, or the answer refusing it."""
        route = plan.route
        violations: list[FieldViolation] = []
        query = request.rel_url.query
        if route.body != "*" and not query and all(value.isascii() for value in values.values()):
            # What ParseDict makes of the path's values alone: each is a string field (checked
            # when the route was read), and ASCII holds nothing ParseDict would refuse.
            return plan.message_class(**values)
        if route.body == "*":
            if request.rel_url.query:
                violations.extend(
                    FieldViolation(name, "this route takes its fields in the body")
                    for name in request.rel_url.query
                )
            try:
                fields = parse_json(await read_json_body(request, self._max_body_bytes), top_level="object")
            except JsonInputError as exc:
                return json_input_response(exc)
        else:
            fields, violations = query_to_json(route, query.items(), plan.query)
        if violations:
            return status_response(bad_request_status("invalid request parameters", violations))
        message: Message = plan.message_class()
        try:
            json_format.ParseDict(set_path_values(fields, values, route), message)
        except json_format.ParseError as exc:
            return status_response(
                bad_request_status("the request does not fit its message", [_violation(exc)])
            )
        return message

    def _ok(self, request: web.Request, plan: _Plan, answer: Message) -> web.StreamResponse:
        policy = plan.policy
        encoded = plan.encode(answer) if plan.memo is None else plan.memo.encoded(answer, plan.encode)
        body = encoded.body
        if policy is None or encoded.etag is None:
            return web.Response(body=body, content_type=_JSON, headers={"Cache-Control": "no-store"})
        headers = {
            "ETag": encoded.etag,
            "Cache-Control": f"private, max-age={max(0, policy.max_age_s(answer))}",
        }
        if request.method in ("GET", "HEAD") and etag_matches(
            request.headers.get("If-None-Match"), headers["ETag"]
        ):
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, content_type=_JSON, headers=headers)


def _encoder(policy: CachePolicy | None) -> Callable[[Message], EncodedAnswer]:
    """How an answer becomes its body (canonical JSON) and, under ``policy``, its ETag."""

    def encode(answer: Message) -> EncodedAnswer:
        try:
            as_json = json_format.MessageToDict(answer)
        except json_format.SerializeToJsonError:
            # A value JSON has no form for (a dead letter's event as sent, say): shown without it.
            as_json = json_format.MessageToDict(json_carriable(answer))
        body = orjson.dumps(as_json)
        if policy is None:
            return EncodedAnswer(body, None)
        return EncodedAnswer(body, ("W/" if policy.weak else "") + etag_of(policy.etag_basis(answer)))

    return encode


def _violation(error: json_format.ParseError) -> FieldViolation:
    """json_format names the field in its message (``Failed to parse readMask field: ...``)."""
    return FieldViolation("", str(error))


def json_input_response(error: JsonInputError) -> web.Response:
    """A body refused before it was parsed, as a Status under the refusal's HTTP status (413,
    415, 400); a 415 for a Content-Encoding says which ones work (RFC 9110 15.5.16)."""
    headers = {"Cache-Control": "no-store"}
    if error.reason == JsonReason.UNSUPPORTED_CONTENT_ENCODING:
        headers["Accept-Encoding"] = ", ".join(("identity", *SUPPORTED_ENCODINGS))
    return web.Response(
        body=orjson.dumps(json_format.MessageToDict(_json_input_status(error))),
        status=error.http_status,
        content_type=_JSON,
        headers=headers,
    )


def _json_input_status(error: JsonInputError) -> status_pb2.Status:
    """A body refused before it was parsed (media type, size, encoding, JSON) as a Status."""
    code = {413: code_pb2.RESOURCE_EXHAUSTED, 415: code_pb2.INVALID_ARGUMENT}.get(
        error.http_status, code_pb2.INVALID_ARGUMENT
    )
    status = error_info_status(code, error.message, str(error.reason), {})
    if error.path:
        status.details.append(bad_request_status("", [FieldViolation(error.path, error.message)]).details[0])
    return status
