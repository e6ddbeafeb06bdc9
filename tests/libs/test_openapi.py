"""The OpenAPI document: committed as generated, valid OpenAPI 3.1, in step with the routes the
transcoder serves, and loadable by schemathesis with requests the routes accept."""

from __future__ import annotations

import json
import re
import urllib.parse
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate
from schemathesis.core.result import Ok

import gen_openapi
from sendtime_common.http_routes import HttpRoute, routes_of
from sendtime_common.openapi import OPEN_PATHS, SECURITY_SCHEME, STATUS_SCHEMA, build_document

SCHEMAS = "#/components/schemas/"


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return gen_openapi.document()


@pytest.fixture(scope="module")
def routes(document: dict[str, Any]) -> list[HttpRoute]:
    services = [tag["name"] for tag in document["tags"] if tag["name"] != "Server"]
    packages = {
        "IngestService": "ingest",
        "ProfileService": "profile",
        "TriggerService": "triggers",
        "DestinationService": "triggers",
        "DeliveryService": "triggers",
        "SyncService": "sync",
    }
    return routes_of(f"sendtime.{packages.get(s, 'render')}.v1.{s}" for s in services)


def schema(document: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = document["components"]["schemas"][name]
    return found


def test_the_committed_document_is_a_fresh_build() -> None:
    committed = gen_openapi.OUT.read_text(encoding="utf-8")
    assert committed == gen_openapi.render(), "openapi/ is stale: run 'make gen' and commit it"
    assert committed.endswith("}\n")


def test_the_build_is_deterministic() -> None:
    assert gen_openapi.render() == gen_openapi.render()


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"] == "3.1.0"
    validate(document)


def test_every_http_route_is_an_operation(document: dict[str, Any], routes: list[HttpRoute]) -> None:
    assert {r.method.containing_service.full_name for r in routes} == {
        "sendtime.ingest.v1.IngestService",
        "sendtime.profile.v1.ProfileService",
        "sendtime.render.v1.RenderService",
        "sendtime.render.v1.TemplateService",
        "sendtime.triggers.v1.TriggerService",
        "sendtime.triggers.v1.DestinationService",
        "sendtime.triggers.v1.DeliveryService",
        "sendtime.sync.v1.SyncService",
    }
    operations = {
        (path, method.upper())
        for path, item in document["paths"].items()
        for method in item
        if path not in OPEN_PATHS
    }
    assert operations == {(r.openapi_path, r.http_method) for r in routes}
    get_profile = document["paths"]["/v1/profiles/{name}"]["get"]
    assert get_profile["operationId"] == "ProfileService_GetProfile"
    assert get_profile["tags"] == ["ProfileService"]
    assert get_profile["summary"].startswith("GetProfile returns the profile")
    assert get_profile["x-grpc-method"] == "/sendtime.profile.v1.ProfileService/GetProfile"
    render = document["paths"]["/v1/templates/{template_name}:render"]
    assert render["post"]["operationId"] == "RenderService_Render"
    assert render["get"]["operationId"] == "RenderService_Render2"
    ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))


def test_rpcs_without_a_binding_have_no_operation(document: dict[str, Any]) -> None:
    grpc_methods = {op.get("x-grpc-method") for item in document["paths"].values() for op in item.values()}
    assert "/sendtime.profile.v1.ProfileService/DeleteProfile" not in grpc_methods
    assert "/sendtime.render.v1.RenderService/RenderBatch" not in grpc_methods
    assert not any(tag["name"] == "UnmergedEventService" for tag in document["tags"])


def test_path_variables_are_the_segment_after_the_literal_prefix(document: dict[str, Any]) -> None:
    (name,) = [p for p in document["paths"]["/v1/profiles/{name}"]["get"]["parameters"] if p["in"] == "path"]
    assert name["required"] is True
    assert name["schema"] == {"type": "string", "minLength": 1}
    assert '"profiles/"' in name["description"]


