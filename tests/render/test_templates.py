"""Template compilation, the render context and the money filter: pure, no services."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from render.context import deep_merge, message_to_context, render_context
from render.templates import InvalidTemplate, TemplateCompiler, money, render_part
from sendtime.profile.v1 import profile_pb2
from tests.factories import money as money_proto
from tests.factories import timestamp


@pytest.fixture
def compiler() -> TemplateCompiler:
    return TemplateCompiler(cache_size=8)


def test_syntax_error_names_part_line_and_column(compiler: TemplateCompiler) -> None:
    with pytest.raises(InvalidTemplate) as caught:
        compiler.compile("Hi", "<p>\n  {% if %}yes{% endif %}\n</p>", "")
    (error,) = caught.value.errors
    assert (error.part, error.line, error.column) == ("html", 2, 6)
    assert error.reason == "missing expression"
    assert str(error) == "html: line 2, column 6: missing expression"


def test_unclosed_block_is_an_error_of_its_part(compiler: TemplateCompiler) -> None:
    with pytest.raises(InvalidTemplate) as caught:
        compiler.compile("Hi {% if vars.x %}", "", "")
    (error,) = caught.value.errors
    assert (error.part, error.line) == ("subject", None)
    assert str(error) == "subject: expected tag endif, found end of expression"


def test_unknown_filter_is_found_at_compile_time(compiler: TemplateCompiler) -> None:
    with pytest.raises(InvalidTemplate) as caught:
        compiler.compile("Hi", "", "line one\n  {{ profile.traits.name | shout }}")
    (error,) = caught.value.errors
    assert (error.part, error.line, error.column) == ("text", 2, 28)
    assert error.reason == "unknown filter 'shout'"


def test_every_bad_part_is_reported(compiler: TemplateCompiler) -> None:
    with pytest.raises(InvalidTemplate) as caught:
        compiler.compile("{% if %}", "fine", "{{ x | nope }}")
    assert [e.part for e in caught.value.errors] == ["subject", "text"]


def test_same_sources_compile_once(compiler: TemplateCompiler) -> None:
    first = compiler.compile("Hi {{ vars.x }}", "<b>{{ vars.x }}</b>", "")
    assert compiler.compile("Hi {{ vars.x }}", "<b>{{ vars.x }}</b>", "") is first


def test_html_is_escaped_subject_and_text_are_not(compiler: TemplateCompiler) -> None:
    compiled = compiler.compile("{{ name }}", "<p>{{ name }}</p>", "{{ name }}")
    context = {"name": "Ada <script>&"}
    assert render_part(compiled.html, "html", context) == "<p>Ada &lt;script&gt;&amp;</p>"
    assert render_part(compiled.subject, "subject", context) == "Ada <script>&"
    assert render_part(compiled.text, "text", context) == "Ada <script>&"


def test_money_filter_formats_per_currency() -> None:
    assert money({"amount": 59.9, "currency": "EUR"}) == "€59.90"
    assert money(1234.5, "USD") == "$1,234.50"
    assert money({"amount": 5, "currency": "JPY"}) == "¥5"
    assert money({"amount": 5}) == ""
    assert money("not money", "EUR") == ""


def test_profile_becomes_plain_template_values() -> None:
    profile = profile_pb2.Profile(
        customer_id="c1",
        version=7,
        identifiers=[profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_EMAIL, value="a@b.c")],
        cart=profile_pb2.Cart(
            items=[profile_pb2.CartItem(sku="s1", quantity=2, unit_price=money_proto("29.95"))],
            total=money_proto("59.90"),
            update_time=timestamp(datetime(2026, 11, 24, 12, 0, tzinfo=UTC)),
        ),
    )
    profile.traits.update({"first_name": "Ada", "vip": True})
    context = message_to_context(profile)
    assert context["version"] == 7
    assert context["identifiers"] == [{"kind": "email", "value": "a@b.c"}]
    assert context["traits"] == {"first_name": "Ada", "vip": True}
    assert context["cart"]["items"][0]["unit_price"] == {"amount": 29.95, "currency": "EUR"}
    assert context["cart"]["total"] == {"amount": 59.9, "currency": "EUR"}
    assert context["cart"]["update_time"] == datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    assert "orders" not in context  # unset: a fallback or a `default` filter applies


def test_live_values_override_fallbacks_key_by_key() -> None:
    fallback = {"profile": {"traits": {"first_name": "there", "city": "your city"}}, "vars": {"a": 1}}
    context = render_context(fallback, {"traits": {"first_name": "Ada"}}, {"b": 2})
    assert context == {
        "profile": {"traits": {"first_name": "Ada", "city": "your city"}},
        "vars": {"a": 1, "b": 2},
    }
    assert render_context(fallback, None, {})["profile"] == fallback["profile"]
    assert deep_merge({"a": {"b": 1}}, {"a": 2}) == {"a": 2}


def test_local_date_shows_times_in_the_customers_time_zone(compiler: TemplateCompiler) -> None:
    compiled = compiler.compile("{{ at | local_date: '%d %b %H:%M' }}", "", "")
    at = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    vienna = {"at": at, "profile": {"last_seen": {"timezone": "Europe/Vienna"}}}
    assert render_part(compiled.subject, "subject", vienna) == "24 Nov 13:00"
    assert render_part(compiled.subject, "subject", {"at": at}) == "24 Nov 12:00"  # unknown zone: UTC
    nonsense = {"at": at, "profile": {"last_seen": {"timezone": "Mars/Olympus"}}}
    assert render_part(compiled.subject, "subject", nonsense) == "24 Nov 12:00"
    assert render_part(compiled.subject, "subject", {"at": "yesterday"}) == ""
