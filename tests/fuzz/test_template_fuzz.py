"""Fuzzing template source: whatever a caller writes, compiling and checking it gives a template
or field violations, and rendering it gives output or a TemplateError, never another exception
(which a service would answer INTERNAL)."""

from __future__ import annotations

from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from render.template_validation import check_template
from render.templates import InvalidTemplate, TemplateCompiler, TemplateError, TemplateLimits, render_part
from sendtime.render.v1 import render_pb2
from tests.fuzz.conftest import fuzzing

# Liquid's pieces, so that generated sources reach the parser's and the renderer's depths, not
# only the lexer's.
TOKENS = [
    "{{",
    "}}",
    "{%",
    "%}",
    "{%-",
    "-%}",
    "{{-",
    "-}}",
    "|",
    ":",
    ",",
    ".",
    "..",
    "(",
    ")",
    "[",
    "]",
    "'",
    '"',
    " ",
    "\n",
    "=",
    "==",
    "!=",
    "<",
    ">",
    "and",
    "or",
    "contains",
    "in",
    "with",
    "as",
    "for",
    "endfor",
    "if",
    "elsif",
    "else",
    "endif",
    "unless",
    "endunless",
    "case",
    "when",
    "endcase",
    "assign",
    "capture",
    "endcapture",
    "cycle",
    "tablerow",
    "endtablerow",
    "raw",
    "endraw",
    "comment",
    "endcomment",
    "liquid",
    "echo",
    "increment",
    "decrement",
    "break",
    "continue",
    "include",
    "render",
    "limit",
    "offset",
    "reversed",
    "nil",
    "true",
    "false",
    "empty",
    "profile",
    "traits",
    "first_name",
    "cart",
    "items",
    "vars",
    "recommendations",
    "i",
    "x",
    "size",
    "first",
    "last",
    "upcase",
    "downcase",
    "default",
    "money",
    "local_date",
    "date",
    "plus",
    "minus",
    "times",
    "divided_by",
    "modulo",
    "round",
    "slice",
    "split",
    "join",
    "sort",
    "map",
    "where",
    "append",
    "prepend",
    "truncate",
    "escape",
    "strip_html",
    "replace",
    "at_least",
    "0",
    "1",
    "-1",
    "3",
    "1.5",
    "1e308",
    "99999999999999999999",
    "'EUR'",
    "'%Y'",
    "'a,b'",
]
SOURCES = st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=5)), max_size=40).map("".join)
VALUES: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
CONTEXTS = st.fixed_dictionaries(
    {"profile": VALUES, "vars": VALUES, "recommendations": VALUES, "cart": VALUES}
)
LIMITS = TemplateLimits(
    loop_iterations=1000, output_bytes=20_000, local_namespace_bytes=20_000, render_time_s=0.05
)
COMPILER = TemplateCompiler(cache_size=0, limits=LIMITS)


@settings(fuzzing())
@given(source=SOURCES, context=CONTEXTS)
@example(source="{{ 1 | divided_by: 0 }}", context={})
@example(source="{{ 'x' | money: 'NOPE' }}", context={})
@example(source="{{ profile | local_date: 5 }}", context={"profile": 1e308})
@example(source="{% for i in (1..99999999999999999999) %}{% endfor %}", context={})
def test_any_template_compiles_and_renders_or_says_why(source: str, context: dict[str, Any]) -> None:
    try:
        compiled = COMPILER.compile("subject", source, source)
    except InvalidTemplate as exc:
        assert all(error.detail for error in exc.errors)
        return
    for part, template in (("html", compiled.html), ("text", compiled.text)):
        try:
            render_part(template, part, context)
        except TemplateError as exc:
            assert exc.detail


@settings(fuzzing())
@given(subject=SOURCES, html=SOURCES, required=st.lists(st.text(max_size=20), max_size=3))
def test_checking_any_template_content_gives_field_violations(
    subject: str, html: str, required: list[str]
) -> None:
    content = render_pb2.Template(subject=subject, html=html, text=html, required_data=required)
    for violation in check_template(content, COMPILER):
        assert violation.field.startswith("content.") and violation.description
