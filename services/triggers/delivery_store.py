"""Deliveries and their attempts in PostgreSQL: the dispatcher's ``DeliveryLog``, and what the
service reads and does with deliveries (ListDeliveries, GetDelivery, Redeliver, subscriptions).

Deliveries are made by a fire, in the fire's transaction (EpisodeStore.commit_fires), one per
destination, each with a ``webhook_id`` it keeps for good (Redeliver too).

**Who attempts a webhook delivery.** Every replica runs a dispatcher; a pending delivery is
held by at most one of them at a time through a lease: ``claimed_by`` names the holder and
``available_at`` is when the lease ends (while nobody holds it, ``available_at`` is its next
attempt time). The firing replica holds the deliveries its fire made; ``take_due`` gives a
dispatcher the pending deliveries nobody holds that are due within a horizon, and those whose
holder's lease ran out (a replica that died: this is how deliveries survive a restart);
``schedule_next`` extends the holder's lease past the next attempt, and ``renew_leases``
extends those the holder's dispatcher holds in memory at once (a heartbeat, for deliveries a
disabled destination or a full backlog keeps waiting; one leased but lost track of lapses). A
lapsed lease can make two replicas attempt the same delivery: a receiver sees the same
``webhook-id`` twice and drops one, as the Standard Webhooks spec asks
of it. Nothing is lost: a delivery stays pending until an attempt is recorded as its end.

**Subscriptions.** A subscription's pending deliveries are read in order of creation by
``take_for_subscription``, which marks them sent and makes them available again at the ack
deadline (``sent_at``, ``next_attempt_time``); ``acknowledge`` makes them DELIVERED. A
delivery not acknowledged by its deadline is taken again, by this stream or another.

Every DeliveryLog method is one statement and turns a PostgreSQL failure into
``DeliveryLogError``; a record for a delivery that no longer exists (its destination was
deleted, its customer erased) changes nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import asyncpg
import orjson

from sendtime.triggers.v1 import triggers_pb2
from sendtime_common.batching import MicroBatcher
from sendtime_common.paging import decode_time_position, encode_time_position
from sendtime_common.resource_names import numeric_id
from triggers.delivery_log import AttemptRecord, DeliveryLogError, DestinationHealth
from triggers.destination_store import destination_name, parse_destination_name
from triggers.retry_schedule import FailureReason
from triggers.store import NotFound, StoreError, new_etag
from triggers.trigger_validation import trigger_name

NAME_PREFIX: Final = "deliveries/"
_MAX_REMEMBERED: Final = 10_000
DEFAULT_LEASE: Final = timedelta(minutes=1)
MAX_ERROR_CHARS: Final = 1024
PENDING: Final = triggers_pb2.DELIVERY_STATE_PENDING
DELIVERED: Final = triggers_pb2.DELIVERY_STATE_DELIVERED
FAILED: Final = triggers_pb2.DELIVERY_STATE_FAILED

COLUMNS: Final = (
    "id, destination_id, webhook_id, trigger_id, customer_id, episode_key, state, payload,"
    " next_attempt_time, created_at"
)


def delivery_name(delivery_id: int) -> str:
    return f"{NAME_PREFIX}{delivery_id}"


def parse_delivery_name(name: str) -> int:
    """The id in ``deliveries/{id}``.

    Raises:
        sendtime_common.resource_names.InvalidName: another shape.
    """
    return numeric_id(name, NAME_PREFIX)


@dataclass(frozen=True, slots=True)
class _Recorded:
    delivery_id: int
    destination_id: str
    attempt: AttemptRecord


_RECORDS_TOGETHER = 200
_DEADLOCK_TRIES = 5

# The attempts in $1..$7 (arrays, one element per attempt, in the order made): each delivery
# counts and appends its attempt (a 2xx ends it DELIVERED), and each destination's health
# becomes what its attempts in that order make of it (DeliveryLog's rule, DestinationHealth.after).
_RECORD_ATTEMPTS = f"""
WITH made AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::interval[], $5::int[],
                         $6::text[], $7::bool[])
        WITH ORDINALITY AS m(delivery_id, destination_id, start_time, latency, http_status, error,
                             succeeded, n)
), counted AS (
    UPDATE triggers_deliveries d SET attempts = d.attempts + 1,
        state = CASE WHEN m.succeeded THEN {DELIVERED} ELSE d.state END,
        failure_reason = CASE WHEN m.succeeded THEN '' ELSE d.failure_reason END,
        next_attempt_time = CASE WHEN m.succeeded THEN NULL ELSE d.next_attempt_time END,
        available_at = CASE WHEN m.succeeded THEN NULL ELSE d.available_at END,
        claimed_by = CASE WHEN m.succeeded THEN NULL ELSE d.claimed_by END
    FROM made m WHERE d.id = m.delivery_id
    RETURNING d.id, d.attempts
), appended AS (
    INSERT INTO triggers_delivery_attempts (delivery_id, attempt, start_time, latency, http_status, error)
    SELECT c.id, c.attempts, m.start_time, m.latency, m.http_status, m.error
    FROM counted c JOIN made m ON m.delivery_id = c.id
), last_success AS (
    SELECT DISTINCT ON (destination_id) destination_id, start_time, n
    FROM made WHERE succeeded ORDER BY destination_id, n DESC
), health AS (
    SELECT m.destination_id, s.start_time AS success_time,
        min(m.start_time) FILTER (WHERE NOT m.succeeded AND m.n > coalesce(s.n, 0)) AS failure_time
    FROM made m LEFT JOIN last_success s USING (destination_id)
    GROUP BY m.destination_id, s.start_time
)
UPDATE triggers_destinations t SET
    last_success_time = coalesce(h.success_time, t.last_success_time),
    failing_since = CASE WHEN h.success_time IS NOT NULL THEN h.failure_time
                         ELSE coalesce(t.failing_since, h.failure_time) END
