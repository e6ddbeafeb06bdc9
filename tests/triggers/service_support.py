"""What the tests of the served triggers service share: resources made over the API, and the
rich error details of a refusal."""

from __future__ import annotations

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from sendtime.triggers.v1 import triggers_pb2, triggers_pb2_grpc
from sendtime_common.errors import FieldViolation, details_of, field_violations, status_of
from tests.triggers.store_support import unique
from triggers import builtin

# A loopback receiver the tests' allow-list lets webhooks reach (nothing listens there: only the
# dispatcher would connect).
RECEIVER_URL = "https://127.0.0.1:9/hooks"


def violations(error: grpc.aio.AioRpcError) -> list[FieldViolation]:
    status = status_of(error)
    assert status is not None, error
    return field_violations(status)


def violated_fields(error: grpc.aio.AioRpcError) -> set[str]:
    return {v.field for v in violations(error)}


def reason(error: grpc.aio.AioRpcError) -> str:
    status = status_of(error)
    assert status is not None, error
    (info,) = details_of(status, error_details_pb2.ErrorInfo)
    return info.reason


async def new_subscription(
    stub: triggers_pb2_grpc.DestinationServiceAsyncStub, ack_timeout_s: int = 30
) -> triggers_pb2.Destination:
    answer = await stub.CreateDestination(
        triggers_pb2.CreateDestinationRequest(
            destination_id=unique("s"),
            destination=triggers_pb2.Destination(
                display_name="Adapter",
                subscription=triggers_pb2.SubscriptionTarget(
                    ack_timeout=duration_pb2.Duration(seconds=ack_timeout_s)
                ),
            ),
        )
    )
    return answer.destination


async def new_webhook(
    stub: triggers_pb2_grpc.DestinationServiceAsyncStub,
) -> triggers_pb2.CreateDestinationResponse:
    return await stub.CreateDestination(
        triggers_pb2.CreateDestinationRequest(
            destination_id=unique("w"),
            destination=triggers_pb2.Destination(
                display_name="ESP", webhook=triggers_pb2.WebhookTarget(url=RECEIVER_URL)
            ),
        )
    )


async def new_trigger(
    triggers: triggers_pb2_grpc.TriggerServiceAsyncStub,
    destinations: triggers_pb2_grpc.DestinationServiceAsyncStub,
    trigger_id: str | None = None,
) -> triggers_pb2.Trigger:
    destination = await new_subscription(destinations)
    answer = await triggers.CreateTrigger(
        triggers_pb2.CreateTriggerRequest(
            trigger_id=trigger_id or unique("cart"), trigger=builtin.cart_abandoned([destination.name])
        )
    )
    return answer.trigger
