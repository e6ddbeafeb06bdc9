"""How a template that fails at render time is answered: INVALID_ARGUMENT naming the part when
it fails on the data, RESOURCE_EXHAUSTED naming the limit and its setting when it went past one
of ``TemplateLimits`` (docs/limits.md)."""

from __future__ import annotations

from google.rpc import code_pb2, status_pb2

from render.templates import LIMIT_SETTINGS, TemplateError, TemplateLimits
from sendtime_common.errors import FieldViolation, bad_request_status, error_info_status


def template_error_status(exc: TemplateError, limits: TemplateLimits, field_prefix: str) -> status_pb2.Status:
    """The status for ``exc``; ``field_prefix`` names the template in the request (``template``,
    ``content``)."""
    if exc.limit is None:
        return bad_request_status(
            "the template cannot be rendered with this data",
            [FieldViolation(f"{field_prefix}.{exc.part}", exc.detail)],
        )
    setting = LIMIT_SETTINGS[exc.limit]
    value = getattr(limits, exc.limit)
    shown = f"{value * 1000:g} ms" if exc.limit == "render_time_s" else str(value)
    return error_info_status(
        code_pb2.RESOURCE_EXHAUSTED,
        f"{field_prefix}.{exc.part} went past the limit {exc.limit} ({shown}, {setting}): {exc.detail}",
        "TEMPLATE_LIMIT_EXCEEDED",
        {"limit": exc.limit, "value": shown, "setting": setting, "part": exc.part},
    )
