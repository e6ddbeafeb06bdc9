"""The contracts' HTTP routes as the transcoder reads them (sendtime_common.http_routes)."""

from __future__ import annotations

import pytest

from sendtime.ingest.v1 import ingest_pb2
from sendtime.profile.v1 import profile_pb2
from sendtime.render.v1 import render_pb2
from sendtime_common.errors import FieldViolation
from sendtime_common.http_routes import HttpRoute, RouteError, compile_template, query_to_json, routes_of

SERVICES = [
    ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name,
    profile_pb2.DESCRIPTOR.services_by_name["ProfileService"].full_name,
    render_pb2.DESCRIPTOR.services_by_name["RenderService"].full_name,
    render_pb2.DESCRIPTOR.services_by_name["TemplateService"].full_name,
]


def route(http_method: str, template: str) -> HttpRoute:
    (found,) = [r for r in routes_of(SERVICES) if (r.http_method, r.template) == (http_method, template)]
    return found


def test_every_binding_of_the_contracts_is_read_with_its_rpc() -> None:
    bindings = {(r.http_method, r.template): r.grpc_method for r in routes_of(SERVICES)}
    assert bindings[("GET", "/v1/{name=profiles/*}")] == "/sendtime.profile.v1.ProfileService/GetProfile"
    assert bindings[("POST", "/v1/events:send")] == "/sendtime.ingest.v1.IngestService/SendEvents"
    render = "/sendtime.render.v1.RenderService/Render"
    assert bindings[("GET", "/v1/{template_name=templates/*}:render")] == render
    assert bindings[("POST", "/v1/{template_name=templates/*}:render")] == render  # additional binding
    assert len(bindings) == len(routes_of(SERVICES))  # no binding twice


def test_a_path_variable_takes_one_percent_decoded_segment_after_its_literal_prefix() -> None:
    get_profile = route("GET", "/v1/{name=profiles/*}")
    assert get_profile.match("/v1/profiles/email:ada@example.com") == {
        "name": "profiles/email:ada@example.com"
    }
    assert get_profile.match("/v1/profiles/user_id:a%2Fb%20c") == {"name": "profiles/user_id:a/b c"}
    assert get_profile.match("/v1/profiles/a/b") is None  # two segments
    assert get_profile.match("/v1/profiles/") is None
    assert get_profile.match("/v1/profiles:batchGet") is None
    assert get_profile.openapi_path == "/v1/profiles/{name}"

    render = route("GET", "/v1/{template_name=templates/*}:render")
    assert render.match("/v1/templates/cart:render") == {"template_name": "templates/cart"}
    assert render.match("/v1/templates/cart:publish") is None
    assert render.openapi_path == "/v1/templates/{template_name}:render"
    with pytest.raises(UnicodeDecodeError):
        get_profile.match("/v1/profiles/%ff")


@pytest.mark.parametrize(
    "template", ["v1/x", "/v1/{name=**}", "/v1/{name=a/*/b}", "/v1/{name=*}/{x=*}:do{it}", "/v1/*"]
)
def test_templates_the_transcoder_cannot_serve_are_refused_at_start(template: str) -> None:
    with pytest.raises(RouteError):
        compile_template(template)


def test_query_parameters_by_json_or_proto_name_dotted_and_typed() -> None:
    get_profile = route("GET", "/v1/{name=profiles/*}")
    assert [p.json_path for p in get_profile.query_parameters()] == [
        "identifier.kind",
        "identifier.value",
        "readMask",
    ]
    values, violations = query_to_json(get_profile, [("read_mask", "traits,cart"), ("identifier.kind", "X")])
    assert values == {"readMask": "traits,cart", "identifier": {"kind": "X"}} and not violations

    values, violations = query_to_json(get_profile, [("readMask", "a"), ("readMask", "b"), ("name", "x")])
    assert violations == [
        FieldViolation("readMask", "is given more than once"),
        FieldViolation("name", "is not a parameter of this route"),  # the path sets it
    ]
    assert route("POST", "/v1/events:send").query_parameters() == []  # the body is the request
