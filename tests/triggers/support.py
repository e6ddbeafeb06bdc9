"""Webhook receivers on loopback that verify what they get with standardwebhooks, a clock the
tests move, and DNS answers the tests choose."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from standardwebhooks import Webhook, WebhookVerificationError


@dataclass
class Received:
    """One request as the receiver got it, and which of its secrets verified it."""

    headers: dict[str, str]
    body: bytes
    verified: dict[str, bool]
    arrived: float = field(default_factory=time.monotonic)


# Answers request number n (0 first).
Answer = Callable[[int, web.Request], Awaitable[web.StreamResponse]]


async def no_content(n: int, request: web.Request) -> web.StreamResponse:
    return web.Response(status=204)


def statuses(*codes: int, headers: dict[str, str] | None = None) -> Answer:
    """Answers the requests with ``codes`` in turn, then the last one again."""

    async def answer(n: int, request: web.Request) -> web.StreamResponse:
        return web.Response(status=codes[min(n, len(codes) - 1)], headers=headers)

    return answer


class Receiver:
    """An aiohttp server on 127.0.0.1 at ``url``. Each request is verified with
    ``Webhook(secret).verify(body, headers)`` for every one of ``secrets`` and kept in
    ``requests``; ``in_progress`` counts the requests it has not answered yet."""

    def __init__(self, secrets: Sequence[str] = (), answer: Answer = no_content) -> None:
        self.secrets = list(secrets)
        self.answer = answer
        self.requests: list[Received] = []
        self.in_progress = 0
        self.most_in_progress = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hooks", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = dict(request.headers)
        verified = {}
        for secret in self.secrets:
            try:
                Webhook(secret).verify(body, headers)
                verified[secret] = True
            except WebhookVerificationError:
                verified[secret] = False
        n = len(self.requests)
        self.requests.append(Received(headers, body, verified))
        self.in_progress += 1
        self.most_in_progress = max(self.most_in_progress, self.in_progress)
        try:
            return await self.answer(n, request)
        finally:
            self.in_progress -= 1


class FakeTime:
    """A clock that moves only when the code under test sleeps on it."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def clock(self) -> datetime:
        return self.now

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(0)  # moved only if the sleep was not cancelled first
        self.now += timedelta(seconds=seconds)


class HostsResolver(AbstractResolver):
    """DNS as a hosts file the test writes (and rewrites, to rebind a name)."""

    def __init__(self, hosts: dict[str, list[str]]) -> None:
        self.hosts = hosts

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = self.hosts.get(host)
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        pass


async def until(check: Callable[[], bool], timeout_s: float = 15.0) -> None:
    """Wait for ``check`` to hold; fail after ``timeout_s`` (long: a loaded machine is slow, and
    the wait ends as soon as it holds; no test counts on it giving up to prove an absence)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.005)
