"""The triggers service's clients of the real profile and render services, each with the
service's own key (profiles.read; render): the live profile by customer id, a stored template
rendered for a customer, and what a missing customer, a missing template or a service that
does not answer becomes."""

from __future__ import annotations

import uuid

import pytest
from google.protobuf import struct_pb2

from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime.render.v1 import render_pb2, render_pb2_grpc
from sendtime_common.tls import ClientTls
from tests.conftest import user, wait_for_profile
from tests.factories import event, identify
from triggers.clients import GrpcMessageRenderer, GrpcProfileReader, ProfileChannel, RenderChannel
from triggers.dependencies import DependencyUnavailable
from triggers.server import TriggersApp

NOWHERE = "127.0.0.1:1"  # nothing listens there


class KnownCustomer:
    """A ProfileReader that knows one customer."""

    customer_id = str(uuid.uuid4())

    async def get_profile(self, customer_id: str) -> profile_pb2.Profile | None:
        return profile_pb2.Profile(
            customer_id=customer_id,
            identifiers=[
                profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_EMAIL, value="a@example.com")
            ],
        )


async def test_the_live_profile_is_read_by_customer_id_and_rendered_for(
    triggers_app: TriggersApp,
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    template_stub: render_pb2_grpc.TemplateServiceAsyncStub,
    unique: str,
) -> None:
    await ingest_stub.SendEvents(
        ingest_pb2.SendEventsRequest(
            events=[event(user_id=f"t-{unique}", identify=identify(first_name="Ada"))]
        )
    )
    stored = await wait_for_profile(profile_stub, user(f"t-{unique}"), lambda p: "first_name" in p.traits)
    await template_stub.CreateTemplate(
        render_pb2.CreateTemplateRequest(
            template_id=f"reminder-{unique}",
            content=render_pb2.Template(
                subject="{{ profile.traits.first_name }}, {{ vars.offer }}", text="Come back"
            ),
            publish=True,
        )
    )
    profiles, renderer = triggers_app.profiles, triggers_app.renderer  # as the engine gets them

    profile = await profiles.get_profile(stored.customer_id)
    variables = struct_pb2.Struct()
    variables.update({"offer": "10% off"})
    rendered = await renderer.render(f"templates/reminder-{unique}", stored.customer_id, variables)

    assert profile is not None and profile.customer_id == stored.customer_id
    assert profile.traits["first_name"] == "Ada"
    assert rendered.status == render_pb2.RENDER_STATUS_RENDERED
    assert rendered.subject == "Ada, 10% off" and not rendered.fallback_used
    assert await profiles.get_profile(str(uuid.uuid4())) is None
    with pytest.raises(LookupError):
        await renderer.render("templates/never-made", stored.customer_id, struct_pb2.Struct())
    gone = await renderer.render(f"templates/reminder-{unique}", str(uuid.uuid4()), struct_pb2.Struct())
    assert gone.status == render_pb2.RENDER_STATUS_SKIPPED


async def test_a_service_that_does_not_answer_is_unavailable_not_a_missing_customer() -> None:
    plaintext = ClientTls(plaintext=True)
    profile_channel = ProfileChannel(NOWHERE, "key", plaintext, [])
    render_channel = RenderChannel(NOWHERE, "key", plaintext, [])
    try:
        dead_profiles = GrpcProfileReader(profile_channel, deadline_s=0.5)
        with pytest.raises(DependencyUnavailable):
            await dead_profiles.get_profile(str(uuid.uuid4()))
        # The customer is known; render does not answer.
        known = KnownCustomer()
        with pytest.raises(DependencyUnavailable):
            await GrpcMessageRenderer(render_channel, known, deadline_s=0.5).render(
                "templates/any", known.customer_id, struct_pb2.Struct()
            )
    finally:
        await profile_channel.close()
        await render_channel.close()
