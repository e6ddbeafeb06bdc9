"""``python -m sendtime_cli COMMAND ...`` (what ``bin/sendtime`` runs)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from sendtime_cli import database, importer, keys, profiles, setup, triggers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sendtime",
        description=(
            "Sendtime operator tools: `import` talks to ingest over gRPC; `profile rebuild` and `keys` "
            "work on the database (DATABASE_URL)."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    importer.add_arguments(
        commands.add_parser(
            "import",
            help="bulk-load events from a JSONL or CSV file into ingest (resumable)",
            description=(
                "Bulk-load events into ingest (IngestService/SendEvents), resumably: a checkpoint "
                "next to the file records how far the import got. Exit codes: 0 every line accepted "
                "or duplicate, 2 some lines rejected, 1 error, 130 interrupted. See docs/import.md."
            ),
        )
    )
    profiles.add_arguments(
        commands.add_parser(
            "profile", help="profile maintenance: rebuild", description="Profile maintenance."
        )
    )
    keys.add_arguments(
        commands.add_parser(
            "keys",
            help="API keys: create, list, show, rotate, revoke",
            description="API keys, made and ended in the database (DATABASE_URL). See docs/security.md.",
        )
    )
    triggers.add_arguments(
        commands.add_parser(
            "triggers",
            help="the ready-made triggers: list, create",
            description="The ready-made triggers (cart abandoned, browse abandoned, order completed), "
            "created in the triggers service over gRPC. See docs/triggers.md.",
        )
    )
    database.add_arguments(
        commands.add_parser(
            "database",
            help="database administration: roles",
            description="Database administration (DATABASE_URL, as an administrator).",
        )
    )
    setup.add_arguments(
        commands.add_parser(
            "setup",
            help="the shared setup: every service's migrations and the JetStream streams",
            description=(
                "Apply every service's migrations (each as its own role where `sendtime database roles` "
                "made them; DATABASE_URL as an administrator) and make or update the JetStream streams "
                "(NATS_URL, NATS_USER, NATS_PASSWORD, NATS_*). Idempotent; deploy runs it as a Job. "
                "See deploy/README.md."
            ),
        )
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code == 2:  # a usage error: 1, as 2 means "some lines were rejected"
            return 1
        raise
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
