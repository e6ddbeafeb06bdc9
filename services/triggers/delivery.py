"""Webhook deliveries: signed JSON POSTs, tried again on the published schedule, each
destination on its own.

Each destination has a lane: its own HTTP session (connection pool, DNS cache), at most its
``max_concurrency`` attempts in flight, its own circuit breaker, and a bound on the deliveries it
holds. A receiver that hangs or fails fills only its own lane: every attempt gives up after the
destination's timeout, and other lanes never wait for it. One timer holds the deliveries waiting
for their next attempt, earliest first, and hands each to its lane when it falls due.

An attempt sends the delivery's body (the same bytes every time) with Content-Type
application/json, User-Agent ``Sendtime-Webhooks/1``, the destination's extra headers and the
Standard Webhooks headers (signing.py: the delivery's webhook-id on every attempt, a fresh
timestamp and signature each time). Redirects are not followed; at most ``max_answer_bytes`` of
an answer are read. Each attempt is recorded (start, latency, status or error) in the delivery
log, and what follows it is decided by retry_schedule.py: delivered, tried again, or failed; a
410, or days of failures, disables the destination.

The circuit breaker (the ``circuitbreaker`` package, one instance per lane, used as a context
manager so it stays out of the library's global registry) counts attempts without an answer,
429s and 5xx in a row. Once open, the lane attempts nothing until the recovery time has passed;
then one attempt at a time probes (the library would let every caller through). Its deliveries
wait meanwhile, their attempts not used up. The library reads the monotonic clock, so breaker
waits are real time, unlike the schedule's, which follow the injected clock and sleep.

Logs name the destination and the delivery, with the attempt's status, error and latency: never
a URL (it may hold a token), a header, a secret or a body.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import ThreadedResolver
from circuitbreaker import STATE_HALF_OPEN, STATE_OPEN, CircuitBreaker
from google.protobuf import json_format
from multidict import CIMultiDict

from sendtime.triggers.v1 import triggers_pb2
from sendtime_common.errors import FieldViolation, log_unexpected, new_error_id
from triggers.delivery_log import AttemptRecord, DeliveryLog, DeliveryLogError
from triggers.metrics import ATTEMPT_SECONDS, ATTEMPTS, DISABLES
from triggers.retry_schedule import (
    DEFAULT_DISABLE_AFTER,
    RetrySchedule,
    Step,
    decide,
    parse_retry_after,
    should_disable,
)
from triggers.signing import SigningKeys, signature_headers
from triggers.ssrf import AddressRefused, GuardedResolver, UrlPolicy

log = logging.getLogger(__name__)

USER_AGENT = "Sendtime-Webhooks/1"
DEFAULT_TIMEOUT = timedelta(seconds=10)
DEFAULT_MAX_CONCURRENCY = 10
MAX_EXTRA_HEADERS = 10
MAX_HEADER_VALUE_LENGTH = 1024
GONE_REASON = "the receiver answered 410 Gone"
# The timer looks at the clock at least this often, so a wall-clock step is noticed.
_TIMER_MAX_WAIT_S = 60.0
# A floor on a breaker wait: the library's state may turn a hair after the time computed here.
_BREAKER_MIN_WAIT_S = 0.01
# RFC 9110 token characters.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Headers the attempt sets itself, or that would change how the body is read.
_RESERVED_HEADERS = frozenset(
    {
        "content-type",
        "content-length",
        "content-encoding",
        "transfer-encoding",
        "host",
        "user-agent",
        "connection",
    }
)

Clock = Callable[[], datetime]
Sleep = Callable[[float], Awaitable[None]]


def _utc_now() -> datetime:
    return datetime.now(UTC)


def failing_reason(disable_after: timedelta) -> str:
    """The disabled reason of a destination whose attempts failed for ``disable_after``."""
    days = disable_after / timedelta(days=1)
    span = f"{days:g} days" if days >= 1 else f"{disable_after.total_seconds():g} s"
    return f"every attempt failed for {span} since the last success"


@dataclass(frozen=True, slots=True)
class WebhookDestination:
    """A webhook destination as the dispatcher uses it."""

    name: str  # "destinations/{destination_id}"
    url: str = field(repr=False)  # its query may hold a token
    keys: SigningKeys
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    timeout: timedelta = DEFAULT_TIMEOUT
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    enabled: bool = True

    @classmethod
    def from_proto(cls, destination: triggers_pb2.Destination, keys: SigningKeys) -> WebhookDestination:
        """The contract's destination, with its defaults (10 s, 10 in flight) for unset fields.

        Raises:
            ValueError: it is not a webhook destination.
        """
        if destination.WhichOneof("kind") != "webhook":
            raise ValueError(f"{destination.name} is not a webhook destination")
        webhook = destination.webhook
        return cls(
            name=destination.name,
            url=webhook.url,
            keys=keys,
            headers=dict(webhook.headers),
            timeout=webhook.timeout.ToTimedelta() if webhook.HasField("timeout") else DEFAULT_TIMEOUT,
            max_concurrency=destination.max_concurrency or DEFAULT_MAX_CONCURRENCY,
            enabled=destination.state != triggers_pb2.DESTINATION_STATE_DISABLED,
        )


@dataclass(frozen=True, slots=True)
class OutboundDelivery:
    """A delivery to attempt: its body, serialized once, and how far along its schedule it is."""

    name: str  # "deliveries/{delivery_id}"
    destination: str
    webhook_id: str
    body: bytes = field(repr=False)
    attempts_made: int = 0
    # When the next attempt is due; None: at once.
    next_attempt_time: datetime | None = None
    # The customer it is about (opaque id; "" when unknown): an erasure drops what it holds.
    customer_id: str = ""

    @classmethod
    def of(
        cls, name: str, destination: str, webhook_id: str, payload: dict[str, Any], customer_id: str = ""
    ) -> OutboundDelivery:
        """A new delivery of ``payload`` as JSON, due at once."""
        return cls(name, destination, webhook_id, orjson.dumps(payload), customer_id=customer_id)

    @classmethod
    def from_proto(cls, delivery: triggers_pb2.Delivery) -> OutboundDelivery:
        """A pending delivery from the log, resuming its schedule where it stands."""
        next_time = (
            delivery.next_attempt_time.ToDatetime(UTC) if delivery.HasField("next_attempt_time") else None
        )
        return cls(
            name=delivery.name,
            destination=delivery.destination,
            webhook_id=delivery.webhook_id,
            body=orjson.dumps(json_format.MessageToDict(delivery.payload)),
            attempts_made=len(delivery.attempts),
            next_attempt_time=next_time,
            customer_id=delivery.profile.removeprefix("profiles/"),
        )


@dataclass(frozen=True, slots=True)
class DispatcherSettings:
    schedule: RetrySchedule = field(default_factory=RetrySchedule)
    # A destination whose attempts all failed for this long since its last success is disabled.
    disable_after: timedelta = DEFAULT_DISABLE_AFTER
    # Attempts in a row without an answer, or answered 429 or 5xx, that open a lane's breaker,
    # and how long it stays open before one attempt probes.
    breaker_failures: int = 5
    breaker_recovery_s: float = 30.0
    # Deliveries one destination holds (waiting, due, in flight); more are refused (BacklogFull)
    # and stay pending in the log for later.
    max_pending_per_destination: int = 10_000
    # What is read of an answer: enough to reuse the connection after a short one.
    max_answer_bytes: int = 4096
    # When the delivery log could not be written, the delivery is taken up again after this.
    log_retry_delay: timedelta = timedelta(seconds=30)


class UnknownDestination(KeyError):
    """A delivery names a destination the dispatcher was not given."""


class BacklogFull(Exception):
    """The destination already holds ``max_pending_per_destination`` deliveries."""


def header_violations(
    headers: Mapping[str, str], field_path: str = "destination.webhook.headers"
) -> list[FieldViolation]:
    """Why a destination's extra headers cannot be sent; empty when they can. At most 10, names
    RFC 9110 tokens and none the attempt sets itself (webhook-*, Content-Type, User-Agent...),
    values of at most 1024 characters with no line breaks."""
    violations = []
    if len(headers) > MAX_EXTRA_HEADERS:
        violations.append(FieldViolation(field_path, f"at most {MAX_EXTRA_HEADERS} headers"))
    for name, value in headers.items():
        path = f"{field_path}[{name!r}]"
        lower = name.lower()
        if not _HEADER_NAME.fullmatch(name):
            violations.append(FieldViolation(path, "not a header name"))
        elif lower.startswith("webhook-") or lower in _RESERVED_HEADERS:
            violations.append(FieldViolation(path, "set by every delivery; it cannot be overridden"))
        if len(value) > MAX_HEADER_VALUE_LENGTH or any(c in value for c in "\r\n\0"):
            violations.append(
                FieldViolation(path, f"a value of at most {MAX_HEADER_VALUE_LENGTH} characters on one line")
            )
    return violations


def request_headers(
    destination: WebhookDestination, delivery: OutboundDelivery, at: datetime
) -> CIMultiDict[str]:
    """The headers of one attempt at ``at``: the destination's, then the attempt's own, which
    replace any of the destination's of the same name in any case."""
    headers: CIMultiDict[str] = CIMultiDict(destination.headers)
    own = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
    own |= signature_headers(destination.keys, delivery.webhook_id, delivery.body, at)
    for name, value in own.items():
        headers[name] = value
    return headers


