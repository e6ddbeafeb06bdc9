"""How much one server takes on at once, and how large a message may be.

``LoadShedder`` bounds the calls a server works on at once (from pick-up to answer): past the
bound it answers at once with RESOURCE_EXHAUSTED and a ``RetryInfo`` saying when to try again,
instead of letting calls pile up behind a slow dependency. Unary calls and streams have
separate bounds, so that long-lived streams (StreamEvents, RenderBatch) cannot take every slot
from the short calls of a send-time fetch. Health checks are never shed: a probe that fails
under load would restart a replica that is working.

What it cannot see: grpc.aio picks up one new call per turn of the event loop, so a burst that
arrives faster waits in gRPC core first. That queue is bounded by ``max_queued_calls``
(``GrpcServer`` sets core's soft and hard bounds to it; past it core cancels calls). With
gRPC's defaults, 2,116 of 20,000 concurrent GetProfile calls came back CANCELLED; with the
bound at 30,000, none (docs/limits.md, "Overload and message sizes").

Message sizes are set explicitly on every server and channel (``message_size_options``), from
each contract's documented maxima, instead of gRPC's defaults (4 MiB to receive, no bound to
send).
"""

from __future__ import annotations

import inspect
import logging
import random
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from sendtime_common.config import ConfigError, env_float, env_int
from sendtime_common.errors import ERROR_DOMAIN, abort_with, pack_detail
from sendtime_common.handlers import Behavior, Handler, WrappingInterceptor, replace_behavior

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# The largest response a Sendtime server sends: a BatchGetProfiles of 1,000 profiles, up to
# 64 KiB each on average. Channels take responses this large.
PROFILE_RESPONSE_BYTES = 64 * MIB
# The largest request a Sendtime client sends: a RenderBatch of 100,000 customers.
LARGEST_REQUEST_BYTES = 32 * MIB
HEALTH_PREFIX = "/grpc.health.v1.Health/"
OVERLOADED = "OVERLOADED"


@dataclass(frozen=True, slots=True)
class CallLimits:
    """A server's bounds. The defaults suit a replica with one core; each service sets its own
    message sizes from its contracts."""

    # Unary calls worked on at once. At ~5,000 GetProfile calls/s a replica drains 1,000 in
    # about 0.2 s, a tenth of an email platform's 2 s budget.
    max_concurrent_calls: int = 1000
    # Streaming calls open at once (each holds a slot for its whole life).
    max_concurrent_streams: int = 200
    # Calls gRPC core holds before Python picks them up (see GrpcServer): a burst waits there,
    # about 14 KB a call; past it core cancels calls.
    max_queued_calls: int = 30_000
    # The RetryInfo delay of a shed call; each answer adds up to as much again at random, so
    # that shed callers do not all come back at the same moment.
    retry_after_s: float = 0.2
    max_receive_bytes: int = 4 * MIB
    max_send_bytes: int = 4 * MIB

    @classmethod
    def from_env(cls, env: Mapping[str, str], defaults: CallLimits | None = None) -> CallLimits:
        """``GRPC_MAX_CONCURRENT_CALLS``, ``GRPC_MAX_CONCURRENT_STREAMS``,
        ``GRPC_MAX_QUEUED_CALLS``, ``GRPC_SHED_RETRY_AFTER_MS``, ``GRPC_MAX_RECEIVE_BYTES``,
        ``GRPC_MAX_SEND_BYTES``; unset ones keep ``defaults`` (the service's own).

        Raises:
            ConfigError: a value is not a number or is below its minimum.
        """
        base = defaults or cls()
        return cls(
            max_concurrent_calls=env_int(
                env, "GRPC_MAX_CONCURRENT_CALLS", base.max_concurrent_calls, minimum=1
            ),
            max_concurrent_streams=env_int(
                env, "GRPC_MAX_CONCURRENT_STREAMS", base.max_concurrent_streams, minimum=1
            ),
            max_queued_calls=env_int(env, "GRPC_MAX_QUEUED_CALLS", base.max_queued_calls, minimum=100),
            retry_after_s=env_float(env, "GRPC_SHED_RETRY_AFTER_MS", base.retry_after_s * 1000, minimum=1)
            / 1000,
            max_receive_bytes=env_int(
                env, "GRPC_MAX_RECEIVE_BYTES", base.max_receive_bytes, minimum=64 * 1024
            ),
            max_send_bytes=env_int(env, "GRPC_MAX_SEND_BYTES", base.max_send_bytes, minimum=64 * 1024),
        )

    def require_receive(self, needed: int, what: str) -> None:
        """Check that a request of ``needed`` bytes (a contract's largest valid one) fits.

        Raises:
            ConfigError: it does not.
        """
        _require_fit(needed, self.max_receive_bytes, "GRPC_MAX_RECEIVE_BYTES", what)

    def require_send(self, needed: int, what: str) -> None:
        """Check that a response of ``needed`` bytes fits.

        Raises:
            ConfigError: it does not.
        """
        _require_fit(needed, self.max_send_bytes, "GRPC_MAX_SEND_BYTES", what)


