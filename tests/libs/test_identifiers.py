"""Identity strings: normalization, hidden characters and mixed scripts (Unicode TR 39)."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime_common.errors import FieldViolation, field_violations, status_of
from sendtime_common.identifiers import (
    MAX_IDENTIFIER_LENGTH,
    TRIMMED,
    IdentifierKind,
    InvalidIdentifier,
    highly_restrictive,
    normalize_identifier,
)
from tests.factories import NOW, event, identify

MIXED = (
    "must not mix scripts (Unicode TR 39, Highly Restrictive: one script, or Latin with Han and "
    "kana, Han and Bopomofo, or Han and Hangul)"
)
HIDDEN_CHARACTERS = [
    "\u0000",  # NUL
    "\t",
    "\u007f",  # DEL
    "\u00a0",  # no-break space
    "\u00ad",  # soft hyphen
    "\u034f",  # combining grapheme joiner
    "\u061c",  # Arabic letter mark
    "\u200b",  # zero-width space
    "\u200c",  # zero-width non-joiner
    "\u200d",  # zero-width joiner
    "\u200e",  # left-to-right mark
    "\u202e",  # right-to-left override
    "\u2028",  # line separator
    "\u2066",  # left-to-right isolate
    "\u3000",  # ideographic space
    "\u3164",  # Hangul filler
    "\ufe0f",  # variation selector 16
    "\ufeff",  # byte-order mark
    "\ue000",  # private use
    "\U000e0041",  # tag latin capital A
]


@pytest.mark.parametrize("hidden", HIDDEN_CHARACTERS, ids=lambda c: f"U+{ord(c):04X}")
@pytest.mark.parametrize("kind", [IdentifierKind.USER_ID, IdentifierKind.EMAIL])
def test_an_identifier_holding_a_hidden_character_is_refused_naming_the_code_point(
    kind: IdentifierKind, hidden: str
) -> None:
    value = f"bo{hidden}b" if kind is IdentifierKind.USER_ID else f"bo{hidden}b@example.com"
    with pytest.raises(InvalidIdentifier) as refused:
        normalize_identifier(kind, value)
    assert str(refused.value) == f"must not hold invisible, control or bidi characters (U+{ord(hidden):04X})"


# No deadline: one example stalled by a loaded machine (or a GC of the apps this process hosts)
# must not fail the property, which is about the answer, not the speed.
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.text(st.characters(codec="utf-8", exclude_categories=["C", "Z"]), min_size=1, max_size=20),
    hidden=st.sampled_from(HIDDEN_CHARACTERS),
    at=st.integers(min_value=0, max_value=20),
)
def test_an_invisible_character_never_makes_one_identifier_of_two(text: str, hidden: str, at: int) -> None:
    """Refused, not stripped: ``bob`` and ``bo<ZWSP>b`` never become one customer. (ASCII spaces,
    tabs and line breaks around a value are trimmed: there, and only there, they do not count.)"""
    trimmed_at_the_ends = hidden in TRIMMED
    text = text * 2 if trimmed_at_the_ends and len(text) == 1 else text
    position = min(max(at, 1), len(text) - 1) if trimmed_at_the_ends else min(at, len(text))
    with pytest.raises(InvalidIdentifier):
        normalize_identifier(IdentifierKind.USER_ID, text[:position] + hidden + text[position:])


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # as above
@given(st.text(max_size=300))
@example("e\u0301")
@example("\ud800")
@example("a" * (MAX_IDENTIFIER_LENGTH + 1))
def test_any_text_is_normalized_once_and_for_all_or_refused_with_a_reason(value: str) -> None:
    for kind in IdentifierKind:
        try:
            normalized = normalize_identifier(kind, value)
        except InvalidIdentifier as exc:
            assert str(exc)
            continue
        assert normalize_identifier(kind, normalized) == normalized  # idempotent


def test_canonically_equivalent_spellings_are_one_identifier() -> None:
    composed, decomposed = "Ren\u00e9e", "Rene\u0301e"
    assert normalize_identifier(IdentifierKind.USER_ID, decomposed) == composed
    assert normalize_identifier(IdentifierKind.EMAIL, f"{decomposed}@Example.com") == "ren\u00e9e@example.com"


@pytest.mark.parametrize(
    "value",
    [
        "paypal",
        "раура",  # all Cyrillic: a whole-script confusable, accepted (a different person)
        "αβγ-123",
        "山田taro",  # Latin + Han
        "山田たろう-1",  # Han + Hiragana
        "김철수kim",  # Hangul + Latin
        "ㄅㄆ中文abc",  # Bopomofo + Han + Latin
        "John Smith",
    ],
)
def test_single_scripts_and_the_mixes_tr39_allows_are_accepted(value: str) -> None:
    assert highly_restrictive(value)
    assert normalize_identifier(IdentifierKind.USER_ID, value) == value


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        (IdentifierKind.USER_ID, "p\u0430ypal"),  # Cyrillic а among Latin
        (IdentifierKind.USER_ID, "\u0391dmin"),  # Greek Alpha
        (IdentifierKind.USER_ID, "김たろう"),  # Hangul + Hiragana
        (IdentifierKind.EMAIL, "p\u0430ypal@example.com"),
        (IdentifierKind.EMAIL, "ada@ex\u0430mple.com"),
    ],
)
def test_a_mix_of_scripts_tr39_does_not_allow_is_refused(kind: IdentifierKind, value: str) -> None:
    with pytest.raises(InvalidIdentifier, match="must not mix scripts"):
        normalize_identifier(kind, value)


def test_an_email_is_checked_by_part_so_a_latin_mailbox_at_a_cyrillic_domain_is_fine() -> None:
    assert normalize_identifier(IdentifierKind.EMAIL, "Ivan@ПРИМЕР.рф") == "ivan@пример.рф"


def test_ingest_refuses_the_event_with_a_field_violation() -> None:
    from ingest.validation import ValidationRules, validate_event

    bad = event(user_id="bo\u200bb", email="p\u0430ypal@example.com", occurred_at=NOW, identify=identify(a=1))
    assert {v.field: v.description for v in validate_event(bad, NOW, ValidationRules())} == {
        "customer.user_id": "must not hold invisible, control or bidi characters (U+200B)",
        "customer.email": MIXED,
    }


async def test_the_services_answer_a_hidden_character_with_invalid_argument(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
) -> None:
    spoofed = event(user_id="\u202eadmin", occurred_at=NOW, identify=identify(a=1))
    (result,) = (await ingest_stub.SendEvents(ingest_pb2.SendEventsRequest(events=[spoofed]))).results
    assert result.outcome == ingest_pb2.EVENT_OUTCOME_REJECTED
    assert field_violations(result.status) == [
        FieldViolation("customer.user_id", "must not hold invisible, control or bidi characters (U+202E)")
    ]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await profile_stub.GetProfile(
            profile_pb2.GetProfileRequest(
                identifier=profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_USER_ID, value="bo\u200bb")
            )
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = status_of(refused.value)
    assert status is not None
    assert field_violations(status) == [
        FieldViolation("identifier.value", "must not hold invisible, control or bidi characters (U+200B)")
    ]
