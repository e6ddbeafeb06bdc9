"""Rich gRPC errors (AIP-193): a ``google.rpc.Status`` with typed details, sent both as the
call's status and in the ``grpc-status-details-bin`` trailer that clients and grpcurl decode."""

from __future__ import annotations

import logging
import traceback
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "sendtime.dev"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One reason a request field is invalid; ``field`` is a path such as ``events[2].customer``."""

    field: str
    description: str


def pack_detail(detail: Message) -> any_pb2.Any:
    """``detail`` as a ``google.protobuf.Any`` for a status's details."""
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


def bad_request_status(message: str, violations: Iterable[FieldViolation]) -> status_pb2.Status:
    """INVALID_ARGUMENT carrying a ``google.rpc.BadRequest`` with one entry per violation."""
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in violations
        ]
    )
    return status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT, message=message, details=[pack_detail(bad_request)]
    )


def retry_status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    retry_after_s: float,
    metadata: Mapping[str, str] | None = None,
) -> status_pb2.Status:
    """A retryable failure (UNAVAILABLE, RESOURCE_EXHAUSTED) with ``ErrorInfo`` (``reason``,
    ``metadata``) and ``RetryInfo``."""
    seconds = int(retry_after_s)
    delay = duration_pb2.Duration(seconds=seconds, nanos=int((retry_after_s - seconds) * 1e9))
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)
    return status_pb2.Status(
        code=code.value[0],
        message=message,
        details=[
            pack_detail(info),
            pack_detail(error_details_pb2.RetryInfo(retry_delay=delay)),
        ],
    )


def not_found_status(message: str, reason: str, metadata: dict[str, str]) -> status_pb2.Status:
    """NOT_FOUND with an ``ErrorInfo`` naming what was looked for."""
    return error_info_status(code_pb2.NOT_FOUND, message, reason, metadata)


def error_info_status(code: int, message: str, reason: str, metadata: dict[str, str]) -> status_pb2.Status:
    """A status of ``code`` (a ``google.rpc.Code``) with an ``ErrorInfo`` giving ``reason``."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)
    return status_pb2.Status(code=code, message=message, details=[pack_detail(info)])


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], status: status_pb2.Status) -> NoReturn:
    """End the call with ``status``, its details in the standard trailer. Never returns."""
    grpc_status = rpc_status.to_status(status)
    await context.abort(
        grpc_status.code, grpc_status.details, trailing_metadata=grpc_status.trailing_metadata
    )
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


async def abort_invalid(
    context: grpc.aio.ServicerContext[Any, Any], message: str, violations: Iterable[FieldViolation]
) -> NoReturn:
    """End the call with INVALID_ARGUMENT and field violations."""
    await abort_with(context, bad_request_status(message, violations))


def field_violations(status: status_pb2.Status) -> list[FieldViolation]:
    """The field violations inside a status (for clients and tests)."""
    found: list[FieldViolation] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):  # type: ignore[arg-type]
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            found.extend(FieldViolation(v.field, v.description) for v in bad_request.field_violations)
    return found


DetailT = TypeVar("DetailT", bound=Message)


def details_of(status: status_pb2.Status, kind: type[DetailT]) -> list[DetailT]:
    """The details of type ``kind`` (``ErrorInfo``, ``RetryInfo``...) in ``status``, unpacked
    (for clients and tests)."""
    found: list[DetailT] = []
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):  # type: ignore[arg-type]
            unpacked = kind()
            detail.Unpack(unpacked)
            found.append(unpacked)
    return found


def status_of(error: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    """The rich ``google.rpc.Status`` a failed call carried, if any (clients and tests)."""
    # AioRpcError has the code/details/trailing_metadata that from_call reads; the stubs only
    # know the synchronous grpc.Call.
    status: status_pb2.Status | None = rpc_status.from_call(error)  # type: ignore[arg-type]
    return status


def new_error_id() -> str:
    """An opaque id for an unexpected error: logged with the exception, and the only thing the
    caller is shown of it (never an exception's class or message), so support can find it."""
    return uuid.uuid4().hex


def log_unexpected(logger: logging.Logger, message: str, error: BaseException, extra: dict[str, Any]) -> None:
    """An error line for a bug: the exception's class and traceback, not its message, which may
    quote data (a database's message quotes the values it refused); ``extra`` holds the error id."""
    logger.error(
        message,
        extra={
            **extra,
            "exception": f"{type(error).__module__}.{type(error).__qualname__}",
            "traceback": "".join(traceback.format_tb(error.__traceback__)),
        },
    )
