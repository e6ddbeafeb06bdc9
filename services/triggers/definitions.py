"""The triggers the engine acts on, as definitions, kept in memory.

The change consumer reads every trigger for every change, so it works from a copy: refreshed
every ``refresh_interval_s``, and at once after ``invalidate()`` (the servicers call it through
``TriggersEngine.triggers_changed()`` when they write a trigger in this replica). Another
replica's write is seen at its next refresh; until then an entry may open an episode under the
old definition (the new one applies at the fire, as for any update) or, for a new trigger, open
nothing.

The firer needs the definition of the trigger each claim comes with (as stored at the claim):
``definition_of`` builds it once per (trigger, etag).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from sendtime.triggers.v1 import triggers_pb2
from triggers.trigger_store import TriggerStore
from triggers.trigger_validation import (
    InvalidTrigger,
    TriggerDefinition,
    parse_trigger_name,
    validate_trigger,
)

log = logging.getLogger(__name__)

_PAGE: Final = 500
_MAX_MEMO: Final = 4096  # definitions by (name, etag): more than there are triggers


@dataclass(frozen=True, slots=True)
class KnownTrigger:
    trigger_id: str
    definition: TriggerDefinition
    paused: bool
    trigger: triggers_pb2.Trigger = field(repr=False)


class TriggerCache:
    def __init__(
        self,
        store: TriggerStore,
        *,
        refresh_interval_s: float = 10.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._refresh_interval_s = refresh_interval_s
        self._monotonic = monotonic
        self._triggers: tuple[KnownTrigger, ...] = ()
        self._loaded_at: float | None = None
        self._generation = 0  # bumped by invalidate(): a load it overlaps stays stale
        self._lock = asyncio.Lock()
        self._memo: dict[tuple[str, str], TriggerDefinition | None] = {}

    def invalidate(self) -> None:
        """A trigger was written: read them all again before the next use."""
        self._loaded_at = None
        self._generation += 1

    async def all(self) -> Sequence[KnownTrigger]:
        """Every stored trigger that has a valid definition; read again when the copy is older
        than the refresh interval or was invalidated.

        Raises:
            triggers.store.StoreError: PostgreSQL failed (only when a refresh was due).
        """
        if self._fresh():
            return self._triggers
        async with self._lock:
            if not self._fresh():
                generation, started = self._generation, self._monotonic()
                self._triggers = tuple(await self._load())
                if generation == self._generation:
                    self._loaded_at = started
        return self._triggers

    def _fresh(self) -> bool:
        return self._loaded_at is not None and self._monotonic() - self._loaded_at < self._refresh_interval_s

    async def _load(self) -> list[KnownTrigger]:
        known: list[KnownTrigger] = []
        token = ""
        while True:
            page, token = await self._store.list(page_size=_PAGE, page_token=token)
            for trigger in page:
                definition = self.definition_of(trigger)
                if definition is not None:
                    known.append(
                        KnownTrigger(
                            parse_trigger_name(trigger.name),
                            definition,
                            trigger.state == triggers_pb2.TRIGGER_STATE_PAUSED,
                            trigger,
                        )
                    )
            if not token:
                return known

    def definition_of(self, trigger: triggers_pb2.Trigger) -> TriggerDefinition | None:
        """The definition of ``trigger`` as stored (name and etag set); None when it is not
        valid (stored by hand, or by an older rule set), logged once."""
        memo_key = (trigger.name, trigger.etag)
        if memo_key in self._memo:
            return self._memo[memo_key]
        try:
            definition: TriggerDefinition | None = validate_trigger(trigger)
        except InvalidTrigger as exc:
            log.error(
                "stored trigger is not valid; ignored",
                extra={"trigger": trigger.name, "violations": len(exc.violations)},
            )
            definition = None
        if len(self._memo) >= _MAX_MEMO:
            self._memo.clear()
        self._memo[memo_key] = definition
        return definition
