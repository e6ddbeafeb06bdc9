"""TriggerService served on real PostgreSQL and NATS: create, read, list (AIP-158 pages),
update (the mask and the etag), pause, resume and delete, and what each refuses."""

from __future__ import annotations

from typing import TypeAlias

import grpc
import pytest
from google.protobuf import field_mask_pb2

from sendtime.triggers.v1 import triggers_pb2, triggers_pb2_grpc
from tests.triggers.service_support import new_subscription, new_trigger, reason, violated_fields, violations
from tests.triggers.store_support import unique
from triggers import builtin
from triggers.destination_store import DestinationStore
from triggers.secret_box import SecretBox
from triggers.server import TriggersApp
from triggers.trigger_servicer import TriggerServicer
from triggers.trigger_store import TriggerStore

# Strings: the async stub types exist for type checkers only.
Triggers: TypeAlias = "triggers_pb2_grpc.TriggerServiceAsyncStub"
Destinations: TypeAlias = "triggers_pb2_grpc.DestinationServiceAsyncStub"


async def test_a_trigger_is_created_read_and_deleted(
    trigger_stub: Triggers, destination_stub: Destinations
) -> None:
    trigger = await new_trigger(trigger_stub, destination_stub)

    assert trigger.name.startswith("triggers/cart-")
    assert trigger.state == triggers_pb2.TRIGGER_STATE_ACTIVE
    assert trigger.etag and trigger.HasField("create_time")
    got = await trigger_stub.GetTrigger(triggers_pb2.GetTriggerRequest(name=trigger.name))
    assert got.trigger == trigger

    deleted = await trigger_stub.DeleteTrigger(triggers_pb2.DeleteTriggerRequest(name=trigger.name))
    assert deleted.episodes_ended == 0
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await trigger_stub.GetTrigger(triggers_pb2.GetTriggerRequest(name=trigger.name))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert reason(gone.value) == "TRIGGER_NOT_FOUND"


