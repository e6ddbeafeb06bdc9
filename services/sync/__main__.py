"""`python -m sync`: run the sync service until SIGTERM."""

from __future__ import annotations

import os

from sendtime_common.service import run_service
from sync.server import create_app
from sync.settings import Settings

if __name__ == "__main__":
    run_service("sync", Settings.from_env, create_app, os.environ)
