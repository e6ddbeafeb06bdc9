"""The delivery log as the dispatcher sees it: what it records of each attempt and what it
decides, behind a Protocol that a PostgreSQL log will implement, and an in-memory one.

Each method is one transaction of that log. ``record_attempt`` appends the attempt and updates
the destination's health in one (it answers with the health, so the dispatcher can decide on
disabling without another round trip).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from google.protobuf import duration_pb2, timestamp_pb2

from sendtime.triggers.v1 import triggers_pb2
from triggers.retry_schedule import FailureReason


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One attempt: when it started, how long it took, the answer's status (0: none) and, when
    there was no answer, why (a timeout, a refused connection)."""

    start_time: datetime
    latency: timedelta
    http_status: int = 0
    error: str = ""

    @property
    def succeeded(self) -> bool:
        return 200 <= self.http_status < 300

    def to_proto(self) -> triggers_pb2.DeliveryAttempt:
        start = timestamp_pb2.Timestamp()
        start.FromDatetime(self.start_time)
        latency = duration_pb2.Duration()
        latency.FromTimedelta(self.latency)
        return triggers_pb2.DeliveryAttempt(
            start_time=start, latency=latency, http_status=self.http_status, error=self.error
        )


@dataclass(frozen=True, slots=True)
class DestinationHealth:
    """A destination's record of success: when an attempt last succeeded, and when the failures
    since began (``None`` while the last attempt succeeded, and before any attempt).

    Enabling a destination again must clear ``failing_since``, or the next failure would
    disable it at once.
    """

    last_success_time: datetime | None = None
    failing_since: datetime | None = None

    def after(self, attempt: AttemptRecord) -> DestinationHealth:
        """This health once ``attempt`` is recorded."""
        if attempt.succeeded:
            return DestinationHealth(last_success_time=attempt.start_time, failing_since=None)
        return DestinationHealth(self.last_success_time, self.failing_since or attempt.start_time)


class DeliveryLogError(Exception):
    """The log could not be written (its store is unavailable); the dispatcher tries again later."""


class DeliveryLog(Protocol):
    """Where the dispatcher records attempts and outcomes. Deliveries and destinations are named
    as in the contracts (``deliveries/{id}``, ``destinations/{id}``)."""

    async def record_attempt(
        self, delivery: str, destination: str, attempt: AttemptRecord
    ) -> DestinationHealth:
        """Append ``attempt`` to the delivery's attempts and update the destination's health.

        Raises:
            DeliveryLogError: not recorded.
        """
        ...

    async def schedule_next(self, delivery: str, next_attempt_time: datetime) -> None:
        """The delivery stays pending; its next attempt is due at ``next_attempt_time``.

        Raises:
            DeliveryLogError: not recorded.
        """
        ...

    async def mark_delivered(self, delivery: str) -> None:
        """Raises:
        DeliveryLogError: not recorded.
        """
        ...

    async def mark_failed(self, delivery: str, reason: FailureReason) -> None:
        """Raises:
        DeliveryLogError: not recorded.
        """
        ...

    async def disable_destination(self, destination: str, reason: str) -> None:
        """Disable the destination, with ``reason`` as its ``disabled_reason``; its pending
        deliveries stay pending.

        Raises:
            DeliveryLogError: not recorded.
        """
        ...


@dataclass(slots=True)
class _DeliveryEntry:
    destination: str
    state: triggers_pb2.DeliveryState.ValueType = triggers_pb2.DELIVERY_STATE_PENDING
    attempts: list[AttemptRecord] = field(default_factory=list)
    next_attempt_time: datetime | None = None
    failure: FailureReason | None = None


class MemoryDeliveryLog:
    """A ``DeliveryLog`` in process memory, until the service has its database; lost on exit."""

    def __init__(self) -> None:
        self._deliveries: dict[str, _DeliveryEntry] = {}
        self._health: dict[str, DestinationHealth] = {}
        self._disabled: dict[str, str] = {}

    async def record_attempt(
        self, delivery: str, destination: str, attempt: AttemptRecord
    ) -> DestinationHealth:
        entry = self._deliveries.setdefault(delivery, _DeliveryEntry(destination))
        entry.attempts.append(attempt)
        health = self._health.get(destination, DestinationHealth()).after(attempt)
        self._health[destination] = health
        return health

    async def schedule_next(self, delivery: str, next_attempt_time: datetime) -> None:
        self._entry(delivery).next_attempt_time = next_attempt_time

    async def mark_delivered(self, delivery: str) -> None:
        entry = self._entry(delivery)
        entry.state = triggers_pb2.DELIVERY_STATE_DELIVERED
        entry.next_attempt_time = None

    async def mark_failed(self, delivery: str, reason: FailureReason) -> None:
        entry = self._entry(delivery)
        entry.state = triggers_pb2.DELIVERY_STATE_FAILED
        entry.next_attempt_time = None
        entry.failure = reason

    async def disable_destination(self, destination: str, reason: str) -> None:
        self._disabled[destination] = reason

    def enable_destination(self, destination: str) -> None:
        """Enabled again: not disabled, and its failures so far no longer count."""
        self._disabled.pop(destination, None)
        health = self._health.get(destination)
        if health is not None:
            self._health[destination] = DestinationHealth(health.last_success_time, None)

    def attempts(self, delivery: str) -> list[AttemptRecord]:
        """The delivery's attempts, oldest first."""
        entry = self._deliveries.get(delivery)
        return list(entry.attempts) if entry else []

    def state(self, delivery: str) -> triggers_pb2.DeliveryState.ValueType:
        """PENDING until an attempt is recorded, then as recorded."""
        entry = self._deliveries.get(delivery)
        return entry.state if entry else triggers_pb2.DELIVERY_STATE_PENDING

    def next_attempt_time(self, delivery: str) -> datetime | None:
        entry = self._deliveries.get(delivery)
        return entry.next_attempt_time if entry else None

    def failure(self, delivery: str) -> FailureReason | None:
        entry = self._deliveries.get(delivery)
        return entry.failure if entry else None

    def disabled_reason(self, destination: str) -> str | None:
        """Why the destination was disabled; ``None`` while it is enabled."""
        return self._disabled.get(destination)

    def health(self, destination: str) -> DestinationHealth:
        return self._health.get(destination, DestinationHealth())

    def _entry(self, delivery: str) -> _DeliveryEntry:
        entry = self._deliveries.get(delivery)
        if entry is None:
            raise KeyError(f"{delivery} has no recorded attempt")
        return entry
