"""`python -m render`: run the render service until SIGTERM."""

from __future__ import annotations

import asyncio
import os

from render.server import create_app
from render.settings import Settings
from sendtime_common.grpc_server import run_until_signalled
from sendtime_common.logs import configure_logging
from sendtime_common.runtime import gc_gen0_threshold_from_env, tune_garbage_collector
from sendtime_common.telemetry import configure_tracing


async def main() -> None:
    settings = Settings.from_env(os.environ)
    gc_gen0_threshold = gc_gen0_threshold_from_env(os.environ)
    configure_logging("render", settings.log_level)
    configure_tracing("render", settings.otlp_endpoint or None)
    app = await create_app(settings)
    tune_garbage_collector(gc_gen0_threshold)  # once start-up is done, so that it is frozen
    await run_until_signalled(
        app.grpc, grace_s=settings.shutdown_grace_s, on_start=app.start_background, on_stop=app.close
    )


if __name__ == "__main__":
    asyncio.run(main())
