"""Render spreads its profile lookups over every profile replica its target names (round robin,
sendtime_common.service_channel), rather than sending them all down one connection: two profile
processes each serve a share, as their own metrics show."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

import devstack
from render import profiles as render_profiles
from sendtime.render.v1 import render_pb2
from tests.conftest import RenderServiceFactory, eventually, local_env, repo_root, user
from tests.render.test_render_service import abandoned_cart, render_request

RENDERS = 40
RENDER_DEADLINE_S = 5.0


class ProfileReplica:
    """A profile service process of the test's own, on fixed loopback ports."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self.port, self.health_port, self.metrics_port = (devstack.free_port() for _ in range(3))
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "profile_service"],
                env={
                    **os.environ,
                    **local_env(
                        "PROFILE",
                        **env,
                        PROFILE_ADDRESS=f"127.0.0.1:{self.port}",
                        PROFILE_HEALTH_ADDRESS=f"127.0.0.1:{self.health_port}",
                        PROFILE_METRICS_ADDRESS=f"127.0.0.1:{self.metrics_port}",
                    ),
                },
                cwd=repo_root(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def wait_until_serving(self, timeout_s: float = 30) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.health_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            async with asyncio.timeout(timeout_s):
                while True:
                    assert self.process.poll() is None, self.log_path.read_text()[-2000:]
                    try:
                        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            return
                    except grpc.aio.AioRpcError:
                        pass
                    await asyncio.sleep(0.1)

    async def profile_lookups(self, metrics_key: str) -> float:
        """The profile lookups this replica answered, whatever their status."""
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {metrics_key}"}) as session:
            async with session.get(f"http://127.0.0.1:{self.metrics_port}/metrics") as response:
                text = await response.text()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "grpc_server_handled"
            for sample in family.samples
            if sample.name == "grpc_server_handled_total"
            and sample.labels["grpc_service"] == "sendtime.profile.v1.ProfileService"
        )


@pytest.fixture
def profile_replicas(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[ProfileReplica]]:
    # A NATS of their own: the session's profile service consumes the shared one.
    nats_port = devstack.free_port()
    nats = devstack.start_nats(nats_port, tmp_path_factory.mktemp("replicas-nats"))
    logs = tmp_path_factory.mktemp("replicas")
    env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "NATS_URL": f"nats://127.0.0.1:{nats_port}"}
    replicas = [ProfileReplica(env, logs / f"profile-{i}.log") for i in range(2)]
    try:
        yield replicas
    finally:
        for replica in replicas:
            replica.process.terminate()
        for replica in replicas:
            try:
                replica.process.wait(20)
            except subprocess.TimeoutExpired:
                replica.process.kill()
                replica.process.wait()
        devstack.stop_process(nats)


async def test_render_spreads_profile_lookups_over_every_replica(
    profile_replicas: list[ProfileReplica],
    render_service: RenderServiceFactory,
    metrics_key: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each lookup may take the render's whole deadline, not the 1 s cap on a BatchGetProfiles
    # call, which a replica process on a loaded machine can pass (TIMEOUT, not NOT_FOUND).
    monkeypatch.setattr(render_profiles, "LOOKUP_TIMEOUT_MAX_S", RENDER_DEADLINE_S)
    await asyncio.gather(*(replica.wait_until_serving() for replica in profile_replicas))
    # The static form of a name with two addresses; a headless Service's DNS name gives the
    # channel the same list (dns:///profile-headless:50052).
    target = "ipv4:" + ",".join(f"127.0.0.1:{replica.port}" for replica in profile_replicas)

    async def served_since(before: list[float]) -> list[float]:
        return [
            await replica.profile_lookups(metrics_key) - old
            for replica, old in zip(profile_replicas, before, strict=True)
        ]

    async with render_service(target) as stub:

        async def render(user_id: str) -> None:
            response = await stub.Render(
                render_request(user(user_id), abandoned_cart()), timeout=RENDER_DEADLINE_S
            )
            # Nobody of these names: each lookup answered, NOT_FOUND.
            assert response.fallback_reason == render_pb2.FALLBACK_REASON_PROFILE_NOT_FOUND

        # Round robin picks only connected replicas: until the slower one has connected (a
        # loaded machine can take a while), every lookup goes to the other. Measured from when
        # both have served one.
        warming_up = [await replica.profile_lookups(metrics_key) for replica in profile_replicas]

        async def both_connected() -> bool:
            await render("u-warm-up")
            return min(await served_since(warming_up)) > 0

        await eventually(both_connected, timeout_s=30)
        before = [await replica.profile_lookups(metrics_key) for replica in profile_replicas]
        for i in range(RENDERS):
            await render(f"u-{i}")
    served = await served_since(before)
    assert sum(served) == RENDERS
    assert min(served) >= RENDERS // 4, served  # round robin: about half each
