"""Health that means something (docs/operations.md#health), over the real protocol on the
plaintext health port, as kubelet calls it: readiness (the overall status, and each hosted
service's) follows what the service needs to do its job, forgiving a failure shorter than
READINESS_DELAY_SECONDS; liveness (``liveness``) is refused or NOT_SERVING until start-up is
done, then SERVING until shutdown whatever the dependencies do."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import devstack
from ingest.server import SERVICE_NAME as INGEST_SERVICE
from ingest.server import create_app as create_ingest_app
from ingest.settings import Settings as IngestSettings
from profile_service.server import SERVICE_NAMES as PROFILE_SERVICES
from profile_service.server import create_app as create_profile_app
from profile_service.settings import Settings as ProfileSettings
from render.server import RenderApp
from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime_common.event_log import JetStreamSettings
from sendtime_common.grpc_server import LIVENESS, OVERALL_HEALTH
from sendtime_common.readiness import ReadinessSettings
from tests.conftest import LOCAL_SERVER, channel, eventually
from tests.factories import event, identify
from tests.keys import issue_key
from triggers.server import TriggersApp

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
REFUSED = -1  # the port is not listening yet
UNANSWERED = -2  # the port is bound, the server not started: the probe times out

DELAY_S = 0.5
FAST_READINESS = ReadinessSettings(delay_s=DELAY_S, check_interval_s=0.05)


async def status(port: int | None, service: str, timeout_s: float = 5) -> int:
    """What a probe of ``service`` on the health ``port`` gets: on a connection of its own, in
    plaintext, with a timeout, as kubelet's gRPC probe asks (5 s by default, not kubelet's 1 s:
    the probe shares the test's loop with the app on a loaded machine)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as probe:
        try:
            reply = await health_pb2_grpc.HealthStub(probe).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return UNANSWERED
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            return REFUSED
    return int(reply.status)


async def seconds_until(check: Callable[[], Awaitable[bool]], timeout_s: float) -> float:
    """How long until ``check()`` is true; fails after ``timeout_s``."""
    started = asyncio.get_running_loop().time()
    await eventually(check, timeout_s)
    return asyncio.get_running_loop().time() - started


class LivenessRecord:
    """Asks ``liveness`` every 20 ms, as a tight probe would, and keeps every answer."""

    def __init__(self, port: int | None) -> None:
        self.answers: list[int] = []
        self._task = asyncio.create_task(self._poll(port))

    async def _poll(self, port: int | None) -> None:
        while True:
            self.answers.append(await status(port, LIVENESS))
            await asyncio.sleep(0.02)

    async def stop(self) -> list[int]:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        return self.answers


