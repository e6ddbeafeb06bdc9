"""The live profiles a push sends, from the profile service: BatchGetProfiles by name
(``profiles/{customer_id}``, what the profile change stream names), up to 1,000 a call, with the
sync service's own key (profiles.read), a read mask of only what a push uses
(sync.profile_attributes.READ_PATHS) and a deadline per call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Protocol

import grpc
from google.protobuf import field_mask_pb2

from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime_common.service_channel import ServiceChannel
from sendtime_common.tls import ClientTls
from sync.profile_attributes import READ_PATHS

# Answers that mean "not now": the profile service is down, overloaded, or slower than the deadline.
_RETRYABLE: Final = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
BATCH_MAX: Final = 1000  # the profile service's limit per BatchGetProfiles


class ProfilesUnavailable(Exception):
    """The profile service did not answer (in time): the push run fails and is tried again."""


class ProfileSource(Protocol):
    async def get_many(self, customer_ids: Sequence[str]) -> dict[str, profile_pb2.Profile | None]:
        """Each customer's live profile, None for one that is gone.

        Raises:
            ProfilesUnavailable: the profiles could not be read now.
        """
        ...


class ProfileChannel(ServiceChannel["profile_pb2_grpc.ProfileServiceAsyncStub"]):
    def __init__(self, target: str, api_key: str, tls: ClientTls, interceptors: list[Any]) -> None:
        """Raises: UnusableCertificate: the client certificate files are not usable."""
        super().__init__("profile", target, api_key, tls, profile_pb2_grpc.ProfileServiceStub, interceptors)


class LiveProfiles:
    """``ProfileSource`` over the profile service's BatchGetProfiles by name."""

    def __init__(self, channel: ProfileChannel, deadline_s: float) -> None:
        self._channel = channel
        self._deadline_s = deadline_s
        self._mask = field_mask_pb2.FieldMask(paths=list(READ_PATHS))

    async def get_many(self, customer_ids: Sequence[str]) -> dict[str, profile_pb2.Profile | None]:
        """Each customer's live profile; None for one no customer has the id of any more
        (erased, or merged into another: the survivor's own change marks it).

        Raises:
            ProfilesUnavailable: a call was not answered in time (none of the page is used).
            grpc.aio.AioRpcError: any other refusal (a misconfigured key: not retried as if
                the service were down).
        """
        calls = [customer_ids[start : start + BATCH_MAX] for start in range(0, len(customer_ids), BATCH_MAX)]
        found: dict[str, profile_pb2.Profile | None] = {}
        for chunk in calls:
            request = profile_pb2.BatchGetProfilesRequest(
                names=[f"profiles/{c}" for c in chunk], read_mask=self._mask
            )
            try:
                answer = await self._channel.stub.BatchGetProfiles(request, timeout=self._deadline_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _RETRYABLE:
                    raise ProfilesUnavailable(
                        f"the profile service did not answer: {exc.code().name}"
                    ) from None
                raise
            for customer_id, result in zip(chunk, answer.results, strict=True):
                found[customer_id] = result.profile if result.found else None
        return found
