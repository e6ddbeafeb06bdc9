"""The source-priority matrix: the packaged defaults, the file format and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from profile_service.merge_rules import (
    DEFAULT_RULES,
    MergeRules,
    MergeRulesError,
    is_known_attribute,
    load_merge_rules,
)
from sendtime.ingest.v1 import ingest_pb2

WEB = ingest_pb2.EVENT_SOURCE_WEB
APP = ingest_pb2.EVENT_SOURCE_MOBILE_APP
SERVER = ingest_pb2.EVENT_SOURCE_SERVER
CRM = ingest_pb2.EVENT_SOURCE_CRM
EMAIL = ingest_pb2.EVENT_SOURCE_EMAIL
IMPORT = ingest_pb2.EVENT_SOURCE_IMPORT
UNSPECIFIED = ingest_pb2.EVENT_SOURCE_UNSPECIFIED

DEFAULT = '["crm", "server", "import", "email", "mobile_app", "web"]'


def order_of(rules: MergeRules, attribute: str) -> list[int]:
    """The sources, most authoritative first, for ``attribute``."""
    sources = [WEB, APP, SERVER, CRM, EMAIL, IMPORT]
    return sorted(sources, key=lambda s: rules.priority(attribute, s), reverse=True)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "priority.toml"
    path.write_text(text)
    return path


def test_the_packaged_defaults() -> None:
    rules = DEFAULT_RULES
    assert order_of(rules, "last_seen")[:2] == [APP, WEB]
    assert order_of(rules, "loyalty") == [CRM, SERVER, IMPORT, EMAIL, APP, WEB]
    assert order_of(rules, "consents.email") == order_of(rules, "loyalty")
    # Transactional server data over browsing data.
    assert rules.priority("cart", SERVER) > rules.priority("cart", WEB)
    assert rules.priority("orders", SERVER) > rules.priority("orders", CRM)
    # Traits: the CRM over checkout over the storefront, for every trait.
    for attribute in ("traits", "traits.first_name"):
        assert (
            rules.priority(attribute, CRM)
            > rules.priority(attribute, SERVER)
            > rules.priority(attribute, WEB)
        )
    # The email provider first for email engagement.
    for attribute in ("email.bounce_state", "email.unsubscribed", "email.spam_reported"):
        assert order_of(rules, attribute)[0] == EMAIL
    # A source the matrix does not know ranks below every known one.
    assert rules.priority("traits", UNSPECIFIED) == 0 < rules.priority("traits", EMAIL)


def test_a_file_with_partial_rows_and_specific_attributes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
default = {DEFAULT}

[attributes]
traits = ["web"]
"traits.vip" = ["import", "crm"]
"consents.sms" = ["mobile_app"]
"email.bounce_state" = ["email"]
""",
    )
    rules = load_merge_rules(path)
    # The named sources first, the rest in the default order.
    assert order_of(rules, "traits.first_name") == [WEB, CRM, SERVER, IMPORT, EMAIL, APP]
    assert order_of(rules, "traits.vip") == [IMPORT, CRM, SERVER, EMAIL, APP, WEB]
    assert order_of(rules, "consents.sms")[0] == APP
    assert order_of(rules, "consents.email") == [CRM, SERVER, IMPORT, EMAIL, APP, WEB]
    assert order_of(rules, "email.bounce_state")[0] == EMAIL
    assert order_of(rules, "email.unsubscribed")[0] == CRM
    again = load_merge_rules(path)
    assert again == rules and hash(again) == hash(rules)
    assert again != DEFAULT_RULES


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            f'default = {DEFAULT}\n[attributes]\ncart = ["server", "fax"]\n',
            "attributes.cart: unknown source 'fax'",
        ),
        (f'default = {DEFAULT}\n[attributes]\ncarts = ["server"]\n', "attributes.carts: unknown attribute"),
        (
            f'default = {DEFAULT}\n[attributes]\n"consents.fax" = ["crm"]\n',
            "attributes.consents.fax: unknown attribute",
        ),
        (
            f'default = {DEFAULT}\n[attributes]\n"email.opens" = ["crm"]\n',
            "attributes.email.opens: unknown attribute",
        ),
        (
            f'default = {DEFAULT}\n[attributes]\n"traits.a-b" = ["crm"]\n',
            "attributes.traits.a-b: unknown attribute",
        ),
        (
            f'default = {DEFAULT}\n[attributes]\ncart = ["web", "web"]\n',
            "attributes.cart: source 'web' is listed twice",
        ),
        (
            f'default = {DEFAULT}\n[attributes]\ncart = "web"\n',
            "attributes.cart: must be a list of source names",
        ),
        (f"default = {DEFAULT}\nattributes = 3\n", "attributes: must be a table"),
        (
            'default = ["crm", "server"]\n',
            "default: must name every source; missing email, import, mobile_app, web",
        ),
        ('default = ["crm", "phone"]\n', "default: unknown source 'phone'"),
        ("[attributes]\n", "default: required"),
        (f"default = {DEFAULT}\npriority = 1\n", "priority: unknown key"),
        ("default = [", "priority.toml: "),
    ],
)
def test_a_bad_file_is_refused_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(MergeRulesError) as caught:
        load_merge_rules(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MergeRulesError, match="nope.toml"):
        load_merge_rules(tmp_path / "nope.toml")


def test_known_attributes() -> None:
    for attribute in (
        "traits",
        "traits.first_name",
        "cart",
        "consents.whatsapp",
        "email.unsubscribed",
        "last_seen",
    ):
        assert is_known_attribute(attribute)
    for attribute in ("trait", "cart.items", "consents.fax", "email.opens", "traits.", "loyalty.tier"):
        assert not is_known_attribute(attribute)
