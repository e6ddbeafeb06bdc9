"""``sendtime keys``: make, list, show, rotate and revoke API keys and set a key's own rate
limits, directly in the database (DATABASE_URL), as an operator with database access does; this
is also how the first admin key is made. Each change is recorded in the audit trail as
``cli:{user}``."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import re
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta

import asyncpg

from sendtime_common.auth.api_keys import Scope, valid_key_id
from sendtime_common.auth.audit import AuditTrail
from sendtime_common.auth.key_store import ApiKeyRecord, KeyNotActive, KeyNotFound, KeyStore
from sendtime_common.config import env_str
from sendtime_common.rate_limit import Rate

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/sendtime"
_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def duration(text: str) -> timedelta:
    """``90d``, ``12h``, ``30m``, ``45s`` or a sum such as ``1d12h``."""
    parts = _DURATION.findall(text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90d, 12h, 30m or 1d12h")
    total = timedelta()
    for number, unit in parts:
        total += timedelta(**{_UNITS[unit]: int(number)})
    return total


def scope(text: str) -> Scope:
    try:
        return Scope.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def rate_limit(text: str) -> tuple[Scope, Rate]:
    """``SCOPE=RATE``, e.g. ``events.write=5000/s burst 10000`` or ``keys.manage=60/min``."""
    name, separator, rate = text.partition("=")
    if not separator:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not SCOPE=RATE, e.g. 'events.write=5000/s burst 10000'"
        )
    try:
        return Scope.parse(name), Rate.parse(rate)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def key_id(text: str) -> str:
    found = text.removeprefix("apiKeys/")
    if not valid_key_id(found):
        raise argparse.ArgumentTypeError(f"{text!r} is not a key id (12 letters and digits)")
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    create = commands.add_parser(
        "create",
        help="make a key and print it (the only time it is shown)",
        description=f"Make an API key. Scopes: {', '.join(Scope)}.",
    )
    create.add_argument("--name", required=True, help="what the key is for, e.g. 'storefront tracker'")
    create.add_argument(
        "--scope",
        dest="scopes",
        action="append",
        type=scope,
        required=True,
        metavar="SCOPE",
        help="repeatable",
    )
    create.add_argument("--expires-in", type=duration, metavar="DURATION", help="e.g. 90d; default: never")
    create.add_argument(
        "--rate-limit",
        dest="rate_limits",
        action="append",
        type=rate_limit,
        default=[],
        metavar="SCOPE=RATE",
        help="the key's own rate for one of its scopes, e.g. 'events.write=5000/s burst 10000'; repeatable",
    )
    create.add_argument("--quiet", action="store_true", help="print the key only")
    create.set_defaults(handler=_handler(_create))

    listing = commands.add_parser("list", help="list keys, newest first (never the keys themselves)")
    listing.add_argument("--all", action="store_true", help="include revoked and expired keys")
    listing.set_defaults(handler=_handler(_list))

    show = commands.add_parser("show", help="one key's record")
    show.add_argument("key_id", type=key_id, metavar="KEY_ID")
    show.set_defaults(handler=_handler(_show))

    rotate = commands.add_parser(
        "rotate", help="make a new key with the same name and scopes, and end the old one"
    )
    rotate.add_argument("key_id", type=key_id, metavar="KEY_ID")
    rotate.add_argument(
        "--grace",
        type=duration,
        default=timedelta(0),
        metavar="DURATION",
        help="how long the old key keeps working",
    )
    rotate.set_defaults(handler=_handler(_rotate))

    revoke = commands.add_parser("revoke", help="end a key now (every replica within seconds)")
    revoke.add_argument("key_id", type=key_id, metavar="KEY_ID")
    revoke.set_defaults(handler=_handler(_revoke))

    limits = commands.add_parser(
        "rate-limit",
        help="set a key's own rate limits, replacing the ones it had (every replica within seconds)",
        description=(
            "Give a key its own rate for some of its scopes, in place of the services' defaults "
            "(docs/limits.md). RATE: '5000/s', '60/min' or '100/h', optionally followed by 'burst N'."
        ),
    )
    limits.add_argument("key_id", type=key_id, metavar="KEY_ID")
    limits.add_argument("rate_limits", nargs="*", type=rate_limit, metavar="SCOPE=RATE")
    limits.add_argument(
        "--defaults", action="store_true", help="drop the key's own limits: the defaults again"
    )
    limits.set_defaults(handler=_handler(_rate_limit))


Action = Callable[[argparse.Namespace, KeyStore, AuditTrail, str], Awaitable[int]]


def _handler(action: Action) -> Callable[[argparse.Namespace], int]:
    def handle(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(_run(action, args))
        except (OSError, asyncpg.PostgresError) as exc:
            print(f"sendtime keys: {exc}", file=sys.stderr)
            return 1

    return handle


async def _run(action: Action, args: argparse.Namespace) -> int:
    pool = await asyncpg.create_pool(
        env_str(os.environ, "DATABASE_URL", DEFAULT_DATABASE_URL), min_size=1, max_size=1
    )
    try:
        store = KeyStore(pool)
        await store.migrate()
        return await action(args, store, AuditTrail(pool, "cli"), f"cli:{getpass.getuser()}")
    finally:
        await pool.close()


def _describe(record: ApiKeyRecord) -> str:
    now = datetime.now(UTC)

    def when(at: datetime | None) -> str:
        return at.isoformat(timespec="seconds") if at else "-"

    own = "; ".join(f"{scope.value} {rate}" for scope, rate in sorted(record.rate_limits.items()))
    return "\n".join(
        [
            f"key id:    {record.key_id}",
            f"name:      {record.display_name}",
            f"scopes:    {', '.join(sorted(record.scopes))}",
            f"limits:    {own or 'the defaults'}",
            f"state:     {record.state(now).value}",
            f"creator:   {record.creator}",
            f"created:   {when(record.created_at)}",
            f"expires:   {when(record.expires_at)}",
            f"revoked:   {when(record.revoked_at)}",
            f"last used: {when(record.last_used_at)}",
            *([f"replaces:  {record.rotated_from}"] if record.rotated_from else []),
        ]
    )


def _own_limits(pairs: Sequence[tuple[Scope, Rate]], scopes: Iterable[Scope]) -> Mapping[Scope, Rate] | str:
    """The rate limits given, one per scope, each for one of the key's ``scopes``; or what is
    wrong with them."""
    held, limits = frozenset(scopes), {}
    for scope, rate in pairs:
        if scope not in held:
            return f"{scope.value} is not one of the key's scopes ({', '.join(sorted(held))})"
        if scope in limits:
            return f"{scope.value} has two rate limits"
        limits[scope] = rate
    return limits


async def _create(args: argparse.Namespace, store: KeyStore, audit: AuditTrail, who: str) -> int:
    expires_at = datetime.now(UTC) + args.expires_in if args.expires_in else None
    limits = _own_limits(args.rate_limits, args.scopes)
    if isinstance(limits, str):
        print(f"sendtime keys: --rate-limit: {limits}", file=sys.stderr)
        return 1
    record, key = await store.create(args.name, args.scopes, who, expires_at, limits)
    await audit.record(who, "sendtime keys create", args.name, "OK")
    if args.quiet:
        print(key)
    else:
        print(f"{_describe(record)}\n\nThe key (shown only now; send it as 'authorization: Bearer <key>'):")
        print(key)
    return 0


async def _list(args: argparse.Namespace, store: KeyStore, audit: AuditTrail, who: str) -> int:
    now = datetime.now(UTC)
    rows = [("KEY ID", "STATE", "NAME", "SCOPES", "CREATED", "LAST USED")]
    after = None
    while True:
        page = await store.page(500, after, include_inactive=args.all, now=now)
        rows += [
            (
                r.key_id,
                r.state(now).value,
                r.display_name,
                ",".join(sorted(r.scopes)),
                r.created_at.date().isoformat(),
                r.last_used_at.isoformat(timespec="minutes") if r.last_used_at else "-",
            )
            for r in page
        ]
        if len(page) < 500:
            break
        after = (page[-1].created_at, page[-1].key_id)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


async def _show(args: argparse.Namespace, store: KeyStore, audit: AuditTrail, who: str) -> int:
    record = await store.get(args.key_id)
    if record is None:
        print(f"sendtime keys: no key {args.key_id}", file=sys.stderr)
        return 1
    print(_describe(record))
    return 0


async def _rotate(args: argparse.Namespace, store: KeyStore, audit: AuditTrail, who: str) -> int:
    target = f"apiKeys/{args.key_id}"
    try:
        new, key, old = await store.rotate(args.key_id, args.grace, who, datetime.now(UTC))
    except KeyNotFound:
        print(f"sendtime keys: no key {args.key_id}", file=sys.stderr)
        return 1
    except KeyNotActive as exc:
        await audit.record(who, "sendtime keys rotate", target, "FAILED_PRECONDITION")
        print(f"sendtime keys: {args.key_id} cannot be rotated: {exc}", file=sys.stderr)
        return 1
    await audit.record(who, "sendtime keys rotate", target, "OK")
    ends = (
        f"expires {old.expires_at.isoformat(timespec='seconds')}"
        if old.expires_at and not old.revoked_at
        else "revoked"
    )
    print(f"{_describe(new)}\n\nold key {old.key_id}: {ends}")
    print(f"\nThe new key (shown only now):\n{key}")
    return 0


async def _revoke(args: argparse.Namespace, store: KeyStore, audit: AuditTrail, who: str) -> int:
    try:
        record = await store.revoke(args.key_id, datetime.now(UTC))
    except KeyNotFound:
        print(f"sendtime keys: no key {args.key_id}", file=sys.stderr)
        return 1
    await audit.record(who, "sendtime keys revoke", f"apiKeys/{args.key_id}", "OK")
    print(_describe(record))
    return 0


async def _rate_limit(args: argparse.Namespace, store: KeyStore, audit: AuditTrail, who: str) -> int:
    if bool(args.rate_limits) == args.defaults:
        print("sendtime keys rate-limit: give SCOPE=RATE limits, or --defaults", file=sys.stderr)
        return 1
    record = await store.get(args.key_id)
    if record is None:
        print(f"sendtime keys: no key {args.key_id}", file=sys.stderr)
        return 1
    limits = _own_limits(args.rate_limits, record.scopes)
    if isinstance(limits, str):
        print(f"sendtime keys rate-limit: {limits}", file=sys.stderr)
        return 1
    try:
        record = await store.set_rate_limits(args.key_id, limits)
    except KeyNotFound:
        print(f"sendtime keys: no key {args.key_id}", file=sys.stderr)
        return 1
    await audit.record(who, "sendtime keys rate-limit", f"apiKeys/{args.key_id}", "OK")
    print(_describe(record))
    return 0