def test_query_parameters_by_json_name(document: dict[str, Any]) -> None:
    parameters = {p["name"]: p for p in document["paths"]["/v1/profiles/{name}"]["get"]["parameters"]}
    assert set(parameters) == {"name", "identifier.kind", "identifier.value", "readMask", "If-None-Match"}
    assert parameters["readMask"]["schema"]["type"] == "string"
    assert parameters["identifier.kind"]["schema"] == {"$ref": SCHEMAS + "sendtime.profile.v1.IdentifierKind"}
    render = {
        p["name"]: p for p in document["paths"]["/v1/templates/{template_name}:render"]["get"]["parameters"]
    }
    assert render["template.requiredData"]["schema"] == {"type": "array", "items": {"type": "string"}}
    assert render["template.requiredData"]["explode"] is True
    assert render["templateVersion"]["schema"]["type"] == "string"
    assert "variables" not in render  # a Struct has no query form


def test_body_routes_take_the_request_message(document: dict[str, Any]) -> None:
    send = document["paths"]["/v1/events:send"]["post"]
    assert send["requestBody"]["required"] is True
    body = send["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": SCHEMAS + "sendtime.ingest.v1.SendEventsRequest"}
    assert "parameters" not in send
    ok = send["responses"]["200"]
    assert ok["content"]["application/json"]["schema"] == {
        "$ref": SCHEMAS + "sendtime.ingest.v1.SendEventsResponse"
    }
    assert "headers" not in ok and "304" not in send["responses"]


def test_well_known_types_map_to_canonical_json(document: dict[str, Any]) -> None:
    profile = schema(document, "sendtime.profile.v1.Profile")
    assert "required" not in profile
    fields = profile["properties"]
    assert fields["createTime"]["type"] == "string" and fields["createTime"]["format"] == "date-time"
    assert fields["traits"]["type"] == "object" and fields["traits"]["additionalProperties"] is True
    assert fields["version"]["type"] == "string" and fields["version"]["format"] == "int64"
    assert fields["identifiers"]["type"] == "array"
    assert fields["identifiers"]["items"] == {"$ref": SCHEMAS + "sendtime.profile.v1.Identifier"}
    assert fields["provenance"]["type"] == "object"
    assert fields["provenance"]["additionalProperties"] == {
        "$ref": SCHEMAS + "sendtime.profile.v1.Provenance"
    }
    assert fields["customerId"]["description"] == "Sendtime's id for the customer."
    assert "purchased_skus" not in fields and "purchasedSkus" in fields
    template = schema(document, "sendtime.render.v1.Template")["properties"]
    assert template["maxDataAge"]["type"] == "string" and template["maxDataAge"]["pattern"].endswith("s$")
    assert template["maxDataAge"]["description"].startswith("How old the profile data may be")
    assert template["maxDataAge"]["description"].endswith("at most 315,576,000,000 s either way.")
    item = schema(document, "sendtime.ingest.v1.WebhookItem")["properties"]
    assert item["json"]["type"] == "string" and item["json"]["contentEncoding"] == "base64"
    update = schema(document, "sendtime.render.v1.UpdateTemplateRequest")["properties"]
    assert update["updateMask"]["type"] == "string"
    cart = schema(document, "sendtime.profile.v1.Cart")["properties"]
    assert cart["total"] == {
        "$ref": SCHEMAS + "google.type.Money",
        "description": cart["total"]["description"],
    }
    assert schema(document, "google.type.Money")["properties"]["units"]["type"] == "string"
    kind = schema(document, "sendtime.profile.v1.IdentifierKind")
    assert kind["type"] == "string"
    assert kind["enum"][:3] == [
        "IDENTIFIER_KIND_UNSPECIFIED",
        "IDENTIFIER_KIND_USER_ID",
        "IDENTIFIER_KIND_EMAIL",
    ]
    assert "- `IDENTIFIER_KIND_EMAIL`: An email address" in kind["description"]
    for example in ("1", "-42", "9223372036854775807"):
        assert _matches(fields["version"]["pattern"], example)
    assert not _matches(fields["version"]["pattern"], "1.5")
    assert _matches(template["maxDataAge"]["pattern"], "1.500s")


def _matches(pattern: str, text: str) -> bool:
    return re.search(pattern, text) is not None


