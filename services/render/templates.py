"""Compiling Liquid templates: one environment for every render, compiled templates cached.

The HTML part is autoescaped (profile data is untrusted input from many sources); subject and
text are plain text and are not. Unknown filters are found when the template is compiled, not
half-way through a send.

Templates come from callers, so what one may cost is bounded (``TemplateLimits``, docs/limits.md):
its source size when it is compiled; and when it renders, python-liquid's limits (loop
iterations, counting nested loops multiplied, output size, context depth, the size of local
variables) and a time budget per render, checked as every node renders (a loop's body each
time round included).
A render runs on the event loop, so the budget (40 ms) also bounds how long one render can hold
the replica's other calls, health checks included. The budget counts the time the render
itself works: not time the process was descheduled or collecting garbage (a full collection
can take longer than the budget), which would fail a harmless template at random.
"""

from __future__ import annotations

import functools
import gc
import time
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
from liquid.exceptions import (
    ContextDepthError,
    LiquidError,
    LocalNamespaceLimitError,
    LoopIterationLimitError,
    OutputStreamLimitError,
    ResourceLimitError,
)
from liquid.filter import with_context
from liquid.output import LimitedStringIO

PARTS = ("subject", "html", "text")
MONEY_LOCALE = "en_US"
_MONEY_LOCALE = Locale.parse(MONEY_LOCALE)  # parsed once: a third of a format_currency call


@dataclass(frozen=True, slots=True)
class TemplateLimits:
    """What one template may cost; each is a setting of the render service (docs/limits.md)."""

    max_source_bytes: int = 100_000  # per part, UTF-8
    loop_iterations: int = 10_000  # per render of a part; nested loops multiply
    output_bytes: int = 512_000  # per part
    context_depth: int = 30  # nested includes and renders
    local_namespace_bytes: int = 256_000  # what {% assign %} and {% capture %} may hold
    render_time_s: float = 0.04  # per render, the three parts together


# The setting (environment variable) of each limit.
LIMIT_SETTINGS = {
    "max_source_bytes": "RENDER_TEMPLATE_MAX_SOURCE_BYTES",
    "loop_iterations": "RENDER_TEMPLATE_LOOP_ITERATIONS",
    "output_bytes": "RENDER_TEMPLATE_OUTPUT_BYTES",
    "context_depth": "RENDER_TEMPLATE_CONTEXT_DEPTH",
    "local_namespace_bytes": "RENDER_TEMPLATE_LOCAL_BYTES",
    "render_time_s": "RENDER_TEMPLATE_RENDER_MS",
}

# The limit each python-liquid error stands for, by its name in TemplateLimits.
_LIMIT_NAMES: dict[type[LiquidError], str] = {
    LoopIterationLimitError: "loop_iterations",
    OutputStreamLimitError: "output_bytes",
    ContextDepthError: "context_depth",
    LocalNamespaceLimitError: "local_namespace_bytes",
}


class RenderTimeLimitError(ResourceLimitError):
    """The render took longer than its time budget."""


@dataclass(eq=False)  # not frozen: raising sets __traceback__ and friends on it
class TemplateError(Exception):
    """A template part that cannot be compiled or rendered, with the 1-based position where
    Liquid knows it (it does not for some errors at the end of the source, e.g. a missing
    ``endif``). ``limit`` names the TemplateLimits field it went past, if that is why."""

    part: str
    line: int | None
    column: int | None
    reason: str
    limit: str | None = None

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


def _environment(*, autoescape: bool, limits: TemplateLimits) -> Environment:
    environment = Environment(autoescape=autoescape)
    # python-liquid reads these from the environment (class defaults: no limits).
    environment.loop_iteration_limit = limits.loop_iterations  # type: ignore[misc]
    environment.output_stream_limit = limits.output_bytes  # type: ignore[misc]
    environment.context_depth_limit = limits.context_depth  # type: ignore[misc]
    environment.local_namespace_limit = limits.local_namespace_bytes  # type: ignore[misc]
    environment.add_filter("money", money)
    environment.add_filter("local_date", local_date)
    return environment


class TemplateCompiler:
    """Compiles (subject, html, text) sources, keeping the last ``cache_size`` compiled."""

    def __init__(self, cache_size: int, limits: TemplateLimits = TemplateLimits()) -> None:
        self.limits = limits
        self._html_environment = _environment(autoescape=True, limits=limits)
        self._text_environment = _environment(autoescape=False, limits=limits)
        self._compile_cached = functools.lru_cache(maxsize=cache_size)(self._compile)

    def compile(self, subject: str, html: str, text: str) -> CompiledTemplate:
        """The compiled template; the same sources are compiled once.

        Raises:
            InvalidTemplate: parts are too large, have a syntax error or use an unknown filter
                (every such part is reported, not only the first).
        """
        too_large = [
            TemplateError(
                part,
                None,
                None,
                f"is {size} bytes; at most {self.limits.max_source_bytes} (RENDER_TEMPLATE_MAX_SOURCE_BYTES)",
                limit="max_source_bytes",
            )
            for part, source in zip(PARTS, (subject, html, text), strict=True)
            if (size := len(source.encode())) > self.limits.max_source_bytes
        ]
        if too_large:
            raise InvalidTemplate(too_large)
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


