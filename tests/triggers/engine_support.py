"""The engine's tests: small in-test profile reader and renderer (our own interfaces), a clock
the tests move, profile changes published on real NATS, and an engine on the real store."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

import asyncpg
from google.protobuf import struct_pb2

from sendtime.ingest.v1 import ingest_pb2
from sendtime.profile.v1 import profile_pb2
from sendtime.render.v1 import render_pb2
from sendtime_common.database import create_pool
from sendtime_common.event_log import JetStreamEventLog, JetStreamSettings, OutgoingMessage
from tests.factories import cart_item_added, event
from tests.triggers.store_support import Stores, episode_row, open_episode, unique
from triggers.delivery import DispatcherSettings
from triggers.dependencies import DependencyUnavailable
from triggers.engine import EngineSettings, TriggersEngine
from triggers.secret_box import SecretBox
from triggers.ssrf import AllowList, UrlPolicy
from triggers.trigger_validation import validate_trigger

LOOPBACK_ALLOWED = UrlPolicy(AllowList.parse(["127.0.0.0/8", "::1"]))


class MovingClock:
    """The engine's clock: still unless the test moves it."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def move(self, by: timedelta) -> None:
        self.now += by


def cart_profile(customer_id: str, version: int = 1, **fields: object) -> profile_pb2.Profile:
    profile = profile_pb2.Profile(
        name=f"profiles/{customer_id}",
        customer_id=customer_id,
        version=version,
        cart=profile_pb2.Cart(items=[profile_pb2.CartItem(sku="TRAIL-42", name="Trail runner", quantity=1)]),
    )
    for name, value in fields.items():
        setattr(profile, name, value)
    return profile


class Profiles:
    """ProfileReader: the profiles the test keeps; ``down`` makes it unavailable."""

    def __init__(self) -> None:
        self.by_id: dict[str, profile_pb2.Profile] = {}
        self.down = False
        self.reads = 0

    async def get_profile(self, customer_id: str) -> profile_pb2.Profile | None:
        self.reads += 1
        if self.down:
            raise DependencyUnavailable("the profile service is down (test)")
        return self.by_id.get(customer_id)


@dataclass
class Renderer:
    """MessageRenderer: renders ``Hi {customer}`` unless told to skip, fall back or be down."""

    answer: str = "rendered"  # rendered, skipped, fallback, down, missing
    calls: list[tuple[str, str, dict[str, object]]] = field(default_factory=list)

    async def render(
        self, template: str, customer_id: str, variables: struct_pb2.Struct
    ) -> render_pb2.RenderResponse:
        self.calls.append((template, customer_id, dict(variables)))
        if self.answer == "down":
            raise DependencyUnavailable("the render service is down (test)")
        if self.answer == "missing":
            raise LookupError(template)
        if self.answer == "skipped":
            return render_pb2.RenderResponse(
                status=render_pb2.RENDER_STATUS_SKIPPED,
                skip_reason=render_pb2.SKIP_REASON_REQUIRED_DATA_MISSING,
                skip_detail="profile.cart.items is empty",
            )
        rendered = render_pb2.RenderResponse(
            status=render_pb2.RENDER_STATUS_RENDERED,
            subject=f"{customer_id}, your cart is waiting",
            html="<p>Trail runner</p>",
            text="Trail runner",
            template_version=3,
            profile_version=7,
        )
        if self.answer == "fallback":
            rendered.fallback_used = True
            rendered.degraded = True
            rendered.fallback_reason = render_pb2.FALLBACK_REASON_PROFILE_UNAVAILABLE
        return rendered


def log_settings(nats_url: str) -> JetStreamSettings:
    """Streams of the test's own (so other tests' changes and notices are not read)."""
    unique = uuid.uuid4().hex[:8]
    return JetStreamSettings(
        url=nats_url,
        stream=f"TEST_EVENTS_{unique}",
        subject_prefix=f"test-events.{unique}",
        erasure_stream=f"TEST_ERASURES_{unique}",
        erasure_subject=f"test-erasures.{unique}",
        profile_change_stream=f"TEST_CHANGES_{unique}",
        profile_change_subject_prefix=f"test-changes.{unique}",
    )


def change(
    customer_id: str,
    entry: ingest_pb2.Event | None,
    *,
    profile_version: int = 1,
    merged: tuple[str, ...] = (),
    change_id: str | None = None,
) -> profile_pb2.ProfileChange:
    made = profile_pb2.ProfileChange(
        change_id=change_id or f"chg-{uuid.uuid4().hex}",
        sequence=random.randrange(1, 2**40),
        customer_id=customer_id,
        profile_version=profile_version,
        merged_customer_ids=list(merged),
    )
    if entry is not None:
        made.event.CopyFrom(entry)
    return made


def cart_added(at: datetime, sku: str = "TRAIL-42") -> ingest_pb2.Event:
    return event(user_id="u", occurred_at=at, cart_item_added=cart_item_added(sku, name="Trail runner"))


