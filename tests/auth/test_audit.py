"""The audit trail on the real services: every privileged call is recorded with who made it,
what it acted on (a person only as a keyed hash), and how it ended; ListAuditEvents pages it."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from ingest.server import IngestApp
from profile_service.server import ProfileApp
from render.server import RenderApp
from sendtime.auth.v1 import auth_pb2, auth_pb2_grpc
from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime.render.v1 import render_pb2, render_pb2_grpc
from sendtime_common.auth.api_keys import Scope, key_id_of
from tests.conftest import channel, wait_for_profile
from tests.factories import event, identify
from tests.keys import issue_key
from tests.profile_service.test_profile_service import send


@pytest.fixture
async def audit(
    profile_app: ProfileApp, admin_key: str
) -> AsyncIterator[auth_pb2_grpc.AuditServiceAsyncStub]:
    async with channel(f"127.0.0.1:{profile_app.grpc.port}", admin_key) as calls:
        yield auth_pb2_grpc.AuditServiceStub(calls)


async def records_of(audit: auth_pb2_grpc.AuditServiceAsyncStub, principal: str) -> list[auth_pb2.AuditEvent]:
    """Every record of ``principal``, newest first."""
    found: list[auth_pb2.AuditEvent] = []
    token = ""
    while True:
        page = await audit.ListAuditEvents(
            auth_pb2.ListAuditEventsRequest(principal=principal, page_size=2, page_token=token)
        )
        found += page.audit_events
        if not (token := page.next_page_token):
            return found


async def test_export_and_erase_are_recorded_with_the_key_and_a_hash_of_the_person_never_the_email(
    profile_app: ProfileApp,
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    audit: auth_pb2_grpc.AuditServiceAsyncStub,
    database_url: str,
    unique: str,
) -> None:
    email = f"audit-{unique}@example.com"
    await send(ingest_stub, event(user_id=f"u-{unique}", email=email, identify=identify(first_name="Ada")))
    await wait_for_profile(profile_stub, ingest_user(f"u-{unique}"), lambda p: "first_name" in p.traits)

    privacy_key = await issue_key(database_url, [Scope.PROFILES_EXPORT, Scope.PROFILES_ERASE], "privacy desk")
    reader_key = await issue_key(database_url, [Scope.PROFILES_READ], "reader")
    person = profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_EMAIL, value=email.upper())
    async with channel(f"127.0.0.1:{profile_app.grpc.port}", privacy_key) as calls:
        stub = profile_pb2_grpc.ProfileServiceStub(calls)
        await stub.ExportProfile(profile_pb2.ExportProfileRequest(identifier=person))
        await stub.DeleteProfile(profile_pb2.DeleteProfileRequest(identifier=person))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.DeleteProfile(profile_pb2.DeleteProfileRequest(identifier=person))  # gone now
    async with channel(f"127.0.0.1:{profile_app.grpc.port}", reader_key) as calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await profile_pb2_grpc.ProfileServiceStub(calls).DeleteProfile(
                profile_pb2.DeleteProfileRequest(identifier=person)
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

    hashed = "email:" + hashlib.sha256(f"email:{email}".encode()).hexdigest()  # tests run unkeyed
    privacy = await records_of(audit, f"apiKeys/{key_id_of(privacy_key)}")
    assert [(r.method.rpartition("/")[2], r.target, r.outcome, r.service) for r in privacy] == [
        ("DeleteProfile", hashed, "NOT_FOUND", "profile"),
        ("DeleteProfile", hashed, "OK", "profile"),
        ("ExportProfile", hashed, "OK", "profile"),
    ]
    denied = await records_of(audit, f"apiKeys/{key_id_of(reader_key)}")
    assert [(r.method, r.target, r.outcome) for r in denied] == [
        ("/sendtime.profile.v1.ProfileService/DeleteProfile", hashed, "PERMISSION_DENIED")
    ]
    assert all(email not in str(r) and email.upper() not in str(r) for r in privacy + denied)
    assert privacy[0].time.ToDatetime(tzinfo=UTC) > datetime.now(UTC) - timedelta(minutes=1)


def ingest_user(user_id: str) -> profile_pb2.Identifier:
    return profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_USER_ID, value=user_id)


async def test_template_changes_dead_letter_replays_and_key_changes_are_recorded(
    ingest_app: IngestApp,
    render_app: RenderApp,
    profile_app: ProfileApp,
    audit: auth_pb2_grpc.AuditServiceAsyncStub,
    database_url: str,
    unique: str,
) -> None:
    operator = await issue_key(
        database_url,
        [Scope.TEMPLATES_WRITE, Scope.DEAD_LETTERS_MANAGE, Scope.EVENTS_WRITE, Scope.KEYS_MANAGE],
    )
    async with (
        channel(f"127.0.0.1:{render_app.grpc.port}", operator) as render_calls,
        channel(f"127.0.0.1:{ingest_app.grpc.port}", operator) as ingest_calls,
        channel(f"127.0.0.1:{profile_app.grpc.port}", operator) as profile_calls,
    ):
        templates = render_pb2_grpc.TemplateServiceStub(render_calls)
        await templates.CreateTemplate(
            render_pb2.CreateTemplateRequest(
                template_id=f"audit-{unique}", content=render_pb2.Template(subject="Hi"), publish=False
            )
        )
        await templates.PublishTemplate(
            render_pb2.PublishTemplateRequest(name=f"templates/audit-{unique}", version=1)
        )

        ingest = ingest_pb2_grpc.IngestServiceStub(ingest_calls)
        bad = event(user_id=f"u-{unique}", identify=identify(a=1))
        bad.customer.Clear()  # rejected: no customer
        result = (await ingest.SendEvents(ingest_pb2.SendEventsRequest(events=[bad]))).results[0]
        assert result.outcome == ingest_pb2.EVENT_OUTCOME_REJECTED
        listed = await ingest.ListRejectedEvents(ingest_pb2.ListRejectedEventsRequest(page_size=1000))
        (dead_letter,) = [d.name for d in listed.rejected_events if d.event.event_id == result.event_id]
        await ingest.ReplayRejectedEvent(ingest_pb2.ReplayRejectedEventRequest(name=dead_letter))

        keys = auth_pb2_grpc.KeyServiceStub(profile_calls)
        made = await keys.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(display_name=f"made-{unique}", scopes=[auth_pb2.SCOPE_RENDER])
        )
        await keys.RevokeApiKey(auth_pb2.RevokeApiKeyRequest(name=made.api_key.name))

    recorded = await records_of(audit, f"apiKeys/{key_id_of(operator)}")
    assert [(r.service, r.method.rpartition("/")[2], r.target, r.outcome) for r in reversed(recorded)] == [
        ("render", "CreateTemplate", f"audit-{unique}", "OK"),
        ("render", "PublishTemplate", f"templates/audit-{unique}", "OK"),
        ("ingest", "ReplayRejectedEvent", dead_letter, "OK"),
        ("profile", "CreateApiKey", f"made-{unique}", "OK"),
        ("profile", "RevokeApiKey", made.api_key.name, "OK"),
    ]
    assert made.key not in str(recorded)
    only_revokes = await audit.ListAuditEvents(
        auth_pb2.ListAuditEventsRequest(method="/sendtime.auth.v1.KeyService/RevokeApiKey", page_size=1000)
    )
    assert made.api_key.name in {r.target for r in only_revokes.audit_events}


async def test_old_audit_records_are_purged(
    profile_app: ProfileApp, audit: auth_pb2_grpc.AuditServiceAsyncStub
) -> None:
    await profile_app.auth.audit.record("cli:tests", "purge probe", "x", "OK")
    assert await profile_app.auth.audit.purge(datetime.now(UTC) - timedelta(days=1)) == 0
    assert await profile_app.auth.audit.purge(datetime.now(UTC) + timedelta(seconds=1)) >= 1
    assert not (
        await audit.ListAuditEvents(auth_pb2.ListAuditEventsRequest(principal="cli:tests"))
    ).audit_events
