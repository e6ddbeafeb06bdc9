"""`python -m triggers`: run the triggers service until SIGTERM."""

from __future__ import annotations

import os

from sendtime_common.service import run_service
from triggers.server import create_app
from triggers.settings import Settings

if __name__ == "__main__":
    run_service("triggers", Settings.from_env, create_app, os.environ)
