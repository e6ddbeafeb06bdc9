"""gRPC handlers of RenderService: check the request, hand it to the Renderer, encode."""

from __future__ import annotations

from typing import Any

import grpc

from render.context import struct_to_dict
from render.profile_client import LookupFailure
from render.renderer import Renderer
from render.templates import InvalidTemplate, TemplateError
from sendtime.profile.v1 import profile_pb2
from sendtime.render.v1 import render_pb2, render_pb2_grpc
from sendtime_common.errors import FieldViolation, abort_invalid
from sendtime_common.identifier_proto import KIND_TO_PROTO, parse_identifier

FALLBACK_REASONS = {
    LookupFailure.NOT_FOUND: render_pb2.FALLBACK_REASON_PROFILE_NOT_FOUND,
    LookupFailure.TIMEOUT: render_pb2.FALLBACK_REASON_PROFILE_TIMEOUT,
    LookupFailure.UNAVAILABLE: render_pb2.FALLBACK_REASON_PROFILE_UNAVAILABLE,
}


class RenderServicer(render_pb2_grpc.RenderServiceServicer):
    def __init__(self, renderer: Renderer, *, default_deadline_s: float) -> None:
        self._renderer = renderer
        self._default_deadline_s = default_deadline_s

    async def Render(
        self, request: render_pb2.RenderRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> render_pb2.RenderResponse:
        violations: list[FieldViolation] = []
        customer = parse_identifier(request.customer, "customer")
        if isinstance(customer, FieldViolation):
            violations.append(customer)
        template = request.template
        if not template.subject.strip():
            violations.append(FieldViolation("template.subject", "required"))
        compiled = None
        try:
            compiled = self._renderer.compile(template.subject, template.html, template.text)
        except InvalidTemplate as exc:
            violations.extend(FieldViolation(f"template.{e.part}", e.detail) for e in exc.errors)
        if violations or isinstance(customer, FieldViolation) or compiled is None:
            await abort_invalid(context, "invalid Render request", violations)
        kind, value = customer
        time_left = context.time_remaining()
        try:
            rendered = await self._renderer.render(
                profile_pb2.Identifier(kind=KIND_TO_PROTO[kind], value=value),
                compiled,
                struct_to_dict(template.fallback),
                struct_to_dict(request.variables),
                self._default_deadline_s if time_left is None else time_left,
            )
        except TemplateError as exc:  # compiled, but fails on this data
            await abort_invalid(
                context,
                "the template cannot be rendered",
                [FieldViolation(f"template.{exc.part}", exc.detail)],
            )
        return render_pb2.RenderResponse(
            subject=rendered.subject,
            html=rendered.html,
            text=rendered.text,
            fallback_used=rendered.fallback is not None,
            fallback_reason=(
                FALLBACK_REASONS[rendered.fallback]
                if rendered.fallback
                else render_pb2.FALLBACK_REASON_UNSPECIFIED
            ),
            profile_version=rendered.profile_version,
        )
