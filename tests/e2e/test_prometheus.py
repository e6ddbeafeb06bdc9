"""A real Prometheus (Debian's) scrapes the four service processes every second, with the rules
of deploy/components/prometheus/ loaded, while a short load runs through the suite: every
dashboard query returns data, and so does every vector selector of every rule and dashboard
query, and every alert's expression with its thresholds taken off. A misspelled metric or label
name fails here, where promtool's unit tests (which make up their own series) cannot tell. The
sync service runs two connectors against a local SendGrid for its metrics: one reads a new
suppression at every run, the other's key is refused."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import promql_parser
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

import devstack
import suite
from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime.render.v1 import render_pb2, render_pb2_grpc
from sendtime.triggers.v1 import triggers_pb2, triggers_pb2_grpc
from sendtime_common.auth.client import authenticated_channel
from sendtime_common.tls import ClientTls
from tests.conftest import SHARES_POSTGRES_ROLES
from tests.e2e import test_suite as e2e
from tests.monitoring import (
    RULES_FILE_NAME,
    Selector,
    dashboard_queries,
    rules,
    selectors,
    write_rules_for_promtool,
)
from tests.sync.sendgrid_server import SendGridServer
from tests.triggers.support import Receiver, statuses
from triggers.builtin import cart_abandoned

pytestmark = [pytest.mark.e2e, SHARES_POSTGRES_ROLES]  # `make run` sets up roles

# The same fixtures as the e2e suite's (this module gets its own suite: its own database, NATS
# and five processes).
suite_database = e2e.suite_database
e2e_suite_env = e2e.suite_env  # extended by suite_env below
running_suite = e2e.running_suite

JOBS = {
    "ingest": "INGEST_METRICS_ADDRESS",
    "profile": "PROFILE_METRICS_ADDRESS",
    "render": "RENDER_METRICS_ADDRESS",
    "triggers": "TRIGGERS_METRICS_ADDRESS",
    "sync": "SYNC_METRICS_ADDRESS",
}
# Matchers that select what a healthy suite under this load does not make (server errors,
# events it cannot take, webhook items no provider mapping takes): a selector with one of them
# may find no series, but must find some without them, and the label must exist on the metric.
ABSENT_UNDER_THE_LOAD = {
    ("grpc_code", "UNKNOWN|INTERNAL|UNAVAILABLE|DEADLINE_EXCEEDED|DATA_LOSS"),
    ("code", "5.."),
    ("outcome", "retry"),
    ("kind", "webhook_item"),
}
CHECK_FOR_S = 40.0


SENDGRID_KEY = "SG.e2e-key"


class FreshSuppressions(SendGridServer):
    """A SendGrid whose bounces gain an entry at every request, a little older than a pull's
    60 s lag: every run of a connector reads a new record and hands ingest a new event."""

    async def _list(self, request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/bounces"):
            self.add("bounces", f"bounce-{uuid.uuid4().hex[:12]}@example.com", int(time.time()) - 61)
        return await super()._list(request)


@pytest.fixture(scope="module")
def sendgrid() -> Iterator[SendGridServer]:
    """FreshSuppressions on a loop of its own, in a thread: it answers while the tests' own
    loops come and go, from before sync starts."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="sendgrid", daemon=True)
    thread.start()
    started = asyncio.run_coroutine_threadsafe(FreshSuppressions(api_key=SENDGRID_KEY).start(), loop)
    server = started.result(10)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture(scope="module")