def test_oneofs_are_documented(document: dict[str, Any]) -> None:
    event = schema(document, "sendtime.ingest.v1.Event")
    assert "orderCompleted" in event["x-oneof"]["payload"]
    assert "oneof `payload`" in event["description"]
    assert "oneof `payload`" in event["properties"]["orderCompleted"]["description"]


def test_errors_are_google_rpc_status(document: dict[str, Any]) -> None:
    status = schema(document, STATUS_SCHEMA)
    assert status["properties"]["code"]["type"] == "integer"
    detail = status["properties"]["details"]["items"]
    assert detail["required"] == ["@type"] and detail["additionalProperties"] is True
    responses = document["components"]["responses"]
    for response in responses.values():
        assert response["content"]["application/json"]["schema"] == {"$ref": SCHEMAS + STATUS_SCHEMA}
    assert set(responses["TooManyRequests"]["headers"]) == {"Retry-After"}
    assert set(responses["Unavailable"]["headers"]) == {"Retry-After"}
    assert "headers" not in responses["NotFound"]
    for path, item in document["paths"].items():
        if path in OPEN_PATHS:
            continue
        for operation in item.values():
            codes = operation["responses"]
            for code in ("400", "401", "403", "404", "409", "429", "500", "503", "504", "default"):
                assert codes[code]["$ref"].startswith("#/components/responses/"), (path, code)


def test_gets_are_conditional(document: dict[str, Any]) -> None:
    for item in document["paths"].values():
        get = item.get("get")
        if get is None or get["tags"] == ["Server"]:
            continue
        assert set(get["responses"]["200"]["headers"]) == {"ETag", "Cache-Control"}
        assert "304" in get["responses"]
        assert any(p["name"] == "If-None-Match" and p["in"] == "header" for p in get["parameters"])


def test_an_api_key_is_needed_except_on_the_open_paths(document: dict[str, Any]) -> None:
    assert document["components"]["securitySchemes"][SECURITY_SCHEME] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key: `Authorization: Bearer <api key>`.",
    }
    assert document["security"] == [{SECURITY_SCHEME: []}]
    for path, item in document["paths"].items():
        for operation in item.values():
            if path in OPEN_PATHS:
                assert operation["security"] == []
            else:
                assert "security" not in operation  # the global requirement applies


def test_without_comments_there_are_no_descriptions_from_the_contracts() -> None:
    bare = build_document(["sendtime.profile.v1.ProfileService"], title="t", version="v")
    assert "description" not in bare["paths"]["/v1/profiles/{name}"]["get"]
    assert "servers" not in bare
    assert "description" not in bare["components"]["schemas"]["sendtime.profile.v1.Identifier"]
    validate(bare)


def operations(loaded: Any) -> list[Any]:
    """Every operation schemathesis found (failing on one it could not read)."""
    found = []
    for result in loaded.get_all_operations():
        assert isinstance(result, Ok), result
        found.append(result.ok())
    return found


def test_schemathesis_loads_every_operation(document: dict[str, Any]) -> None:
    loaded = schemathesis.openapi.from_path(str(gen_openapi.OUT))
    labels = {operation.label for operation in operations(loaded)}
    assert labels == {
        f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item
    }


@pytest.mark.parametrize(
    "label",
    [
        "GET /v1/profiles/{name}",
        "GET /v1/templates/{template_name}:render",
        "POST /v1/templates/{name}:publish",
    ],
)
def test_schemathesis_paths_match_the_routes(label: str, routes: list[HttpRoute]) -> None:
    """The paths schemathesis generates for a multi-segment variable are ones the route matches."""
    loaded = schemathesis.openapi.from_dict(json.loads(gen_openapi.OUT.read_text(encoding="utf-8")))
    (operation,) = [o for o in operations(loaded) if o.label == label]
    method, path = label.split(" ")
    (route,) = [r for r in routes if r.http_method == method and r.openapi_path == path]
    prefix = route.variables[0].literal_prefix

    @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(operation.as_strategy())
    def check(case: Any) -> None:
        values = route.match(case.formatted_path)
        assert values is not None, case.formatted_path
        # schemathesis keeps path parameters percent-encoded, as sent.
        (sent,) = case.path_parameters.values()
        assert values[route.variables[0].field] == prefix + urllib.parse.unquote(sent)

    check()