class _GarbageCollections:
    """How long the process has spent collecting garbage (``gc.callbacks``, perf_counter)."""

    __slots__ = ("seconds", "_started")

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started


_GARBAGE_COLLECTIONS = _GarbageCollections()
gc.callbacks.append(_GARBAGE_COLLECTIONS)


class RenderClock:
    """One render's time budget (the three parts together), spent only while the render works.

    The check on the hot path compares ``time.monotonic()`` with ``deadline`` (~45 ns). Only
    when that passes does the clock ask what the render really used: this thread's CPU time
    (a syscall, ~0.6 µs), less the garbage collections meanwhile. Under budget, the deadline
    moves out by what is left.
    """

    __slots__ = ("budget_s", "deadline", "_cpu_started", "_collections_started")

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.deadline = time.monotonic() + budget_s
        self._cpu_started = time.thread_time()
        self._collections_started = _GARBAGE_COLLECTIONS.seconds

    @classmethod
    def unlimited(cls) -> RenderClock:
        return cls(float("inf"))

    def used_s(self) -> float:
        """The time this render has worked so far."""
        collecting = _GARBAGE_COLLECTIONS.seconds - self._collections_started
        return time.thread_time() - self._cpu_started - collecting

    def check(self) -> None:
        """Raises RenderTimeLimitError once the render has used its budget."""
        now = time.monotonic()
        if now <= self.deadline:
            return
        left = self.budget_s - self.used_s()
        if left <= 0:
            raise RenderTimeLimitError("render time limit reached", token=None)
        self.deadline = now + left


class _ClockedTags:
    """Stands in a render context's ``disabled_tags``, which python-liquid tests for truth before
    rendering every node: so every node (a loop's body each time round included) looks at the
    clock, every 16th time, at the cost of a counter. It holds the tags a ``render`` tag
    disables, and answers ``in`` for them as the list would."""

    __slots__ = ("clock", "tags", "_count")

    def __init__(self, clock: RenderClock, tags: list[str] | None = None) -> None:
        self.clock = clock
        self.tags = list(tags or ())
        self._count = 0

    def __bool__(self) -> bool:
        self._count += 1
        if not self._count & 15 and time.monotonic() > self.clock.deadline:
            self.clock.check()
        return bool(self.tags)

    def __contains__(self, tag: object) -> bool:
        return tag in self.tags

    def __iter__(self) -> Any:
        return iter(self.tags)


class _TimedContext(RenderContext):
    """A render context that ends the render when its clock runs out (see ``_ClockedTags``;
    loop starts and assignments look at the clock too)."""

    clock = RenderClock.unlimited()

    def start_clock(self, clock: RenderClock) -> None:
        self.clock = clock
        self.disabled_tags = _ClockedTags(clock, self.disabled_tags)  # type: ignore[assignment]

    def raise_for_loop_limit(self, length: int = 1) -> None:
        self.clock.check()
        super().raise_for_loop_limit(length)

    def assign(self, key: str, val: Any) -> None:
        self.clock.check()
        super().assign(key, val)

    def copy(self, *args: Any, **kwargs: Any) -> RenderContext:
        child = super().copy(*args, **kwargs)
        if isinstance(child, _TimedContext):
            child.start_clock(self.clock)
        return child


def render_part(
    template: BoundTemplate, part: str, context: Mapping[str, Any], clock: RenderClock | None = None
) -> str:
    """Render one part, ending it when ``clock`` runs out (the render service passes one
    ``RenderClock(limits.render_time_s)`` for the three parts; none: no time limit).

    Raises:
        TemplateError: the template failed on this data (a filter given the wrong type, say), or
            went past a limit (its ``limit`` says which).
    """
    render_context = _TimedContext(template, globals=template.make_globals(dict(context)))
    render_context.start_clock(clock or RenderClock.unlimited())
    buffer = LimitedStringIO(limit=template.env.output_stream_limit or 2**62)
    try:
        template.render_with_context(render_context, buffer)
    except LiquidError as exc:
        raise _template_error(part, exc) from None
    return buffer.getvalue()


def _template_error(part: str, exc: LiquidError) -> TemplateError:
    limit = "render_time_s" if isinstance(exc, RenderTimeLimitError) else _LIMIT_NAMES.get(type(exc))
    position = exc.context()
    if position is None:
        return TemplateError(part, None, None, str(exc.message), limit)
    return TemplateError(part, position[0], position[1] + 1, str(exc.message), limit)
