"""gRPC handlers of RenderService: check the request, resolve the template, hand the job to the
Renderer, encode."""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, Protocol

import grpc
from cachetools import LRUCache
from google.rpc import code_pb2

from render.context import struct_to_dict
from render.metrics import count_render, count_template_error
from render.renderer import Renderer, RenderJob
from render.template_errors import template_error_status
from render.template_store import StoreError
from render.template_validation import InvalidName, parse_name
from render.templates import CompiledTemplate, InvalidTemplate, TemplateError
from sendtime.profile.v1 import profile_pb2
from sendtime.render.v1 import render_pb2, render_pb2_grpc
from sendtime_common.auth.access import current_principal
from sendtime_common.auth.api_keys import Scope
from sendtime_common.errors import (
    FieldViolation,
    abort_invalid,
    abort_with,
    bad_request_status,
    error_info_status,
    not_found_status,
    retry_status,
)
from sendtime_common.identifier_proto import KIND_TO_PROTO, parse_identifier, requested_customer

MAX_BATCH = 100_000
# What one customer of a RenderBatch request may take on average for the request to fit the
# server's message size: an identifier of 256 ASCII characters and its framing (render.proto).
BATCH_IDENTIFIER_BYTES = 300
BATCH_CHUNK = 500  # customers per BatchGetProfiles call
BATCH_CONCURRENCY = 4  # chunks in flight at once
BATCH_CHUNK_DEADLINE_S = 5.0
FALLBACKS_CACHED = 1024  # stored template versions whose fallback dict is kept


class TemplateSource(Protocol):
    async def get_for_render(self, template_id: str, version: int) -> render_pb2.StoredTemplate | None: ...


