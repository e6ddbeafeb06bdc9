"""What ``python -m <service>`` does for every Sendtime service: read the settings, set up logs
and tracing, build the app, tune the collector, and serve until SIGTERM."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol, TypeVar

from sendtime_common.grpc_server import GrpcServer, run_until_signalled
from sendtime_common.logs import configure_logging
from sendtime_common.runtime import gc_gen0_threshold_from_env, tune_garbage_collector
from sendtime_common.telemetry import configure_tracing


class ServiceSettings(Protocol):
    @property
    def log_level(self) -> str: ...

    @property
    def otlp_endpoint(self) -> str: ...

    @property
    def shutdown_grace_s(self) -> float: ...


class ServiceApp(Protocol):
    @property
    def grpc(self) -> GrpcServer: ...

    async def start_background(self) -> None:
        """Start consumers and other work that runs beside the gRPC server."""
        ...

    async def close(self) -> None:
        """Stop that work and close connections, after the last call has finished."""
        ...

    async def stop(self, grace_s: float) -> None:
        """Drain every port (calls in flight get ``grace_s``, then are cancelled) and close:
        bounded (sendtime_common.shutdown), so that it ends inside the pod's grace period."""
        ...


SettingsT = TypeVar("SettingsT", bound=ServiceSettings)


def run_service(
    name: str,
    read_settings: Callable[[Mapping[str, str]], SettingsT],
    create_app: Callable[[SettingsT], Awaitable[ServiceApp]],
    env: Mapping[str, str],
) -> None:
    """Run the service ``name`` (its log and trace name) configured from ``env``, until SIGTERM
    or SIGINT.

    Raises:
        sendtime_common.config.ConfigError: a variable has an unusable value.
        OSError, asyncpg.PostgresError, EventLogUnavailable: a dependency cannot be reached at
            start.
    """
    settings = read_settings(env)
    gc_gen0_threshold = gc_gen0_threshold_from_env(env)
    asyncio.run(_serve(name, settings, create_app, gc_gen0_threshold))


async def _serve(
    name: str,
    settings: SettingsT,
    create_app: Callable[[SettingsT], Awaitable[ServiceApp]],
    gc_gen0_threshold: int,
) -> None:
    configure_logging(name, settings.log_level)
    configure_tracing(name, settings.otlp_endpoint or None)
    app = await create_app(settings)
    tune_garbage_collector(gc_gen0_threshold)  # once start-up is done, so that it is frozen
    await run_until_signalled(
        app.grpc, grace_s=settings.shutdown_grace_s, on_start=app.start_background, stop=app.stop
    )