FROM health h WHERE t.id = h.destination_id
RETURNING t.id, t.last_success_time, t.failing_since
"""


class DeliveryStore:
    """The delivery log of one dispatcher (``owner``: this replica, unique among the running
    ones), and the service's reads and writes of deliveries."""

    def __init__(self, pool: asyncpg.Pool, *, owner: str, lease: timedelta = DEFAULT_LEASE) -> None:
        """``lease``: how long past a delivery's next attempt this dispatcher holds it; after
        that, without a renewal, another may take it."""
        self._pool = pool
        self._owner = owner
        self._lease = lease
        # Deliveries a 2xx attempt's record ended DELIVERED, whose mark_delivered is not due yet.
        self._delivered_by_record: set[str] = set()
        self._records: MicroBatcher[_Recorded, DestinationHealth] = MicroBatcher(
            self._record_together, max_batch=_RECORDS_TOGETHER, max_concurrent_batches=2
        )

    @property
    def owner(self) -> str:
        return self._owner

    # ---- DeliveryLog --------------------------------------------------------------------------

    async def record_attempt(
        self, delivery: str, destination: str, attempt: AttemptRecord
    ) -> DestinationHealth:
        """Append ``attempt`` (numbered after the delivery's others) and update the destination's
        health; the health after it. A 2xx attempt also ends the delivery DELIVERED in the same
        statement (every 2xx does: retry_schedule.classify), so the ``mark_delivered`` that
        follows it costs no second round trip. The attempts recorded at the same moment share
        one statement (one round trip, one commit): at a thousand webhooks a second this was
        the dispatcher's largest cost in PostgreSQL.

        Raises:
            DeliveryLogError: not recorded.
        """
        try:
            health = await self._records.submit(
                _Recorded(parse_delivery_name(delivery), parse_destination_name(destination), attempt)
            )
        except StoreError as exc:
            raise DeliveryLogError(str(exc)) from exc
        if attempt.succeeded:
            if len(self._delivered_by_record) >= _MAX_REMEMBERED:
                self._delivered_by_record.clear()  # then mark_delivered writes again: harmless
            self._delivered_by_record.add(delivery)
        return health

    async def _record_together(self, records: list[_Recorded]) -> list[DestinationHealth]:
        """One statement for many attempts. A destination's health after the batch is what its
        attempts in batch order make of it: the last success, and the first failure after it
        (or, without a success, the failures' start unless they had begun already). Every
        attempt gets its destination's health after the batch: the newest known."""
        arguments = (
            [r.delivery_id for r in records],
            [r.destination_id for r in records],
            [r.attempt.start_time for r in records],
            [r.attempt.latency for r in records],
            [r.attempt.http_status for r in records],
            [r.attempt.error[:MAX_ERROR_CHARS] for r in records],
            [r.attempt.succeeded for r in records],
        )
        for tries_left in reversed(range(_DEADLOCK_TRIES)):
            try:
                rows = await self._pool.fetch(_RECORD_ATTEMPTS, *arguments)
                break
            except asyncpg.DeadlockDetectedError:
                # Two batches updating the same destinations in another order; nothing was
                # written (one statement), so all of it is tried again.
                if not tries_left:
                    raise
        health = {
            row["id"]: DestinationHealth(row["last_success_time"], row["failing_since"]) for row in rows
        }
        # A destination deleted meanwhile has no row: its health is what the attempt alone says.
        return [health.get(r.destination_id) or DestinationHealth().after(r.attempt) for r in records]

    async def schedule_next(self, delivery: str, next_attempt_time: datetime) -> None:
        """The delivery stays pending, due at ``next_attempt_time``, held by this dispatcher until
        ``lease`` after it.

        Raises:
            DeliveryLogError: not recorded.
        """
        await self._log_write(
            "UPDATE triggers_deliveries"
            " SET next_attempt_time = $2, available_at = $2::timestamptz + $3::interval, claimed_by = $4"
            f" WHERE id = $1 AND state = {PENDING}",
            parse_delivery_name(delivery),
            next_attempt_time,
            self._lease,
            self._owner,
        )

    async def mark_delivered(self, delivery: str) -> None:
        """Raises:
        DeliveryLogError: not recorded.
        """
        if delivery in self._delivered_by_record:  # its 2xx attempt's record did it
            self._delivered_by_record.discard(delivery)
            return
        await self._log_write(
            f"UPDATE triggers_deliveries SET state = {DELIVERED}, failure_reason = '',"
            " next_attempt_time = NULL, available_at = NULL, claimed_by = NULL WHERE id = $1",
            parse_delivery_name(delivery),
        )

    async def mark_failed(self, delivery: str, reason: FailureReason) -> None:
        """Raises:
        DeliveryLogError: not recorded.
        """
        await self._log_write(
            f"UPDATE triggers_deliveries SET state = {FAILED}, failure_reason = $2,"
            " next_attempt_time = NULL, available_at = NULL, claimed_by = NULL WHERE id = $1",
            parse_delivery_name(delivery),
            str(reason),
        )

    async def disable_destination(self, destination: str, reason: str) -> None:
        """Disable the destination with ``reason``; its pending deliveries stay pending.

        Raises:
            DeliveryLogError: not recorded.
        """
        await self._log_write(
            f"UPDATE triggers_destinations SET state = {triggers_pb2.DESTINATION_STATE_DISABLED},"
            " disabled_reason = $2, etag = $3, updated_at = now() WHERE id = $1",
            parse_destination_name(destination),
            reason,
            new_etag(),
        )

    async def _log_write(self, statement: str, *args: Any) -> None:
        try:
            await self._pool.execute(statement, *args)
        except StoreError as exc:
            raise DeliveryLogError(str(exc)) from exc

    # ---- the dispatchers' leases -----------------------------------------------------------------

    async def take_due(
        self, now: datetime, *, horizon: timedelta, limit: int, skipping: Collection[str] = ()
    ) -> list[triggers_pb2.Delivery]:
        """Up to ``limit`` pending webhook deliveries of enabled destinations for this dispatcher
        to hold: those nobody holds whose next attempt is due by ``now + horizon``, and those
        whose holder's lease ended by ``now``; earliest first, each with its attempts (so
        ``OutboundDelivery.from_proto`` resumes its schedule). Two dispatchers taking at once
        never take the same delivery. ``skipping``: destination ids whose deliveries are left
        alone (the dispatcher could not hold more of them)."""
        rows = await self._pool.fetch(
            f"""
            WITH c AS (
                SELECT d.id
                FROM triggers_deliveries d
                JOIN triggers_destinations t ON t.id = d.destination_id
                WHERE d.state = {PENDING} AND d.kind = 'webhook'
                  AND d.available_at
                      <= CASE WHEN d.claimed_by IS NULL THEN $2::timestamptz ELSE $1::timestamptz END
                  AND t.state = {triggers_pb2.DESTINATION_STATE_ENABLED}
                  AND d.destination_id <> ALL($6::text[])
                ORDER BY d.available_at
                LIMIT $3
                FOR UPDATE OF d SKIP LOCKED
            )
            UPDATE triggers_deliveries d
            SET claimed_by = $4, available_at = greatest(d.next_attempt_time, $1) + $5
            FROM c WHERE d.id = c.id
            RETURNING {_prefixed("d")}
            """,
            now,
            now + horizon,
            limit,
            self._owner,
            self._lease,
            list(skipping),
        )
        return await with_attempts(self._pool, sorted(rows, key=lambda r: (r["next_attempt_time"], r["id"])))

    async def renew_leases(self, now: datetime, held: Iterable[str]) -> int:
        """Extend the lease of these pending deliveries (``held``: those this dispatcher holds in
        memory) to ``lease`` past their next attempt (or past ``now``); how many. One leased
        here but not held (a fire whose commit's outcome was lost with the connection, so never
        handed over) is not renewed: its lease ends, and a sweep takes it up."""
        status = await self._pool.execute(
            f"UPDATE triggers_deliveries SET available_at = greatest(next_attempt_time, $2) + $3"
            f" WHERE claimed_by = $1 AND state = {PENDING} AND id = ANY($4::bigint[])",
            self._owner,
            now,
            self._lease,
            [parse_delivery_name(name) for name in held],
        )
        return int(status.rpartition(" ")[2])

    async def release(self, deliveries: Iterable[str]) -> int:
        """Stop holding these deliveries (a full backlog refused them): any dispatcher may take
        them at their next attempt time; how many were held."""
        status = await self._pool.execute(
            f"UPDATE triggers_deliveries SET claimed_by = NULL, available_at = next_attempt_time"
            f" WHERE id = ANY($1::bigint[]) AND claimed_by = $2 AND state = {PENDING}",
            [parse_delivery_name(name) for name in deliveries],
            self._owner,
        )
        return int(status.rpartition(" ")[2])

    # ---- the service's reads and writes ----------------------------------------------------------

    async def get(self, delivery_id: int) -> triggers_pb2.Delivery:
        """The delivery with its attempts.

        Raises:
            NotFound: no delivery has the id.
        """
        row = await self._pool.fetchrow(
            f"SELECT {COLUMNS} FROM triggers_deliveries WHERE id = $1", delivery_id
        )
        if row is None:
            raise NotFound(f"{delivery_name(delivery_id)} does not exist")
        return (await with_attempts(self._pool, [row]))[0]

    async def redeliver(
        self, delivery_id: int, now: datetime, *, hold: bool = False
    ) -> triggers_pb2.Delivery:
        """Make the delivery pending again, due at ``now``, whatever its state; it keeps its
        webhook id and its attempts. ``hold``: this dispatcher holds it (the caller hands it to
        its own dispatcher); otherwise any dispatcher (or a subscription stream) takes it.

        Raises:
            NotFound: no delivery has the id.
        """
        row = await self._pool.fetchrow(
            f"""
            UPDATE triggers_deliveries SET state = {PENDING}, failure_reason = '', next_attempt_time = $2,
                available_at = CASE WHEN $3 THEN $2::timestamptz + $4::interval ELSE $2 END,
                claimed_by = CASE WHEN $3 THEN $5 END
            WHERE id = $1
            RETURNING {COLUMNS}
            """,
            delivery_id,
            now,
            hold,
            self._lease,
            self._owner,
        )
        if row is None:
            raise NotFound(f"{delivery_name(delivery_id)} does not exist")
        return (await with_attempts(self._pool, [row]))[0]

    async def take_for_subscription(
        self, destination_id: str, now: datetime, *, ack_timeout: timedelta, limit: int
    ) -> list[triggers_pb2.Delivery]:
        """Up to ``limit`` of a subscription's pending deliveries to send on a stream: those not
        sent yet and those whose ack deadline passed, in the order they were made (none while the
        destination is disabled). Each is marked
        sent at ``now`` and is taken again at ``now + ack_timeout`` unless acknowledged (its
        ``next_attempt_time`` is that deadline). Two streams never take the same one at once."""
        rows = await self._pool.fetch(
            f"""
            WITH c AS (
                SELECT id FROM triggers_deliveries
                WHERE destination_id = $1 AND state = {PENDING} AND available_at <= $2
                  AND EXISTS (SELECT 1 FROM triggers_destinations
                              WHERE id = $1 AND state = {triggers_pb2.DESTINATION_STATE_ENABLED})
                ORDER BY created_at, id
                LIMIT $3
                FOR UPDATE SKIP LOCKED
            )
            UPDATE triggers_deliveries d
            SET sent_at = $2, send_count = d.send_count + 1,
                next_attempt_time = $2::timestamptz + $4::interval,
                available_at = $2::timestamptz + $4::interval
            FROM c WHERE d.id = c.id
            RETURNING {_prefixed("d")}
            """,
            destination_id,
            now,
            limit,
            ack_timeout,
        )
        return [delivery_of(row) for row in sorted(rows, key=lambda r: (r["created_at"], r["id"]))]

    async def acknowledge(self, destination_id: str, delivery_ids: Sequence[int]) -> int:
        """Mark these pending deliveries of the destination DELIVERED; how many were pending
        (ids of other destinations, unknown or already delivered ones count nothing)."""
        status = await self._pool.execute(
            f"""
            UPDATE triggers_deliveries
            SET state = {DELIVERED}, next_attempt_time = NULL, available_at = NULL, claimed_by = NULL
            WHERE destination_id = $1 AND id = ANY($2::bigint[]) AND state = {PENDING}
            """,
            destination_id,
            list(delivery_ids),
        )
        return int(status.rpartition(" ")[2])

    async def still_pending(self, destination_id: str, delivery_ids: Sequence[int]) -> set[int]:
        """Which of these deliveries of the destination are still pending (a stream's sent ones
        that nobody acknowledged yet)."""
        if not delivery_ids:
            return set()
        rows = await self._pool.fetch(
            f"SELECT id FROM triggers_deliveries"
            f" WHERE destination_id = $1 AND id = ANY($2::bigint[]) AND state = {PENDING}",
            destination_id,
            list(delivery_ids),
        )
        return {row["id"] for row in rows}

    async def list(
        self,
        destination_id: str,
        *,
        state: triggers_pb2.DeliveryState.ValueType = triggers_pb2.DELIVERY_STATE_UNSPECIFIED,
        page_size: int,
        page_token: str,
    ) -> tuple[list[triggers_pb2.Delivery], str]:
        """One page of the destination's deliveries (in ``state``, unless unspecified), newest
        first, each with its attempts; and the next page's token ('' on the last page). A
        destination that does not exist has none.

        Raises:
            sendtime_common.paging.InvalidPageToken: not a token of this listing, or issued for
                another destination or state.
        """
        filters = {"deliveries_of": destination_id, "state": int(state)}
        after_time: datetime | None = None
        after_id = 0
        if page_token:
            after_time, after_id = decode_time_position(page_token, filters, int)
        state_filter = "AND state = $5" if state else "AND $5::smallint = 0"
        rows = await self._pool.fetch(
            f"""
            SELECT {COLUMNS} FROM triggers_deliveries
            WHERE destination_id = $1 {state_filter}
              AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))
            ORDER BY created_at DESC, id DESC
            LIMIT $4
            """,
            destination_id,
            after_time,
            after_id,
            page_size + 1,
            int(state),
        )
        page = rows[:page_size]
        token = (
            encode_time_position(page[-1]["created_at"], page[-1]["id"], filters)
            if len(rows) > page_size
            else ""
        )
        return await with_attempts(self._pool, page), token


