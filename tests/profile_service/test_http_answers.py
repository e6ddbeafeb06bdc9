"""The profile's HTTP answers kept encoded (profile_service.server's answer memo): what they
are keyed by (what the answer holds: its version, its read mask), that they are kept only while
the near cache holds a copy of the customer, and that they leave with the copy and with an
erasure."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from google.protobuf import field_mask_pb2, json_format

from profile_service.customer_data import CustomerData
from profile_service.repository import ErasedCustomer
from profile_service.server import ProfileApp
from sendtime.ingest.v1 import ingest_pb2_grpc
from sendtime.profile.v1 import profile_pb2, profile_pb2_grpc
from sendtime_common.identifiers import IdentifierKind
from tests.conftest import eventually, user, wait_for_profile
from tests.factories import cart_item_added, event, identify
from tests.profile_service.test_profile_service import send


async def fetch(app: ProfileApp, key: str, path: str) -> tuple[int, dict[str, Any]]:
    assert app.grpc.http is not None
    url = f"http://127.0.0.1:{app.grpc.http.port}/v1/{path}"
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers={"Authorization": f"Bearer {key}"}) as answer:
            return answer.status, orjson.loads(await answer.read())


async def test_answers_are_kept_per_version_and_read_mask_and_leave_with_a_merge_and_an_erasure(
    profile_app: ProfileApp,
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    admin_key: str,
    unique: str,
) -> None:
    answers = profile_app.answers
    assert answers is not None  # the near cache is on by default, and the memo with it
    user_id = f"u-{unique}"
    await send(ingest_stub, event(user_id=user_id, identify=identify(first_name="Ada")))
    first = await wait_for_profile(profile_stub, user(user_id), lambda p: p.traits["first_name"] == "Ada")
    customer_id = first.customer_id

    path = f"profiles/user_id:{user_id}"

    def kept(count: int) -> Callable[[str], Awaitable[dict[str, Any] | None]]:
        """Fetch ``path`` until the memo holds ``count`` answers about the customer (a read
        kept nothing while the near cache held no copy of the customer yet)."""

        async def fetched(path: str) -> dict[str, Any] | None:
            status, body = await fetch(profile_app, admin_key, path)
            assert status == 200
            return body if answers.held_for(customer_id) == count else None

        return fetched

    full = await eventually(lambda: kept(1)(path))
    status, again = await fetch(profile_app, admin_key, path)
    assert again == full and answers.held_for(customer_id) == 1  # served from the memo
    masked = await eventually(lambda: kept(2)(f"{path}?readMask=traits"))  # another answer
    assert set(masked["profile"]) == {"name", "customerId", "version", "traits"}
    by_grpc = await profile_stub.GetProfile(
        profile_pb2.GetProfileRequest(
            identifier=user(user_id), read_mask=field_mask_pb2.FieldMask(paths=["traits"])
        )
    )
    assert masked == json_format.MessageToDict(by_grpc)

    # A merge drops the near-cache copy, and the answers with it; the next answer is the new
    # version's, never the one kept.
    await send(ingest_stub, event(user_id=user_id, cart_item_added=cart_item_added("SKU-1")))
    await wait_for_profile(profile_stub, user(user_id), lambda p: len(p.cart.items) == 1)
    changed = await eventually(lambda: kept(1)(path))
    assert changed["profile"]["version"] != full["profile"]["version"]
    assert changed["profile"]["cart"]["items"][0]["sku"] == "SKU-1"

    await profile_stub.DeleteProfile(profile_pb2.DeleteProfileRequest(identifier=user(user_id)))
    assert answers.held_for(customer_id) == 0
    status, _ = await fetch(profile_app, admin_key, f"profiles/user_id:{user_id}")
    assert status == 404


class _ErasingRepository:
    async def delete_customer(self, key: object) -> ErasedCustomer:
        return ErasedCustomer("c-erased", ((IdentifierKind.USER_ID, "u-erased"),), 3)


class _Cache:
    async def erase(self, keys: list[str]) -> None:
        pass


async def test_an_erasure_forgets_the_persons_answers_whether_or_not_a_copy_was_near() -> None:
    forgotten: list[str] = []
    data = CustomerData(
        _ErasingRepository(),  # type: ignore[arg-type]
        _Cache(),  # type: ignore[arg-type]
        forget=forgotten.append,
    )
    await data.erase((IdentifierKind.USER_ID, "u-erased"))
    assert forgotten == ["c-erased"]