async def test_an_invalid_trigger_is_refused_field_by_field(trigger_stub: Triggers) -> None:
    trigger = builtin.cart_abandoned(["destinations/nowhere"])
    trigger.ClearField("delay")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await trigger_stub.CreateTrigger(
            triggers_pb2.CreateTriggerRequest(trigger_id="Cart_1", trigger=trigger)
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {"trigger_id", "trigger.delay"} <= violated_fields(refused.value)

    # A valid trigger delivering to a destination that does not exist.
    with pytest.raises(grpc.aio.AioRpcError) as nowhere:
        await trigger_stub.CreateTrigger(
            triggers_pb2.CreateTriggerRequest(
                trigger_id=unique("cart"), trigger=builtin.cart_abandoned(["destinations/nowhere"])
            )
        )
    assert nowhere.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    (violation,) = violations(nowhere.value)
    assert violation.field == "trigger.delivery.destinations[0]"
    assert "does not exist" in violation.description

    with pytest.raises(grpc.aio.AioRpcError) as bad_name:
        await trigger_stub.GetTrigger(triggers_pb2.GetTriggerRequest(name="templates/cart"))
    assert violated_fields(bad_name.value) == {"name"}


async def test_an_id_is_taken_once(trigger_stub: Triggers, destination_stub: Destinations) -> None:
    trigger = await new_trigger(trigger_stub, destination_stub)
    with pytest.raises(grpc.aio.AioRpcError) as taken:
        await new_trigger(trigger_stub, destination_stub, trigger.name.removeprefix("triggers/"))
    assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert reason(taken.value) == "TRIGGER_ALREADY_EXISTS"


async def test_an_update_changes_what_its_mask_names_and_only_from_the_etag_read(
    trigger_stub: Triggers, destination_stub: Destinations
) -> None:
    trigger = await new_trigger(trigger_stub, destination_stub)
    change = triggers_pb2.Trigger(display_name="Cart reminder, second try")

    updated = (
        await trigger_stub.UpdateTrigger(
            triggers_pb2.UpdateTriggerRequest(
                name=trigger.name,
                trigger=change,
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
                etag=trigger.etag,
            )
        )
    ).trigger

    assert updated.display_name == "Cart reminder, second try"
    assert updated.delay == trigger.delay and updated.etag != trigger.etag
    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await trigger_stub.UpdateTrigger(
            triggers_pb2.UpdateTriggerRequest(
                name=trigger.name,
                trigger=change,
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
                etag=trigger.etag,
            )
        )
    assert stale.value.code() == grpc.StatusCode.ABORTED
    assert reason(stale.value) == "ETAG_MISMATCH"
    # Without an etag, the update applies to what is stored now.
    again = await trigger_stub.UpdateTrigger(
        triggers_pb2.UpdateTriggerRequest(
            name=trigger.name, trigger=change, update_mask=field_mask_pb2.FieldMask(paths=["display_name"])
        )
    )
    assert again.trigger.etag != updated.etag

    with pytest.raises(grpc.aio.AioRpcError) as output_only:
        await trigger_stub.UpdateTrigger(
            triggers_pb2.UpdateTriggerRequest(
                name=trigger.name, trigger=change, update_mask=field_mask_pb2.FieldMask(paths=["state"])
            )
        )
    (violation,) = violations(output_only.value)
    assert violation.field == "update_mask.paths[0]" and "PauseTrigger" in violation.description

    emptied = triggers_pb2.UpdateTriggerRequest(
        name=trigger.name,
        trigger=triggers_pb2.Trigger(),
        update_mask=field_mask_pb2.FieldMask(paths=["delay"]),
    )
    with pytest.raises(grpc.aio.AioRpcError) as cleared:
        await trigger_stub.UpdateTrigger(emptied)
    assert "trigger.delay" in violated_fields(cleared.value)


async def test_pause_and_resume(trigger_stub: Triggers, destination_stub: Destinations) -> None:
    trigger = await new_trigger(trigger_stub, destination_stub)

    paused = await trigger_stub.PauseTrigger(triggers_pb2.PauseTriggerRequest(name=trigger.name))
    assert paused.trigger.state == triggers_pb2.TRIGGER_STATE_PAUSED
    resumed = await trigger_stub.ResumeTrigger(triggers_pb2.ResumeTriggerRequest(name=trigger.name))
    assert resumed.trigger.state == triggers_pb2.TRIGGER_STATE_ACTIVE
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await trigger_stub.PauseTrigger(triggers_pb2.PauseTriggerRequest(name="triggers/never-made"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_triggers_are_listed_by_name_a_page_at_a_time(
    trigger_stub: Triggers, destination_stub: Destinations
) -> None:
    destination = await new_subscription(destination_stub)
    prefix = unique("page")
    made = [f"triggers/{prefix}-{n}" for n in range(5)]
    for name in made:
        await trigger_stub.CreateTrigger(
            triggers_pb2.CreateTriggerRequest(
                trigger_id=name.removeprefix("triggers/"), trigger=builtin.cart_abandoned([destination.name])
            )
        )

    listed: list[str] = []
    token = ""
    while True:
        page = await trigger_stub.ListTriggers(
            triggers_pb2.ListTriggersRequest(page_size=2, page_token=token)
        )
        assert len(page.triggers) <= 2
        listed.extend(t.name for t in page.triggers)
        token = page.next_page_token
        if not token:
            break
    assert listed == sorted(listed) and len(set(listed)) == len(listed)
    assert [name for name in listed if name.startswith(f"triggers/{prefix}")] == made

    with pytest.raises(grpc.aio.AioRpcError) as bad_token:
        await trigger_stub.ListTriggers(triggers_pb2.ListTriggersRequest(page_token="not-a-token"))
    assert violated_fields(bad_token.value) == {"page_token"}


async def test_the_engine_is_told_of_each_stored_change_and_not_of_a_refused_one(
    triggers_app: TriggersApp, destination_stub: Destinations
) -> None:
    told: list[str] = []

    async def on_triggers_changed(name: str) -> None:
        told.append(name)

    servicer = TriggerServicer(
        TriggerStore(triggers_app.pool),
        DestinationStore(triggers_app.pool, SecretBox.generate()),
        on_triggers_changed=on_triggers_changed,
    )
    server = grpc.aio.server()
    triggers_pb2_grpc.add_TriggerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as calls:
            stub = triggers_pb2_grpc.TriggerServiceStub(calls)
            trigger = await new_trigger(stub, destination_stub)
            with pytest.raises(grpc.aio.AioRpcError):
                await new_trigger(stub, destination_stub, trigger.name.removeprefix("triggers/"))
            await stub.PauseTrigger(triggers_pb2.PauseTriggerRequest(name=trigger.name))
            await stub.ResumeTrigger(triggers_pb2.ResumeTriggerRequest(name=trigger.name))
            await stub.DeleteTrigger(triggers_pb2.DeleteTriggerRequest(name=trigger.name))
    finally:
        await server.stop(grace=None)
    assert told == [trigger.name] * 4
