"""Wiring of the render service: the profile client channel and fetcher, the renderer and the
gRPC server."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import redis.asyncio as redis
from grpc.aio import Channel
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from render.profiles import FetcherSettings, ProfileFetcher
from render.renderer import Renderer
from render.servicer import RenderServicer, TemplateSource
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
    profiles: ProfileFetcher

    async def start(self) -> None:
        await self.grpc.start()

    async def close(self) -> None:
        await self.profiles.close()
        await self.profile_channel.close(grace=None)

    async def stop(self, grace_s: float) -> None:
        """Drain calls, then close the channel their profile lookups use."""
        await self.grpc.stop(grace_s)
        await self.close()


def create_app(settings: Settings, templates: TemplateSource | None = None) -> RenderApp:
    """Build the server, not yet started. The profile channel and Redis connect lazily: render
    serves (with fallbacks) even while the profile service or Redis is down."""
    channel = grpc.aio.insecure_channel(
        settings.profile_target,
        interceptors=aio_client_interceptors(),  # type: ignore[no-untyped-call]  # traces the lookups
    )
    profiles = ProfileFetcher(
        profile_pb2_grpc.ProfileServiceStub(channel),
        redis.Redis.from_url(settings.redis_url) if settings.redis_url else None,
        FetcherSettings(
            breaker_failures=settings.breaker_failures, breaker_recovery_s=settings.breaker_recovery_s
        ),
    )
    renderer = Renderer(
        TemplateCompiler(settings.template_cache_size),
        profiles,
        fallback_reserve_s=settings.fallback_reserve_s,
    )
    servicer = RenderServicer(renderer, templates, default_deadline_s=settings.default_deadline_s)
    server = GrpcServer(
        settings.address,
        [SERVICE_NAME],
        lambda s: render_pb2_grpc.add_RenderServiceServicer_to_server(servicer, s),
    )
    return RenderApp(grpc=server, profile_channel=channel, profiles=profiles)