def suite_env(
    e2e_suite_env: dict[str, str], sendgrid: SendGridServer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """The e2e suite's, with two sync connectors pulling bounces from ``sendgrid`` every 10 s:
    ``suppressions`` with its key, ``refused-key`` with one SendGrid answers 401 to (every run
    fails, tried again later and later)."""
    path = tmp_path_factory.mktemp("sync") / "connectors.json"
    pull = {"kind": "sendgrid_suppressions", "interval_s": 10, "base_url": sendgrid.url}
    path.write_text(
        json.dumps(
            {
                "connectors": [
                    {
                        **pull,
                        "id": "suppressions",
                        "auth": {"api_key_env": "E2E_SENDGRID_KEY"},
                        "options": {"lists": ["bounces"]},
                    },
                    {**pull, "id": "refused-key", "auth": {"api_key_env": "E2E_SENDGRID_REVOKED_KEY"}},
                ]
            }
        )
    )
    return {
        **e2e_suite_env,
        "SYNC_CONNECTORS_FILE": str(path),
        "E2E_SENDGRID_KEY": SENDGRID_KEY,
        "E2E_SENDGRID_REVOKED_KEY": "SG.revoked",
    }


@pytest.fixture(scope="module")
def prometheus(running_suite: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian's prometheus on a free loopback port, scraping each metrics port every second
    with the suite's metrics.read key under the job name the ServiceMonitor gives it,
    evaluating the rules every second; its URL."""
    binary = shutil.which("prometheus")
    assert binary is not None, "prometheus is not on PATH: `make test` installs Debian's prometheus package"
    directory = tmp_path_factory.mktemp("prometheus")
    write_rules_for_promtool(directory)
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [RULES_FILE_NAME],
        "scrape_configs": [
            {
                "job_name": job,
                "authorization": {
                    "type": "Bearer",
                    "credentials_file": running_suite["SENDTIME_METRICS_KEY_FILE"],
                },
                "static_configs": [{"targets": [e2e.target(running_suite, variable)]}],
            }
            for job, variable in JOBS.items()
        ],
    }
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{devstack.free_port()}"
    log = (directory / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address={address}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://{address}"
    try:
        deadline = time.monotonic() + 15
        while not _ready(url):
            assert process.poll() is None, (directory / "prometheus.log").read_text()
            assert time.monotonic() < deadline, "prometheus did not get ready in 15 s"
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=15)
        log.close()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def query(url: str, expr: str) -> list[dict[str, Any]]:
    """The instant query's samples.

    Raises:
        AssertionError: Prometheus refused the query (its error says why).
    """
    request = f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            body = json.load(answer)
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{expr}: {exc.read().decode()}") from None
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def exposed_labels(env: dict[str, str]) -> dict[str, set[str]]:
    """Each sample name the services expose, with its label names (empty values too, which
    Prometheus drops)."""
    labels: dict[str, set[str]] = defaultdict(set)
    key = Path(env["SENDTIME_METRICS_KEY_FILE"]).read_text().strip()
    for variable in JOBS.values():
        scrape = urllib.request.Request(
            f"http://{e2e.target(env, variable)}/metrics", headers={"Authorization": f"Bearer {key}"}
        )
        with urllib.request.urlopen(scrape, timeout=10) as answer:
            text = answer.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels[sample.name] |= set(sample.labels)
    return labels


def selector_problem(url: str, selector: Selector, exposed: dict[str, set[str]]) -> str | None:
    """Why ``selector`` finds nothing that it should, or None."""
    if query(url, selector.promql()):
        return None
    relaxed = tuple(m for m in selector.matchers if (m.label, m.value) not in ABSENT_UNDER_THE_LOAD)
    if relaxed == selector.matchers:
        return "no series"
    if not query(url, selector.promql(relaxed)):
        return f"no series even without {set(selector.matchers) - set(relaxed)}"
    missing = {m.label for m in selector.matchers if m not in relaxed} - exposed.get(selector.metric, set())
    return f"no label {missing} on {selector.metric}" if missing else None


_COMPARISONS = {"==", "!=", ">", "<", ">=", "<="}


def thresholds_off(expr: str) -> list[str]:
    """The sides of ``expr``'s comparisons against a number: what an alert compares with its
    threshold, each to be queried on its own."""
    sides: list[str] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.BinaryExpr) and str(node.op) in _COMPARISONS:
            for side, other in ((node.lhs, node.rhs), (node.rhs, node.lhs)):
                if _is_number(other) and not _is_number(side):
                    sides.append(str(side))
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return sides


def _is_number(node: Any) -> bool:
    """A number, or arithmetic of numbers (``14.4 * (1 - 0.999)``)."""
    if isinstance(node, promql_parser.NumberLiteral):
        return True
    if isinstance(node, promql_parser.ParenExpr):
        return _is_number(node.expr)
    if isinstance(node, promql_parser.BinaryExpr):
        return _is_number(node.lhs) and _is_number(node.rhs)
    return False


async def drive_load(env: dict[str, str]) -> None:
    """What the dashboards and rules read, made once each: events accepted, a duplicate and a
    rejected one (a dead letter); profiles read over gRPC and HTTP, found and missing; renders
    over gRPC and HTTP, live and falling back; a trigger firing to a receiver that takes the
    webhook and to one that answers 410 Gone (the destination is disabled)."""
    key, tls = env["SENDTIME_KEY"], ClientTls(ca_file=env["SENDTIME_CA_FILE"])
    suffix = uuid.uuid4().hex[:8]
    taking, gone = await Receiver().start(), await Receiver(answer=statuses(410)).start()
    try:
        async with (
            authenticated_channel(suite.TRIGGERS.target(env), key, tls) as triggers_channel,
            authenticated_channel(suite.RENDER.target(env), key, tls) as render_channel,
            authenticated_channel(suite.INGEST.target(env), key, tls) as ingest_channel,
            authenticated_channel(suite.PROFILE.target(env), key, tls) as profile_channel,
        ):
            destinations = triggers_pb2_grpc.DestinationServiceStub(triggers_channel)
            names = []
            for name, receiver in (("taking", taking), ("gone", gone)):
                made = await destinations.CreateDestination(
                    triggers_pb2.CreateDestinationRequest(
                        destination_id=f"{name}-{suffix}",
                        destination=triggers_pb2.Destination(
                            webhook=triggers_pb2.WebhookTarget(url=receiver.url)
                        ),
                    )
                )
                names.append(made.destination.name)
            template = f"monitoring-{suffix}"
            await render_pb2_grpc.TemplateServiceStub(render_channel).CreateTemplate(
                render_pb2.CreateTemplateRequest(
                    template_id=template, content=suite.ABANDONED_CART_EMAIL, publish=True
                )
            )
            trigger = cart_abandoned(names, f"templates/{template}", delay=timedelta(seconds=1))
            trigger.allowed_lateness.FromSeconds(0)
            await triggers_pb2_grpc.TriggerServiceStub(triggers_channel).CreateTrigger(
                triggers_pb2.CreateTriggerRequest(trigger_id=f"monitoring-{suffix}", trigger=trigger)
            )

            # Events merged, profiles read until they show, a live render (suite.py demo's path).
            user_id = await suite.run_demo(env, key, tls)
            ingest = ingest_pb2_grpc.IngestServiceStub(ingest_channel)
            again = suite.demo_events(user_id, f"{user_id}@example.com")[:1]
            invalid = ingest_pb2.Event(event_id=f"invalid-{suffix}", source=ingest_pb2.EVENT_SOURCE_WEB)
            sent = await ingest.SendEvents(ingest_pb2.SendEventsRequest(events=[*again, *again, invalid]))
            outcomes = {ingest_pb2.EventOutcome.Name(result.outcome) for result in sent.results}
            assert "EVENT_OUTCOME_REJECTED" in outcomes, sent

            profiles = profile_pb2_grpc.ProfileServiceStub(profile_channel)
            known = profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_USER_ID, value=user_id)
            for _ in range(3):  # the near cache answers the repeats
                await profiles.GetProfile(profile_pb2.GetProfileRequest(identifier=known))
            render = render_pb2_grpc.RenderServiceStub(render_channel)
            nobody = profile_pb2.Identifier(
                kind=profile_pb2.IDENTIFIER_KIND_USER_ID, value=f"nobody-{suffix}"
            )
            fallback = await render.Render(
                render_pb2.RenderRequest(customer=nobody, template=suite.ABANDONED_CART_EMAIL)
            )
            assert fallback.fallback_used, fallback
            with pytest.raises(grpc.aio.AioRpcError):
                await profiles.GetProfile(profile_pb2.GetProfileRequest(identifier=nobody))
            await _http_reads(env, key, template, user_id, suffix)

            deadline = time.monotonic() + 15
            while not (taking.requests and gone.requests) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert taking.requests and gone.requests, "the trigger did not fire to both destinations"
    finally:
        await taking.stop()
        await gone.stop()


async def _http_reads(env: dict[str, str], key: str, template: str, user_id: str, suffix: str) -> None:
    """The send-time fetches over HTTP: a profile found and one missing, a render."""
    trust = ssl.create_default_context(cafile=env["SENDTIME_CA_FILE"])
    profile, render = (
        f"https://localhost:{service.http_port(env)}" for service in (suite.PROFILE, suite.RENDER)
    )
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        for url, status in (
            (f"{profile}/v1/profiles/user_id:{user_id}", 200),
            (f"{profile}/v1/profiles/user_id:nobody-{suffix}", 404),
            (f"{render}/v1/templates/{template}:render?profile=profiles/user_id:{user_id}", 200),
        ):
            async with session.get(url, ssl=trust) as answer:
                assert answer.status == status, (url, await answer.text())


def test_every_dashboard_query_and_rule_finds_the_suites_metrics(
    running_suite: dict[str, str], prometheus: str
) -> None:
    asyncio.run(drive_load(running_suite))
    started = time.monotonic()  # after the load, however long a loaded machine took to drive it
    rule_exprs = [str(rule["expr"]) for rule in rules()]
    panel_exprs = [expr for _, _, expr in dashboard_queries()]
    alert_values = [side for rule in rules() if "alert" in rule for side in thresholds_off(str(rule["expr"]))]
    every_selector = {s for expr in [*rule_exprs, *panel_exprs] for s in selectors(expr)}
    assert len(alert_values) >= len([rule for rule in rules() if "alert" in rule])

    # Until Prometheus has scraped what the load made twice (a rate needs two samples) and the
    # rules have been evaluated over it: a second or two after the load.
    problems: dict[str, str] = {}
    while True:
        exposed = exposed_labels(running_suite)
        problems = {}
        for selector in every_selector:
            problem = selector_problem(prometheus, selector, exposed)
            if problem:
                problems[selector.promql()] = problem
        for expr in [*panel_exprs, *alert_values]:
            if not query(prometheus, expr):
                problems[expr] = "no data"
        if not problems or time.monotonic() - started > CHECK_FOR_S:
            break
        time.sleep(1)
    assert problems == {}


def test_a_misspelled_metric_or_label_finds_nothing(running_suite: dict[str, str], prometheus: str) -> None:
    """The check above can fail: a metric, a label, or a label value off by a letter."""
    exposed = exposed_labels(running_suite)
    deadline = time.monotonic() + CHECK_FOR_S
    while not query(prometheus, "grpc_server_handled_total") and time.monotonic() < deadline:
        time.sleep(0.5)
    (good,) = selectors('grpc_server_handled_total{grpc_service=~"sendtime\\\\..*"}')
    assert selector_problem(prometheus, good, exposed) is None
    for misspelled in (
        'grpc_server_handeld_total{grpc_service=~"sendtime\\\\..*"}',
        'grpc_server_handled_total{grpc_servce=~"sendtime\\\\..*"}',
        'grpc_server_handled_total{grpc_method="Rendr"}',
        'grpc_server_handled_total{grpc_cde=~"UNKNOWN|INTERNAL|UNAVAILABLE|DEADLINE_EXCEEDED|DATA_LOSS"}',
    ):
        (selector,) = selectors(misspelled)
        assert selector_problem(prometheus, selector, exposed) is not None, misspelled
    assert thresholds_off("max(sendtime_triggers_timers_overdue) > 0 and up == 1") == [
        "max(sendtime_triggers_timers_overdue{})",
        "up{}",
    ]
