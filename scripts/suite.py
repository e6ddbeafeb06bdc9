"""Run the whole Sendtime suite locally: dependencies, the five services, a demo.

``python scripts/suite.py run``  (``make run``): make PostgreSQL, Redis and NATS reachable
(devstack), start profile, ingest, render and triggers, run the demo, print grpcurl commands to try, and
serve until Ctrl-C, which stops everything this command started.

``python scripts/suite.py demo`` (``make demo``): the same, then stop; exit 0 only when the demo
worked.

The services run as separate processes exactly as in production (``python -m <service>``), with
their logs in ``.run/logs/``. Their addresses come from the same environment variables the
services read (INGEST_ADDRESS, PROFILE_ADDRESS, RENDER_ADDRESS, TRIGGERS_ADDRESS; defaults ports
50051-50054).
"""

from __future__ import annotations

import os

# gRPC core's INFO lines (such as a GOAWAY from a service stopping under Ctrl-C) are not for a
# terminal; its errors still show. Set before grpc is imported; the services inherit it.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse
import asyncio
import json
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from google.protobuf import struct_pb2, timestamp_pb2
from google.type import money_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

import devstack
from local_credentials import LocalCredentials, ensure_local_credentials
from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime.render.v1 import render_pb2, render_pb2_grpc
from sendtime_common.auth.client import authenticated_channel
from sendtime_common.tls import ClientTls

ROOT = Path(__file__).resolve().parent.parent
PYTHONPATH = os.pathsep.join(str(ROOT / part) for part in ("gen/python", "libs", "services", "scripts"))
GRPCURL = Path(sys.executable).parent / "grpcurl"
FRESHNESS_GOAL_S = 1.0


class SuiteError(RuntimeError):
    """The suite could not start or the demo did not work; the message says what happened."""


@dataclass(frozen=True, slots=True)
class Service:
    name: str  # as in `python -m <module>`
    module: str
    variable_prefix: str  # PROFILE: PROFILE_ADDRESS, PROFILE_HEALTH_ADDRESS, PROFILE_HTTP_ADDRESS
    default_port: int
    default_health_port: int
    default_http_port: int
    default_metrics_port: int

    @property
    def address_variable(self) -> str:
        return f"{self.variable_prefix}_ADDRESS"

    @property
    def health_address_variable(self) -> str:
        return f"{self.variable_prefix}_HEALTH_ADDRESS"

    @property
    def http_address_variable(self) -> str:
        return f"{self.variable_prefix}_HTTP_ADDRESS"

    @property
    def metrics_address_variable(self) -> str:
        return f"{self.variable_prefix}_METRICS_ADDRESS"

    def port(self, env: Mapping[str, str]) -> int:
        address = env.get(self.address_variable) or f"[::]:{self.default_port}"
        return int(address.rpartition(":")[2])

    def target(self, env: Mapping[str, str]) -> str:
        return f"127.0.0.1:{self.port(env)}"

    def health_port(self, env: Mapping[str, str]) -> int:
        """The plaintext port that serves health only (what probes call)."""
        address = env.get(self.health_address_variable) or f"[::]:{self.default_health_port}"
        return int(address.rpartition(":")[2])

    def http_port(self, env: Mapping[str, str]) -> int:
        """The HTTP/JSON port (docs/http.md)."""
        address = env.get(self.http_address_variable) or f"[::]:{self.default_http_port}"
        return int(address.rpartition(":")[2])

    def metrics_port(self, env: Mapping[str, str]) -> int:
        """The plaintext port that serves Prometheus metrics (GET /metrics)."""
        address = env.get(self.metrics_address_variable) or f"[::]:{self.default_metrics_port}"
        return int(address.rpartition(":")[2])


