"""Stored triggers: the Trigger message as validated, its state (active or paused) and etag.

A row holds the trigger without its output-only fields (name, state, times, etag), which are
columns and are filled in on every read. The store checks no definition (the servicer validates
before it stores) and applies no update mask (the servicer merges the mask into the trigger it
read, and stores the result with the etag it read: a concurrent change in between is then an
``EtagMismatch``, never a lost update).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NoReturn

import asyncpg

from sendtime.triggers.v1 import triggers_pb2
from sendtime_common.paging import decode_id_position, encode_id_position
from triggers.store import AlreadyExists, EtagMismatch, NotFound, new_etag
from triggers.trigger_validation import trigger_name

_LIST_FILTERS = {"collection": "triggers"}  # ListTriggers has no filters; this refuses other lists' tokens
_COLUMNS = "id, content, state, etag, created_at, updated_at"


class TriggerStore:
    """Triggers; each method is one transaction."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def create(
        self, trigger_id: str, trigger: triggers_pb2.Trigger, *, paused: bool = False
    ) -> triggers_pb2.Trigger:
        """Store a new trigger, active unless ``paused``; the trigger as stored.

        Raises:
            AlreadyExists: the id is taken.
        """
        row = await self._pool.fetchrow(
            f"INSERT INTO triggers_triggers (id, content, state, etag) VALUES ($1, $2, $3, $4)"
            f" ON CONFLICT (id) DO NOTHING RETURNING {_COLUMNS}",
            trigger_id,
            _content(trigger),
            triggers_pb2.TRIGGER_STATE_PAUSED if paused else triggers_pb2.TRIGGER_STATE_ACTIVE,
            new_etag(),
        )
        if row is None:
            raise AlreadyExists(f"{trigger_name(trigger_id)} exists already")
        return trigger_of(row)

    async def get(self, trigger_id: str) -> triggers_pb2.Trigger:
        """Raises:
        NotFound: no trigger has the id.
        """
        row = await self._pool.fetchrow(f"SELECT {_COLUMNS} FROM triggers_triggers WHERE id = $1", trigger_id)
        if row is None:
            raise NotFound(f"{trigger_name(trigger_id)} does not exist")
        return trigger_of(row)

    async def list(self, *, page_size: int, page_token: str) -> tuple[list[triggers_pb2.Trigger], str]:
        """One page of triggers by name, and the next page's token ('' on the last page).

        Raises:
            sendtime_common.paging.InvalidPageToken: not a token from this listing.
        """
        after = decode_id_position(page_token, _LIST_FILTERS)
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM triggers_triggers WHERE $1::text IS NULL OR id > $1"
            " ORDER BY id LIMIT $2",
            after,
            page_size + 1,
        )
        page = rows[:page_size]
        token = encode_id_position(page[-1]["id"], _LIST_FILTERS) if len(rows) > page_size else ""
        return [trigger_of(row) for row in page], token

    async def update(
        self, trigger_id: str, trigger: triggers_pb2.Trigger, *, etag: str = ""
    ) -> triggers_pb2.Trigger:
        """Replace the trigger's definition with ``trigger`` (its output-only fields are not
        read; the state stays). With ``etag``, only if it is the stored one. Waiting episodes
        keep their fire times; the new definition applies at their fire.

        Raises:
            NotFound: no trigger has the id.
            EtagMismatch: ``etag`` is given and stale.
        """
        row = await self._pool.fetchrow(
            f"""
            UPDATE triggers_triggers SET content = $2, etag = $4, updated_at = now()
            WHERE id = $1 AND ($3 = '' OR etag = $3)
            RETURNING {_COLUMNS}
            """,
            trigger_id,
            _content(trigger),
            etag,
            new_etag(),
        )
        if row is None:
            await self._raise_missing_or_stale(trigger_id)
        return trigger_of(row)

    async def pause(self, trigger_id: str) -> triggers_pb2.Trigger:
        """Pause the trigger: it opens no episode, and its due episodes wait (the firers park
        them until it resumes).

        Raises:
            NotFound: no trigger has the id.
        """
        return trigger_of(await _set_state(self._pool, trigger_id, triggers_pb2.TRIGGER_STATE_PAUSED))

    async def resume(self, trigger_id: str, now: datetime) -> tuple[triggers_pb2.Trigger, int]:
        """Make the trigger active again, and in the same transaction make the episodes the
        firers parked while it was paused due at ``now``; the trigger and how many woke.

        A firer parks an episode only while holding a share lock on the trigger's row and seeing
        it paused (EpisodeStore.commit_decision), and this update takes that row first: a park
        either commits before it (and is woken here) or sees the trigger active.

        Raises:
            NotFound: no trigger has the id.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            row = await _set_state(conn, trigger_id, triggers_pb2.TRIGGER_STATE_ACTIVE)
            woken = await conn.execute(
                """
                UPDATE triggers_episodes SET due_at = $2, version = version + 1, updated_at = now()
                WHERE trigger_id = $1 AND state = 'waiting' AND due_at = 'infinity'
                """,
                trigger_id,
                now,
            )
        return trigger_of(row), int(woken.rpartition(" ")[2])

    async def delete(self, trigger_id: str) -> int:
        """Delete the trigger, and with it its episodes and known exits, in one transaction; how
        many episodes were waiting (they end unfired: a firer that claimed one finds it gone at
        its commit). Its fires stay: the frequency cap still counts them.

        Raises:
            NotFound: no trigger has the id.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            # The row lock first: an episode being opened for the trigger (its foreign key
            # check) either committed before, and is deleted below, or waits and then fails.
            found = await conn.fetchval(
                "SELECT 1 FROM triggers_triggers WHERE id = $1 FOR UPDATE", trigger_id
            )
            if found is None:
                raise NotFound(f"{trigger_name(trigger_id)} does not exist")
            # Its episodes locked in the order a firer's batch locks them (commit_fires): a batch
            # holding some of them is waited for, never deadlocked with.
            await conn.execute(
                "SELECT 1 FROM triggers_episodes WHERE trigger_id = $1"
                " ORDER BY customer_id, trigger_id, episode_key FOR UPDATE",
                trigger_id,
            )
            waiting = await conn.fetchval(
                "WITH gone AS (DELETE FROM triggers_episodes WHERE trigger_id = $1 RETURNING state)"
                " SELECT count(*) FILTER (WHERE state = 'waiting') FROM gone",
                trigger_id,
            )
            await conn.execute("DELETE FROM triggers_triggers WHERE id = $1", trigger_id)
        return int(waiting)

    async def _raise_missing_or_stale(self, trigger_id: str) -> NoReturn:
        exists = await self._pool.fetchval("SELECT 1 FROM triggers_triggers WHERE id = $1", trigger_id)
        if exists is None:
            raise NotFound(f"{trigger_name(trigger_id)} does not exist")
        raise EtagMismatch(f"{trigger_name(trigger_id)} changed since it was read")


