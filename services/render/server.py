"""Wiring of the render service: the profile client channel, the renderer and the gRPC server."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from grpc.aio import Channel
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from render.profile_client import ProfileClient
from render.renderer import Renderer
from render.servicer import RenderServicer
from render.settings import Settings
from render.templates import TemplateCompiler
from sendtime.profile.v1 import profile_pb2_grpc
from sendtime.render.v1 import render_pb2, render_pb2_grpc
from sendtime_common.grpc_server import GrpcServer

SERVICE_NAME = render_pb2.DESCRIPTOR.services_by_name["RenderService"].full_name


@dataclass(slots=True)
class RenderApp:
    grpc: GrpcServer
    profile_channel: Channel  # (not grpc.aio.Channel: the field above shadows the module)

    async def start(self) -> None:
        await self.grpc.start()

    async def close(self) -> None:
        await self.profile_channel.close(grace=None)

    async def stop(self, grace_s: float) -> None:
        """Drain calls, then close the channel their profile lookups use."""
        await self.grpc.stop(grace_s)
        await self.close()


def create_app(settings: Settings) -> RenderApp:
    """Build the server, not yet started. The profile channel connects lazily: render serves
    (with fallbacks) even while the profile service is down."""
    channel = grpc.aio.insecure_channel(
        settings.profile_target,
        interceptors=aio_client_interceptors(),  # type: ignore[no-untyped-call]  # carries the trace into the profile lookup
    )
    renderer = Renderer(
        TemplateCompiler(settings.template_cache_size),
        ProfileClient(profile_pb2_grpc.ProfileServiceStub(channel)),
        fallback_reserve_s=settings.fallback_reserve_s,
    )
    servicer = RenderServicer(renderer, default_deadline_s=settings.default_deadline_s)
    server = GrpcServer(
        settings.address,
        [SERVICE_NAME],
        lambda s: render_pb2_grpc.add_RenderServiceServicer_to_server(servicer, s),
    )
    return RenderApp(grpc=server, profile_channel=channel)