class RenderServicer(render_pb2_grpc.RenderServiceServicer):
    def __init__(
        self,
        renderer: Renderer,
        templates: TemplateSource | None,
        *,
        default_deadline_s: float,
        inline_templates: bool = True,
    ) -> None:
        """``inline_templates``: whether Render takes a template in the request (from callers
        that also hold templates.write) or only stored ones."""
        self._renderer = renderer
        self._templates = templates
        self._default_deadline_s = default_deadline_s
        self._inline_templates = inline_templates
        # A stored version never changes, so its fallback is converted to a dict once, not on
        # every send (MessageToDict was ~8% of a Render).
        self._fallbacks: LRUCache[tuple[str, int], dict[str, Any]] = LRUCache(FALLBACKS_CACHED)

    async def Render(
        self, request: render_pb2.RenderRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> render_pb2.RenderResponse:
        violations: list[FieldViolation] = []
        identifier = request.customer if request.HasField("customer") else None
        customer = requested_customer(identifier, request.profile, "customer", "profile")
        if isinstance(customer, uuid.UUID):  # profiles are fetched by identifier
            by_identifier = "must name the customer by an identifier: profiles/{kind}:{value}"
            customer = FieldViolation("profile", by_identifier)
        if isinstance(customer, FieldViolation):
            violations.append(customer)
        inline = request.HasField("template")
        if inline == bool(request.template_name):
            violations.append(FieldViolation("template", "set exactly one of template and template_name"))
        if inline:
            await self._check_inline_allowed(context)
        content, version, have_content = request.template, 0, inline
        fallback: dict[str, Any] | None = None
        if request.template_name and not inline:
            found = await self._stored(request.template_name, request.template_version, context, violations)
            if found is not None:
                content, version, have_content = found.content, found.version, True
                fallback = self._fallbacks.get((found.name, version))
                if fallback is None:
                    fallback = self._fallbacks[(found.name, version)] = struct_to_dict(content.fallback)
        if have_content and not content.subject.strip():
            violations.append(FieldViolation("template.subject", "required"))
        compiled = None
        try:
            compiled = self._renderer.compile(content.subject, content.html, content.text)
        except InvalidTemplate as exc:
            violations.extend(FieldViolation(f"template.{e.part}", e.detail) for e in exc.errors)
        if violations or isinstance(customer, FieldViolation) or compiled is None:
            await abort_invalid(context, "invalid Render request", violations)
        kind, value = customer
        time_left = context.time_remaining()
        job = RenderJob(
            customer=profile_pb2.Identifier(kind=KIND_TO_PROTO[kind], value=value),
            content=content,
            compiled=compiled,
            variables=struct_to_dict(request.variables),
            template_version=version,
            fallback=struct_to_dict(content.fallback) if fallback is None else fallback,
        )
        try:
            response = await self._renderer.render(
                job, self._default_deadline_s if time_left is None else time_left
            )
        except TemplateError as exc:  # compiled, but fails on this data or went past a limit
            count_template_error()
            await abort_with(context, template_error_status(exc, self._renderer.limits, "template"))
        count_render(response)
        return response

    async def _check_inline_allowed(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """An inline template is authoring: it needs templates.write besides render, and the
        service may take none at all (RENDER_INLINE_TEMPLATES=false)."""
        if not self._inline_templates:
            await abort_with(
                context,
                error_info_status(
                    code_pb2.FAILED_PRECONDITION,
                    "inline templates are switched off here (RENDER_INLINE_TEMPLATES): render a stored "
                    "template by template_name",
                    "INLINE_TEMPLATES_OFF",
                    {"setting": "RENDER_INLINE_TEMPLATES"},
                ),
            )
        principal = current_principal()
        if Scope.TEMPLATES_WRITE not in principal.scopes:
            await abort_with(
                context,
                error_info_status(
                    code_pb2.PERMISSION_DENIED,
                    f"{principal.name} lacks the scope 'templates.write' that an inline template needs "
                    "(or render a stored template by template_name)",
                    "SCOPE_MISSING",
                    {"scope": Scope.TEMPLATES_WRITE.value, "principal": principal.name, "field": "template"},
                ),
            )

    async def RenderBatch(
        self, request: render_pb2.RenderBatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[render_pb2.RenderBatchResponse]:
        violations: list[FieldViolation] = []
        if not 1 <= len(request.customers) <= MAX_BATCH:
            violations.append(FieldViolation("customers", f"must hold 1 to {MAX_BATCH} customers"))
        found = await self._stored(request.template_name, request.template_version, context, violations)
        if violations or found is None:
            await abort_invalid(context, "invalid RenderBatch request", violations)
        try:
            compiled = self._renderer.compile(found.content.subject, found.content.html, found.content.text)
        except InvalidTemplate as exc:  # stored templates are validated; only a changed compiler gets here
            await abort_invalid(
                context, "the stored template no longer compiles",
                [FieldViolation(f"template.{e.part}", e.detail) for e in exc.errors],
            )  # fmt: skip
        variables = struct_to_dict(request.variables)
        # Chunks render in order, at most BATCH_CONCURRENCY ahead of what the caller has read:
        # each yield waits until the transport has taken the message (HTTP/2 flow control), so
        # a slow reader slows the rendering down instead of piling results up in memory.
        starts = iter(range(0, len(request.customers), BATCH_CHUNK))
        ahead: collections.deque[asyncio.Task[list[render_pb2.RenderBatchResponse]]] = collections.deque()

        def render_next_chunk() -> None:
            start = next(starts, None)
            if start is not None:
                chunk = list(request.customers[start : start + BATCH_CHUNK])
                budget_s = _chunk_budget_s(context)
                ahead.append(
                    asyncio.create_task(
                        self._render_chunk(chunk, start, found, compiled, variables, budget_s)
                    )
                )

        for _ in range(BATCH_CONCURRENCY):
            render_next_chunk()
        try:
            while ahead:
                responses = await ahead.popleft()
                render_next_chunk()
                for response in responses:
                    yield response
        finally:
            for task in ahead:
                task.cancel()

    async def _render_chunk(
        self,
        chunk: list[profile_pb2.Identifier],
        offset: int,
        template: render_pb2.StoredTemplate,
        compiled: CompiledTemplate,
        variables: dict[str, Any],
        budget_s: float,
    ) -> list[render_pb2.RenderBatchResponse]:
        responses: list[render_pb2.RenderBatchResponse] = []
        valid: list[tuple[int, profile_pb2.Identifier]] = []
        for i, identifier in enumerate(chunk):
            key = parse_identifier(identifier, f"customers[{offset + i}]")
            if isinstance(key, FieldViolation):
                error = bad_request_status("invalid customer", [key])
                responses.append(
                    render_pb2.RenderBatchResponse(customer=identifier, index=offset + i, error=error)
                )
            else:
                valid.append((offset + i, profile_pb2.Identifier(kind=KIND_TO_PROTO[key[0]], value=key[1])))
        lookups = await self._renderer.lookup_many([c for _, c in valid], budget_s)
        base = RenderJob(
            profile_pb2.Identifier(),
            template.content,
            compiled,
            variables,
            template.version,
            fallback=struct_to_dict(template.content.fallback),
        )
        for (index, customer), lookup in zip(valid, lookups, strict=True):
            job = replace(base, customer=customer)
            try:
                result = await self._renderer.render(job, budget_s, lookup=lookup)
            except TemplateError as exc:
                count_template_error()
                error = template_error_status(exc, self._renderer.limits, "template")
                responses.append(
                    render_pb2.RenderBatchResponse(customer=chunk[index - offset], index=index, error=error)
                )
                continue
            count_render(result)
            responses.append(
                render_pb2.RenderBatchResponse(customer=chunk[index - offset], index=index, result=result)
            )
        return responses

    async def _stored(
        self,
        name: str,
        version: int,
        context: grpc.aio.ServicerContext[Any, Any],
        violations: list[FieldViolation],
    ) -> render_pb2.StoredTemplate | None:
        try:
            template_id = parse_name(name)
        except InvalidName as exc:
            violations.append(FieldViolation("template_name", str(exc)))
            return None
        if version < 0:
            violations.append(FieldViolation("template_version", "must not be negative (0: published)"))
            return None
        if self._templates is None:
            violations.append(FieldViolation("template_name", "stored templates are not configured"))
            return None
        try:
            found = await self._templates.get_for_render(template_id, version)
        except StoreError:
            await abort_with(
                context,
                retry_status(
                    grpc.StatusCode.UNAVAILABLE,
                    "the template store is unavailable",
                    "TEMPLATES_UNAVAILABLE",
                    1.0,
                ),
            )
        if found is None:
            what = f"{name} version {version}" if version else f"a published version of {name}"
            await abort_with(context, not_found_status(f"no {what}", "TEMPLATE_NOT_FOUND", {"name": name}))
        return found


def _chunk_budget_s(context: grpc.aio.ServicerContext[Any, Any]) -> float:
    """How long a RenderBatch chunk may take: BATCH_CHUNK_DEADLINE_S, or less when the caller's
    deadline is nearer (it propagates to the profile lookups)."""
    time_left = context.time_remaining()
    return BATCH_CHUNK_DEADLINE_S if time_left is None else max(0.0, min(BATCH_CHUNK_DEADLINE_S, time_left))
