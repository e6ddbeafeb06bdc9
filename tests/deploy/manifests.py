"""The deployment as Kubernetes would receive it: each overlay built by ``kubectl kustomize``
(kubectl 1.32's kustomize), once per test run."""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any, Protocol

import yaml

from ingest.settings import Settings as IngestSettings
from profile_service.settings import Settings as ProfileSettings
from render.settings import Settings as RenderSettings
from sync.settings import Settings as SyncSettings
from triggers.settings import Settings as TriggersSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("dev", "prod")
NAMESPACE = "sendtime"
SERVICES = ("ingest", "profile", "render", "triggers", "sync")


class ServiceSettings(Protocol):
    """What a service's settings say about its listeners."""

    @property
    def address(self) -> str: ...
    @property
    def http_address(self) -> str: ...
    @property
    def health_address(self) -> str: ...
    @property
    def metrics_address(self) -> str: ...


# Each service's settings as it runs with none given: the ports the manifests must use.
DEFAULT_SETTINGS: dict[str, ServiceSettings] = {
    "ingest": IngestSettings(),
    "profile": ProfileSettings(),
    "render": RenderSettings(),
    "triggers": TriggersSettings(),
    "sync": SyncSettings(),
}
WORKLOAD_KINDS = ("Deployment", "Job")


def kubectl() -> str:
    """Raises: RuntimeError: kubectl is not installed (what to install is in the message)."""
    found = shutil.which("kubectl")
    if found is None:
        raise RuntimeError(
            "kubectl not found on PATH: the deploy tests build the overlays with `kubectl kustomize`; "
            "install kubectl 1.32 (e.g. the Kubernetes apt repository's kubectl package)"
        )
    return found


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize`` builds from ``directory``.

    Raises:
        AssertionError: the build failed (kustomize's message included).
    """
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed: {result.stderr}"
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@functools.cache
def _built(overlay: str) -> tuple[dict[str, Any], ...]:
    return tuple(kustomize(DEPLOY / "overlays" / overlay))


def built(overlay: str) -> list[dict[str, Any]]:
    return list(_built(overlay))


def of_kind(overlay: str, kind: str) -> list[dict[str, Any]]:
    return [d for d in built(overlay) if d["kind"] == kind]


def named(overlay: str, kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in of_kind(overlay, kind) if d["metadata"]["name"] == name]
    return found


def pod_template(workload: dict[str, Any]) -> dict[str, Any]:
    template: dict[str, Any] = workload["spec"]["template"]
    return template


def workloads(overlay: str) -> list[dict[str, Any]]:
    return [d for d in built(overlay) if d["kind"] in WORKLOAD_KINDS]


def container_env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in container.get("env", [])}


def effective_env(overlay: str, container: dict[str, Any]) -> dict[str, str | None]:
    """What the container's environment holds: its ConfigMaps' data, then its own ``env``
    (None for a value from a Secret)."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(named(overlay, "ConfigMap", source["configMapRef"]["name"])["data"])
    for name, variable in container_env(container).items():
        env[name] = variable.get("value")
    return env
