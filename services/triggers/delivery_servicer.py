"""gRPC handlers of DeliveryService: the delivery log (ListDeliveries, GetDelivery), Redeliver,
and subscriptions: SubscribeDeliveries streams a subscription destination's pending deliveries
from the store's durable cursor (DeliveryStore.take_for_subscription), AcknowledgeDeliveries
marks them delivered.

**A subscription stream** polls the store every ``poll_s``. It keeps at most
``max_unacknowledged`` deliveries sent and not acknowledged: it remembers what it sent with its
ack deadline and asks the store which of those are still pending. A delivery not acknowledged by
its deadline is taken again by the store, on this stream or another; one stream that breaks
loses nothing. The stream ends when the caller cancels it, and cleanly (status OK) when the
server stops (``end_streams``), so that a drain does not wait for streams that never end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import grpc
from google.rpc import code_pb2

from sendtime.triggers.v1 import triggers_pb2, triggers_pb2_grpc
from sendtime_common.errors import FieldViolation, abort_invalid, abort_with, error_info_status
from sendtime_common.paging import InvalidPageToken, page_size
from sendtime_common.resource_names import InvalidName
from triggers.answers import answering
from triggers.delivery_store import DeliveryStore, parse_delivery_name
from triggers.destination_servicer import destination_id_of
from triggers.destination_store import DestinationStore
from triggers.destination_validation import ack_timeout

DELIVERY: Final = "DELIVERY"
DESTINATION: Final = "DESTINATION"
DEFAULT_MAX_UNACKNOWLEDGED: Final = 100
MAX_UNACKNOWLEDGED: Final = 1000
MAX_ACKNOWLEDGED: Final = 1000
DEFAULT_POLL_S: Final = 0.25


class DeliveryServicer(triggers_pb2_grpc.DeliveryServiceServicer):
    def __init__(
        self, deliveries: DeliveryStore, destinations: DestinationStore, *, poll_s: float = DEFAULT_POLL_S
    ) -> None:
        self._deliveries = deliveries
        self._destinations = destinations
        self._poll_s = poll_s
        self._ending = asyncio.Event()

    def end_streams(self) -> None:
        """End every open subscription stream (the server is stopping); the unacknowledged
        deliveries are sent again after their deadlines, to the next stream."""
        self._ending.set()

    async def ListDeliveries(
        self, request: triggers_pb2.ListDeliveriesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triggers_pb2.ListDeliveriesResponse:
        destination_id = await destination_id_of(
            context, request.destination, "destination", "ListDeliveries"
        )
        violations = []
        if request.state not in triggers_pb2.DeliveryState.values():
            violations.append(FieldViolation("state", "not a DeliveryState"))
        if request.page_size < 0:
            violations.append(FieldViolation("page_size", "must not be negative"))
        if violations:
            await abort_invalid(context, "invalid ListDeliveries request", violations)
        async with answering(context, DESTINATION, request.destination):
            await self._destinations.get(destination_id)  # a destination that does not exist: NOT_FOUND
            try:
                page, token = await self._deliveries.list(
                    destination_id,
                    state=request.state,
                    page_size=page_size(request.page_size),
                    page_token=request.page_token,
                )
            except InvalidPageToken as exc:
                await abort_invalid(context, "invalid page token", [FieldViolation("page_token", str(exc))])
        return triggers_pb2.ListDeliveriesResponse(deliveries=page, next_page_token=token)

    async def GetDelivery(
        self, request: triggers_pb2.GetDeliveryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triggers_pb2.GetDeliveryResponse:
        delivery_id = await _delivery_id(context, request.name, "GetDelivery")
        async with answering(context, DELIVERY, request.name):
            delivery = await self._deliveries.get(delivery_id)
        return triggers_pb2.GetDeliveryResponse(delivery=delivery)

    async def Redeliver(
        self, request: triggers_pb2.RedeliverRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triggers_pb2.RedeliverResponse:
        delivery_id = await _delivery_id(context, request.name, "Redeliver")
        async with answering(context, DELIVERY, request.name):
            # Not held by this replica: any dispatcher's sweep (or a subscription stream) takes it.
            delivery = await self._deliveries.redeliver(delivery_id, datetime.now(UTC))
        return triggers_pb2.RedeliverResponse(delivery=delivery)

    async def SubscribeDeliveries(
        self, request: triggers_pb2.SubscribeDeliveriesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[triggers_pb2.SubscribeDeliveriesResponse]:
        destination_id = await destination_id_of(
            context, request.destination, "destination", "SubscribeDeliveries"
        )
        if not 0 <= request.max_unacknowledged <= MAX_UNACKNOWLEDGED:
            await abort_invalid(
                context,
                "invalid SubscribeDeliveries request",
                [
                    FieldViolation(
                        "max_unacknowledged", f"1 to {MAX_UNACKNOWLEDGED} (0: {DEFAULT_MAX_UNACKNOWLEDGED})"
                    )
                ],
            )
        most = request.max_unacknowledged or DEFAULT_MAX_UNACKNOWLEDGED
        timeout = await self._subscription_ack_timeout(context, request.destination, destination_id)
        # Sent on this stream and not known to be acknowledged: delivery id -> its ack deadline.
        sent: dict[int, datetime] = {}
        async with answering(context, DESTINATION, request.destination):
            while not self._ending.is_set():
                now = datetime.now(UTC)
                # Past its deadline a delivery is the store's to send again, here or elsewhere.
                sent = {i: deadline for i, deadline in sent.items() if deadline > now}
                if sent:
                    pending = await self._deliveries.still_pending(destination_id, list(sent))
                    sent = {i: deadline for i, deadline in sent.items() if i in pending}
                room = most - len(sent)
                if room > 0:
                    for delivery in await self._deliveries.take_for_subscription(
                        destination_id, now, ack_timeout=timeout, limit=room
                    ):
                        sent[parse_delivery_name(delivery.name)] = now + timeout
                        yield triggers_pb2.SubscribeDeliveriesResponse(delivery=delivery)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ending.wait(), self._poll_s)

    async def AcknowledgeDeliveries(
        self, request: triggers_pb2.AcknowledgeDeliveriesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> triggers_pb2.AcknowledgeDeliveriesResponse:
        destination_id = await destination_id_of(
            context, request.destination, "destination", "AcknowledgeDeliveries"
        )
        violations = []
        if not 1 <= len(request.names) <= MAX_ACKNOWLEDGED:
            violations.append(FieldViolation("names", f"1 to {MAX_ACKNOWLEDGED} delivery names"))
        ids = []
        for i, name in enumerate(request.names):
            try:
                ids.append(parse_delivery_name(name))
            except InvalidName as exc:
                violations.append(FieldViolation(f"names[{i}]", str(exc)))
        if violations:
            await abort_invalid(context, "invalid AcknowledgeDeliveries request", violations)
        await self._subscription_ack_timeout(context, request.destination, destination_id)
        async with answering(context, DESTINATION, request.destination):
            acknowledged = await self._deliveries.acknowledge(destination_id, ids)
        return triggers_pb2.AcknowledgeDeliveriesResponse(acknowledged=acknowledged)

    async def _subscription_ack_timeout(
        self, context: grpc.aio.ServicerContext[Any, Any], name: str, destination_id: str
    ) -> timedelta:
        """The ack timeout of the subscription ``name``; NOT_FOUND, or FAILED_PRECONDITION for a
        webhook (whose deliveries only a 2xx answer settles)."""
        async with answering(context, DESTINATION, name):
            destination = await self._destinations.get(destination_id)
        if not destination.HasField("subscription"):
            await abort_with(
                context,
                error_info_status(
                    code_pb2.FAILED_PRECONDITION,
                    f"{name} is a webhook destination, not a subscription",
                    "DESTINATION_NOT_A_SUBSCRIPTION",
                    {"name": name},
                ),
            )
        return ack_timeout(destination)


async def _delivery_id(context: grpc.aio.ServicerContext[Any, Any], name: str, method: str) -> int:
    if not name:
        await abort_invalid(context, f"invalid {method} request", [FieldViolation("name", "required")])
    try:
        return parse_delivery_name(name)
    except InvalidName as exc:
        await abort_invalid(context, f"invalid {method} request", [FieldViolation("name", str(exc))])
