"""NATS users for the Sendtime services, each with only the permissions it needs.

- **ingest** publishes events (``sendtime.events.>``), reads one back by its position (the first
  of two events under one id, to tell a resend from an idempotency conflict) and follows
  erasure notices.
- **profile** makes the three streams, reads events through its durable consumers (one per lane of
  the stream: ``profile-merger``, and ``profile-merger-<n>`` for each partition), publishes
  erasure notices and profile changes (``sendtime.profile_changes.>``), and deletes an erased
  person's events from the stream.
- **render** reads events through its catalog consumer and follows erasure notices.
- **triggers** reads the profile change stream through its durable consumer
  (``triggers-changes``) and follows erasure notices; it publishes nothing.
- **sync** reads the profile change stream through its durable consumer (``sync-changes``, for
  its push connectors) and follows erasure notices; it publishes nothing (pulled records reach
  the event log through ingest, as anyone's).

Nobody else may publish an event, so nothing reaches the merger without ingest's validation.
Each user may subscribe only to its own inboxes (``_INBOX_<user>.>``; the services connect
with that inbox prefix), so one service cannot read another's replies or deliveries. No user may
delete or purge a stream or another service's consumer.

``devstack`` writes these users into the local NATS configuration; deploy/nats/ holds the same
permissions for a cluster (``python scripts/nats_auth.py`` prints them), and
tests/test_nats_permissions.py runs the services under them and tries what each must not do.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from sendtime_common.event_log import (
    MAX_EVENT_PARTITIONS,
    UNPARTITIONED,
    JetStreamSettings,
    inbox_prefix,
    partition_consumer,
)

SERVICES = ("ingest", "profile", "render", "triggers", "sync")
API = "$JS.API"


@dataclass(frozen=True, slots=True)
class NatsNames:
    """The streams, subjects and durable consumers the services use (their settings' defaults)."""

    events_stream: str = JetStreamSettings().stream
    erasure_stream: str = JetStreamSettings().erasure_stream
    subject_prefix: str = JetStreamSettings().subject_prefix
    erasure_subject: str = JetStreamSettings().erasure_subject
    profile_change_stream: str = JetStreamSettings().profile_change_stream
    profile_change_subject_prefix: str = JetStreamSettings().profile_change_subject_prefix
    merger_consumer: str = "profile-merger"
    # Partitions whose consumers profile may use: as many as NATS_EVENT_PARTITIONS may ask for,
    # so that growing it needs no change here.
    event_partitions: int = MAX_EVENT_PARTITIONS
    catalog_consumer: str = "render-catalog"
    changes_consumer: str = "triggers-changes"
    sync_changes_consumer: str = "sync-changes"


def user_name(service: str) -> str:
    return f"sendtime-{service}"


def _durable(stream: str, consumer: str) -> list[str]:
    """Create (either API), read and pull from one durable consumer, and ack its messages."""
    return [
        f"{API}.CONSUMER.CREATE.{stream}.{consumer}",
        f"{API}.CONSUMER.CREATE.{stream}.{consumer}.>",
        f"{API}.CONSUMER.DURABLE.CREATE.{stream}.{consumer}",
        f"{API}.CONSUMER.INFO.{stream}.{consumer}",
        f"{API}.CONSUMER.MSG.NEXT.{stream}.{consumer}",
        f"$JS.ACK.{stream}.{consumer}.>",
    ]


def _follow_erasures(names: NatsNames) -> list[str]:
    """An ordered (ephemeral) consumer on the erasure stream, recreated after a gap."""
    stream = names.erasure_stream
    return [
        f"{API}.STREAM.INFO.{names.events_stream}",
        f"{API}.STREAM.INFO.{stream}",
        f"{API}.CONSUMER.CREATE.{stream}",
        f"{API}.CONSUMER.CREATE.{stream}.>",
        f"{API}.CONSUMER.INFO.{stream}.>",
        f"{API}.CONSUMER.DELETE.{stream}.>",
        "$JS.FC.>",  # flow-control replies of push consumers
    ]


def permissions(service: str, names: NatsNames = NatsNames()) -> dict[str, dict[str, list[str]]]:
    """The NATS permissions of ``service``'s user."""
    publish = _follow_erasures(names)
    if service == "ingest":
        publish += [f"{names.subject_prefix}.>", f"{API}.STREAM.MSG.GET.{names.events_stream}"]
    elif service == "profile":
        publish += [
            *(
                f"{API}.STREAM.{verb}.{stream}"
                for verb in ("CREATE", "UPDATE")
                for stream in (names.events_stream, names.erasure_stream, names.profile_change_stream)
            ),
            f"{API}.STREAM.MSG.DELETE.{names.events_stream}",  # an erased person's events
            names.erasure_subject,
            f"{API}.STREAM.INFO.{names.profile_change_stream}",
            f"{names.profile_change_subject_prefix}.>",
            *(
                permission
                for lane in (UNPARTITIONED, *range(names.event_partitions))
                for permission in _durable(
                    names.events_stream, partition_consumer(names.merger_consumer, lane)
                )
            ),
        ]
    elif service == "render":
        publish += _durable(names.events_stream, names.catalog_consumer)
    elif service == "triggers":
        publish += [
            f"{API}.STREAM.INFO.{names.profile_change_stream}",
            *_durable(names.profile_change_stream, names.changes_consumer),
        ]
    elif service == "sync":
        publish += [
            f"{API}.STREAM.INFO.{names.profile_change_stream}",
            *_durable(names.profile_change_stream, names.sync_changes_consumer),
        ]
    else:
        raise ValueError(f"no such service {service!r}")
    return {
        "publish": {"allow": publish},
        "subscribe": {"allow": [f"{inbox_prefix(user_name(service))}.>"]},
    }


def authorization(passwords: Mapping[str, str], names: NatsNames = NatsNames()) -> dict[str, object]:
    """The ``authorization`` block of a nats-server configuration: one user per service in
    ``passwords`` (service name: password, or a bcrypt hash of it)."""
    return {
        "users": [
            {"user": user_name(service), "password": password, "permissions": permissions(service, names)}
            for service, password in passwords.items()
        ]
    }


def config_block(passwords: Mapping[str, str], names: NatsNames = NatsNames()) -> str:
    """``authorization: {...}`` for a nats-server configuration file (which reads JSON)."""
    return "authorization: " + json.dumps(authorization(passwords, names), indent=2)


def deploy_block() -> str:
    """The block deploy/nats/ holds: passwords are references to environment variables of the
    NATS servers (bcrypt hashes from `nats server passwd`), which nats-server resolves."""
    variables = {service: f"SENDTIME_{service.upper()}_NATS_PASSWORD_BCRYPT" for service in SERVICES}
    block = config_block({service: f"${name}" for service, name in variables.items()})
    for name in variables.values():
        block = block.replace(f'"${name}"', f"${name}")
    return block


if __name__ == "__main__":
    sys.stdout.write(deploy_block() + "\n")
