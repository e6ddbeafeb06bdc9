"""What a caller sees of a bug: INTERNAL and an opaque error id, never the exception.

Without this, grpc.aio answers an exception a handler did not expect with UNKNOWN and the
details "Unexpected <class 'asyncpg.exceptions...'>: <the database's message>": the class names
our internals and the message may quote data. ``InternalErrors`` answers INTERNAL with an
``ErrorInfo`` (``INTERNAL_ERROR``) whose ``error_id`` is also in the log line that holds the
exception, so an operator can find one from the other.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.rpc import code_pb2, status_pb2

from sendtime_common.errors import abort_with, error_info_status, log_unexpected, new_error_id
from sendtime_common.handlers import Behavior, replace_behavior

log = logging.getLogger(__name__)

INTERNAL_ERROR = "INTERNAL_ERROR"


if TYPE_CHECKING:  # generic only in the type stubs
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor


def internal_status(error_id: str) -> status_pb2.Status:
    """INTERNAL, naming nothing but ``error_id``."""
    return error_info_status(
        code_pb2.INTERNAL,
        f"internal error {error_id}; quote this id when reporting it",
        INTERNAL_ERROR,
        {"error_id": error_id},
    )


async def _answer_internal(
    method: str, error: Exception, context: grpc.aio.ServicerContext[Any, Any]
) -> None:
    error_id = new_error_id()
    log_unexpected(log, "unexpected error in a handler", error, {"method": method, "error_id": error_id})
    await abort_with(context, internal_status(error_id))


class InternalErrors(_ServerInterceptor):
    """Turns an exception a handler did not expect into INTERNAL with an error id (logged with
    the exception). Aborts (``context.abort``) and cancellations pass through."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler: grpc.RpcMethodHandler[Any, Any] | None = await continuation(details)
        if handler is None:
            return handler  # type: ignore[return-value]  # an unknown method: UNIMPLEMENTED
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = replace_behavior(handler, lambda behavior: _contained(method, behavior))
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _contained(method: str, behavior: Behavior) -> Behavior:
    if inspect.isasyncgenfunction(behavior):

        async def contained_stream(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            try:
                async for response in behavior(request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug: the caller gets an id, the log the rest
                await _answer_internal(method, exc, context)

        return contained_stream

    async def contained(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug: the caller gets an id, the log the rest
            await _answer_internal(method, exc, context)

    return contained
