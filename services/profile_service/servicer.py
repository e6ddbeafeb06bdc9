"""gRPC handlers of ProfileService: decode and check identifiers, read, encode."""

from __future__ import annotations

from typing import Any

import grpc

from profile_service.codec import InvalidReadMask, apply_read_mask, check_read_mask
from profile_service.reader import ProfileReader
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime_common.errors import FieldViolation, abort_invalid, abort_with, not_found_status
from sendtime_common.identifier_proto import IdentifierKey, parse_identifier


class ProfileServicer(profile_pb2_grpc.ProfileServiceServicer):
    def __init__(self, reader: ProfileReader, *, max_batch_get: int) -> None:
        self._reader = reader
        self._max_batch_get = max_batch_get

    async def GetProfile(
        self, request: profile_pb2.GetProfileRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> profile_pb2.GetProfileResponse:
        violations: list[FieldViolation] = []
        key = parse_identifier(request.identifier, "identifier")
        if isinstance(key, FieldViolation):
            violations.append(key)
        violations.extend(_read_mask_violations(request))
        if violations or isinstance(key, FieldViolation):
            await abort_invalid(context, "invalid GetProfile request", violations)
        (profile,) = await self._reader.get_many([key])
        if profile is None:
            await abort_with(
                context,
                not_found_status(
                    "no customer has this identifier", "PROFILE_NOT_FOUND", {"kind": key[0].value}
                ),
            )
        return profile_pb2.GetProfileResponse(profile=apply_read_mask(profile, request.read_mask))

    async def BatchGetProfiles(
        self, request: profile_pb2.BatchGetProfilesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> profile_pb2.BatchGetProfilesResponse:
        violations = list(_read_mask_violations(request))
        count = len(request.identifiers)
        if not 1 <= count <= self._max_batch_get:
            violations.append(
                FieldViolation("identifiers", f"must hold 1 to {self._max_batch_get} identifiers")
            )
        keys: list[IdentifierKey] = []
        for i, identifier in enumerate(request.identifiers):
            key = parse_identifier(identifier, f"identifiers[{i}]")
            if isinstance(key, FieldViolation):
                violations.append(key)
            else:
                keys.append(key)
        if violations:
            await abort_invalid(context, "invalid BatchGetProfiles request", violations)
        profiles = await self._reader.get_many(keys)
        return profile_pb2.BatchGetProfilesResponse(
            results=[
                profile_pb2.ProfileResult(
                    identifier=identifier,
                    profile=apply_read_mask(profile, request.read_mask) if profile else None,
                    found=profile is not None,
                )
                for identifier, profile in zip(request.identifiers, profiles, strict=True)
            ]
        )


def _read_mask_violations(
    request: profile_pb2.GetProfileRequest | profile_pb2.BatchGetProfilesRequest,
) -> list[FieldViolation]:
    try:
        check_read_mask(request.read_mask)
    except InvalidReadMask as exc:
        return [FieldViolation("read_mask", str(exc))]
    return []
