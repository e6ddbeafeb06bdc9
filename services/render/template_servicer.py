"""gRPC handlers of TemplateService: check the request, hand it to the store (or the previewer),
encode. Template checks live in ``render.template_validation``, storage in
``render.template_store``; rendering a preview is the renderer's (behind ``Previewer``)."""

from __future__ import annotations

import logging
from typing import Any, NoReturn, Protocol

import grpc
from google.rpc import code_pb2

from render.context import struct_to_dict
from render.template_errors import template_error_status
from render.template_store import (
    StoreError,
    TemplateAlreadyExists,
    TemplateNotFound,
    TemplateStore,
    VersionNotFound,
)
from render.template_validation import (
    InvalidName,
    check_display_name,
    check_template,
    check_template_id,
    parse_name,
    template_name,
)
from render.templates import InvalidTemplate, TemplateCompiler, TemplateError
from sendtime.profile.v1 import profile_pb2
from sendtime.render.v1 import render_pb2, render_pb2_grpc
from sendtime_common.errors import (
    FieldViolation,
    abort_invalid,
    abort_with,
    error_info_status,
    not_found_status,
    retry_status,
)
from sendtime_common.identifier_proto import KIND_TO_PROTO, parse_identifier
from sendtime_common.paging import InvalidPageToken, page_size

log = logging.getLogger(__name__)

MASK_PATHS = ("content", "display_name")
RETRY_AFTER_S = 1.0


class Previewer(Protocol):
    """Renders a preview the way a send would, minus the suppression rules (the renderer
    implements it; this service only resolves what to preview)."""

    async def preview(
        self,
        content: render_pb2.Template,
        customer: profile_pb2.Identifier | None,
        sample_data: dict[str, Any] | None,
        variables: dict[str, Any],
        template_version: int,
        time_left_s: float,
    ) -> render_pb2.RenderResponse:
        """Render ``content`` for ``customer``'s live profile, or for ``sample_data`` (shaped
        like the render context), or for neither (fallback values only), within ``time_left_s``.

        Raises:
            render.templates.TemplateError: the template fails on this data.
            render.templates.InvalidTemplate: it does not compile.
        """
        ...


