"""The per-item JSON answer of ingest's HTTP collection routes (provider webhooks, Segment calls):
one entry per event with its outcome, counts by outcome, and, while anything must be retried,
how long to wait. Both kinds of sender retry a whole request, so an answer says item by item
what happened and is 503 only while a retry can change something.

Logs carry indexes, event ids and field paths, never a value that was sent.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from google.rpc import error_details_pb2

from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.errors import details_of, field_violations

log = logging.getLogger(__name__)

DEFAULT_RETRY_AFTER_S = 1
# The outcomes an answer counts, in the order it lists them ("retry" only when present).
COUNTED_OUTCOMES = ("accepted", "duplicate", "rejected", "conflict", "quarantined", "ignored")

_OUTCOME_NAMES = {
    ingest_pb2.EVENT_OUTCOME_ACCEPTED: "accepted",
    ingest_pb2.EVENT_OUTCOME_DUPLICATE: "duplicate",
    ingest_pb2.EVENT_OUTCOME_REJECTED: "rejected",
    # The event id was stored with another payload (an order edited under the id of its first
    # delivery): kept for review in the dead-letter store; retrying cannot change it.
    ingest_pb2.EVENT_OUTCOME_CONFLICT: "conflict",
    ingest_pb2.EVENT_OUTCOME_RETRY: "retry",
}


def event_answer(index: int, result: ingest_pb2.EventResult, about: Mapping[str, object]) -> dict[str, Any]:
    """The answer entry of the event at ``index`` of the request, from ingest's result;
    ``about`` (the route, the provider) goes into the log line of a rejected event."""
    answer: dict[str, Any] = {
        "index": index,
        "outcome": _OUTCOME_NAMES.get(result.outcome, "retry"),
        "event_id": result.event_id,
    }
    if result.outcome == ingest_pb2.EVENT_OUTCOME_REJECTED:
        violations = field_violations(result.status)
        # The field paths only in the log: a violation's description could quote what was sent.
        log.warning(
            "event rejected",
            extra={
                **about,
                "index": index,
                "event_id": result.event_id,
                "fields": sorted({v.field for v in violations}),
            },
        )
        answer["reason"] = "EVENT_INVALID"
        answer["violations"] = [{"field": v.field, "description": v.description} for v in violations]
    elif result.outcome == ingest_pb2.EVENT_OUTCOME_CONFLICT:
        answer["reason"] = "IDEMPOTENCY_CONFLICT"
    return answer


def outcome_counts(answers: Iterable[Mapping[str, Any]]) -> tuple[dict[str, int], int]:
    """How many entries have each counted outcome, and how many must be retried."""
    tally = Counter(answer["outcome"] for answer in answers)
    return {name: tally[name] for name in COUNTED_OUTCOMES}, tally["retry"]


def retry_info(results: Iterable[ingest_pb2.EventResult]) -> tuple[int, str]:
    """The longest RetryInfo delay among the results, in whole seconds (at least 1), and the
    ErrorInfo reason of the first result that has one."""
    longest = 0.0
    reason = ""
    for result in results:
        for info in details_of(result.status, error_details_pb2.RetryInfo):
            longest = max(longest, info.retry_delay.ToTimedelta().total_seconds())
        if not reason:
            reason = next((i.reason for i in details_of(result.status, error_details_pb2.ErrorInfo)), "")
    return max(DEFAULT_RETRY_AFTER_S, math.ceil(longest)), reason or "RETRY_LATER"
