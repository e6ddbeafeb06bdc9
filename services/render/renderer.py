"""One render: compile, look the profile up within the time left, render live or fallback."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace

from render.context import message_to_context, render_context
from render.profile_client import LookupFailure, ProfileClient
from render.templates import CompiledTemplate, TemplateCompiler, render_part
from sendtime.profile.v1 import profile_pb2

tracer = trace.get_tracer(__name__)


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    html: str
    text: str
    profile_version: int
    fallback: LookupFailure | None


class Renderer:
    def __init__(
        self, compiler: TemplateCompiler, profiles: ProfileClient, *, fallback_reserve_s: float
    ) -> None:
        self._compiler = compiler
        self._profiles = profiles
        self._fallback_reserve_s = fallback_reserve_s

    def compile(self, subject: str, html: str, text: str) -> CompiledTemplate:
        """The compiled template (cached by source).

        Raises:
            render.templates.InvalidTemplate: a part does not compile.
        """
        return self._compiler.compile(subject, html, text)

    async def render(
        self,
        customer: profile_pb2.Identifier,
        template: CompiledTemplate,
        fallback: Mapping[str, Any],
        variables: Mapping[str, Any],
        time_left_s: float,
    ) -> Rendered:
        """Render ``template`` for ``customer``, finishing within ``time_left_s``.

        The profile lookup gets the time left minus a reserve for rendering; whatever it returns,
        the template is rendered, with ``fallback`` values standing in for what is missing.

        Raises:
            render.templates.TemplateError: the template fails on this data.
        """
        lookup = await self._profiles.fetch(customer, time_left_s - self._fallback_reserve_s)
        with tracer.start_as_current_span("render.template") as span:
            span.set_attribute("render.fallback", lookup.failure.value if lookup.failure else "")
            profile = message_to_context(lookup.profile) if lookup.profile is not None else None
            return _render(
                template,
                render_context(fallback, profile, variables),
                profile_version=lookup.profile.version if lookup.profile is not None else 0,
                fallback=lookup.failure,
            )


def _render(
    compiled: CompiledTemplate,
    context: Mapping[str, Any],
    *,
    profile_version: int,
    fallback: LookupFailure | None,
) -> Rendered:
    return Rendered(
        subject=render_part(compiled.subject, "subject", context).strip(),
        html=render_part(compiled.html, "html", context),
        text=render_part(compiled.text, "text", context),
        profile_version=profile_version,
        fallback=fallback,
    )
