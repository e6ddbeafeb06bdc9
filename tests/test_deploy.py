"""The deployment files agree with the code: the manifests set only settings the services read,
run modules that exist, expose and probe the ports the services listen on, and give a
shutdown time longer than the services' own grace; the Dockerfile copies what exists.
(No Docker engine runs here, so the image itself is not built.)"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

import nats_auth
from ingest.settings import Settings as IngestSettings
from profile_service.settings import Settings as ProfileSettings
from render.settings import Settings as RenderSettings
from sendtime_common.http_routes import routes_of
from sendtime_common.shutdown import STOP_MARGIN_S
from triggers.settings import Settings as TriggersSettings

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
SERVICES = {
    "ingest": ("ingest", IngestSettings().address, IngestSettings().health_address),
    "profile": ("profile_service", ProfileSettings().address, ProfileSettings().health_address),
    "render": ("render", RenderSettings().address, RenderSettings().health_address),
    "triggers": ("triggers", TriggersSettings().address, TriggersSettings().health_address),
}
# Read by the OpenTelemetry SDK and exporter themselves.
STANDARD_VARIABLES = {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"}


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((KUBERNETES / name).read_text()) if d]


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


def test_the_config_map_and_secret_name_only_settings_the_services_read() -> None:
    known = variables_the_code_reads() | STANDARD_VARIABLES
    (config,) = documents("config.yaml")
    secret_keys = re.findall(r"--from-literal=([A-Z_]+)=", (KUBERNETES / "config.yaml").read_text())
    assert secret_keys and set(config["data"]) | set(secret_keys) <= known
    assert "DATABASE_URL" in secret_keys  # with a password: not in the ConfigMap


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_each_deployment_runs_its_service_on_its_port_with_health_probes(name: str) -> None:
    module, default_address, health_address = SERVICES[name]
    port = int(default_address.rpartition(":")[2])
    health_port = int(health_address.rpartition(":")[2])
    deployment, service, budget = documents(f"{name}.yaml")
    assert (deployment["kind"], service["kind"], budget["kind"]) == (
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    )

    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", module]
    assert (ROOT / "services" / module / "__main__.py").is_file()
    assert {"name": "grpc", "containerPort": port} in container["ports"]
    assert {"name": "health", "containerPort": health_port} in container["ports"]
    # kubelet's probes speak no TLS: they call the plaintext health-only port.
    probe = {"port": health_port}
    assert container["readinessProbe"]["grpc"] == probe == container["livenessProbe"]["grpc"]
    # TLS everywhere else, from the Secret cert-manager keeps for this service.
    env = {variable["name"]: variable.get("value") for variable in container["env"]}
    (mount,) = container["volumeMounts"]
    assert (
        env["TLS_CERT_FILE"] == f"{mount['mountPath']}/tls.crt"
        and env["TLS_KEY_FILE"] == f"{mount['mountPath']}/tls.key"
    )
    (volume,) = pod["volumes"]
    assert volume["name"] == mount["name"] and volume["secret"]["secretName"] == f"{name}-tls"
    assert f"{name}-tls" in {
        c["spec"]["secretName"] for c in documents("certificates.yaml") if c["kind"] == "Certificate"
    }
    assert "ALLOW_PLAINTEXT" not in env
    # Its own least-privilege NATS user; only profile makes the streams.
    assert env["NATS_USER"] == nats_auth.user_name(name)
    assert env["NATS_MANAGE_STREAMS"] == ("true" if name == "profile" else "false")
    # While Redis does not answer, the replicas share each rate limit out among them.
    assert env["RATE_LIMIT_REPLICAS"] == str(deployment["spec"]["replicas"])
    for variable in container["env"]:
        assert variable["name"] in variables_the_code_reads()
        if variable["name"].endswith("_ADDRESS") and "WEBHOOK" not in variable["name"]:
            assert variable["value"].endswith(f":{port}")

    (config,) = documents("config.yaml")
    # A stop ends within the grace plus STOP_MARGIN_S (sendtime_common.shutdown), with a few
    # seconds left for the process to exit before the kubelet kills it.
    grace_s = float(config["data"]["SHUTDOWN_GRACE_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] >= grace_s + STOP_MARGIN_S + 3
    labels = deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"] == labels == budget["spec"]["selector"]["matchLabels"]
    port_names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names


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
    (ingress,) = documents("ingress.yaml")
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
        _, manifest, _ = documents(f"{service}.yaml")
        ports = {p["name"]: p for p in manifest["spec"]["ports"]}
        assert ports["http"]["appProtocol"] == "https"
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "HTTPS"
