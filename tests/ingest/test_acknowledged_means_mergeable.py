"""Through the real ingest (SendEvents), NATS, merger and PostgreSQL: a value no store after
ingest can keep is refused at ingest with a field violation naming it, never acknowledged.

Before (measured on this stack, issue 15), each of these was ACCEPTED or crashed the call:

- a NUL in an identifier, and NaN in a trait: ACCEPTED, then the merger failed on it at every
  delivery (``CharacterNotInRepertoireError``; ``ValueError: Fail to serialize NaN``), redelivered
  with backoff for ever: 8 deliveries in the first two minutes, then one every 30 s;
- a NUL in an order id: the whole batch answered RETRY ("the dedup store is unavailable"), for
  ever, since the business-key claim is a text column;
- Infinity in a custom property: ACCEPTED and merged, after which ExportProfile cannot write the
  person's events as JSON;
- an occurred_at or sent_at out of Timestamp's range, negative nanos, or a time zone naming a
  directory ("Europe"): the call failed with UNKNOWN, "Unexpected <class 'ValueError'>" (or
  IsADirectoryError);
- a unit price of 9 * 10^18 with quantity 3: ACCEPTED, and GetProfile answered UNKNOWN ("Value
  out of range") for that person; once the profile had been read, the next merge of it stopped
  the replica's merger for good.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from profile_service.server import ProfileApp
from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime_common.errors import field_violations
from sendtime_common.event_log import ConsumerBacklog, JetStreamEventLog
from sendtime_common.storable import NOT_FINITE_DESCRIPTION, NUL_DESCRIPTION, TIMESTAMP_DESCRIPTION
from tests.conftest import eventually, user, wait_for_profile
from tests.factories import cart_item_added, event, identify, order_completed

REJECTED = ingest_pb2.EVENT_OUTCOME_REJECTED
ZONE = "must be an IANA time zone such as Europe/Vienna"


def properties(**values: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def with_field(build: Callable[[ingest_pb2.Event], None], uid: str) -> ingest_pb2.Event:
    e = event(user_id=uid, identify=identify(a=1))
    build(e)
    return e


HOSTILE: list[tuple[str, Callable[[str], ingest_pb2.Event], str, str]] = [
    (
        "nul in an identifier",
        lambda uid: event(user_id=f"{uid}\x00", identify=identify(a=1)),
        "customer.user_id",
        NUL_DESCRIPTION,
    ),
    (
        "nul in an order id",
        lambda uid: event(user_id=uid, order_completed=order_completed(f"o\x00{uid}", "10")),
        "order_completed.order_id",
        NUL_DESCRIPTION,
    ),
    (
        "nan in a trait",
        lambda uid: event(user_id=uid, identify=identify(score=float("nan"))),
        "identify.traits.score",
        NOT_FINITE_DESCRIPTION,
    ),
    (
        "infinity in a property",
        lambda uid: event(
            user_id=uid, custom=ingest_pb2.CustomEvent(name="quiz", properties=properties(s=float("inf")))
        ),
        "custom.properties.s",
        NOT_FINITE_DESCRIPTION,
    ),
    (
        "occurred_at past year 9999",
        lambda uid: with_field(lambda e: setattr(e.occurred_at, "seconds", 10**15), uid),
        "occurred_at",
        TIMESTAMP_DESCRIPTION,
    ),
    (
        "negative nanos",
        lambda uid: with_field(lambda e: setattr(e.occurred_at, "nanos", -5), uid),
        "occurred_at",
        TIMESTAMP_DESCRIPTION,
    ),
    (
        "sent_at before year 1",
        lambda uid: with_field(lambda e: setattr(e.sent_at, "seconds", -(10**15)), uid),
        "sent_at",
        TIMESTAMP_DESCRIPTION,
    ),
    (
        "a time zone naming a directory",
        lambda uid: with_field(lambda e: setattr(e.context, "timezone", "Europe"), uid),
        "context.timezone",
        ZONE,
    ),
    (
        "a unit price past 10^15",
        lambda uid: event(user_id=uid, cart_item_added=cart_item_added("sku", 3, "9000000000000000000")),
        "cart_item_added.unit_price.units",
        "must be at most 1000000000000000 (10^15)",
    ),
    (
        "a quantity past 10^6",
        lambda uid: event(user_id=uid, cart_item_added=cart_item_added("sku", 2**62)),
        "cart_item_added.quantity",
        "must be at most 1000000",
    ),
]


@pytest.mark.parametrize(
    ("build", "field", "description"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE]
)
async def test_a_value_no_store_can_keep_is_refused_at_ingest_naming_it(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    profile_app: ProfileApp,
    unique: str,
    build: Callable[[str], ingest_pb2.Event],
    field: str,
    description: str,
) -> None:
    uid = f"u-{unique}"
    good = event(user_id=f"ok-{unique}", identify=identify(a=1))
    response = await ingest_stub.SendEvents(ingest_pb2.SendEventsRequest(events=[build(uid), good]))
    bad, kept = response.results
    assert bad.outcome == REJECTED, bad
    assert (field, description) in {(v.field, v.description) for v in field_violations(bad.status)}
    assert kept.outcome == ingest_pb2.EVENT_OUTCOME_ACCEPTED  # one bad event never fails the batch
    await wait_for_profile(profile_stub, user(f"ok-{unique}"), lambda p: p.traits["a"] == 1)
    # Had the bad one been published, the merger would have had it once it has nothing left
    # (a fixed wait also passed while the merger was merely slow).
    await eventually(partial(nothing_left_to_merge, profile_app))
    with pytest.raises(grpc.aio.AioRpcError) as nothing:
        await profile_stub.GetProfile(profile_pb2.GetProfileRequest(identifier=user(uid)))
    assert nothing.value.code() == grpc.StatusCode.NOT_FOUND


async def nothing_left_to_merge(profile_app: ProfileApp) -> bool:
    assert isinstance(profile_app.event_log, JetStreamEventLog)  # the tests' own, on NATS
    backlog = await profile_app.event_log.backlog(profile_app.consumer_name)
    return backlog == ConsumerBacklog(pending=0, ack_pending=0)


async def test_the_largest_accepted_amounts_merge_into_a_readable_profile(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    unique: str,
) -> None:
    uid = f"u-{unique}"
    most = str(10**15)
    adds = [event(user_id=uid, cart_item_added=cart_item_added(f"s-{i}", 1_000_000, most)) for i in range(3)]
    response = await ingest_stub.SendEvents(ingest_pb2.SendEventsRequest(events=adds))
    assert {r.outcome for r in response.results} == {ingest_pb2.EVENT_OUTCOME_ACCEPTED}
    profile = await wait_for_profile(profile_stub, user(uid), lambda p: len(p.cart.items) == 3)
    assert not profile.cart.HasField("total")  # 3 * 10^21 units: past google.type.Money's int64
    # Read (so that the cache keeps it in full), then merged again: the cache refresh encodes it.
    more = event(user_id=uid, cart_item_added=cart_item_added("s-3", 1_000_000, most))
    await ingest_stub.SendEvents(ingest_pb2.SendEventsRequest(events=[more]))
    again = await wait_for_profile(profile_stub, user(uid), lambda p: len(p.cart.items) == 4)
    assert [i.quantity for i in again.cart.items] == [1_000_000] * 4