async def test_ingest_is_unready_while_its_nats_is_down_and_alive_throughout(
    tmp_path: Path, database_url: str, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sendtime_common.readiness")
    port = devstack.free_port()
    nats = devstack.start_nats(port, tmp_path / "nats")
    app = await create_ingest_app(
        IngestSettings(
            **LOCAL_SERVER,
            database_url=database_url,
            event_log=JetStreamSettings(url=f"nats://127.0.0.1:{port}", publish_timeout_s=0.5),
            readiness=FAST_READINESS,
        )
    )
    await app.start()
    try:
        health = app.grpc.health_port
        async with channel(f"127.0.0.1:{app.grpc.port}", await issue_key(database_url)) as calls:
            ingest = ingest_pb2_grpc.IngestServiceStub(calls)
            assert [await status(health, name) for name in (OVERALL_HEALTH, INGEST_SERVICE, LIVENESS)] == [
                SERVING
            ] * 3
            assert app.grpc.readiness.conditions == ["event log"]
            liveness = LivenessRecord(health)

            caplog.clear()
            await asyncio.to_thread(devstack.stop_process, nats)
            await eventually(lambda: is_(health, OVERALL_HEALTH, NOT_SERVING), timeout_s=DELAY_S + 15)
            # The outage was forgiven for DELAY_S, on the monitor's own timeline (its records'
            # times: the check's first failure, then the decision), whatever stopping NATS and
            # noticing it took on a loaded machine. (The rules' exact timing: test_readiness.py.)
            not_ready = next(r for r in caplog.records if r.getMessage() == "not ready")
            assert (getattr(not_ready, "failing", None), getattr(not_ready, "delay_s", None)) == (
                ["event log"],
                DELAY_S,
            )
            failing_since = [
                r.created
                for r in caplog.records
                if r.getMessage() == "readiness condition failing"
                and getattr(r, "condition", None) == "event log"
                and r.created <= not_ready.created
            ][-1]
            forgiven_s = not_ready.created - failing_since
            assert forgiven_s >= DELAY_S, f"NOT_SERVING {forgiven_s:.2f} s after the check first failed"
            assert await status(health, INGEST_SERVICE) == NOT_SERVING  # the same for each service
            # Readiness only steers traffic: the port answers as before, UNAVAILABLE to retry.
            sent = await ingest.SendEvents(
                ingest_pb2.SendEventsRequest(events=[event(user_id=unique, identify=identify(a=1))]),
                timeout=10,
            )
            assert sent.results[0].outcome == ingest_pb2.EVENT_OUTCOME_RETRY
            assert sent.results[0].status.code == grpc.StatusCode.UNAVAILABLE.value[0]

            nats = await asyncio.to_thread(devstack.start_nats, port, tmp_path / "nats")
            back_s = await seconds_until(lambda: is_(health, OVERALL_HEALTH, SERVING), timeout_s=30)
            assert await status(health, INGEST_SERVICE) == SERVING
            sent = await ingest.SendEvents(
                ingest_pb2.SendEventsRequest(events=[event(user_id=unique, identify=identify(a=2))]),
                timeout=10,
            )
            assert sent.results[0].outcome == ingest_pb2.EVENT_OUTCOME_ACCEPTED
            answers = await liveness.stop()
        # Asked dozens of times over the outage and the return: SERVING every time (a probe left
        # unanswered for its 5 s is a failed liveness probe too).
        assert len(answers) > 20 and set(answers) == {SERVING}, f"back after {back_s:.1f} s: {answers}"
    finally:
        await app.stop(grace_s=1)
        devstack.stop_process(nats)


async def healthz(port: int) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz") as answer:
        return answer.status, await answer.json()


async def is_(port: int | None, service: str, wanted: int) -> bool:
    return await status(port, service) == wanted


async def test_profile_is_unready_once_its_merger_stops(
    tmp_path: Path, database_url: str, redis_url: str
) -> None:
    port = devstack.free_port()
    nats = devstack.start_nats(port, tmp_path / "nats")  # its own stream: no one else's events
    app = await create_profile_app(
        ProfileSettings(
            **LOCAL_SERVER,
            database_url=database_url,
            redis_url=redis_url,
            near_cache_entries=0,
            event_log=JetStreamSettings(url=f"nats://127.0.0.1:{port}"),
            readiness=FAST_READINESS,
        )
    )
    await app.start()
    try:
        health = app.grpc.health_port
        names = [OVERALL_HEALTH, *PROFILE_SERVICES]
        assert [await status(health, name) for name in names] == [SERVING] * len(names)
        assert sorted(app.grpc.readiness.conditions) == ["event log", "merger"]
        assert app.grpc.http is not None
        assert await healthz(app.grpc.http.port) == (200, {"status": "SERVING"})

        app.merger.stop()  # it returns after its current fetch (at most 1 s)
        await eventually(lambda: is_(health, OVERALL_HEALTH, NOT_SERVING), timeout_s=DELAY_S + 15)
        assert [await status(health, name) for name in names] == [NOT_SERVING] * len(names)
        assert await status(health, LIVENESS) == SERVING  # no restart for it
        # The same over HTTP, for load balancers that cannot ask gRPC health.
        assert await healthz(app.grpc.http.port) == (503, {"status": "NOT_SERVING"})
    finally:
        await app.stop(grace_s=1)
        devstack.stop_process(nats)


async def test_liveness_is_refused_during_migrations_and_serving_once_started(
    database_url: str, nats_url: str
) -> None:
    health_port = devstack.free_port()
    settings = IngestSettings(
        **{**LOCAL_SERVER, "health_address": f"127.0.0.1:{health_port}"},
        database_url=database_url,
        event_log=JetStreamSettings(url=nats_url),
        readiness=FAST_READINESS,
    )
    # Another replica migrating: this one waits for the migrations' lock.
    holder = await asyncpg.connect(database_url)
    lock = (0x5E2D, await holder.fetchval("SELECT hashtext('ingest_schema_migrations')"))
    await holder.execute("SELECT pg_advisory_lock($1, $2)", *lock)
    starting = asyncio.create_task(create_ingest_app(settings))
    try:

        async def waiting_for_the_lock() -> bool:
            return bool(
                await holder.fetchval(
                    "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
                    " WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = current_database()"
                    " AND l.classid = $1",
                    lock[0],
                )
            )

        await eventually(waiting_for_the_lock)
        assert await status(health_port, LIVENESS) == REFUSED  # a startup probe keeps waiting
        await holder.execute("SELECT pg_advisory_unlock($1, $2)", *lock)
        app = await asyncio.wait_for(starting, timeout=30)
        assert await status(health_port, LIVENESS, timeout_s=0.2) == UNANSWERED  # built, not started
        await app.start()
        try:
            assert await status(health_port, LIVENESS) == SERVING
            assert await status(health_port, OVERALL_HEALTH) == SERVING
        finally:
            await app.stop(grace_s=1)
    finally:
        if not starting.done():
            starting.cancel()
        await holder.close()


async def test_render_has_no_conditions_and_triggers_watches_its_store_and_engine(
    render_app: RenderApp, triggers_app: TriggersApp
) -> None:
    assert render_app.grpc.readiness.conditions == []  # its fallbacks cover its dependencies
    assert triggers_app.grpc.readiness.conditions == ["store", "engine", "profile changes"]
    for app in (render_app, triggers_app):
        for name in [OVERALL_HEALTH, LIVENESS, *app.grpc.service_names]:
            assert await status(app.grpc.health_port, name) == SERVING, name
        assert await app.grpc.readiness.evaluate()  # every condition holds now
