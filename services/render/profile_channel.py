"""Render's channel to the profile service: TLS (mutual TLS with a client certificate where
profile asks for one) and render's own API key on every call, if it has one; reopened when the
certificate files change (sendtime_common.service_channel)."""

from __future__ import annotations

from typing import Any

from sendtime.profile.v1 import profile_pb2_grpc
from sendtime_common.service_channel import ServiceChannel
from sendtime_common.tls import ClientTls


class ProfileChannel(ServiceChannel["profile_pb2_grpc.ProfileServiceAsyncStub"]):
    def __init__(self, target: str, api_key: str, tls: ClientTls, interceptors: list[Any]) -> None:
        """Open the channel (it connects lazily).

        Raises:
            UnusableCertificate: the client certificate files are not usable.
        """
        super().__init__("profile", target, api_key, tls, profile_pb2_grpc.ProfileServiceStub, interceptors)
