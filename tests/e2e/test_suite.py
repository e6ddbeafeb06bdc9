"""The suite as operators and engineers use it: four service processes, driven from outside
with the real grpcurl binary, and `suite.py demo` (what `make demo` runs) end to end."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.type import money_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

import devstack
import suite
from local_credentials import ensure_local_credentials
from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime.render.v1 import render_pb2, render_pb2_grpc
from sendtime.triggers.v1 import triggers_pb2, triggers_pb2_grpc
from sendtime_common.auth.client import authenticated_channel
from sendtime_common.tls import ClientTls
from tests.conftest import SHARES_POSTGRES_ROLES, database_dropped_after, repo_root
from tests.triggers.support import Received, Receiver
from triggers.builtin import cart_abandoned

pytestmark = [pytest.mark.e2e, SHARES_POSTGRES_ROLES]  # `make run` sets up roles

GRPCURL = str(Path(sys.executable).parent / "grpcurl")
# How long an event may take to merge through the service processes (the cart story waits as
# long): seconds on a loaded machine; a wait returns as soon as the merge is seen.
MERGE_WAIT_S = 30.0
DEFAULT_PORTS = {
    "50051": "INGEST_ADDRESS",
    "50052": "PROFILE_ADDRESS",
    "50053": "RENDER_ADDRESS",
    "50054": "TRIGGERS_ADDRESS",
    "50055": "SYNC_ADDRESS",
}
HEALTH_PORTS = {
    "50061": "INGEST_HEALTH_ADDRESS",
    "50062": "PROFILE_HEALTH_ADDRESS",
    "50063": "RENDER_HEALTH_ADDRESS",
    "50064": "TRIGGERS_HEALTH_ADDRESS",
    "50065": "SYNC_HEALTH_ADDRESS",
}
HTTP_PORTS = {
    "8080": "INGEST_HTTP_ADDRESS",
    "8082": "PROFILE_HTTP_ADDRESS",
    "8083": "RENDER_HTTP_ADDRESS",
    "8084": "TRIGGERS_HTTP_ADDRESS",
    "8085": "SYNC_HTTP_ADDRESS",
}
METRICS_PORTS = {
    "9461": "INGEST_METRICS_ADDRESS",
    "9462": "PROFILE_METRICS_ADDRESS",
    "9463": "RENDER_METRICS_ADDRESS",
    "9464": "TRIGGERS_METRICS_ADDRESS",
    "9465": "SYNC_METRICS_ADDRESS",
}
PORT_VARIABLES = [
    *DEFAULT_PORTS.values(),
    *HEALTH_PORTS.values(),
    *HTTP_PORTS.values(),
    *METRICS_PORTS.values(),
]


@pytest.fixture(scope="module")
async def suite_database() -> AsyncIterator[str]:
    """A database name for the suite; devstack creates it, as `make run` does. Dropped after."""
    async with database_dropped_after("sendtime_e2e") as (_, url):
        yield url


@pytest.fixture(scope="module")
def suite_env(
    redis_url: str, suite_database: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """As `make run` sees it: no NATS_URL, so devstack runs its own NATS with a user per service
    (the module's own: its processes must not share a stream with the in-process services)."""
    env = {
        **{k: v for k, v in os.environ.items() if k != "NATS_URL"},
        "REDIS_URL": redis_url,
        "DATABASE_URL": suite_database,
        "SENDTIME_RUN_DIR": str(tmp_path_factory.mktemp("e2e-run")),
        "SHUTDOWN_GRACE_SECONDS": "5",
        # The cart story's receiver listens on loopback, which webhooks may not reach by default.
        "TRIGGERS_WEBHOOK_ALLOW": "127.0.0.1",
    }
    for variable in PORT_VARIABLES:
        env[variable] = f"127.0.0.1:{devstack.free_port()}"
    return env


@pytest.fixture(scope="module")
def running_suite(suite_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """The five services as processes, as `make run` starts them."""
    started = devstack.up(suite_env)  # NATS (locked down); the rest listens already; the database
    credentials = ensure_local_credentials(suite_env, Path(suite_env["SENDTIME_RUN_DIR"]))
    env = {
        **suite_env,
        "NATS_URL": devstack.nats_url(suite_env),
        "SENDTIME_KEY": credentials.admin_key,
        "SENDTIME_CA_FILE": str(credentials.tls.ca_file),
        "SENDTIME_METRICS_KEY_FILE": str(credentials.prometheus_key_file),
    }
    running = suite.start_services(env, Path(suite_env["SENDTIME_RUN_DIR"]) / "logs", credentials=credentials)
    yield env
    codes = suite.stop_services(running)
    devstack.down(suite_env, names=started)
    assert codes == {"sync": 0, "triggers": 0, "render": 0, "ingest": 0, "profile": 0}, (
        "a service did not exit 0"
    )


def target(env: dict[str, str], variable: str) -> str:
    return "127.0.0.1:" + env[variable].rpartition(":")[2]


def grpcurl(
    *args: str, key: str | None, ca: str | None, data: dict[str, Any] | None = None
) -> subprocess.CompletedProcess[str]:
    """The real grpcurl, over TLS trusting ``ca`` (None: plaintext), with ``key`` (None: no
    credentials)."""
    command = [GRPCURL, "-max-time", "10", *(["-cacert", ca] if ca else ["-plaintext"])]
    if key is not None:
        command += ["-H", f"authorization: Bearer {key}"]
    if data is not None:
        command += ["-d", json.dumps(data)]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=30, check=False)


def grpcurl_json(
    *args: str, key: str | None, ca: str | None, data: dict[str, Any] | None = None
) -> dict[str, Any]:
    result = grpcurl(*args, key=key, ca=ca, data=data)
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def test_list_shows_each_service_with_health_and_reflection(running_suite: dict[str, str]) -> None:
    for variable, services in [
        ("INGEST_ADDRESS", ["sendtime.ingest.v1.IngestService"]),
        (
            "PROFILE_ADDRESS",
            [
                "sendtime.profile.v1.ProfileService",
                "sendtime.profile.v1.UnmergedEventService",
                "sendtime.auth.v1.KeyService",
                "sendtime.auth.v1.AuditService",
            ],
        ),
        ("RENDER_ADDRESS", ["sendtime.render.v1.RenderService", "sendtime.render.v1.TemplateService"]),
        (
            "TRIGGERS_ADDRESS",
            [
                "sendtime.triggers.v1.DeliveryService",
                "sendtime.triggers.v1.DestinationService",
                "sendtime.triggers.v1.TriggerService",
            ],
        ),
        ("SYNC_ADDRESS", ["sendtime.sync.v1.SyncService"]),
    ]:
        result = grpcurl(
            target(running_suite, variable),
            "list",
            key=running_suite["SENDTIME_KEY"],
            ca=running_suite["SENDTIME_CA_FILE"],
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == sorted(
            [*services, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"]
        )
        # Health needs no key, but grpcurl asks reflection (which does) for its descriptor.
        # Readiness, and liveness as docs/operations.md#health asks it.
        for asked in ({}, {"service": "liveness"}):
            health = grpcurl_json(
                target(running_suite, variable),
                "grpc.health.v1.Health/Check",
                key=running_suite["SENDTIME_KEY"],
                ca=running_suite["SENDTIME_CA_FILE"],
                data=asked,
            )
            assert health == {"status": "SERVING"}, asked
    # The merger's dead letters answer the way docs/limits.md calls them: the key's scope, TLS.
    unmerged = grpcurl_json(
        target(running_suite, "PROFILE_ADDRESS"),
        "sendtime.profile.v1.UnmergedEventService/ListUnmergedEvents",
        key=running_suite["SENDTIME_KEY"],
        ca=running_suite["SENDTIME_CA_FILE"],
    )
    assert set(unmerged) <= {"unmergedEvents", "nextPageToken"}


def test_an_event_sent_as_json_shows_up_in_the_profile_and_the_render(running_suite: dict[str, str]) -> None:
    user_id = f"grpcurl-{uuid.uuid4().hex[:8]}"
    key, ca = running_suite["SENDTIME_KEY"], running_suite["SENDTIME_CA_FILE"]
    sent = grpcurl_json(
        target(running_suite, "INGEST_ADDRESS"),
        "sendtime.ingest.v1.IngestService/SendEvents",
        key=key,
        ca=ca,
        data={
            "events": [
                {
                    "event_id": f"evt-{user_id}",
                    "customer": {"user_id": user_id, "email": f"{user_id}@Example.com"},
                    "occurred_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1)),
                    "source": "EVENT_SOURCE_CRM",
                    "identify": {"traits": {"first_name": "Grace", "plan": "pro"}},
                }
            ]
        },
    )
    assert sent["results"][0]["outcome"] == "EVENT_OUTCOME_ACCEPTED"

    lookup = {"identifier": {"kind": "IDENTIFIER_KIND_EMAIL", "value": f"{user_id}@example.com"}}
    deadline = time.monotonic() + MERGE_WAIT_S
    while True:
        result = grpcurl(
            target(running_suite, "PROFILE_ADDRESS"),
            "sendtime.profile.v1.ProfileService/GetProfile",
            key=key,
            ca=ca,
            data=lookup,
        )
        if result.returncode == 0:
            break
        assert "NotFound" in result.stderr, result.stderr
        assert time.monotonic() < deadline, f"the event did not reach the profile within {MERGE_WAIT_S:.0f} s"
        time.sleep(0.05)
    profile = json.loads(result.stdout)["profile"]
    assert profile["traits"] == {"first_name": "Grace", "plan": "pro"}
    assert {"kind": "IDENTIFIER_KIND_USER_ID", "value": user_id} in profile["identifiers"]

    rendered = grpcurl_json(
        target(running_suite, "RENDER_ADDRESS"),
        "sendtime.render.v1.RenderService/Render",
        key=key,
        ca=ca,
        data={
            "customer": {"kind": "IDENTIFIER_KIND_USER_ID", "value": user_id},
            "template": {"subject": "Hi {{ profile.traits.first_name }} ({{ profile.traits.plan }})"},
        },
    )
    assert rendered["subject"] == "Hi Grace (pro)"
    assert "fallbackUsed" not in rendered  # proto3 JSON leaves out false


def test_every_port_serves_tls_needs_a_key_and_probes_use_a_plaintext_health_port(
    running_suite: dict[str, str],
) -> None:
    key, ca = running_suite["SENDTIME_KEY"], running_suite["SENDTIME_CA_FILE"]
    for variable, health_variable in zip(DEFAULT_PORTS.values(), HEALTH_PORTS.values(), strict=True):
        address = target(running_suite, variable)
        # A TLS port drops a plaintext connection at once; grpcurl would retry for its whole
        # connect timeout (10 s by default), so give it 2.
        plaintext = grpcurl("-connect-timeout", "2", address, "list", key=key, ca=None)
        assert plaintext.returncode != 0 and "Failed to dial" in plaintext.stderr, (
            "a TLS port answered plaintext"
        )
        untrusted = subprocess.run(
            [GRPCURL, "-max-time", "10", "-H", f"authorization: Bearer {key}", address, "list"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert untrusted.returncode != 0 and "certificate" in untrusted.stderr  # not the system's CA
        no_key = grpcurl(address, "list", key=None, ca=ca)
        assert no_key.returncode != 0 and "Unauthenticated" in no_key.stderr

        probe = grpc.insecure_channel(target(running_suite, health_variable))
        try:
            health = health_pb2_grpc.HealthStub(probe)
            ready = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            alive = health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5)
        finally:
            probe.close()
        # No TLS, no key: as kubelet's readiness and liveness probes call (docs/operations.md#health).
        assert ready.status == alive.status == health_pb2.HealthCheckResponse.SERVING


def test_a_bad_request_shows_field_violations_in_grpcurl(running_suite: dict[str, str]) -> None:
    result = grpcurl(
        target(running_suite, "PROFILE_ADDRESS"),
        "sendtime.profile.v1.ProfileService/GetProfile",
        key=running_suite["SENDTIME_KEY"],
        ca=running_suite["SENDTIME_CA_FILE"],
        data={"identifier": {"kind": "IDENTIFIER_KIND_EMAIL", "value": "not an email"}},
    )
    assert result.returncode != 0
    assert "Code: InvalidArgument" in result.stderr
    assert '{"field":"identifier.value"' in result.stderr  # the BadRequest detail, decoded


def readme_grpcurl_blocks() -> list[str]:
    """The shell blocks of README.md's grpcurl section, as a reader would paste them."""
    readme = (repo_root() / "README.md").read_text()
    section = readme.split("## Try it with grpcurl", 1)[1].split("\n## ", 1)[0]
    return [block.split("\n", 1)[1].split("```")[0] for block in section.split("```sh")[1:]]


def run_readme_block(block: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    for port, variable in DEFAULT_PORTS.items():  # the README shows the default ports
        block = block.replace(f"localhost:{port}", target(env, variable))
    block = block.replace(".run/tls/ca.crt", shlex.quote(env["SENDTIME_CA_FILE"]))
    script = f'grpcurl() {{ {shlex.quote(GRPCURL)} "$@"; }}\nset -e\n{block}'
    return subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SENDTIME_KEY": env["SENDTIME_KEY"]},
    )


def test_the_readme_grpcurl_examples_work_when_pasted(running_suite: dict[str, str]) -> None:
    blocks = readme_grpcurl_blocks()
    assert len(blocks) == 9
    outputs = []
    for block in blocks:
        deadline = time.monotonic() + MERGE_WAIT_S
        while True:  # a pasted lookup may run before the merge of what was sent just before
            result = run_readme_block(block, running_suite)
            if result.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert result.returncode == 0, f"{block}\n{result.stderr}"
        outputs.append(result.stdout + result.stderr)
    listing, sent, profiles, rendered, stored, dead_letters, bad_request, triggers, erased = outputs
    assert "sendtime.ingest.v1.IngestService" in listing and '"status": "SERVING"' in listing
    assert sent.count("EVENT_OUTCOME_ACCEPTED") == 2
    assert '"first_name": "Ada"' in profiles and '"found": true' in profiles
    assert '"cart_item_added": {' in profiles and '"export": {' in profiles  # the history, the export
    assert '"subject": "Ada, your cart is waiting"' in rendered
    assert "Total €89.90. Code COMEBACK10" in rendered
    assert '"subject": "Ada, your cart is waiting"' in stored and '"template_version": "1"' in stored
    assert '"skip_reason": "SKIP_REASON_REQUIRED_DATA_MISSING"' in stored  # "nobody" has no cart
    assert '"outcome": "EVENT_OUTCOME_REJECTED"' in dead_letters and '"rejectedEvents/' in dead_letters
    assert (
        '{"field":"cart_item_added.quantity"' in dead_letters
        and '"state": "REJECTED_EVENT_STATE_PENDING"' in dead_letters
    )
    assert '"rejected": "1"' in dead_letters  # GetIngestStats
    assert '"name": "destinations/adapter"' in triggers and '"name": "triggers/cart-reminder"' in triggers
    assert '"state": "TRIGGER_STATE_ACTIVE"' in triggers and '"deliveries": [' not in triggers  # none yet
    assert '"eventsDeleted"' in erased or '"events_deleted"' in erased
    assert '{"field":"customer.value"' in bad_request and '{"field":"template.subject"' in bad_request


def readme_curl_blocks() -> list[str]:
    """The shell blocks of README.md's curl section."""
    readme = (repo_root() / "README.md").read_text()
    section = readme.split("## Try it with curl", 1)[1].split("\n## ", 1)[0]
    return [block.split("\n", 1)[1].split("```")[0] for block in section.split("```sh")[1:]]


def test_the_readme_curl_examples_work_when_pasted(running_suite: dict[str, str]) -> None:
    """Over HTTPS with the local CA, as an engineer pastes them: events sent, the profile
    fetched by email, a template stored and rendered at send time with its caching headers, a
    Segment-style track call."""
    blocks = readme_curl_blocks()
    assert len(blocks) == 4
    outputs = []
    for block in blocks:
        for port, variable in HTTP_PORTS.items():
            served_on = running_suite[variable].rpartition(":")[2]
            block = block.replace(f"localhost:{port}", f"localhost:{served_on}")
        block = block.replace(".run/tls/ca.crt", shlex.quote(running_suite["SENDTIME_CA_FILE"]))
        deadline = time.monotonic() + MERGE_WAIT_S
        while True:  # a pasted lookup may run before the merge of what was sent just before
            result = subprocess.run(
                ["bash", "-c", f"set -e\n{block}"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                env={**os.environ, "SENDTIME_KEY": running_suite["SENDTIME_KEY"]},
            )
            if result.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert result.returncode == 0, f"{block}\n{result.stdout}\n{result.stderr}"
        outputs.append(result.stdout)
    sent, profiles, rendered, tracked = outputs
    assert sent.count('"EVENT_OUTCOME_ACCEPTED"') == 2
    assert '"first_name":"Grace"' in profiles and '"sku":"TRAIL-42"' in profiles
    assert "HTTP/1.1 404" in profiles and '"reason":"PROFILE_NOT_FOUND"' in profiles
    assert '"subject":"Grace, your Trail runner is waiting"' in rendered
    assert "cache-control: private, max-age=60" in rendered.lower() and "etag: w/" in rendered.lower()
    assert '"accepted":1' in tracked and '"outcome":"accepted"' in tracked


def test_the_curl_lines_make_run_prints_work_when_pasted(running_suite: dict[str, str]) -> None:
    """Each line as printed (the CA's relative path, the key inline): the event sent over HTTP
    and the Segment-style track call, then the send-time fetches of that customer."""
    user_id = f"printed-{uuid.uuid4().hex[:8]}"
    profile, render, send, track = suite.curl_examples(
        running_suite, user_id, running_suite["SENDTIME_KEY"], Path(running_suite["SENDTIME_CA_FILE"])
    ).splitlines()

    def paste(line: str) -> subprocess.CompletedProcess[str]:
        command = line.strip() + " --fail-with-body"
        return subprocess.run(
            ["bash", "-c", command], capture_output=True, text=True, timeout=60, check=False
        )

    sent, tracked = paste(send), paste(track)
    assert sent.returncode == 0 and '"EVENT_OUTCOME_ACCEPTED"' in sent.stdout, sent
    assert "-u " in track and "/v1/track" in track
    assert tracked.returncode == 0 and '"outcome":"accepted"' in tracked.stdout, tracked
    deadline = time.monotonic() + MERGE_WAIT_S
    while (fetched := paste(profile)).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.1)  # until the events have merged
    assert fetched.returncode == 0 and '"plan":"pro"' in fetched.stdout, fetched
    # `make run` stores the demo template first (its demo step); this suite has not.
    rendered = paste(render)
    assert '"reason":"TEMPLATE_NOT_FOUND"' in rendered.stdout, rendered


def test_every_service_serves_its_metrics_in_plaintext_to_the_prometheus_key(
    running_suite: dict[str, str],
) -> None:
    """Each service's metrics port answers GET /metrics to the key `make run` makes for
    Prometheus (metrics.read) and to nobody else, with the calls it served counted by method and
    route template: a profile asked for by email with grpcurl and with curl is counted under its
    method and its route, and the email is in no label. The scrape `make run` prints works."""
    env = running_suite
    email = f"metrics-{uuid.uuid4().hex[:8]}@example.com"
    asked = grpcurl(
        "-d", json.dumps({"name": f"profiles/email:{email}"}), target(env, "PROFILE_ADDRESS"),
        "sendtime.profile.v1.ProfileService/GetProfile", key=env["SENDTIME_KEY"], ca=env["SENDTIME_CA_FILE"],
    )  # fmt: skip
    assert "NotFound" in asked.stderr, asked.stderr
    fetched = subprocess.run(
        ["curl", "-sS", "--cacert", env["SENDTIME_CA_FILE"],
         "-H", f"Authorization: Bearer {env['SENDTIME_KEY']}",
         f"https://localhost:{env['PROFILE_HTTP_ADDRESS'].rpartition(':')[2]}/v1/profiles/email:{email}"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert '"PROFILE_NOT_FOUND"' in fetched.stdout
    samples: dict[str, list[Any]] = {}
    key = Path(env["SENDTIME_METRICS_KEY_FILE"]).read_text().strip()
    for variable in METRICS_PORTS.values():
        url = f"http://{target(env, variable)}/metrics"
        for refused in ({}, {"Authorization": f"Bearer {env['SENDTIME_KEY']}x"}):
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(urllib.request.Request(url, headers=refused), timeout=10)
            caught.value.close()  # it holds the refused answer's connection open until closed
            assert caught.value.code == 401, variable
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200
            text = answer.read().decode()
        assert "example.com" not in text, variable
        samples[variable] = [s for family in text_string_to_metric_families(text) for s in family.samples]
        assert any(s.name == "process_cpu_seconds_total" for s in samples[variable]), variable

    def counted(name: str, **labels: str) -> float:
        return sum(
            float(s.value)
            for s in samples["PROFILE_METRICS_ADDRESS"]
            if s.name == name and labels.items() <= s.labels.items()
        )

    assert (
        counted(
            "grpc_server_handled_total",
            grpc_service="sendtime.profile.v1.ProfileService",
            grpc_method="GetProfile",
            grpc_code="NOT_FOUND",
        )
        >= 1
    )
    assert (
        counted(
            "http_server_requests_total",
            listener="HTTP",
            route="/v1/{name=profiles/*}",
            method="GET",
            code="404",
        )
        >= 1
    )
    printed = suite.metrics_example(env, Path(env["SENDTIME_METRICS_KEY_FILE"]))
    pasted = subprocess.run(
        ["bash", "-c", printed.strip() + " --fail-with-body"], capture_output=True, text=True
    )
    assert pasted.returncode == 0 and "grpc_server_handled_total" in pasted.stdout, pasted


def test_every_http_port_serves_tls_and_needs_a_key(running_suite: dict[str, str]) -> None:
    ca = running_suite["SENDTIME_CA_FILE"]
    routes = {
        "INGEST_HTTP_ADDRESS": "/v1/ingestStats",
        "PROFILE_HTTP_ADDRESS": "/v1/profiles/user_id:nobody",
        "RENDER_HTTP_ADDRESS": "/v1/templates",
        "TRIGGERS_HTTP_ADDRESS": "/v1/triggers",
        "SYNC_HTTP_ADDRESS": "/v1/connectors",
    }
    for variable, route in routes.items():
        port = running_suite[variable].rpartition(":")[2]

        def curl(*args: str) -> subprocess.CompletedProcess[str]:
            command = ["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", *args]
            return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)

        assert curl(f"http://localhost:{port}/healthz").stdout == "000"  # no plaintext answer
        assert curl("--cacert", ca, f"https://localhost:{port}/healthz").stdout == "200"  # open, as probes
        assert curl("--cacert", ca, f"https://localhost:{port}{route}").stdout == "401"
        assert curl(f"https://localhost:{port}/healthz").returncode != 0  # not the system's CA


def test_an_abandoned_cart_sends_one_signed_webhook_and_an_order_sends_none(
    running_suite: dict[str, str],
) -> None:
    """Issue 17's cart story through the four processes, plus a second triggers replica: a cart
    left alone gets exactly one signed webhook carrying the email rendered with the live
    profile; a cart followed by an order gets none. The trigger waits 2 s (the ready-made one
    waits an hour; the engine's tests move a clock instead)."""
    env = running_suite
    # As running_suite made them: devstack's NATS, with a user per service.
    without_nats = {k: v for k, v in env.items() if k != "NATS_URL"}
    credentials = ensure_local_credentials(without_nats, Path(env["SENDTIME_RUN_DIR"]))
    replica_env = {
        **env,
        **credentials.service_env("triggers"),
        **{variable: f"127.0.0.1:{devstack.free_port()}" for variable in ("TRIGGERS_ADDRESS",
           "TRIGGERS_HEALTH_ADDRESS", "TRIGGERS_HTTP_ADDRESS", "TRIGGERS_METRICS_ADDRESS")},
    }  # fmt: skip
    replica = suite.start_services(
        replica_env,
        Path(env["SENDTIME_RUN_DIR"]) / "logs",
        [dataclasses.replace(suite.TRIGGERS, name="triggers-2")],
    )
    try:
        suffix, made, requests, settled = asyncio.run(_cart_story(env))
    finally:
        codes = suite.stop_services(replica)
    assert codes == {"triggers-2": 0}
    assert settled.settled, settled
    assert settled.episodes in (["fired"], ["exited", "fired"])
    assert (settled.exits, settled.fires, settled.deliveries) == (1, 1, [(DELIVERED, 1)])
    assert len(requests) == 1, [r.body[:200] for r in requests]
    [request] = requests
    assert request.verified == {made.signing_secret: True}
    body = json.loads(request.body)
    assert body["type"] == "trigger.fired"
    assert body["data"]["trigger"] == f"triggers/cart-{suffix}"
    assert "Trail runner" in body["data"]["message"]["text"]  # rendered with the live profile's cart
    assert "Hi Ada" in body["data"]["message"]["text"]


DELIVERED = triggers_pb2.DELIVERY_STATE_DELIVERED


@dataclasses.dataclass(frozen=True)
class CartStory:
    """Where the cart trigger's work stands in the triggers store."""

    episodes: list[str]  # their states, sorted
    exits: int  # customers with a known exit (an order)
    fires: int
    deliveries: list[tuple[int, int]]  # (state, attempts) of each

    @property
    def settled(self) -> bool:
        """Both carts decided: the ordered one's order applied (its cart opened nothing, the live
        profile's cart already empty, or exited), neither waiting, the left one fired; and no
        delivery waits for an answer."""
        return (
            self.exits >= 1
            and "waiting" not in self.episodes
            and "fired" in self.episodes
            and all(state != triggers_pb2.DELIVERY_STATE_PENDING for state, _ in self.deliveries)
        )


async def _cart_story_in_the_store(database_url: str, trigger_id: str) -> CartStory:
    """Until both carts are decided and every delivery answered (positive evidence that nothing
    more is on its way: a fixed wait also passed while the services were merely slow)."""
    connection = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + 30
        while True:
            story = CartStory(
                episodes=sorted(
                    r["state"]
                    for r in await connection.fetch(
                        "SELECT state FROM triggers_episodes WHERE trigger_id = $1", trigger_id
                    )
                ),
                exits=await connection.fetchval(
                    "SELECT count(*) FROM triggers_known_exits WHERE trigger_id = $1", trigger_id
                ),
                fires=await connection.fetchval(
                    "SELECT count(*) FROM triggers_fires WHERE trigger_id = $1", trigger_id
                ),
                deliveries=[
                    (r["state"], r["attempts"])
                    for r in await connection.fetch(
                        "SELECT state, attempts FROM triggers_deliveries WHERE trigger_id = $1", trigger_id
                    )
                ],
            )
            if story.settled or time.monotonic() > deadline:
                return story
            await asyncio.sleep(0.1)
    finally:
        await connection.close()


async def _cart_story(
    env: dict[str, str],
) -> tuple[str, triggers_pb2.CreateDestinationResponse, list[Received], CartStory]:
    """A destination to a receiver here, the cart email, the cart trigger; a cart left alone
    and a cart followed by an order. The names' suffix, the destination, what the receiver got
    once both carts were decided and every delivery answered, and the story in the store."""
    tls = ClientTls(ca_file=env["SENDTIME_CA_FILE"])
    receiver = await Receiver().start()
    suffix = uuid.uuid4().hex[:8]
    try:
        async with (
            authenticated_channel(suite.TRIGGERS.target(env), env["SENDTIME_KEY"], tls) as triggers_channel,
            authenticated_channel(suite.RENDER.target(env), env["SENDTIME_KEY"], tls) as render_channel,
            authenticated_channel(suite.INGEST.target(env), env["SENDTIME_KEY"], tls) as ingest_channel,
        ):
            destinations = triggers_pb2_grpc.DestinationServiceStub(triggers_channel)
            made = await destinations.CreateDestination(
                triggers_pb2.CreateDestinationRequest(
                    destination_id=f"esp-{suffix}",
                    destination=triggers_pb2.Destination(
                        webhook=triggers_pb2.WebhookTarget(url=receiver.url)
                    ),
                )
            )
            receiver.secrets.append(made.signing_secret)
            template = f"cart-{suffix}"
            await render_pb2_grpc.TemplateServiceStub(render_channel).CreateTemplate(
                render_pb2.CreateTemplateRequest(
                    template_id=template, content=suite.ABANDONED_CART_EMAIL, publish=True
                )
            )
            trigger = cart_abandoned(
                [made.destination.name], f"templates/{template}", delay=timedelta(seconds=2)
            )
            trigger.allowed_lateness.FromSeconds(0)
            await triggers_pb2_grpc.TriggerServiceStub(triggers_channel).CreateTrigger(
                triggers_pb2.CreateTriggerRequest(trigger_id=f"cart-{suffix}", trigger=trigger)
            )
            ingest = ingest_pb2_grpc.IngestServiceStub(ingest_channel)
            left = suite.demo_events(f"left-{suffix}", f"left-{suffix}@example.com")
            ordered = suite.demo_events(f"ordered-{suffix}", f"ordered-{suffix}@example.com")
            order = ingest_pb2.Event(
                event_id=f"order-{suffix}",
                customer=ordered[-1].customer,
                source=ingest_pb2.EVENT_SOURCE_WEB,
                order_completed=ingest_pb2.OrderCompleted(
                    order_id=f"o-{suffix}", total=money_pb2.Money(currency_code="EUR", units=89)
                ),
            )
            order.occurred_at.GetCurrentTime()
            sent = await ingest.SendEvents(ingest_pb2.SendEventsRequest(events=[*left, *ordered, order]))
            assert all(result.outcome == ingest_pb2.EVENT_OUTCOME_ACCEPTED for result in sent.results), sent

            deadline = time.monotonic() + 30
            while not receiver.requests and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            settled = await _cart_story_in_the_store(env["DATABASE_URL"], f"cart-{suffix}")
    finally:
        await receiver.stop()
    return suffix, made, receiver.requests, settled


def test_no_log_holds_a_key_an_email_a_raw_identifier_or_a_password(running_suite: dict[str, str]) -> None:
    """Seed a known key, email and user id through every path that touches them (keys made and
    refused, events, lookups, export, erasure, a bad request), then read every log the suite
    wrote: the services' and NATS's."""
    key, ca = running_suite["SENDTIME_KEY"], running_suite["SENDTIME_CA_FILE"]
    ingest, profile = target(running_suite, "INGEST_ADDRESS"), target(running_suite, "PROFILE_ADDRESS")
    render = target(running_suite, "RENDER_ADDRESS")
    marker = uuid.uuid4().hex[:10]
    email, user_id = f"Private.Person.{marker}@Example.com", f"private-user-{marker}"
    made = grpcurl_json(
        profile,
        "sendtime.auth.v1.KeyService/CreateApiKey",
        key=key,
        ca=ca,
        data={"display_name": "log probe", "scopes": ["SCOPE_PROFILES_READ"]},
    )
    new_key = made["key"]
    grpcurl_json(
        ingest,
        "sendtime.ingest.v1.IngestService/SendEvents",
        key=key,
        ca=ca,
        data={
            "events": [
                {
                    "event_id": f"probe-{marker}",
                    "customer": {"user_id": user_id, "email": email},
                    "occurred_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1)),
                    "source": "EVENT_SOURCE_CRM",
                    "identify": {"traits": {"first_name": f"Private{marker}"}},
                },
                {"event_id": f"probe-bad-{marker}", "customer": {"email": email}, "identify": {}},
            ]
        },
    )
    lookup = {"identifier": {"kind": "IDENTIFIER_KIND_EMAIL", "value": email}}
    deadline = time.monotonic() + MERGE_WAIT_S
    while grpcurl(
        profile, "sendtime.profile.v1.ProfileService/GetProfile", key=new_key, ca=ca, data=lookup
    ).returncode:
        assert time.monotonic() < deadline, "the probe's event did not reach the profile"
        time.sleep(0.1)
    for refused_key in (new_key[:-1] + ("A" if new_key[-1] != "A" else "B"), "Bearer-less " + email):
        grpcurl(profile, "sendtime.profile.v1.ProfileService/GetProfile", key=refused_key, ca=ca, data=lookup)
    grpcurl(
        profile, "sendtime.profile.v1.ProfileService/DeleteProfile", key=new_key, ca=ca, data=lookup
    )  # denied
    grpcurl(
        render,
        "sendtime.render.v1.RenderService/Render",
        key=key,
        ca=ca,
        data={
            "customer": lookup["identifier"],
            "template": {"subject": "Hi {{ profile.traits.first_name }}"},
        },
    )
    grpcurl_json(profile, "sendtime.profile.v1.ProfileService/ExportProfile", key=key, ca=ca, data=lookup)
    run_dir = Path(running_suite["SENDTIME_RUN_DIR"])
    profile_log, erased = run_dir / "logs" / "profile.log", "erased events from the event log"
    erasures_before = profile_log.read_text(errors="replace").count(erased)
    grpcurl_json(profile, "sendtime.profile.v1.ProfileService/DeleteProfile", key=key, ca=ca, data=lookup)
    grpcurl(profile, "sendtime.profile.v1.ProfileService/GetProfile", key=key, ca=ca, data=lookup)
    # The erasure notice and the log erasure go out, and their logs are written: until the profile
    # service says it erased the person's events from the event log, its last step, which follows
    # the notice's (a fixed wait also passed while it was merely slow).
    deadline = time.monotonic() + 15
    while profile_log.read_text(errors="replace").count(erased) == erasures_before:
        assert time.monotonic() < deadline, "the profile service did not erase the events from the log"
        time.sleep(0.1)

    secrets = [p.read_text().strip() for p in (run_dir / "secrets").iterdir()]
    logs = {path: path.read_text(errors="replace") for path in run_dir.rglob("*.log")}
    assert {path.name for path in logs} >= {"ingest.log", "profile.log", "render.log", "nats.log"}
    forbidden = [key, new_key, email, email.lower(), user_id, f"Private{marker}", *secrets]
    for path, text in logs.items():
        for value in forbidden:
            assert value not in text, f"{path.name} holds a secret or personal value ({value[:12]}...)"


def fresh_checkout(suite_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The suite's environment as another checkout sees it: ports and a run directory of its
    own (so its own NATS, certificates and keys), the same database."""
    env = {**suite_env, "SENDTIME_RUN_DIR": str(tmp_path / "run")}
    for variable in PORT_VARIABLES:
        env[variable] = f"127.0.0.1:{devstack.free_port()}"
    return env


def test_demo_command_runs_the_whole_path_and_exits_zero(suite_env: dict[str, str], tmp_path: Path) -> None:
    env = fresh_checkout(suite_env, tmp_path)
    result = subprocess.run(
        [sys.executable, str(repo_root() / "scripts" / "suite.py"), "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Subject: Ada, your Trail runner is waiting" in result.stdout
    assert "<li>1 × Trail runner: €89.90</li>" in result.stdout
    assert "triggers exited 0, render exited 0, ingest exited 0, profile exited 0" in result.stdout


def test_run_serves_until_ctrl_c_then_stops_everything_it_started(
    suite_env: dict[str, str], tmp_path: Path
) -> None:
    env = fresh_checkout(suite_env, tmp_path)
    redis_port = devstack.free_port()
    env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"  # nothing there: `run` starts a Redis
    process = subprocess.Popen(
        [sys.executable, str(repo_root() / "scripts" / "suite.py"), "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("serving; Ctrl-C"):
                break
        assert devstack.tcp_reachable("127.0.0.1", redis_port), "".join(lines)
        key = (Path(env["SENDTIME_RUN_DIR"]) / "secrets" / "admin.key").read_text().strip()
        ca = str(Path(env["SENDTIME_RUN_DIR"]) / "tls" / "ca.crt")
        grpcurl_json(target(env, "RENDER_ADDRESS"), "grpc.health.v1.Health/Check", key=key, ca=ca)

        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, "".join(lines) + rest
    assert "triggers exited 0, render exited 0, ingest exited 0, profile exited 0" in rest
    assert "stopped: redis, nats" in rest  # its own NATS (a user per service) and the Redis it started
    assert not devstack.tcp_reachable("127.0.0.1", redis_port)
    for variable in DEFAULT_PORTS.values():
        assert not devstack.tcp_reachable("127.0.0.1", int(env[variable].rpartition(":")[2]))
