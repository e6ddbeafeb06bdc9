"""The dispatcher over real HTTP to receivers on loopback that verify every signature with
standardwebhooks. Waits on the schedule run on a clock the tests move (FakeTime): no test sleeps
for the schedule's minutes or hours. Breaker waits and per-attempt timeouts are real, and short."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import orjson
import pytest
from aiohttp import web
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from prometheus_client import REGISTRY

from sendtime.triggers.v1 import triggers_pb2
from sendtime_common.errors import FieldViolation
from tests.triggers.support import (
    Answer,
    FakeTime,
    HostsResolver,
    Receiver,
    no_content,
    statuses,
    until,
)
from triggers.delivery import (
    GONE_REASON,
    USER_AGENT,
    BacklogFull,
    Dispatcher,
    DispatcherSettings,
    OutboundDelivery,
    UnknownDestination,
    WebhookDestination,
    failing_reason,
    header_violations,
    request_headers,
)
from triggers.delivery_log import AttemptRecord, DeliveryLogError, DestinationHealth, MemoryDeliveryLog
from triggers.retry_schedule import DEFAULT_DELAYS, FailureReason, RetrySchedule
from triggers.signing import SigningKeys, new_signing_secret, new_webhook_id
from triggers.ssrf import AllowList, UrlPolicy

SECRET = new_signing_secret()
LOOPBACK_ALLOWED = UrlPolicy(AllowList.parse(["127.0.0.0/8", "::1"]))
DELIVERED = triggers_pb2.DELIVERY_STATE_DELIVERED
PENDING = triggers_pb2.DELIVERY_STATE_PENDING
FAILED = triggers_pb2.DELIVERY_STATE_FAILED
# The schedule's tests count attempts, not breaker waits (which are real time).
NEVER_OPENS = 1000

MakeReceiver = Callable[..., Awaitable[Receiver]]


@pytest.fixture
async def receivers() -> AsyncIterator[MakeReceiver]:
    started: list[Receiver] = []

    async def make(answer: Answer = no_content, secrets: Sequence[str] = (SECRET,)) -> Receiver:
        receiver = await Receiver(secrets, answer).start()
        started.append(receiver)
        return receiver

    yield make
    for receiver in started:
        await receiver.stop()


@asynccontextmanager
async def dispatching(
    log: MemoryDeliveryLog, settings: DispatcherSettings | None = None, **options: Any
) -> AsyncIterator[Dispatcher]:
    options.setdefault("policy", LOOPBACK_ALLOWED)
    options.setdefault("rng", random.Random(17))
    policy = options.pop("policy")
    dispatcher = Dispatcher(log, policy, settings or DispatcherSettings(), **options)
    await dispatcher.start()
    try:
        yield dispatcher
    finally:
        await dispatcher.close()


def webhook(receiver: Receiver, name: str = "destinations/d1", **fields: Any) -> WebhookDestination:
    return WebhookDestination(name=name, url=receiver.url, keys=SigningKeys(SECRET), **fields)


def delivery(n: int | str, destination: str = "destinations/d1", **payload: Any) -> OutboundDelivery:
    body = {"trigger": "triggers/abandoned-cart", "n": n, **payload}
    return OutboundDelivery.of(f"deliveries/{n}", destination, new_webhook_id(), body)


def fake_time() -> FakeTime:
    # Starts at the real time, so that a signature timestamped by it verifies.
    return FakeTime(datetime.now(UTC))


async def one_went_elsewhere(
    d: Dispatcher, log: MemoryDeliveryLog, elsewhere: Receiver, due: datetime | None = None
) -> None:
    """Positive evidence for an absence: a delivery handed over after what the test watches (at
    once, or by the timer at ``due``) to a destination of its own has gone all the way, its
    answer in the log; what was handed over before it had as long to be attempted. (A fixed
    wait also passed while the dispatcher was merely slow.)"""
    name = f"destinations/elsewhere-{time.monotonic_ns()}"
    await d.set_destination(webhook(elsewhere, name))
    sent = replace(delivery(name.removeprefix("destinations/"), name), next_attempt_time=due)
    d.submit(sent)
    await until(lambda: log.state(sent.name) == DELIVERED)


async def test_a_delivery_is_signed_json_the_receiver_verifies(receivers: MakeReceiver) -> None:
    receiver = await receivers()
    log = MemoryDeliveryLog()
    sent = delivery(1, items=[{"sku": "S-1", "name": "Café"}])
    async with dispatching(log) as dispatcher:
        await dispatcher.set_destination(webhook(receiver, headers={"Authorization": "Bearer t0k"}))
        dispatcher.submit(sent)
        await until(lambda: log.state(sent.name) == DELIVERED)
        assert dispatcher.pending("destinations/d1") == 0

    [request] = receiver.requests
    assert request.verified == {SECRET: True}
    assert request.body == sent.body == orjson.dumps(orjson.loads(sent.body))
    assert orjson.loads(request.body)["items"] == [{"sku": "S-1", "name": "Café"}]
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"] == USER_AGENT
    assert request.headers["Authorization"] == "Bearer t0k"
    assert request.headers["webhook-id"] == sent.webhook_id
    [attempt] = log.attempts(sent.name)
    assert attempt.http_status == 204 and attempt.error == ""
    assert timedelta(0) < attempt.latency < timedelta(seconds=5)
    assert log.health("destinations/d1") == DestinationHealth(attempt.start_time, None)


async def test_every_attempt_carries_the_same_webhook_id_and_a_fresh_signature(
    receivers: MakeReceiver,
) -> None:
    receiver = await receivers(statuses(500, 503, 200))
    log = MemoryDeliveryLog()
    clock = fake_time()
    schedule = RetrySchedule(delays=(timedelta(0), timedelta(seconds=1), timedelta(seconds=2)), jitter=0)
    sent = delivery(1)
    settings = DispatcherSettings(schedule=schedule, breaker_failures=NEVER_OPENS)
    async with dispatching(
        log, settings, clock=clock.clock, sleep=clock.sleep, signing_clock=clock.clock
    ) as d:
        await d.set_destination(webhook(receiver))
        d.submit(sent)
        await until(lambda: log.state(sent.name) == DELIVERED)

    assert [r.headers["webhook-id"] for r in receiver.requests] == [sent.webhook_id] * 3
    timestamps = [int(r.headers["webhook-timestamp"]) for r in receiver.requests]
    assert timestamps[1] - timestamps[0] == 1 and timestamps[2] - timestamps[1] == 2
    assert len({r.headers["webhook-signature"] for r in receiver.requests}) == 3
    assert all(r.verified == {SECRET: True} for r in receiver.requests)
    assert [a.http_status for a in log.attempts(sent.name)] == [500, 503, 200]


async def test_the_published_schedule_is_followed_with_jitter_then_the_delivery_fails(
    receivers: MakeReceiver,
) -> None:
    receiver = await receivers(statuses(500))
    log = MemoryDeliveryLog()
    clock = fake_time()
    sent = delivery(1)
    # The signatures keep the real clock, which the receiver checks them against.
    async with dispatching(
        log, DispatcherSettings(breaker_failures=NEVER_OPENS), clock=clock.clock, sleep=clock.sleep
    ) as d:
        await d.set_destination(webhook(receiver))
        d.submit(sent)
        await until(lambda: log.state(sent.name) == FAILED)
        assert d.pending("destinations/d1") == 0

    attempts = log.attempts(sent.name)
    assert len(attempts) == len(receiver.requests) == 8
    assert log.failure(sent.name) == FailureReason.ATTEMPTS_EXHAUSTED
    assert log.next_attempt_time(sent.name) is None
    gaps = [
        later.start_time - earlier.start_time for earlier, later in zip(attempts, attempts[1:], strict=False)
    ]
    for gap, base in zip(gaps, DEFAULT_DELAYS[1:], strict=True):
        assert base * 0.9 <= gap <= base * 1.1
    assert gaps != list(DEFAULT_DELAYS[1:])  # jittered
    assert {r.headers["webhook-id"] for r in receiver.requests} == {sent.webhook_id}
    assert all(r.verified == {SECRET: True} for r in receiver.requests)


async def test_a_longer_retry_after_is_honoured(receivers: MakeReceiver) -> None:
    async def busy_then_ok(n: int, request: web.Request) -> web.StreamResponse:
        if n == 0:
            return web.Response(status=429, headers={"Retry-After": "120"})
        return web.Response(status=200)

    receiver = await receivers(busy_then_ok)
    log = MemoryDeliveryLog()
    clock = fake_time()
    sent = delivery(1)
    async with dispatching(log, clock=clock.clock, sleep=clock.sleep) as d:
        await d.set_destination(webhook(receiver))
        d.submit(sent)
        await until(lambda: log.state(sent.name) == DELIVERED)

    first, second = log.attempts(sent.name)
    assert (first.http_status, second.http_status) == (429, 200)
    assert second.start_time - first.start_time == timedelta(seconds=120)


async def test_a_410_fails_the_delivery_and_disables_the_destination(receivers: MakeReceiver) -> None:
    receiver = await receivers(statuses(410))
    log = MemoryDeliveryLog()
    async with dispatching(log) as d:
        destination = webhook(receiver)
        await d.set_destination(destination)
        d.submit(delivery(1))
        await until(lambda: log.state("deliveries/1") == FAILED)
        assert log.failure("deliveries/1") == FailureReason.GONE
        assert log.disabled_reason("destinations/d1") == GONE_REASON

        # Disabled: a new delivery is kept, pending, not attempted.
        d.submit(delivery(2))
        await one_went_elsewhere(d, log, await receivers())
        assert len(receiver.requests) == 1
        assert log.attempts("deliveries/2") == [] and d.pending("destinations/d1") == 1

        # Enabled again (and answering): it goes.
        receiver.answer = no_content
        log.enable_destination("destinations/d1")
        await d.set_destination(destination)
        await until(lambda: log.state("deliveries/2") == DELIVERED)
    assert len(receiver.requests) == 2


async def test_days_of_failures_disable_the_destination(receivers: MakeReceiver) -> None:
    receiver, elsewhere = await receivers(statuses(503)), await receivers()
    log = MemoryDeliveryLog()
    clock = fake_time()
    settings = DispatcherSettings(disable_after=timedelta(hours=1), breaker_failures=NEVER_OPENS)
    async with dispatching(log, settings, clock=clock.clock, sleep=clock.sleep) as d:
        await d.set_destination(webhook(receiver))
        d.submit(delivery(1))
        await until(lambda: log.disabled_reason("destinations/d1") is not None)
        last = log.attempts("deliveries/1")[-1].start_time
        # The next attempt falls due (5 h on, jittered) and is handed over, but not sent: one due
        # a minute after it, elsewhere, is handed over after it and delivered.
        await until(lambda: clock.now >= last + timedelta(hours=4.5))
        due = log.next_attempt_time("deliveries/1")
        assert due is not None
        await one_went_elsewhere(d, log, elsewhere, due + timedelta(minutes=1))
        assert d.pending("destinations/d1") == 1

    # 0, 5 s, 5 min, 30 min: failing for 35 min; the fifth, 2 h later, finds it failing past 1 h.
    assert len(log.attempts("deliveries/1")) == len(receiver.requests) == 5
    assert log.state("deliveries/1") == PENDING
    assert log.next_attempt_time("deliveries/1") is not None
    assert log.disabled_reason("destinations/d1") == failing_reason(timedelta(hours=1))
    assert failing_reason(timedelta(days=5)) == "every attempt failed for 5 days since the last success"


async def test_a_hanging_receiver_does_not_delay_another_destinations_deliveries(
    receivers: MakeReceiver,
) -> None:
    released = asyncio.Event()

    async def hang(n: int, request: web.Request) -> web.StreamResponse:
        await released.wait()
        return web.Response(status=204)

    stuck = await receivers(hang)
    healthy = await receivers()
    log = MemoryDeliveryLog()
    async with dispatching(log) as d:
        # The stuck attempts end only when released: their timeout is far off.
        await d.set_destination(
            webhook(stuck, "destinations/stuck", timeout=timedelta(seconds=30), max_concurrency=2)
        )
        await d.set_destination(webhook(healthy, "destinations/healthy", max_concurrency=4))
        for i in range(6):
            d.submit(delivery(f"stuck-{i}", "destinations/stuck"))
        await until(lambda: stuck.in_progress == 2)

        for i in range(40):
            d.submit(delivery(f"healthy-{i}", "destinations/healthy"))
        await until(lambda: all(log.state(f"deliveries/healthy-{i}") == DELIVERED for i in range(40)))

        # All done while the stuck receiver's attempts still hang, unanswered and unrecorded: the
        # healthy ones waited for none of them (not an upper bound on the time taken, which a
        # busy machine exceeds).
        assert stuck.in_progress == 2 and len(stuck.requests) == 2
        assert all(log.attempts(f"deliveries/stuck-{i}") == [] for i in range(6))
        assert d.pending("destinations/stuck") == 6
        released.set()


async def test_an_open_breaker_holds_the_destinations_deliveries_back(receivers: MakeReceiver) -> None:
    failing = True
    looked = asyncio.Event()

    async def answer(n: int, request: web.Request) -> web.StreamResponse:
        status = 503 if failing else 204
        if n == 3:
            await looked.wait()  # the first probe is answered once the test has looked
        return web.Response(status=status)

    receiver = await receivers(answer)
    log = MemoryDeliveryLog()
    schedule = RetrySchedule(delays=(timedelta(0),) + (timedelta(milliseconds=10),) * 7)
    settings = DispatcherSettings(schedule=schedule, breaker_failures=3, breaker_recovery_s=0.3)
    names = [f"deliveries/{i}" for i in range(5)]
    async with dispatching(log, settings) as d:
        await d.set_destination(webhook(receiver, max_concurrency=1))
        for i in range(5):
            d.submit(delivery(i))
        await until(lambda: len(receiver.requests) == 4)  # 3 failures, then a probe after the recovery time
        # Open until then: nothing was sent, and the waiting deliveries kept their attempts (seen
        # once the whole open time has passed, not after a fixed wait into it).
        assert receiver.requests[3].arrived - receiver.requests[2].arrived >= 0.29
        assert [len(log.attempts(n)) for n in names] == [1, 1, 1, 0, 0]
        looked.set()
        failing = False
        await until(lambda: len(receiver.requests) >= 5)  # it failed: open again, then a probe
        assert receiver.requests[4].arrived - receiver.requests[3].arrived >= 0.29
        await until(lambda: all(log.state(n) == DELIVERED for n in names))

    assert [a.http_status for a in log.attempts("deliveries/3")] == [503, 204]
    assert len(receiver.requests) == 9  # 3 + 2 probes + the 4 retries after it closed


async def test_at_most_max_concurrency_attempts_are_in_flight(receivers: MakeReceiver) -> None:
    three_in_flight = asyncio.Event()

    async def slow(n: int, request: web.Request) -> web.StreamResponse:
        if receiver.in_progress >= 3:
            three_in_flight.set()
        await three_in_flight.wait()  # the first ones wait for the third (however slow the machine)
        await asyncio.sleep(0.05)
        return web.Response(status=204)

    receiver = await receivers(slow)
    log = MemoryDeliveryLog()
    async with dispatching(log) as d:
        await d.set_destination(webhook(receiver, max_concurrency=3))
        for i in range(12):
            d.submit(delivery(i))
        await until(lambda: all(log.state(f"deliveries/{i}") == DELIVERED for i in range(12)))
    assert receiver.most_in_progress == 3


async def test_a_timeout_is_an_attempt_without_an_answer(receivers: MakeReceiver) -> None:
    released = asyncio.Event()

    async def hang(n: int, request: web.Request) -> web.StreamResponse:
        await released.wait()  # no answer until the test is done
        return web.Response(status=204)

    receiver, patient = await receivers(hang), await receivers(hang)
    log = MemoryDeliveryLog()
    async with dispatching(log) as d:
        # A second: the request reaches the receiver well within it, however loaded the machine.
        await d.set_destination(webhook(receiver, timeout=timedelta(seconds=1)))
        await d.set_destination(webhook(patient, "destinations/patient", timeout=timedelta(seconds=60)))
        d.submit(delivery(2, "destinations/patient"))
        await until(lambda: patient.in_progress == 1)  # waiting since before the other was sent
        d.submit(delivery(1))
        await until(lambda: len(log.attempts("deliveries/1")) == 1)
        # It gave up by its own timeout: its request still unanswered, and one sent before it
        # under a longer timeout still waiting (not an upper bound on its latency, which a busy
        # machine exceeds).
        assert receiver.in_progress == 1
        assert log.attempts("deliveries/2") == [] and patient.in_progress == 1
        released.set()
    [attempt] = log.attempts("deliveries/1")
    assert (attempt.http_status, attempt.error) == (0, "no answer within 1 s")
    assert timedelta(seconds=1) <= attempt.latency
    assert log.state("deliveries/1") == PENDING and log.next_attempt_time("deliveries/1") is not None


async def test_an_endless_answer_is_read_only_in_part(receivers: MakeReceiver) -> None:
    hung_up = asyncio.Event()

    async def endless(n: int, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        await response.prepare(request)
        try:
            while True:
                await response.write(b"x" * 65536)
        except (ConnectionError, RuntimeError):  # the client hung up
            hung_up.set()
            return response

    receiver = await receivers(endless)
    log = MemoryDeliveryLog()
    async with dispatching(log) as d:
        # Reading it all would end only by this timeout, in an attempt without an answer.
        await d.set_destination(webhook(receiver, timeout=timedelta(seconds=30)))
        d.submit(delivery(1))
        await until(lambda: log.state("deliveries/1") == DELIVERED)
        # Cut, with its connection, while the dispatcher still runs (not by its closing).
        await until(hung_up.is_set)
    [attempt] = log.attempts("deliveries/1")
    assert (attempt.http_status, attempt.error) == (200, "")


async def test_redirects_are_not_followed(receivers: MakeReceiver) -> None:
    elsewhere = await receivers()

    async def redirect(n: int, request: web.Request) -> web.StreamResponse:
        return web.Response(status=307, headers={"Location": elsewhere.url})

    receiver = await receivers(redirect)
    log = MemoryDeliveryLog()
    async with dispatching(log) as d:
        await d.set_destination(webhook(receiver))
        d.submit(delivery(1))
        await until(lambda: len(log.attempts("deliveries/1")) == 1)
    assert log.attempts("deliveries/1")[0].http_status == 307
    assert log.state("deliveries/1") == PENDING
    assert elsewhere.requests == []


@pytest.mark.parametrize("rebound_to", ["127.0.0.1", "10.0.0.7", "169.254.169.254", "::ffff:127.0.0.1"])
async def test_a_name_rebound_to_a_private_address_is_refused_at_connect_time(
    receivers: MakeReceiver, rebound_to: str
) -> None:
    receiver = await receivers()
    dns = HostsResolver({"receiver.test": ["93.184.215.14"]})
    strict = UrlPolicy()
    url = f"https://receiver.test:{receiver.port}/hooks"
    assert await strict.destination_url_violations(url, dns) == []  # public when it was made

    dns.hosts["receiver.test"] = [rebound_to]
    log = MemoryDeliveryLog()
    async with dispatching(log, policy=strict, resolver=dns) as d:
        await d.set_destination(replace(webhook(receiver), url=url))
        d.submit(delivery(1))
        await until(lambda: len(log.attempts("deliveries/1")) == 1)
    [attempt] = log.attempts("deliveries/1")
    assert attempt.http_status == 0
    assert attempt.error.startswith("address refused: ") and " is a" in attempt.error
    assert receiver.requests == []


async def test_an_allow_listed_name_is_delivered_to_through_the_same_resolver(
    receivers: MakeReceiver,
) -> None:
    receiver = await receivers()
    dns = HostsResolver({"receiver.test": ["127.0.0.1"]})
    log = MemoryDeliveryLog()
    async with dispatching(log, policy=UrlPolicy(AllowList.parse(["receiver.test"])), resolver=dns) as d:
        await d.set_destination(replace(webhook(receiver), url=f"http://receiver.test:{receiver.port}/hooks"))
        d.submit(delivery(1))
        await until(lambda: log.state("deliveries/1") == DELIVERED)
    assert receiver.requests[0].verified == {SECRET: True}


async def test_a_literal_refused_address_is_not_connected_to() -> None:
    log = MemoryDeliveryLog()
    async with dispatching(log, policy=UrlPolicy()) as d:
        keys = SigningKeys(SECRET)
        await d.set_destination(WebhookDestination("destinations/d1", "https://10.0.0.1:9/hooks", keys))
        d.submit(delivery(1))
        await until(lambda: len(log.attempts("deliveries/1")) == 1)
    assert log.attempts("deliveries/1")[0].error == "the URL is refused: 10.0.0.1 is a private address"


async def test_during_a_rotation_both_secrets_verify_then_only_the_new_one(receivers: MakeReceiver) -> None:
    old, new = new_signing_secret(), new_signing_secret()
    receiver = await receivers(secrets=[old, new])
    log = MemoryDeliveryLog()
    now = datetime.now(UTC)
    async with dispatching(log) as d:
        destination = replace(webhook(receiver), keys=SigningKeys(old).rotated(new, timedelta(hours=24), now))
        await d.set_destination(destination)
        d.submit(delivery(1))
        await until(lambda: log.state("deliveries/1") == DELIVERED)

        expired = SigningKeys(new, old, datetime.now(UTC) - timedelta(seconds=1))
        await d.set_destination(replace(destination, keys=expired))
        d.submit(delivery(2))
        await until(lambda: log.state("deliveries/2") == DELIVERED)

    during, after = receiver.requests
    assert during.verified == {old: True, new: True}
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    assert after.verified == {old: False, new: True}


async def test_a_delivery_the_log_could_not_record_is_taken_up_again(receivers: MakeReceiver) -> None:
    class FlakyLog(MemoryDeliveryLog):
        failures = 1

        async def record_attempt(
            self, delivery: str, destination: str, attempt: AttemptRecord
        ) -> DestinationHealth:
            if self.failures:
                self.failures -= 1
                raise DeliveryLogError("the database is away")
            return await super().record_attempt(delivery, destination, attempt)

    receiver = await receivers()
    log = FlakyLog()
    clock = fake_time()
    started = clock.now
    async with dispatching(log, clock=clock.clock, sleep=clock.sleep) as d:
        await d.set_destination(webhook(receiver))
        d.submit(delivery(1))
        await until(lambda: log.state("deliveries/1") == DELIVERED)
    assert len(receiver.requests) == 2
    [attempt] = log.attempts("deliveries/1")
    assert attempt.start_time == started + timedelta(seconds=30)


async def test_each_destination_holds_a_bounded_backlog(receivers: MakeReceiver) -> None:
    released = asyncio.Event()

    async def hang(n: int, request: web.Request) -> web.StreamResponse:
        await released.wait()
        return web.Response(status=204)

    receiver = await receivers(hang)
    async with dispatching(MemoryDeliveryLog(), DispatcherSettings(max_pending_per_destination=2)) as d:
        await d.set_destination(webhook(receiver))
        d.submit(delivery(1))
        d.submit(delivery(2))
        with pytest.raises(BacklogFull):
            d.submit(delivery(3))
        with pytest.raises(UnknownDestination):
            d.submit(delivery(4, "destinations/unknown"))
        assert await d.remove_destination("destinations/d1") == 2
        with pytest.raises(UnknownDestination):
            d.submit(delivery(5))
        released.set()


async def test_logs_name_no_person_url_header_or_secret(
    receivers: MakeReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = await receivers(statuses(500, 204))
    log = MemoryDeliveryLog()
    clock = fake_time()
    caplog.set_level(logging.INFO, logger="triggers")
    async with dispatching(log, clock=clock.clock, sleep=clock.sleep) as d:
        destination = webhook(receiver, headers={"Authorization": "Bearer h3ader-t0ken"})
        await d.set_destination(replace(destination, url=receiver.url + "?token=q5ery-t0ken"))
        d.submit(delivery(1, email="grace@example.com", name="Grace Hopper"))
        await until(lambda: log.state("deliveries/1") == DELIVERED)

    attempts = [r for r in caplog.records if r.getMessage() == "webhook attempt"]
    assert [
        (r.__dict__["destination"], r.__dict__["delivery"], r.__dict__["http_status"]) for r in attempts
    ] == [
        ("destinations/d1", "deliveries/1", 500),
        ("destinations/d1", "deliveries/1", 204),
    ]
    assert all(isinstance(r.__dict__["latency_ms"], float) for r in attempts)
    logged = repr([r.__dict__ for r in caplog.records])
    for private in ("grace@example.com", "Grace Hopper", "h3ader-t0ken", "q5ery-t0ken", SECRET[6:]):
        assert private not in logged


def test_the_attempts_own_headers_replace_a_destinations_whatever_their_case() -> None:
    destination = WebhookDestination(
        "destinations/d1",
        "https://receiver.example/",
        SigningKeys(SECRET),
        headers={"webhook-ID": "msg_forged", "content-type": "text/plain", "X-Tenant": "t1"},
    )
    sent = delivery(1)
    headers = request_headers(destination, sent, datetime.now(UTC))
    assert headers.getall("webhook-id") == [sent.webhook_id]
    assert headers.getall("Content-Type") == ["application/json"]
    assert headers["X-Tenant"] == "t1"


def test_a_destinations_extra_headers_are_checked() -> None:
    assert header_violations({"Authorization": "Bearer x", "X-Tenant": "t1"}) == []
    path = "destination.webhook.headers"
    assert header_violations({"Webhook-Signature": "v1,x", "Content-Type": "text/plain"}) == [
        FieldViolation(f"{path}['Webhook-Signature']", "set by every delivery; it cannot be overridden"),
        FieldViolation(f"{path}['Content-Type']", "set by every delivery; it cannot be overridden"),
    ]
    assert [v.field for v in header_violations({"Bad Name": "x", "X-A": "a\r\nInjected: 1"})] == [
        f"{path}['Bad Name']",
        f"{path}['X-A']",
    ]
    assert header_violations({f"X-{i}": "v" for i in range(11)})[0] == FieldViolation(
        path, "at most 10 headers"
    )


def test_destinations_and_deliveries_from_the_contract() -> None:
    proto = triggers_pb2.Destination(
        name="destinations/d1",
        webhook=triggers_pb2.WebhookTarget(url="https://receiver.example/", headers={"X-Tenant": "t1"}),
    )
    keys = SigningKeys(SECRET)
    assert WebhookDestination.from_proto(proto, keys) == WebhookDestination(
        "destinations/d1", "https://receiver.example/", keys, headers={"X-Tenant": "t1"}
    )
    proto.webhook.timeout.CopyFrom(duration_pb2.Duration(seconds=3))
    proto.max_concurrency = 2
    proto.state = triggers_pb2.DESTINATION_STATE_DISABLED
    converted = WebhookDestination.from_proto(proto, keys)
    assert (converted.timeout, converted.max_concurrency, converted.enabled) == (
        timedelta(seconds=3),
        2,
        False,
    )
    with pytest.raises(ValueError):
        WebhookDestination.from_proto(
            triggers_pb2.Destination(name="destinations/s", subscription=triggers_pb2.SubscriptionTarget()),
            keys,
        )

    payload = struct_pb2.Struct()
    payload.update({"trigger": "triggers/t1", "items": [{"sku": "S-1"}]})
    due = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)
    stored = triggers_pb2.Delivery(
        name="deliveries/1",
        destination="destinations/d1",
        webhook_id="msg_1",
        payload=payload,
        attempts=[AttemptRecord(due - timedelta(seconds=5), timedelta(milliseconds=40), 503).to_proto()],
        next_attempt_time=timestamp_pb2.Timestamp(seconds=int(due.timestamp())),
    )
    resumed = OutboundDelivery.from_proto(stored)
    assert (resumed.attempts_made, resumed.next_attempt_time) == (1, due)
    assert orjson.loads(resumed.body) == {"trigger": "triggers/t1", "items": [{"sku": "S-1"}]}


def attempted_once(log: MemoryDeliveryLog, delivery_name: str) -> bool:
    return len(log.attempts(delivery_name)) == 1


async def test_attempts_and_disables_are_measured_for_prometheus(receivers: MakeReceiver) -> None:
    """Each attempt by destination and what followed it, its latency, and the destination's
    disabling; a destination of its own, so that the counts start at zero."""
    receiver = await receivers(statuses(503, 204, 410))
    name = f"destinations/metrics-{time.monotonic_ns()}"
    log = MemoryDeliveryLog()
    async with dispatching(log) as d:
        await d.set_destination(webhook(receiver, name=name))
        for n in (1, 2, 3):  # one at a time: the 503's retry is scheduled minutes later
            d.submit(delivery(n, destination=name))
            await until(partial(attempted_once, log, f"deliveries/{n}"))
        await until(lambda: log.disabled_reason(name) == GONE_REASON)

    def counted(metric: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(metric, {"destination": name, **labels}) or 0.0

    attempts = "sendtime_triggers_delivery_attempts_total"
    assert counted(attempts, result="retry") == 1  # the 503
    assert counted(attempts, result="delivered") == 1
    assert counted(attempts, result="failed") == 1  # the 410
    assert counted("sendtime_triggers_delivery_attempt_seconds_count") == 3
    assert counted("sendtime_triggers_destination_disables_total") == 1
