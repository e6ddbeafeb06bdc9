"""The merger keeps going when a delivery cannot be settled (an ack the server does not confirm
in time): the message comes back later and merging it again changes nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from profile_service.merger import EventMerger
from profile_service.repository import ProfileRepository
from profile_service.server import ProfileApp
from sendtime.profile.v1 import profile_pb2_grpc
from sendtime_common.event_log import Delivery
from tests.conftest import user, wait_for_profile
from tests.factories import event, identify


class OnceUnconfirmedDelivery:
    """A delivery whose first ack times out, as nats-py's ack_sync does on a loaded server."""

    def __init__(self, payload: bytes, acks: list[str], event_id: str) -> None:
        self.payload, self._acks, self._event_id = payload, acks, event_id
        self.headers: Mapping[str, str] = {}
        self.attempt = 1
        self.position: int | None = None  # not from the log: nothing to erase there
        self.stored_at_s: float | None = None

    async def ack(self) -> None:
        if self._event_id not in self._acks:
            self._acks.append(self._event_id)
            raise TimeoutError("nats: timeout")
        self._acks.append(self._event_id)

    async def retry_later(self, delay_s: float) -> None: ...

    async def discard(self) -> None: ...


class ScriptedSubscription:
    def __init__(self, batches: list[list[Delivery]]) -> None:
        self._batches = batches

    async def fetch(self, max_messages: int, timeout_s: float) -> Sequence[Delivery]:
        if self._batches:
            return self._batches.pop(0)
        await asyncio.sleep(0.01)
        return []

    async def close(self) -> None: ...


async def test_an_unconfirmed_ack_does_not_stop_the_merger(
    profile_app: ProfileApp, profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub, unique: str
) -> None:
    first = event(user_id=f"u-{unique}", identify=identify(step=1))
    second = event(user_id=f"u-{unique}", identify=identify(step=2))
    acks: list[str] = []

    def delivery(e: object) -> Delivery:
        return OnceUnconfirmedDelivery(e.SerializeToString(), acks, e.event_id)  # type: ignore[attr-defined]

    subscription = ScriptedSubscription([[delivery(first)], [delivery(second)], [delivery(first)]])
    merger = EventMerger(  # two loops; a scripted subscription, unlike nats-py's, can be shared
        [subscription, subscription],
        ProfileRepository(profile_app.pool),
        profile_app.cache,
        profile_app.unmerged,
        batch_size=10,
    )
    task = asyncio.create_task(merger.run())
    try:
        profile = await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: p.traits["step"] == 2)
        while acks.count(first.event_id) < 2:  # the redelivery of the first is merged (again) and acked
            await asyncio.sleep(0.01)
    finally:
        merger.stop()
        await task
    assert profile.traits["step"] == 2 and not task.exception()
