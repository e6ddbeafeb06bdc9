"""`python -m profile_service`: run the profile service (API and merger) until SIGTERM."""

from __future__ import annotations

import asyncio
import os

from profile_service.server import create_app
from profile_service.settings import Settings
from sendtime_common.grpc_server import run_until_signalled
from sendtime_common.logs import configure_logging
from sendtime_common.runtime import gc_gen0_threshold_from_env, tune_garbage_collector
from sendtime_common.telemetry import configure_tracing


async def main() -> None:
    settings = Settings.from_env(os.environ)
    gc_gen0_threshold = gc_gen0_threshold_from_env(os.environ)
    configure_logging("profile", settings.log_level)
    configure_tracing("profile", settings.otlp_endpoint or None)
    app = await create_app(settings)
    tune_garbage_collector(gc_gen0_threshold)  # once start-up is done, so that it is frozen
    await run_until_signalled(
        app.grpc, grace_s=settings.shutdown_grace_s, on_start=app.start_background, on_stop=app.close
    )


if __name__ == "__main__":
    asyncio.run(main())