def _require_fit(needed: int, limit: int, setting: str, what: str) -> None:
    if needed > limit:
        raise ConfigError(f"{setting}={limit} is below the {needed} bytes that {what} may take")


def message_size_options(
    max_receive_bytes: int = PROFILE_RESPONSE_BYTES, max_send_bytes: int = LARGEST_REQUEST_BYTES
) -> list[tuple[str, int]]:
    """The channel arguments of a server or channel that takes messages up to
    ``max_receive_bytes`` and sends up to ``max_send_bytes`` (by default, a channel's: any
    Sendtime response, any Sendtime request)."""
    return [
        ("grpc.max_receive_message_length", max_receive_bytes),
        ("grpc.max_send_message_length", max_send_bytes),
    ]


def overload_status(limit: int, setting: str, retry_after_s: float) -> status_pb2.Status:
    """RESOURCE_EXHAUSTED with an ``ErrorInfo`` (``OVERLOADED``, the bound and its setting) and a
    ``RetryInfo``."""
    seconds = int(retry_after_s)
    delay = duration_pb2.Duration(seconds=seconds, nanos=int((retry_after_s - seconds) * 1e9))
    info = error_details_pb2.ErrorInfo(
        reason=OVERLOADED, domain=ERROR_DOMAIN, metadata={"limit": str(limit), "setting": setting}
    )
    return status_pb2.Status(
        code=code_pb2.RESOURCE_EXHAUSTED,
        message=f"the server is working on {limit} calls of this kind already; retry after RetryInfo's delay",
        details=[pack_detail(info), pack_detail(error_details_pb2.RetryInfo(retry_delay=delay))],
    )


class _Slots:
    """A count of calls in progress against a bound (one event loop: no lock needed)."""

    __slots__ = ("limit", "setting", "in_use", "shed")

    def __init__(self, limit: int, setting: str) -> None:
        self.limit = limit
        self.setting = setting
        self.in_use = 0
        self.shed = 0


class LoadShedder(WrappingInterceptor):
    """The outermost interceptor of a server: admits a call while fewer than the bound of its
    kind are in progress, and answers the others at once with RESOURCE_EXHAUSTED and RetryInfo.
    Health checks pass untouched."""

    def __init__(self, limits: CallLimits) -> None:
        super().__init__()
        self._limits = limits
        self.calls = _Slots(limits.max_concurrent_calls, "GRPC_MAX_CONCURRENT_CALLS")
        self.streams = _Slots(limits.max_concurrent_streams, "GRPC_MAX_CONCURRENT_STREAMS")

    @property
    def shed_total(self) -> int:
        """Calls answered RESOURCE_EXHAUSTED since start."""
        return self.calls.shed + self.streams.shed

    def wrap(self, method: str, handler: Handler) -> Handler:
        if method.startswith(HEALTH_PREFIX):
            return handler
        streaming = handler.request_streaming or handler.response_streaming
        slots = self.streams if streaming else self.calls
        return replace_behavior(handler, lambda behavior: _limited(behavior, slots, self._retry_after_s))

    def _retry_after_s(self) -> float:
        return self._limits.retry_after_s * (1 + random.random())


def _admit(slots: _Slots, retry_after_s: Callable[[], float]) -> status_pb2.Status | None:
    """Take a slot; or, when none is free, the status to answer with."""
    if slots.in_use >= slots.limit:
        slots.shed += 1
        if slots.shed == 1 or slots.shed % 1000 == 0:  # a burst is one log line, not thousands
            log.warning(
                "shedding load", extra={"limit": slots.limit, "setting": slots.setting, "shed": slots.shed}
            )
        return overload_status(slots.limit, slots.setting, retry_after_s())
    slots.in_use += 1
    return None


def _limited(behavior: Behavior, slots: _Slots, retry_after_s: Callable[[], float]) -> Behavior:
    if inspect.isasyncgenfunction(behavior):

        async def limited_stream(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            refusal = _admit(slots, retry_after_s)
            if refusal is not None:
                await abort_with(context, refusal)
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                slots.in_use -= 1

        return limited_stream

    async def limited(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        refusal = _admit(slots, retry_after_s)
        if refusal is not None:
            await abort_with(context, refusal)
        try:
            return await behavior(request, context)
        finally:
            slots.in_use -= 1

    return limited
