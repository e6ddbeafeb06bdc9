"""The deployment agrees with the code, in every overlay as ``kubectl kustomize`` builds it: the
manifests set only settings the services read, run modules that exist, expose the ports the
services listen on, reach profile, render and ingest on every replica through names their
certificates cover, with keys made with only the scope each call needs, give a shutdown time
longer than the services' own grace, and leave the streams to the setup Job; the Dockerfile
copies what exists. (No Docker engine runs here, so the image itself is
not built. tests/deploy/ holds the schema and policy checks.)"""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest

import nats_auth
from ingest.settings import Settings as IngestSettings
from sendtime.sync.v1 import sync_pb2
from sendtime_common.auth.api_keys import Scope
from sendtime_common.http_routes import routes_of
from sendtime_common.shutdown import STOP_MARGIN_S
from tests.deploy.manifests import (
    DEFAULT_SETTINGS,
    DEPLOY,
    NAMESPACE,
    OVERLAYS,
    ROOT,
    ServiceSettings,
    container_env,
    effective_env,
    named,
    of_kind,
    pod_template,
    workloads,
)

MODULES = {
    "ingest": "ingest",
    "profile": "profile_service",
    "render": "render",
    "triggers": "triggers",
    "sync": "sync",
}
SERVICES: dict[str, tuple[str, ServiceSettings]] = {
    name: (module, DEFAULT_SETTINGS[name]) for name, module in MODULES.items()
}
# Read by the OpenTelemetry SDK and exporter themselves.
STANDARD_VARIABLES = {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"}
# What `sendtime setup` reads besides the NATS_* settings.
SETUP_VARIABLES = {"DATABASE_URL"}
# The scope a caller's key for each service needs (the *_SERVICE_API_KEY it calls with).
CALLEE_SCOPES = {
    "PROFILE_SERVICE": Scope.PROFILES_READ,
    "RENDER_SERVICE": Scope.RENDER,
    "INGEST_SERVICE": Scope.EVENTS_WRITE,
}
DIGEST = re.compile(r"^[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)+@sha256:[0-9a-f]{64}$")


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def variables_the_code_reads() -> set[str]:
    sources = [*ROOT.glob("services/*/*.py"), *ROOT.glob("libs/sendtime_common/**/*.py")]
    found = set()
    for path in sources:
        text = path.read_text()
        found |= set(re.findall(r'env\w*\(\s*env,\s*"([A-Z0-9_]+)"', text))
        found |= set(re.findall(r'env\.get\(\s*"([A-Z0-9_]+)"', text))
        for prefix in re.findall(r'ClientTls\.from_env\(env, "([A-Z_]+)"\)', text):  # a client's TLS files
            found |= {f"{prefix}_{suffix}" for suffix in ("CA_FILE", "CERT_FILE", "KEY_FILE", "PLAINTEXT")}
    return found


def deployment(overlay: str, name: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The service's Deployment, its pod spec and its one container."""
    found = named(overlay, "Deployment", name)
    pod = pod_template(found)["spec"]
    (container,) = pod["containers"]
    return found, pod, container


def test_the_config_map_and_secrets_name_only_settings_the_services_read() -> None:
    known = variables_the_code_reads() | STANDARD_VARIABLES
    config = named("prod", "ConfigMap", "sendtime-config")
    # The Secrets an operator makes (base/config.yaml says how) and the dev overlay generates.
    secret_keys = set(re.findall(r"--from-literal=([A-Z_]+)=", (DEPLOY / "base" / "config.yaml").read_text()))
    dev_secret = next(
        s for s in of_kind("dev", "Secret") if s["metadata"]["name"].startswith("sendtime-secrets")
    )
    assert "DATABASE_URL" in secret_keys & set(dev_secret["data"])  # with a password: not in the ConfigMap
    assert set(config["data"]) | secret_keys | set(dev_secret["data"]) <= known


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("name", sorted(SERVICES))
def test_each_deployment_runs_its_service_on_its_ports_with_its_own_credentials(
    overlay: str, name: str
) -> None:
    module, settings = SERVICES[name]
    found, pod, container = deployment(overlay, name)
    assert container["command"] == ["python", "-m", module]
    assert (ROOT / "services" / module / "__main__.py").is_file()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    expected = {
        "grpc": port_of(settings.address),
        "http": port_of(settings.http_address),
        "health": port_of(settings.health_address),
        "metrics": port_of(settings.metrics_address),
    }
    if name == "ingest":
        expected["webhooks"] = port_of(IngestSettings().webhooks.address)
    assert ports == expected
    # TLS everywhere else, from the Secret cert-manager keeps for this service.
    env = effective_env(overlay, container)
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "tls"]
    assert env["TLS_CERT_FILE"] == f"{mount['mountPath']}/tls.crt"
    assert env["TLS_KEY_FILE"] == f"{mount['mountPath']}/tls.key"
    (volume,) = [v for v in pod["volumes"] if v["name"] == "tls"]
    assert volume["secret"]["secretName"] == f"{name}-tls"
    assert f"{name}-tls" in {c["spec"]["secretName"] for c in of_kind(overlay, "Certificate")}
    assert "ALLOW_PLAINTEXT" not in env
    # Its own least-privilege NATS user; the setup Job, not the services, makes the streams.
    assert env["NATS_USER"] == nats_auth.user_name(name)
    assert env["NATS_MANAGE_STREAMS"] == "false"
    # While Redis does not answer, the replicas share each rate limit out among them: as many
    # as there can be (an autoscaler's maximum), so that together they stay within the rate.
    autoscalers = [
        h for h in of_kind(overlay, "HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == name
    ]
    replicas = autoscalers[0]["spec"]["maxReplicas"] if autoscalers else found["spec"]["replicas"]
    assert env["RATE_LIMIT_REPLICAS"] == str(replicas)
    assert replicas == 1 if overlay == "dev" else replicas >= 2
    for variable in container_env(container):
        assert variable in variables_the_code_reads() | STANDARD_VARIABLES, variable
        if variable.endswith("_ADDRESS") and "WEBHOOK" not in variable:
            assert env[variable] == f"[::]:{ports['grpc']}"
    # A stop ends within the grace plus STOP_MARGIN_S (sendtime_common.shutdown), with a few
    # seconds left for the process to exit before the kubelet kills it.
    grace_s = float(env["SHUTDOWN_GRACE_SECONDS"] or 0)
    assert pod["terminationGracePeriodSeconds"] >= grace_s + STOP_MARGIN_S + 3

    labels = found["spec"]["selector"]["matchLabels"]
    assert labels == {"app.kubernetes.io/name": name}
    assert labels.items() <= pod_template(found)["metadata"]["labels"].items()
    for spread in pod["topologySpreadConstraints"]:  # counts this service's own pods
        assert spread["labelSelector"]["matchLabels"] == labels
    assert pod["serviceAccountName"] == named(overlay, "ServiceAccount", name)["metadata"]["name"]
    (budget,) = [
        b for b in of_kind(overlay, "PodDisruptionBudget") if b["spec"]["selector"]["matchLabels"] == labels
    ]
    assert budget["spec"]["maxUnavailable"] == 1
    service = named(overlay, "Service", name)
    # What Prometheus and the dashboards select a Service by (deploy/components/prometheus).
    assert service["metadata"]["labels"] == {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/part-of": "sendtime",
    }
    assert service["spec"]["selector"] == labels
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert {n: p["port"] for n, p in service_ports.items()} == {n: ports[n] for n in service_ports}
    assert {p["targetPort"] for p in service_ports.values()} == set(service_ports) <= set(ports)
    assert "metrics" in service_ports and "health" not in service_ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_callers_reach_every_replica_of_the_services_they_call_under_a_name_their_certificates_cover(
    overlay: str,
) -> None:
    for callee, variable, callers, mutual in [
        ("profile", "PROFILE_SERVICE_TARGET", ("render", "triggers", "sync"), True),
        ("render", "RENDER_SERVICE_TARGET", ("triggers",), True),
        # Ingest's gRPC port also serves stores, which hold keys, not certificates: TLS and
        # sync's key (events.write), no client certificate.
        ("ingest", "INGEST_SERVICE_TARGET", ("sync",), False),
    ]:
        _, settings = SERVICES[callee]
        headless = named(overlay, "Service", f"{callee}-headless")
        assert headless["spec"]["clusterIP"] == "None"  # one DNS record per ready replica
        assert headless["spec"]["selector"] == named(overlay, "Service", callee)["spec"]["selector"]
        (port,) = headless["spec"]["ports"]
        assert (port["name"], port["port"]) == ("grpc", port_of(settings.address))
        certificate = next(
            c for c in of_kind(overlay, "Certificate") if c["spec"]["secretName"] == f"{callee}-tls"
        )
        names = set(certificate["spec"]["dnsNames"])
        for caller in callers:
            _, _, container = deployment(overlay, caller)
            target = effective_env(overlay, container)[variable]
            # gRPC's DNS resolver: every address, balanced by the round_robin policy.
            assert target == f"dns:///{callee}-headless:{port['port']}"
            host = target.removeprefix("dns:///").rpartition(":")[0]
            assert {host, f"{host}.{NAMESPACE}.svc", f"{callee}.{NAMESPACE}.svc"} <= names
            caller_env = effective_env(overlay, container)
            prefix = variable.removesuffix("_TARGET")
            assert caller_env[f"{prefix}_CA_FILE"] == "/etc/sendtime/tls/ca.crt"
            if not mutual:
                continue
            # Mutual TLS: the caller's certificate is also a client certificate, and the callee
            # maps its identity.
            mine = next(
                c for c in of_kind(overlay, "Certificate") if c["spec"]["secretName"] == f"{caller}-tls"
            )
            assert "client auth" in mine["spec"]["usages"]
            assert caller_env[f"{prefix}_CERT_FILE"] == caller_env["TLS_CERT_FILE"]
            assert caller_env[f"{prefix}_KEY_FILE"] == caller_env["TLS_KEY_FILE"]
            (identity,) = mine["spec"]["uris"]
            _, _, callee_container = deployment(overlay, callee)
            callee_env = effective_env(overlay, callee_container)
            assert identity in (callee_env["AUTH_MTLS_IDENTITIES"] or "")
            assert callee_env["TLS_CLIENT_CA_FILE"] == "/etc/sendtime/tls/ca.crt"  # the cluster CA


def keys_base_config_makes() -> dict[tuple[str, str], Scope]:
    """The API keys base/config.yaml has an operator make: (Secret, key in it): the key's scope."""
    comments = (DEPLOY / "base" / "config.yaml").read_text().splitlines()
    text = " ".join(line.lstrip("# ") for line in comments if line.startswith("#"))
    made: dict[tuple[str, str], Scope] = {}
    secret = ""
    for match in re.finditer(
        r"create secret generic (\S+)"
        r'|--from-literal=([\w-]+)="\$\(\s*sendtime keys create --name \S+ --scope (\S+) --quiet\)"',
        text,
    ):
        if match.group(1):
            secret = match.group(1)
        else:
            made[(secret, match.group(2))] = Scope.parse(match.group(3))
    return made


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_caller_calls_with_a_key_of_its_own_made_with_only_the_scope_the_call_needs(
    overlay: str,
) -> None:
    made = keys_base_config_makes()
    calls: dict[tuple[str, str], tuple[str, str]] = {}
    for workload in workloads(overlay):
        for container in pod_template(workload)["spec"]["containers"]:
            for variable, entry in container_env(container).items():
                callee = variable.removesuffix("_API_KEY")
                if callee not in CALLEE_SCOPES:
                    continue
                secret = entry["valueFrom"]["secretKeyRef"]
                key = (secret["name"], secret["key"])
                assert made[key] == CALLEE_SCOPES[callee], (workload["metadata"]["name"], variable)
                calls[(workload["metadata"]["name"], callee)] = key
    assert len(set(calls.values())) == len(calls), calls  # no key serves two calls
    assert set(calls) == {
        ("render", "PROFILE_SERVICE"),
        ("triggers", "PROFILE_SERVICE"),
        ("triggers", "RENDER_SERVICE"),
        ("sync", "INGEST_SERVICE"),
        ("sync", "PROFILE_SERVICE"),
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_setup_job_runs_sendtime_setup_as_a_nats_user_that_may_make_the_streams(overlay: str) -> None:
    job = named(overlay, "Job", "sendtime-setup")
    (container,) = pod_template(job)["spec"]["containers"]
    assert container["command"] == ["python", "-m", "sendtime_cli", "setup"]
    assert (ROOT / "scripts" / "sendtime_cli" / "setup.py").is_file()
    env = effective_env(overlay, container)
    user = env["NATS_USER"]
    (service,) = [s for s in SERVICES if nats_auth.user_name(s) == user]
    allowed = nats_auth.permissions(service)["publish"]["allow"]
    names = nats_auth.NatsNames()
    for stream in (names.events_stream, names.erasure_stream, names.profile_change_stream):
        assert {f"$JS.API.STREAM.CREATE.{stream}", f"$JS.API.STREAM.UPDATE.{stream}"} <= set(allowed)
    assert container_env(container)["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] == "DATABASE_URL"
    assert set(container_env(container)) <= {"NATS_USER", "NATS_PASSWORD"} | SETUP_VARIABLES
    # Every service waits for the streams rather than writing them.
    for workload in workloads(overlay):
        for other in pod_template(workload)["spec"]["containers"]:
            assert effective_env(overlay, other).get("NATS_MANAGE_STREAMS") in (None, "false")


def test_prometheus_scrapes_each_service_once() -> None:
    overlay = "prod"
    (monitor,) = of_kind(overlay, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["endpoints"]
    scraped = [
        s["metadata"]["name"]
        for s in of_kind(overlay, "Service")
        if selector.items() <= s["metadata"].get("labels", {}).items()
        and endpoint["port"] in {p["name"] for p in s["spec"]["ports"]}
    ]
    # The headless Services select the same pods: a metrics port there would count them twice.
    assert sorted(scraped) == sorted(SERVICES)
    # The metrics ports answer only a key with the scope metrics.read: the one base/config.yaml
    # has an operator make, in the Secret the scrape reads.
    authorization = endpoint["authorization"]
    assert authorization["type"] == "Bearer"
    secret = authorization["credentials"]["name"]
    made = re.search(
        rf"create secret generic {secret} --from-literal={authorization['credentials']['key']}=.*\n.*"
        r"--scope (\S+) --quiet",
        (DEPLOY / "base" / "config.yaml").read_text(),
    )
    assert made is not None and Scope.parse(made.group(1)) == Scope.METRICS_READ


def test_prod_runs_images_pinned_by_digest_and_dev_the_local_build() -> None:
    prod_images = {c["image"] for w in workloads("prod") for c in pod_template(w)["spec"]["containers"]}
    assert prod_images and all(DIGEST.match(image) for image in prod_images), prod_images
    dev_images = {
        c["image"]
        for w in workloads("dev")
        if w["metadata"]["labels"].get("app.kubernetes.io/part-of") == "sendtime"
        for c in pod_template(w)["spec"]["containers"]
    }
    assert dev_images == {"sendtime:dev"}


def test_dev_points_the_services_at_its_own_postgresql_redis_and_nats() -> None:
    services = {
        s["metadata"]["name"]: {p["port"] for p in s["spec"]["ports"]} for s in of_kind("dev", "Service")
    }
    config = named("dev", "ConfigMap", "sendtime-config")["data"]
    for url in (config["NATS_URL"], config["REDIS_URL"]):
        host, _, port = url.split("://")[1].split("/")[0].partition(":")
        assert int(port) in services[host], url
    assert config["NATS_REPLICAS"] == "1"  # one NATS server
    # Generated Secrets' names end in a hash of their content.
    secrets = {s["metadata"]["name"].rsplit("-", 1)[0]: s for s in of_kind("dev", "Secret")}
    for secret in ("sendtime-secrets", "sendtime-setup"):
        url = base64.b64decode(secrets[secret]["data"]["DATABASE_URL"]).decode()
        host, _, port = url.rpartition("@")[2].split("/")[0].partition(":")
        assert int(port) in services[host], url


def test_the_dockerfile_copies_what_exists_and_sets_the_source_path() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (\S+) ", dockerfile, flags=re.MULTILINE):
        assert (ROOT / source).exists(), source
    path = re.search(r"PYTHONPATH=(\S+)", dockerfile)
    assert path is not None
    assert path.group(1).split(":") == ["/app/gen/python", "/app/libs", "/app/services", "/app/scripts"]


def ingress_backend(paths: list[dict[str, Any]], path: str) -> tuple[str, str] | None:
    """The (service, port name) Kubernetes sends ``path`` to: the longest matching rule path,
    Exact before Prefix at the same length; Prefix matches whole path elements."""

    def matches(rule: dict[str, Any]) -> bool:
        if rule["pathType"] == "Exact":
            return bool(path == rule["path"])
        prefix: list[str] = rule["path"].rstrip("/").split("/")
        return path.split("/")[: len(prefix)] == prefix

    found = [r for r in paths if matches(r)]
    if not found:
        return None
    best = max(found, key=lambda r: (len(r["path"]), r["pathType"] == "Exact"))
    service = best["backend"]["service"]
    return service["name"], service["port"]["name"]


def test_the_ingress_sends_every_route_of_the_contracts_to_the_service_that_serves_it() -> None:
    ingress = named("prod", "Ingress", "sendtime")
    (rule,) = ingress["spec"]["rules"]
    paths = rule["http"]["paths"]
    hosting = {
        "ingest": ["sendtime.ingest.v1.IngestService"],
        "profile": ["sendtime.profile.v1.ProfileService"],
        "render": ["sendtime.render.v1.RenderService", "sendtime.render.v1.TemplateService"],
        "triggers": [
            "sendtime.triggers.v1.TriggerService",
            "sendtime.triggers.v1.DestinationService",
            "sendtime.triggers.v1.DeliveryService",
        ],
        "sync": [sync_pb2.DESCRIPTOR.services_by_name["SyncService"].full_name],
    }
    routed = 0
    for service, names in hosting.items():
        for route in routes_of(names):
            sample = re.sub(r"\{[^}]+\}", "id-1", route.openapi_path)
            assert ingress_backend(paths, sample) == (service, "http"), (route.template, sample)
            routed += 1
    assert routed >= 12 + 17  # the triggers contracts' 17 routes too
    for provider in ("shopify", "sendgrid"):
        assert ingress_backend(paths, f"/webhooks/{provider}") == ("ingest", "webhooks")
    for call in ("track", "identify", "page", "screen", "alias", "group", "batch"):
        assert ingress_backend(paths, f"/v1/{call}") == ("ingest", "http")
    assert ingress_backend(paths, "/openapi.json") is not None
    assert ingress_backend(paths, "/healthz") is None  # probes stay inside the cluster
    # Each backend port exists on its Service and serves HTTPS, as the annotation says.
    for service in hosting:
        manifest = named("prod", "Service", service)
        ports = {p["name"]: p for p in manifest["spec"]["ports"]}
        assert ports["http"]["appProtocol"] == "https"
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "HTTPS"
