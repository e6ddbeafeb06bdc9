"""Wrapping a gRPC method handler's behavior, for the server interceptors (access, load
shedding, internal errors): a handler is a named tuple with one behavior set, of four kinds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

Behavior = Callable[..., Any]

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
