"""Template checks before storing: syntax and filters (from the compiler), unknown variables with
their position, profile fields, fallback roots, required data, data age, channel, ids: pure."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import duration_pb2, struct_pb2

from render.template_validation import InvalidName, check_template, check_template_id, parse_name
from render.templates import TemplateCompiler
from sendtime.ingest.v1 import ingest_pb2
from sendtime.render.v1 import render_pb2
from sendtime_common.errors import FieldViolation


@pytest.fixture
def compiler() -> TemplateCompiler:
    return TemplateCompiler(cache_size=32)


def template(fallback: dict[str, Any] | None = None, **fields: Any) -> render_pb2.Template:
    content = render_pb2.Template(subject=fields.pop("subject", "Hi"), **fields)
    if fallback is not None:
        content.fallback.update(fallback)
    return content


def test_a_good_template_has_no_violations(compiler: TemplateCompiler) -> None:
    content = template(
        subject="{{ profile.traits.first_name | default: 'there' }}, your cart",
        html=(
            "{% for item in profile.cart.items %}{{ item.name }} {{ forloop.index }}{% endfor %}"
            "{% assign total = profile.cart.total %}{{ total | money }}"
            "{% for r in recommendations %}{{ r.name }}{% endfor %}{{ vars.anything.at.all }}"
        ),
        text="{{ profile.loyalty.tier }} {{ profile.traits.any.depth }} {{ profile[vars.key] }}",
        required_data=["profile.cart.items"],
        max_data_age=duration_pb2.Duration(seconds=300),
        channel=ingest_pb2.CHANNEL_EMAIL,
    )
    assert check_template(content, compiler) == []


def test_syntax_error_has_part_line_and_column(compiler: TemplateCompiler) -> None:
    violations = check_template(template(html="<p>\n  {% if %}yes{% endif %}\n</p>"), compiler)
    assert violations == [FieldViolation("content.html", "line 2, column 6: missing expression")]


def test_unknown_filter_has_its_position(compiler: TemplateCompiler) -> None:
    violations = check_template(template(text="one\n  {{ vars.name | shout }}"), compiler)
    assert violations == [FieldViolation("content.text", "line 2, column 18: unknown filter 'shout'")]


def test_unknown_variable_has_its_position_and_a_suggestion(compiler: TemplateCompiler) -> None:
    content = template(html="<p>\nHi {{ profil.traits.first_name }}, {{ profil.traits.first_name }}</p>")
    assert check_template(content, compiler) == [
        FieldViolation(
            "content.html",
            "line 2, column 7: unknown variable 'profil.traits.first_name': "
            "the render context has no 'profil'; did you mean 'profile'?",
        )
    ]


def test_unknown_variables_in_tags_and_filter_arguments_are_found(compiler: TemplateCompiler) -> None:
    content = template(
        subject="{% if customer %}x{% endif %}",
        text="{{ vars.a | default: shop.name }}",
    )
    descriptions = [(v.field, v.description.split(":")[0]) for v in check_template(content, compiler)]
    assert descriptions == [("content.subject", "line 1, column 7"), ("content.text", "line 1, column 22")]


def test_unknown_profile_field(compiler: TemplateCompiler) -> None:
    (violation,) = check_template(
        template(text="{{ profile.cart.total }} {{ profile.kart.total }}"), compiler
    )
    assert violation == FieldViolation(
        "content.text",
        "line 1, column 29: unknown variable 'profile.kart.total': the profile has no field 'kart'; "
        "did you mean 'cart'?",
    )


def test_fallback_roots_and_profile_fields_are_allowed(compiler: TemplateCompiler) -> None:
    content = template(
        fallback={"shop": {"name": "Acme"}, "profile": {"nickname": "friend"}},
        text="{{ shop.name }} {{ profile.nickname }} {{ brand }}",
    )
    (violation,) = check_template(content, compiler)
    assert violation.description.startswith("line 1, column 43: unknown variable 'brand'")


def test_other_parts_are_checked_when_one_does_not_compile(compiler: TemplateCompiler) -> None:
    violations = check_template(template(subject="{% if %}", text="{{ nope }}"), compiler)
    assert [v.field for v in violations] == ["content.subject", "content.text"]
    assert "unknown variable 'nope'" in violations[1].description


def test_subject_is_required(compiler: TemplateCompiler) -> None:
    assert check_template(template(subject="  ", text="x"), compiler) == [
        FieldViolation("content.subject", "required")
    ]


def test_required_data_paths_are_checked(compiler: TemplateCompiler) -> None:
    content = template(
        fallback={"shop": {}},
        required_data=["profile.cart.items", "vars.code", "shop.name", "profile.kart", "cart.items", "a..b"],
    )
    assert check_template(content, compiler) == [
        FieldViolation(
            "content.required_data[3]",
            "unknown variable 'profile.kart': the profile has no field 'kart'; did you mean 'cart'?",
        ),
        FieldViolation(
            "content.required_data[4]", "unknown variable 'cart.items': the render context has no 'cart'"
        ),
        FieldViolation(
            "content.required_data[5]",
            "must be a dotted path into the render context, e.g. profile.cart.items",
        ),
    ]


def test_required_data_must_not_have_a_fallback_value(compiler: TemplateCompiler) -> None:
    content = template(
        fallback={"profile": {"cart": {"items": [{"name": "Lamp"}]}, "traits": {"first_name": ""}}},
        required_data=["profile.cart.items", "profile.traits.first_name"],
    )
    assert check_template(content, compiler) == [
        FieldViolation(
            "content.required_data[0]",
            "the fallback gives it a value, so it is never missing; remove one of the two",
        )
    ]


@pytest.mark.parametrize(
    ("age", "problem"),
    [
        (duration_pb2.Duration(seconds=0), None),
        (duration_pb2.Duration(seconds=86400), None),
        (duration_pb2.Duration(seconds=86400, nanos=1), "must be at most 1 day (86400s)"),
        (duration_pb2.Duration(seconds=-1), "must not be negative"),
        (duration_pb2.Duration(seconds=1, nanos=-5), "is not a valid duration"),
    ],
)
def test_max_data_age_is_between_zero_and_a_day(
    compiler: TemplateCompiler, age: duration_pb2.Duration, problem: str | None
) -> None:
    violations = check_template(template(max_data_age=age), compiler)
    assert violations == ([FieldViolation("content.max_data_age", problem)] if problem else [])


def test_channel_must_be_known(compiler: TemplateCompiler) -> None:
    assert check_template(template(channel=ingest_pb2.CHANNEL_SMS), compiler) == []
    assert check_template(template(channel=99), compiler) == [
        FieldViolation("content.channel", "unknown channel 99")
    ]


def test_field_prefix_follows_the_request(compiler: TemplateCompiler) -> None:
    content = template(subject="")
    content.fallback.CopyFrom(struct_pb2.Struct())
    assert check_template(content, compiler, field="template") == [
        FieldViolation("template.subject", "required")
    ]


@pytest.mark.parametrize("template_id", ["a", "abandoned-cart-2", "a" * 63])
def test_good_ids_and_names(template_id: str) -> None:
    assert check_template_id(template_id) == []
    assert parse_name(f"templates/{template_id}") == template_id


@pytest.mark.parametrize("template_id", ["", "2cart", "Cart", "cart_eu", "a" * 64, "-a", "a/b"])
def test_bad_ids_and_names(template_id: str) -> None:
    assert len(check_template_id(template_id)) == 1
    with pytest.raises(InvalidName):
        parse_name(f"templates/{template_id}")


def test_a_name_needs_its_prefix() -> None:
    with pytest.raises(InvalidName):
        parse_name("cart")
