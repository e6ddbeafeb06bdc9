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

from ingest.settings import Settings as IngestSettings
from profile_service.settings import Settings as ProfileSettings
from render.settings import Settings as RenderSettings

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
SERVICES = {
    "ingest": ("ingest", IngestSettings().address),
    "profile": ("profile_service", ProfileSettings().address),
    "render": ("render", RenderSettings().address),
}
# Read by the OpenTelemetry SDK and exporter themselves.
STANDARD_VARIABLES = {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"}


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((KUBERNETES / name).read_text()) if d]


def variables_the_code_reads() -> set[str]:
    sources = [*ROOT.glob("services/*/*.py"), *ROOT.glob("libs/sendtime_common/*.py")]
    return {m for path in sources for m in re.findall(r'env\w*\(\s*env,\s*"([A-Z0-9_]+)"', path.read_text())}


def test_the_config_map_and_secret_name_only_settings_the_services_read() -> None:
    known = variables_the_code_reads() | STANDARD_VARIABLES
    (config,) = documents("config.yaml")
    secret_keys = re.findall(r"--from-literal=([A-Z_]+)=", (KUBERNETES / "config.yaml").read_text())
    assert secret_keys and set(config["data"]) | set(secret_keys) <= known
    assert "DATABASE_URL" in secret_keys  # with a password: not in the ConfigMap


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_each_deployment_runs_its_service_on_its_port_with_health_probes(name: str) -> None:
    module, default_address = SERVICES[name]
    port = int(default_address.rpartition(":")[2])
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
    assert container["readinessProbe"]["grpc"] == {"port": port} == container["livenessProbe"]["grpc"]
    for variable in container["env"]:
        assert variable["name"] in variables_the_code_reads()
        if variable["name"].endswith("_ADDRESS") and "WEBHOOK" not in variable["name"]:
            assert variable["value"].endswith(f":{port}")

    (config,) = documents("config.yaml")
    assert pod["terminationGracePeriodSeconds"] > float(config["data"]["SHUTDOWN_GRACE_SECONDS"])
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
