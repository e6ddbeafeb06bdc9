"""The policy check over every overlay as built: Pod Security "restricted" (and a read-only root
filesystem) for every pod, the three gRPC probes on each service's health port, resources for
every container, and network policies that select every pod and open exactly the flows the
architecture has (deploy/components/network-policies), nothing else."""

from __future__ import annotations

from typing import Any

import pytest

from ingest.settings import Settings as IngestSettings
from profile_service.settings import Settings as ProfileSettings
from render.settings import Settings as RenderSettings
from tests.deploy.manifests import (
    DEFAULT_SETTINGS,
    NAMESPACE,
    OVERLAYS,
    SERVICES,
    of_kind,
    pod_template,
    workloads,
)
from tests.deploy.network_policy import Endpoint, Port, allows, isolated

SETTINGS = DEFAULT_SETTINGS
# Volume types Pod Security "restricted" allows.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def name_of(workload: dict[str, Any]) -> str:
    name: str = workload["metadata"]["name"]
    return name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_pod_security_restricted_with_a_read_only_root(overlay: str) -> None:
    checked = 0
    for workload in workloads(overlay):
        pod = pod_template(workload)["spec"]
        where = f"{overlay}: {name_of(workload)}"
        assert not any(pod.get(key) for key in ("hostNetwork", "hostPID", "hostIPC", "hostUsers")), where
        assert all(set(volume) - {"name"} <= RESTRICTED_VOLUMES for volume in pod.get("volumes", [])), where
        assert pod["automountServiceAccountToken"] is False, where  # none calls the Kubernetes API
        pod_context = pod.get("securityContext", {})
        for container in pod["containers"] + pod.get("initContainers", []):
            context = {**pod_context, **container.get("securityContext", {})}
            where = f"{overlay}: {name_of(workload)}/{container['name']}"
            assert context["runAsNonRoot"] is True and context.get("runAsUser", 1) != 0, where
            assert context["seccompProfile"]["type"] in ("RuntimeDefault", "Localhost"), where
            assert context["allowPrivilegeEscalation"] is False, where
            assert not context.get("privileged"), where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert set(context["capabilities"].get("add", [])) <= {"NET_BIND_SERVICE"}, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert not any("hostPort" in port for port in container.get("ports", [])), where
            checked += 1
    assert checked == (5 + 1 + (3 if overlay == "dev" else 0))  # services, setup, dev's dependencies


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_namespace_has_pod_security_admission_enforce_restricted(overlay: str) -> None:
    (namespace,) = of_kind(overlay, "Namespace")
    assert namespace["metadata"]["name"] == NAMESPACE
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert {w["metadata"]["namespace"] for w in workloads(overlay)} == {NAMESPACE}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits(overlay: str) -> None:
    for workload in workloads(overlay):
        for container in pod_template(workload)["spec"]["containers"]:
            resources = container["resources"]
            where = f"{overlay}: {name_of(workload)}/{container['name']}"
            assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(
                resources["limits"]
            ), where


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", SERVICES)
def test_each_service_has_startup_readiness_and_liveness_grpc_probes_on_its_health_port(
    overlay: str, service: str
) -> None:
    (deployment,) = [d for d in of_kind(overlay, "Deployment") if name_of(d) == service]
    (container,) = pod_template(deployment)["spec"]["containers"]
    health = port_of(SETTINGS[service].health_address)
    # kubelet's gRPC probes speak no TLS: the plaintext port that serves health only. Readiness
    # asks the overall status, which a draining server turns NOT_SERVING; the others ask
    # `liveness`, which stays SERVING while the process works (docs/operations.md).
    assert container["readinessProbe"]["grpc"] == {"port": health}
    assert (
        container["livenessProbe"]["grpc"]
        == container["startupProbe"]["grpc"]
        == {
            "port": health,
            "service": "liveness",
        }
    )
    startup = container["startupProbe"]
    # Time to wait for the setup Job's streams and schema before liveness takes over.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 30  # not on one slow answer
    # kubelet's default, 1 s, would take a busy event loop's late answer for a failure.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["timeoutSeconds"] >= 2, probe


def pods(overlay: str) -> list[Endpoint]:
    """The overlay's pods: each workload's pod template, with its container ports."""
    found = []
    for workload in workloads(overlay):
        template = pod_template(workload)
        ports = tuple(
            Port(port.get("name", ""), port["containerPort"], port.get("protocol", "TCP"))
            for container in template["spec"]["containers"]
            for port in container.get("ports", [])
        )
        found.append(
            Endpoint(
                name_of(workload), workload["metadata"]["namespace"], template["metadata"]["labels"], ports
            )
        )
    return found


def pod(name: str, namespace: str, labels: dict[str, str], *ports: Port) -> Endpoint:
    return Endpoint(name, namespace, labels, ports)


