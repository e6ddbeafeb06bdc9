"""Who may call the triggers service, and how: each RPC's scope (a key with triggers.read reads
but cannot change triggers...), the HTTP face of the contracts' routes with a Bearer key, and
the real grpcurl creating and listing a trigger through reflection."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import json_format

from sendtime.triggers.v1 import triggers_pb2, triggers_pb2_grpc
from sendtime_common.auth.api_keys import Scope
from tests.conftest import channel
from tests.keys import issue_key
from tests.triggers.service_support import new_subscription, reason
from tests.triggers.store_support import insert_delivery, unique
from triggers import builtin
from triggers.server import TriggersApp

GRPCURL = str(Path(sys.executable).parent / "grpcurl")


def create_request(destination: str) -> triggers_pb2.CreateTriggerRequest:
    return triggers_pb2.CreateTriggerRequest(
        trigger_id=unique("cart"), trigger=builtin.cart_abandoned([destination])
    )


async def test_each_rpc_needs_its_own_scope(
    triggers_app: TriggersApp,
    destination_stub: triggers_pb2_grpc.DestinationServiceAsyncStub,
    database_url: str,
) -> None:
    destination = await new_subscription(destination_stub)
    target = f"127.0.0.1:{triggers_app.grpc.port}"
    reader = await issue_key(database_url, [Scope.TRIGGERS_READ], "tests: triggers reader")
    subscriber = await issue_key(database_url, [Scope.DELIVERIES_SUBSCRIBE], "tests: adapter")
    async with channel(target, reader) as reading, channel(target, subscriber) as subscribing:
        triggers = triggers_pb2_grpc.TriggerServiceStub(reading)
        await triggers.ListTriggers(triggers_pb2.ListTriggersRequest())
        await triggers_pb2_grpc.DestinationServiceStub(reading).GetDestination(
            triggers_pb2.GetDestinationRequest(name=destination.name)
        )
        with pytest.raises(grpc.aio.AioRpcError) as create:
            await triggers.CreateTrigger(create_request(destination.name))
        with pytest.raises(grpc.aio.AioRpcError) as deliveries:
            await triggers_pb2_grpc.DeliveryServiceStub(reading).ListDeliveries(
                triggers_pb2.ListDeliveriesRequest(destination=destination.name)
            )
        adapter = triggers_pb2_grpc.DeliveryServiceStub(subscribing)
        (name,) = [await insert_delivery(triggers_app.pool, destination.name)]
        acked = await adapter.AcknowledgeDeliveries(
            triggers_pb2.AcknowledgeDeliveriesRequest(destination=destination.name, names=[name])
        )
        assert acked.acknowledged == 1
        with pytest.raises(grpc.aio.AioRpcError) as read_log:
            await adapter.GetDelivery(triggers_pb2.GetDeliveryRequest(name=name))
        with pytest.raises(grpc.aio.AioRpcError) as redeliver:
            await adapter.Redeliver(triggers_pb2.RedeliverRequest(name=name))
    for refused, scope in [
        (create, "triggers.write"),
        (deliveries, "deliveries.read"),
        (read_log, "deliveries.read"),
        (redeliver, "destinations.manage"),
    ]:
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert reason(refused.value) == "SCOPE_MISSING" and scope in (refused.value.details() or "")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_the_http_face_creates_triggers_and_lists_deliveries_with_a_bearer_key(
    triggers_app: TriggersApp,
    destination_stub: triggers_pb2_grpc.DestinationServiceAsyncStub,
    http: aiohttp.ClientSession,
    admin_key: str,
) -> None:
    assert triggers_app.grpc.http is not None
    base = f"http://127.0.0.1:{triggers_app.grpc.http.port}"
    bearer = {"Authorization": f"Bearer {admin_key}"}
    destination = await new_subscription(destination_stub)
    body = json_format.MessageToDict(create_request(destination.name))

    async with http.post(f"{base}/v1/triggers", json=body, headers=bearer) as answer:
        assert answer.status == 200, await answer.text()
        created: dict[str, Any] = await answer.json()
    assert created["trigger"]["name"] == f"triggers/{body['triggerId']}"
    assert created["trigger"]["state"] == "TRIGGER_STATE_ACTIVE"
    name = await insert_delivery(triggers_app.pool, destination.name)
    async with http.get(
        f"{base}/v1/deliveries", params={"destination": destination.name}, headers=bearer
    ) as answer:
        assert answer.status == 200, await answer.text()
        listed: dict[str, Any] = await answer.json()
    assert [d["name"] for d in listed["deliveries"]] == [name]

    async with http.post(f"{base}/v1/triggers", json=body) as answer:
        assert answer.status == 401 and answer.headers["WWW-Authenticate"].startswith("Bearer")
    async with http.post(f"{base}/v1/triggers", json=body, headers=bearer) as answer:
        assert answer.status == 409  # ALREADY_EXISTS
        assert (await answer.json())["details"][0]["reason"] == "TRIGGER_ALREADY_EXISTS"


async def grpcurl(target: str, key: str, *args: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    command = [GRPCURL, "-max-time", "10", "-plaintext", "-H", f"authorization: Bearer {key}"]
    if data is not None:
        command += ["-d", json.dumps(data)]
    # In a thread: the service answering it runs on this event loop.
    result = await asyncio.to_thread(
        subprocess.run, [*command, target, *args], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


async def test_grpcurl_creates_and_lists_a_trigger(
    triggers_app: TriggersApp,
    destination_stub: triggers_pb2_grpc.DestinationServiceAsyncStub,
    admin_key: str,
) -> None:
    target = f"127.0.0.1:{triggers_app.grpc.port}"
    destination = await new_subscription(destination_stub)
    request = json_format.MessageToDict(create_request(destination.name))

    created = await grpcurl(
        target, admin_key, "sendtime.triggers.v1.TriggerService/CreateTrigger", data=request
    )
    listed = await grpcurl(
        target, admin_key, "sendtime.triggers.v1.TriggerService/ListTriggers", data={"pageSize": 1000}
    )

    assert created["trigger"]["name"] == f"triggers/{request['triggerId']}"
    assert created["trigger"]["name"] in [t["name"] for t in listed["triggers"]]
