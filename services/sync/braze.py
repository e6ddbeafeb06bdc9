"""Traits to Braze: ``POST /users/track`` attribute objects, 75 a request, at Braze's published
rate (3,000 requests per 3 seconds per workspace; its 429 carries ``X-RateLimit-Reset``).

Each item becomes one attribute object naming the user by ``external_id`` (the store's user id,
Sendtime's ``user_id``) or, without one, by ``email``; Braze creates the user when it has none.
Braze answers 201 ``{"message": "success"}`` with, for items it could not take, ``errors``
naming the array and index of each: those items are REFUSED, the rest PUSHED. A 400 whose
errors name items refuses those items and sends the others again on their own; a 400 naming
none refuses the whole batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sync.provider_http import ProviderApi, ProviderRefused
from sync.push import ItemOutcome, ItemResult, PushItem, batches

TRACK_PATH = "/users/track"
BATCH_SIZE = 75
# Sendtime trait -> Braze's standard attribute, where Braze has one; other traits are custom
# attributes under their own names.
STANDARD_ATTRIBUTES: Mapping[str, str] = {
    "first_name": "first_name",
    "last_name": "last_name",
    "phone": "phone",
    "city": "home_city",
    "country": "country",
    "language": "language",
    "birthday": "dob",
}


def attribute_object(item: PushItem, names: Mapping[str, str] = STANDARD_ATTRIBUTES) -> dict[str, Any]:
    """The item as one of /users/track's attribute objects (pure)."""
    obj: dict[str, Any] = {names.get(trait, trait): value for trait, value in item.attributes.items()}
    if item.external_id:
        obj["external_id"] = item.external_id
    else:
        obj["email"] = item.email
    return obj


def refused_indexes(answer: Any) -> dict[int, str]:
    """From a /users/track answer, the attribute objects Braze refused: index -> its error."""
    refused: dict[int, str] = {}
    errors = answer.get("errors") if isinstance(answer, dict) else None
    for error in errors if isinstance(errors, list) else []:
        if not isinstance(error, dict) or error.get("input_array") != "attributes":
            continue
        index = error.get("index")
        if isinstance(index, int) and not isinstance(index, bool):
            kind = str(error.get("type") or "refused")
            # The kind names fields; one that quotes a value (an address) is not kept.
            refused[index] = "invalid value" if "@" in kind else kind[:200]
    return refused


class BrazeAttributes:
    """One Braze workspace's users, as a push destination (see the module's text)."""

    keyed_by_email = False  # external_id, else email

    def __init__(self, api: ProviderApi, names: Mapping[str, str] = STANDARD_ATTRIBUTES) -> None:
        self._api = api
        self._names = dict(names)

    async def push(self, items: Sequence[PushItem]) -> list[ItemResult]:
        """Push ``items`` (one per customer), 75 a request.

        Raises:
            ProviderUnavailable: a request got no answer worth having (its items stay pending).
            ProviderRefused: the key or the request itself was refused.
        """
        results: list[ItemResult] = []
        for batch in batches(items, BATCH_SIZE):
            results.extend(await self._push_batch(batch))
        return results

    async def _push_batch(self, batch: list[PushItem]) -> list[ItemResult]:
        body = {"attributes": [attribute_object(item, self._names) for item in batch]}
        try:
            answer = (await self._api.request("POST", TRACK_PATH, json=body)).json()
        except ProviderRefused as exc:
            if exc.status != 400 or exc.answer is None:
                raise
            try:
                refused = refused_indexes(exc.answer.json())
            except ValueError:
                refused = {}
            if not refused:
                return [ItemResult(item, ItemOutcome.REFUSED, "request refused") for item in batch]
            # The items Braze named are refused; the others were not applied: send them alone.
            results = [ItemResult(batch[i], ItemOutcome.REFUSED, refused[i]) for i in sorted(refused)]
            rest = [item for i, item in enumerate(batch) if i not in refused]
            return results + (await self._push_batch(rest) if rest else [])
        refused = refused_indexes(answer)
        return [
            ItemResult(item, ItemOutcome.REFUSED, refused[i])
            if i in refused
            else ItemResult(item, ItemOutcome.PUSHED)
            for i, item in enumerate(batch)
        ]