DNS = pod("kube-dns", "kube-system", {"k8s-app": "kube-dns"}, Port("dns", 53, "UDP"), Port("dns-tcp", 53))
INGRESS = pod(
    "ingress-nginx", "ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"}, Port("https", 443)
)
PROMETHEUS = pod("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"}, Port("web", 9090))
POSTGRES = pod("data/postgresql", "data", {"app.kubernetes.io/name": "postgresql"}, Port("postgres", 5432))
REDIS = pod("data/redis", "data", {"app.kubernetes.io/name": "redis"}, Port("redis", 6379))
NATS = pod("data/nats", "data", {"app.kubernetes.io/name": "nats"}, Port("client", 4222))
# What must get nowhere: look-alikes in the wrong namespace or with the wrong labels.
OUTSIDERS = [
    pod("default/prometheus", "default", {"app.kubernetes.io/name": "prometheus"}, Port("web", 9090)),
    pod("monitoring/grafana", "monitoring", {"app.kubernetes.io/name": "grafana"}, Port("web", 3000)),
    pod("ingress-nginx/other", "ingress-nginx", {"app.kubernetes.io/name": "other"}, Port("web", 80)),
    pod("kube-system/other", "kube-system", {"k8s-app": "metrics-server"}, Port("dns", 53, "UDP")),
]
PUBLIC_ADDRESSES = ["93.184.216.34", "2606:2800:220:1::1"]
# Private, shared, link-local (the cloud metadata service), loopback, IPv4-mapped and NAT64.
PRIVATE_ADDRESSES = [
    "10.0.0.7",
    "172.16.0.1",
    "192.168.1.1",
    "100.64.0.1",
    "169.254.169.254",
    "127.0.0.1",
    "fd00::1",
    "::ffff:10.0.0.1",
    "64:ff9b::a00:1",
]
ADDRESS_PORTS = [Port("", 443), Port("", 80), Port("", 5432)]
DEV_DEPENDENCIES = {"postgres": 5432, "redis": 6379, "nats": 4222}


def open_flows(overlay: str) -> set[tuple[str, str, int, str]]:
    """Every (from, to, port, protocol) the overlay's policies let through, among its pods, the
    peers outside the namespace, the outsiders and addresses outside the cluster."""
    policies = of_kind(overlay, "NetworkPolicy")
    ours = pods(overlay)
    others = [DNS, INGRESS, PROMETHEUS, POSTGRES, REDIS, NATS, *OUTSIDERS]
    addresses = [
        Endpoint(a, address=a, ports=tuple(ADDRESS_PORTS)) for a in PUBLIC_ADDRESSES + PRIVATE_ADDRESSES
    ]
    flows = set()
    for source in ours + others:
        for target in ours + others + addresses:
            if source == target or (source not in ours and target not in ours):
                continue
            for port in target.ports:
                if allows(policies, source, target, port):
                    flows.add((source.name, target.name, port.number, port.protocol))
    return flows


def expected_flows(overlay: str) -> set[tuple[str, str, int, str]]:
    """The flows the architecture has (deploy/components/network-policies/networkpolicies.yaml)."""
    ours = [p.name for p in pods(overlay)]
    flows = {(name, DNS.name, 53, protocol) for name in ours for protocol in ("UDP", "TCP")}
    databases = [POSTGRES.name, REDIS.name, NATS.name]
    ports = {POSTGRES.name: 5432, REDIS.name: 6379, NATS.name: 4222}
    if overlay == "dev":
        databases += list(DEV_DEPENDENCIES)
        ports |= DEV_DEPENDENCIES
    for service, settings in SETTINGS.items():
        flows.add((INGRESS.name, service, port_of(settings.http_address), "TCP"))
        flows.add((PROMETHEUS.name, service, port_of(settings.metrics_address), "TCP"))
        flows |= {(service, database, ports[database], "TCP") for database in databases}
    flows.add((INGRESS.name, "ingest", port_of(IngestSettings().webhooks.address), "TCP"))
    profile_grpc, render_grpc = port_of(ProfileSettings().address), port_of(RenderSettings().address)
    flows |= {
        ("render", "profile", profile_grpc, "TCP"),
        ("triggers", "profile", profile_grpc, "TCP"),
        ("triggers", "render", render_grpc, "TCP"),
    }
    flows.add(("sync", "ingest", port_of(IngestSettings().address), "TCP"))
    flows.add(("sync", "profile", profile_grpc, "TCP"))  # the live profiles its push connectors send
    # Webhooks (triggers) and the providers' APIs (sync): public addresses on 443.
    flows |= {
        (caller, address, 443, "TCP") for caller in ("triggers", "sync") for address in PUBLIC_ADDRESSES
    }
    flows |= {("sendtime-setup", d, ports[d], "TCP") for d in databases if ports[d] != 6379}
    return flows


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_isolate_every_pod_in_both_directions(overlay: str) -> None:
    policies = of_kind(overlay, "NetworkPolicy")
    for endpoint in pods(overlay):
        assert endpoint.namespace == NAMESPACE
        assert isolated(policies, endpoint) == {"Ingress", "Egress"}, endpoint.name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_open_exactly_the_flows_of_the_architecture(overlay: str) -> None:
    opened, expected = open_flows(overlay), expected_flows(overlay)
    assert not expected - opened, f"blocked: {sorted(expected - opened)}"
    assert not opened - expected, f"open but not in the architecture: {sorted(opened - expected)}"
