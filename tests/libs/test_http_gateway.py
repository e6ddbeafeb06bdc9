"""The transcoder's own work, without a service (sendtime_common.http_gateway): the request
message a path and query string become, whichever way the gateway builds it, and answers
encoded once for a method with an answer memo."""

from __future__ import annotations

from typing import Any

import grpc
import orjson
import pytest
from aiohttp.test_utils import make_mocked_request
from google.protobuf import json_format
from google.protobuf.message import Message

from sendtime.profile.v1 import profile_pb2
from sendtime_common.answer_memo import AnswerMemo
from sendtime_common.http_gateway import CachePolicy, HttpGateway, InProcessCalls, etag_of
from sendtime_common.http_routes import routes_of, set_path_values

SERVICE = profile_pb2.DESCRIPTOR.services_by_name["ProfileService"]
GET_PROFILE = f"/{SERVICE.full_name}/GetProfile"


class Recorder:
    """GetProfile answering a fixed profile, keeping every request it was given."""

    def __init__(self) -> None:
        self.requests: list[Message] = []
        self.answer = profile_pb2.GetProfileResponse(
            profile=profile_pb2.Profile(name="profiles/c-1", customer_id="c-1", version=7)
        )
        self.answer.profile.traits.update({"first_name": "Ada", "age": 36})

    async def get_profile(self, request: Message, context: Any) -> Message:
        self.requests.append(request)
        return self.answer

    def register(self, server: Any) -> None:
        handlers = {
            method.name: grpc.unary_unary_rpc_method_handler(self.get_profile) for method in SERVICE.methods
        }
        server.add_registered_method_handlers(SERVICE.full_name, handlers)


def gateway(recorder: Recorder, memo: AnswerMemo | None = None) -> HttpGateway:
    policy = CachePolicy(
        max_age_s=lambda answer: 0, etag_basis=lambda answer: answer.SerializeToString(deterministic=True)
    )
    return HttpGateway(
        routes_of([SERVICE.full_name]),
        InProcessCalls(recorder.register, []),
        max_body_bytes=1 << 20,
        cache_policies={GET_PROFILE: policy},
        answer_memos={GET_PROFILE: memo} if memo is not None else None,
    )


async def get(server: HttpGateway, path: str, **headers: str) -> Any:
    return await server.handle(make_mocked_request("GET", path, headers=headers))


@pytest.mark.parametrize(
    ("path", "name", "query"),
    [
        ("/v1/profiles/user_id:u-1", "profiles/user_id:u-1", {}),  # no query, ASCII: built directly
        ("/v1/profiles/user_id:a%2Fb%20c", "profiles/user_id:a/b c", {}),
        ("/v1/profiles/email:%C3%BC@example.com", "profiles/email:ü@example.com", {}),  # through ParseDict
        (
            "/v1/profiles/user_id:u-1?readMask=traits,cart",
            "profiles/user_id:u-1",
            {"readMask": "traits,cart"},
        ),
        ("/v1/profiles/user_id:u-1?read_mask=traits", "profiles/user_id:u-1", {"readMask": "traits"}),
    ],
)
async def test_a_request_becomes_the_message_parse_dict_makes_of_its_path_and_query(
    path: str, name: str, query: dict[str, str]
) -> None:
    recorder = Recorder()
    answer = await get(gateway(recorder), path)
    assert answer.status == 200
    (route,) = [r for r in routes_of([SERVICE.full_name]) if r.grpc_method == GET_PROFILE]
    expected = json_format.ParseDict(
        set_path_values(query, {"name": name}, route), profile_pb2.GetProfileRequest()
    )
    assert recorder.requests == [expected]
    assert type(recorder.requests[0]) is profile_pb2.GetProfileRequest


async def test_a_path_ending_in_a_parameter_the_route_does_not_take_is_still_refused() -> None:
    answer = await get(gateway(Recorder()), "/v1/profiles/user_id:u-1?shoeSize=44")
    assert answer.status == 400
    assert b"shoeSize" in answer.body


@pytest.mark.parametrize("memoized", [False, True])
async def test_an_answer_is_the_same_json_and_etag_with_or_without_a_memo(memoized: bool) -> None:
    recorder = Recorder()
    memo = AnswerMemo(10, 60, owner=lambda message: "c-1") if memoized else None
    server = gateway(recorder, memo)
    first = await get(server, "/v1/profiles/user_id:u-1")
    second = await get(server, "/v1/profiles/user_id:u-1")
    for answer in (first, second):
        assert answer.status == 200
        assert orjson.loads(answer.body) == json_format.MessageToDict(recorder.answer)
        assert answer.headers["ETag"] == etag_of(recorder.answer.SerializeToString(deterministic=True))
        assert answer.headers["Cache-Control"] == "private, max-age=0"
    assert first.body == second.body
    if memo is not None:
        assert len(memo) == 1
    not_modified = await get(server, "/v1/profiles/user_id:u-1", **{"If-None-Match": first.headers["ETag"]})
    assert not_modified.status == 304 and not_modified.headers["ETag"] == first.headers["ETag"]
    # The profile changes: a new answer, never the one kept.
    recorder.answer.profile.version = 8
    changed = await get(server, "/v1/profiles/user_id:u-1")
    assert orjson.loads(changed.body)["profile"]["version"] == "8"
    assert changed.headers["ETag"] != first.headers["ETag"]
