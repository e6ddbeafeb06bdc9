"""sync.connectors: the operator's connectors document, checked up front with each problem named
by its field; secrets only by the name of an environment variable (or its _FILE); each kind's
provider defaults; built into pulls and destinations that work (the local HubSpot)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sendtime_common.config import ConfigError
from sync.braze import BrazeAttributes
from sync.connectors import (
    ConnectorKind,
    build_destination,
    build_pull,
    load_connectors,
    open_api,
    parse_connectors,
)
from sync.mailchimp import MailchimpPush
from sync.provider_http import ApiKey, BasicAuth, OAuthClientCredentials, OAuthRefreshToken
from sync.sendgrid_contacts import SendGridContacts
from tests.sync.hubspot_server import HubSpotServer

ENV = {
    "HUBSPOT_CLIENT_SECRET": "hs-secret",
    "HUBSPOT_REFRESH_TOKEN": "hs-refresh",
    "MAILCHIMP_API_KEY": "0123456789abcdef0123456789abcdef-us6",
    "SENDGRID_API_KEY": "SG.key",
    "BRAZE_API_KEY": "braze-key",
}


def document(*connectors: dict[str, Any]) -> dict[str, Any]:
    return {"connectors": list(connectors)}


HUBSPOT = {
    "id": "hubspot-contacts",
    "kind": "hubspot_contacts",
    "interval_s": 120,
    "auth": {
        "oauth_refresh_token": {
            "token_url": "https://api.hubapi.com/oauth/v1/token",
            "client_id": "app-1",
            "client_secret_env": "HUBSPOT_CLIENT_SECRET",
            "refresh_token_env": "HUBSPOT_REFRESH_TOKEN",
        }
    },
    "options": {"page_size": 200},
}
MAILCHIMP = {
    "id": "mailchimp-members",
    "kind": "mailchimp_members",
    "auth": {"api_key_env": "MAILCHIMP_API_KEY"},
    "options": {"list_id": "a1b2c3d4e5"},
}
SENDGRID = {"id": "sendgrid", "kind": "sendgrid_suppressions", "auth": {"api_key_env": "SENDGRID_API_KEY"}}
SENDGRID_PUSH = {
    "id": "sendgrid-contacts",
    "kind": "sendgrid_push",
    "auth": {"api_key_env": "SENDGRID_API_KEY"},
    "options": {"traits": ["first_name", "tier"], "custom_field_ids": {"tier": "e1_T"}},
}
BRAZE = {
    "id": "braze",
    "kind": "braze_push",
    "base_url": "https://rest.iad-01.braze.com",
    "auth": {"api_key_env": "BRAZE_API_KEY"},
    "options": {"traits": ["first_name", "tier"]},
}


def test_every_kind_with_its_providers_defaults() -> None:
    hubspot, mailchimp, sendgrid, braze = parse_connectors(document(HUBSPOT, MAILCHIMP, SENDGRID, BRAZE), ENV)
    assert (hubspot.kind, hubspot.interval_s, hubspot.base_url) == (
        ConnectorKind.HUBSPOT_CONTACTS,
        120.0,
        "https://api.hubapi.com",
    )
    assert hubspot.credentials == OAuthRefreshToken(
        "https://api.hubapi.com/oauth/v1/token", "app-1", "hs-secret", "hs-refresh"
    )
    assert (hubspot.limits.requests, hubspot.limits.per_s) == (4, 1.0)  # HubSpot's search limit
    # Mailchimp: basic auth with the key, on the key's data center
    assert mailchimp.credentials == BasicAuth("sendtime", ENV["MAILCHIMP_API_KEY"])
    assert mailchimp.base_url == "https://us6.api.mailchimp.com" and mailchimp.interval_s == 300.0
    assert (sendgrid.base_url, sendgrid.credentials) == ("https://api.sendgrid.com", ApiKey("SG.key"))
    assert (braze.limits.requests, braze.limits.per_s) == (3000, 3.0)
    assert "braze-key" not in repr(braze) and "hs-secret" not in repr(hubspot)


def test_a_secret_can_come_from_a_mounted_file(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("SG.from-file\n")
    (sendgrid,) = parse_connectors(document(SENDGRID), {"SENDGRID_API_KEY_FILE": str(tmp_path / "key")})
    assert sendgrid.credentials == ApiKey("SG.from-file")


def test_client_credentials_and_a_rate_of_ones_own() -> None:
    connector = {
        "id": "crm",
        "kind": "hubspot_contacts",
        "auth": {
            "oauth_client_credentials": {
                "token_url": "https://idp.example/token",
                "client_id": "c",
                "client_secret_env": "HUBSPOT_CLIENT_SECRET",
                "scope": "contacts.read",
            }
        },
        "rate": {"requests": 2, "per_s": 1},
    }
    (crm,) = parse_connectors(document(connector), ENV)
    assert crm.credentials == OAuthClientCredentials(
        "https://idp.example/token", "c", "hs-secret", "contacts.read"
    )
    assert (crm.limits.requests, crm.limits.per_s) == (2, 1.0)


@pytest.mark.parametrize(
    ("connector", "env", "problem"),
    [
        (
            {**SENDGRID, "auth": {"api_key_env": "SG.abcdef123"}},
            ENV,
            r"connectors\[0\]\.auth\.api_key_env: the NAME",
        ),
        (
            {**SENDGRID, "auth": {"api_key_env": "SENDGRID_API_KEY"}},
            {},
            r"SENDGRID_API_KEY is not set \(nor SENDGRID_API_KEY_FILE\)",
        ),
        ({**SENDGRID, "auth": {}}, ENV, r"connectors\[0\]\.auth: exactly one of"),
        ({**SENDGRID, "auth": {"token": "x"}}, ENV, r"auth\.token: not a kind of auth"),
        ({**SENDGRID, "id": "Has Spaces"}, ENV, r"connectors\[0\]\.id: 1 to 63"),
        ({**SENDGRID, "kind": "salesforce"}, ENV, r"connectors\[0\]\.kind: one of hubspot_contacts"),
        ({**SENDGRID, "interval_s": 1}, ENV, r"interval_s: a number of at least 10"),
        ({**SENDGRID, "colour": "red"}, ENV, r"connectors\[0\]: unknown fields \['colour'\]"),
        ({**BRAZE, "base_url": None}, ENV, r"connectors\[0\]\.base_url: required"),
        ({**BRAZE, "options": {}}, ENV, r"options\.traits: required"),
        (
            {**SENDGRID_PUSH, "options": {"traits": ["tier"]}},
            ENV,
            r"options\.traits tier: neither a SendGrid reserved field nor in custom_field_ids",
        ),
        (
            {**SENDGRID_PUSH, "options": {"traits": ["tier"], "custom_field_ids": {"tier": "no spaces"}}},
            ENV,
            r"options\.custom_field_ids\['tier'\]: 'no spaces' is not a SendGrid custom field id",
        ),
        ({**MAILCHIMP, "options": {}}, ENV, r"options\.list_id: required"),
        (
            {**MAILCHIMP, "options": {"list_id": "x", "colour": 1}},
            ENV,
            r"options: unknown fields \['colour'\]",
        ),
        (
            {**MAILCHIMP, "auth": {"api_key_env": "SENDGRID_API_KEY"}},
            ENV,
            r"api_key_env: a Mailchimp API key ends in",
        ),
        (
            {**MAILCHIMP, "auth": {"oauth_client_credentials": HUBSPOT["auth"]["oauth_refresh_token"]}},  # type: ignore[index]
            ENV,
            r"unknown fields \['refresh_token_env'\]",
        ),
    ],
)
def test_each_problem_is_named_by_its_field(
    connector: dict[str, Any], env: dict[str, str], problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        parse_connectors(document(connector), env)


def test_the_document_itself_and_ids_used_twice() -> None:
    with pytest.raises(ConfigError, match=r'expected \{"connectors": \[\.\.\.\]\}'):
        parse_connectors([SENDGRID], ENV)
    with pytest.raises(ConfigError, match=r"connectors\[1\]\.id: 'sendgrid' is used twice"):
        parse_connectors(document(SENDGRID, SENDGRID), ENV)


def test_the_file_none_bad_and_good(tmp_path: Path) -> None:
    assert load_connectors({}) == []
    with pytest.raises(ConfigError, match="cannot read"):
        load_connectors({"SYNC_CONNECTORS_FILE": str(tmp_path / "missing.json")})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not JSON"):
        load_connectors({"SYNC_CONNECTORS_FILE": str(tmp_path / "bad.json")})
    (tmp_path / "good.json").write_text(json.dumps(document(SENDGRID)))
    assert [
        c.connector_id for c in load_connectors({**ENV, "SYNC_CONNECTORS_FILE": str(tmp_path / "good.json")})
    ] == ["sendgrid"]


async def test_built_into_a_pull_that_pulls_and_destinations_that_push() -> None:
    server = await HubSpotServer().start()
    try:
        server.upsert(7, 1_796_000_000_000, firstname="Ada", email="ada@example.com")
        env = {"HUBSPOT_CLIENT_SECRET": server.client_secret, "HUBSPOT_REFRESH_TOKEN": server.refresh_token}
        connector = {**HUBSPOT, "base_url": server.url, "auth": _hubspot_auth(server)}
        (config,) = parse_connectors(document(connector), env)
        api = open_api(config)
        pages = [page async for page in build_pull(config, api)(None)]
        await api.aclose()
        assert [e.customer.crm_id for p in pages for e in p.events] == ["7"]
    finally:
        await server.stop()
    braze, mailchimp_push, sendgrid_push = parse_connectors(
        document(
            BRAZE,
            {
                **MAILCHIMP,
                "id": "mc-push",
                "kind": "mailchimp_push",
                "options": {"list_id": "a1", "traits": ["x"]},
            },
            SENDGRID_PUSH,
        ),
        ENV,
    )
    assert (sendgrid_push.base_url, sendgrid_push.interval_s) == ("https://api.sendgrid.com", 30.0)
    for config, kind in (
        (braze, BrazeAttributes),
        (mailchimp_push, MailchimpPush),
        (sendgrid_push, SendGridContacts),
    ):
        api = open_api(config)
        assert isinstance(build_destination(config, api), kind)
        with pytest.raises(ValueError, match="pushes, it does not pull"):
            build_pull(config, api)
        await api.aclose()


def _hubspot_auth(server: HubSpotServer) -> dict[str, Any]:
    return {
        "oauth_refresh_token": {
            "token_url": server.token_url,
            "client_id": server.client_id,
            "client_secret_env": "HUBSPOT_CLIENT_SECRET",
            "refresh_token_env": "HUBSPOT_REFRESH_TOKEN",
        }
    }


def test_the_example_in_the_docs_is_a_document_the_service_takes() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "connectors.md").read_text()
    example = text.split("```json\n", 1)[1].split("```", 1)[0]
    connectors = parse_connectors(json.loads(example), ENV)
    assert {c.kind for c in connectors} == set(ConnectorKind)  # every kind is shown
