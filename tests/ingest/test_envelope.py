"""Stamping an event's envelope: derived ids, clock-skew correction, business keys, the hashes
of the identifiers it names."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from ingest.envelope import business_key, derive_event_id, event_type, stamp
from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.event_integrity import identifier_hashes
from sendtime_common.identifiers import IdentifierHasher, IdentifierKind
from tests.factories import NOW, event, identify, order_completed, timestamp

HASHER = IdentifierHasher([b"k" * 32])


def test_a_derived_id_is_deterministic_and_depends_on_the_fact() -> None:
    a = event(event_id="", user_id="u", occurred_at=NOW, identify=identify(first_name="Ada"))
    same = event(event_id="", user_id="u ", occurred_at=NOW, identify=identify(first_name="Ada"))
    other_time = event(
        event_id="", user_id="u", occurred_at=NOW + timedelta(seconds=1), identify=identify(first_name="Ada")
    )
    other_value = event(event_id="", user_id="u", occurred_at=NOW, identify=identify(first_name="Bea"))
    assert derive_event_id(a) == derive_event_id(same)  # identifiers compare normalized
    assert derive_event_id(a).startswith("auto-") and len(derive_event_id(a)) == 45
    assert len({derive_event_id(e) for e in (a, other_time, other_value)}) == 3


def test_stamp_keeps_a_given_id_and_fills_a_missing_one() -> None:
    given = stamp(event(event_id="evt-1", user_id="u", occurred_at=NOW, identify=identify(a=1)), NOW)
    missing = event(event_id="", user_id="u", occurred_at=NOW, identify=identify(a=1))
    assert given.event_id == "evt-1"
    assert stamp(missing, NOW).event_id == derive_event_id(missing)


def test_skew_is_corrected_from_sent_at_and_both_times_kept() -> None:
    # The sender's clock is two hours fast: it says the event happened at 14:00 and was sent at
    # 14:00:05; ingest received it at 12:00:06 by its own clock.
    sender_now = NOW + timedelta(hours=2)
    e = event(user_id="u", occurred_at=sender_now, identify=identify(a=1))
    e.sent_at.CopyFrom(timestamp(sender_now + timedelta(seconds=5)))
    stamped = stamp(e, NOW + timedelta(seconds=6))
    assert stamped.occurred_at.ToDatetime() == (NOW + timedelta(seconds=1)).replace(tzinfo=None)
    assert stamped.original_occurred_at == e.occurred_at
    assert stamped.received_at.ToDatetime() == (NOW + timedelta(seconds=6)).replace(tzinfo=None)


def test_without_sent_at_occurred_at_is_kept() -> None:
    e = event(user_id="u", occurred_at=NOW, identify=identify(a=1))
    stamped = stamp(e, NOW + timedelta(seconds=3))
    assert stamped.occurred_at == e.occurred_at == stamped.original_occurred_at


def test_caller_supplied_output_fields_are_overwritten() -> None:
    e = event(user_id="u", occurred_at=NOW, identify=identify(a=1))
    e.original_occurred_at.CopyFrom(timestamp(NOW - timedelta(days=9)))
    e.received_at.CopyFrom(timestamp(NOW - timedelta(days=9)))
    stamped = stamp(e, NOW)
    assert stamped.original_occurred_at == e.occurred_at
    assert stamped.received_at == timestamp(NOW)


def test_business_keys_of_orders_cancellations_and_refunds() -> None:
    def of(**payload: Any) -> tuple[str, str] | None:
        return business_key(event(user_id="u", occurred_at=NOW, **payload))

    assert of(order_completed=order_completed("1001", "5.00")) == ("order_completed", "1001")
    assert of(order_cancelled=ingest_pb2.OrderCancelled(order_id="1001")) == ("order_cancelled", "1001")
    refund = ingest_pb2.OrderRefunded(order_id="1001", refund_id="r-7")
    assert of(order_refunded=refund) == ("order_refunded", "r-7")
    assert of(identify=identify(a=1)) is None


def test_custom_events_are_typed_by_name() -> None:
    e = event(user_id="u", occurred_at=NOW, custom=ingest_pb2.CustomEvent(name="quiz_completed"))
    assert event_type(e) == "custom.quiz_completed"


def test_a_dead_letter_is_found_by_the_hashes_of_the_identifiers_it_names() -> None:
    alias = ingest_pb2.Alias(other=ingest_pb2.CustomerIdentifiers(anonymous_id="anon-7"))
    linked = event(user_id="u-1", email="Ada@Example.com", alias=alias)
    assert identifier_hashes(linked, HASHER) == (
        HASHER.hash((IdentifierKind.USER_ID, "u-1")),
        HASHER.hash((IdentifierKind.EMAIL, "ada@example.com")),  # normalized, as profile names it
        HASHER.hash((IdentifierKind.ANONYMOUS_ID, "anon-7")),
    )
    # A value that does not normalize (often why the event was rejected) is hashed as sent.
    broken = event(email="not an email", identify=identify(a=1))
    assert identifier_hashes(broken, HASHER) == (HASHER.hash((IdentifierKind.EMAIL, "not an email")),)
