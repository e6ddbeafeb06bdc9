"""A local provider for the sync tests: an aiohttp server on 127.0.0.1 with an OAuth 2.0 token
endpoint (RFC 6749: the client-credentials and refresh-token grants, client authentication by
HTTP basic, expiring access tokens, refresh tokens that rotate, JSON errors such as
``invalid_grant``) and API routes that check the bearer token or API key and answer what a
test scripts. What each provider's own routes do (paging, limits) is in its own fake, on top."""

from __future__ import annotations

import base64
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Self

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Scripted:
    """One scripted answer."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"{}"


@dataclass
class Seen:
    at: float  # monotonic
    method: str
    path: str
    authorization: str
    wall: float  # time.time(): to compare with a date the provider named (Retry-After)


class ProviderServer:
    """The token endpoint at ``/oauth/token``, and routes added with ``route``; ``/things`` (GET)
    is a default one answering ``{"things": [...]}``. ``script`` answers the next API requests
    (then 200); ``seen`` lists the API requests, ``token_requests`` the token endpoint's."""

    def __init__(
        self,
        *,
        client_id: str = "sendtime",
        client_secret: str = "s3cret",
        refresh_token: str = "refresh-1",
        api_key: str | None = None,
        token_lifetime_s: int = 3600,
        rotate_refresh_tokens: bool = False,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.refresh_token = refresh_token
        self.api_key = api_key
        self.token_lifetime_s = token_lifetime_s
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.access_tokens: dict[str, float] = {}  # token -> expires at (monotonic)
        self.script: deque[Scripted] = deque()
        self.token_script: deque[Scripted] = deque()
        self.seen: list[Seen] = []
        self.token_requests: list[dict[str, str]] = []
        self._routes: list[tuple[str, str, Handler]] = [("GET", "/things", self._things)]
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_url(self) -> str:
        return f"{self.url}/oauth/token"

    def route(self, method: str, path: str, handler: Handler) -> None:
        """Serve ``handler`` (after the auth check and the script) at ``path``; before ``start``."""
        self._routes.append((method, path, handler))

    def revoke_tokens(self) -> None:
        """Every access token issued so far is refused from now on (401)."""
        self.access_tokens.clear()

    async def start(self, port: int = 0) -> Self:
        """Serve on 127.0.0.1:``port`` (0: a free one, ``self.port`` then)."""
        app = web.Application()
        app.router.add_post("/oauth/token", self._token)
        for method, path, handler in self._routes:
            app.router.add_route(method, path, self._api(handler))
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # --- OAuth 2.0 token endpoint (RFC 6749 sections 4.4, 5, 6) -------------------------------

    async def _token(self, request: web.Request) -> web.StreamResponse:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.token_requests.append(form)
        if self.token_script:
            scripted = self.token_script.popleft()
            return web.Response(status=scripted.status, headers=scripted.headers, body=scripted.body)
        if not self._client_authenticated(request, form):
            return web.json_response({"error": "invalid_client"}, status=401)
        grant = form.get("grant_type")
        if grant == "refresh_token":
            if form.get("refresh_token") != self.refresh_token:
                return web.json_response({"error": "invalid_grant"}, status=400)
            if self.rotate_refresh_tokens:
                self.refresh_token = f"refresh-{secrets.token_hex(4)}"
        elif grant != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        token = secrets.token_urlsafe(16)
        self.access_tokens[token] = time.monotonic() + self.token_lifetime_s
        answer = {"access_token": token, "token_type": "Bearer", "expires_in": self.token_lifetime_s}
        if grant == "refresh_token":
            answer["refresh_token"] = self.refresh_token
        return web.json_response(answer, headers={"Cache-Control": "no-store"})

    def _client_authenticated(self, request: web.Request, form: dict[str, str]) -> bool:
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            client_id, _, secret = base64.b64decode(header[6:]).decode().partition(":")
        else:
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        return (client_id, secret) == (self.client_id, self.client_secret)

    # --- the API ----------------------------------------------------------------------------------

    def _authorized(self, authorization: str) -> bool:
        if self.api_key is not None:
            return authorization == f"Bearer {self.api_key}"
        token = authorization.removeprefix("Bearer ")
        expires = self.access_tokens.get(token)
        return expires is not None and time.monotonic() < expires

    def _api(self, handler: Handler) -> Handler:
        async def api(request: web.Request) -> web.StreamResponse:
            authorization = request.headers.get("Authorization", "")
            self.seen.append(
                Seen(time.monotonic(), request.method, request.path_qs, authorization, time.time())
            )
            if not self._authorized(authorization):
                return web.json_response({"category": "INVALID_AUTHENTICATION"}, status=401)
            if self.script:
                scripted = self.script.popleft()
                return web.Response(status=scripted.status, headers=scripted.headers, body=scripted.body)
            return await handler(request)

        return api

    async def _things(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"things": [1, 2, 3]})
