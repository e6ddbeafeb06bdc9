"""gRPC handlers of TriggerService: check the request (triggers.trigger_validation), hand it to
the store, encode; tell the engine what changed."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import grpc

from sendtime.triggers.v1 import triggers_pb2, triggers_pb2_grpc
from sendtime_common.errors import FieldViolation, abort_invalid
from sendtime_common.paging import InvalidPageToken, page_size
from triggers.answers import ChangeHook, abort_etag_mismatch, answering, tell
from triggers.destination_store import DestinationStore, parse_destination_name
from triggers.store import EtagMismatch, NotFound
from triggers.trigger_store import TriggerStore
from triggers.trigger_validation import (
    InvalidName,
    InvalidTrigger,
    parse_trigger_name,
    trigger_name,
    validate_create_trigger,
    validate_update_trigger,
)

TRIGGER = "TRIGGER"
# An update without an etag reads, merges and writes again when another change landed in
# between; past this many tries the caller is told to retry.
UPDATE_TRIES = 3


class TriggerServicer(triggers_pb2_grpc.TriggerServiceServicer):
    def __init__(
        self,
        triggers: TriggerStore,
        destinations: DestinationStore,
        *,
        on_triggers_changed: ChangeHook | None = None,
    ) -> None:
        self._triggers = triggers
        self._destinations = destinations
        self._changed = on_triggers_changed

    async def CreateTrigger(
        self, request: triggers_pb2.CreateTriggerRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triggers_pb2.CreateTriggerResponse:
        try:
            validate_create_trigger(request)
        except InvalidTrigger as exc:
            await abort_invalid(context, "invalid CreateTrigger request", exc.violations)
        name = trigger_name(request.trigger_id)
        async with answering(context, TRIGGER, name):
            await self._check_destinations(context, request.trigger.delivery.destinations)
            stored = await self._triggers.create(request.trigger_id, request.trigger, paused=request.paused)
        await tell(self._changed, name)
        return triggers_pb2.CreateTriggerResponse(trigger=stored)

    async def GetTrigger(
        self, request: triggers_pb2.GetTriggerRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triggers_pb2.GetTriggerResponse:
        trigger_id = await _trigger_id(context, request.name, "GetTrigger")
        async with answering(context, TRIGGER, request.name):
            stored = await self._triggers.get(trigger_id)
        return triggers_pb2.GetTriggerResponse(trigger=stored)

    async def ListTriggers(
        self, request: triggers_pb2.ListTriggersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triggers_pb2.ListTriggersResponse:
        if request.page_size < 0:
            await abort_invalid(
                context, "invalid ListTriggers request", [FieldViolation("page_size", "must not be negative")]
            )
        async with answering(context, TRIGGER, "triggers"):
            try:
                page, token = await self._triggers.list(
                    page_size=page_size(request.page_size), page_token=request.page_token
                )
            except InvalidPageToken as exc:
                await abort_invalid(context, "invalid page token", [FieldViolation("page_token", str(exc))])
        return triggers_pb2.ListTriggersResponse(triggers=page, next_page_token=token)

    async def UpdateTrigger(
        self, request: triggers_pb2.UpdateTriggerRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triggers_pb2.UpdateTriggerResponse:
        trigger_id = await _trigger_id(context, request.name, "UpdateTrigger")
        async with answering(context, TRIGGER, request.name):
            for attempt in range(1, UPDATE_TRIES + 1):
                stored = await self._triggers.get(trigger_id)
                if request.etag and request.etag != stored.etag:
                    await abort_etag_mismatch(context, request.name)
                try:
                    updated, _ = validate_update_trigger(request, stored)
                except InvalidTrigger as exc:
                    await abort_invalid(context, "invalid UpdateTrigger request", exc.violations)
                await self._check_destinations(context, updated.delivery.destinations)
                try:
                    saved = await self._triggers.update(trigger_id, updated, etag=request.etag or stored.etag)
                    break
                except EtagMismatch:
                    if request.etag or attempt == UPDATE_TRIES:
                        raise
        await tell(self._changed, request.name)
        return triggers_pb2.UpdateTriggerResponse(trigger=saved)

    async def PauseTrigger(
        self, request: triggers_pb2.PauseTriggerRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triggers_pb2.PauseTriggerResponse:
        trigger_id = await _trigger_id(context, request.name, "PauseTrigger")
        async with answering(context, TRIGGER, request.name):
            paused = await self._triggers.pause(trigger_id)
        await tell(self._changed, request.name)
        return triggers_pb2.PauseTriggerResponse(trigger=paused)

    async def ResumeTrigger(
        self, request: triggers_pb2.ResumeTriggerRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triggers_pb2.ResumeTriggerResponse:
        trigger_id = await _trigger_id(context, request.name, "ResumeTrigger")
        async with answering(context, TRIGGER, request.name):
            resumed, _ = await self._triggers.resume(trigger_id, datetime.now(UTC))
        await tell(self._changed, request.name)
        return triggers_pb2.ResumeTriggerResponse(trigger=resumed)

    async def DeleteTrigger(
        self, request: triggers_pb2.DeleteTriggerRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triggers_pb2.DeleteTriggerResponse:
        trigger_id = await _trigger_id(context, request.name, "DeleteTrigger")
        async with answering(context, TRIGGER, request.name):
            ended = await self._triggers.delete(trigger_id)
        await tell(self._changed, request.name)
        return triggers_pb2.DeleteTriggerResponse(episodes_ended=ended)

    async def _check_destinations(
        self, context: grpc.aio.ServicerContext[Any, Any], names: Sequence[str]
    ) -> None:
        """A trigger may only deliver to destinations that exist (validation checked their
        names); a missing one is a field violation, not the trigger's NOT_FOUND."""
        violations = []
        for i, name in enumerate(names):
            try:
                await self._destinations.get(parse_destination_name(name))
            except NotFound:
                violations.append(
                    FieldViolation(f"trigger.delivery.destinations[{i}]", f"{name} does not exist")
                )
        if violations:
            await abort_invalid(context, "the trigger delivers to destinations that do not exist", violations)


async def _trigger_id(context: grpc.aio.ServicerContext[Any, Any], name: str, method: str) -> str:
    """The id in the request's ``name``, or the call ends with a field violation."""
    if not name:
        await abort_invalid(context, f"invalid {method} request", [FieldViolation("name", "required")])
    try:
        return parse_trigger_name(name)
    except InvalidName as exc:
        await abort_invalid(context, f"invalid {method} request", [FieldViolation("name", str(exc))])
