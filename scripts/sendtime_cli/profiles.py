"""``sendtime profile rebuild``: replay customers' histories into fresh profile state.

Runs next to the profile service, with the same DATABASE_URL and REDIS_URL.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid

import asyncpg
import redis.asyncio as redis
from redis.exceptions import RedisError

from profile_service.cache import ProfileCache
from profile_service.identity import IdentityLimits
from profile_service.merge_rules import DEFAULT_RULES, load_merge_rules
from profile_service.rebuild import RebuildReport, rebuild_profiles
from profile_service.repository import ProfileRepository, create_pool
from profile_service.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="profile_command", required=True, metavar="COMMAND")
    rebuild = commands.add_parser(
        "rebuild",
        help="recompute profiles from their event history",
        description=(
            "Replay each customer's events into a fresh profile and save the ones that differ from "
            "the stored state (each under a new version, cache refreshed). Uses DATABASE_URL and "
            "REDIS_URL like the profile service. Prints how many customers were checked and changed."
        ),
    )
    rebuild.add_argument(
        "--customer", action="append", type=uuid.UUID, metavar="ID", help="only this customer (repeatable)"
    )
    rebuild.add_argument("--batch-size", type=int, default=500, metavar="N", help="customers per batch")
    rebuild.set_defaults(handler=run_rebuild)


def run_rebuild(args: argparse.Namespace) -> int:
    try:
        report = asyncio.run(_rebuild(args.customer, args.batch_size))
    except (OSError, asyncpg.PostgresError, RedisError) as exc:
        print(f"sendtime profile rebuild: {exc}", file=sys.stderr)
        return 1
    print(f"checked {report.customers} customers, rebuilt {report.changed}")
    return 0


async def _rebuild(customers: list[uuid.UUID] | None, batch_size: int) -> RebuildReport:
    settings = Settings.from_env(os.environ)
    pool = await create_pool(settings.database_url, min_size=1, max_size=2)
    cache = ProfileCache(redis.Redis.from_url(settings.redis_url), ttl_s=settings.cache_ttl_s)
    try:
        rules = (
            load_merge_rules(settings.source_priority_file)
            if settings.source_priority_file
            else DEFAULT_RULES
        )
        repository = ProfileRepository(
            pool, IdentityLimits.parse(settings.identity_limits), rules, settings.identifier_hasher
        )
        return await rebuild_profiles(repository, cache, customer_ids=customers, batch_size=batch_size)
    finally:
        await cache.close()
        await pool.close()
