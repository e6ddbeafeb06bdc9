"""The gRPC clients of what the engine needs at fire time (triggers.dependencies): the live
profile from the profile service, a rendered message from the render service. Each calls with
the triggers service's own key for that service (profiles.read; render) over TLS, on a channel
reopened when its certificate files change (sendtime_common.service_channel), and within a
deadline of its own: a fire must never wait without bound."""

from __future__ import annotations

from typing import Any, Final

import grpc
from google.protobuf import struct_pb2

from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime.render.v1 import render_pb2, render_pb2_grpc
from sendtime_common.service_channel import ServiceChannel
from sendtime_common.tls import ClientTls
from triggers.dependencies import DependencyUnavailable, ProfileReader

# Answers that mean "not now": the callee is down, overloaded, or slower than the deadline.
RETRYABLE: Final = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
# The identifier kinds a render looks a customer up by, most stable first.
_IDENTIFIER_PREFERENCE: Final = (
    profile_pb2.IDENTIFIER_KIND_USER_ID,
    profile_pb2.IDENTIFIER_KIND_CRM_ID,
    profile_pb2.IDENTIFIER_KIND_EMAIL,
    profile_pb2.IDENTIFIER_KIND_DEVICE_ID,
    profile_pb2.IDENTIFIER_KIND_ANONYMOUS_ID,
)
_KIND_NAMES: Final = {
    profile_pb2.IDENTIFIER_KIND_USER_ID: "user_id",
    profile_pb2.IDENTIFIER_KIND_CRM_ID: "crm_id",
    profile_pb2.IDENTIFIER_KIND_EMAIL: "email",
    profile_pb2.IDENTIFIER_KIND_DEVICE_ID: "device_id",
    profile_pb2.IDENTIFIER_KIND_ANONYMOUS_ID: "anonymous_id",
}


def _unavailable(service: str, error: grpc.aio.AioRpcError) -> DependencyUnavailable:
    return DependencyUnavailable(f"the {service} service did not answer: {error.code().name}")


class ProfileChannel(ServiceChannel["profile_pb2_grpc.ProfileServiceAsyncStub"]):
    def __init__(self, target: str, api_key: str, tls: ClientTls, interceptors: list[Any]) -> None:
        """Raises: UnusableCertificate: the client certificate files are not usable."""
        super().__init__("profile", target, api_key, tls, profile_pb2_grpc.ProfileServiceStub, interceptors)


class RenderChannel(ServiceChannel["render_pb2_grpc.RenderServiceAsyncStub"]):
    def __init__(self, target: str, api_key: str, tls: ClientTls, interceptors: list[Any]) -> None:
        """Raises: UnusableCertificate: the client certificate files are not usable."""
        super().__init__("render", target, api_key, tls, render_pb2_grpc.RenderServiceStub, interceptors)


class GrpcProfileReader:
    """``ProfileReader`` over the profile service's GetProfile."""

    def __init__(self, channel: ProfileChannel, deadline_s: float) -> None:
        self._channel = channel
        self._deadline_s = deadline_s

    async def get_profile(self, customer_id: str) -> profile_pb2.Profile | None:
        """The customer's live profile; None when no customer has the id (erased, or merged
        into another).

        Raises:
            DependencyUnavailable: the profile service could not answer in time.
            grpc.aio.AioRpcError: any other refusal (a bug or a misconfigured key: not retried
                as if the service were down).
        """
        request = profile_pb2.GetProfileRequest(name=f"profiles/{customer_id}")
        try:
            answer = await self._channel.stub.GetProfile(request, timeout=self._deadline_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            if exc.code() in RETRYABLE:
                raise _unavailable("profile", exc) from None
            raise
        return answer.profile


class GrpcMessageRenderer:
    """``MessageRenderer`` over the render service's Render of a stored template.

    Render looks a customer up by an identifier (``profiles/{kind}:{value}``), not by customer
    id, so the customer's identifier is read from the profile first (``profiles``): one lookup
    more per fire, until render takes ``profiles/{customer_id}``.
    """

    def __init__(self, channel: RenderChannel, profiles: ProfileReader, deadline_s: float) -> None:
        self._channel = channel
        self._profiles = profiles
        self._deadline_s = deadline_s

    async def render(
        self, template: str, customer_id: str, variables: struct_pb2.Struct
    ) -> render_pb2.RenderResponse:
        """``template`` (``templates/{id}``, its published version) rendered for the customer.
        A customer who no longer exists gets a skipped render (SKIP_REASON_ERASED).

        Raises:
            DependencyUnavailable: the profile or the render service could not answer in time.
            LookupError: no such template.
            grpc.aio.AioRpcError: any other refusal.
        """
        profile = await self._profiles.get_profile(customer_id)
        identifier = None if profile is None else render_identifier(profile)
        if identifier is None:
            return render_pb2.RenderResponse(
                status=render_pb2.RENDER_STATUS_SKIPPED,
                skip_reason=render_pb2.SKIP_REASON_ERASED,
                fallback_reason=render_pb2.FALLBACK_REASON_PROFILE_NOT_FOUND,
            )
        request = render_pb2.RenderRequest(template_name=template, profile=identifier, variables=variables)
        try:
            return await self._channel.stub.Render(request, timeout=self._deadline_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise LookupError(f"{template} does not exist") from None
            if exc.code() in RETRYABLE:
                raise _unavailable("render", exc) from None
            raise


def render_identifier(profile: profile_pb2.Profile) -> str | None:
    """The profile's name by its most stable identifier (``profiles/user_id:u-1``), as render
    takes it over gRPC (the value as it is); None for a profile without identifiers."""
    by_kind = {identifier.kind: identifier.value for identifier in reversed(profile.identifiers)}
    for kind in _IDENTIFIER_PREFERENCE:
        value = by_kind.get(kind)
        if value:
            return f"profiles/{_KIND_NAMES[kind]}:{value}"
    return None
