"""RenderService on the real profile service (and on a slow and a dead one): live renders,
fallbacks within the caller's deadline, and request and template errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from prometheus_client import REGISTRY

import devstack
from render import profiles as render_profiles
from render import renderer as render_renderer
from render.server import check_message_sizes
from render.settings import Settings as RenderSettings
from render.templates import TemplateLimits
from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime.render.v1 import render_pb2, render_pb2_grpc
from sendtime_common.call_limits import MIB, CallLimits
from sendtime_common.config import ConfigError
from sendtime_common.errors import FieldViolation, field_violations, status_of
from tests.conftest import RenderServiceFactory, user, wait_for_profile
from tests.factories import cart_item_added, event, identify, product_viewed
from tests.render.conftest import LIVE_DEADLINE_S

ABANDONED_CART = render_pb2.Template(
    subject="{{ profile.traits.first_name }}, you left something behind",
    html=(
        "<p>Hi {{ profile.traits.first_name }},</p><ul>"
        "{% for item in profile.cart.items %}<li>{{ item.quantity }} × {{ item.name }}</li>{% endfor %}"
        "</ul><p>Total {{ profile.cart.total | money }}</p>"
    ),
    text="Total {{ profile.cart.total | money }} {{ vars.discount_code }}",
)


def struct(values: dict[str, Any]) -> struct_pb2.Struct:
    built = struct_pb2.Struct()
    built.update(values)
    return built


def abandoned_cart(**fallback_traits: str) -> render_pb2.Template:
    template = render_pb2.Template()
    template.CopyFrom(ABANDONED_CART)
    template.fallback.CopyFrom(struct({"profile": {"traits": fallback_traits}}))
    return template


def render_request(
    identifier: profile_pb2.Identifier, template: render_pb2.Template
) -> render_pb2.RenderRequest:
    return render_pb2.RenderRequest(
        customer=identifier, template=template, variables=struct({"discount_code": "COMEBACK10"})
    )


class SlowProfileService(profile_pb2_grpc.ProfileServiceServicer):
    """Answers GetProfile only after ``delay_s``: a profile service under too much load."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.time_left: list[float | None] = []  # each BatchGetProfiles's deadline, as time remaining

    async def GetProfile(
        self, request: profile_pb2.GetProfileRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> profile_pb2.GetProfileResponse:
        await asyncio.sleep(self.delay_s)
        return profile_pb2.GetProfileResponse(profile=profile_pb2.Profile(customer_id="late"))

    async def BatchGetProfiles(
        self, request: profile_pb2.BatchGetProfilesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> profile_pb2.BatchGetProfilesResponse:
        self.time_left.append(context.time_remaining())
        await asyncio.sleep(self.delay_s)
        return profile_pb2.BatchGetProfilesResponse()

    async def ListProfileEvents(
        self, request: profile_pb2.ListProfileEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> profile_pb2.ListProfileEventsResponse:
        raise NotImplementedError  # render never calls it

    async def ExportProfile(
        self, request: profile_pb2.ExportProfileRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> profile_pb2.ExportProfileResponse:
        raise NotImplementedError

    async def DeleteProfile(
        self, request: profile_pb2.DeleteProfileRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> profile_pb2.DeleteProfileResponse:
        raise NotImplementedError


@pytest.fixture
async def slow_profile() -> AsyncIterator[tuple[SlowProfileService, str]]:
    """A profile service that answers no lookup within any test's time, and its target."""
    service = SlowProfileService(delay_s=60)
    server = grpc.aio.server()
    profile_pb2_grpc.add_ProfileServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield service, f"127.0.0.1:{port}"
    await server.stop(grace=0)


@pytest.mark.usefixtures("live_lookups")
async def test_renders_the_live_cart(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    render_stub: render_pb2_grpc.RenderServiceAsyncStub,
    unique: str,
) -> None:
    await ingest_stub.SendEvents(
        ingest_pb2.SendEventsRequest(
            events=[
                event(user_id=f"u-{unique}", identify=identify(first_name="Ada")),
                event(user_id=f"u-{unique}", product_viewed=product_viewed("shoe-1", "Trail shoe", "59.90")),
                event(
                    user_id=f"u-{unique}", cart_item_added=cart_item_added("shoe-1", 2, "59.90", "Trail shoe")
                ),
            ]
        )
    )
    profile = await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: len(p.cart.items) == 1)

    response = await render_stub.Render(
        render_request(user(f"u-{unique}"), abandoned_cart(first_name="there")), timeout=LIVE_DEADLINE_S
    )

    assert response.subject == "Ada, you left something behind"
    assert response.html == "<p>Hi Ada,</p><ul><li>2 × Trail shoe</li></ul><p>Total €119.80</p>"
    assert response.text == "Total €119.80 COMEBACK10"
    assert not response.fallback_used
    assert response.fallback_reason == render_pb2.FALLBACK_REASON_UNSPECIFIED
    assert response.profile_version == profile.version


@pytest.mark.usefixtures("live_lookups")
async def test_profile_data_is_escaped_in_html(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    render_stub: render_pb2_grpc.RenderServiceAsyncStub,
    unique: str,
) -> None:
    name = '<img src=x onerror="alert(1)">'
    await ingest_stub.SendEvents(
        ingest_pb2.SendEventsRequest(
            events=[event(user_id=f"u-{unique}", identify=identify(first_name=name))]
        )
    )
    await wait_for_profile(profile_stub, user(f"u-{unique}"), lambda p: "first_name" in p.traits)

    response = await render_stub.Render(
        render_request(user(f"u-{unique}"), abandoned_cart()), timeout=LIVE_DEADLINE_S
    )

    assert "<img" not in response.html
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in response.html
    assert response.subject.startswith(name)  # plain text: the mail client does not interpret it


@pytest.mark.usefixtures("live_lookups")  # NOT_FOUND is the profile service's live answer
async def test_unknown_customer_gets_the_fallback_values(
    render_stub: render_pb2_grpc.RenderServiceAsyncStub, unique: str
) -> None:
    response = await render_stub.Render(
        render_request(user(f"nobody-{unique}"), abandoned_cart(first_name="there")), timeout=LIVE_DEADLINE_S
    )

    assert response.fallback_used
    assert response.fallback_reason == render_pb2.FALLBACK_REASON_PROFILE_NOT_FOUND
    assert response.subject == "there, you left something behind"
    assert response.text == "Total  COMEBACK10"
    assert response.profile_version == 0


async def test_slow_profile_service_gets_a_fallback_within_the_deadline(
    slow_profile: tuple[SlowProfileService, str],
    render_service: RenderServiceFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service, target = slow_profile
    # Only the caller's 4 s bounds the lookup: the lookup cap and the default deadline are a
    # minute, as long as the profile service takes, so a render that ignored the caller's
    # deadline would still be waiting when the call failed with DEADLINE_EXCEEDED. Half of it
    # (2 s) is kept back for the fallback: a reserve of a tenth of 0.8 s (80 ms) was missed by a
    # process descheduled for longer. The reserve's share is a tuning (test_fallback_reserve).
    monkeypatch.setattr(render_profiles, "LOOKUP_TIMEOUT_MAX_S", 60.0)
    monkeypatch.setattr(render_renderer, "RESERVE_SHARE", 0.5)
    call_timeout_s, reserve_s = 4.0, 2.0
    async with render_service(target, fallback_reserve_s=reserve_s, default_deadline_s=60) as stub:
        response = await stub.Render(
            render_request(user("u-1"), abandoned_cart(first_name="there")), timeout=call_timeout_s
        )
    assert response.fallback_reason == render_pb2.FALLBACK_REASON_PROFILE_TIMEOUT
    assert response.subject == "there, you left something behind"
    # The caller's deadline, less the reserve, is what the lookup was given.
    (time_left,) = service.time_left
    assert time_left is not None and time_left <= call_timeout_s - reserve_s


async def test_without_a_caller_deadline_the_default_one_bounds_the_lookup(
    slow_profile: tuple[SlowProfileService, str], render_service: RenderServiceFactory
) -> None:
    _, target = slow_profile
    async with render_service(target, default_deadline_s=0.2) as stub:
        response = await stub.Render(render_request(user("u-1"), abandoned_cart(first_name="there")))
    assert response.fallback_reason == render_pb2.FALLBACK_REASON_PROFILE_TIMEOUT


async def test_profile_service_down_gets_a_fallback(render_service: RenderServiceFactory) -> None:
    async with render_service(f"127.0.0.1:{devstack.free_port()}") as stub:
        response = await stub.Render(
            render_request(user("u-1"), abandoned_cart(first_name="there")), timeout=2
        )
    assert response.fallback_used
    assert response.fallback_reason == render_pb2.FALLBACK_REASON_PROFILE_UNAVAILABLE
    assert response.subject == "there, you left something behind"


async def invalid_argument(call: Callable[[], Awaitable[object]]) -> list[FieldViolation]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = status_of(caught.value)
    assert status is not None
    return field_violations(status)


async def test_template_syntax_error_is_invalid_argument_with_position(
    render_stub: render_pb2_grpc.RenderServiceAsyncStub,
) -> None:
    template = render_pb2.Template(subject="Hi", html="<p>\n{% if %}yes{% endif %}</p>")
    violations = await invalid_argument(lambda: render_stub.Render(render_request(user("u-1"), template)))
    assert len(violations) == 1
    assert violations[0].field == "template.html"
    assert violations[0].description == "line 2, column 4: missing expression"


async def test_bad_request_names_every_bad_field(render_stub: render_pb2_grpc.RenderServiceAsyncStub) -> None:
    request = render_pb2.RenderRequest(
        customer=profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_EMAIL, value="not-an-email"),
        template=render_pb2.Template(html="<p>no subject</p>", text="{{ x | nope }}"),
    )
    violations = await invalid_argument(lambda: render_stub.Render(request))
    assert [v.field for v in violations] == ["customer.value", "template.subject", "template.text"]

    missing_customer = render_pb2.RenderRequest(template=ABANDONED_CART)
    violations = await invalid_argument(lambda: render_stub.Render(missing_customer))
    assert [(v.field, v.description) for v in violations] == [("customer", "required (or profile)")]


def test_render_will_not_start_with_message_sizes_its_contract_does_not_fit() -> None:
    check_message_sizes(RenderSettings())  # the defaults fit
    with pytest.raises(ConfigError, match="a RenderBatch of 100000 customers"):
        check_message_sizes(RenderSettings(limits=CallLimits(max_receive_bytes=4 * MIB)))
    with pytest.raises(ConfigError, match="RENDER_TEMPLATE_OUTPUT_BYTES"):
        check_message_sizes(RenderSettings(template_limits=TemplateLimits(output_bytes=2 * MIB)))


async def test_renders_fallbacks_and_the_open_breaker_are_measured_for_prometheus(
    render_service: RenderServiceFactory,
) -> None:
    """With the profile service down, renders fall back (counted by reason) until the breaker
    opens (reported as open, and renders then fall back at once)."""

    def renders(reason: str) -> float:
        labels = {"status": "rendered", "profile_source": "none", "fallback_reason": reason}
        labels["skip_reason"] = ""
        return REGISTRY.get_sample_value("sendtime_render_renders_total", labels) or 0.0

    before = {reason: renders(reason) for reason in ("profile_unavailable", "circuit_open")}
    async with render_service(f"127.0.0.1:{devstack.free_port()}") as stub:
        for _ in range(8):
            request = render_request(user("u-1"), abandoned_cart(first_name="there"))
            response = await stub.Render(request, timeout=2)
            assert response.fallback_used
        assert REGISTRY.get_sample_value("sendtime_render_profile_breaker_open") == 1.0
    assert renders("profile_unavailable") > before["profile_unavailable"]
    assert renders("circuit_open") > before["circuit_open"]
    assert renders("profile_unavailable") + renders("circuit_open") == sum(before.values()) + 8
