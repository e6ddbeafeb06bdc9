"""The calling side: channels that carry an API key (``authorization: Bearer <key>``) on every
call, for render's calls to profile, the command line, the demo and the tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc

from sendtime_common.tls import ClientTls, channel

AUTHORIZATION = "authorization"


def bearer_metadata(key: str) -> tuple[tuple[str, str]]:
    """The call metadata that presents ``key``."""
    return ((AUTHORIZATION, f"Bearer {key}"),)


if TYPE_CHECKING:  # generic only in the type stubs
    _UnaryUnary = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStream = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
    _StreamUnary = grpc.aio.StreamUnaryClientInterceptor[Any, Any]
    _StreamStream = grpc.aio.StreamStreamClientInterceptor[Any, Any]
else:
    _UnaryUnary = grpc.aio.UnaryUnaryClientInterceptor
    _UnaryStream = grpc.aio.UnaryStreamClientInterceptor
    _StreamUnary = grpc.aio.StreamUnaryClientInterceptor
    _StreamStream = grpc.aio.StreamStreamClientInterceptor


class _WithKey:
    def __init__(self, key: str) -> None:
        self._header = bearer_metadata(key)[0]

    def _with_key(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(*self._header)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# The continuations are coroutines returning the call (the stubs say otherwise).
class _BearerUnaryUnary(_WithKey, _UnaryUnary):
    async def intercept_unary_unary(
        self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._with_key(details), request)


class _BearerUnaryStream(_WithKey, _UnaryStream):
    async def intercept_unary_stream(
        self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._with_key(details), request)


class _BearerStreamUnary(_WithKey, _StreamUnary):
    async def intercept_stream_unary(
        self, continuation: Any, details: grpc.aio.ClientCallDetails, request_iterator: Any
    ) -> Any:
        return await continuation(self._with_key(details), request_iterator)


class _BearerStreamStream(_WithKey, _StreamStream):
    async def intercept_stream_stream(
        self, continuation: Any, details: grpc.aio.ClientCallDetails, request_iterator: Any
    ) -> Any:
        return await continuation(self._with_key(details), request_iterator)


def bearer_auth(key: str) -> list[Any]:
    """Client interceptors that add ``key`` to every call of a grpc.aio channel, one per kind
    of call (a channel files each interceptor under one kind only). Call credentials would do
    the same on a TLS channel only; these work on both."""
    return [
        kind(key) for kind in (_BearerUnaryUnary, _BearerUnaryStream, _BearerStreamUnary, _BearerStreamStream)
    ]


def authenticated_channel(
    target: str,
    key: str,
    tls: ClientTls,
    *,
    interceptors: Sequence[Any] = (),
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """A channel to ``target`` (TLS or plaintext as ``tls`` says) whose calls carry ``key``.

    Raises:
        UnusableCertificate: the client's certificate files are not usable.
    """
    return channel(target, tls, interceptors=[*interceptors, *bearer_auth(key)], options=list(options))