async def with_attempts(conn: asyncpg.Pool, rows: Sequence[Any]) -> list[triggers_pb2.Delivery]:
    """The deliveries of ``rows`` (with the columns of ``COLUMNS``), each with its attempts."""
    if not rows:
        return []
    attempts: dict[int, list[triggers_pb2.DeliveryAttempt]] = defaultdict(list)
    for attempt in await conn.fetch(
        "SELECT delivery_id, start_time, latency, http_status, error FROM triggers_delivery_attempts"
        " WHERE delivery_id = ANY($1::bigint[]) ORDER BY delivery_id, attempt",
        [row["id"] for row in rows],
    ):
        record = AttemptRecord(
            attempt["start_time"], attempt["latency"], attempt["http_status"], attempt["error"]
        )
        attempts[attempt["delivery_id"]].append(record.to_proto())
    return [delivery_of(row, attempts.get(row["id"], ())) for row in rows]


def _prefixed(alias: str) -> str:
    return ", ".join(f"{alias}.{column.strip()}" for column in COLUMNS.split(","))


def delivery_of(
    row: Any, attempts: Iterable[triggers_pb2.DeliveryAttempt] = (), *, payload: bool = True
) -> triggers_pb2.Delivery:
    """The Delivery of a row with the columns of ``COLUMNS``. ``payload`` False leaves the
    payload out (the row need not have the column): a caller that has the body already saves
    decoding it into a Struct, the costliest part of this."""
    delivery = triggers_pb2.Delivery(
        name=delivery_name(row["id"]),
        destination=destination_name(row["destination_id"]),
        webhook_id=row["webhook_id"],
        trigger=trigger_name(row["trigger_id"]),
        profile=f"profiles/{row['customer_id']}",
        episode_key=row["episode_key"],
        state=row["state"],
        attempts=list(attempts),
    )
    if payload:
        delivery.payload.update(orjson.loads(row["payload"]))  # a JSON object; a third of ParseDict's time
    if row["state"] == PENDING and row["next_attempt_time"] is not None:
        delivery.next_attempt_time.FromDatetime(row["next_attempt_time"])
    delivery.create_time.FromDatetime(row["created_at"])
    return delivery
