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
   destination are inserted. ``commit_fires`` commits a batch of fires in one transaction, each
   with the outcome it would have had alone: it locks the episodes, then the customers' fences,
   each in key order (so two firers' batches never deadlock), decides each fire on the locked
   rows, and writes them all in one statement. Anything else (``commit_decision``: a deferral,
   an end, a wait) is conditional on the version the same way.

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
import logging
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

log = logging.getLogger(__name__)

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
class FactsQuery:
    """Whose fire facts to read (``fire_facts_of``): the customer's, for the trigger's last fire,
    with the customer's fires after ``since`` (the cap window)."""

    customer_id: str
    trigger_id: str
    since: datetime


@dataclass(frozen=True, slots=True)
class NewDelivery:
    """One destination's delivery of a fire."""

    destination: str  # destinations/{id}
    payload: Mapping[str, Any] = field(repr=False)  # the JSON body; personal data


@dataclass(frozen=True, slots=True)
class FireCommit:
    """One FIRE decision for ``commit_fires``: what ``commit_fire`` takes, with one body for all
    the fire's destinations, encoded once by the caller (who hands the same bytes to its
    dispatcher).

    Raises:
        ValueError: ``fired`` is not a FIRED episode of the claimed key.
    """

    claimed: ClaimedEpisode
    fired: Episode  # the decision's episode, FIRED at its closed_at
    facts: FireFacts
    destinations: tuple[str, ...]  # destinations/{id}
    body: bytes = field(repr=False)  # the JSON body of each delivery; personal data

    def __post_init__(self) -> None:
        # Checked here, in the caller's own task, so that a bad commit never sinks a batch.
        _check_fired(self.claimed, self.fired)

    @property
    def fired_at(self) -> datetime:
        assert self.fired.closed_at is not None  # __post_init__
        return self.fired.closed_at


@dataclass(frozen=True, slots=True)
class Timers:
    """The episodes waiting to fall due, and those of them overdue (EpisodeStore.timers)."""

    pending: int
    overdue: int


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


class _BatchRaced(Exception):
    """A batch's writes did not all apply although its rows were locked: another transaction
    inserted a customer's first fence row meanwhile. The batch is rolled back and tried again."""


# A batch that deadlocked with another writer (a merge, an erasure, a trigger's delete) is tried
# again this many times in all before it is committed one fire at a time.
_BATCH_TRIES: Final = 5

# An episode as ``commit_fires`` names and locks it.
_EpisodeKey: TypeAlias = tuple[str, str, str]  # (customer_id, trigger_id, episode_key)


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

    async def timers(self, now: datetime, *, overdue_after: timedelta) -> Timers:
        """How many waiting episodes will fall due (parked ones never do; claimed ones count until
        settled), and how many of them fell due more than ``overdue_after`` before ``now``: one
        read of the claims' partial index."""
        row: Any = await self._pool.fetchrow(
            """
            SELECT count(*) AS pending, count(*) FILTER (WHERE due_at < $1) AS overdue
            FROM triggers_episodes WHERE state = 'waiting' AND due_at < 'infinity'
            """,
            now - overdue_after,
        )
        return Timers(pending=row["pending"], overdue=row["overdue"])

    async def fire_facts(self, customer_id: str, trigger_id: str, *, since: datetime) -> FireFacts:
        """The trigger's last fire for the customer, the customer's fires of every trigger after
        ``since`` (the newest ``MAX_FIRES``: enough for any cap), and the fire sequence, in one
        snapshot."""
        [facts] = await self.fire_facts_of([FactsQuery(customer_id, trigger_id, since)])
        return facts

    async def fire_facts_of(self, queries: Sequence[FactsQuery]) -> list[FireFacts]:
        """``fire_facts`` for each query, in order, in one statement (one snapshot): the facts of
        the fires a firer decides at once."""
        rows = await self._pool.fetch(
            """
            SELECT
                coalesce((SELECT fire_sequence FROM triggers_customer_fires c
                          WHERE c.customer_id = q.customer_id), 0) AS sequence,
                (SELECT max(fired_at) FROM triggers_fires f
                 WHERE f.customer_id = q.customer_id AND f.trigger_id = q.trigger_id) AS last_fire_time,
                ARRAY(SELECT fired_at FROM triggers_fires f WHERE f.customer_id = q.customer_id
                      AND f.fired_at > q.since ORDER BY fired_at DESC LIMIT $4) AS recent
            FROM unnest($1::text[], $2::text[], $3::timestamptz[]) WITH ORDINALITY
                AS q(customer_id, trigger_id, since, position)
            ORDER BY q.position
            """,
            [q.customer_id for q in queries],
            [q.trigger_id for q in queries],
            [q.since for q in queries],
            MAX_FIRES,
        )
        return [FireFacts(row["last_fire_time"], tuple(row["recent"]), row["sequence"]) for row in rows]

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
        _check_fired(claimed, fired)
        encoded = [(d.destination, orjson.dumps(dict(d.payload)).decode()) for d in deliveries]
        return await self._commit_alone(claimed, fired, facts, encoded, delivery_lease, with_payloads=True)

    async def commit_fires(
        self, commits: Sequence[FireCommit], *, delivery_lease: timedelta = DEFAULT_DELIVERY_LEASE
    ) -> list[FireResult]:
        """Apply FIRE decisions in one transaction; one result per commit, in order. Each is what
        ``commit_fire`` would have answered had the commits been made one after another in this
        order: a commit applies only over its claim's version (else EPISODE_CHANGED) and its
        facts' fire sequence (else FIRES_CHANGED; so of two fires of a customer decided on the
        same facts, the first commits and the second is decided again). The deliveries come
        without their payload: the caller has the body.

        The episodes are locked first, then the customers' fire fences, each in key order, so
        the batches of two firers never deadlock each other. A deadlock with another writer (a
        merge, an erasure, a trigger's delete) rolls the batch back and tries it again, up to
        ``_BATCH_TRIES`` times. A destination deleted while the batch commits (its foreign key
        fails) would roll every fire back with it; the batch is then committed one fire at a
        time (``commit_fire``), as it also is when it kept deadlocking, so that one fire never
        holds up the others.

        Raises:
            triggers.store.StoreError: PostgreSQL failed; nothing was committed, or, one fire at
                a time, only the fires before the failing one.
        """
        if not commits:
            return []
        for tries in range(1, _BATCH_TRIES + 1):
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    return await self._fires_in(conn, commits, delivery_lease)
            except (asyncpg.DeadlockDetectedError, _BatchRaced) as exc:
                log.info(
                    "a batch of fires rolled back; trying it again"
                    if tries < _BATCH_TRIES
                    else "a batch of fires kept rolling back; committing them one at a time",
                    extra={"fires": len(commits), "why": type(exc).__name__, "try": tries},
                )
            except asyncpg.ForeignKeyViolationError:
                break  # a destination deleted meanwhile: only its fire must be decided again
        return [
            await self._commit_alone(
                c.claimed,
                c.fired,
                c.facts,
                [(destination, c.body.decode()) for destination in c.destinations],
                delivery_lease,
                with_payloads=False,
            )
            for c in commits
        ]

    async def _commit_alone(
        self,
        claimed: ClaimedEpisode,
        fired: Episode,
        facts: FireFacts,
        deliveries: Sequence[tuple[str, str]],
        delivery_lease: timedelta,
        *,
        with_payloads: bool,
    ) -> FireResult:
        """One fire in its own transaction; ``deliveries``: (destination name, JSON payload)."""
        fired_at = fired.closed_at
        assert fired_at is not None  # _check_fired
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                made = await self._fire_statement(
                    conn,
                    claimed,
                    fired,
                    facts,
                    deliveries,
                    fired_at,
                    delivery_lease,
                    with_payloads=with_payloads,
                )
                return FireResult(CommitOutcome.COMMITTED, made)
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
        """One fire, in the caller's transaction (raising ``_Abort`` to roll it back). Separate
        so that tests can end a transaction halfway, as a killed firer does."""
        encoded = [(d.destination, orjson.dumps(dict(d.payload)).decode()) for d in deliveries]
        return await self._fire_statement(
            conn, claimed, fired, facts, encoded, fired_at, delivery_lease, with_payloads=True
        )

    async def _fire_statement(
        self,
        conn: Connection,
        claimed: ClaimedEpisode,
        fired: Episode,
        facts: FireFacts,
        deliveries: Sequence[tuple[str, str]],
        fired_at: datetime,
        delivery_lease: timedelta,
        *,
        with_payloads: bool,
    ) -> tuple[triggers_pb2.Delivery, ...]:
        """One statement (one round trip: the fire is the firers' hot path): the episode FIRED at
        the claim's version, the fence, the fire and the deliveries, each conditional on the one
        before through data-modifying CTEs; when the episode or the fence did not apply,
        ``_Abort`` rolls back what did with the transaction."""
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
                RETURNING {_MADE_COLUMNS}{", payload" if with_payloads else ""}
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
            [parse_destination_name(destination) for destination, _ in deliveries],
            [new_webhook_id(fired_at) for _ in deliveries],
            [payload for _, payload in deliveries],
            fired_at + delivery_lease,
            claimed.owner,
        )
        if not rows[0]["fired_episodes"]:
            raise _Abort(CommitOutcome.EPISODE_CHANGED)
        if not rows[0]["fenced"]:
            raise _Abort(CommitOutcome.FIRES_CHANGED)
        made = [row for row in rows if row["id"] is not None]
        return tuple(delivery_of(row, payload=with_payloads) for row in sorted(made, key=lambda r: r["id"]))

    async def _fires_in(
        self, conn: Connection, commits: Sequence[FireCommit], delivery_lease: timedelta
    ) -> list[FireResult]:
        """A batch of fires in the caller's transaction: lock, decide, write (``commit_fires``).
        Separate so that tests can end a transaction halfway, as a killed firer does."""
        waiting = await self._lock_episodes(conn, {_key_of(c.claimed) for c in commits})
        fences = await self._lock_fences(conn, {c.claimed.customer_id for c in commits})
        outcomes, fences_after = _decide_in_order(commits, waiting, fences)
        firing = [
            c for c, outcome in zip(commits, outcomes, strict=True) if outcome == CommitOutcome.COMMITTED
        ]
        made = await self._write_fires(conn, firing, fences, fences_after, delivery_lease) if firing else {}
        return [
            FireResult(outcome, made.get(_key_of(c.claimed), ()))
            if outcome == CommitOutcome.COMMITTED
            else FireResult(outcome)
            for c, outcome in zip(commits, outcomes, strict=True)
        ]

    async def _lock_episodes(self, conn: Connection, keys: Collection[_EpisodeKey]) -> dict[_EpisodeKey, int]:
        """Lock the episodes in key order (merge_customers and TriggerStore.delete lock in the
        same order); the version of each that is still WAITING."""
        ordered = sorted(keys)
        rows = await conn.fetch(
            """
            SELECT customer_id, trigger_id, episode_key, e.version, e.state
            FROM triggers_episodes e
            JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(customer_id, trigger_id, episode_key)
              USING (customer_id, trigger_id, episode_key)
            ORDER BY customer_id, trigger_id, episode_key
            FOR UPDATE OF e
            """,
            [k[0] for k in ordered],
            [k[1] for k in ordered],
            [k[2] for k in ordered],
        )
        return {
            (r["customer_id"], r["trigger_id"], r["episode_key"]): r["version"]
            for r in rows
            if r["state"] == EpisodeState.WAITING
        }

    async def _lock_fences(self, conn: Connection, customer_ids: Collection[str]) -> dict[str, int]:
        """Lock the customers' fire fences in customer order; their sequences (a customer who
        never fired has none)."""
        rows = await conn.fetch(
            "SELECT customer_id, fire_sequence FROM triggers_customer_fires"
            " WHERE customer_id = ANY($1::text[]) ORDER BY customer_id FOR UPDATE",
            sorted(customer_ids),
        )
        return {r["customer_id"]: r["fire_sequence"] for r in rows}

    async def _write_fires(
        self,
        conn: Connection,
        firing: Sequence[FireCommit],
        fences_before: Mapping[str, int],
        fences_after: Mapping[str, int],
        delivery_lease: timedelta,
    ) -> dict[_EpisodeKey, tuple[triggers_pb2.Delivery, ...]]:
        """Write the fires decided on locked rows, in one statement: the episodes FIRED, the
        fences moved on, the fires, one delivery per destination that still exists. Their
        deliveries by episode (without payloads).

        Raises:
            _BatchRaced: a customer's first fence row was inserted meanwhile (nothing locked it).
        """
        moved_fences = sorted(c for c in fences_after if c in fences_before)
        first_fences = sorted(c for c in fences_after if c not in fences_before)
        fire_numbers, destination_ids, webhook_ids = [], [], []
        for number, commit in enumerate(firing, start=1):
            for destination in commit.destinations:
                fire_numbers.append(number)
                destination_ids.append(parse_destination_name(destination))
                webhook_ids.append(new_webhook_id(commit.fired_at))
        rows = await conn.fetch(
            f"""
            WITH firing AS (
                SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::timestamptz[],
                    $6::timestamptz[], $7::timestamptz[], $8::timestamptz[], $9::text[], $10::text[])
                    WITH ORDINALITY AS f(customer_id, trigger_id, episode_key, version, opened_at,
                        last_entry_at, fire_at, fired_at, body, owner, number)
            ), ep AS (
                -- The rows are locked and checked: the conditions only guard.
                UPDATE triggers_episodes e SET state = 'fired', opened_at = f.opened_at,
                    last_entry_at = f.last_entry_at, fire_at = f.fire_at, due_at = NULL,
                    closed_at = f.fired_at, close_reason = '{Reason.FIRED}', version = e.version + 1,
                    claimed_by = NULL, claimed_at = NULL, updated_at = now()
                FROM firing f
                WHERE e.customer_id = f.customer_id AND e.trigger_id = f.trigger_id
                  AND e.episode_key = f.episode_key AND e.version = f.version AND e.state = 'waiting'
                RETURNING 1
            ), moved_fence AS (
                UPDATE triggers_customer_fires c SET fire_sequence = s.fire_sequence
                FROM unnest($11::text[], $12::bigint[]) AS s(customer_id, fire_sequence)
                WHERE c.customer_id = s.customer_id
                RETURNING 1
            ), first_fence AS (
                -- In customer order too: two batches inserting the same customers wait in one order.
                INSERT INTO triggers_customer_fires (customer_id, fire_sequence)
                SELECT customer_id, fire_sequence FROM unnest($13::text[], $14::bigint[])
                    AS s(customer_id, fire_sequence)
                ORDER BY customer_id
                ON CONFLICT (customer_id) DO NOTHING
                RETURNING 1
            ), fire AS (
                INSERT INTO triggers_fires (customer_id, trigger_id, fired_at, episode_key)
                SELECT customer_id, trigger_id, fired_at, episode_key FROM firing
            ), made AS (
                INSERT INTO triggers_deliveries (destination_id, kind, webhook_id, trigger_id, customer_id,
                    episode_key, fired_at, state, payload, next_attempt_time, available_at, claimed_by,
                    created_at)
                SELECT d.id, d.kind, n.webhook_id, f.trigger_id, f.customer_id, f.episode_key, f.fired_at,
                       {PENDING}, f.body::jsonb, f.fired_at,
                       CASE WHEN d.kind = 'webhook' THEN f.fired_at + $18::interval ELSE f.fired_at END,
                       CASE WHEN d.kind = 'webhook' THEN f.owner END, f.fired_at
                FROM unnest($15::bigint[], $16::text[], $17::text[]) WITH ORDINALITY
                    AS n(number, destination_id, webhook_id, position)
                JOIN firing f ON f.number = n.number
                JOIN triggers_destinations d ON d.id = n.destination_id
                ORDER BY n.position
                RETURNING {_MADE_COLUMNS}
            )
            SELECT (SELECT count(*) FROM ep) AS fired_episodes,
                (SELECT count(*) FROM moved_fence) + (SELECT count(*) FROM first_fence) AS fences, m.*
            FROM (SELECT 1) AS one LEFT JOIN made m ON true
            """,
            [c.claimed.customer_id for c in firing],
            [c.claimed.trigger_id for c in firing],
            [c.claimed.episode.key for c in firing],
            [c.claimed.version for c in firing],
            [c.fired.opened_at for c in firing],
            [c.fired.last_entry_at for c in firing],
            [c.fired.fire_at for c in firing],
            [c.fired_at for c in firing],
            [c.body.decode() for c in firing],
            [c.claimed.owner for c in firing],
            moved_fences,
            [fences_after[customer_id] for customer_id in moved_fences],
            first_fences,
            [fences_after[customer_id] for customer_id in first_fences],
            fire_numbers,
            destination_ids,
            webhook_ids,
            delivery_lease,
        )
        if rows[0]["fired_episodes"] != len(firing) or rows[0]["fences"] != len(fences_after):
            raise _BatchRaced()
        made: dict[_EpisodeKey, list[triggers_pb2.Delivery]] = {}
        for row in sorted((r for r in rows if r["id"] is not None), key=lambda r: r["id"]):
            key = (row["customer_id"], row["trigger_id"], row["episode_key"])
            made.setdefault(key, []).append(delivery_of(row, payload=False))
        return {key: tuple(deliveries) for key, deliveries in made.items()}

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

    async def release_claims_not_in_hand(
        self, owner: str, in_hand: Collection[tuple[str, str, str]], now: datetime
    ) -> int:
        """Give up ``owner``'s claims other than ``in_hand`` (customer, trigger, key): due at
        ``now``, for any firer. After a claim whose answer was lost with the connection, the
        claim may have committed without its firer knowing of it; this spares it the lease.
        How many were given up."""
        status = await self._pool.execute(
            """
            UPDATE triggers_episodes
            SET due_at = $2, claimed_by = NULL, claimed_at = NULL, version = version + 1, updated_at = now()
            WHERE claimed_by = $1 AND state = 'waiting'
              AND (customer_id, trigger_id, episode_key) NOT IN (
                  SELECT * FROM unnest($3::text[], $4::text[], $5::text[]))
            """,
            owner,
            now,
            [slot[0] for slot in in_hand],
            [slot[1] for slot in in_hand],
            [slot[2] for slot in in_hand],
        )
        return int(status.rpartition(" ")[2])

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

