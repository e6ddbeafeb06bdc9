"""DestinationService served on real PostgreSQL: a webhook's signing secret is shown once (at
creation and at rotation) and in no read; URLs are checked against the SSRF rules and headers
against the delivery's own; updates follow the mask and the etag; the kind is fixed."""

from __future__ import annotations

from typing import TypeAlias

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2

from sendtime.triggers.v1 import triggers_pb2, triggers_pb2_grpc  # noqa: F401 - the stub types
from tests.triggers.service_support import new_subscription, new_webhook, reason, violated_fields, violations
from tests.triggers.store_support import unique

# A string: the async stub types exist for type checkers only.
Destinations: TypeAlias = "triggers_pb2_grpc.DestinationServiceAsyncStub"


def webhook_request(url: str, **headers: str) -> triggers_pb2.CreateDestinationRequest:
    return triggers_pb2.CreateDestinationRequest(
        destination_id=unique("w"),
        destination=triggers_pb2.Destination(webhook=triggers_pb2.WebhookTarget(url=url, headers=headers)),
    )


async def test_a_webhooks_secret_is_shown_once_and_in_no_read(destination_stub: Destinations) -> None:
    made = await new_webhook(destination_stub)
    secret = made.signing_secret

    assert secret.startswith("whsec_")
    assert made.destination.state == triggers_pb2.DESTINATION_STATE_ENABLED
    got = await destination_stub.GetDestination(
        triggers_pb2.GetDestinationRequest(name=made.destination.name)
    )
    assert got.destination == made.destination
    listed = await destination_stub.ListDestinations(triggers_pb2.ListDestinationsRequest(page_size=1000))
    for answer in (got, listed):
        assert secret.encode() not in answer.SerializeToString()
        assert secret.removeprefix("whsec_").encode() not in answer.SerializeToString()

    rotated = await destination_stub.RotateDestinationSecret(
        triggers_pb2.RotateDestinationSecretRequest(
            name=made.destination.name, previous_secret_ttl=duration_pb2.Duration(seconds=3600)
        )
    )
    assert rotated.signing_secret.startswith("whsec_") and rotated.signing_secret != secret
    assert rotated.destination.webhook.HasField("previous_secret_expire_time")
    after = await destination_stub.GetDestination(
        triggers_pb2.GetDestinationRequest(name=made.destination.name)
    )
    assert rotated.signing_secret.encode() not in after.SerializeToString()


async def test_a_subscription_has_no_secret(destination_stub: Destinations) -> None:
    subscription = await new_subscription(destination_stub)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await destination_stub.RotateDestinationSecret(
            triggers_pb2.RotateDestinationSecretRequest(name=subscription.name)
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason(refused.value) == "DESTINATION_NOT_A_WEBHOOK"


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://10.0.0.1/hooks", "private"),
        ("https://169.254.169.254/latest/meta-data", "metadata"),
        ("https://metadata.google.internal/", "metadata"),
        ("http://receiver.example.com/hooks", "https"),
        ("https://user:password@receiver.example.com/", "password"),
        ("https://2130706433/", "canonical"),
    ],
)
async def test_a_url_into_private_networks_is_refused(
    destination_stub: Destinations, url: str, why: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await destination_stub.CreateDestination(webhook_request(url))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    (violation,) = violations(refused.value)
    assert violation.field == "destination.webhook.url" and why in violation.description


async def test_a_destination_is_checked_field_by_field(destination_stub: Destinations) -> None:
    request = webhook_request("https://127.0.0.1:9/hooks", **{"Webhook-Signature": "forged", "Bad Name": "x"})
    request.destination.max_concurrency = 500
    request.destination.webhook.timeout.FromSeconds(60)
    request.destination_id = "Not An Id"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await destination_stub.CreateDestination(request)
    assert violated_fields(refused.value) == {
        "destination_id",
        "destination.max_concurrency",
        "destination.webhook.timeout",
        "destination.webhook.headers['Webhook-Signature']",
        "destination.webhook.headers['Bad Name']",
    }
    with pytest.raises(grpc.aio.AioRpcError) as kindless:
        await destination_stub.CreateDestination(
            triggers_pb2.CreateDestinationRequest(
                destination_id=unique("d"), destination=triggers_pb2.Destination()
            )
        )
    assert violated_fields(kindless.value) == {"destination"}


async def test_an_update_follows_its_mask_and_etag_and_keeps_the_kind(destination_stub: Destinations) -> None:
    made = (await new_webhook(destination_stub)).destination
    disable = triggers_pb2.Destination(state=triggers_pb2.DESTINATION_STATE_DISABLED, display_name="ignored")

    updated = (
        await destination_stub.UpdateDestination(
            triggers_pb2.UpdateDestinationRequest(
                name=made.name,
                destination=disable,
                update_mask=field_mask_pb2.FieldMask(paths=["state"]),
                etag=made.etag,
            )
        )
    ).destination
    assert updated.state == triggers_pb2.DESTINATION_STATE_DISABLED
    assert updated.display_name == made.display_name and updated.webhook.url == made.webhook.url

    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await destination_stub.UpdateDestination(
            triggers_pb2.UpdateDestinationRequest(
                name=made.name,
                destination=disable,
                update_mask=field_mask_pb2.FieldMask(paths=["state"]),
                etag=made.etag,
            )
        )
    assert stale.value.code() == grpc.StatusCode.ABORTED and reason(stale.value) == "ETAG_MISMATCH"

    moved = triggers_pb2.Destination(webhook=triggers_pb2.WebhookTarget(url="https://10.1.2.3/hooks"))
    with pytest.raises(grpc.aio.AioRpcError) as private:
        await destination_stub.UpdateDestination(
            triggers_pb2.UpdateDestinationRequest(
                name=made.name, destination=moved, update_mask=field_mask_pb2.FieldMask(paths=["webhook.url"])
            )
        )
    assert violated_fields(private.value) == {"destination.webhook.url"}

    with pytest.raises(grpc.aio.AioRpcError) as other_kind:
        await destination_stub.UpdateDestination(
            triggers_pb2.UpdateDestinationRequest(
                name=made.name,
                destination=triggers_pb2.Destination(subscription=triggers_pb2.SubscriptionTarget()),
                update_mask=field_mask_pb2.FieldMask(paths=["subscription"]),
            )
        )
    (violation,) = violations(other_kind.value)
    assert violation.field == "update_mask.paths[0]" and "fixed" in violation.description


async def test_a_deleted_destination_is_gone(destination_stub: Destinations) -> None:
    made = await new_subscription(destination_stub)
    deleted = await destination_stub.DeleteDestination(triggers_pb2.DeleteDestinationRequest(name=made.name))
    assert deleted.deliveries_discarded == 0
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await destination_stub.GetDestination(triggers_pb2.GetDestinationRequest(name=made.name))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND and reason(gone.value) == "DESTINATION_NOT_FOUND"
