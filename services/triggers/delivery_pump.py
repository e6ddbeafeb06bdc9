"""What feeds this replica's webhook dispatcher (docs/triggers-storage.md, "Deliveries").

- **Destinations**: the dispatcher is given every webhook destination with its signing keys
  (``DestinationStore.webhooks``) at start, every ``destinations_refresh_s``, and at once after
  ``destinations_changed()`` (the servicers call it for a write in this replica). A destination
  no longer stored is removed (its lane and what it held: its deliveries were deleted with it);
  a disabled one stays, disabled, so its deliveries wait in the dispatcher and keep their leases
  (``renew_leases``) until it is enabled again.
- **A fire's deliveries**: ``hand`` submits the webhook ones the firer just committed (this
  replica holds their leases). One the dispatcher cannot take (its destination's backlog is
  full, or unknown here) is released in the log for any dispatcher's sweep; a subscription's
  are not the dispatcher's (the subscription streams take them).
- **The sweep**, every ``sweep_interval_s``: ``renew_leases`` (a heartbeat for what the dispatcher
  holds, and only that),
  then ``take_due(now, horizon, limit)``: deliveries nobody holds that are due within the
  horizon, and those of a replica whose lease ended (it died), but none of a destination
  whose backlog here is full. Taken ones are submitted; their schedule resumes where it stood.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sendtime.triggers.v1 import triggers_pb2
from sendtime_common.batching import MicroBatcher
from sendtime_common.errors import log_unexpected, new_error_id
from triggers.delivery import (
    BacklogFull,
    Dispatcher,
    OutboundDelivery,
    UnknownDestination,
    WebhookDestination,
)
from triggers.delivery_store import DeliveryStore
from triggers.destination_store import DestinationStore, parse_destination_name
from triggers.secret_box import SealedWithUnknownKey
from triggers.store import NotFound, StoreError

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

_ERASED_REMEMBERED = 10_000
_RELEASES_TOGETHER = 100  # hand-offs and sweeps whose refused deliveries are released in one statement


@dataclass(frozen=True, slots=True)
class PumpSettings:
    sweep_interval_s: float = 5.0
    horizon: timedelta = timedelta(seconds=10)  # at least the sweep interval: nothing due is late
    take_limit: int = 500
    destinations_refresh_s: float = 30.0


@dataclass
class PumpStats:
    submitted: int = 0
    released: int = 0  # refused by a full backlog, or for a destination unknown here
    taken: int = 0  # by the sweep, and held (not refused)


class DeliveryPump:
    def __init__(
        self,
        *,
        dispatcher: Dispatcher,
        deliveries: DeliveryStore,
        destinations: DestinationStore,
        clock: Clock,
        settings: PumpSettings = PumpSettings(),
    ) -> None:
        self._dispatcher = dispatcher
        self._deliveries = deliveries
        self._destinations = destinations
        self._clock = clock
        self._settings = settings
        self._set: set[str] = set()  # destinations given to the dispatcher
        self._not_webhooks: set[str] = set()  # subscriptions seen in fires
        # Customers erased lately: a fire committed just before the erasure and handed over
        # just after it must not go out (customer ids are never reused).
        self._erased: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._sync_lock = asyncio.Lock()
        self._synced_at = float("-inf")
        self._changed = asyncio.Event()
        self._stopping = False
        # One statement releases what the hand-offs and sweeps of a moment refused.
        self._releases: MicroBatcher[Sequence[str], None] = MicroBatcher(
            self._release_together, max_batch=_RELEASES_TOGETHER, max_concurrent_batches=1
        )
        self.stats = PumpStats()

    def destinations_changed(self) -> None:
        """A destination was written in this replica: set the dispatcher's again now."""
        self._synced_at = float("-inf")
        self._changed.set()

    async def sync_destinations(self) -> None:
        """Give the dispatcher every webhook destination as stored; remove the ones gone.

        Raises:
            triggers.store.StoreError: PostgreSQL failed.
        """
        async with self._sync_lock:
            started = time.monotonic()
            try:
                webhooks = await self._destinations.webhooks()
            except SealedWithUnknownKey:
                log.error("a destination's secret is sealed with a key no longer configured")
                return
            stored = set()
            for destination, keys in webhooks:
                stored.add(destination.name)
                await self._dispatcher.set_destination(WebhookDestination.from_proto(destination, keys))
            for gone in self._set - stored:
                dropped = await self._dispatcher.remove_destination(gone)
                log.info("destination removed", extra={"destination": gone, "deliveries_dropped": dropped})
            self._set = stored
            self._not_webhooks.clear()
            self._synced_at = started

    async def hand(self, deliveries: Sequence[triggers_pb2.Delivery], body: bytes) -> None:
        """Submit a fire's webhook deliveries (held by this replica) to the dispatcher. ``body``:
        their payload as JSON, as the firer encoded it (a fire's deliveries share it; theirs is
        left out of ``deliveries``). What the dispatcher does not take is released in the log,
        together with what the fires handed over at the same time refused (a destination whose
        backlog is full refuses every fire's delivery)."""
        refused: list[str] = []
        for delivery in deliveries:
            if delivery.destination in self._not_webhooks:
                continue
            if delivery.profile.removeprefix("profiles/") in self._erased:
                refused.append(delivery.name)
                continue
            if not self._dispatcher.knows(delivery.destination) and await self._is_webhook(
                delivery.destination
            ):
                await self._refresh_quietly()
            if not self._dispatcher.knows(delivery.destination):
                self._not_webhooks.add(delivery.destination)
                refused.append(delivery.name)  # a subscription's: nothing held
                continue
            outbound = OutboundDelivery(
                delivery.name,
                delivery.destination,
                delivery.webhook_id,
                body,
                customer_id=delivery.profile.removeprefix("profiles/"),
            )
            if not self._submit(outbound):
                refused.append(delivery.name)
        if refused:
            await self._release(refused)

    def drop_customer(self, customer_id: str) -> int:
        """Forget what the dispatcher holds about an erased customer, and refuse what a fire
        hands over for them from now on; how many were dropped."""
        self._erased[customer_id] = None
        self._erased.move_to_end(customer_id)
        while len(self._erased) > _ERASED_REMEMBERED:
            self._erased.popitem(last=False)
        return self._dispatcher.drop_customer(customer_id)

    async def sweep(self) -> bool:
        """Renew this replica's leases and take up the deliveries due; whether more may be due
        (a full take, all of it held).

        Destinations whose backlog here is full are skipped: what they refused was released to
        the log due, and taking it again would only release it again, round after round (other
        replicas, or this one once the backlog drains, take it).

        Raises:
            triggers.store.StoreError: PostgreSQL failed.
        """
        s = self._settings
        now = self._clock()
        await self._deliveries.renew_leases(now, self._dispatcher.held())
        full = [parse_destination_name(name) for name in self._dispatcher.full()]
        taken = await self._deliveries.take_due(now, horizon=s.horizon, limit=s.take_limit, skipping=full)
        refused = []
        for delivery in taken:
            if not self._submit(OutboundDelivery.from_proto(delivery)):
                refused.append(delivery.name)
        if refused:
            await self._release(refused)
        self.stats.taken += len(taken) - len(refused)
        return len(taken) == s.take_limit and not refused

    async def run(self) -> None:
        """Sweep and refresh the destinations until ``stop``."""
        s = self._settings
        while not self._stopping:
            try:
                if time.monotonic() - self._synced_at >= s.destinations_refresh_s:
                    await self.sync_destinations()
                while await self.sweep():
                    pass
            except StoreError as exc:
                log.warning("delivery sweep failed; trying again", extra={"error": type(exc).__name__})
            except Exception as exc:  # noqa: BLE001 - a bug must not end the loop
                log_unexpected(log, "delivery sweep failed", exc, {"error_id": new_error_id()})
            self._changed.clear()
            try:
                async with asyncio.timeout(s.sweep_interval_s):
                    await self._changed.wait()
            except TimeoutError:
                pass

    def stop(self) -> None:
        self._stopping = True
        self._changed.set()

    def _submit(self, delivery: OutboundDelivery) -> bool:
        """Whether the dispatcher took it (else the caller releases it in the log)."""
        try:
            self._dispatcher.submit(delivery)
        except (BacklogFull, UnknownDestination):
            return False
        self.stats.submitted += 1
        return True

    async def _release(self, names: Sequence[str]) -> None:
        try:
            await self._releases.submit(names)
        except StoreError:
            pass  # the lease ends by itself

    async def _release_together(self, batches: list[Sequence[str]]) -> list[None]:
        self.stats.released += await self._deliveries.release([name for names in batches for name in names])
        return [None] * len(batches)

    async def _is_webhook(self, destination: str) -> bool:
        try:
            stored = await self._destinations.get(parse_destination_name(destination))
        except (NotFound, *StoreError):
            return False
        return stored.WhichOneof("kind") == "webhook"

    async def _refresh_quietly(self) -> None:
        try:
            await self.sync_destinations()
        except StoreError as exc:
            log.warning("destinations could not be read", extra={"error": type(exc).__name__})