# What a fire's statement returns of each delivery it made (delivery_of without the payload).
_MADE_COLUMNS: Final = (
    "id, destination_id, webhook_id, trigger_id, customer_id, episode_key, state, next_attempt_time,"
    " created_at"
)

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


def _decide_in_order(
    commits: Sequence[FireCommit], waiting: Mapping[_EpisodeKey, int], fences: Mapping[str, int]
) -> tuple[list[CommitOutcome], dict[str, int]]:
    """Each commit's outcome, as commit_fire's statement would decide it after the commits
    before it, on the locked rows (``waiting``: the versions of the episodes still waiting;
    ``fences``: the customers' fire sequences); and the fence of each customer who fires, after
    the batch."""
    waiting = dict(waiting)
    sequences = dict(fences)
    fences_after: dict[str, int] = {}
    outcomes = []
    for commit in commits:
        key = _key_of(commit.claimed)
        customer_id = commit.claimed.customer_id
        sequence = sequences.get(customer_id)  # None: the customer never fired
        if waiting.get(key) != commit.claimed.version:
            outcomes.append(CommitOutcome.EPISODE_CHANGED)
        # Without a fence row, the fire applies whatever sequence it read (commit_fire's insert).
        elif sequence is not None and sequence != commit.facts.sequence:
            outcomes.append(CommitOutcome.FIRES_CHANGED)
        else:
            outcomes.append(CommitOutcome.COMMITTED)
            sequences[customer_id] = fences_after[customer_id] = (sequence or 0) + 1
            del waiting[key]  # FIRED now: a second commit of the episode finds it changed
    return outcomes, fences_after


def _key_of(claimed: ClaimedEpisode) -> _EpisodeKey:
    return (claimed.customer_id, claimed.trigger_id, claimed.episode.key)


def _check_fired(claimed: ClaimedEpisode, fired: Episode) -> None:
    if fired.state != EpisodeState.FIRED or fired.closed_at is None or fired.key != claimed.episode.key:
        raise ValueError("a fire commits a FIRED episode of the claimed key")
