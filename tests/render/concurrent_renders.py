"""Make concurrent Render calls, each with its own deadline, from a process of its own, and print
what came back as JSON (an answer, or the status code). Run by the render fault test, so a
deadline measures the render service, not the test process's busy event loop.

Usage: SENDTIME_API_KEY=<key> python -m tests.render.concurrent_renders TARGET TIMEOUT_S < requests.json
(a JSON list of RenderRequest in proto JSON form).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import json_format

from sendtime.render.v1 import render_pb2, render_pb2_grpc
from sendtime_common.auth.client import authenticated_channel
from sendtime_common.tls import ClientTls


async def render_all(
    target: str, timeout_s: float, requests: Sequence[render_pb2.RenderRequest]
) -> list[dict[str, Any]]:
    async with authenticated_channel(
        target, os.environ["SENDTIME_API_KEY"], ClientTls(plaintext=True)
    ) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)  # a caller's channel is connected already
        stub = render_pb2_grpc.RenderServiceStub(channel)

        async def render(request: render_pb2.RenderRequest) -> dict[str, Any]:
            try:
                return {"response": json_format.MessageToDict(await stub.Render(request, timeout=timeout_s))}
            except grpc.aio.AioRpcError as exc:
                return {"error": exc.code().name}

        return list(await asyncio.gather(*(render(r) for r in requests)))


def main(argv: Sequence[str]) -> None:
    target, timeout_s = argv[0], float(argv[1])
    requests = [json_format.ParseDict(r, render_pb2.RenderRequest()) for r in json.load(sys.stdin)]
    print(json.dumps(asyncio.run(render_all(target, timeout_s, requests))))


if __name__ == "__main__":
    main(sys.argv[1:])
