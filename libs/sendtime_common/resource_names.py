"""Resource names with a numeric id (AIP-122), such as ``rejectedEvents/123``."""

from __future__ import annotations

# Ids are PostgreSQL bigints; a longer number would fail in the query instead of here.
MAX_ID_DIGITS = 18


class InvalidName(ValueError):
    """Not a ``{collection}/{id}`` name of the expected collection."""


def numeric_id(name: str, prefix: str) -> int:
    """The id in ``{prefix}{id}`` (``prefix`` such as ``rejectedEvents/``).

    Raises:
        InvalidName: the name has another shape, or an id past a bigint.
    """
    suffix = name.removeprefix(prefix)
    if suffix == name or not suffix.isdigit() or len(suffix) > MAX_ID_DIGITS:
        raise InvalidName(f"must look like {prefix}123")
    return int(suffix)