SERVICES = (
    Service("profile", "profile_service", "PROFILE", 50052, 50062, 8082, 9462),
    Service("ingest", "ingest", "INGEST", 50051, 50061, 8080, 9461),
    Service("render", "render", "RENDER", 50053, 50063, 8083, 9463),
    Service("triggers", "triggers", "TRIGGERS", 50054, 50064, 8084, 9464),  # after the services it calls
    Service("sync", "sync", "SYNC", 50055, 50065, 8085, 9465),  # after ingest and profile, which it calls
)
PROFILE, INGEST, RENDER, TRIGGERS, SYNC = SERVICES


def _say(message: str = "") -> None:
    print(message, flush=True)


def service_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment the services run with: the caller's, plus the source tree on the path,
    render pointed at this suite's profile service, triggers at its profile and render, and sync
    at its ingest and profile."""
    merged = dict(env)
    merged["PYTHONPATH"] = os.pathsep.join(p for p in (PYTHONPATH, env.get("PYTHONPATH", "")) if p)
    merged.setdefault("PROFILE_SERVICE_TARGET", PROFILE.target(env))
    merged.setdefault("RENDER_SERVICE_TARGET", RENDER.target(env))
    merged.setdefault("INGEST_SERVICE_TARGET", INGEST.target(env))
    return merged


@dataclass
class RunningService:
    service: Service
    process: subprocess.Popen[bytes]
    log_path: Path


def start_services(
    env: Mapping[str, str],
    log_dir: Path,
    services: Sequence[Service] = SERVICES,
    credentials: LocalCredentials | None = None,
) -> list[RunningService]:
    """Start ``services`` (all five, by default) as processes, in order, and wait until each
    reports SERVING.

    Raises:
        SuiteError: a port is taken, or a service exited or did not become healthy (its log's
            last lines are in the message).
    """
    for service in services:
        for port, variable in [
            (service.port(env), service.address_variable),
            (service.health_port(env), service.health_address_variable),
            (service.http_port(env), service.http_address_variable),
            (service.metrics_port(env), service.metrics_address_variable),
        ]:
            if devstack.tcp_reachable("127.0.0.1", port):
                raise SuiteError(
                    f"port {port} ({service.name}) is already in use: is another suite running? "
                    f"Set {variable} to use another port."
                )
    log_dir.mkdir(parents=True, exist_ok=True)
    running: list[RunningService] = []
    try:
        for service in services:  # profile first: it applies the migrations and creates the stream
            log_path = log_dir / f"{service.name}.log"
            # Started and recorded before a Ctrl-C may land, so that the except below stops it.
            with devstack.deferred_interrupts(), open(log_path, "ab") as log:  # the child keeps a copy
                process = subprocess.Popen(
                    [sys.executable, "-m", service.module],
                    env=service_env({**env, **_credentials_env(credentials, service, env)}),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C reaches us only; we stop them in order
                )
                running.append(RunningService(service, process, log_path))
            wait_until_serving(running[-1], env, timeout_s=30)
            _say(
                f"{service.name + ':':<9}serving on {service.target(env)} (pid {process.pid},"
                f" log {log_path}); metrics http://127.0.0.1:{service.metrics_port(env)}/metrics"
            )
    except BaseException:
        with devstack.held_signals():
            stop_services(running)
        raise
    return running


def _credentials_env(
    credentials: LocalCredentials | None, service: Service, env: Mapping[str, str]
) -> dict[str, str]:
    """What ``credentials`` give ``service``; a hash key the caller set wins over the local one."""
    if credentials is None:
        return {}
    given = credentials.service_env(service.name)
    if env.get("IDENTIFIER_HASH_KEYS"):
        given.pop("IDENTIFIER_HASH_KEYS_FILE", None)
    return given


def wait_until_serving(running: RunningService, env: Mapping[str, str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{running.service.health_port(env)}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if running.process.poll() is not None:
                code = running.process.returncode
                raise SuiteError(f"{running.service.name} exited with {code}: {_tail(running.log_path)}")
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise SuiteError(f"{running.service.name} not serving after {timeout_s}s: {_tail(running.log_path)}")


def stop_services(running: Sequence[RunningService], grace_s: float = 15) -> dict[str, int | None]:
    """SIGTERM each service (in reverse start order: callers before what they call) and wait for
    it to drain; their exit codes."""
    codes: dict[str, int | None] = {}
    for item in reversed(running):
        if item.process.poll() is None:
            item.process.send_signal(signal.SIGTERM)
        try:
            codes[item.service.name] = item.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            item.process.kill()
            codes[item.service.name] = item.process.wait()
    return codes


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n    " + "\n    ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- the demo --------------------------------------------------------------------------------

DEMO_TEMPLATE = "templates/demo-abandoned-cart"
ABANDONED_CART_EMAIL = render_pb2.Template(
    subject="{{ profile.traits.first_name }}, your {{ profile.cart.items.first.name }} is waiting",
    html=(
        "<h1>Still thinking it over, {{ profile.traits.first_name }}?</h1>\n"
        "<ul>{% for item in profile.cart.items %}\n"
        "  <li>{{ item.quantity }} × {{ item.name }}: {{ item.unit_price | money }}</li>{% endfor %}\n"
        "</ul>\n<p>Total: {{ profile.cart.total | money }}. Use {{ vars.discount_code }} for 10% off.</p>"
    ),
    text=(
        "Hi {{ profile.traits.first_name }},\n"
        "{% for item in profile.cart.items %}- {{ item.quantity }} x {{ item.name }}\n{% endfor %}"
        "Total: {{ profile.cart.total | money }}. Code {{ vars.discount_code }} takes 10% off."
    ),
)


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    built = struct_pb2.Struct()
    built.update(values)
    return built


def _timestamp(at: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(at)
    return ts


def demo_events(user_id: str, email: str) -> list[ingest_pb2.Event]:
    now = datetime.now(UTC)
    customer = ingest_pb2.CustomerIdentifiers(user_id=user_id, email=email)
    price = money_pb2.Money(currency_code="EUR", units=89, nanos=900_000_000)

    def event(seconds_ago: float, **payload: object) -> ingest_pb2.Event:
        built = ingest_pb2.Event(
            event_id=f"demo-{uuid.uuid4().hex}",
            customer=customer,
            occurred_at=_timestamp(now - timedelta(seconds=seconds_ago)),
            source=ingest_pb2.EVENT_SOURCE_WEB,
        )
        for name, value in payload.items():
            getattr(built, name).CopyFrom(value)
        return built

    return [
        event(3, identify=ingest_pb2.Identify(traits=_struct({"first_name": "Ada"}))),
        event(2, product_viewed=ingest_pb2.ProductViewed(sku="TRAIL-42", name="Trail runner", price=price)),
        event(
            1,
            cart_item_added=ingest_pb2.CartItemAdded(
                sku="TRAIL-42", name="Trail runner", quantity=1, unit_price=price
            ),
        ),
    ]


async def run_demo(env: Mapping[str, str], key: str, tls: ClientTls) -> str:
    """Send a customer's events, watch the cart appear in the profile, render the abandoned-cart
    email, calling with ``key`` over ``tls``; the demo customer's user id.

    Raises:
        SuiteError: an event was not accepted, the cart did not show within a second, or the
            render fell back.
    """
    user_id = f"demo-{uuid.uuid4().hex[:8]}"
    identifier = profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_USER_ID, value=user_id)
    async with (
        authenticated_channel(INGEST.target(env), key, tls) as ingest_channel,
        authenticated_channel(PROFILE.target(env), key, tls) as profile_channel,
        authenticated_channel(RENDER.target(env), key, tls) as render_channel,
    ):
        ingest = ingest_pb2_grpc.IngestServiceStub(ingest_channel)
        profiles = profile_pb2_grpc.ProfileServiceStub(profile_channel)
        render = render_pb2_grpc.RenderServiceStub(render_channel)

        _say(f"\n1. {user_id} views a product and adds it to the cart (ingest.SendEvents)")
        sent = await ingest.SendEvents(
            ingest_pb2.SendEventsRequest(events=demo_events(user_id, f"{user_id}@example.com")), timeout=5
        )
        acked = time.monotonic()
        for result in sent.results:
            outcome = ingest_pb2.EventOutcome.Name(result.outcome)
            _say(f"   {result.event_id}: {outcome}")
            if result.outcome != ingest_pb2.EVENT_OUTCOME_ACCEPTED:
                raise SuiteError(f"event not accepted: {result.status.message}")

        _say("2. the profile shows the cart (profile.GetProfile)")
        profile = await _wait_for_cart(profiles, identifier, timeout_s=5)
        seen_after = time.monotonic() - acked
        item = profile.cart.items[0]
        _say(f"   visible {seen_after * 1000:.0f} ms after ingest acknowledged the events")
        _say(f"   cart: {item.quantity} × {item.name}, profile version {profile.version}")
        if seen_after > FRESHNESS_GOAL_S:
            raise SuiteError(f"the cart took {seen_after:.2f}s to show, more than {FRESHNESS_GOAL_S}s")

        _say("3. the abandoned-cart email, rendered at send time (render.Render)")
        rendered = await render.Render(
            render_pb2.RenderRequest(
                customer=identifier,
                template=ABANDONED_CART_EMAIL,
                variables=_struct({"discount_code": "COMEBACK10"}),
            ),
            timeout=1,
        )
        if rendered.fallback_used:
            reason = render_pb2.FallbackReason.Name(rendered.fallback_reason)
            raise SuiteError(f"render fell back ({reason}) instead of using the live profile")
        _say(f"   Subject: {rendered.subject}\n")
        _say("   " + rendered.text.replace("\n", "\n   ") + "\n")
        _say("   " + rendered.html.replace("\n", "\n   "))

        _say(f"\n4. the template stored as {DEMO_TEMPLATE}, for send-time fetches (render.TemplateService)")
        await _store_demo_template(render_pb2_grpc.TemplateServiceStub(render_channel))
    return user_id


async def _store_demo_template(templates: render_pb2_grpc.TemplateServiceAsyncStub) -> None:
    """The demo's email as a published stored template (a new version when it exists)."""
    content = render_pb2.Template()
    content.CopyFrom(ABANDONED_CART_EMAIL)
    content.max_data_age.FromSeconds(60)
    try:
        await templates.CreateTemplate(
            render_pb2.CreateTemplateRequest(
                template_id=DEMO_TEMPLATE.removeprefix("templates/"), content=content, publish=True
            ),
            timeout=5,
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise SuiteError(f"CreateTemplate failed: {exc.code().name} {exc.details()}") from None
        await templates.UpdateTemplate(
            render_pb2.UpdateTemplateRequest(name=DEMO_TEMPLATE, content=content, publish=True), timeout=5
        )


async def _wait_for_cart(
    stub: profile_pb2_grpc.ProfileServiceAsyncStub, identifier: profile_pb2.Identifier, timeout_s: float
) -> profile_pb2.Profile:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            response = await stub.GetProfile(profile_pb2.GetProfileRequest(identifier=identifier), timeout=1)
            if response.profile.cart.items and "first_name" in response.profile.traits:  # all three merged
                return response.profile
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise SuiteError(f"GetProfile failed: {exc.code().name} {exc.details()}") from None
        await asyncio.sleep(0.005)
    raise SuiteError(f"the events did not all show in the profile within {timeout_s}s")


def grpcurl_examples(env: Mapping[str, str], user_id: str, key: str, ca_file: Path) -> str:
    """Commands to paste, complete with the CA to trust and the key; they use reflection, so no
    proto files are needed."""
    grpcurl = os.path.relpath(GRPCURL) if GRPCURL.exists() else "grpcurl"
    ingest, profile, render = INGEST.target(env), PROFILE.target(env), RENDER.target(env)
    triggers = TRIGGERS.target(env)
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    customer = {"kind": "IDENTIFIER_KIND_USER_ID", "value": user_id}
    event = {
        "events": [
            {
                "event_id": "try-1",
                "customer": {"user_id": user_id},
                "occurred_at": now,
                "source": "EVENT_SOURCE_WEB",
                "identify": {"traits": {"first_name": "Grace"}},
            }
        ]
    }
    lookup = {"identifier": customer}
    render_request = {
        "customer": customer,
        "template": {
            "subject": "Hi {{ profile.traits.first_name }}",
            "fallback": {"profile": {"traits": {"first_name": "there"}}},
        },
    }

    # An adapter's subscription, and a cart reminder delivering to it (ids made per run).
    suffix = uuid.uuid4().hex[:6]
    destination = {"destination_id": f"try-adapter-{suffix}", "destination": {"subscription": {}}}
    trigger = {
        "trigger_id": f"try-cart-{suffix}",
        "trigger": {
            "entry": {"event_type": "cart_item_added"},
            "delay": {"after": "3600s"},
            "exits": [{"event": {"event_type": "order_completed"}}],
            "delivery": {"destinations": [f"destinations/try-adapter-{suffix}"], "template": DEMO_TEMPLATE},
        },
    }

    def data(body: object) -> str:
        return shlex.quote(json.dumps(body))

    commands = [
        f"{ingest} list",
        f"-d {data(lookup)} {profile} sendtime.profile.v1.ProfileService/GetProfile",
        f"-d {data(event)} {ingest} sendtime.ingest.v1.IngestService/SendEvents",
        f"-d {data(render_request)} {render} sendtime.render.v1.RenderService/Render",
        f"{render} grpc.health.v1.Health/Check",
        f"-d {data(destination)} {triggers} sendtime.triggers.v1.DestinationService/CreateDestination",
        f"-d {data(trigger)} {triggers} sendtime.triggers.v1.TriggerService/CreateTrigger",
        f"{triggers} sendtime.triggers.v1.TriggerService/ListTriggers",
    ]
    header = shlex.quote(f"authorization: Bearer {key}")
    trust = shlex.quote(os.path.relpath(ca_file))
    return "\n".join(f"  {grpcurl} -cacert {trust} -H {header} {command}" for command in commands)


def curl_examples(env: Mapping[str, str], user_id: str, key: str, ca_file: Path) -> str:
    """The send-time fetches an email platform makes, as curl commands to paste: the demo
    customer's profile and the stored template rendered for them; an event sent over HTTP, and
    a Segment-style track call."""
    ingest, profile, render = (f"https://localhost:{s.http_port(env)}" for s in (INGEST, PROFILE, RENDER))
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    event = {
        "events": [
            {
                "eventId": f"curl-{uuid.uuid4().hex[:8]}",
                "customer": {"userId": user_id},
                "occurredAt": now,
                "source": "EVENT_SOURCE_WEB",
                "identify": {"traits": {"plan": "pro"}},
            }
        ]
    }
    commands = [
        shlex.quote(f"{profile}/v1/profiles/user_id:{user_id}?readMask=traits,cart"),
        shlex.quote(f"{render}/v1/{DEMO_TEMPLATE}:render?profile=profiles/user_id:{user_id}"),
        f"-H 'Content-Type: application/json' -d {shlex.quote(json.dumps(event))} {ingest}/v1/events:send",
    ]
    header = shlex.quote(f"Authorization: Bearer {key}")
    trust = shlex.quote(os.path.relpath(ca_file))
    # Segment's HTTP Tracking API, as its libraries call it: the key as the write key (Basic).
    track = {
        "userId": user_id,
        "event": "Product Viewed",
        "properties": {"sku": "TRAIL-43", "name": "Trail runner GTX", "price": 119, "currency": "EUR"},
        "messageId": f"curl-{uuid.uuid4().hex[:8]}",
        "timestamp": now,
    }
    return "\n".join(
        [
            *(f"  curl -sS --cacert {trust} -H {header} {command}" for command in commands),
            f"  curl -sS --cacert {trust} -u {shlex.quote(key + ':')} -H 'Content-Type: application/json' "
            f"-d {shlex.quote(json.dumps(track))} {ingest}/v1/track",
        ]
    )


def metrics_example(env: Mapping[str, str], key_file: Path) -> str:
    """A scrape of the profile service's metrics port, as a curl command to paste."""
    header = f"Authorization: Bearer $(cat {shlex.quote(os.path.relpath(key_file))})"
    return f'  curl -sS -H "{header}" http://127.0.0.1:{PROFILE.metrics_port(env)}/metrics'


# --- the commands ------------------------------------------------------------------------------


@dataclass
class RunningSuite:
    services: list[RunningService]
    credentials: LocalCredentials


@contextmanager
def suite(env: Mapping[str, str]) -> Iterator[RunningSuite]:
    """Dependencies up, credentials made (or reused), services started; on exit, stop the
    services, then the dependencies this call started (not ones that were already running).
    That holds however it exits: a failed start, a failed demo, Ctrl-C (KeyboardInterrupt) at
    any point; devstack.up stops what it started when it fails itself.

    Raises:
        SuiteError: as start_services; or a service did not exit 0 on SIGTERM.
    """
    started_dependencies = devstack.up(env)
    try:
        credentials = ensure_local_credentials(env, devstack.run_dir(env))
        env = {**env, **devstack.nats_connection_env(env)}
        running = start_services(env, devstack.run_dir(env) / "logs", credentials=credentials)
        succeeded = False
        try:
            yield RunningSuite(running, credentials)
            succeeded = True
        finally:
            with devstack.held_signals():
                _say("\nstopping the services")
                codes = stop_services(running)
                _say("   " + ", ".join(f"{name} exited {code}" for name, code in codes.items()))
        unclean = [name for name, code in codes.items() if code != 0]
        if succeeded and unclean:
            raise SuiteError(
                f"{', '.join(unclean)} did not shut down cleanly: see {running[0].log_path.parent}"
            )
    finally:
        if started_dependencies:
            with devstack.held_signals():
                devstack.down(env, names=started_dependencies)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="suite.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["run", "demo"], help="run: serve until Ctrl-C; demo: exit after")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    stop_requested = False
    devstack.interrupt_on_termination()  # until serving: SIGTERM and SIGHUP stop it as Ctrl-C does

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    try:
        with suite(env) as running:
            key, ca_file = running.credentials.admin_key, running.credentials.tls.ca_file
            started = time.monotonic()
            user_id = asyncio.run(run_demo(env, key, ClientTls(ca_file=str(ca_file))))
            _say(f"\ndemo worked in {time.monotonic() - started:.2f}s, over TLS.")
            _say(f"The local CA: {os.path.relpath(ca_file)}")
            key_file = os.path.relpath(running.credentials.admin_key_file)
            _say(f"An API key with every scope (kept in {key_file}):")
            _say(f"  {key}")
            _say("Try it yourself with grpcurl:")
            _say(grpcurl_examples(env, user_id, key, ca_file))
            _say("Or over HTTPS, as an email platform fetches at send time (docs/http.md):")
            _say(curl_examples(env, user_id, key, ca_file))
            _say("Metrics (profile's), with the key a Prometheus scrapes with (metrics.read):")
            _say(metrics_example(env, running.credentials.prometheus_key_file))
            if args.command == "run":
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    signal.signal(sig, request_stop)
                _say("\nserving; Ctrl-C stops everything this command started")
                while not stop_requested:
                    time.sleep(0.2)
    except (SuiteError, RuntimeError, OSError, asyncpg.PostgresError) as exc:
        print(f"suite.py {args.command}: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C (or SIGTERM, SIGHUP) before serving began
        print(f"suite.py {args.command}: interrupted; what it started has been stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
