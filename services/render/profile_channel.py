"""Render's channel to the profile service: TLS (mutual TLS with a client certificate where
profile asks for one) and render's own API key on every call, if it has one. When the certificate files change
(a renewal), a new channel is opened and lookups move to it; the old one closes once the
lookups already on it have had time to finish."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import grpc

from sendtime.profile.v1 import profile_pb2_grpc
from sendtime_common.auth.client import bearer_auth
from sendtime_common.tls import ClientTls, UnusableCertificate, channel

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 5.0
OLD_CHANNEL_GRACE_S = 30.0


class ProfileChannel:
    def __init__(
        self,
        target: str,
        api_key: str,
        tls: ClientTls,
        interceptors: list[Any],
    ) -> None:
        """Open the channel (it connects lazily).

        Raises:
            UnusableCertificate: the client certificate files are not usable.
        """
        self._target, self._tls = target, tls
        # Without a key, render's client certificate is its credential (mutual TLS).
        self._interceptors = [*interceptors, *(bearer_auth(api_key) if api_key else [])]
        self._fingerprint = tls.fingerprint()
        self._reopened: list[Callable[[profile_pb2_grpc.ProfileServiceAsyncStub], None]] = []
        self._channel = self._open()
        self._retired: set[asyncio.Task[None]] = set()

    @property
    def stub(self) -> profile_pb2_grpc.ProfileServiceAsyncStub:
        """A stub on the current channel."""
        return self._stub

    def on_reopen(self, use_stub: Callable[[profile_pb2_grpc.ProfileServiceAsyncStub], None]) -> None:
        """Hand ``use_stub`` the new stub whenever the channel is reopened."""
        self._reopened.append(use_stub)

    def _open(self) -> grpc.aio.Channel:
        opened = channel(self._target, self._tls, interceptors=self._interceptors)
        self._stub = profile_pb2_grpc.ProfileServiceStub(opened)
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
                    "the profile client certificate changed but is not usable", extra={"error": str(exc)}
                )
                continue
            self._fingerprint = now
            log.info("profile channel reopened with the changed TLS files")
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
