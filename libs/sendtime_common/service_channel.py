"""A service's channel to another Sendtime service (render to profile, triggers to profile and
render): TLS (mutual TLS with a client certificate where the callee asks for one) and the
caller's own API key on every call, if it has one. When the certificate files change (a
renewal), a new channel is opened and calls move to it; the old one closes once the calls
already on it have had time to finish.

Calls go round robin over every address the target names: ``dns:///profile-headless:50052``
(a headless Kubernetes Service: one address per ready pod) spreads them over all replicas,
where gRPC's default (pick_first) would send every call down one connection to one pod.
Servers close connections after a while (GrpcServer's max_connection_age), and the reconnect
resolves the name again, so replicas added later get their share."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import grpc

from sendtime_common.auth.client import bearer_auth
from sendtime_common.tls import ClientTls, UnusableCertificate, channel

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 5.0
ROUND_ROBIN = ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]}))
OLD_CHANNEL_GRACE_S = 30.0

StubT = TypeVar("StubT")


class ServiceChannel(Generic[StubT]):
    def __init__(
        self,
        callee: str,
        target: str,
        api_key: str,
        tls: ClientTls,
        make_stub: Callable[[grpc.aio.Channel], StubT],
        interceptors: Sequence[Any] = (),
    ) -> None:
        """Open the channel to ``callee`` (its name in logs) at ``target``; it connects lazily.

        Raises:
            UnusableCertificate: the client certificate files are not usable.
        """
        self._callee, self._target, self._tls = callee, target, tls
        self._make_stub = make_stub
        # Without a key, the caller's client certificate is its credential (mutual TLS).
        self._interceptors = [*interceptors, *(bearer_auth(api_key) if api_key else [])]
        self._fingerprint = tls.fingerprint()
        self._reopened: list[Callable[[StubT], None]] = []
        self._channel = self._open()
        self._retired: set[asyncio.Task[None]] = set()

    @property
    def stub(self) -> StubT:
        """A stub on the current channel."""
        return self._stub

    def on_reopen(self, use_stub: Callable[[StubT], None]) -> None:
        """Hand ``use_stub`` the new stub whenever the channel is reopened."""
        self._reopened.append(use_stub)

    def _open(self) -> grpc.aio.Channel:
        opened = channel(self._target, self._tls, interceptors=self._interceptors, options=[ROUND_ROBIN])
        self._stub = self._make_stub(opened)
        for use_stub in self._reopened:
            use_stub(self._stub)
        return opened

    async def watch(self, interval_s: float = WATCH_INTERVAL_S) -> None:
        """Reopen the channel whenever the TLS files change, until cancelled."""
        if self._tls.plaintext:
            return
        while True:
            await asyncio.sleep(interval_s)
            now = self._tls.fingerprint()
            if now == self._fingerprint:
                continue
            old = self._channel
            try:
                self._channel = self._open()
            except UnusableCertificate as exc:
                log.error(
                    "a client certificate changed but is not usable",
                    extra={"callee": self._callee, "error": str(exc)},
                )
                continue
            self._fingerprint = now
            log.info("channel reopened with the changed TLS files", extra={"callee": self._callee})
            task = asyncio.create_task(self._close_later(old))
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)

    async def _close_later(self, old: grpc.aio.Channel) -> None:
        await asyncio.sleep(OLD_CHANNEL_GRACE_S)
        await old.close(grace=None)

    async def close(self) -> None:
        for task in list(self._retired):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._channel.close(grace=None)
