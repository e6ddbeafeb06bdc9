"""Episodes, known exits and fires in PostgreSQL: what the event consumer and the firers read,
and how their decisions (episodes.on_event, episodes.on_due) are applied.

**One rule for every write.** An episode row has a ``version``; every write adds 1 to it, and
every write but the first insert is conditional on the version the writer read. A decision is
therefore applied only to the episode it was taken on: an exit, a restart, a claim, a fire,
a deferral, DeleteTrigger and an erasure each make every decision taken on an earlier read
fail to apply (the caller reads again and decides again, or drops it). There are no lost
updates between the event consumer and the firers, whichever replicas they run on.

**Durable timers: claim, decide, commit.** A WAITING episode has a ``due_at``: when a firer
may claim it (fire_at plus the allowed lateness, or a decision's wake_at). Firing it is three
steps, so that no transaction stays open across what the decision needs from elsewhere (the
live profile, a template rendered by the render service: network calls):

1. ``claim_due(now, limit, owner=..., lease=...)`` picks due waiting episodes with
   ``FOR UPDATE SKIP LOCKED`` (two firers never pick the same row) and, in the same
   statement, writes the claim: ``claimed_by``, ``version + 1``, and ``due_at = now + lease``,
   so nobody else sees it due until the lease ends. It commits at once: no lock is held
   afterwards. A claim is a lease, not a lock: a firer that dies (kill -9) holds nothing, and
   when the lease ends another claims the episode.
2. The firer decides (``fire_facts`` gives the fires the cooldown and the frequency cap read;
   ``on_due`` is pure) and renders what it sends, holding no lock.
3. It commits the decision in ONE transaction. A fire (``commit_fire``): the episode becomes
   FIRED only if its version is still the one the claim wrote (nobody wrote it since: no exit,
   no restart, no other claim after a lapsed lease, no delete, no erasure), the customer's
   fire sequence is still the one read with the facts (no other fire for the customer
   committed since: the cooldown and the cap held), and then the fire row and one delivery per
   destination are inserted. Anything else (``commit_decision``: a deferral, an end, a wait)
   is conditional on the version the same way.

**Why it fires at most once.** Only a transaction that moves the episode from WAITING at the
claim's version to FIRED inserts the fire and its deliveries, and it does both or neither.
Two such transactions for one claim version cannot both commit: the second waits on the row
lock of the first, then finds the version changed and updates nothing. A firer killed before
its commit changed nothing (PostgreSQL rolls its transaction back): the episode is WAITING
with the claim's version, due again when the lease ends, and the next claim (a new version)
makes any late commit of the old claim fail. After a commit, the episode is FIRED and never
claimed again, and its deliveries exist exactly once (also enforced by a unique key). Clocks
do not matter for this: a firer whose clock runs ahead may claim an episode whose lease has
not really ended; the holder's commit then fails, and only one of the two fires.

A lapsed lease is not a failure: a slow firer whose lease ran out still commits if nobody
claimed the episode since (the version is unchanged).

**Exits against fires.** An exit (or a restart) the event consumer commits before the fire's
commit changes the version: the fire's commit updates nothing (``EPISODE_CHANGED``) and no
delivery is made: the exit wins. A fire committed first makes the exit's write fail; read
again, the episode is FIRED and ``on_event`` says LATE_EXIT: the fire stands.

**Paused triggers.** A due episode of a paused trigger is parked (``due_at = 'infinity'``) by
``commit_decision`` only while it holds a share lock on the trigger's row and sees it paused;
``TriggerStore.resume`` takes that row's lock before it wakes the parked ones, so none stays
parked after a resume.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeAlias

import asyncpg
import orjson

from sendtime.triggers.v1 import triggers_pb2
from triggers.delivery_store import DEFAULT_LEASE as DEFAULT_DELIVERY_LEASE
from triggers.delivery_store import PENDING, delivery_of
from triggers.destination_store import parse_destination_name
from triggers.episodes import DueAction, DueDecision, Episode, EpisodeState, Reason
from triggers.signing import new_webhook_id
from triggers.store import MAX_KNOWN_EXITS, NotFound
from triggers.trigger_store import trigger_of
from triggers.trigger_validation import MAX_FIRES, trigger_name

Connection: TypeAlias = (
    "asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"
)

DEFAULT_LEASE: Final = timedelta(seconds=60)
_EPISODE_COLUMNS = (
    "customer_id, trigger_id, episode_key, state, opened_at, last_entry_at, fire_at, closed_at,"
    " close_reason, version"
)


@dataclass(frozen=True, slots=True)
class StoredEpisode:
    """An episode as stored, with the version a write of a decision taken on it must name."""

    customer_id: str
    trigger_id: str
    episode: Episode
    version: int
    close_reason: str = ""


@dataclass(frozen=True, slots=True)
class EventContext:
    """What ``episodes.on_event`` needs from the store for an entry of a key: the episode (None:
    none was ever stored for the key), the trigger's last fire for the customer, and the times
    of the customer's exits for the key (keyed ones and those without a key)."""

    episode: StoredEpisode | None
    last_fire_time: datetime | None
    known_exits: tuple[datetime, ...]


