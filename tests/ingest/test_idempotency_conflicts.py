"""The same event id with another payload is an idempotency conflict, on real NATS, PostgreSQL
and the merger: answered CONFLICT with a reason, kept in the dead-letter store for review, never
counted as a duplicate and dropped; the first event stands. The same event sent again (a retry,
its sent_at set anew) stays a DUPLICATE. Whichever way ingest catches the second event: its
record of stored ids, the first event in the same batch, or the event log's duplicate window
(the first copy read back from the log)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.rpc import code_pb2, error_details_pb2

from ingest.envelope import stamp
from ingest.server import IngestApp
from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2_grpc
from sendtime_common.event_integrity import CONFLICT_REASON, fingerprint
from sendtime_common.event_log import JetStreamSettings, OutgoingMessage
from tests.conftest import empty_database, user, wait_for_profile
from tests.factories import event, identify
from tests.ingest.test_ingest_depth import ingest_service

ACCEPTED = ingest_pb2.EVENT_OUTCOME_ACCEPTED
DUPLICATE = ingest_pb2.EVENT_OUTCOME_DUPLICATE
CONFLICT = ingest_pb2.EVENT_OUTCOME_CONFLICT
# Not CRM: test_ingest_depth counts CRM outcomes, and these would land in its counts late.
SOURCE = ingest_pb2.EVENT_SOURCE_SERVER


async def send(
    stub: ingest_pb2_grpc.IngestServiceAsyncStub, *events: ingest_pb2.Event
) -> list[ingest_pb2.EventResult]:
    response = await stub.SendEvents(ingest_pb2.SendEventsRequest(events=list(events)))
    return list(response.results)


def reason_of(result: ingest_pb2.EventResult) -> tuple[int, str, dict[str, str]]:
    info = error_details_pb2.ErrorInfo()
    for detail in result.status.details:
        if detail.Unpack(info):
            return result.status.code, info.reason, dict(info.metadata)
    raise AssertionError(f"no ErrorInfo in {result.status}")


async def kept_for_review(
    stub: ingest_pb2_grpc.IngestServiceAsyncStub, event_id: str
) -> list[ingest_pb2.RejectedEvent]:
    listed = await stub.ListRejectedEvents(
        ingest_pb2.ListRejectedEventsRequest(page_size=1000, source=SOURCE)
    )
    return [r for r in listed.rejected_events if r.event.event_id == event_id]


def crm_event(event_id: str, uid: str, **traits: object) -> ingest_pb2.Event:
    return event(event_id=event_id, user_id=uid, source=SOURCE, identify=identify(**traits))


async def test_another_event_under_a_stored_id_is_a_conflict_kept_for_review(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    unique: str,
) -> None:
    uid, event_id = f"u-{unique}", f"evt-{unique}"
    first = crm_event(event_id, uid, tier="gold")
    assert [r.outcome for r in await send(ingest_stub, first)] == [ACCEPTED]
    await wait_for_profile(profile_stub, user(uid), lambda p: p.traits["tier"] == "gold")

    other = crm_event(event_id, uid, tier="bronze")
    (result,) = await send(ingest_stub, other)
    assert (result.event_id, result.outcome) == (event_id, CONFLICT)
    assert reason_of(result) == (code_pb2.ALREADY_EXISTS, CONFLICT_REASON, {"event_id": event_id})
    (kept,) = await kept_for_review(ingest_stub, event_id)
    assert kept.event.identify.traits["tier"] == "bronze"  # the second event, as sent
    assert kept.status.code == code_pb2.ALREADY_EXISTS
    assert kept.state == ingest_pb2.REJECTED_EVENT_STATE_PENDING

    # A retry of the first, its sent_at set anew by the sender's SDK: the same event.
    retry = crm_event(event_id, uid, tier="gold")
    retry.occurred_at.CopyFrom(first.occurred_at)
    retry.sent_at.FromDatetime(datetime.now(UTC))
    assert [r.outcome for r in await send(ingest_stub, retry)] == [DUPLICATE]

    # Replayed as stored, it is a conflict again; under an id of its own it is a new event.
    again = await ingest_stub.ReplayRejectedEvent(ingest_pb2.ReplayRejectedEventRequest(name=kept.name))
    assert again.result.outcome == CONFLICT
    assert again.rejected_event.state == ingest_pb2.REJECTED_EVENT_STATE_PENDING
    renamed = ingest_pb2.Event()
    renamed.CopyFrom(other)
    renamed.event_id = f"{event_id}-2"
    fixed = await ingest_stub.ReplayRejectedEvent(
        ingest_pb2.ReplayRejectedEventRequest(name=kept.name, corrected_event=renamed)
    )
    assert fixed.result.outcome == ACCEPTED
    assert fixed.rejected_event.state == ingest_pb2.REJECTED_EVENT_STATE_REPLAYED
    await wait_for_profile(profile_stub, user(uid), lambda p: p.traits["tier"] == "bronze")
    assert len(await kept_for_review(ingest_stub, event_id)) == 1  # no second dead letter


async def test_in_one_batch_the_first_event_under_an_id_stands(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub, unique: str
) -> None:
    uid, event_id = f"u-{unique}", f"evt-{unique}"
    first, same = crm_event(event_id, uid, n=1), crm_event(event_id, uid, n=1)
    same.occurred_at.CopyFrom(first.occurred_at)
    results = await send(ingest_stub, first, same, crm_event(event_id, uid, n=2))
    assert [r.outcome for r in results] == [ACCEPTED, DUPLICATE, CONFLICT]
    assert [k.event.identify.traits["n"] for k in await kept_for_review(ingest_stub, event_id)] == [2]


async def test_a_conflict_the_event_log_catches_first_is_read_back_and_compared(
    ingest_app: IngestApp, ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub, unique: str
) -> None:
    # The first event is in the log but not yet in ingest's record of stored ids (its batch
    # still running, or its record failed): the log's duplicate window catches the second.
    uid, event_id = f"u-{unique}", f"evt-{unique}"
    first = crm_event(event_id, uid, n=1)
    in_log = stamp(first, datetime.now(UTC) - timedelta(seconds=1))
    await ingest_app.event_log.publish(
        OutgoingMessage("identify", event_id, in_log.SerializeToString(deterministic=True))
    )
    assert await ingest_app.store.seen_event_ids([event_id]) == {}

    (conflict,) = await send(ingest_stub, crm_event(event_id, uid, n=2))
    assert conflict.outcome == CONFLICT
    assert [k.event.identify.traits["n"] for k in await kept_for_review(ingest_stub, event_id)] == [2]
    assert await ingest_app.store.seen_event_ids([event_id]) == {}  # not recorded as stored

    resend = crm_event(event_id, uid, n=1)
    resend.occurred_at.CopyFrom(first.occurred_at)
    (duplicate,) = await send(ingest_stub, resend)
    assert (duplicate.outcome, duplicate.status.code) == (DUPLICATE, 0)
    # Now recorded, with the first event's fingerprint, for resends after the log's window.
    assert await ingest_app.store.seen_event_ids([event_id]) == {event_id: fingerprint(in_log)}


async def test_conflicts_are_counted(nats_url: str, unique: str) -> None:
    """In a database of its own: the counts are the whole database's, which other ingest services
    of the suite write to as well (in three workers, this test once read 6 - 0 where it made 2)."""

    def conflicts(stats: ingest_pb2.GetIngestStatsResponse) -> int:
        return sum(s.conflicts for s in stats.sources if s.source == SOURCE)

    async with (
        empty_database("conflicts") as database_url,
        ingest_service(database_url=database_url, event_log=JetStreamSettings(url=nats_url)) as (_, stub),
    ):
        before = conflicts(await stub.GetIngestStats(ingest_pb2.GetIngestStatsRequest()))
        uid, event_id = f"u-{unique}", f"evt-{unique}"
        await send(stub, crm_event(event_id, uid, n=1), crm_event(event_id, uid, n=2))
        await send(stub, crm_event(event_id, uid, n=3))
        after = conflicts(await stub.GetIngestStats(ingest_pb2.GetIngestStatsRequest()))
    assert (before, after) == (0, 2)