@dataclass(frozen=True, slots=True)
class _Answer:
    http_status: int = 0  # 0: none
    retry_after: str | None = None
    error: str = ""

    @property
    def strains_receiver(self) -> bool:
        """What the breaker counts: no answer, or one saying the receiver is overloaded or failing."""
        return self.http_status == 0 or self.http_status == 429 or self.http_status >= 500


class _ReceiverStrained(Exception):
    """Raised through the breaker's context so that it counts the attempt as a failure."""

    def __init__(self, answer: _Answer) -> None:
        super().__init__(answer.http_status)
        self.answer = answer


@dataclass(frozen=True, slots=True)
class _Context:
    """What every lane shares."""

    log: DeliveryLog
    settings: DispatcherSettings
    policy: UrlPolicy
    resolver: AbstractResolver
    clock: Clock
    signing_clock: Clock
    rng: random.Random
    wait_for_retry: Callable[[_Lane, OutboundDelivery], None]


class _Lane:
    """One destination's deliveries: due ones in order, attempted under its concurrency limit
    and breaker."""

    def __init__(self, destination: WebhookDestination, context: _Context) -> None:
        self.destination = destination
        self.closed = False
        # The deliveries held here: waiting for a retry, due, or in flight (their leases are
        # renewed, and only theirs: delivery_pump).
        self.held: set[str] = set()
        self._context = context
        self._ready: asyncio.Queue[OutboundDelivery] = asyncio.Queue()
        self._in_flight = 0
        self._changed = asyncio.Condition()
        self._breaker = CircuitBreaker(
            failure_threshold=context.settings.breaker_failures,
            recovery_timeout=context.settings.breaker_recovery_s,
            expected_exception=_ReceiverStrained,
            name=destination.name,
        )
        self._half_open_at = 0.0  # time.monotonic() when an open breaker lets a probe through
        self._open_reported = False  # "circuit open" was logged for the current opening
        # A session per lane: a hung receiver's connections are not in anyone else's pool.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=context.resolver, limit=0),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
        )
        self._attempts: set[asyncio.Task[None]] = set()
        # Taken off the queue (waiting to be admitted, or in flight), and those of them dropped
        # meanwhile: a dropped one is not attempted, nor tried again.
        self._taken: dict[str, OutboundDelivery] = {}
        self._dropped: set[str] = set()
        self._pump_task = asyncio.create_task(self._pump(), name=f"webhook-lane {destination.name}")

    @property
    def pending(self) -> int:
        return len(self.held)

    def hand(self, delivery: OutboundDelivery) -> None:
        """``delivery`` is due: attempt it when the lane can."""
        self._ready.put_nowait(delivery)

    def drop(self, unwanted: Callable[[OutboundDelivery], bool]) -> int:
        """Forget the deliveries held here (due, or taken and not yet ended) for which
        ``unwanted`` holds: none of them is attempted again (one in flight finishes its
        attempt). How many."""
        kept: list[OutboundDelivery] = []
        dropped = 0
        while not self._ready.empty():
            delivery = self._ready.get_nowait()
            if unwanted(delivery):
                dropped += 1
                self.held.discard(delivery.name)
            else:
                kept.append(delivery)
        for delivery in kept:
            self._ready.put_nowait(delivery)
        for name, delivery in self._taken.items():
            if unwanted(delivery) and name not in self._dropped:
                self._dropped.add(name)  # no longer held once it ends
                dropped += 1
        return dropped

    def retry_later(self, delivery: OutboundDelivery) -> None:
        """Hand ``delivery`` to the timer for its next attempt, unless it was dropped."""
        if delivery.name in self._dropped:
            self.held.discard(delivery.name)
        else:
            self._context.wait_for_retry(self, delivery)

    async def update(self, destination: WebhookDestination) -> None:
        """New settings (URL, keys, headers, limits, enabled) for the attempts to come."""
        self.destination = destination
        await self._notify()

    async def close(self) -> None:
        """Stop: attempts in flight are abandoned, and what is held is dropped (the log keeps it)."""
        self.closed = True
        tasks = [self._pump_task, *self._attempts]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._session.close()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _pump(self) -> None:
        while True:
            delivery = await self._ready.get()
            self._taken[delivery.name] = delivery
            await self._admit()
            if delivery.name in self._dropped:
                self._dropped.discard(delivery.name)
                del self._taken[delivery.name]
                self.held.discard(delivery.name)
                continue
            self._in_flight += 1
            task = asyncio.create_task(self._attempt(delivery), name=f"webhook-attempt {delivery.name}")
            self._attempts.add(task)
            task.add_done_callback(self._attempts.discard)

    async def _admit(self) -> None:
        """Wait until an attempt may start: enabled, under the concurrency limit, and the
        breaker closed (or half open with nothing in flight: one probe at a time)."""
        async with self._changed:
            while True:
                destination = self.destination
                if not destination.enabled or self._in_flight >= destination.max_concurrency:
                    await self._changed.wait()
                    continue
                state = self._breaker.state
                if state == STATE_OPEN:
                    wait_s = max(self._half_open_at - time.monotonic(), _BREAKER_MIN_WAIT_S)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait_s):
                            await self._changed.wait()
                    continue
                if state == STATE_HALF_OPEN and self._in_flight > 0:
                    await self._changed.wait()
                    continue
                return

    async def _attempt(self, delivery: OutboundDelivery) -> None:
        try:
            if delivery.name in self._dropped:
                self.held.discard(delivery.name)
                return
            destination = self.destination
            started = self._context.clock()
            began = time.monotonic()
            answer = await self._send_through_breaker(destination, delivery)
            attempt = AttemptRecord(
                start_time=started,
                latency=timedelta(seconds=time.monotonic() - began),
                http_status=answer.http_status,
                error=answer.error,
            )
            ATTEMPT_SECONDS.labels(destination.name).observe(attempt.latency.total_seconds())
            log.info(
                "webhook attempt",
                extra={
                    "destination": destination.name,
                    "delivery": delivery.name,
                    "attempt": delivery.attempts_made + 1,
                    "http_status": answer.http_status,
                    "error": answer.error,
                    "latency_ms": round(attempt.latency.total_seconds() * 1000, 1),
                },
            )
            await self._settle(destination, delivery, attempt, answer)
        except Exception as exc:  # a bug: the delivery stays in the log, pending
            log_unexpected(
                log,
                "webhook attempt failed",
                exc,
                {"error_id": new_error_id(), "destination": self.destination.name, "delivery": delivery.name},
            )
            self.retry_later(self._later(delivery))
        finally:
            self._in_flight -= 1
            self._taken.pop(delivery.name, None)
            self._dropped.discard(delivery.name)
            await self._notify()

    async def _settle(
        self,
        destination: WebhookDestination,
        delivery: OutboundDelivery,
        attempt: AttemptRecord,
        answer: _Answer,
    ) -> None:
        """Record the attempt and what follows it; a delivery whose outcome could not be recorded
        is taken up again later (its receiver may see the webhook-id twice, and can tell)."""
        context = self._context
        settings = context.settings
        try:
            health = await context.log.record_attempt(delivery.name, destination.name, attempt)
            attempts_made = delivery.attempts_made + 1
            now = context.clock()
            retry_after = parse_retry_after(answer.retry_after, now)
            decision = decide(
                settings.schedule, attempts_made, answer.http_status, retry_after, now, context.rng
            )
            ATTEMPTS.labels(destination.name, decision.step.value).inc()
            if decision.step == Step.RETRY:
                assert decision.next_attempt_time is not None
                await context.log.schedule_next(delivery.name, decision.next_attempt_time)
                self.retry_later(
                    replace(
                        delivery, attempts_made=attempts_made, next_attempt_time=decision.next_attempt_time
                    )
                )
            elif decision.step == Step.DELIVERED:
                await context.log.mark_delivered(delivery.name)
                self.held.discard(delivery.name)
            else:
                assert decision.failure is not None
                await context.log.mark_failed(delivery.name, decision.failure)
                self.held.discard(delivery.name)
        except DeliveryLogError:
            log.warning(
                "delivery log unavailable",
                extra={"destination": destination.name, "delivery": delivery.name},
            )
            self.retry_later(self._later(delivery))
            return
        if decision.disables_destination:
            await self._disable(GONE_REASON)
        elif should_disable(health.last_success_time, health.failing_since, now, settings.disable_after):
            await self._disable(failing_reason(settings.disable_after))

    def _later(self, delivery: OutboundDelivery) -> OutboundDelivery:
        """The same attempt, once the log may be writable again."""
        return replace(
            delivery, next_attempt_time=self._context.clock() + self._context.settings.log_retry_delay
        )

    async def _disable(self, reason: str) -> None:
        if not self.destination.enabled:
            return
        # Locally first: attempts that end meanwhile must not disable it again.
        self.destination = replace(self.destination, enabled=False)
        log.warning("destination disabled", extra={"destination": self.destination.name, "reason": reason})
        DISABLES.labels(self.destination.name).inc()
        try:
            await self._context.log.disable_destination(self.destination.name, reason)
        except DeliveryLogError:
            # Its deliveries stop here anyway; days of failures decide again at the next failure
            # after a restart, and a 410 at the next 410.
            log.warning("delivery log unavailable", extra={"destination": self.destination.name})
        await self._notify()

    async def _send_through_breaker(
        self, destination: WebhookDestination, delivery: OutboundDelivery
    ) -> _Answer:
        try:
            with self._breaker:
                answer = await self._send(destination, delivery)
                if answer.strains_receiver:
                    raise _ReceiverStrained(answer)
        except _ReceiverStrained as strained:
            answer = strained.answer
            if self._breaker.opened:
                self._half_open_at = time.monotonic() + self._context.settings.breaker_recovery_s
                # Once per opening: up to max_concurrency attempts in flight fail after it opened.
                if not self._open_reported:
                    self._open_reported = True
                    log.warning("destination circuit open", extra={"destination": destination.name})
            return answer
        if self._breaker.closed:
            self._open_reported = False
        return answer

    async def _send(self, destination: WebhookDestination, delivery: OutboundDelivery) -> _Answer:
        """One POST; never raises for what the network or the receiver does."""
        refusal = self._context.policy.url_refusal(destination.url)
        if refusal is not None:  # a literal address is connected to without the resolver
            return _Answer(error=f"the URL {refusal}")
        headers = request_headers(destination, delivery, self._context.signing_clock())
        timeout_s = destination.timeout.total_seconds()
        try:
            async with asyncio.timeout(timeout_s):
                async with self._session.post(
                    destination.url, data=delivery.body, headers=headers, allow_redirects=False
                ) as response:
                    await _read_at_most(response, self._context.settings.max_answer_bytes)
                    return _Answer(response.status, response.headers.get("Retry-After"))
        except TimeoutError:
            return _Answer(error=f"no answer within {timeout_s:g} s")
        except aiohttp.ClientConnectorDNSError as exc:
            if isinstance(exc.os_error, AddressRefused):
                return _Answer(error=f"address refused: {exc.os_error}")
            return _Answer(error="the host name did not resolve")
        except aiohttp.ClientConnectorCertificateError:
            return _Answer(error="the receiver's TLS certificate is not valid")
        except aiohttp.ClientSSLError:
            return _Answer(error="TLS failed")
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, ConnectionRefusedError):
                return _Answer(error="connection refused")
            return _Answer(error=f"could not connect ({type(exc.os_error).__name__})")
        except aiohttp.ClientError as exc:
            return _Answer(error=f"the exchange failed ({type(exc).__name__})")


