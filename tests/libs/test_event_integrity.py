"""An event's fingerprint: the same event sent again has the same one, however late and with
whatever sent_at; any change to what the event says gives another; derived ids have none."""

from __future__ import annotations

from datetime import timedelta

from ingest.envelope import derive_event_id, stamp
from sendtime.ingest.v1 import ingest_pb2
from sendtime_common.event_integrity import conflicts, fingerprint
from tests.factories import NOW, event, identify, timestamp


def sent(**traits: object) -> ingest_pb2.Event:
    e = event(
        event_id="evt-1", user_id="u-1", occurred_at=NOW - timedelta(minutes=5), identify=identify(**traits)
    )
    e.sent_at.CopyFrom(timestamp(NOW - timedelta(minutes=1)))
    return e


def test_a_resend_later_with_a_new_sent_at_has_the_same_fingerprint() -> None:
    first = stamp(sent(tier="gold"), NOW)
    resend = sent(tier="gold")
    resend.sent_at.CopyFrom(timestamp(NOW + timedelta(days=2)))  # the SDK stamps each attempt
    later = stamp(resend, NOW + timedelta(days=2, seconds=3))  # so occurred_at is corrected otherwise
    assert first.occurred_at != later.occurred_at
    assert fingerprint(first) == fingerprint(later) is not None
    assert not conflicts(fingerprint(first), fingerprint(later))


def test_anything_the_event_says_changes_it() -> None:
    base = fingerprint(stamp(sent(tier="gold"), NOW))
    other_value = stamp(sent(tier="bronze"), NOW)
    other_time = sent(tier="gold")
    other_time.occurred_at.CopyFrom(timestamp(NOW - timedelta(minutes=6)))
    other_context = sent(tier="gold")
    other_context.context.locale = "de-AT"
    for changed in (other_value, stamp(other_time, NOW), stamp(other_context, NOW)):
        assert conflicts(base, fingerprint(changed))


def test_a_derived_id_names_its_content_already() -> None:
    e = sent(tier="gold")
    e.event_id = derive_event_id(e)
    assert fingerprint(e) is None
    assert not conflicts(None, fingerprint(stamp(sent(tier="bronze"), NOW)))
