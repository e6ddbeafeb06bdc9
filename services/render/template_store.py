"""Stored templates in PostgreSQL: immutable versions, a published pointer, and the small cache
sends read through.

Every content change is a new version; a version never changes once stored (the migration's
trigger refuses updates), so a send that names a version is reproducible. A template's row holds
what does change: its display name, its latest version number and which version is published.
An update numbers its version while holding that row's lock, so concurrent updates get distinct
versions.

Sends read with ``get_for_render``, which caches in this process: versions without expiry (they
are immutable; an LRU bounds the memory), and each template's published pointer for
``published_ttl_s``. A publish is therefore seen by every replica within ``published_ttl_s``
(at once by the replica that made it), without a PostgreSQL round trip per send.

An expired pointer is read again once (one read per template, whatever the number of sends
waiting), and a send waits for that read at most ``REFRESH_WAIT_S``: when PostgreSQL is slow or
stalled, sends go on with the pointer last seen instead of running past their deadline (the
fault matrix, docs/reliability.md, found every render late during a 2 s stall).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import asyncpg
from cachetools import LRUCache

from render.template_validation import template_name
from sendtime.render.v1 import render_pb2
from sendtime_common.database import STORE_ERRORS
from sendtime_common.paging import decode_id_position, encode_id_position

log = logging.getLogger(__name__)

StoreError = STORE_ERRORS
"""What a store call raises when PostgreSQL is unreachable or fails."""

# How long a send waits for its template's expired published pointer to be read again before it
# goes on with the one last seen (a read normally takes a millisecond).
REFRESH_WAIT_S = 0.05

_LIST_FILTERS = {"collection": "templates"}  # ListTemplates has no filters; this rejects other APIs' tokens


class TemplateNotFound(LookupError):
    """No template has the id."""


class VersionNotFound(LookupError):
    """The template exists but has no such version."""


class TemplateAlreadyExists(Exception):
    """A template with the id exists already."""


@dataclass(frozen=True, slots=True)
class _Pointer:
    """What a template's row says, as cached: possibly stale by up to the TTL. A template that
    does not exist is cached too (``exists`` false), so sends naming a wrong id do not each cost
    a query."""

    exists: bool
    display_name: str
    published_version: int
    expires_at: float


@dataclass(frozen=True, slots=True)
class _Version:
    content: render_pb2.Template  # never handed out: callers get copies
    created_at: datetime


_SELECT_VERSION = """
    SELECT t.display_name, coalesce(t.published_version, 0) AS published_version,
           v.version, v.content, v.created_at
    FROM render_templates t
    LEFT JOIN render_template_versions v
      ON v.template_id = t.id
     AND v.version = CASE WHEN $2::bigint <> 0 THEN $2::bigint
                          WHEN $3 THEN t.published_version ELSE t.latest_version END
    WHERE t.id = $1
