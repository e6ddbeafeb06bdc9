"""``sendtime triggers``: the ready-made triggers (triggers.builtin), listed and created in the
triggers service over gRPC (TriggerService/CreateTrigger), so that a cart reminder takes one
command rather than a hand-written Trigger.

    sendtime triggers ready-made
    sendtime triggers create cart-abandoned --destination destinations/esp --template templates/abandoned-cart

The call carries SENDTIME_API_KEY (or the file SENDTIME_API_KEY_FILE), a key with the scope
triggers.write; TLS trusts --cacert ($SENDTIME_CA_FILE). Exit codes: 0 created, 1 refused or
failed (the status and its field violations are printed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from datetime import timedelta
from typing import Final

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from sendtime.triggers.v1 import triggers_pb2, triggers_pb2_grpc
from sendtime_common.auth.client import authenticated_channel
from sendtime_common.config import secret_from_env
from sendtime_common.tls import ClientTls
from triggers.builtin import (
    BROWSE_ABANDONED,
    CART_ABANDONED,
    ORDER_COMPLETED,
    browse_abandoned,
    cart_abandoned,
    order_completed,
)

DEFAULT_TARGET: Final = "localhost:50054"
SUMMARIES: Final = {
    CART_ABANDONED: "a cart item added, no checkout or order within 1 h, the cart still full (12 h cooldown)",
    BROWSE_ABANDONED: "a product viewed, not added to the cart nor ordered within 2 h (once a week)",
    ORDER_COMPLETED: "an order completed: at once, once per order id",
}
_DURATION = re.compile(r"^(\d+)(s|m|h|d)$")
_UNITS: Final = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``1h``, ``7d``."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration like 90s, 30m, 1h or 7d: {text!r}")
    return timedelta(**{_UNITS[match[2]]: int(match[1])})


def ready_made(
    name: str,
    destinations: list[str],
    template: str,
    delay: timedelta | None,
    cooldown: timedelta | None,
) -> triggers_pb2.Trigger:
    """The ready-made trigger ``name`` for ``destinations``, with ``delay`` and ``cooldown`` in
    place of its own where given.

    Raises:
        ValueError: ``order-completed`` fires at once and has no cooldown to change.
    """
    if name == ORDER_COMPLETED:
        if delay is not None or cooldown is not None:
            raise ValueError(
                "order-completed fires at once, once per order: it takes no --delay or --cooldown"
            )
        return order_completed(destinations, template)
    make = cart_abandoned if name == CART_ABANDONED else browse_abandoned
    options = {k: v for k, v in (("delay", delay), ("cooldown", cooldown)) if v is not None}
    return make(destinations, template, **options)


def describe_error(error: grpc.aio.AioRpcError) -> str:
    """The status and, when the answer carries them, its field violations, one per line."""
    lines = [f"{error.code().name}: {error.details()}"]
    status = rpc_status.from_call(error)  # type: ignore[arg-type]  # an aio error is a grpc.Call
    for detail in status.details if status is not None else ():
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            lines += [f"  {v.field}: {v.description}" for v in bad.field_violations]
    return "\n".join(lines)


async def _create(args: argparse.Namespace, key: str, trigger: triggers_pb2.Trigger) -> int:
    tls = ClientTls(ca_file=str(args.cacert or ""), plaintext=args.plaintext)
    async with authenticated_channel(args.target, key, tls) as channel:
        stub = triggers_pb2_grpc.TriggerServiceStub(channel)
        try:
            created = await stub.CreateTrigger(
                triggers_pb2.CreateTriggerRequest(
                    trigger_id=args.id or args.name, trigger=trigger, paused=args.paused
                ),
                timeout=args.timeout,
            )
        except grpc.aio.AioRpcError as exc:
            print(describe_error(exc), file=sys.stderr)
            return 1
    print(json_format.MessageToJson(created.trigger, preserving_proto_field_name=True))
    return 0


def _run_list(args: argparse.Namespace) -> int:
    for name, summary in SUMMARIES.items():
        print(f"{name:<18}{summary}")
    return 0


def _run_create(args: argparse.Namespace) -> int:
    key = secret_from_env(os.environ, "SENDTIME_API_KEY")
    if not key:
        print("set SENDTIME_API_KEY (or SENDTIME_API_KEY_FILE) to a key with the scope triggers.write",
              file=sys.stderr)  # fmt: skip
        return 1
    try:
        trigger = ready_made(args.name, args.destination, args.template, args.delay, args.cooldown)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    return asyncio.run(_create(args, key, trigger))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="triggers_command", required=True, metavar="COMMAND")
    listing = commands.add_parser("ready-made", help="list the ready-made triggers")
    listing.set_defaults(handler=_run_list)
    create = commands.add_parser(
        "create",
        help="create a ready-made trigger in the triggers service",
        description="Create a ready-made trigger (TriggerService/CreateTrigger); prints it as stored.",
    )
    create.add_argument("name", choices=list(SUMMARIES), help="which ready-made trigger")
    create.add_argument(
        "--destination",
        action="append",
        required=True,
        metavar="destinations/ID",
        help="where its fires go (repeat for several, up to 10)",
    )
    create.add_argument(
        "--template", default="", metavar="templates/ID", help="a stored template rendered at the fire"
    )
    create.add_argument("--id", default="", help="the trigger's id (default: the ready-made name)")
    create.add_argument("--delay", type=duration, help="wait this long instead (e.g. 30m)")
    create.add_argument("--cooldown", type=duration, help="this cooldown instead (e.g. 24h)")
    create.add_argument("--paused", action="store_true", help="create it paused")
    create.add_argument(
        "--target",
        default=os.environ.get("TRIGGERS_TARGET") or DEFAULT_TARGET,
        help=f"the triggers service's address (default: $TRIGGERS_TARGET or {DEFAULT_TARGET})",
    )
    create.add_argument(
        "--cacert",
        default=os.environ.get("SENDTIME_CA_FILE") or None,
        metavar="FILE",
        help="the CA certificate that signed the service's certificate (default: $SENDTIME_CA_FILE); "
        "`make run` makes .run/tls/ca.crt",
    )
    create.add_argument("--plaintext", action="store_true", help="talk to a service that serves plaintext")
    create.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS", help="for the call")
    create.set_defaults(handler=_run_create)
