"""Every object of every overlay, as built, against the Kubernetes 1.32 schemas
(kubernetes-validate, strict: unknown fields are errors), and the custom resources (cert-manager's
Certificate and Issuer, Prometheus Operator's ServiceMonitor and PrometheusRule) against their
CRDs' schemas, kept in crd_schemas/ (see its README.md) and closed the same way."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from tests.deploy.manifests import OVERLAYS, built, named

KUBERNETES_VERSION = "1.32.0"
CRD_SCHEMAS = Path(__file__).parent / "crd_schemas"


def closed(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists the known ones, as the API server
    does with strict field validation (fields it would otherwise drop silently)."""
    if isinstance(schema, dict):
        schema = {key: closed(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    return schema


@functools.cache
def crd_validator(kind: str, api_version: str) -> jsonschema.Draft7Validator | None:
    group, _, version = api_version.partition("/")
    path = CRD_SCHEMAS / f"{kind.lower()}-{group.split('.')[0]}-{version}.json"
    if not path.exists():
        return None
    schema = closed(json.loads(path.read_text()))
    # The API server checks metadata itself; the CRD schema leaves it open.
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def validate(document: dict[str, Any]) -> None:
    """Raises: kubernetes_validate.ValidationError, jsonschema.ValidationError: it is invalid;
    LookupError: no schema for its kind."""
    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        validator = crd_validator(document["kind"], document["apiVersion"])
        if validator is None:
            raise LookupError(f"no schema for {document['apiVersion']} {document['kind']}") from None
        validator.validate(document)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_kubernetes_1_32_or_valid_for_its_crd(overlay: str) -> None:
    kinds = set()
    for document in built(overlay):
        validate(document)
        kinds.add(document["kind"])
    assert {"Deployment", "Service", "Job", "NetworkPolicy", "Certificate", "Issuer"} <= kinds


def test_the_validation_catches_misspelt_and_mistyped_fields() -> None:
    deployment = copy.deepcopy(named("prod", "Deployment", "render"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 50063
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    certificate = copy.deepcopy(named("prod", "Certificate", "render-tls"))
    certificate["spec"]["dnsName"] = certificate["spec"].pop("dnsNames")
    with pytest.raises(jsonschema.ValidationError):
        validate(certificate)
    monitor = copy.deepcopy(named("prod", "ServiceMonitor", "sendtime"))
    monitor["spec"]["endpoints"][0]["interval"] = 30
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)
    rule: dict[str, Any] = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "example"},
        "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "up == 0"}]}]},
    }
    validate(rule)
    rule["spec"]["groups"][0]["rules"][0]["for"] = "five minutes"
    with pytest.raises(jsonschema.ValidationError):
        validate(rule)
    with pytest.raises(LookupError):
        validate({"apiVersion": "example.com/v1", "kind": "Unknown", "metadata": {"name": "x"}})
