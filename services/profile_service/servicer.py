"""gRPC handlers of ProfileService (decode and check identifiers, read, encode) and of
UnmergedEventService (the merger's dead letters: list, replay)."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC
from typing import Any, NoReturn, TypeVar

import grpc

from profile_service.codec import InvalidReadMask, apply_read_mask, check_read_mask
from profile_service.customer_data import EVENT_TYPES, CustomerData, CustomerNotFound
from profile_service.reader import ProfileReader
from profile_service.repository import ProfileRepository
from profile_service.unmerged import (
    AlreadyReplayed,
    InvalidName,
    Merging,
    StoreError,
    UnmergedStore,
    list_page,
    parse_name,
    replay,
)
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime_common.database import unreachable
from sendtime_common.errors import (
    FieldViolation,
    abort_invalid,
    abort_with,
    not_found_status,
    retry_status,
)
from sendtime_common.identifier_proto import (
    IdentifierKey,
    parse_identifier,
    parse_profile_name,
    requested_customer,
)
from sendtime_common.paging import InvalidPageToken, page_size

_Servicer = TypeVar("_Servicer")
_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
_Handler = Callable[[_Servicer, _Request, grpc.aio.ServicerContext[Any, Any]], Awaitable[_Response]]


def _database_away_is_unavailable(
    handler: _Handler[_Servicer, _Request, _Response],
) -> _Handler[_Servicer, _Request, _Response]:
    """PostgreSQL unreachable (down, restarting) answers UNAVAILABLE with a retry delay, which
    callers retry or fall back on (render does), not INTERNAL: nothing is wrong with the
    request nor the code. Other database errors stay INTERNAL: those are bugs."""

    @functools.wraps(handler)
    async def guarded(
        self: _Servicer, request: _Request, context: grpc.aio.ServicerContext[Any, Any]
    ) -> _Response:
        try:
            return await handler(self, request, context)
        except Exception as exc:
            if unreachable(exc):
                await _abort_database_unavailable(context)
            raise

    return guarded


class ProfileServicer(profile_pb2_grpc.ProfileServiceServicer):
    def __init__(
        self,
        reader: ProfileReader,
        customer_data: CustomerData,
        repository: ProfileRepository,
        *,
        max_batch_get: int,
    ) -> None:
        self._reader = reader
        self._repository = repository
        self._customer_data = customer_data
        self._max_batch_get = max_batch_get

    @_database_away_is_unavailable
    async def GetProfile(
        self, request: profile_pb2.GetProfileRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> profile_pb2.GetProfileResponse:
        violations: list[FieldViolation] = []
        identifier = request.identifier if request.HasField("identifier") else None
        key = requested_customer(identifier, request.name, "identifier", "name")
        if isinstance(key, FieldViolation):
            violations.append(key)
        violations.extend(_read_mask_violations(request))
        if violations or isinstance(key, FieldViolation):
            await abort_invalid(context, "invalid GetProfile request", violations)
        if isinstance(key, uuid.UUID):
            profile = await self._reader.get_by_customer_id(key)
            if profile is None:
                await abort_with(
                    context,
                    not_found_status("no customer has this id", "PROFILE_NOT_FOUND", {"name": request.name}),
                )
        else:
            (profile,) = await self._reader.get_many([key])
            if profile is None:
                if await self._repository.erased_among([key]):
                    await abort_with(
                        context,
                        not_found_status("the customer was erased", "PROFILE_ERASED", {"kind": key[0].value}),
                    )
                await _abort_not_found(context, key)
        response = profile_pb2.GetProfileResponse()
        apply_read_mask(profile, request.read_mask, into=response.profile)
        return response

    @_database_away_is_unavailable
    async def BatchGetProfiles(
        self, request: profile_pb2.BatchGetProfilesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> profile_pb2.BatchGetProfilesResponse:
        violations = list(_read_mask_violations(request))
        by_names = bool(request.names)
        field, count = (
            ("names", len(request.names)) if by_names else ("identifiers", len(request.identifiers))
        )
        if by_names and request.identifiers:
            violations.append(FieldViolation("names", "set names or identifiers, not both"))
        elif not 1 <= count <= self._max_batch_get:
            violations.append(FieldViolation(field, f"must hold 1 to {self._max_batch_get} {field}"))
        keys: list[IdentifierKey | uuid.UUID] = []
        parsed: list[IdentifierKey | uuid.UUID | FieldViolation] = [
            parse_identifier(identifier, f"identifiers[{i}]")
            for i, identifier in enumerate(request.identifiers)
        ]
        parsed += [parse_profile_name(name, f"names[{i}]") for i, name in enumerate(request.names)]
        for key in parsed:
            if isinstance(key, FieldViolation):
                violations.append(key)
            else:
                keys.append(key)
        if violations:
            await abort_invalid(context, "invalid BatchGetProfiles request", violations)
        profiles = await self._read_many(keys)
        erased = await self._repository.erased_among(
            [k for k, p in zip(keys, profiles, strict=True) if p is None and not isinstance(k, uuid.UUID)]
        )
        # Built in place: each profile is copied once, into the response.
        response = profile_pb2.BatchGetProfilesResponse()
        for key, profile in zip(keys, profiles, strict=True):
            result = response.results.add(found=profile is not None, erased=key in erased)
            if profile is not None:
                apply_read_mask(profile, request.read_mask, into=result.profile)
        if by_names:
            for result, name in zip(response.results, request.names, strict=True):
                result.name = name
        else:
            for result, identifier in zip(response.results, request.identifiers, strict=True):
                result.identifier.CopyFrom(identifier)
        return response

    async def _read_many(self, keys: list[IdentifierKey | uuid.UUID]) -> list[profile_pb2.Profile | None]:
        """Each key's profile, in order: identifiers through the cache, customer ids from
        PostgreSQL, one read of each kind."""
        identifiers = [k for k in keys if not isinstance(k, uuid.UUID)]
        customer_ids = [k for k in keys if isinstance(k, uuid.UUID)]
        by_identifier = await self._reader.get_many(identifiers) if identifiers else []
        by_customer_id = await self._reader.get_by_customer_ids(customer_ids) if customer_ids else []
        found: dict[IdentifierKey | uuid.UUID, profile_pb2.Profile | None] = {}
        found.update(zip(identifiers, by_identifier, strict=True))
        found.update(zip(customer_ids, by_customer_id, strict=True))
        return [found[k] for k in keys]

    @_database_away_is_unavailable
    async def ListProfileEvents(
        self, request: profile_pb2.ListProfileEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> profile_pb2.ListProfileEventsResponse:
        violations: list[FieldViolation] = []
        key = parse_identifier(request.identifier, "identifier")
        if isinstance(key, FieldViolation):
            violations.append(key)
        if request.page_size < 0:
            violations.append(FieldViolation("page_size", "must not be negative"))
        for i, name in enumerate(request.event_types):
            if name not in EVENT_TYPES:
                violations.append(
                    FieldViolation(f"event_types[{i}]", "not an event type, e.g. cart_item_added")
                )
        start = request.start_time.ToDatetime(tzinfo=UTC) if request.HasField("start_time") else None
        end = request.end_time.ToDatetime(tzinfo=UTC) if request.HasField("end_time") else None
        if start and end and end <= start:
            violations.append(FieldViolation("end_time", "must be after start_time"))
        if violations or isinstance(key, FieldViolation):
            await abort_invalid(context, "invalid ListProfileEvents request", violations)
        try:
            events, token = await self._customer_data.list_events(
                key,
                page_size=page_size(request.page_size),
                page_token=request.page_token,
                event_types=list(request.event_types),
                start=start,
                end=end,
            )
        except InvalidPageToken as exc:
            await abort_invalid(context, "invalid page token", [FieldViolation("page_token", str(exc))])
        except CustomerNotFound:
            await _abort_not_found(context, key)
        return profile_pb2.ListProfileEventsResponse(events=events, next_page_token=token)

    @_database_away_is_unavailable
    async def ExportProfile(
        self, request: profile_pb2.ExportProfileRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> profile_pb2.ExportProfileResponse:
        key = await self._identifier_or_abort(request.identifier, context, "ExportProfile")
        try:
            return profile_pb2.ExportProfileResponse(export=await self._customer_data.export(key))
        except CustomerNotFound:
            await _abort_not_found(context, key)

    @_database_away_is_unavailable
    async def DeleteProfile(
        self, request: profile_pb2.DeleteProfileRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> profile_pb2.DeleteProfileResponse:
        key = await self._identifier_or_abort(request.identifier, context, "DeleteProfile")
        try:
            erased = await self._customer_data.erase(key)
        except CustomerNotFound:
            await _abort_not_found(context, key)
        return profile_pb2.DeleteProfileResponse(
            customer_id=erased.customer_id,
            identifiers_deleted=len(erased.identifiers),
            events_deleted=erased.events_deleted,
        )

    async def _identifier_or_abort(
        self, identifier: profile_pb2.Identifier, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> IdentifierKey:
        key = parse_identifier(identifier, "identifier")
        if isinstance(key, FieldViolation):
            await abort_invalid(context, f"invalid {method} request", [key])
        return key


async def _abort_not_found(context: grpc.aio.ServicerContext[Any, Any], key: IdentifierKey) -> NoReturn:
    await abort_with(
        context,
        not_found_status("no customer has this identifier", "PROFILE_NOT_FOUND", {"kind": key[0].value}),
    )


def _read_mask_violations(
    request: profile_pb2.GetProfileRequest | profile_pb2.BatchGetProfilesRequest,
) -> list[FieldViolation]:
    try:
        check_read_mask(request.read_mask)
    except InvalidReadMask as exc:
        return [FieldViolation("read_mask", str(exc))]
    return []


class UnmergedEventServicer(profile_pb2_grpc.UnmergedEventServiceServicer):
    def __init__(self, store: UnmergedStore, merging: Merging) -> None:
        self._store = store
        self._merging = merging

    async def ListUnmergedEvents(
        self, request: profile_pb2.ListUnmergedEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> profile_pb2.ListUnmergedEventsResponse:
        violations = []
        if request.page_size < 0:
            violations.append(FieldViolation("page_size", "must not be negative"))
        if request.state not in profile_pb2.UnmergedEventState.values():
            violations.append(FieldViolation("state", f"unknown value {request.state}"))
        if violations:
            await abort_invalid(context, "invalid ListUnmergedEvents request", violations)
        try:
            unmerged, token = await list_page(
                self._store,
                page_size=page_size(request.page_size),
                page_token=request.page_token,
                state=request.state,
            )
        except InvalidPageToken as exc:
            await abort_invalid(context, "invalid page token", [FieldViolation("page_token", str(exc))])
        except StoreError:
            await _abort_database_unavailable(context)
        return profile_pb2.ListUnmergedEventsResponse(unmerged_events=unmerged, next_page_token=token)

    async def ReplayUnmergedEvent(
        self, request: profile_pb2.ReplayUnmergedEventRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> profile_pb2.ReplayUnmergedEventResponse:
        try:
            unmerged_id = parse_name(request.name)
        except InvalidName as exc:
            await abort_invalid(context, "invalid name", [FieldViolation("name", str(exc))])
        try:
            replayed = await replay(self._store, self._merging, unmerged_id)
        except AlreadyReplayed as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except StoreError:
            await _abort_database_unavailable(context)
        if replayed is None:
            await abort_with(
                context,
                not_found_status(f"no {request.name}", "UNMERGED_EVENT_NOT_FOUND", {"name": request.name}),
            )
        return profile_pb2.ReplayUnmergedEventResponse(
            unmerged_event=replayed.unmerged, customer_id=replayed.customer_id
        )


async def _abort_database_unavailable(context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
    await abort_with(
        context,
        retry_status(
            grpc.StatusCode.UNAVAILABLE, "the profile database is unavailable", "DATABASE_UNAVAILABLE", 1.0
        ),
    )