async def _read_at_most(response: aiohttp.ClientResponse, limit: int) -> None:
    """Read up to ``limit`` bytes of the answer and drop them: a short answer read to its end
    leaves the connection reusable; a longer one is cut, with its connection."""
    remaining = limit
    while remaining > 0:
        chunk = await response.content.read(remaining)
        if not chunk:
            return
        remaining -= len(chunk)


class _Timers:
    """Deliveries waiting for their next attempt, earliest first; one task sleeps until the
    earliest is due (or a new one is earlier) and hands it to its lane."""

    def __init__(self, clock: Clock, sleep: Sleep) -> None:
        self._clock = clock
        self._sleep = sleep
        self._heap: list[tuple[datetime, int, _Lane, OutboundDelivery]] = []
        self._order = itertools.count()  # ties in time go first in, first out
        self._changed = asyncio.Event()

    def add(self, lane: _Lane, delivery: OutboundDelivery) -> None:
        due = delivery.next_attempt_time or self._clock()
        heapq.heappush(self._heap, (due, next(self._order), lane, delivery))
        self._changed.set()

    def remove(self, unwanted: Callable[[OutboundDelivery], bool]) -> list[tuple[_Lane, OutboundDelivery]]:
        """Take the waiting deliveries for which ``unwanted`` holds out; them, with their lanes."""
        removed = [(lane, delivery) for _, _, lane, delivery in self._heap if unwanted(delivery)]
        if removed:
            self._heap = [entry for entry in self._heap if not unwanted(entry[3])]
            heapq.heapify(self._heap)
            self._changed.set()
        return removed

    async def run(self) -> None:
        while True:
            now = self._clock()
            while self._heap and self._heap[0][0] <= now:
                _, _, lane, delivery = heapq.heappop(self._heap)
                if not lane.closed:
                    lane.hand(delivery)
            self._changed.clear()
            if not self._heap:
                await self._changed.wait()
                continue
            wait_s = min((self._heap[0][0] - now).total_seconds(), _TIMER_MAX_WAIT_S)
            await self._sleep_unless_changed(wait_s)

    async def _sleep_unless_changed(self, seconds: float) -> None:
        sleeping = asyncio.ensure_future(self._sleep(seconds))
        changed = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait({sleeping, changed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeping.cancel()
            changed.cancel()
            await asyncio.gather(sleeping, changed, return_exceptions=True)


class Dispatcher:
    """Attempts webhook deliveries to the destinations it is given, and records each attempt."""

    def __init__(
        self,
        log: DeliveryLog,
        policy: UrlPolicy,
        settings: DispatcherSettings = DispatcherSettings(),
        *,
        clock: Clock = _utc_now,
        sleep: Sleep = asyncio.sleep,
        signing_clock: Clock = _utc_now,
        rng: random.Random | None = None,
        resolver: AbstractResolver | None = None,
    ) -> None:
        """``clock`` and ``sleep`` drive the schedule (attempt times, waits for retries);
        ``signing_clock`` gives the signatures' timestamps, which receivers compare with their
        own clocks (the two differ only in tests). ``resolver`` resolves host names (default:
        getaddrinfo in a thread); the dispatcher guards it with ``policy``, and closes it."""
        self._log = log
        self._policy = policy
        self._settings = settings
        self._clock = clock
        self._sleep = sleep
        self._signing_clock = signing_clock
        self._rng = rng or random.Random()
        self._inner_resolver = resolver
        self._lanes: dict[str, _Lane] = {}
        self._context: _Context | None = None
        self._timers = _Timers(clock, sleep)
        self._timer_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the timer (call once, in the event loop that will run the deliveries)."""
        resolver = GuardedResolver(self._policy, self._inner_resolver or ThreadedResolver())
        self._context = _Context(
            log=self._log,
            settings=self._settings,
            policy=self._policy,
            resolver=resolver,
            clock=self._clock,
            signing_clock=self._signing_clock,
            rng=self._rng,
            wait_for_retry=self._timers.add,
        )
        self._timer_task = asyncio.create_task(self._timers.run(), name="webhook-timers")

    async def close(self) -> None:
        """Stop every lane and the timer; attempts in flight are abandoned (their deliveries stay
        pending in the log)."""
        for lane in list(self._lanes.values()):
            await lane.close()
        self._lanes.clear()
        if self._timer_task is not None:
            self._timer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer_task
            self._timer_task = None
        if self._context is not None:
            await self._context.resolver.close()
            self._context = None

    async def set_destination(self, destination: WebhookDestination) -> None:
        """Add a destination, or change one (its URL, keys after a rotation, headers, limits, or
        enabling it again): attempts that start from now on use it."""
        if self._context is None:
            raise RuntimeError("the dispatcher is not started")
        lane = self._lanes.get(destination.name)
        if lane is None:
            self._lanes[destination.name] = _Lane(destination, self._context)
        else:
            await lane.update(destination)

    async def remove_destination(self, name: str) -> int:
        """Stop delivering to ``name`` (deleted); returns how many deliveries it held."""
        lane = self._lanes.pop(name, None)
        if lane is None:
            return 0
        held = lane.pending
        await lane.close()
        return held

    def submit(self, delivery: OutboundDelivery) -> None:
        """Take ``delivery`` on: attempted when due, again on the schedule until it is delivered
        or fails.

        Raises:
            UnknownDestination: its destination was not set.
            BacklogFull: its destination holds as many deliveries as it may.
        """
        lane = self._lanes.get(delivery.destination)
        if lane is None:
            raise UnknownDestination(delivery.destination)
        if lane.pending >= self._settings.max_pending_per_destination:
            raise BacklogFull(delivery.destination)
        lane.held.add(delivery.name)
        if delivery.next_attempt_time is None or delivery.next_attempt_time <= self._clock():
            lane.hand(delivery)
        else:
            self._timers.add(lane, delivery)

    def drop_customer(self, customer_id: str) -> int:
        """Forget every delivery held here about ``customer_id`` (erased): waiting for a retry,
        due, or waiting for its lane; none is attempted again. One in flight finishes its
        attempt (its record then finds nothing to update). How many were dropped."""
        if not customer_id:
            return 0
        return self._drop(lambda delivery: delivery.customer_id == customer_id)

    def drop_deliveries(self, names: Collection[str]) -> int:
        """Forget these deliveries (by name) wherever they are held here; how many were."""
        wanted_gone = set(names)
        return self._drop(lambda delivery: delivery.name in wanted_gone)

    def _drop(self, unwanted: Callable[[OutboundDelivery], bool]) -> int:
        dropped = 0
        for lane, delivery in self._timers.remove(unwanted):
            lane.held.discard(delivery.name)
            dropped += 1
        for lane in self._lanes.values():
            dropped += lane.drop(unwanted)
        return dropped

    def knows(self, destination: str) -> bool:
        """Whether ``destination`` was set (and not removed)."""
        return destination in self._lanes

    def full(self) -> list[str]:
        """The destinations holding as many deliveries as they may (``submit`` refuses more)."""
        limit = self._settings.max_pending_per_destination
        return [name for name, lane in self._lanes.items() if lane.pending >= limit]

    def held(self) -> list[str]:
        """The deliveries held here, in every lane: waiting for a retry, due, or in flight."""
        return [name for lane in self._lanes.values() for name in lane.held]

    def pending(self, destination: str) -> int:
        """How many deliveries ``destination`` holds: waiting, due, or in flight."""
        lane = self._lanes.get(destination)
        return lane.pending if lane is not None else 0
