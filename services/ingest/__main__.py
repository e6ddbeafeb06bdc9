"""`python -m ingest`: run the ingest service until SIGTERM."""

from __future__ import annotations

import os

from ingest.server import create_app
from ingest.settings import Settings
from sendtime_common.service import run_service

if __name__ == "__main__":
    run_service("ingest", Settings.from_env, create_app, os.environ)
