"""gRPC handlers of DestinationService: check the request (triggers.destination_validation, the
URL against the SSRF policy), hand it to the store, encode; tell the engine what changed. A
webhook's signing secret is made here and shown once, in the answer that made it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import grpc
from aiohttp.abc import AbstractResolver
from google.rpc import code_pb2

from sendtime.triggers.v1 import triggers_pb2, triggers_pb2_grpc
from sendtime_common.errors import FieldViolation, abort_invalid, abort_with, error_info_status
from sendtime_common.paging import InvalidPageToken, page_size
from triggers.answers import ChangeHook, abort_etag_mismatch, answering, tell
from triggers.destination_store import DestinationStore, InvalidName, destination_name, parse_destination_name
from triggers.destination_validation import (
    apply_update,
    check_destination,
    check_destination_id,
    check_state,
    check_update_mask,
    previous_secret_ttl,
)
from triggers.signing import SigningKeys, new_signing_secret
from triggers.ssrf import UrlPolicy
from triggers.store import EtagMismatch

DESTINATION = "DESTINATION"
UPDATE_TRIES = 3


class DestinationServicer(triggers_pb2_grpc.DestinationServiceServicer):
    def __init__(
        self,
        destinations: DestinationStore,
        url_policy: UrlPolicy,
        resolver: AbstractResolver,
        *,
        on_destinations_changed: ChangeHook | None = None,
    ) -> None:
        self._destinations = destinations
        self._url_policy = url_policy
        self._resolver = resolver
        self._changed = on_destinations_changed

    async def CreateDestination(
        self, request: triggers_pb2.CreateDestinationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triggers_pb2.CreateDestinationResponse:
        violations = check_destination_id(request.destination_id)
        if not request.HasField("destination"):
            violations.append(FieldViolation("destination", "required"))
        else:
            violations.extend(await self._check(request.destination, "destination"))
        if violations:
            await abort_invalid(context, "invalid CreateDestination request", violations)
        name = destination_name(request.destination_id)
        secret = new_signing_secret() if request.destination.HasField("webhook") else ""
        async with answering(context, DESTINATION, name):
            stored = await self._destinations.create(
                request.destination_id,
                request.destination,
                signing_keys=SigningKeys(secret) if secret else None,
            )
        await tell(self._changed, name)
        return triggers_pb2.CreateDestinationResponse(destination=stored, signing_secret=secret)

    async def GetDestination(
        self, request: triggers_pb2.GetDestinationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triggers_pb2.GetDestinationResponse:
        destination_id = await destination_id_of(context, request.name, "name", "GetDestination")
        async with answering(context, DESTINATION, request.name):
            stored = await self._destinations.get(destination_id)
        return triggers_pb2.GetDestinationResponse(destination=stored)

    async def ListDestinations(
        self, request: triggers_pb2.ListDestinationsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triggers_pb2.ListDestinationsResponse:
        if request.page_size < 0:
            await abort_invalid(
                context,
                "invalid ListDestinations request",
                [FieldViolation("page_size", "must not be negative")],
            )
        async with answering(context, DESTINATION, "destinations"):
            try:
                page, token = await self._destinations.list(
                    page_size=page_size(request.page_size), page_token=request.page_token
                )
            except InvalidPageToken as exc:
                await abort_invalid(context, "invalid page token", [FieldViolation("page_token", str(exc))])
        return triggers_pb2.ListDestinationsResponse(destinations=page, next_page_token=token)

    async def UpdateDestination(
        self, request: triggers_pb2.UpdateDestinationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triggers_pb2.UpdateDestinationResponse:
        destination_id = await destination_id_of(context, request.name, "name", "UpdateDestination")
        async with answering(context, DESTINATION, request.name):
            for attempt in range(1, UPDATE_TRIES + 1):
                stored = await self._destinations.get(destination_id)
                if request.etag and request.etag != stored.etag:
                    await abort_etag_mismatch(context, request.name)
                kind = stored.WhichOneof("kind") or ""
                violations = check_update_mask(request.update_mask, kind)
                if not violations:
                    updated = apply_update(stored, request)
                    violations = [
                        *check_state(updated, list(request.update_mask.paths), "destination"),
                        *await self._check(updated, "destination"),
                    ]
                if violations:
                    await abort_invalid(context, "invalid UpdateDestination request", violations)
                try:
                    saved = await self._destinations.update(
                        destination_id, updated, etag=request.etag or stored.etag
                    )
                    break
                except EtagMismatch:
                    if request.etag or attempt == UPDATE_TRIES:
                        raise
        await tell(self._changed, request.name)
        return triggers_pb2.UpdateDestinationResponse(destination=saved)

    async def RotateDestinationSecret(
        self,
        request: triggers_pb2.RotateDestinationSecretRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> triggers_pb2.RotateDestinationSecretResponse:
        destination_id = await destination_id_of(context, request.name, "name", "RotateDestinationSecret")
        ttl = previous_secret_ttl(
            request.previous_secret_ttl if request.HasField("previous_secret_ttl") else None
        )
        if isinstance(ttl, FieldViolation):
            await abort_invalid(context, "invalid RotateDestinationSecret request", [ttl])
        secret = new_signing_secret()
        async with answering(context, DESTINATION, request.name):
            stored = await self._destinations.get(destination_id)
            if not stored.HasField("webhook"):
                await abort_with(
                    context,
                    error_info_status(
                        code_pb2.FAILED_PRECONDITION,
                        f"{request.name} is a subscription: it has no signing secret",
                        "DESTINATION_NOT_A_WEBHOOK",
                        {"name": request.name},
                    ),
                )
            rotated = await self._destinations.rotate_secret(destination_id, secret, ttl, datetime.now(UTC))
        await tell(self._changed, request.name)
        return triggers_pb2.RotateDestinationSecretResponse(destination=rotated, signing_secret=secret)

    async def DeleteDestination(
        self, request: triggers_pb2.DeleteDestinationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triggers_pb2.DeleteDestinationResponse:
        destination_id = await destination_id_of(context, request.name, "name", "DeleteDestination")
        async with answering(context, DESTINATION, request.name):
            discarded = await self._destinations.delete(destination_id)
        await tell(self._changed, request.name)
        return triggers_pb2.DeleteDestinationResponse(deliveries_discarded=discarded)

    async def _check(self, destination: triggers_pb2.Destination, field: str) -> list[FieldViolation]:
        """The destination's violations; a webhook's URL resolved and checked against the SSRF
        policy only when the rest holds (no DNS lookup for a request refused anyway)."""
        violations = check_destination(destination, field)
        if not violations and destination.HasField("webhook"):
            violations = await self._url_policy.destination_url_violations(
                destination.webhook.url, self._resolver, f"{field}.webhook.url"
            )
        return violations


async def destination_id_of(
    context: grpc.aio.ServicerContext[Any, Any], name: str, field: str, method: str
) -> str:
    """The id in a ``destinations/{id}`` request field, or the call ends with a field violation."""
    if not name:
        await abort_invalid(context, f"invalid {method} request", [FieldViolation(field, "required")])
    try:
        return parse_destination_name(name)
    except InvalidName as exc:
        await abort_invalid(context, f"invalid {method} request", [FieldViolation(field, str(exc))])
