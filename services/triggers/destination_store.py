"""Stored destinations: the Destination message, its state and disabled reason, a webhook's
signing secrets (sealed), and its health as the delivery log keeps it.

**Secrets.** The service must sign with a webhook's secrets, so it keeps them, but sealed with
its own key (``secret_box.SecretBox``, AES-256-GCM, the destination's id as associated data):
reading the table, a dump or a backup gives no usable secret. No read but ``signing_keys`` and
``webhooks`` (what the dispatcher loads) selects the column, and neither puts a secret in a
Destination message: ``get``, ``list`` and every write answer without them. The secret is shown
once, by the servicer, from what it passed to ``create`` or ``rotate_secret``.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any, Final, NoReturn

import asyncpg
import orjson

from sendtime.triggers.v1 import triggers_pb2
from sendtime_common.paging import decode_id_position, encode_id_position
from triggers.delivery_log import DestinationHealth
from triggers.secret_box import SecretBox
from triggers.signing import SigningKeys
from triggers.store import AlreadyExists, EtagMismatch, NotFound, new_etag

NAME_PREFIX: Final = "destinations/"
DESTINATION_ID: Final = re.compile(r"[a-z][a-z0-9-]{0,62}")
_LIST_FILTERS = {"collection": "destinations"}
_COLUMNS = (
    "id, kind, content, state, disabled_reason, previous_secret_expire_time, etag, created_at, updated_at"
)


class InvalidName(ValueError):
    """Not a ``destinations/{destination_id}`` name."""


def destination_name(destination_id: str) -> str:
    return f"{NAME_PREFIX}{destination_id}"


def parse_destination_name(name: str) -> str:
    """The id in ``destinations/{destination_id}``.

    Raises:
        InvalidName: another shape, or an invalid id.
    """
    destination_id = name.removeprefix(NAME_PREFIX)
    if destination_id == name or not DESTINATION_ID.fullmatch(destination_id):
        raise InvalidName("must look like destinations/braze (an id of 1 to 63 of a-z, 0-9 and -)")
    return destination_id


class DestinationStore:
    """Destinations; each method is one transaction."""

    def __init__(self, pool: asyncpg.Pool, secret_box: SecretBox) -> None:
        self._pool = pool
        self._box = secret_box

    async def create(
        self,
        destination_id: str,
        destination: triggers_pb2.Destination,
        *,
        signing_keys: SigningKeys | None = None,
    ) -> triggers_pb2.Destination:
        """Store a new destination, enabled; a webhook's with its ``signing_keys``.

        Raises:
            AlreadyExists: the id is taken.
            ValueError: no kind; a webhook without keys, or a subscription with some.
        """
        kind = _kind(destination)
        if (kind == "webhook") != (signing_keys is not None):
            raise ValueError("a webhook destination has signing keys, a subscription none")
        row = await self._pool.fetchrow(
            f"""
            INSERT INTO triggers_destinations
                (id, kind, content, state, signing_keys, previous_secret_expire_time, etag)
            VALUES ($1, $2, $3, $4, $5, $6, $7)
            ON CONFLICT (id) DO NOTHING
            RETURNING {_COLUMNS}
            """,
            destination_id,
            kind,
            _content(destination),
            triggers_pb2.DESTINATION_STATE_ENABLED,
            self._seal(destination_id, signing_keys) if signing_keys is not None else None,
            signing_keys.previous_expire_time if signing_keys is not None else None,
            new_etag(),
        )
        if row is None:
            raise AlreadyExists(f"{destination_name(destination_id)} exists already")
        return destination_of(row)

    async def get(self, destination_id: str) -> triggers_pb2.Destination:
        """The destination, without secrets.

        Raises:
            NotFound: no destination has the id.
        """
        row = await self._pool.fetchrow(
            f"SELECT {_COLUMNS} FROM triggers_destinations WHERE id = $1", destination_id
        )
        if row is None:
            raise NotFound(f"{destination_name(destination_id)} does not exist")
        return destination_of(row)

    async def update(
        self, destination_id: str, destination: triggers_pb2.Destination, *, etag: str = ""
    ) -> triggers_pb2.Destination:
        """Replace the destination with ``destination`` (the kind cannot change). Its ``state``,
        when set, is the new state: enabling a disabled destination clears its disabled reason
        and the failures its health counted, or the next failure would disable it again. With
        ``etag``, only if it is the stored one.

        Raises:
            NotFound: no destination has the id.
            EtagMismatch: ``etag`` is given and stale.
            ValueError: another kind than the stored one.
        """
        kind = _kind(destination)
        row = await self._pool.fetchrow(
            f"""
            UPDATE triggers_destinations SET
                content = $3,
                state = CASE WHEN $4 = 0 THEN state ELSE $4 END,
                disabled_reason = CASE WHEN $4 = {triggers_pb2.DESTINATION_STATE_ENABLED} THEN ''
                                       ELSE disabled_reason END,
                failing_since = CASE
                    WHEN $4 = {triggers_pb2.DESTINATION_STATE_ENABLED}
                     AND state = {triggers_pb2.DESTINATION_STATE_DISABLED} THEN NULL
                    ELSE failing_since END,
                etag = $6,
                updated_at = now()
            WHERE id = $1 AND kind = $2 AND ($5 = '' OR etag = $5)
            RETURNING {_COLUMNS}
            """,
            destination_id,
            kind,
            _content(destination),
            int(destination.state),
            etag,
            new_etag(),
        )
        if row is None:
            await self._refuse(destination_id, kind)
        return destination_of(row)

    async def rotate_secret(
        self, destination_id: str, new_secret: str, previous_ttl: timedelta, now: datetime
    ) -> triggers_pb2.Destination:
        """Make ``new_secret`` the webhook's signing secret; the current one keeps signing too
        for ``previous_ttl`` (signing.SigningKeys.rotated).

        Raises:
            NotFound: no webhook destination has the id.
            signing.InvalidSecret: ``new_secret`` is malformed.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            stored = await conn.fetchrow(
                "SELECT signing_keys, previous_secret_expire_time FROM triggers_destinations"
                " WHERE id = $1 AND kind = 'webhook' FOR UPDATE",
                destination_id,
            )
            if stored is None:
                raise NotFound(f"{destination_name(destination_id)} is not a webhook destination")
            keys = self._open(destination_id, stored).rotated(new_secret, previous_ttl, now)
            row = await conn.fetchrow(
                f"""
                UPDATE triggers_destinations
                SET signing_keys = $2, previous_secret_expire_time = $3, etag = $4, updated_at = now()
                WHERE id = $1
                RETURNING {_COLUMNS}
                """,
                destination_id,
                self._seal(destination_id, keys),
                keys.previous_expire_time,
                new_etag(),
            )
        return destination_of(row)

    async def delete(self, destination_id: str) -> int:
        """Delete the destination and its deliveries (their attempts too); how many of those
        were pending (they are discarded).

        Raises:
            NotFound: no destination has the id.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            found = await conn.fetchval(
                "SELECT 1 FROM triggers_destinations WHERE id = $1 FOR UPDATE", destination_id
            )
            if found is None:
                raise NotFound(f"{destination_name(destination_id)} does not exist")
            pending = await conn.fetchval(
                "WITH gone AS (DELETE FROM triggers_deliveries WHERE destination_id = $1 RETURNING state)"
                f" SELECT count(*) FILTER (WHERE state = {triggers_pb2.DELIVERY_STATE_PENDING}) FROM gone",
                destination_id,
            )
            await conn.execute("DELETE FROM triggers_destinations WHERE id = $1", destination_id)
        return int(pending)

    async def signing_keys(self, destination_id: str) -> SigningKeys:
        """A webhook's secrets, for signing.

        Raises:
            NotFound: no webhook destination has the id.
            secret_box.SealedWithUnknownKey: sealed with a key no longer configured.
        """
        stored = await self._pool.fetchrow(
            "SELECT signing_keys, previous_secret_expire_time FROM triggers_destinations"
            " WHERE id = $1 AND kind = 'webhook'",
            destination_id,
        )
        if stored is None:
            raise NotFound(f"{destination_name(destination_id)} is not a webhook destination")
        return self._open(destination_id, stored)

    async def webhooks(self) -> list[tuple[triggers_pb2.Destination, SigningKeys]]:
        """Every webhook destination with its secrets: what a dispatcher sets up at start.

        Raises:
            secret_box.SealedWithUnknownKey: one was sealed with a key no longer configured.
        """
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS}, signing_keys FROM triggers_destinations WHERE kind = 'webhook' ORDER BY id"
        )
        return [(destination_of(row), self._open(row["id"], row)) for row in rows]

    async def health(self, destination_id: str) -> DestinationHealth:
        """Raises:
        NotFound: no destination has the id.
        """
        row = await self._pool.fetchrow(
            "SELECT last_success_time, failing_since FROM triggers_destinations WHERE id = $1", destination_id
        )
        if row is None:
            raise NotFound(f"{destination_name(destination_id)} does not exist")
        return DestinationHealth(row["last_success_time"], row["failing_since"])

    async def list(self, *, page_size: int, page_token: str) -> tuple[list[triggers_pb2.Destination], str]:
        """One page of destinations by name, without secrets, and the next page's token.

        Raises:
            sendtime_common.paging.InvalidPageToken: not a token from this listing.
        """
        after = decode_id_position(page_token, _LIST_FILTERS)
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM triggers_destinations WHERE $1::text IS NULL OR id > $1"
            " ORDER BY id LIMIT $2",
            after,
            page_size + 1,
        )
        page = rows[:page_size]
        token = encode_id_position(page[-1]["id"], _LIST_FILTERS) if len(rows) > page_size else ""
        return [destination_of(row) for row in page], token

    def _seal(self, destination_id: str, keys: SigningKeys) -> bytes:
        plain = orjson.dumps({"current": keys.current, "previous": keys.previous})
        return self._box.seal(plain, _associated_data(destination_id))

    def _open(self, destination_id: str, row: Any) -> SigningKeys:
        """The keys of a row with signing_keys and previous_secret_expire_time."""
        secrets = orjson.loads(self._box.open(row["signing_keys"], _associated_data(destination_id)))
        return SigningKeys(secrets["current"], secrets["previous"], row["previous_secret_expire_time"])

    async def _refuse(self, destination_id: str, kind: str) -> NoReturn:
        name = destination_name(destination_id)
        stored = await self._pool.fetchval(
            "SELECT kind FROM triggers_destinations WHERE id = $1", destination_id
        )
        if stored is None:
            raise NotFound(f"{name} does not exist")
        if stored != kind:
            raise ValueError(f"{name} is a {stored} destination; its kind is fixed")
        raise EtagMismatch(f"{name} changed since it was read")


def _associated_data(destination_id: str) -> bytes:
    return f"triggers_destinations.signing_keys:{destination_id}".encode()


def _kind(destination: triggers_pb2.Destination) -> str:
    kind = destination.WhichOneof("kind")
    if kind is None:
        raise ValueError("a destination is a webhook or a subscription")
    return kind


def _content(destination: triggers_pb2.Destination) -> bytes:
    content = triggers_pb2.Destination()
    content.CopyFrom(destination)
    for output_only in ("name", "state", "disabled_reason", "create_time", "update_time", "etag"):
        content.ClearField(output_only)
    if content.HasField("webhook"):
        content.webhook.ClearField("previous_secret_expire_time")
    return content.SerializeToString(deterministic=True)


def destination_of(row: Any) -> triggers_pb2.Destination:
    """The Destination of a row with the columns of ``_COLUMNS`` (never a secret)."""
    destination = triggers_pb2.Destination.FromString(row["content"])
    destination.name = destination_name(row["id"])
    destination.state = row["state"]
    destination.disabled_reason = row["disabled_reason"]
    destination.etag = row["etag"]
    destination.create_time.FromDatetime(row["created_at"])
    destination.update_time.FromDatetime(row["updated_at"])
    if row["previous_secret_expire_time"] is not None and destination.HasField("webhook"):
        destination.webhook.previous_secret_expire_time.FromDatetime(row["previous_secret_expire_time"])
    return destination
