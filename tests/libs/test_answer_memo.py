"""Encoded answers kept by what they hold (sendtime_common.answer_memo): bounded in number and
age, keyed by content (a version, a read mask, a field computed at read time each make another
entry), and forgotten by owner (an erasure)."""

from __future__ import annotations

from collections.abc import Sequence

import orjson
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from sendtime.profile.v1 import profile_pb2
from sendtime_common.answer_memo import AnswerMemo, EncodedAnswer


def answer(
    customer_id: str = "c-1",
    version: int = 1,
    *,
    cart: profile_pb2.Cart | None = None,
    identifiers: Sequence[profile_pb2.Identifier] = (),
) -> profile_pb2.GetProfileResponse:
    profile = profile_pb2.Profile(
        name=f"profiles/{customer_id}",
        customer_id=customer_id,
        version=version,
        cart=cart,
        identifiers=identifiers,
    )
    profile.traits.update({"first_name": "Ada"})
    return profile_pb2.GetProfileResponse(profile=profile)


def owner(message: Message) -> str:
    assert isinstance(message, profile_pb2.GetProfileResponse)
    return message.profile.customer_id


class Encoder:
    """Counts the encodings the memo asks for."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, message: Message) -> EncodedAnswer:
        self.calls += 1
        return EncodedAnswer(orjson.dumps(json_format.MessageToDict(message)), f'"{self.calls}"')


def memo(max_entries: int = 10, ttl_s: float = 60, clock: list[float] | None = None) -> AnswerMemo:
    now = clock if clock is not None else [0.0]
    return AnswerMemo(max_entries, ttl_s, owner, timer=lambda: now[0])


def test_an_answer_holding_the_same_is_served_from_the_memo_as_it_was_encoded() -> None:
    answers, encode = memo(), Encoder()
    first = answers.encoded(answer(), encode)
    again = answers.encoded(answer(), encode)  # another message, the same content
    assert encode.calls == 1 and again == first
    assert orjson.loads(again.body) == json_format.MessageToDict(answer())


def test_a_new_version_or_anything_else_changed_is_encoded_anew() -> None:
    answers, encode = memo(), Encoder()
    v1 = answers.encoded(answer(version=1), encode)
    v2 = answers.encoded(answer(version=2), encode)
    assert encode.calls == 2 and v1 != v2
    assert orjson.loads(v2.body)["profile"]["version"] == "2"
    # A field computed at read time (an abandoned cart) changes the content, so the entry.
    abandoned = answer(version=2, cart=profile_pb2.Cart(abandoned=True))
    assert orjson.loads(answers.encoded(abandoned, encode).body)["profile"]["cart"] == {"abandoned": True}
    assert encode.calls == 3
    assert answers.encoded(answer(version=1), encode) == v1 and encode.calls == 3  # both kept


def test_answers_through_different_read_masks_are_different_entries() -> None:
    answers, encode = memo(), Encoder()
    full = answer(identifiers=[profile_pb2.Identifier(kind=profile_pb2.IDENTIFIER_KIND_EMAIL, value="a@x")])
    masked = profile_pb2.GetProfileResponse()
    masked.profile.CopyFrom(full.profile)
    masked.profile.ClearField("identifiers")  # what readMask=traits leaves
    assert orjson.loads(answers.encoded(full, encode).body)["profile"]["identifiers"]
    assert "identifiers" not in orjson.loads(answers.encoded(masked, encode).body)["profile"]
    assert encode.calls == 2 and len(answers) == 2


def test_the_memo_is_bounded_and_the_oldest_entry_leaves_first() -> None:
    answers, encode = memo(max_entries=2), Encoder()
    for version in (1, 2, 3):
        answers.encoded(answer(version=version), encode)
    assert len(answers) == 2
    answers.encoded(answer(version=3), encode)
    answers.encoded(answer(version=2), encode)
    assert encode.calls == 3  # 2 and 3 kept
    answers.encoded(answer(version=1), encode)
    assert encode.calls == 4 and len(answers) == 2  # 1 had left, and now 2 has


def test_an_entry_lives_ttl_at_most_and_a_hit_does_not_extend_its_life() -> None:
    clock = [0.0]
    answers, encode = memo(ttl_s=10, clock=clock), Encoder()
    answers.encoded(answer(), encode)
    clock[0] = 9.0
    answers.encoded(answer(), encode)
    assert encode.calls == 1
    clock[0] = 10.0
    answers.encoded(answer(), encode)
    assert encode.calls == 2
    # An expired entry is dropped by whatever call comes next, not kept until it is asked for.
    answers.encoded(answer("c-2"), encode)
    clock[0] = 25.0
    answers.encoded(answer("c-3"), encode)
    assert len(answers) == 1


def test_forgetting_an_owner_drops_every_answer_about_them_and_only_theirs() -> None:
    answers, encode = memo(), Encoder()
    for version in (1, 2):
        answers.encoded(answer("erased", version=version), encode)
    answers.encoded(answer("kept"), encode)
    answers.forget("erased")
    answers.forget("nobody")
    assert len(answers) == 1
    answers.encoded(answer("kept"), encode)
    assert encode.calls == 3
    answers.encoded(answer("erased", version=2), encode)
    assert encode.calls == 4
    answers.clear()
    assert len(answers) == 0


def test_forgetting_after_entries_left_by_age_or_bound_is_harmless() -> None:
    clock = [0.0]
    answers, encode = memo(max_entries=1, ttl_s=5, clock=clock), Encoder()
    answers.encoded(answer("a"), encode)
    answers.encoded(answer("b"), encode)  # a leaves by the bound
    answers.forget("a")
    clock[0] = 6.0
    answers.encoded(answer("c"), encode)  # b leaves by age
    answers.forget("b")
    assert len(answers) == 1


def test_an_answer_without_an_owner_is_encoded_and_not_kept() -> None:
    answers, encode = AnswerMemo(10, 60, owner=lambda message: None), Encoder()
    first = answers.encoded(answer(), encode)
    assert answers.encoded(answer(), encode) == EncodedAnswer(first.body, '"2"')
    assert encode.calls == 2 and len(answers) == 0


def test_a_memo_needs_room() -> None:
    with pytest.raises(ValueError):
        AnswerMemo(0, 60, owner)