async def _set_state(
    db: asyncpg.Pool | asyncpg.pool.PoolConnectionProxy[asyncpg.Record],
    trigger_id: str,
    state: triggers_pb2.TriggerState.ValueType,
) -> asyncpg.Record:
    """Set the trigger's state; its etag and update time change only when the state does.

    Raises:
        NotFound: no trigger has the id.
    """
    row = await db.fetchrow(
        f"""
        UPDATE triggers_triggers
        SET state = $2, etag = CASE WHEN state = $2 THEN etag ELSE $3 END,
            updated_at = CASE WHEN state = $2 THEN updated_at ELSE now() END
        WHERE id = $1
        RETURNING {_COLUMNS}
        """,
        trigger_id,
        state,
        new_etag(),
    )
    if row is None:
        raise NotFound(f"{trigger_name(trigger_id)} does not exist")
    return row


def _content(trigger: triggers_pb2.Trigger) -> bytes:
    """The trigger as stored: without the fields the columns hold."""
    content = triggers_pb2.Trigger()
    content.CopyFrom(trigger)
    for output_only in ("name", "state", "create_time", "update_time", "etag"):
        content.ClearField(output_only)
    return content.SerializeToString(deterministic=True)


def trigger_of(row: Any, prefix: str = "") -> triggers_pb2.Trigger:
    """The Trigger of a row with id, content, state, etag, created_at and updated_at (each
    column name after ``prefix``)."""
    trigger = triggers_pb2.Trigger.FromString(row[f"{prefix}content"])
    trigger.name = trigger_name(row[f"{prefix}id"])
    trigger.state = row[f"{prefix}state"]
    trigger.etag = row[f"{prefix}etag"]
    trigger.create_time.FromDatetime(row[f"{prefix}created_at"])
    trigger.update_time.FromDatetime(row[f"{prefix}updated_at"])
    return trigger
