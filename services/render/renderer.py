"""One render: the profile (live, cached or last known good) within the time left, suppression and
required data, recommendations when the template uses them, then Liquid — with the fallbacks and
degradations said in the answer.

The deadline is split: the profile lookup gets the time left minus a reserve, so there is
always time to render the fallback; recommendations get what is left of it after the profile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

from google.protobuf import duration_pb2
from opentelemetry import trace

from render.context import deep_merge, fallback_paths_used, message_to_context, render_context, struct_to_dict
from render.profiles import Failure, ProfileFetcher, ProfileLookup, Source
from render.suppression import Skip, missing_required, suppression
from render.templates import CompiledTemplate, RenderClock, TemplateCompiler, TemplateLimits, render_part
from sendtime.profile.v1 import profile_pb2
from sendtime.render.v1 import render_pb2
from sendtime_common.deadlines import wait_at_most

log = logging.getLogger(__name__)

# The fallback's share of a short deadline, and the least kept back whatever the deadline.
RESERVE_SHARE = 0.1
MIN_FALLBACK_RESERVE_S = 0.02


def fallback_reserve(configured_s: float, time_left_s: float) -> float:
    """What is kept back from ``time_left_s`` to render the fallback: ``configured_s``, or a
    tenth of the time left when that is less (a short deadline keeps most of itself for the
    live profile), but never under ``MIN_FALLBACK_RESERVE_S`` (unless configured lower)."""
    return min(configured_s, max(MIN_FALLBACK_RESERVE_S, RESERVE_SHARE * time_left_s))


tracer = trace.get_tracer(__name__)

FALLBACK_REASONS = {
    Failure.NOT_FOUND: render_pb2.FALLBACK_REASON_PROFILE_NOT_FOUND,
    Failure.TIMEOUT: render_pb2.FALLBACK_REASON_PROFILE_TIMEOUT,
    Failure.UNAVAILABLE: render_pb2.FALLBACK_REASON_PROFILE_UNAVAILABLE,
    Failure.CIRCUIT_OPEN: render_pb2.FALLBACK_REASON_CIRCUIT_OPEN,
}
PROFILE_SOURCES = {
    Source.LIVE: render_pb2.PROFILE_SOURCE_LIVE,
    Source.CACHE: render_pb2.PROFILE_SOURCE_CACHE,
    Source.LAST_KNOWN_GOOD: render_pb2.PROFILE_SOURCE_LAST_KNOWN_GOOD,
    Source.NONE: render_pb2.PROFILE_SOURCE_NONE,
}
DEGRADING = frozenset({Failure.TIMEOUT, Failure.UNAVAILABLE, Failure.CIRCUIT_OPEN})


class Recommender(Protocol):
    async def recommend(
        self, profile: profile_pb2.Profile | None, purchased_skus: Sequence[str], limit: int
    ) -> list[dict[str, Any]]: ...


@dataclass(frozen=True, slots=True)
class RenderJob:
    customer: profile_pb2.Identifier
    content: render_pb2.Template
    compiled: CompiledTemplate
    variables: Mapping[str, Any] = field(default_factory=dict)
    template_version: int = 0
    apply_suppression: bool = True  # previews show what would render, whoever the customer is
    # content.fallback as a dict, converted once per request (a batch shares it)
    fallback: Mapping[str, Any] = field(default_factory=dict)


class Renderer:
    def __init__(
        self,
        compiler: TemplateCompiler,
        profiles: ProfileFetcher,
        recommender: Recommender | None = None,
        *,
        fallback_reserve_s: float,
        recommendation_limit: int = 8,
    ) -> None:
        self._compiler = compiler
        self._profiles = profiles
        self._recommender = recommender
        self._fallback_reserve_s = fallback_reserve_s
        self._recommendation_limit = recommendation_limit

    def _reserve(self, time_left_s: float) -> float:
        return fallback_reserve(self._fallback_reserve_s, time_left_s)

    def compile(self, subject: str, html: str, text: str) -> CompiledTemplate:
        """The compiled template (cached by source).

        Raises:
            render.templates.InvalidTemplate: a part does not compile.
        """
        return self._compiler.compile(subject, html, text)

    @property
    def limits(self) -> TemplateLimits:
        """What one template may cost (the compiler's)."""
        return self._compiler.limits

    async def lookup_many(
        self, customers: list[profile_pb2.Identifier], time_left_s: float
    ) -> list[ProfileLookup]:
        """Profiles for a batch of customers in one call (RenderBatch)."""
        return await self._profiles.get_many(customers, time_left_s=time_left_s - self._reserve(time_left_s))

    async def render(
        self, job: RenderJob, time_left_s: float, *, lookup: ProfileLookup | None = None
    ) -> render_pb2.RenderResponse:
        """Render ``job`` within ``time_left_s``: RENDERED, or SKIPPED with the reason. A batch
        passes the ``lookup`` it made for many customers at once.

        Raises:
            render.templates.TemplateError: the template fails on this data.
        """
        started = time.monotonic()
        if lookup is None:
            max_age = job.content.max_data_age.ToTimedelta() if job.content.HasField("max_data_age") else None
            lookup = await self._profiles.get(
                job.customer, time_left_s=time_left_s - self._reserve(time_left_s), max_age=max_age
            )
        if lookup.failure is Failure.ERASED:
            return _skipped(job, Skip(render_pb2.SKIP_REASON_ERASED, "the customer was erased"))
        if lookup.profile is not None and job.apply_suppression:
            skip = suppression(lookup.profile, job.content.channel)
            if skip is not None:
                return _skipped(job, skip, lookup)
        time_left_s -= time.monotonic() - started
        recommendations, recommendations_failed = await self._recommendations(job, lookup, time_left_s)
        return self._render(job, lookup, recommendations, recommendations_failed)

    async def preview(
        self,
        content: render_pb2.Template,
        customer: profile_pb2.Identifier | None,
        sample_data: dict[str, Any] | None,
        variables: dict[str, Any],
        template_version: int,
        time_left_s: float,
    ) -> render_pb2.RenderResponse:
        """A preview (TemplateService): like a send, for a customer or for sample data, but
        without the suppression rules.

        Raises:
            render.templates.InvalidTemplate, render.templates.TemplateError: the template fails.
        """
        compiled = self.compile(content.subject, content.html, content.text)
        job = RenderJob(
            customer or profile_pb2.Identifier(),
            content,
            compiled,
            variables,
            template_version,
            apply_suppression=False,
            fallback=struct_to_dict(content.fallback),
        )
        if customer is None:
            return await self.render_sample(job, sample_data or {})
        return await self.render(job, time_left_s)

    async def render_sample(self, job: RenderJob, sample: Mapping[str, Any]) -> render_pb2.RenderResponse:
        """Render ``job`` with sample data (a preview): ``sample`` is shaped like the context."""
        context = deep_merge(render_context(job.fallback, None, job.variables), sample)  # as sends merge
        return self._finish(job, context, ProfileLookup(None, Source.NONE), [], False)

    async def _recommendations(
        self, job: RenderJob, lookup: ProfileLookup, time_left_s: float
    ) -> tuple[list[dict[str, Any]], bool]:
        if "recommendations" not in job.compiled.roots or self._recommender is None:
            return [], False
        budget = time_left_s - self._reserve(time_left_s)
        if budget <= 0:
            return [], True
        purchased = list(lookup.profile.purchased_skus) if lookup.profile else []
        try:
            # Not asyncio.wait_for: it waits for the cancelled query, as long as PostgreSQL stalls.
            found = await wait_at_most(
                self._recommender.recommend(lookup.profile, purchased, self._recommendation_limit), budget
            )
        except Exception as exc:  # noqa: BLE001 - recommendations are optional content (timeouts included)
            log.warning("recommendations unavailable", extra={"error": type(exc).__name__})
            return [], True
        return found, False

    def _render(
        self,
        job: RenderJob,
        lookup: ProfileLookup,
        recommendations: list[dict[str, Any]],
        recommendations_failed: bool,
    ) -> render_pb2.RenderResponse:
        with tracer.start_as_current_span("render.template") as span:
            span.set_attribute("render.profile_source", lookup.source.value)
            profile = message_to_context(lookup.profile) if lookup.profile is not None else None
            context = render_context(job.fallback, profile, job.variables)
            context["recommendations"] = recommendations
            used = fallback_paths_used(job.fallback, {"profile": profile or {}, "vars": job.variables})
            if recommendations_failed:
                used.append("recommendations")
            return self._finish(job, context, lookup, used, recommendations_failed)

    def _finish(
        self,
        job: RenderJob,
        context: Mapping[str, Any],
        lookup: ProfileLookup,
        fallbacks_used: list[str],
        degraded_extra: bool,
    ) -> render_pb2.RenderResponse:
        skip = missing_required(context, job.content.required_data)
        if skip is not None:
            return _skipped(job, skip, lookup)
        response = _base(job, lookup)
        response.status = render_pb2.RENDER_STATUS_RENDERED
        clock = RenderClock(self._compiler.limits.render_time_s)  # the three parts together
        response.subject = render_part(job.compiled.subject, "subject", context, clock).strip()
        response.html = render_part(job.compiled.html, "html", context, clock)
        response.text = render_part(job.compiled.text, "text", context, clock)
        response.fallbacks_used.extend(fallbacks_used)
        response.degraded = response.degraded or degraded_extra
        return response


def _base(job: RenderJob, lookup: ProfileLookup) -> render_pb2.RenderResponse:
    response = render_pb2.RenderResponse(
        template_version=job.template_version,
        profile_source=PROFILE_SOURCES[lookup.source],
        fallback_used=lookup.source in (Source.LAST_KNOWN_GOOD, Source.NONE),
        degraded=lookup.failure in DEGRADING,
    )
    if lookup.failure in FALLBACK_REASONS:
        response.fallback_reason = FALLBACK_REASONS[lookup.failure]
    elif job.content.HasField("max_data_age") and not response.degraded:
        # As long as the data may be old anyway; a render from fallbacks is not to be reused.
        response.max_age.CopyFrom(job.content.max_data_age)
    if lookup.profile is not None:
        response.profile_version = lookup.profile.version
        if lookup.profile.HasField("update_time"):
            age = max(0.0, time.time() - lookup.profile.update_time.ToNanoseconds() / 1e9)
            response.data_age.CopyFrom(_duration(age))
    return response


def _skipped(job: RenderJob, skip: Skip, lookup: ProfileLookup | None = None) -> render_pb2.RenderResponse:
    response = _base(job, lookup or ProfileLookup(None, Source.NONE))
    response.status = render_pb2.RENDER_STATUS_SKIPPED
    response.skip_reason = skip.reason  # type: ignore[assignment]
    response.skip_detail = skip.detail
    return response


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(timedelta(seconds=seconds))
    return duration