@dataclass(frozen=True, slots=True)
class ClaimedEpisode:
    """A due episode a firer claimed: decide on ``episode`` with ``trigger`` (as stored at the
    claim), then commit with this claim before ``lease_until`` (later works too, unless another
    firer claimed the episode meanwhile)."""

    customer_id: str
    trigger_id: str
    episode: Episode
    version: int  # written by the claim: the commit is conditional on it
    owner: str
    lease_until: datetime
    trigger: triggers_pb2.Trigger = field(repr=False)


@dataclass(frozen=True, slots=True)
class FireFacts:
    """The fires a decision at the fire reads, and the customer's fire sequence they were read
    at (one snapshot): a fire commits only if the sequence is still that."""

    last_fire_time: datetime | None  # this trigger's last fire for the customer
    recent_fire_times: tuple[datetime, ...]  # the customer's fires of every trigger since ``since``
    sequence: int


@dataclass(frozen=True, slots=True)
class NewDelivery:
    """One destination's delivery of a fire."""

    destination: str  # destinations/{id}
    payload: Mapping[str, Any] = field(repr=False)  # the JSON body; personal data


class CommitOutcome(enum.StrEnum):
    COMMITTED = "committed"
    # Written since the claim (an exit, a restart, another claim after the lease ended, the
    # trigger deleted, the customer erased): the decision is void. Drop it; if the episode is
    # still waiting it is claimed again when due.
    EPISODE_CHANGED = "episode_changed"
    # Another fire for the customer committed since the facts were read: read them again and
    # decide again (the claim still holds).
    FIRES_CHANGED = "fires_changed"


@dataclass(frozen=True, slots=True)
class FireResult:
    outcome: CommitOutcome
    deliveries: tuple[triggers_pb2.Delivery, ...] = ()  # made by the fire (COMMITTED only)


class _Abort(Exception):
    """Rolls a commit's transaction back with an outcome."""

    def __init__(self, outcome: CommitOutcome) -> None:
        super().__init__(outcome)
        self.outcome = outcome


class EpisodeStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    # ---- the event consumer ----------------------------------------------------------------------

    async def event_context(self, customer_id: str, trigger_id: str, key: str) -> EventContext:
        """The episode of ``key``, the last fire and the known exits, read in one snapshot."""
        row = await self._pool.fetchrow(
            f"""
            SELECT {", ".join(f"e.{c.strip()}" for c in _EPISODE_COLUMNS.split(","))},
                (SELECT max(fired_at) FROM triggers_fires f
                 WHERE f.customer_id = $1 AND f.trigger_id = $2) AS last_fire_time,
                ARRAY(SELECT unnest(x.occurred_at) FROM triggers_known_exits x
                      WHERE x.customer_id = $1 AND x.trigger_id = $2 AND x.exit_key IN ($3, '')
                ) AS known_exits
            FROM (SELECT 1) AS one
            LEFT JOIN triggers_episodes e
              ON e.customer_id = $1 AND e.trigger_id = $2 AND e.episode_key = $3
            """,
            customer_id,
            trigger_id,
            key,
        )
        assert row is not None  # one row, whatever is stored
        episode = _stored(row) if row["state"] is not None else None
        return EventContext(episode, row["last_fire_time"], tuple(sorted(row["known_exits"])))

    async def episodes(
        self, customer_id: str, trigger_id: str, keys: Collection[str] | None = None
    ) -> list[StoredEpisode]:
        """The customer's episodes of the trigger for ``keys`` (all of them when None: an exit
        without a key ends every episode of the customer)."""
        rows = await self._pool.fetch(
            f"SELECT {_EPISODE_COLUMNS} FROM triggers_episodes"
            " WHERE customer_id = $1 AND trigger_id = $2 AND ($3::text[] IS NULL OR episode_key = ANY($3))"
            " ORDER BY episode_key",
            customer_id,
            trigger_id,
            None if keys is None else list(keys),
        )
        return [_stored(row) for row in rows]

    async def save_episode(
        self,
        customer_id: str,
        trigger_id: str,
        episode: Episode,
        *,
        version: int | None,
        due_at: datetime | None,
        reason: Reason | str = "",
    ) -> StoredEpisode | None:
        """Store what an event decision says for the episode of ``episode.key``: a new episode
        (``version`` None: only if none is stored for the key; or the version of the closed one
        it replaces), a restart or an exit (the version read). ``due_at``: when a WAITING episode
        falls due (episodes.due_at); ignored for a closed one. ``reason``: why it closed. Any
        claim on the episode ends with it.

        Returns the episode as stored, or None when the version is not the stored one (or, for
        None, an episode is stored for the key): read again and decide again.

        Raises:
            NotFound: the trigger does not exist (it was deleted).
            ValueError: a WAITING episode without ``due_at``.
        """
        waiting = episode.state == EpisodeState.WAITING
        if waiting and due_at is None:
            raise ValueError("a waiting episode has a due time")
        args = (
            customer_id,
            trigger_id,
            episode.key,
            str(episode.state),
            episode.opened_at,
            episode.last_entry_at,
            episode.fire_at,
            due_at if waiting else None,
            episode.closed_at,
            "" if waiting else str(reason),
        )
        try:
            if version is None:
                row = await self._pool.fetchrow(
                    f"""
                    INSERT INTO triggers_episodes (customer_id, trigger_id, episode_key, state, opened_at,
                        last_entry_at, fire_at, due_at, closed_at, close_reason)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                    ON CONFLICT (customer_id, trigger_id, episode_key) DO NOTHING
                    RETURNING {_EPISODE_COLUMNS}
                    """,
                    *args,
                )
            else:
                row = await self._pool.fetchrow(
                    f"""
                    UPDATE triggers_episodes SET {_SET_EPISODE}
                    WHERE customer_id = $1 AND trigger_id = $2 AND episode_key = $3 AND version = $11
                    RETURNING {_EPISODE_COLUMNS}
                    """,
                    *args,
                    version,
                )
        except asyncpg.ForeignKeyViolationError:
            raise NotFound(f"{trigger_name(trigger_id)} does not exist") from None
        return _stored(row) if row is not None else None

    async def record_exit(
        self,
        customer_id: str,
        trigger_id: str,
        occurred_at: datetime,
        *,
        keys: Collection[str] = (),
        any_key: bool = False,
    ) -> None:
        """Remember that an exit of the trigger occurred for the customer at ``occurred_at``:
        through keyed exits for ``keys``, and/or (``any_key``) through an exit without a key.
        The newest ``MAX_KNOWN_EXITS`` times are kept per key.

        Raises:
            NotFound: the trigger does not exist.
        """
        exit_keys = [key for key in keys if key] + ([""] if any_key else [])
        if not exit_keys:
            return
        try:
            await self._pool.execute(
                """
                INSERT INTO triggers_known_exits AS x
                    (customer_id, trigger_id, exit_key, occurred_at, last_occurred_at)
                SELECT $1, $2, k, ARRAY[$4::timestamptz], $4 FROM unnest($3::text[]) AS k
                ON CONFLICT (customer_id, trigger_id, exit_key) DO UPDATE SET
                    occurred_at = ARRAY(
                        SELECT DISTINCT t FROM unnest(x.occurred_at || EXCLUDED.occurred_at) AS t
                        ORDER BY t DESC LIMIT $5),
                    last_occurred_at = greatest(x.last_occurred_at, EXCLUDED.last_occurred_at)
                """,
                customer_id,
                trigger_id,
                sorted(set(exit_keys)),
                occurred_at,
                MAX_KNOWN_EXITS,
            )
        except asyncpg.ForeignKeyViolationError:
            raise NotFound(f"{trigger_name(trigger_id)} does not exist") from None

    # ---- the firers ------------------------------------------------------------------------------

    async def claim_due(
        self, now: datetime, limit: int, *, owner: str, lease: timedelta = DEFAULT_LEASE
    ) -> list[ClaimedEpisode]:
        """Claim up to ``limit`` waiting episodes due at ``now`` (earliest first) for ``owner``
        until ``now + lease``; each with its trigger. Concurrent claimers never claim the same
        episode; one whose lease ended is claimed again (by anyone)."""
        lease_until = now + lease
        rows = await self._pool.fetch(
            f"""
            WITH due AS (
                SELECT customer_id, trigger_id, episode_key
                FROM triggers_episodes
                WHERE state = 'waiting' AND due_at <= $1
                ORDER BY due_at
                LIMIT $2
                FOR UPDATE SKIP LOCKED
            )
            UPDATE triggers_episodes e
            SET due_at = $3, claimed_by = $4, claimed_at = $1, version = e.version + 1, updated_at = now()
            FROM due, triggers_triggers t
            WHERE e.customer_id = due.customer_id AND e.trigger_id = due.trigger_id
              AND e.episode_key = due.episode_key AND t.id = e.trigger_id
            RETURNING {", ".join(f"e.{c.strip()}" for c in _EPISODE_COLUMNS.split(","))},
                t.id AS t_id, t.content AS t_content, t.state AS t_state, t.etag AS t_etag,
                t.created_at AS t_created_at, t.updated_at AS t_updated_at
            """,
            now,
            limit,
            lease_until,
            owner,
        )
        triggers: dict[str, triggers_pb2.Trigger] = {}
        claimed = []
        for row in rows:
            trigger = triggers.get(row["trigger_id"])
            if trigger is None:
                trigger = triggers[row["trigger_id"]] = trigger_of(row, "t_")
            claimed.append(
                ClaimedEpisode(
                    row["customer_id"],
                    row["trigger_id"],
                    _episode(row),
                    row["version"],
                    owner,
                    lease_until,
                    trigger,
                )
            )
        return claimed

    async def next_due_at(self) -> datetime | None:
        """When the earliest waiting episode falls due (parked ones never do); None when none
        waits. One read of the claims' index: what an idle firer polls."""
        due: datetime | None = await self._pool.fetchval(
            "SELECT min(due_at) FROM triggers_episodes WHERE state = 'waiting' AND due_at < 'infinity'"
        )
        return due

    async def fire_facts(self, customer_id: str, trigger_id: str, *, since: datetime) -> FireFacts:
        """The trigger's last fire for the customer, the customer's fires of every trigger after
        ``since`` (the newest ``MAX_FIRES``: enough for any cap), and the fire sequence, in one
        snapshot."""
        row = await self._pool.fetchrow(
            """
            SELECT
                coalesce((SELECT fire_sequence FROM triggers_customer_fires WHERE customer_id = $1), 0)
                    AS sequence,
                (SELECT max(fired_at) FROM triggers_fires WHERE customer_id = $1 AND trigger_id = $2)
                    AS last_fire_time,
                ARRAY(SELECT fired_at FROM triggers_fires WHERE customer_id = $1 AND fired_at > $3
                      ORDER BY fired_at DESC LIMIT $4) AS recent
            """,
            customer_id,
            trigger_id,
            since,
            MAX_FIRES,
        )
        assert row is not None
        return FireFacts(row["last_fire_time"], tuple(row["recent"]), row["sequence"])

    async def commit_fire(
        self,
        claimed: ClaimedEpisode,
        fired: Episode,
        facts: FireFacts,
        deliveries: Sequence[NewDelivery],
        *,
        delivery_lease: timedelta = DEFAULT_DELIVERY_LEASE,
    ) -> FireResult:
        """Apply a FIRE decision (``fired``: the decision's episode, FIRED at its ``closed_at``)
        taken on ``claimed`` with ``facts``, in one transaction: the episode FIRED, the fire, and
        one delivery per destination that still exists (deleted ones get none), each with a new
        webhook id, pending, due at the fire. The claim's owner holds the webhook deliveries
        (``delivery_lease`` past the fire) so its own dispatcher attempts them.

        Raises:
            ValueError: ``fired`` is not a FIRED episode of the claimed key.
        """
        if fired.state != EpisodeState.FIRED or fired.closed_at is None or fired.key != claimed.episode.key:
            raise ValueError("commit_fire applies a FIRED episode of the claimed key")
        fired_at = fired.closed_at
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                return FireResult(
                    CommitOutcome.COMMITTED,
                    await self._fire_in(conn, claimed, fired, facts, deliveries, fired_at, delivery_lease),
                )
        except _Abort as abort:
            return FireResult(abort.outcome)
        except asyncpg.ForeignKeyViolationError:
            # A destination deleted between the insert's read and its check: decide again.
            return FireResult(CommitOutcome.FIRES_CHANGED)

    async def _fire_in(
        self,
        conn: Connection,
        claimed: ClaimedEpisode,
        fired: Episode,
        facts: FireFacts,
        deliveries: Sequence[NewDelivery],
        fired_at: datetime,
        delivery_lease: timedelta,
    ) -> tuple[triggers_pb2.Delivery, ...]:
        """The fire, in the caller's transaction (raising ``_Abort`` to roll it back). Separate
        so that tests can end a transaction halfway, as a killed firer does.

        One statement (one round trip: the fire is the firers' hot path): the episode FIRED at
        the claim's version, the fence, the fire and the deliveries, each conditional on the one
        before through data-modifying CTEs; when the episode or the fence did not apply, what
        did is rolled back with the transaction."""
        rows = await conn.fetch(
            f"""
            WITH ep AS (
                UPDATE triggers_episodes SET {_SET_EPISODE}
                WHERE customer_id = $1 AND trigger_id = $2 AND episode_key = $3 AND version = $11
                  AND state = 'waiting'
                RETURNING 1
            ), fence AS (
                INSERT INTO triggers_customer_fires AS c (customer_id, fire_sequence)
                SELECT $1, 1 FROM ep
                ON CONFLICT (customer_id) DO UPDATE SET fire_sequence = c.fire_sequence + 1
                    WHERE c.fire_sequence = $12
                RETURNING fire_sequence
            ), fire AS (
                INSERT INTO triggers_fires (customer_id, trigger_id, fired_at, episode_key)
                SELECT $1, $2, $13, $3 FROM fence
            ), made AS (
                INSERT INTO triggers_deliveries (destination_id, kind, webhook_id, trigger_id, customer_id,
                    episode_key, fired_at, state, payload, next_attempt_time, available_at, claimed_by,
                    created_at)
                SELECT d.id, d.kind, n.webhook_id, $2, $1, $3, $13, {PENDING},
                       n.payload::jsonb, $13, CASE WHEN d.kind = 'webhook' THEN $17::timestamptz ELSE $13 END,
                       CASE WHEN d.kind = 'webhook' THEN $18::text END, $13
                FROM unnest($14::text[], $15::text[], $16::text[]) WITH ORDINALITY
                    AS n(destination_id, webhook_id, payload, position)
                JOIN triggers_destinations d ON d.id = n.destination_id
                WHERE EXISTS (SELECT 1 FROM fence)
                ORDER BY n.position
                RETURNING id, destination_id, webhook_id, trigger_id, customer_id, episode_key, state,
                    payload, next_attempt_time, created_at
            )
            SELECT (SELECT count(*) FROM ep) AS fired_episodes, (SELECT count(*) FROM fence) AS fenced, m.*
            FROM (SELECT 1) AS one LEFT JOIN made m ON true
            """,
            claimed.customer_id,
            claimed.trigger_id,
            claimed.episode.key,
            str(fired.state),
            fired.opened_at,
            fired.last_entry_at,
            fired.fire_at,
            None,
            fired.closed_at,
            str(Reason.FIRED),
            claimed.version,
            facts.sequence,
            fired_at,
            [parse_destination_name(d.destination) for d in deliveries],
            [new_webhook_id(fired_at) for _ in deliveries],
            [orjson.dumps(dict(d.payload)).decode() for d in deliveries],
            fired_at + delivery_lease,
            claimed.owner,
        )
        if not rows[0]["fired_episodes"]:
            raise _Abort(CommitOutcome.EPISODE_CHANGED)
        if not rows[0]["fenced"]:
            raise _Abort(CommitOutcome.FIRES_CHANGED)
        made = [row for row in rows if row["id"] is not None]
        return tuple(delivery_of(row) for row in sorted(made, key=lambda r: r["id"]))

    async def commit_decision(
        self, claimed: ClaimedEpisode, decision: DueDecision, *, now: datetime
    ) -> CommitOutcome:
        """Apply a decision other than FIRE taken on ``claimed``, conditional on its version:

        - DEFER: the new fire time; due at the decision's ``wake_at``;
        - END: ENDED, with the decision's reason;
        - WAIT with a ``wake_at`` (not due yet): due then;
        - WAIT without (the trigger is paused): parked until the trigger resumes, if it is still
          paused (else due at ``now``, to be decided again).

        Raises:
            ValueError: a FIRE (``commit_fire``) or a NONE (nothing to apply).
        """
        action = decision.action
        if action in (DueAction.FIRE, DueAction.NONE):
            raise ValueError(f"commit_decision does not apply {action}")
        if action == DueAction.WAIT and decision.wake_at is None:
            return await self._park(claimed, now)
        episode = decision.episode or claimed.episode
        due_at = decision.wake_at
        async with self._pool.acquire() as conn:
            written = await self._write_claimed(conn, claimed, episode, due_at, decision.reason)
        return CommitOutcome.COMMITTED if written else CommitOutcome.EPISODE_CHANGED

    async def release(self, claimed: ClaimedEpisode, *, due_at: datetime) -> bool:
        """Give the claim up without a decision (what it needs could not be read): due again at
        ``due_at``. False when the episode changed since the claim (nothing to give up)."""
        async with self._pool.acquire() as conn:
            return await self._write_claimed(conn, claimed, claimed.episode, due_at, "")

    async def _park(self, claimed: ClaimedEpisode, now: datetime) -> CommitOutcome:
        async with self._pool.acquire() as conn, conn.transaction():
            # Shares the row lock ResumeTrigger's update takes: either the resume committed
            # (and the state read here is ACTIVE), or it waits for this transaction and then
            # wakes what was parked here.
            state = await conn.fetchval(
                "SELECT state FROM triggers_triggers WHERE id = $1 FOR SHARE", claimed.trigger_id
            )
            paused = state == triggers_pb2.TRIGGER_STATE_PAUSED
            written = await self._write_claimed(
                conn, claimed, claimed.episode, None if paused else now, Reason.PAUSED, park=paused
            )
        return CommitOutcome.COMMITTED if written else CommitOutcome.EPISODE_CHANGED

    async def _write_claimed(
        self,
        conn: Connection,
        claimed: ClaimedEpisode,
        episode: Episode,
        due_at: datetime | None,
        reason: Reason | str,
        *,
        park: bool = False,
    ) -> bool:
        """Write ``episode`` over the claimed one if it is still WAITING at the claim's version;
        whether it was. A WAITING one is due at ``due_at`` (or parked)."""
        waiting = episode.state == EpisodeState.WAITING
        row = await conn.fetchval(
            f"""
            UPDATE triggers_episodes SET {_SET_EPISODE}
            WHERE customer_id = $1 AND trigger_id = $2 AND episode_key = $3 AND version = $11
              AND state = 'waiting'
            RETURNING version
            """,
            claimed.customer_id,
            claimed.trigger_id,
            claimed.episode.key,
            str(episode.state),
            episode.opened_at,
            episode.last_entry_at,
            episode.fire_at,
            (PARKED if park else due_at) if waiting else None,
            episode.closed_at,
            "" if waiting else str(reason),
            claimed.version,
        )
        return row is not None


# 'infinity': asyncpg sends datetime.max as PostgreSQL's infinite timestamp (and reads it back as
# a naive datetime.max).
PARKED: Final = datetime.max.replace(tzinfo=UTC)

# The SET list of a write of a whole episode, from parameters $4 to $10 (state, opened_at,
# last_entry_at, fire_at, due_at, closed_at, close_reason); any claim ends.
_SET_EPISODE: Final = """
    state = $4, opened_at = $5, last_entry_at = $6, fire_at = $7,
    due_at = $8,
    closed_at = $9, close_reason = $10, version = version + 1,
    claimed_by = NULL, claimed_at = NULL, updated_at = now()
"""


def _episode(row: Any) -> Episode:
    return Episode(
        key=row["episode_key"],
        state=EpisodeState(row["state"]),
        opened_at=row["opened_at"],
        last_entry_at=row["last_entry_at"],
        fire_at=row["fire_at"],
        closed_at=row["closed_at"],
    )


def _stored(row: Any) -> StoredEpisode:
    return StoredEpisode(
        row["customer_id"], row["trigger_id"], _episode(row), row["version"], row["close_reason"]
    )
