"""A connector's status as the API reports it (pure): its configuration and its stored state."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2

from sendtime.sync.v1 import sync_pb2
from sync.connectors import ConnectorConfig, ConnectorKind
from sync.push import PendingSummary
from sync.store import ConnectorState

NAME_PREFIX = "connectors/"
KIND_TO_PROTO: Mapping[ConnectorKind, sync_pb2.ConnectorKind.ValueType] = {
    ConnectorKind.HUBSPOT_CONTACTS: sync_pb2.CONNECTOR_KIND_HUBSPOT_CONTACTS,
    ConnectorKind.MAILCHIMP_MEMBERS: sync_pb2.CONNECTOR_KIND_MAILCHIMP_MEMBERS,
    ConnectorKind.SENDGRID_SUPPRESSIONS: sync_pb2.CONNECTOR_KIND_SENDGRID_SUPPRESSIONS,
    ConnectorKind.BRAZE_PUSH: sync_pb2.CONNECTOR_KIND_BRAZE_PUSH,
    ConnectorKind.MAILCHIMP_PUSH: sync_pb2.CONNECTOR_KIND_MAILCHIMP_PUSH,
    ConnectorKind.SENDGRID_PUSH: sync_pb2.CONNECTOR_KIND_SENDGRID_PUSH,
}


def connector_name(connector_id: str) -> str:
    return f"{NAME_PREFIX}{connector_id}"


def cursor_time(kind: ConnectorKind, cursor: Any) -> datetime | None:
    """The time of the newest change a connector has handed on, from its cursor; None before
    its first page (or a cursor that names no time)."""
    if not isinstance(cursor, dict):
        return None
    seconds: float | None = None
    if kind == ConnectorKind.HUBSPOT_CONTACTS and isinstance(cursor.get("lastmodified_ms"), int):
        seconds = cursor["lastmodified_ms"] / 1000
    elif kind == ConnectorKind.MAILCHIMP_MEMBERS and isinstance(cursor.get("last_changed_s"), int):
        seconds = float(cursor["last_changed_s"])
    elif kind == ConnectorKind.SENDGRID_SUPPRESSIONS:
        ends = [v for v in cursor.values() if isinstance(v, int)]
        seconds = float(min(ends)) if ends else None  # the list furthest behind
    # 0: the cursor of a connector that has handed nothing on yet (an empty first run).
    return None if not seconds else datetime.fromtimestamp(seconds, UTC)


def connector_state(state: ConnectorState) -> sync_pb2.ConnectorState.ValueType:
    ended = [t for t in (state.last_success_at, state.last_failure_at) if t is not None]
    if state.last_run_started_at is not None and (not ended or state.last_run_started_at > max(ended)):
        return sync_pb2.CONNECTOR_STATE_RUNNING
    if state.consecutive_failures:
        return sync_pb2.CONNECTOR_STATE_FAILING
    return sync_pb2.CONNECTOR_STATE_WAITING


def connector_status(
    config: ConnectorConfig, state: ConnectorState, now: datetime, waiting: PendingSummary | None = None
) -> sync_pb2.ConnectorStatus:
    """``waiting``: a push connector's pending customers (its lag is the oldest one's)."""
    status = sync_pb2.ConnectorStatus(
        name=connector_name(config.connector_id),
        kind=KIND_TO_PROTO[config.kind],
        state=connector_state(state),
        interval=_duration(timedelta(seconds=config.interval_s)),
        last_error=state.last_error,
        consecutive_failures=state.consecutive_failures,
        records_total=state.records_total,
        events_total=state.events_total,
        rejected_total=state.rejected_total,
        items_pushed_total=state.items_pushed_total,
        items_refused_total=state.items_refused_total,
    )
    for name, at in (
        ("last_success_time", state.last_success_at),
        ("last_failure_time", state.last_failure_at),
        ("next_run_time", state.next_run_at),
    ):
        if at is not None:
            getattr(status, name).CopyFrom(_timestamp(at))
    if waiting is not None:
        status.items_pending = waiting.count
        oldest = waiting.oldest or now
        status.lag.CopyFrom(_duration(max(timedelta(0), now - oldest)))
        return status
    newest = cursor_time(config.kind, state.cursor)
    if newest is not None:
        status.lag.CopyFrom(_duration(max(timedelta(0), now - newest)))
    return status


def _timestamp(at: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(at)
    return stamp


def _duration(span: timedelta) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(span)
    return duration
