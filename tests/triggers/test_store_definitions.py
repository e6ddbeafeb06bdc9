"""Stored triggers and destinations on a real PostgreSQL: CRUD, AIP-158 pages, etags, the
state, and a webhook's secrets (sealed at rest, never in a read)."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest

from sendtime.triggers.v1 import triggers_pb2
from sendtime_common.paging import InvalidPageToken
from tests.triggers.store_support import (
    T0,
    Stores,
    insert_delivery,
    new_subscription,
    new_trigger,
    new_webhook,
    open_episode,
    subscription,
    webhook,
)
from triggers import builtin
from triggers.delivery_log import AttemptRecord, DestinationHealth
from triggers.secret_box import CannotOpen, SealedWithUnknownKey, SecretBox
from triggers.signing import SigningKeys, new_signing_secret
from triggers.store import AlreadyExists, EtagMismatch, NotFound, migrate_store
from triggers.trigger_validation import validate_trigger


async def test_migrations_run_once(stores: Stores) -> None:
    assert await migrate_store(stores.pool) == []


async def test_a_trigger_is_stored_as_given_with_its_output_fields(stores: Stores) -> None:
    given = builtin.cart_abandoned(["destinations/braze"])
    given.name, given.etag = "triggers/ignored", "ignored"  # output only: not stored
    created = await stores.triggers.create("cart-abandoned", given)
    assert created.name == "triggers/cart-abandoned"
    assert created.state == triggers_pb2.TRIGGER_STATE_ACTIVE
    assert created.etag and created.etag != "ignored"
    assert created.HasField("create_time") and created.update_time == created.create_time
    assert validate_trigger(created) == validate_trigger(given)
    assert await stores.triggers.get("cart-abandoned") == created

    paused = await stores.triggers.create("paused-one", given, paused=True)
    assert paused.state == triggers_pb2.TRIGGER_STATE_PAUSED
    with pytest.raises(AlreadyExists):
        await stores.triggers.create("cart-abandoned", given)
    with pytest.raises(NotFound):
        await stores.triggers.get("nothing-here")


async def test_updates_check_the_etag_and_keep_the_state(stores: Stores) -> None:
    created = await stores.triggers.create("t", builtin.order_completed(["destinations/d"]), paused=True)
    changed = builtin.order_completed(["destinations/d", "destinations/e"])
    updated = await stores.triggers.update("t", changed, etag=created.etag)
    assert updated.etag != created.etag
    assert list(updated.delivery.destinations) == ["destinations/d", "destinations/e"]
    assert updated.state == triggers_pb2.TRIGGER_STATE_PAUSED
    assert updated.create_time == created.create_time
    with pytest.raises(EtagMismatch):
        await stores.triggers.update("t", changed, etag=created.etag)  # stale
    assert (await stores.triggers.update("t", changed)).etag != updated.etag  # no etag: unconditional
    with pytest.raises(NotFound):
        await stores.triggers.update("nothing-here", changed, etag=created.etag)


async def test_an_etag_read_before_a_delete_does_not_match_the_trigger_made_again(stores: Stores) -> None:
    trigger = builtin.order_completed(["destinations/d"])
    first = await stores.triggers.create("again", trigger)
    await stores.triggers.delete("again")
    await stores.triggers.create("again", trigger)
    with pytest.raises(EtagMismatch):
        await stores.triggers.update("again", trigger, etag=first.etag)


async def test_pause_and_resume(stores: Stores) -> None:
    created = await stores.triggers.create("t", builtin.order_completed(["destinations/d"]))
    paused = await stores.triggers.pause("t")
    assert paused.state == triggers_pb2.TRIGGER_STATE_PAUSED and paused.etag != created.etag
    assert (await stores.triggers.pause("t")).etag == paused.etag  # already paused: unchanged
    resumed, woken = await stores.triggers.resume("t", T0)
    assert resumed.state == triggers_pb2.TRIGGER_STATE_ACTIVE and woken == 0
    with pytest.raises(NotFound):
        await stores.triggers.pause("nothing-here")


async def test_triggers_are_listed_by_name_in_pages(stores: Stores) -> None:
    trigger = builtin.order_completed(["destinations/d"])
    ids = [f"t-{n:02}" for n in range(7)]
    for trigger_id in reversed(ids):
        await stores.triggers.create(trigger_id, trigger)
    seen, token = [], ""
    while True:
        page, token = await stores.triggers.list(page_size=3, page_token=token)
        seen.append([t.name for t in page])
        if not token:
            break
    assert seen == [[f"triggers/{i}" for i in ids[n : n + 3]] for n in (0, 3, 6)]
    with pytest.raises(InvalidPageToken):
        await stores.triggers.list(page_size=3, page_token="not-a-token")
    with pytest.raises(InvalidPageToken):  # another listing's token
        first_page_token = (await stores.triggers.list(page_size=1, page_token=""))[1]
        await stores.destinations.list(page_size=1, page_token=first_page_token)


async def test_deleting_a_trigger_ends_its_waiting_episodes_and_keeps_its_fires(stores: Stores) -> None:
    trigger_id = await new_trigger(stores)
    for customer in ("c1", "c2", "c3"):
        await open_episode(stores, trigger_id, customer)
    await stores.pool.execute(
        "INSERT INTO triggers_fires (customer_id, trigger_id, fired_at, episode_key)"
        " VALUES ('c1', $1, $2, '')",
        trigger_id,
        T0,
    )
    assert await stores.triggers.delete(trigger_id) == 3
    assert await stores.episodes.episodes("c1", trigger_id) == []
    assert (
        await stores.episodes.fire_facts("c1", trigger_id, since=T0 - timedelta(days=1))
    ).last_fire_time == T0
    with pytest.raises(NotFound):
        await stores.triggers.delete(trigger_id)
    with pytest.raises(NotFound):  # nothing opens for it any more
        await open_episode(stores, trigger_id, "c4")


# ---- destinations -------------------------------------------------------------------------------


async def test_a_webhook_secret_is_sealed_and_never_read_back(stores: Stores) -> None:
    secret = new_signing_secret()
    created = await stores.destinations.create("braze", webhook(), signing_keys=SigningKeys(secret))
    assert created.name == "destinations/braze"
    assert created.state == triggers_pb2.DESTINATION_STATE_ENABLED
    for read in (
        created,
        await stores.destinations.get("braze"),
        (await stores.destinations.list(page_size=10, page_token=""))[0][0],
    ):
        assert secret not in str(read) and secret.encode() not in read.SerializeToString()
    sealed = await stores.pool.fetchval("SELECT signing_keys FROM triggers_destinations WHERE id = 'braze'")
    stored_row = await stores.pool.fetchrow("SELECT * FROM triggers_destinations WHERE id = 'braze'")
    assert stored_row is not None and secret not in str(dict(stored_row))
    assert secret.encode() not in sealed
    assert secret.removeprefix("whsec_").encode() not in sealed
    assert await stores.destinations.signing_keys("braze") == SigningKeys(secret)

    # Sealed for this row: copied to another destination's row, it does not open there.
    await stores.destinations.create("other", webhook(), signing_keys=SigningKeys(new_signing_secret()))
    await stores.pool.execute("UPDATE triggers_destinations SET signing_keys = $1 WHERE id = 'other'", sealed)
    with pytest.raises(CannotOpen):
        await stores.destinations.signing_keys("other")
    # Another deployment's key (or one removed) opens nothing.
    with pytest.raises(SealedWithUnknownKey):
        await Stores.on(stores.pool, SecretBox.generate()).destinations.signing_keys("braze")


async def test_the_service_key_rotates(stores: Stores) -> None:
    old_key, new_key = os.urandom(32), os.urandom(32)
    before = Stores.on(stores.pool, SecretBox([old_key])).destinations
    await before.create("d", webhook(), signing_keys=SigningKeys(secret := new_signing_secret()))
    after = Stores.on(stores.pool, SecretBox([new_key, old_key])).destinations
    assert await after.signing_keys("d") == SigningKeys(secret)  # sealed with the old key, still opens
    await after.rotate_secret("d", next_secret := new_signing_secret(), timedelta(0), T0)
    assert await after.signing_keys("d") == SigningKeys(next_secret)  # sealed with the new key
    with pytest.raises(SealedWithUnknownKey):
        await before.signing_keys("d")


async def test_rotating_a_destination_secret_keeps_the_previous_one_for_a_while(stores: Stores) -> None:
    first = new_signing_secret()
    await stores.destinations.create("d", webhook(), signing_keys=SigningKeys(first))
    second = new_signing_secret()
    rotated = await stores.destinations.rotate_secret("d", second, timedelta(hours=24), T0)
    assert rotated.webhook.previous_secret_expire_time.ToDatetime().replace(
        tzinfo=T0.tzinfo
    ) == T0 + timedelta(hours=24)
    keys = await stores.destinations.signing_keys("d")
    assert keys == SigningKeys(second, first, T0 + timedelta(hours=24))
    assert keys.in_use(T0) == (second, first)
    assert (await stores.destinations.webhooks()) == [(await stores.destinations.get("d"), keys)]
    with pytest.raises(NotFound):
        await stores.destinations.rotate_secret(
            (await new_subscription(stores)).removeprefix("destinations/"), second, timedelta(0), T0
        )


async def test_destination_kinds_and_keys_go_together(stores: Stores) -> None:
    with pytest.raises(ValueError):
        await stores.destinations.create("w", webhook())  # no keys
    with pytest.raises(ValueError):
        await stores.destinations.create("s", subscription(), signing_keys=SigningKeys(new_signing_secret()))
    with pytest.raises(ValueError):
        await stores.destinations.create("none", triggers_pb2.Destination())
    created = await stores.destinations.create("s", subscription())
    with pytest.raises(ValueError):  # the kind is fixed
        await stores.destinations.update("s", webhook(), etag=created.etag)
    with pytest.raises(AlreadyExists):
        await stores.destinations.create("s", subscription())


async def test_enabling_a_destination_clears_its_reason_and_its_failures(stores: Stores) -> None:
    name, _ = await new_webhook(stores, "d")
    stores_log = stores.deliveries
    await stores_log.record_attempt(
        await _delivery_of(stores, name), name, AttemptRecord(T0, timedelta(0), 204)
    )
    await stores_log.record_attempt(
        await _delivery_of(stores, name), name, AttemptRecord(T0 + timedelta(hours=1), timedelta(0), 503)
    )
    await stores_log.disable_destination(name, "every attempt failed for 5 days since the last success")
    disabled = await stores.destinations.get("d")
    assert disabled.state == triggers_pb2.DESTINATION_STATE_DISABLED
    assert disabled.disabled_reason.startswith("every attempt failed")

    edited = webhook("https://receiver.example.com/v2")
    edited.max_concurrency = 3
    still = await stores.destinations.update("d", edited, etag=disabled.etag)  # state unset: unchanged
    assert still.state == triggers_pb2.DESTINATION_STATE_DISABLED and still.max_concurrency == 3
    edited.state = triggers_pb2.DESTINATION_STATE_ENABLED
    enabled = await stores.destinations.update("d", edited, etag=still.etag)
    assert (enabled.state, enabled.disabled_reason) == (triggers_pb2.DESTINATION_STATE_ENABLED, "")
    assert enabled.webhook.url == "https://receiver.example.com/v2"
    assert await stores.destinations.health("d") == DestinationHealth(T0, None)
    with pytest.raises(EtagMismatch):
        await stores.destinations.update("d", edited, etag=disabled.etag)
    with pytest.raises(NotFound):
        await stores.destinations.update("nothing", edited)


async def test_deleting_a_destination_discards_its_deliveries(stores: Stores) -> None:
    name, _ = await new_webhook(stores, "d")
    pending = await _delivery_of(stores, name)
    delivered = await _delivery_of(stores, name)
    await stores.deliveries.mark_delivered(delivered)
    assert await stores.destinations.delete("d") == 1
    assert await stores.pool.fetchval("SELECT count(*) FROM triggers_deliveries") == 0
    with pytest.raises(NotFound):
        await stores.destinations.get("d")
    with pytest.raises(NotFound):
        await stores.destinations.delete("d")
    assert pending != delivered


async def test_destinations_are_listed_by_name_in_pages(stores: Stores) -> None:
    for n in range(5):
        await stores.destinations.create(f"d-{n}", subscription())
    first, token = await stores.destinations.list(page_size=2, page_token="")
    second, token = await stores.destinations.list(page_size=2, page_token=token)
    third, token = await stores.destinations.list(page_size=2, page_token=token)
    assert [d.name for d in first + second + third] == [f"destinations/d-{n}" for n in range(5)]
    assert token == ""


async def _delivery_of(stores: Stores, destination: str) -> str:
    return await insert_delivery(stores.pool, destination)