class TemplateServicer(render_pb2_grpc.TemplateServiceServicer):
    def __init__(
        self,
        store: TemplateStore,
        compiler: TemplateCompiler,
        previewer: Previewer,
        *,
        default_deadline_s: float = 1.0,
    ) -> None:
        self._store = store
        self._compiler = compiler
        self._previewer = previewer
        self._default_deadline_s = default_deadline_s

    async def CreateTemplate(
        self, request: render_pb2.CreateTemplateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> render_pb2.CreateTemplateResponse:
        violations = [
            *check_template_id(request.template_id),
            *check_display_name(request.display_name),
            *check_template(request.content, self._compiler),
        ]
        if violations:
            await abort_invalid(context, "invalid CreateTemplate request", violations)
        try:
            stored = await self._store.create(
                request.template_id, request.display_name, request.content, publish=request.publish
            )
        except TemplateAlreadyExists:
            name = template_name(request.template_id)
            await abort_with(
                context,
                error_info_status(
                    code_pb2.ALREADY_EXISTS,
                    f"{name} exists; UpdateTemplate stores a new version of it",
                    "TEMPLATE_ALREADY_EXISTS",
                    {"name": name},
                ),
            )
        except StoreError as exc:
            await _abort_store_unavailable(context, exc)
        return render_pb2.CreateTemplateResponse(template=stored)

    async def UpdateTemplate(
        self, request: render_pb2.UpdateTemplateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> render_pb2.UpdateTemplateResponse:
        violations = _check_name(request.name)
        paths = set(request.update_mask.paths) or {"content"}
        if "*" in paths:  # AIP-134: replace everything updatable
            paths = set(MASK_PATHS)
        for i, path in enumerate(request.update_mask.paths):
            if path not in (*MASK_PATHS, "*"):
                violations.append(
                    FieldViolation(
                        f"update_mask.paths[{i}]", f"unknown field '{path}': use content or display_name"
                    )
                )
        if "content" in paths:
            violations.extend(check_template(request.content, self._compiler))
        elif request.publish:
            violations.append(
                FieldViolation(
                    "publish", "only with new content; PublishTemplate publishes an existing version"
                )
            )
        if "display_name" in paths:
            violations.extend(check_display_name(request.display_name))
        if violations:
            await abort_invalid(context, "invalid UpdateTemplate request", violations)
        template_id = parse_name(request.name)
        try:
            stored = await self._store.update(
                template_id,
                content=request.content if "content" in paths else None,
                display_name=request.display_name if "display_name" in paths else None,
                publish=request.publish,
            )
        except TemplateNotFound:
            await _abort_not_found(context, request.name)
        except StoreError as exc:
            await _abort_store_unavailable(context, exc)
        return render_pb2.UpdateTemplateResponse(template=stored)

    async def GetTemplate(
        self, request: render_pb2.GetTemplateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> render_pb2.GetTemplateResponse:
        violations = _check_name(request.name)
        if request.version < 0:
            violations.append(FieldViolation("version", "must not be negative (0 for the latest)"))
        if violations:
            await abort_invalid(context, "invalid GetTemplate request", violations)
        stored = await self._get(context, request.name, request.version)
        return render_pb2.GetTemplateResponse(template=stored)

    async def ListTemplates(
        self, request: render_pb2.ListTemplatesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> render_pb2.ListTemplatesResponse:
        if request.page_size < 0:
            await abort_invalid(
                context,
                "invalid ListTemplates request",
                [FieldViolation("page_size", "must not be negative")],
            )
        try:
            templates, token = await self._store.list(
                page_size=page_size(request.page_size), page_token=request.page_token
            )
        except InvalidPageToken as exc:
            await abort_invalid(context, "invalid page token", [FieldViolation("page_token", str(exc))])
        except StoreError as exc:
            await _abort_store_unavailable(context, exc)
        return render_pb2.ListTemplatesResponse(templates=templates, next_page_token=token)

    async def PublishTemplate(
        self, request: render_pb2.PublishTemplateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> render_pb2.PublishTemplateResponse:
        violations = _check_name(request.name)
        if request.version <= 0:
            violations.append(FieldViolation("version", "required: the version to publish (1, 2, ...)"))
        if violations:
            await abort_invalid(context, "invalid PublishTemplate request", violations)
        try:
            stored = await self._store.publish(parse_name(request.name), request.version)
        except TemplateNotFound:
            await _abort_not_found(context, request.name)
        except VersionNotFound:
            await abort_with(
                context,
                error_info_status(
                    code_pb2.FAILED_PRECONDITION,
                    f"{request.name} has no version {request.version} to publish",
                    "TEMPLATE_VERSION_NOT_FOUND",
                    {"name": request.name, "version": str(request.version)},
                ),
            )
        except StoreError as exc:
            await _abort_store_unavailable(context, exc)
        return render_pb2.PublishTemplateResponse(template=stored)

    async def PreviewTemplate(
        self, request: render_pb2.PreviewTemplateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> render_pb2.PreviewTemplateResponse:
        violations: list[FieldViolation] = []
        unsaved = request.HasField("content")
        if request.name and unsaved:
            violations.append(FieldViolation("content", "set name or content, not both"))
        elif unsaved:
            violations.extend(check_template(request.content, self._compiler))
        elif request.name:
            violations.extend(_check_name(request.name))
        else:
            violations.append(FieldViolation("name", "required: a stored template's name, or content"))
        if request.version < 0:
            violations.append(FieldViolation("version", "must not be negative (0 for the latest)"))
        customer: profile_pb2.Identifier | None = None
        if request.HasField("customer"):
            if request.HasField("sample_data"):
                violations.append(FieldViolation("sample_data", "set customer or sample_data, not both"))
            parsed = parse_identifier(request.customer, "customer")
            if isinstance(parsed, FieldViolation):
                violations.append(parsed)
            else:
                customer = profile_pb2.Identifier(kind=KIND_TO_PROTO[parsed[0]], value=parsed[1])
        if violations:
            await abort_invalid(context, "invalid PreviewTemplate request", violations)
        content, version = request.content, 0
        if not unsaved:
            stored = await self._get(context, request.name, request.version)
            content, version = stored.content, stored.version
        time_left = context.time_remaining()
        try:
            result = await self._previewer.preview(
                content,
                customer,
                struct_to_dict(request.sample_data) if request.HasField("sample_data") else None,
                struct_to_dict(request.variables),
                version,
                self._default_deadline_s if time_left is None else time_left,
            )
        except TemplateError as exc:  # compiled, but fails on this data or went past a limit
            await abort_with(context, template_error_status(exc, self._compiler.limits, "content"))
        except InvalidTemplate as exc:  # stored before today's rules (content was checked above)
            await abort_invalid(
                context,
                "the template does not compile",
                [FieldViolation(f"content.{e.part}", e.detail) for e in exc.errors],
            )
        return render_pb2.PreviewTemplateResponse(result=result)

    async def _get(
        self, context: grpc.aio.ServicerContext[Any, Any], name: str, version: int
    ) -> render_pb2.StoredTemplate:
        try:
            return await self._store.get(parse_name(name), version)
        except TemplateNotFound:
            await _abort_not_found(context, name)
        except VersionNotFound:
            await abort_with(
                context,
                not_found_status(
                    f"{name} has no version {version}",
                    "TEMPLATE_VERSION_NOT_FOUND",
                    {"name": name, "version": str(version)},
                ),
            )
        except StoreError as exc:
            await _abort_store_unavailable(context, exc)


def _check_name(name: str) -> list[FieldViolation]:
    if not name:
        return [FieldViolation("name", "required")]
    try:
        parse_name(name)
    except InvalidName as exc:
        return [FieldViolation("name", str(exc))]
    return []


async def _abort_not_found(context: grpc.aio.ServicerContext[Any, Any], name: str) -> NoReturn:
    await abort_with(context, not_found_status(f"no {name}", "TEMPLATE_NOT_FOUND", {"name": name}))


async def _abort_store_unavailable(
    context: grpc.aio.ServicerContext[Any, Any], exc: BaseException
) -> NoReturn:
    log.warning("template store unavailable", extra={"error": type(exc).__name__})
    await abort_with(
        context,
        retry_status(
            grpc.StatusCode.UNAVAILABLE,
            "render's database is unavailable",
            "DATABASE_UNAVAILABLE",
            RETRY_AFTER_S,
        ),
    )
