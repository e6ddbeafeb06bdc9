"""Redis ACL users for the services that use Redis, each limited to its own keys and commands.

- **profile** keeps the hot cache under ``sendtime:profile:*``: reads, writes and the two cache
  scripts there, and client-side-caching invalidations (``CLIENT TRACKING``, the channel
  ``__redis__:invalidate``) for its near cache. Nothing ``@dangerous`` (FLUSHALL, CONFIG, KEYS).
- **render** keeps last known good profiles under ``sendtime:render:lkg:*``: GET, SET and DEL
  there, nothing else.
- **Every service** keeps its callers' rate limits under ``sendtime:ratelimit:<service>:*``
  (sendtime_common.rate_limit): EVALSHA of the limiter's script, SCRIPT LOAD to load it again
  after a restart, and the script's own TIME, GET and SET, on its own buckets only. Ingest's,
  triggers' and sync's users may do nothing else.

``devstack``/``make run`` creates these users (``ACL SETUSER``) on the local Redis; on a managed
Redis an administrator creates them from ``acl_rules`` (docs/security.md prints them), and the
default user should be disabled there.
"""

from __future__ import annotations

from collections.abc import Mapping

import redis.asyncio as redis

SERVICES = ("ingest", "profile", "render", "triggers", "sync")

# The rate limiter's script: EVALSHA (SCRIPT LOAD after NOSCRIPT) and what it runs.
_LIMITER = ["+evalsha", "+script|load", "+time", "+get", "+set"]

_RULES = {
    "ingest": ["~sendtime:ratelimit:ingest:*", "+@connection", *_LIMITER],
    "triggers": ["~sendtime:ratelimit:triggers:*", "+@connection", *_LIMITER],
    "sync": ["~sendtime:ratelimit:sync:*", "+@connection", *_LIMITER],
    "profile": [
        "~sendtime:profile:*",
        "~sendtime:ratelimit:profile:*",
        "&__redis__:invalidate",
        "+@connection",
        "+@read",
        "+@write",
        "+@scripting",
        "-@dangerous",
        "+client|id",
        "+client|tracking",
        "+subscribe",
        "+time",
    ],
    "render": [
        "~sendtime:render:lkg:*",
        "~sendtime:ratelimit:render:*",
        "+@connection",
        "+get",
        "+set",
        "+del",
        "+evalsha",
        "+script|load",
        "+time",
    ],
}


def user_name(service: str) -> str:
    return f"sendtime-{service}"


def acl_rules(service: str) -> list[str]:
    """The ``ACL SETUSER`` rules of ``service``'s user (without its password)."""
    return ["reset", "on", *_RULES[service]]


async def setup_users(admin_url: str, passwords: Mapping[str, str]) -> None:
    """Create or reset each service's user with its password, as the user of ``admin_url``.

    Raises:
        redis.RedisError: Redis refused (the admin user may not manage ACLs) or is unreachable.
    """
    async with redis.Redis.from_url(admin_url) as admin:
        for service, password in passwords.items():
            await admin.execute_command(  # type: ignore[no-untyped-call]
                "ACL", "SETUSER", user_name(service), *acl_rules(service), f">{password}"
            )
