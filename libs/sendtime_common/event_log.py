"""The durable event log between ingest and profile resolution, the erasure notices from
profile to the services that keep copies of profiles, and the profile changes from profile to
the services that act on them (triggers).

Services see two small interfaces, ``EventLog`` (publish, acknowledged only once stored; erasure
notices published and followed; profile changes published and read) and
``EventLogSubscription`` (fetch, then ack or retry each delivery), so that another log such as
Kafka can stand in for NATS JetStream.
``JetStreamEventLog`` is the JetStream implementation: a stream of events on file storage,
``Nats-Msg-Id`` set to the event id so that a resend inside the duplicate window is reported as
a duplicate instead of stored twice, durable pull consumers with explicit acks so that an event
is redelivered until a consumer has merged it; a second stream for erasure notices, which
every follower reads whole (ordered consumers), so each replica of a service hears every one;
and a third for profile changes (``sendtime.profile.v1.ProfileChange``), read like the events
through durable pull consumers, kept only a day (docs/profiles.md#profile-change-notices).

A batch of events (or of profile changes) goes out as one JetStream atomic batch (ADR-50,
nats-server 2.12+) where the server supports it: the server stores the batch with one write and
one fsync instead of one per event, which is most of what a publish costs under
``sync_interval: always``. A batch is stored whole or not at all; one the server refuses (an
event id already in the duplicate window, the stream full) is sent again event by event, so that
each event still gets its own answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import ssl
import uuid
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)

from sendtime_common.config import ConfigError, env_bool, env_float, env_int, env_str, secret_from_env
from sendtime_common.shutdown import CANCEL_WAIT_S, FINISH_S

log = logging.getLogger(__name__)
T = TypeVar("T")

MSG_ID_HEADER = "Nats-Msg-Id"
EXPECTED_STREAM_HEADER = "Nats-Expected-Stream"  # a subject no longer bound to our stream fails
BATCH_ID_HEADER = "Nats-Batch-Id"
BATCH_SEQUENCE_HEADER = "Nats-Batch-Sequence"
BATCH_COMMIT_HEADER = "Nats-Batch-Commit"
ATOMIC_BATCH_MAX = 1000  # nats-server's default limit on messages in one atomic batch
ERASURE_RETRY_MAX_S = 5.0  # backoff cap while an erasure handler's store is down
STREAM_WAIT_S = 60.0  # how long a service that does not manage the streams waits for them
ERASE_CONCURRENCY = 64  # message removals in flight at once
# A delivery held longer than this gets no more in-progress acks, so that one a consumer forgot
# to settle (a bug) still comes back, after this plus the ack wait.
HOLD_MAX_S = 600.0
# Partitions of the event stream (docs/scaling.md#a-partitioned-merge): at most this many, and
# the managing service writes how many into the stream's metadata, where the publishers read it.
MAX_EVENT_PARTITIONS = 32
PARTITIONS_METADATA = "sendtime_event_partitions"
UNPARTITIONED = -1  # the lane of events published without a partition (one partition, or before)
_NO_SUCH_MESSAGE = 10037  # JetStream's "no message found"
_STREAM_NAME_IN_USE = 10058  # "stream name already in use with a different configuration"
_NO_SUITABLE_PEERS = 10005  # "no suitable peers for placement": too few servers known yet


class _PlacementPending(Exception):
    """A cluster that is starting cannot yet place a stream's replicas: its metadata leader
    knows too few of its servers. Waited for like an unavailable JetStream."""


_JETSTREAM_NOT_READY = (
    nats.js.errors.ServiceUnavailableError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    _PlacementPending,
)


class EventLogUnavailable(Exception):
    """The log could not be reached or did not confirm in time: the event may not be stored."""


class EventLogFull(Exception):
    """The log refused the event because it has reached its configured size limits."""


class RetryLater(Exception):
    """Raised by an erasure handler that cannot finish for now (its store is down): the notice
    is handed to it again after a backoff, and later notices wait for it."""


@dataclass(frozen=True, slots=True)
class PublishReceipt:
    """The log's confirmation that it holds the message: at ``sequence``, or, for a
    ``duplicate`` (its message id already in the duplicate window), the first one's there."""

    sequence: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One message to publish; ``key`` picks the subject suffix (the event type)."""

    key: str
    message_id: str
    payload: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    # Picks the event's partition where the stream has more than one; a customer's events carry
    # the same key (``sendtime_common.identifiers.routing_key``), so they stay in order.
    partition_key: str = ""


def partition_of(partition_key: str, partitions: int) -> int:
    """The partition of ``partition_key`` among ``partitions``: stable across processes and
    releases (CRC-32, not Python's salted ``hash``)."""
    return zlib.crc32(partition_key.encode()) % partitions


def partition_consumer(durable_name: str, lane: int) -> str:
    """The durable consumer of one lane of the event stream: ``durable_name`` itself for the
    events published without a partition, ``<durable_name>-<partition>`` for a partition's."""
    return durable_name if lane == UNPARTITIONED else f"{durable_name}-{lane}"


# A message's fate: the log holds it, or why not (EventLogUnavailable: safe to retry with the
# same message id).
PublishOutcome = PublishReceipt | EventLogUnavailable | EventLogFull


@dataclass(frozen=True, slots=True)
class ConsumerBacklog:
    """A durable consumer's distance behind its stream."""

    pending: int  # stored, not yet delivered to it
    ack_pending: int  # delivered, not yet acknowledged (being worked on, or lost with a crash)


class Delivery(Protocol):
    """One delivered message; it is redelivered later unless acked (about an ack wait after its
    subscriber stops holding it, or dies: held, it is kept from redelivery). An ack lost in a
    crash can bring it back once more, so consumers must be idempotent."""

    @property
    def payload(self) -> bytes: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def attempt(self) -> int: ...

    @property
    def position(self) -> int | None:
        """Where the message sits in the log (its stream sequence), for ``EventLog.erase``;
        None when unknown."""
        ...

    @property
    def stored_at_s(self) -> float | None:
        """When the log stored the message (seconds since the epoch): the moment before its
        publisher was acknowledged. None when unknown."""
        ...

    async def ack(self) -> None: ...

    async def retry_later(self, delay_s: float) -> None: ...

    async def discard(self) -> None: ...


class EventLogSubscription(Protocol):
    async def fetch(self, max_messages: int, timeout_s: float) -> Sequence[Delivery]:
        """Up to ``max_messages`` deliveries; an empty list when none came within ``timeout_s``."""
        ...

    async def close(self) -> None:
        """Stop receiving; unacked deliveries will be redelivered to the next subscriber."""
        ...


class Following(Protocol):
    async def close(self) -> None:
        """Stop following."""
        ...


ErasureHandler = Callable[[bytes], Awaitable[None]]


class EventLog(Protocol):
    async def publish(self, message: OutgoingMessage) -> PublishReceipt:
        """Store one message.

        Raises:
            EventLogUnavailable: not confirmed; safe to retry with the same message id.
            EventLogFull: refused for lack of space.
        """
        ...

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> Awaitable[list[PublishOutcome]]:
        """Send ``messages``, in order, and return once they are on their way (not yet stored),
        so the caller can let the next batch go after them. The awaitable returned gives each
        message's outcome once the log has answered, or failed to in time. Never raises."""
        ...

    async def subscribe(self, durable_name: str, *, lane: int | None = None) -> EventLogSubscription:
        """A durable subscription to every message (``lane`` None), or to one lane of them (the
        events published without a partition, UNPARTITIONED, or one partition's); it resumes
        after the last acked one."""
        ...

    async def read(self, position: int) -> bytes | None:
        """The payload of the message at ``position``; None when there is none (erased, or
        aged out of the log).

        Raises:
            EventLogUnavailable: the log did not answer.
        """
        ...

    async def erase(self, positions: Sequence[int]) -> None:
        """Remove the messages at ``positions`` from the log, their data overwritten (an erased
        person's events); ones already gone count as removed.

        Raises:
            EventLogUnavailable: the log did not confirm every removal; safe to repeat.
        """
        ...

    async def publish_erasure(self, notice_id: str, notice: bytes) -> None:
        """Store one erasure notice (a ``sendtime.profile.v1.ErasureNotice``); a resend with the
        same ``notice_id`` inside the duplicate window is stored once.

        Raises:
            EventLogUnavailable: not confirmed; safe to retry with the same id.
        """
        ...

    async def follow_erasures(self, handle: ErasureHandler) -> Following:
        """Hand ``handle`` every erasure notice still kept (the log's max age), in order, then
        each new one as it comes, until closed. A notice whose ``handle`` raises ``RetryLater``
        is handed again (backing off up to ERASURE_RETRY_MAX_S) until it succeeds; one whose
        ``handle`` raises anything else is logged and not handed again."""
        ...

    async def publish_profile_changes(self, changes: Sequence[OutgoingMessage]) -> list[PublishOutcome]:
        """Store profile changes (``sendtime.profile.v1.ProfileChange``; ``key`` the event
        type), in order, and return each one's outcome once the log has answered or failed to
        in time; a resend with the same message id inside the duplicate window is reported as a
        duplicate. Where the log takes atomic batches, a batch is stored whole or not at all
        (one with an id already stored is sent again change by change, in order). Never
        raises."""
        ...

    async def subscribe_profile_changes(self, durable_name: str) -> EventLogSubscription:
        """A durable subscription to every profile change; it resumes after the last acked one.

        Raises:
            EventLogUnavailable: the profile change stream did not appear in time (a service
                that does not manage the streams waits for the profile service to make it).
        """
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class JetStreamSettings:
    # One server, or a cluster's servers separated by commas (as the nats CLI takes them): the
    # client connects to any that answers and learns the rest from it.
    url: str = "nats://127.0.0.1:4222"
    # This service's NATS user (each service has its own, with only the permissions it needs:
    # docs/security.md); empty: none.
    user: str = ""
    password: str = field(default="", repr=False)
    # The CA that signed the NATS servers' certificate (tls:// URLs); empty: the system's roots.
    ca_file: str = ""
    # Whether this service creates and updates the streams (the profile service does); the
    # others only wait for them to exist and read their configuration.
    manage_streams: bool = True
    stream: str = "SENDTIME_EVENTS"
    subject_prefix: str = "sendtime.events"
    replicas: int = 1
    duplicate_window_s: float = 120.0
    max_age_s: float = 7 * 24 * 3600.0
    max_bytes: int = -1
    publish_timeout_s: float = 5.0
    # How long the durable consumers wait for an ack before redelivering: how soon a crashed
    # consumer's deliveries go to another. Deliveries still held are kept with in-progress
    # acks every quarter of it (``_InProgress``), so a slow merge is not redelivered.
    ack_wait_s: float = 5.0
    max_ack_pending: int = 10_000
    # Partitions of the event stream, so that several merge workers each own some
    # (docs/scaling.md): the managing service's setting, kept in the stream's metadata; it may
    # grow, never shrink (a partition's events would be left without a consumer).
    event_partitions: int = 1
    atomic_batches: bool = True  # used only where the server supports them (2.12+)
    # Erasure notices: a stream of their own, kept as long as events (max_age_s).
    erasure_stream: str = "SENDTIME_ERASURES"
    erasure_subject: str = "sendtime.erasures"
    # Profile changes: a stream of their own, published by the profile service after each
    # merge commits. Kept a day: a hand-off to consumers that keep up, not a store, and its
    # changes carry the events' personal data (docs/profiles.md#profile-change-notices). Full
    # (max bytes), it refuses new changes, which wait in the profile service's outbox.
    profile_change_stream: str = "SENDTIME_PROFILE_CHANGES"
    profile_change_subject_prefix: str = "sendtime.profile_changes"
    profile_change_max_age_s: float = 24 * 3600.0
    profile_change_max_bytes: int = -1

    @property
    def servers(self) -> list[str]:
        """The servers in ``url``."""
        return [server.strip() for server in self.url.split(",") if server.strip()]

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> JetStreamSettings:
        """NATS_URL, NATS_USER, NATS_PASSWORD (or NATS_PASSWORD_FILE), NATS_CA_FILE,
        NATS_MANAGE_STREAMS, NATS_STREAM, NATS_REPLICAS, NATS_DUPLICATE_WINDOW_SECONDS,
        NATS_MAX_AGE_SECONDS, NATS_ACK_WAIT_SECONDS, NATS_EVENT_PARTITIONS, NATS_ATOMIC_BATCHES,
        NATS_PROFILE_CHANGES_MAX_AGE_SECONDS, NATS_PROFILE_CHANGES_MAX_BYTES; unset ones keep their
        local defaults.

        Raises:
            sendtime_common.config.ConfigError: a variable has an unusable value.
        """
        defaults = cls()
        return cls(
            url=env_str(env, "NATS_URL", defaults.url),
            user=env_str(env, "NATS_USER", ""),
            password=secret_from_env(env, "NATS_PASSWORD"),
            ca_file=env_str(env, "NATS_CA_FILE", ""),
            manage_streams=env_bool(env, "NATS_MANAGE_STREAMS", defaults.manage_streams),
            stream=env_str(env, "NATS_STREAM", defaults.stream),
            replicas=env_int(env, "NATS_REPLICAS", defaults.replicas, minimum=1),
            duplicate_window_s=env_float(
                env, "NATS_DUPLICATE_WINDOW_SECONDS", defaults.duplicate_window_s, minimum=1
            ),
            max_age_s=env_float(env, "NATS_MAX_AGE_SECONDS", defaults.max_age_s, minimum=1),
            ack_wait_s=_ack_wait(env, defaults.ack_wait_s),
            event_partitions=_event_partitions(env, defaults.event_partitions),
            atomic_batches=env_bool(env, "NATS_ATOMIC_BATCHES", defaults.atomic_batches),
            profile_change_max_age_s=env_float(
                env, "NATS_PROFILE_CHANGES_MAX_AGE_SECONDS", defaults.profile_change_max_age_s, minimum=1
            ),
            profile_change_max_bytes=env_int(
                env, "NATS_PROFILE_CHANGES_MAX_BYTES", defaults.profile_change_max_bytes, minimum=-1
            ),
        )


def _event_partitions(env: Mapping[str, str], default: int) -> int:
    """NATS_EVENT_PARTITIONS: 1 to MAX_EVENT_PARTITIONS.

    Raises:
        sendtime_common.config.ConfigError: not a whole number in that range.
    """
    value = env_int(env, "NATS_EVENT_PARTITIONS", default, minimum=1)
    if value > MAX_EVENT_PARTITIONS:
        raise ConfigError(f"NATS_EVENT_PARTITIONS must be at most {MAX_EVENT_PARTITIONS}, got {value}")
    return value


def _ack_wait(env: Mapping[str, str], default: float) -> float:
    """NATS_ACK_WAIT_SECONDS: at least 1 s (in-progress acks go every quarter of it) and at most
    HOLD_MAX_S (past which a held delivery is let go anyway).

    Raises:
        sendtime_common.config.ConfigError: not a number in that range.
    """
    value = env_float(env, "NATS_ACK_WAIT_SECONDS", default, minimum=1)
    if not (math.isfinite(value) and value <= HOLD_MAX_S):
        raise ConfigError(f"NATS_ACK_WAIT_SECONDS must be at most {HOLD_MAX_S:g}, got {value}")
    return value


class _JetStreamDelivery:
    __slots__ = ("_msg", "_holder", "held_since", "signalled_at")

    def __init__(self, msg: Msg, holder: _InProgress) -> None:
        self._msg = msg
        self._holder = holder
        self.held_since = self.signalled_at = asyncio.get_running_loop().time()

    @property
    def payload(self) -> bytes:
        return self._msg.data

    @property
    def headers(self) -> Mapping[str, str]:
        return self._msg.headers or {}

    @property
    def attempt(self) -> int:
        return int(self._msg.metadata.num_delivered)

    @property
    def position(self) -> int | None:
        return int(self._msg.metadata.sequence.stream)

    @property
    def stored_at_s(self) -> float | None:
        return self._msg.metadata.timestamp.timestamp()

    async def ack(self) -> None:
        # Let go first: an ack that fails must leave the message to come back after the ack wait.
        self._holder.release(self)
        # A plain ack, not a confirmed one (ack_sync, a round trip per message): consumers are
        # idempotent, so the rare redelivery of an ack lost in a crash costs nothing.
        await self._msg.ack()

    async def retry_later(self, delay_s: float) -> None:
        self._holder.release(self)
        await self._msg.nak(delay=delay_s)

    async def discard(self) -> None:
        self._holder.release(self)
        await self._msg.term()

    async def still_in_progress(self) -> None:
        """+WPI: the server restarts the message's ack wait; not a delivery (attempt stays)."""
        await self._msg.in_progress()


class _InProgress:
    """A subscription's deliveries fetched and not yet settled, kept from redelivery with
    in-progress acks while held (a batch waiting to merge or merging, a slow database), so that
    the consumer's ack wait can be short: a crashed holder's deliveries come back within about
    the ack wait, and a live one's slow work is never handed to another replica. One checks
    every quarter of the ack wait; a delivery settled sooner than that costs nothing."""

    def __init__(self, ack_wait_s: float) -> None:
        self._interval_s = ack_wait_s / 4
        self._held: set[_JetStreamDelivery] = set()
        self._keeping: asyncio.Task[None] | None = None

    def hold(self, deliveries: Sequence[_JetStreamDelivery]) -> None:
        self._held.update(deliveries)
        if deliveries and (self._keeping is None or self._keeping.done()):
            self._keeping = asyncio.create_task(self._keep_alive())

    def release(self, delivery: _JetStreamDelivery) -> None:
        self._held.discard(delivery)

    async def _keep_alive(self) -> None:
        loop = asyncio.get_running_loop()
        while self._held:  # ends when nothing is held; ``hold`` starts it again
            await asyncio.sleep(self._interval_s)
            now = loop.time()
            for delivery in [d for d in self._held if now - d.signalled_at >= self._interval_s]:
                if delivery not in self._held:  # settled while an earlier one's signal went out
                    continue
                if now - delivery.held_since > HOLD_MAX_S:
                    log.warning(
                        "a delivery held too long is let go; it will be redelivered",
                        extra={"held_s": round(now - delivery.held_since), "position": delivery.position},
                    )
                    self._held.discard(delivery)
                    continue
                try:
                    await delivery.still_in_progress()
                except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
                    # Going away: the server's ack wait runs on, and another gets them after it.
                    return
                except (nats.errors.Error, OSError) as exc:  # e.g. the outbound buffer full
                    log.warning("in-progress acks not sent; next time", extra={"error": type(exc).__name__})
                    break
                delivery.signalled_at = now

    async def close(self) -> None:
        """Stop keeping deliveries: whatever is still held comes back after the ack wait."""
        self._held.clear()
        if self._keeping is not None:
            self._keeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeping


class _JetStreamSubscription:
    def __init__(self, subscription: JetStreamContext.PullSubscription, ack_wait_s: float) -> None:
        self._subscription = subscription
        self._in_progress = _InProgress(ack_wait_s)

    async def fetch(self, max_messages: int, timeout_s: float) -> Sequence[Delivery]:
        try:
            messages = await self._subscription.fetch(max_messages, timeout=timeout_s)
        except (TimeoutError, nats.errors.TimeoutError):
            # nats-py raises the plain asyncio one when the deadline runs out between its
            # no-wait probe and its pull: also just "nothing came".
            return []
        deliveries = [_JetStreamDelivery(m, self._in_progress) for m in messages]
        self._in_progress.hold(deliveries)
        return deliveries

    async def close(self) -> None:
        await self._in_progress.close()
        # Without this, draining the connection waits out its full timeout on the pull inbox.
        with contextlib.suppress(nats.errors.Error):
            await self._subscription.unsubscribe()


class _Following:
    def __init__(self, subscription: JetStreamContext.PushSubscription) -> None:
        self._subscription = subscription

    async def close(self) -> None:
        with contextlib.suppress(nats.errors.Error):
            await self._subscription.unsubscribe()


_FULL_ERROR_CODES = {10047, 10077}  # insufficient resources, maximum messages/bytes exceeded


class _AckInbox:
    """Pipelined JetStream publishes: each message goes out with a reply subject under one
    subscription of ours, and its ack (or error) resolves its future; no request and no timer per
    message, which halves the client's CPU per publish (docs/benchmarks.md). nats-py's
    ``publish_async`` works the same way, but leaves a publish the server refused (the stream
    full) pending forever (nats-io/nats.py#985), where ingest must answer RESOURCE_EXHAUSTED."""

    def __init__(self, client: NatsClient) -> None:
        self._client = client
        self._prefix = ""
        self._ids = itertools.count()
        self._waiting: dict[str, asyncio.Future[Msg]] = {}

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> asyncio.Future[Msg]:
        """Send; the future gets the server's reply. Cancel it to stop waiting."""
        if not self._prefix:  # nats-py renews the subscription after a reconnect
            prefix = f"{self._client.new_inbox()}."
            await self._client.subscribe(f"{prefix}*", cb=self._on_reply)
            self._prefix = prefix
        reply = f"{self._prefix}{next(self._ids)}"
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[reply] = future
        future.add_done_callback(lambda _: self._waiting.pop(reply, None))
        try:
            await self._client.publish(subject, payload, reply=reply, headers=headers)
        except BaseException:
            future.cancel()  # never sent: nothing will answer it
            raise
        return future

    async def _on_reply(self, msg: Msg) -> None:
        future = self._waiting.get(msg.subject)
        if future is not None and not future.done():
            future.set_result(msg)


def _answer(reply: asyncio.Future[Msg]) -> dict[str, Any] | EventLogUnavailable:
    """The server's JSON answer to a publish, or why there is none to read."""
    if reply.cancelled():
        return EventLogUnavailable("not confirmed within the publish timeout")
    msg = reply.result()
    if not msg.data:  # a status without a body: no stream listens on the subject
        return EventLogUnavailable(f"no stream answered (status {(msg.headers or {}).get('Status', '?')})")
    try:
        answer = json.loads(msg.data)
    except ValueError as exc:
        return EventLogUnavailable(f"unreadable publish ack: {exc}")
    if not isinstance(answer, dict):
        return EventLogUnavailable(f"unreadable publish ack: {answer!r}")
    return answer


def _outcome(reply: asyncio.Future[Msg]) -> PublishOutcome:
    """What the server's reply to one publish says."""
    answer = _answer(reply)
    if isinstance(answer, EventLogUnavailable):
        return answer
    try:
        if "error" in answer:
            error = answer["error"]
            if error.get("err_code") in _FULL_ERROR_CODES:
                return EventLogFull(str(error.get("description", error)))
            return EventLogUnavailable(str(error.get("description", error)))
        return PublishReceipt(sequence=int(answer["seq"]), duplicate=bool(answer.get("duplicate")))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return EventLogUnavailable(f"unreadable publish ack: {exc}")


def _partitions(info: StreamInfo) -> int:
    """The event stream's partitions, from its metadata (one where it has none: made before)."""
    value = (info.config.metadata or {}).get(PARTITIONS_METADATA, "1")
    return int(value) if value.isdigit() and int(value) >= 1 else 1


def _lane_filter(target: _Target, lane: int) -> str:
    """The subjects of one lane: ``<prefix>.<type>`` without a partition, ``<prefix>.<type>.<n>``
    in partition n."""
    if lane == UNPARTITIONED:
        return f"{target.subject_prefix}.*"
    return f"{target.subject_prefix}.*.{lane}"


def _batch_answer(commit: asyncio.Future[Msg], count: int) -> int | EventLogUnavailable | str:
    """What the server's answer to an atomic batch's commit says: the sequence of its last
    message when all ``count`` are stored; unavailable when unanswered; otherwise why it refused
    the batch (nothing of it stored)."""
    answer = _answer(commit)
    if isinstance(answer, EventLogUnavailable):
        return answer
    try:
        if "error" in answer:
            return str(answer["error"].get("description", answer["error"]))
        if int(answer["count"]) != count:
            return f"the server stored {answer['count']} of a batch of {count}"  # not expected
        return int(answer["seq"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return EventLogUnavailable(f"unreadable batch ack: {exc}")


async def _once_jetstream_answers(what: str, call: Callable[[], Awaitable[T]]) -> T:
    """``call``'s answer, waiting up to STREAM_WAIT_S while JetStream cannot answer: a cluster
    that is starting, or electing a leader after losing a server, answers "temporarily
    unavailable" (or not at all) for a few seconds.

    Raises:
        EventLogUnavailable: it did not answer within STREAM_WAIT_S.
    """
    deadline = asyncio.get_running_loop().time() + STREAM_WAIT_S
    while True:
        try:
            return await call()
        except _JETSTREAM_NOT_READY as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise EventLogUnavailable(f"JetStream did not answer for {what}: {exc!r}") from exc
            log.info("waiting for JetStream", extra={"for": what, "error": type(exc).__name__})
            await asyncio.sleep(0.5)


def inbox_prefix(user: str) -> str:
    """``_INBOX_<user>`` for a user whose name can be a subject token, so that NATS permissions
    can let each service subscribe to its own replies only; NATS's default otherwise."""
    if user and all(c.isalnum() or c in "-_" for c in user):
        return f"_INBOX_{user}"
    return "_INBOX"


def _tls_context(settings: JetStreamSettings) -> ssl.SSLContext | None:
    """TLS for ``tls://`` URLs (or a CA file given), trusting ``ca_file`` or the system's roots."""
    if not (settings.ca_file or any(server.startswith("tls://") for server in settings.servers)):
        return None
    return ssl.create_default_context(cafile=settings.ca_file or None)


async def _log_connection_error(exc: Exception) -> None:
    log.warning("NATS connection error", extra={"error": f"{type(exc).__name__}: {exc}"})


async def _log_disconnected() -> None:
    log.warning("NATS disconnected; reconnecting")


async def _log_reconnected() -> None:
    log.info("NATS reconnected")


@dataclass(frozen=True, slots=True)
class _Target:
    """A stream messages are published to: its name, its subjects' prefix (a message's key
    follows it), and whether it takes atomic batches (see ``_ensure_stream``)."""

    stream: str
    subject_prefix: str
    atomic: bool = False
    partitions: int = 1  # more than one: a message's partition follows its key


# JetStream's API calls (streams, consumers, messages by position): nats-py's default, not the
# publish timeout, which callers shorten to answer RETRY sooner. Ingest set to 0.5 s failed to
# start while a loaded NATS took longer to create its erasure consumer.
MANAGEMENT_TIMEOUT_S = 5.0


class JetStreamEventLog:
    """``EventLog`` on NATS JetStream. Create with ``connect``."""

    def __init__(self, client: NatsClient, settings: JetStreamSettings) -> None:
        self._client = client
        self._js = client.jetstream(timeout=MANAGEMENT_TIMEOUT_S)
        self._settings = settings
        self._acks = _AckInbox(client)
        self._events = _Target(settings.stream, settings.subject_prefix)
        self._changes = _Target(settings.profile_change_stream, settings.profile_change_subject_prefix)
        # Else looked for at the first subscription or publication.
        self._changes_exist = settings.manage_streams
        self._events_created = ""  # when the event stream was made, as its info says

    @classmethod
    async def connect(cls, settings: JetStreamSettings) -> JetStreamEventLog:
        """Connect and make sure the stream exists with ``settings``.

        Raises:
            EventLogUnavailable: NATS could not be reached, or refused the credentials or the
                TLS handshake.
            sendtime_common.config.ConfigError: fewer event partitions than the stream has.
        """
        refused: list[str] = []
        refusal = asyncio.Event()

        async def on_error(exc: Exception) -> None:
            await _log_connection_error(exc)
            if (
                isinstance(exc, nats.errors.AuthorizationError)
                or "authorization violation" in str(exc).lower()
            ):
                refused.append(f"refused user {settings.user!r}: check NATS_USER and NATS_PASSWORD")
            elif isinstance(exc, ssl.SSLError):
                refused.append(f"TLS failed ({exc.reason or exc}): check NATS_CA_FILE")
            if refused:
                refusal.set()

        # nats-py keeps retrying a refused first connection as it would a lost one; a service
        # whose credentials or certificates are wrong must stop and say so instead.
        connecting = asyncio.ensure_future(
            nats.connect(
                settings.servers,
                name=settings.user or "sendtime",
                user=settings.user or None,
                password=settings.password or None,
                # Replies and deliveries come to inboxes only this user may subscribe to.
                inbox_prefix=inbox_prefix(settings.user),
                tls=_tls_context(settings),
                max_reconnect_attempts=-1,  # keep trying: publishes fail fast meanwhile
                reconnect_time_wait=0.5,
                connect_timeout=2,
                allow_reconnect=True,
                error_cb=on_error,
                disconnected_cb=_log_disconnected,
                reconnected_cb=_log_reconnected,
            )
        )
        watching = asyncio.ensure_future(refusal.wait())
        await asyncio.wait([connecting, watching], return_when=asyncio.FIRST_COMPLETED)
        watching.cancel()
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, nats.errors.Error, OSError):
                await connecting
            raise EventLogUnavailable(f"NATS at {settings.url}: {refused[0]}")
        try:
            client = connecting.result()
        except (OSError, nats.errors.Error) as exc:
            raise EventLogUnavailable(f"cannot connect to NATS at {settings.url}: {exc}") from exc
        log_ = cls(client, settings)
        try:
            await log_._ensure_stream()
        except BaseException:
            await client.close()  # a refused configuration (ConfigError) leaves no connection behind
            raise
        return log_

    @property
    def connected(self) -> bool:
        """Whether the connection to NATS is up right now (it reconnects by itself)."""
        return bool(self._client.is_connected)

    @property
    def reconnects(self) -> int:
        """How many times the connection was re-established since ``connect``."""
        return int(self._client.stats["reconnects"])

    def _stream_config(self) -> StreamConfig:
        s = self._settings
        return StreamConfig(
            name=s.stream,
            subjects=[f"{s.subject_prefix}.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=s.replicas,
            duplicate_window=s.duplicate_window_s,
            max_age=s.max_age_s,
            max_bytes=s.max_bytes,
            discard=DiscardPolicy.NEW,  # refuse new events rather than silently drop old ones
            allow_atomic=True if s.atomic_batches else None,
            metadata={PARTITIONS_METADATA: str(s.event_partitions)},
        )

    def _erasure_stream_config(self) -> StreamConfig:
        s = self._settings
        return StreamConfig(
            name=s.erasure_stream,
            subjects=[s.erasure_subject],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=s.replicas,
            duplicate_window=s.duplicate_window_s,
            max_age=s.max_age_s,  # copies of profiles must not outlive the notices that drop them
            discard=DiscardPolicy.NEW,
        )

    def _profile_change_stream_config(self) -> StreamConfig:
        s = self._settings
        return StreamConfig(
            name=s.profile_change_stream,
            subjects=[f"{s.profile_change_subject_prefix}.>"],
            retention=RetentionPolicy.LIMITS,  # every consumer reads every change
            storage=StorageType.FILE,
            num_replicas=s.replicas,
            duplicate_window=s.duplicate_window_s,
            max_age=s.profile_change_max_age_s,
            max_bytes=s.profile_change_max_bytes,
            # Full, it refuses new changes, which wait in the publisher's outbox; dropping old
            # ones would lose them for a consumer that has not read them yet.
            discard=DiscardPolicy.NEW,
            allow_atomic=True if s.atomic_batches else None,
        )

    async def _ensure_stream(self) -> None:
        """The streams exist with ``settings`` (made or updated where this service manages
        them). Only the managing service (profile) makes the profile change stream; the others
        look for it when they first subscribe to it, so one that never reads it needs no
        permission on it."""
        configs = [self._stream_config(), self._erasure_stream_config()]
        if self._settings.manage_streams:
            configs.append(self._profile_change_stream_config())
        for config in configs:
            configured = partial(self._stream_as_configured, config)
            info = await _once_jetstream_answers(f"stream {config.name}", configured)
            # A server older than 2.12 ignores allow_atomic and answers without it.
            if config.name == self._events.stream:
                self._events = replace(
                    self._events, atomic=bool(info.config.allow_atomic), partitions=_partitions(info)
                )
                self._events_created = str(info.created or "")
            elif config.name == self._changes.stream:
                self._changes = replace(self._changes, atomic=bool(info.config.allow_atomic))

    async def _stream_as_configured(self, config: StreamConfig) -> StreamInfo:
        """The stream of ``config``: made or updated where this service manages the streams,
        else as the managing service made it."""
        if not self._settings.manage_streams:
            return await self._stream_made_by_another(str(config.name))
        if config.name == self._settings.stream:
            await self._refuse_fewer_partitions()
        try:
            return await self._js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code == _NO_SUITABLE_PEERS:
                raise _PlacementPending(exc.description) from exc
            if exc.err_code != _STREAM_NAME_IN_USE:
                raise
            # It exists with an older configuration (fewer replicas, say): bring it up to date.
            return await self._js.update_stream(config)

    async def _refuse_fewer_partitions(self) -> None:
        """Raises ConfigError where the event stream has more partitions than configured: the
        events of the ones dropped would never be merged."""
        try:
            info = await self._js.stream_info(self._settings.stream)
        except nats.js.errors.NotFoundError:
            return
        if _partitions(info) > self._settings.event_partitions:
            raise ConfigError(
                f"NATS_EVENT_PARTITIONS={self._settings.event_partitions}, but the stream "
                f"{self._settings.stream} has {_partitions(info)} partitions: they may grow, never shrink"
            )

    @property
    def event_partitions(self) -> int:
        """How many partitions the event stream has (its metadata's, as the managing service set)."""
        return self._events.partitions

    @property
    def event_stream_id(self) -> str:
        """Names this event stream apart from another of the same name (on other servers, or
        made again): its name and when it was made, hashed to 8 hex digits."""
        return f"{zlib.crc32(f'{self._events.stream}@{self._events_created}'.encode()):08x}"

    async def _stream_made_by_another(self, name: str) -> StreamInfo:
        """The stream the managing service (profile) makes, once it exists.

        Raises:
            EventLogUnavailable: it did not appear within STREAM_WAIT_S.
        """
        deadline = asyncio.get_running_loop().time() + STREAM_WAIT_S
        while True:
            try:
                return await self._js.stream_info(name)
            except nats.js.errors.NotFoundError:
                if asyncio.get_running_loop().time() > deadline:
                    raise EventLogUnavailable(
                        f"the stream {name} is missing; the profile service makes it (NATS_MANAGE_STREAMS)"
                    ) from None
                log.info("waiting for the stream to be created", extra={"stream": name})
                await asyncio.sleep(0.5)

    async def publish(self, message: OutgoingMessage) -> PublishReceipt:
        (outcome,) = await (await self.publish_batch([message]))
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> Awaitable[list[PublishOutcome]]:
        return await self._publish_to(self._events, messages)

    async def publish_profile_changes(self, changes: Sequence[OutgoingMessage]) -> list[PublishOutcome]:
        if not self._changes_exist:
            await self._learn_changes_stream()
        return await (await self._publish_to(self._changes, changes))

    async def _learn_changes_stream(self) -> None:
        """Where the deployment made the profile change stream (NATS_MANAGE_STREAMS=false), learn
        at the first publication whether it takes atomic batches, as ``_ensure_stream`` does for
        the managing service. Not found or not answering: publish one by one, which fails as it
        would have and leaves the changes in the publisher's outbox."""
        try:
            info = await self._js.stream_info(self._changes.stream)
        except (TimeoutError, nats.errors.Error):
            return
        self._changes = replace(self._changes, atomic=bool(info.config.allow_atomic))
        self._changes_exist = True

    async def _publish_to(
        self, target: _Target, messages: Sequence[OutgoingMessage]
    ) -> Awaitable[list[PublishOutcome]]:
        if not target.atomic or len(messages) < 2:
            return self._outcomes(await self._send_each(target, messages))
        batches = [messages[i : i + ATOMIC_BATCH_MAX] for i in range(0, len(messages), ATOMIC_BATCH_MAX)]
        commits = [await self._send_atomic(target, batch) for batch in batches]
        return self._atomic_outcomes(target, batches, commits)

    @staticmethod
    def _headers(target: _Target, message: OutgoingMessage) -> dict[str, str]:
        return {
            **message.headers,
            MSG_ID_HEADER: message.message_id,
            EXPECTED_STREAM_HEADER: target.stream,
        }

    @staticmethod
    def _subject(target: _Target, message: OutgoingMessage) -> str:
        if target.partitions > 1 and message.partition_key:
            partition = partition_of(message.partition_key, target.partitions)
            return f"{target.subject_prefix}.{message.key}.{partition}"
        return f"{target.subject_prefix}.{message.key}"

    async def _send_each(
        self, target: _Target, messages: Sequence[OutgoingMessage]
    ) -> list[asyncio.Future[Msg] | EventLogUnavailable]:
        sent: list[asyncio.Future[Msg] | EventLogUnavailable] = []
        for message in messages:
            try:
                sent.append(
                    await self._acks.publish(
                        self._subject(target, message), message.payload, self._headers(target, message)
                    )
                )
            except (nats.errors.Error, OSError) as exc:  # closed, or the outbound buffer is full
                sent.append(EventLogUnavailable(f"{type(exc).__name__}: {exc}"))
        return sent

    async def _send_atomic(
        self, target: _Target, messages: Sequence[OutgoingMessage]
    ) -> asyncio.Future[Msg] | EventLogUnavailable:
        """Send ``messages`` as one atomic batch; the future gets the server's answer to the commit,
        the batch's last message. A batch left unfinished (the connection lost midway) is dropped
        by the server, never stored in part."""
        batch_id = uuid.uuid4().hex
        try:
            for sequence, message in enumerate(messages[:-1], start=1):
                headers = self._headers(target, message)
                headers[BATCH_ID_HEADER] = batch_id
                headers[BATCH_SEQUENCE_HEADER] = str(sequence)
                await self._client.publish(self._subject(target, message), message.payload, headers=headers)
            last = messages[-1]
            headers = self._headers(target, last)
            headers[BATCH_ID_HEADER] = batch_id
            headers[BATCH_SEQUENCE_HEADER] = str(len(messages))
            headers[BATCH_COMMIT_HEADER] = "1"
            return await self._acks.publish(self._subject(target, last), last.payload, headers)
        except (nats.errors.Error, OSError) as exc:
            return EventLogUnavailable(f"{type(exc).__name__}: {exc}")

    async def _atomic_outcomes(
        self,
        target: _Target,
        batches: list[Sequence[OutgoingMessage]],
        commits: list[asyncio.Future[Msg] | EventLogUnavailable],
    ) -> list[PublishOutcome]:
        await self._wait_for_answers(commits)
        outcomes: list[PublishOutcome] = []
        for batch, commit in zip(batches, commits, strict=True):
            answer = commit if isinstance(commit, EventLogUnavailable) else _batch_answer(commit, len(batch))
            if isinstance(answer, int):
                first = answer - len(batch) + 1
                outcomes.extend(
                    PublishReceipt(sequence=first + i, duplicate=False) for i in range(len(batch))
                )
            elif isinstance(answer, EventLogUnavailable):
                outcomes.extend([answer] * len(batch))
            else:
                # Refused whole, as when one event id is already in the duplicate window: each
                # event on its own gets its own answer (duplicate, stored, or why not).
                log.info(
                    "an atomic batch was refused; publishing its events one by one", extra={"error": answer}
                )
                outcomes.extend(await self._outcomes(await self._send_each(target, batch)))
        return outcomes

    async def _outcomes(self, sent: list[asyncio.Future[Msg] | EventLogUnavailable]) -> list[PublishOutcome]:
        await self._wait_for_answers(sent)
        return [s if isinstance(s, EventLogUnavailable) else _outcome(s) for s in sent]

    async def _wait_for_answers(self, sent: Sequence[asyncio.Future[Msg] | EventLogUnavailable]) -> None:
        waiting = [s for s in sent if isinstance(s, asyncio.Future)]
        if waiting:
            _, unanswered = await asyncio.wait(waiting, timeout=self._settings.publish_timeout_s)
            for future in unanswered:
                future.cancel()

    async def subscribe(self, durable_name: str, *, lane: int | None = None) -> EventLogSubscription:
        """``lane``: None, every event; UNPARTITIONED, those published without a partition; a
        partition's number, that partition's."""
        if lane is None:
            return await self._pull_subscribe(self._events, durable_name)
        return await self._pull_subscribe(self._events, durable_name, _lane_filter(self._events, lane))

    async def backlog(self, durable_name: str, *, profile_changes: bool = False) -> ConsumerBacklog:
        """How far the durable consumer ``durable_name`` (of the events, or of the profile
        changes) is behind.

        Raises:
            EventLogUnavailable: NATS did not answer, or there is no such consumer.
        """
        target = self._changes if profile_changes else self._events
        try:
            info = await self._js.consumer_info(target.stream, durable_name)
        except (nats.errors.Error, TimeoutError) as exc:
            raise EventLogUnavailable(f"could not read consumer {durable_name}: {exc}") from exc
        return ConsumerBacklog(pending=info.num_pending or 0, ack_pending=info.num_ack_pending or 0)

    async def usable(self, durable_name: str = "", *, profile_changes: bool = False) -> bool:
        """Whether the connection is up and JetStream answers for the event stream (or the
        profile change stream), or for its durable consumer ``durable_name``: what a readiness
        check asks (sendtime_common.readiness). Never raises; the caller bounds the wait."""
        if not self._client.is_connected:  # reconnecting: a request would only wait in a buffer
            return False
        target = self._changes if profile_changes else self._events
        try:
            if durable_name:
                await self._js.consumer_info(target.stream, durable_name)
            else:
                await self._js.stream_info(target.stream)
        except (nats.errors.Error, OSError, TimeoutError):
            return False
        return True

    async def subscribe_profile_changes(self, durable_name: str) -> EventLogSubscription:
        if not self._changes_exist:
            await self._stream_made_by_another(self._changes.stream)
            self._changes_exist = True
        return await self._pull_subscribe(self._changes, durable_name)

    async def _pull_subscribe(
        self, target: _Target, durable_name: str, subject: str = ""
    ) -> EventLogSubscription:
        s = self._settings
        subject = subject or f"{target.subject_prefix}.>"
        # What nats-py's pull_subscribe makes when the consumer is missing (it sets the name and
        # the filter itself then); spelled out here so an update matches it.
        config = ConsumerConfig(
            name=durable_name,
            durable_name=durable_name,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=s.ack_wait_s,
            max_ack_pending=s.max_ack_pending,
            filter_subject=subject,
        )

        async def pull_subscribe() -> _JetStreamSubscription:
            ack_wait_s = await self._update_consumer(target, config)
            subscription = await self._js.pull_subscribe(
                subject, durable=durable_name, stream=target.stream, config=config
            )
            return _JetStreamSubscription(subscription, ack_wait_s)

        return await _once_jetstream_answers(f"consumer {durable_name}", pull_subscribe)

    async def _update_consumer(self, target: _Target, config: ConsumerConfig) -> float:
        """An existing durable consumer takes a changed ack wait (or max ack pending): nats-py's
        pull_subscribe leaves one it finds as it is, but the server's consumer create updates
        what may change (as ``nats consumer edit`` does). A missing one is left to pull_subscribe.
        Returns the ack wait the consumer has now, which the in-progress acks must beat."""
        assert config.durable_name is not None and config.ack_wait is not None
        try:
            info = await self._js.consumer_info(target.stream, config.durable_name)
        except nats.js.errors.NotFoundError:
            return config.ack_wait
        current = info.config
        if (
            math.isclose(current.ack_wait or 0.0, config.ack_wait, abs_tol=1e-3)
            and current.max_ack_pending == config.max_ack_pending
            and current.filter_subject == config.filter_subject
        ):
            return config.ack_wait
        change = {
            "consumer": config.durable_name,
            "from_s": current.ack_wait,
            "to_s": config.ack_wait,
            "filter": config.filter_subject,
        }
        try:
            await self._js.add_consumer(target.stream, config)
        except (nats.js.errors.APIError, nats.errors.TimeoutError) as exc:
            # Refused (made by hand with other settings, say) or not permitted: consume as it is,
            # redelivering after its own ack wait, rather than not at all.
            log.warning("could not update a durable consumer's settings", extra={**change, "error": str(exc)})
            return min(config.ack_wait, current.ack_wait or config.ack_wait)
        log.info("a durable consumer's settings updated", extra=change)
        return config.ack_wait

    async def read(self, position: int) -> bytes | None:
        try:
            msg = await self._js.get_msg(self._settings.stream, seq=position)
        except nats.js.errors.NotFoundError:
            return None
        except nats.js.errors.APIError as exc:
            if exc.err_code == _NO_SUCH_MESSAGE:
                return None
            raise EventLogUnavailable(f"could not read message {position}: {exc}") from exc
        except (nats.errors.Error, OSError) as exc:
            raise EventLogUnavailable(f"could not read message {position}: {exc}") from exc
        return msg.data or b""

    async def erase(self, positions: Sequence[int]) -> None:
        # STREAM.MSG.DELETE without no_erase: the server overwrites the message's data on disk.
        stream = self._settings.stream

        async def delete(position: int) -> None:
            try:
                await self._js.delete_msg(stream, position)
            except nats.js.errors.NotFoundError:
                pass  # erased already, or aged out of the stream
            except nats.js.errors.APIError as exc:
                if exc.err_code != _NO_SUCH_MESSAGE:
                    raise EventLogUnavailable(f"could not erase message {position}: {exc}") from exc
            except (nats.errors.Error, OSError) as exc:
                raise EventLogUnavailable(f"could not erase message {position}: {exc}") from exc

        for start in range(0, len(positions), ERASE_CONCURRENCY):
            await asyncio.gather(*(delete(p) for p in positions[start : start + ERASE_CONCURRENCY]))

    async def publish_erasure(self, notice_id: str, notice: bytes) -> None:
        s = self._settings
        headers = {MSG_ID_HEADER: notice_id, EXPECTED_STREAM_HEADER: s.erasure_stream}
        try:
            sent: asyncio.Future[Msg] | EventLogUnavailable = await self._acks.publish(
                s.erasure_subject, notice, headers
            )
        except (nats.errors.Error, OSError) as exc:  # closed, or the outbound buffer is full
            sent = EventLogUnavailable(f"{type(exc).__name__}: {exc}")
        (outcome,) = await self._outcomes([sent])
        if isinstance(outcome, EventLogFull):  # the caller retries it like any unconfirmed notice
            raise EventLogUnavailable(str(outcome))
        if isinstance(outcome, Exception):
            raise outcome

    async def follow_erasures(self, handle: ErasureHandler) -> Following:
        async def deliver(msg: Msg) -> None:
            wait_s = 0.1
            while True:
                try:
                    await handle(msg.data)
                    return
                except RetryLater as exc:
                    log.warning(
                        "an erasure notice will be handled again",
                        extra={"error": str(exc.__cause__ or exc), "retry_in_s": wait_s},
                    )
                except Exception:  # noqa: BLE001 - one bad notice must not stop the following
                    log.exception("an erasure notice could not be handled")
                    return
                await asyncio.sleep(wait_s)
                wait_s = min(2 * wait_s, ERASURE_RETRY_MAX_S)

        # An ordered consumer: ephemeral, one per follower, so every replica hears every notice;
        # nats-py recreates it from the last sequence seen when a gap or a lost heartbeat shows.
        subscription = await self._js.subscribe(
            self._settings.erasure_subject,
            stream=self._settings.erasure_stream,
            cb=deliver,
            ordered_consumer=True,
            idle_heartbeat=5.0,
            deliver_policy=DeliverPolicy.ALL,
        )
        return _Following(subscription)

    async def close(self, timeout_s: float = FINISH_S) -> None:
        """Flush what is pending and disconnect, within ``timeout_s``; past it (or while NATS
        is unreachable), just disconnect. nats-py's own drain waits up to 30 s."""
        if self._client.is_closed:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await self._client.drain()
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError):
                log.warning("NATS drain cut short at shutdown", extra={"timeout_s": timeout_s})
            # The socket may be gone already; closing may trip over it too (nats-py surfaces
            # the reset), but the client ends up closed either way.
            with contextlib.suppress(OSError, nats.errors.Error, TimeoutError):
                async with asyncio.timeout(CANCEL_WAIT_S):
                    await self._client.close()
