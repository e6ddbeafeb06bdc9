"""What a caller sees of a bug: INTERNAL and an opaque error id, never the exception.

Without this, grpc.aio answers an exception a handler did not expect with UNKNOWN and the
details "Unexpected <class 'asyncpg.exceptions...'>: <the database's message>": the class names
our internals and the message may quote data. ``InternalErrors`` answers INTERNAL with an
``ErrorInfo`` (``INTERNAL_ERROR``) whose ``error_id`` is also in the log line that holds the
exception, so an operator can find one from the other.

A request that does not decode (a string that is not UTF-8, a truncated message) never reached
a handler: grpc.aio answered UNKNOWN, "Unexpected <class 'DecodeError'>". Here the request's
deserializer keeps the failure, and the call is answered INVALID_ARGUMENT with an ``ErrorInfo``
(``REQUEST_UNDECODABLE``, the message type) before any handler runs.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2

from sendtime_common.errors import abort_with, error_info_status, log_unexpected, new_error_id
from sendtime_common.handlers import Behavior, Handler, WrappingInterceptor, replace_behavior

log = logging.getLogger(__name__)

INTERNAL_ERROR = "INTERNAL_ERROR"
REQUEST_UNDECODABLE = "REQUEST_UNDECODABLE"


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


class InternalErrors(WrappingInterceptor):
    """Turns an exception a handler did not expect into INTERNAL with an error id (logged with
    the exception), and a request that does not decode into INVALID_ARGUMENT. Aborts
    (``context.abort``) and cancellations pass through."""

    def __init__(self) -> None:
        super().__init__()
        # By method: its deserializer, the tolerant one in its place, the refusal of a request
        # that does not decode. A wrapper outside the tracing interceptor wraps every call anew
        # (tracing hands over a new handler each call); these are made once.
        self._prepared: dict[
            str, tuple[Callable[[bytes], Any], Callable[[bytes], Any], status_pb2.Status]
        ] = {}

    def wrap(self, method: str, handler: Handler) -> Handler:
        deserializer = handler.request_deserializer
        if deserializer is None:  # raw bytes: nothing to decode
            return replace_behavior(handler, lambda behavior: _contained(method, None, behavior))
        prepared = self._prepared.get(method)
        if prepared is None or prepared[0] is not deserializer:
            refusal = undecodable_status(_type_name(deserializer, method))
            prepared = self._prepared[method] = (deserializer, _tolerant(deserializer), refusal)
        tolerant: Handler = handler._replace(request_deserializer=prepared[1])  # type: ignore[attr-defined]
        return replace_behavior(tolerant, lambda behavior: _contained(method, prepared[2], behavior))


class _Undecodable:
    """What a request that failed to decode is handed on as (so that it can be answered)."""

    __slots__ = ()


_UNDECODABLE = _Undecodable()


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return _UNDECODABLE

    return deserialize


def _type_name(deserializer: Callable[[bytes], Any], method: str) -> str:
    """The message type a ``FromString`` deserializer makes (the method, for another kind)."""
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", method))


def undecodable_status(type_name: str) -> status_pb2.Status:
    """INVALID_ARGUMENT for a request that is not a ``type_name`` message."""
    return error_info_status(
        code_pb2.INVALID_ARGUMENT,
        f"the request is not a valid {type_name} message (is every string valid UTF-8?)",
        REQUEST_UNDECODABLE,
        {"type": type_name},
    )


def _contained(method: str, refusal: status_pb2.Status | None, behavior: Behavior) -> Behavior:
    """``behavior``, answering a bug INTERNAL and, when ``refusal`` is given (the request type's
    ``undecodable_status``), a request that did not decode with it (a stream at its first such
    message)."""

    async def checked(
        requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async for request in requests:
            if request is _UNDECODABLE:
                await abort_with(context, refusal)  # type: ignore[arg-type]  # set with a type
            yield request

    async def decoded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        """The request, or its checked stream; or the call ends here."""
        if refusal is None:
            return request
        if request is _UNDECODABLE:
            await abort_with(context, refusal)
        return checked(request, context) if hasattr(request, "__aiter__") else request

    if inspect.isasyncgenfunction(behavior):

        async def contained_stream(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            request = await decoded(request, context)
            try:
                async for response in behavior(request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug: the caller gets an id, the log the rest
                await _answer_internal(method, exc, context)

        return contained_stream

    async def contained(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        request = await decoded(request, context)
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug: the caller gets an id, the log the rest
            await _answer_internal(method, exc, context)

    return contained