"""


class TemplateStore:
    """Templates and their versions; every method is one statement (one round trip)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        cache_size: int = 1024,
        published_ttl_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._published_ttl_s = published_ttl_s
        self._clock = clock
        self._versions: LRUCache[tuple[str, int], _Version] = LRUCache(cache_size)
        self._pointers: LRUCache[str, _Pointer] = LRUCache(cache_size)
        # The pointer reads in flight, by template id, with when each started (monotonic).
        self._reading: dict[str, tuple[asyncio.Task[_Pointer], float]] = {}

    async def create(
        self, template_id: str, display_name: str, content: render_pb2.Template, *, publish: bool
    ) -> render_pb2.StoredTemplate:
        """Store version 1 of a new template (published too when ``publish``).

        Raises:
            TemplateAlreadyExists: the id is taken.
        """
        row = await self._pool.fetchrow(
            """
            WITH t AS (
                INSERT INTO render_templates (id, display_name, latest_version, published_version)
                VALUES ($1, $2, 1, CASE WHEN $4 THEN 1 END)
                ON CONFLICT (id) DO NOTHING
                RETURNING id, display_name, coalesce(published_version, 0) AS published_version
            ), v AS (
                INSERT INTO render_template_versions (template_id, version, content)
                SELECT id, 1, $3 FROM t
                RETURNING version, content, created_at
            )
            SELECT t.display_name, t.published_version, v.version, v.content, v.created_at FROM t, v
            """,
            template_id,
            display_name,
            _serialize(content),
            publish,
        )
        if row is None:
            raise TemplateAlreadyExists(template_name(template_id))
        self._pointers.pop(template_id, None)  # a cached "no such template" on this replica
        return _stored(template_id, row)

    async def update(
        self,
        template_id: str,
        *,
        content: render_pb2.Template | None,
        display_name: str | None,
        publish: bool = False,
    ) -> render_pb2.StoredTemplate:
        """A new version with ``content`` (published too when ``publish``), and/or a new display
        name; a display-name-only update makes no version and returns the latest.

        Raises:
            TemplateNotFound: no template has the id.
            ValueError: ``publish`` without new content, or nothing to change.
        """
        if content is None:
            if publish or display_name is None:
                raise ValueError("publish needs new content" if publish else "nothing to update")
            row = await self._pool.fetchrow(
                """
                WITH t AS (
                    UPDATE render_templates SET display_name = $2, updated_at = now()
                    WHERE id = $1
                    RETURNING id, display_name, latest_version,
                              coalesce(published_version, 0) AS published_version
                )
                SELECT t.display_name, t.published_version, v.version, v.content, v.created_at
                FROM t
                JOIN render_template_versions v ON v.template_id = t.id AND v.version = t.latest_version
                """,
                template_id,
                display_name,
            )
        else:
            # The UPDATE locks the template's row: a concurrent update waits, then numbers its
            # version from the committed latest_version.
            row = await self._pool.fetchrow(
                """
                WITH t AS (
                    UPDATE render_templates
                    SET latest_version = latest_version + 1,
                        published_version = CASE WHEN $4 THEN latest_version + 1 ELSE published_version END,
                        display_name = coalesce($3, display_name),
                        updated_at = now()
                    WHERE id = $1
                    RETURNING id, display_name, latest_version,
                              coalesce(published_version, 0) AS published_version
                ), v AS (
                    INSERT INTO render_template_versions (template_id, version, content)
                    SELECT id, latest_version, $2 FROM t
                    RETURNING version, content, created_at
                )
                SELECT t.display_name, t.published_version, v.version, v.content, v.created_at FROM t, v
                """,
                template_id,
                _serialize(content),
                display_name,
                publish,
            )
        if row is None:
            raise TemplateNotFound(template_name(template_id))
        self._pointers.pop(template_id, None)
        return _stored(template_id, row)

    async def get(self, template_id: str, version: int = 0) -> render_pb2.StoredTemplate:
        """The template at ``version``; 0 for the latest.

        Raises:
            TemplateNotFound: no template has the id.
            VersionNotFound: it has no such version.
        """
        row = await self._pool.fetchrow(_SELECT_VERSION, template_id, version, False)
        if row is None:
            raise TemplateNotFound(template_name(template_id))
        if row["version"] is None:
            raise VersionNotFound(f"{template_name(template_id)} has no version {version}")
        return _stored(template_id, row)

    async def list(self, *, page_size: int, page_token: str) -> tuple[list[render_pb2.StoredTemplate], str]:
        """One page of templates at their latest versions, by name, and the next page's token
        ('' on the last page).

        Raises:
            sendtime_common.paging.InvalidPageToken: not a token from this listing.
        """
        after = decode_id_position(page_token, _LIST_FILTERS)
        rows = await self._pool.fetch(
            """
            SELECT t.id, t.display_name, coalesce(t.published_version, 0) AS published_version,
                   v.version, v.content, v.created_at
            FROM render_templates t
            JOIN render_template_versions v ON v.template_id = t.id AND v.version = t.latest_version
            WHERE $1::text IS NULL OR t.id > $1
            ORDER BY t.id
            LIMIT $2
            """,
            after,
            page_size + 1,
        )
        page = rows[:page_size]
        token = encode_id_position(page[-1]["id"], _LIST_FILTERS) if len(rows) > page_size else ""
        return [_stored(row["id"], row) for row in page], token

    async def publish(self, template_id: str, version: int) -> render_pb2.StoredTemplate:
        """Make ``version`` the one sends use (an older one too: that is a rollback).

        Raises:
            TemplateNotFound: no template has the id.
            VersionNotFound: it has no such version.
        """
        try:
            row = await self._pool.fetchrow(
                """
                WITH t AS (
                    UPDATE render_templates SET published_version = $2, updated_at = now()
                    WHERE id = $1
                    RETURNING id, display_name, published_version
                )
                SELECT t.display_name, t.published_version, v.version, v.content, v.created_at
                FROM t JOIN render_template_versions v ON v.template_id = t.id AND v.version = $2
                """,
                template_id,
                version,
            )
        except asyncpg.ForeignKeyViolationError:  # the published version must exist
            raise VersionNotFound(f"{template_name(template_id)} has no version {version}") from None
        if row is None:
            raise TemplateNotFound(template_name(template_id))
        self._pointers.pop(template_id, None)
        return _stored(template_id, row)

    async def get_for_render(self, template_id: str, version: int) -> render_pb2.StoredTemplate | None:
        """The template to send: ``version``, or the published one for 0. None when there is
        none: no such template or version, or (for 0) nothing published.

        Usually answered from the cache. ``published_version`` and ``display_name`` in the
        answer may be up to ``published_ttl_s`` old (older while PostgreSQL is unreachable or
        slower than ``REFRESH_WAIT_S``: then the pointer last seen is used); the content is
        always that of the version.

        Raises:
            StoreError: PostgreSQL failed (on a cache miss).
        """
        now = self._clock()
        pointer = self._pointers.get(template_id)
        if pointer is None:  # nothing to send with but what PostgreSQL says: wait for it
            pointer = await asyncio.shield(self._read_pointer(template_id, now)[0])
        elif pointer.expires_at <= now:
            pointer = await self._refreshed(template_id, pointer, now)
        if not pointer.exists:
            return None
        wanted = version or pointer.published_version
        if wanted == 0:
            return None
        cached = self._versions.get((template_id, wanted))
        if cached is None:
            row = await self._pool.fetchrow(
                "SELECT content, created_at FROM render_template_versions"
                " WHERE template_id = $1 AND version = $2",
                template_id,
                wanted,
            )
            if row is None:
                return None
            cached = self._cache_version(template_id, wanted, row)
        return _build(template_id, pointer.display_name, pointer.published_version, wanted, cached)

    def _read_pointer(self, template_id: str, now: float) -> tuple[asyncio.Task[_Pointer], float]:
        """The read of ``template_id``'s pointer in flight, or a new one (with its published
        version's content, cached), and when it started (monotonic)."""
        reading = self._reading.get(template_id)
        if reading is None:
            task = asyncio.ensure_future(self._load_pointer(template_id, now))
            reading = self._reading[template_id] = (task, time.monotonic())
            task.add_done_callback(lambda done: self._read_done(template_id, done))
        return reading

    def _read_done(self, template_id: str, task: asyncio.Task[_Pointer]) -> None:
        if self._reading.get(template_id, (None, 0.0))[0] is task:
            del self._reading[template_id]
        if not task.cancelled():
            task.exception()  # retrieved: a send that stopped waiting would leave it unread

    async def _refreshed(self, template_id: str, stale: _Pointer, now: float) -> _Pointer:
        """The pointer read again, or ``stale`` while the read fails or takes longer than
        ``REFRESH_WAIT_S`` (from its start: later sends do not each wait again)."""
        task, started = self._read_pointer(template_id, now)
        waited = time.monotonic() - started
        try:
            return await asyncio.wait_for(asyncio.shield(task), max(0.0, REFRESH_WAIT_S - waited))
        except TimeoutError:
            return stale  # the read goes on; the sends after it will see what it found
        except StoreError:
            # Sends go on with the pointer this replica last saw (a publish made during the
            # outage is seen when PostgreSQL answers again), asking again after another TTL.
            log.warning("template store unavailable; using the last published version seen")
            pointer = replace(stale, expires_at=now + self._published_ttl_s)
            self._pointers[template_id] = pointer
            return pointer

    async def _load_pointer(self, template_id: str, now: float) -> _Pointer:
        row = await self._pool.fetchrow(_SELECT_VERSION, template_id, 0, True)
        expires_at = now + self._published_ttl_s
        if row is None:
            pointer = _Pointer(False, "", 0, expires_at)
        else:
            pointer = _Pointer(True, row["display_name"], row["published_version"], expires_at)
            if row["version"] is not None:
                self._cache_version(template_id, row["version"], row)
        self._pointers[template_id] = pointer
        return pointer

    def _cache_version(self, template_id: str, version: int, row: Any) -> _Version:
        cached = _Version(render_pb2.Template.FromString(row["content"]), row["created_at"])
        self._versions[(template_id, version)] = cached
        return cached


def _serialize(content: render_pb2.Template) -> bytes:
    return content.SerializeToString(deterministic=True)


def _stored(template_id: str, row: Any) -> render_pb2.StoredTemplate:
    """A StoredTemplate from a row with display_name, published_version, version, content and
    created_at."""
    return _build(
        template_id,
        row["display_name"],
        row["published_version"],
        row["version"],
        _Version(render_pb2.Template.FromString(row["content"]), row["created_at"]),
    )


def _build(
    template_id: str, display_name: str, published_version: int, version: int, stored: _Version
) -> render_pb2.StoredTemplate:
    template = render_pb2.StoredTemplate(
        name=template_name(template_id),
        display_name=display_name,
        version=version,
        content=stored.content,  # copied into the message: the cached one stays untouched
        published_version=published_version,
    )
    template.create_time.FromDatetime(stored.created_at)
    return template
