"""The profile lookup render makes once per call, bounded by the time the caller left it."""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

import grpc

from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc

log = logging.getLogger(__name__)


class LookupFailure(enum.Enum):
    NOT_FOUND = "not_found"
    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True, slots=True)
class ProfileLookup:
    """A profile, or why there is none."""

    profile: profile_pb2.Profile | None
    failure: LookupFailure | None = None


class ProfileClient:
    """Fetches profiles from ProfileService; never raises for a failed lookup."""

    def __init__(self, stub: profile_pb2_grpc.ProfileServiceAsyncStub) -> None:
        self._stub = stub

    async def fetch(self, identifier: profile_pb2.Identifier, timeout_s: float) -> ProfileLookup:
        if timeout_s <= 0:
            return ProfileLookup(None, LookupFailure.TIMEOUT)
        try:
            response = await self._stub.GetProfile(
                profile_pb2.GetProfileRequest(identifier=identifier), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            failure = _failure_of(exc.code())
            if failure is not LookupFailure.NOT_FOUND:
                log.warning(
                    "profile lookup failed", extra={"grpc_code": exc.code().name, "timeout_s": timeout_s}
                )
            return ProfileLookup(None, failure)
        return ProfileLookup(response.profile)


def _failure_of(code: grpc.StatusCode) -> LookupFailure:
    if code == grpc.StatusCode.NOT_FOUND:
        return LookupFailure.NOT_FOUND
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return LookupFailure.TIMEOUT
    return LookupFailure.UNAVAILABLE
