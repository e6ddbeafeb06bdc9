"""`python -m profile_service`: run the profile service (API and merger) until SIGTERM."""

from __future__ import annotations

import os

from profile_service.server import create_app
from profile_service.settings import Settings
from sendtime_common.service import run_service

if __name__ == "__main__":
    run_service("profile", Settings.from_env, create_app, os.environ)
