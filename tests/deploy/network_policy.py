"""Which connections a set of NetworkPolicies lets through, by the Kubernetes semantics
(networking.k8s.io/v1): a pod that some policy selects for a direction is isolated in it, and
then a connection needs a rule of one of those policies that matches its peer and its port;
the sender's egress and the receiver's ingress must both allow it. Named ports resolve against
the receiving pod. Pod addresses are assumed private (the cluster's ranges), so ipBlocks that
leave the private ranges out never match a pod."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Port:
    name: str
    number: int
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A pod (namespace and labels) or an address outside the cluster (``address``)."""

    name: str
    namespace: str = ""
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    ports: tuple[Port, ...] = ()
    address: str = ""

    @property
    def namespace_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace}


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Whether a label selector (matchLabels, matchExpressions) matches ``labels``."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def _peer_matches(peer: Mapping[str, Any], policy_namespace: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        if not other.address:
            return False
        address = ipaddress.ip_address(other.address)
        block = ipaddress.ip_network(peer["ipBlock"]["cidr"])
        if address.version != block.version or address not in block:
            return False
        return not any(
            address in network
            for network in map(ipaddress.ip_network, peer["ipBlock"].get("except", []))
            if network.version == address.version
        )
    if other.address:
        return False
    if "namespaceSelector" in peer:
        in_namespace = selects(peer["namespaceSelector"], other.namespace_labels)
    else:
        in_namespace = other.namespace == policy_namespace
    return in_namespace and selects(peer.get("podSelector", {}), other.labels)


def _port_matches(rule_ports: Sequence[Mapping[str, Any]] | None, port: Port) -> bool:
    if not rule_ports:
        return True
    for rule_port in rule_ports:
        if rule_port.get("protocol", "TCP") != port.protocol:
            continue
        wanted = rule_port.get("port")
        if wanted is None or wanted == port.name:
            return True
        if isinstance(wanted, int) and wanted <= port.number <= rule_port.get("endPort", wanted):
            return True
    return False


def _types(policy: Mapping[str, Any]) -> list[str]:
    spec = policy["spec"]
    return list(spec.get("policyTypes") or (["Ingress", "Egress"] if "egress" in spec else ["Ingress"]))


def _policies_for(
    policies: Iterable[Mapping[str, Any]], pod: Endpoint, direction: str
) -> list[Mapping[str, Any]]:
    return [
        p
        for p in policies
        if p["metadata"]["namespace"] == pod.namespace
        and direction in _types(p)
        and selects(p["spec"]["podSelector"], pod.labels)
    ]


def allows(policies: Sequence[Mapping[str, Any]], source: Endpoint, target: Endpoint, port: Port) -> bool:
    """Whether a connection from ``source`` to ``target`` on ``port`` gets through."""
    if not source.address:
        isolating = _policies_for(policies, source, "Egress")
        if isolating and not any(
            (
                not rule.get("to")
                or any(_peer_matches(peer, p["metadata"]["namespace"], target) for peer in rule["to"])
            )
            and _port_matches(rule.get("ports"), port)
            for p in isolating
            for rule in p["spec"].get("egress", [])
        ):
            return False
    if not target.address:
        isolating = _policies_for(policies, target, "Ingress")
        if isolating and not any(
            (
                not rule.get("from")
                or any(_peer_matches(peer, p["metadata"]["namespace"], source) for peer in rule["from"])
            )
            and _port_matches(rule.get("ports"), port)
            for p in isolating
            for rule in p["spec"].get("ingress", [])
        ):
            return False
    return True


def isolated(policies: Sequence[Mapping[str, Any]], pod: Endpoint) -> set[str]:
    """The directions (Ingress, Egress) in which some policy isolates ``pod``."""
    return {direction for direction in ("Ingress", "Egress") if _policies_for(policies, pod, direction)}
