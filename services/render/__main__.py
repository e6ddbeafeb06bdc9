"""`python -m render`: run the render service until SIGTERM."""

from __future__ import annotations

import os

from render.server import create_app
from render.settings import Settings
from sendtime_common.service import run_service

if __name__ == "__main__":
    run_service("render", Settings.from_env, create_app, os.environ)