def order(at: datetime, order_id: str = "o-1") -> ingest_pb2.Event:
    return event(
        user_id="u",
        occurred_at=at,
        order_completed=ingest_pb2.OrderCompleted(order_id=order_id),
    )


async def publish(log: JetStreamEventLog, *changes: profile_pb2.ProfileChange, message_id: str = "") -> None:
    """Put changes on the profile change stream (a new message id each unless given: a resend
    after the duplicate window)."""
    outcomes = await log.publish_profile_changes(
        [
            OutgoingMessage(
                key=(c.event.WhichOneof("payload") if c.HasField("event") else None) or "customer_merged",
                message_id=message_id or f"{c.change_id}-{uuid.uuid4().hex[:6]}",
                payload=c.SerializeToString(),
            )
            for c in changes
        ]
    )
    assert all(not isinstance(o, Exception) for o in outcomes), outcomes


def fast_settings(owner: str, **overrides: object) -> EngineSettings:
    """Settings for tests: short polls and sweeps, the dispatcher's retries a second apart."""
    settings = EngineSettings(
        owner=owner,
        change_fetch_timeout_s=0.05,
        change_retry_base_s=0.05,
        change_retry_max_s=0.2,
        poll_interval_s=0.02,
        delivery_sweep_s=0.1,
        trigger_refresh_s=0.1,
        destinations_refresh_s=0.2,
        dispatcher=DispatcherSettings(),
    )
    return replace(settings, **overrides)  # type: ignore[arg-type]


@dataclass
class Replica:
    engine: TriggersEngine
    pool: asyncpg.Pool
    log: JetStreamEventLog


@asynccontextmanager
async def running_engine(
    store_url: str,
    box: SecretBox,
    log_config: JetStreamSettings,
    *,
    owner: str,
    profiles: Profiles,
    renderer: Renderer,
    clock: MovingClock,
    **overrides: object,
) -> AsyncIterator[Replica]:
    """An engine replica on a pool and an event log connection of its own, started."""
    pool = await create_pool(store_url, min_size=1, max_size=8)
    log = await JetStreamEventLog.connect(log_config)
    engine = TriggersEngine(
        pool=pool,
        event_log=log,
        profiles=profiles,
        renderer=renderer,
        secret_box=box,
        url_policy=LOOPBACK_ALLOWED,
        settings=fast_settings(owner, **overrides),
        clock=clock,
        # The dispatcher's waits for retries are short real sleeps: it sees the clock move.
        dispatcher_sleep=lambda seconds: asyncio.sleep(min(seconds, 0.02)),
    )
    await engine.start()
    try:
        yield Replica(engine, pool, log)
    finally:
        await engine.close()
        await log.close()
        await pool.close()


async def eventually_true(check: Callable[[], object], timeout_s: float = 15.0) -> None:
    """Wait for ``await check()`` (or ``check()``) to be truthy; fail after ``timeout_s`` (long: the
    real pipeline is slow on a loaded machine, and the wait ends as soon as it holds)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert asyncio.get_running_loop().time() < deadline, "not within the time"
        await asyncio.sleep(0.01)


async def nothing_more_on_the_way(stores: Stores, replica: Replica, trigger_id: str, now: datetime) -> None:
    """Positive evidence for an absence of webhooks (a fixed wait also passed while the engine
    was merely slow): the firer has claimed at ``now`` and settled what it claimed, and the
    dispatcher holds nothing for the trigger's destinations, so that whatever was to be sent by
    ``now`` has reached its receiver.

    An episode of the trigger, of a customer without a profile, falls due at ``now`` (the clock
    only moves forward: only a round at ``now`` claims it). The firer claims what is due earliest
    first, so anything due by ``now`` was claimed in that round or before; once the marker is
    settled (ended, written back or released), the settles of those rounds are drained: a fire
    they committed was handed to the dispatcher, which holds it until its attempt is answered.
    """
    marker = unique("marker")
    definition = validate_trigger(await stores.triggers.get(trigger_id))
    wait = (definition.wait.after or timedelta(0)) + definition.allowed_lateness
    await open_episode(stores, trigger_id, marker, at=now - wait)  # stored due at ``now``, version 1

    async def marker_settled() -> bool:  # claimed (a new version), then given up
        row = await episode_row(stores.pool, marker, trigger_id)
        return bool(row["version"] > 1 and row["claimed_by"] is None)

    await eventually_true(marker_settled)
    await asyncio.wait_for(replica.engine.firer.drain(), 10)
    destinations = (await stores.triggers.get(trigger_id)).delivery.destinations
    await eventually_true(lambda: all(replica.engine.dispatcher.pending(d) == 0 for d in destinations))


async def episode_states(pool: asyncpg.Pool, customer_id: str) -> Mapping[str, str]:
    rows = await pool.fetch(
        "SELECT trigger_id, episode_key, state, close_reason FROM triggers_episodes WHERE customer_id = $1",
        customer_id,
    )
    return {f"{r['trigger_id']}/{r['episode_key']}": f"{r['state']}:{r['close_reason']}" for r in rows}
