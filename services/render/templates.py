"""Compiling Liquid templates: one environment for every render, compiled templates cached.

The HTML part is autoescaped (profile data is untrusted input from many sources); subject and
text are plain text and are not. Unknown filters are found when the template is compiled, not
half-way through a send.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel import Locale
from babel.numbers import UnknownCurrencyError, format_currency
from liquid import BoundTemplate, Environment
from liquid.context import RenderContext
from liquid.exceptions import LiquidError
from liquid.filter import with_context

PARTS = ("subject", "html", "text")
MONEY_LOCALE = "en_US"
_MONEY_LOCALE = Locale.parse(MONEY_LOCALE)  # parsed once: a third of a format_currency call


@dataclass(frozen=True, slots=True)
class TemplateError(Exception):
    """A template part that cannot be compiled or rendered, with the 1-based position where
    Liquid knows it (it does not for some errors at the end of the source, e.g. a missing
    ``endif``)."""

    part: str
    line: int | None
    column: int | None
    reason: str

    def __str__(self) -> str:
        return f"{self.part}: {self.detail}"

    @property
    def detail(self) -> str:
        """The reason with its position, e.g. ``line 2, column 6: missing expression``."""
        if self.line is None:
            return self.reason
        return f"line {self.line}, column {self.column}: {self.reason}"


class InvalidTemplate(Exception):
    """One or more parts of a template do not compile; ``errors`` has one entry per bad part."""

    def __init__(self, errors: list[TemplateError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class CompiledTemplate:
    subject: BoundTemplate
    html: BoundTemplate
    text: BoundTemplate
    # The top-level names the template reads (e.g. "profile", "recommendations"): a render
    # fetches only the data the template uses.
    roots: frozenset[str] = frozenset()


def money(value: object, currency: object = None) -> str:
    """``{{ profile.cart.total | money }}`` → ``€59.90``; also ``{{ 12.5 | money: "USD" }}``.

    Anything that is not money renders as an empty string rather than failing the send.
    """
    if isinstance(value, Mapping):
        amount, code = value.get("amount"), value.get("currency")
    else:
        amount, code = value, currency
    if amount is None or not isinstance(code, str) or not code:
        return ""
    try:
        return _format_money(str(amount), code)
    except (InvalidOperation, UnknownCurrencyError, ValueError):
        return ""


# babel takes ~20-30 µs a call (a quarter of a cart template's render time), and campaigns
# format the same prices again and again; failures are not cached (lru_cache keeps no raises).
@functools.lru_cache(maxsize=4096)
def _format_money(amount: str, currency: str) -> str:
    return str(format_currency(Decimal(amount), currency, locale=_MONEY_LOCALE))


@with_context
def local_date(value: object, date_format: object = "%Y-%m-%d %H:%M", *, context: RenderContext) -> str:
    """``{{ profile.cart.update_time | local_date: "%d %b, %H:%M" }}``: a time in the customer's
    time zone (``profile.last_seen.timezone``; UTC when unknown). Not a time: empty."""
    if not isinstance(value, datetime):
        return ""
    zone_name = context.get(["profile", "last_seen", "timezone"], token=None, default="")
    try:
        zone = ZoneInfo(zone_name) if isinstance(zone_name, str) and zone_name else UTC
    except (ValueError, ZoneInfoNotFoundError):
        zone = UTC
    return value.astimezone(zone).strftime(str(date_format))


def _environment(*, autoescape: bool) -> Environment:
    environment = Environment(autoescape=autoescape)
    environment.add_filter("money", money)
    environment.add_filter("local_date", local_date)
    return environment


class TemplateCompiler:
    """Compiles (subject, html, text) sources, keeping the last ``cache_size`` compiled."""

    def __init__(self, cache_size: int) -> None:
        self._html_environment = _environment(autoescape=True)
        self._text_environment = _environment(autoescape=False)
        self._compile_cached = functools.lru_cache(maxsize=cache_size)(self._compile)

    def compile(self, subject: str, html: str, text: str) -> CompiledTemplate:
        """The compiled template; the same sources are compiled once.

        Raises:
            InvalidTemplate: parts have a syntax error or use an unknown filter (every such part
                is reported, not only the first).
        """
        return self._compile_cached(subject, html, text)

    def _compile(self, subject: str, html: str, text: str) -> CompiledTemplate:
        parsed: dict[str, BoundTemplate] = {}
        errors: list[TemplateError] = []
        for part, source in zip(PARTS, (subject, html, text), strict=True):
            environment = self._html_environment if part == "html" else self._text_environment
            try:
                parsed[part] = self._parse(environment, part, source)
            except TemplateError as exc:
                errors.append(exc)
        if errors:
            raise InvalidTemplate(errors)
        roots = frozenset(name for template in parsed.values() for name in template.analyze().globals)
        return CompiledTemplate(
            subject=parsed["subject"], html=parsed["html"], text=parsed["text"], roots=roots
        )

    @staticmethod
    def _parse(environment: Environment, part: str, source: str) -> BoundTemplate:
        try:
            template = environment.from_string(source)
        except LiquidError as exc:
            raise _template_error(part, exc) from None
        for name, spans in template.analyze().filters.items():
            if name not in environment.filters:
                line, column = spans[0].line_col(source)
                raise TemplateError(part, line, column + 1, f"unknown filter '{name}'")
        return template


def render_part(template: BoundTemplate, part: str, context: Mapping[str, Any]) -> str:
    """Render one part.

    Raises:
        TemplateError: the template failed on this data (a filter given the wrong type, say).
    """
    try:
        return str(template.render(**context))
    except LiquidError as exc:
        raise _template_error(part, exc) from None


def _template_error(part: str, exc: LiquidError) -> TemplateError:
    position = exc.context()
    if position is None:
        return TemplateError(part, None, None, str(exc.message))
    return TemplateError(part, position[0], position[1] + 1, str(exc.message))
