"""How the triggers servicers answer what the stores raise (AIP-193): NOT_FOUND, ALREADY_EXISTS
and ABORTED (a stale etag) with an ``ErrorInfo`` naming the resource, UNAVAILABLE with a
``RetryInfo`` when PostgreSQL fails; and the hooks the engine gives the servicers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import grpc
from google.rpc import code_pb2

from sendtime_common.errors import abort_with, error_info_status, not_found_status, retry_status
from triggers.store import AlreadyExists, EtagMismatch, NotFound, StoreError

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1.0

ChangeHook = Callable[[str], Awaitable[None]]
"""Told the name of a trigger or destination after a change to it was stored (the engine
reloads it; a deleted one is gone when it reads it)."""


@asynccontextmanager
async def answering(context: grpc.aio.ServicerContext[Any, Any], kind: str, name: str) -> AsyncIterator[None]:
    """End the call with the status for a store's refusal of ``name``, a resource of ``kind``
    (``TRIGGER``, ``DESTINATION``, ``DELIVERY``: the ErrorInfo reasons' prefix)."""
    try:
        yield
    except NotFound as exc:
        await abort_with(context, not_found_status(str(exc), f"{kind}_NOT_FOUND", {"name": name}))
    except AlreadyExists as exc:
        await abort_with(
            context,
            error_info_status(code_pb2.ALREADY_EXISTS, str(exc), f"{kind}_ALREADY_EXISTS", {"name": name}),
        )
    except EtagMismatch:
        await abort_etag_mismatch(context, name)
    except StoreError as exc:
        await abort_store_unavailable(context, exc)


async def abort_etag_mismatch(context: grpc.aio.ServicerContext[Any, Any], name: str) -> NoReturn:
    await abort_with(
        context,
        error_info_status(
            code_pb2.ABORTED,
            f"{name} changed since it was read: read it again and send its new etag",
            "ETAG_MISMATCH",
            {"name": name},
        ),
    )


async def abort_store_unavailable(
    context: grpc.aio.ServicerContext[Any, Any], exc: BaseException
) -> NoReturn:
    log.warning("triggers store unavailable", extra={"error": type(exc).__name__})
    await abort_with(
        context,
        retry_status(
            grpc.StatusCode.UNAVAILABLE,
            "the triggers database is unavailable",
            "DATABASE_UNAVAILABLE",
            RETRY_AFTER_S,
        ),
    )


async def tell(hook: ChangeHook | None, name: str) -> None:
    """Tell ``hook`` of a stored change. The change is committed either way, so a failing hook
    is logged, not answered (the caller would retry a change that was made)."""
    if hook is None:
        return
    try:
        await hook(name)
    except Exception as exc:  # noqa: BLE001 - the change is stored; the call succeeded
        log.warning("engine not told of a change", extra={"name": name, "error": type(exc).__name__})
