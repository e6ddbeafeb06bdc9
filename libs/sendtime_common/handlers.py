"""Wrapping a gRPC method handler's behavior, for the server interceptors (access, load
shedding, internal errors): a handler is a named tuple with one behavior set, of four kinds.
``WrappingInterceptor`` wraps each method's handler once and reuses it for every call."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

Behavior = Callable[..., Any]

if TYPE_CHECKING:  # generic only in the type stubs
    Handler = grpc.RpcMethodHandler[Any, Any]
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    _ServerInterceptor = grpc.aio.ServerInterceptor

_BEHAVIOR_FIELDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def replace_behavior(
    handler: grpc.RpcMethodHandler[Any, Any], wrap: Callable[[Behavior], Behavior]
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler with its behavior wrapped by ``wrap``."""
    for field in _BEHAVIOR_FIELDS:
        behavior = getattr(handler, field)
        if behavior is not None:
            replaced: grpc.RpcMethodHandler[Any, Any] = handler._replace(**{field: wrap(behavior)})  # type: ignore[attr-defined]
            return replaced
    return handler


class WrappingInterceptor(_ServerInterceptor):
    """A server interceptor that puts ``wrap(method, handler)`` in place of each method's
    handler. The wrapped handler is made on a method's first call and reused for as long as
    the same handler is handed over: gRPC's own, every call; but an interceptor further in that
    wraps each call (OpenTelemetry's does) hands over a new one each call, so ``wrap`` must be
    cheap, with what it can prepare per method kept."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    def wrap(self, method: str, handler: Handler) -> Handler:
        """The handler to use for ``method`` (a path, ``/package.Service/Method``)."""
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler: Handler | None = await continuation(details)
        if handler is None:
            return handler  # type: ignore[return-value]  # an unknown method: UNIMPLEMENTED
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


class ComposedInterceptor(WrappingInterceptor):
    """Several wrapping interceptors as one, the first outermost: each call then passes one
    interceptor layer of grpc.aio instead of one per wrapper (a layer costs a coroutine and
    its continuation on every call)."""

    def __init__(self, parts: list[WrappingInterceptor]) -> None:
        super().__init__()
        self._parts = parts

    def wrap(self, method: str, handler: Handler) -> Handler:
        for part in reversed(self._parts):
            handler = part.wrap(method, handler)
        return handler
