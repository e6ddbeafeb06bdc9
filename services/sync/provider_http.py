"""One provider's HTTP API as a connector calls it: its credentials, its published rate, retries
of what may be retried, and a circuit breaker.

- **Credentials**: an API key in a header (SendGrid, Braze, a HubSpot private app), HTTP basic
  (Mailchimp: any user name, the key as password), or OAuth 2.0 through authlib: the
  client-credentials grant, or a refresh token. A token is refreshed ``token_leeway_s`` before it
  expires, and again when the provider answers 401 to it (revoked or rotated early); the request
  is then sent once more. A refresh token the provider rotates is used from then on, and goes to
  ``on_token`` (the service passes none yet: no provider it connects to rotates them).
  Secrets are never in a repr, a log line or an error.
- **Rate**: at most ``rate_share`` (95%) of the provider's published rate (pyrate-limiter's
  sliding window); a request waits for its turn without holding the event loop. Not all of it:
  the provider counts arrivals, and a request sent on the limit can arrive a little early on
  the one before it (make bench-sync: 18 of 519 HubSpot searches answered 429 at 100%, each
  costing a backoff).
- **Retries** (stamina: exponential backoff with full jitter, bounded attempts and total time):
  429 and 503 wait what the answer says (``Retry-After`` in seconds or as an HTTP date, else
  ``X-RateLimit-Reset``), capped; other 5xx, 408 and transport errors back off. Any other 4xx
  is the caller's: ``ProviderRefused`` at once, never retried.
- **Circuit breaker** (circuitbreaker): requests failing in a row after their retries open it;
  while open a request fails at once with ``ProviderUnavailable`` and the connector tries again
  on its next run.
- **Bounds**: each answer is read up to ``max_answer_bytes``; a request has a timeout.
"""

from __future__ import annotations

import contextlib
import email.utils
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx2
import orjson
import stamina
from authlib.integrations.base_client import OAuthError
from authlib.integrations.httpx_client import AsyncOAuth2Client
from circuitbreaker import CircuitBreaker, CircuitBreakerError
from pyrate_limiter import Duration, Limiter, Rate

# Statuses worth another attempt: the provider is overloaded (429, 503), failing (5xx) or timed
# out reading the request (408). Everything else is an answer.
RETRIED_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


# --- credentials --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key sent in a header: ``Authorization: Bearer <key>`` unless told otherwise."""

    key: str = field(repr=False)
    header: str = "Authorization"
    scheme: str = "Bearer"

    def headers(self) -> dict[str, str]:
        return {self.header: f"{self.scheme} {self.key}" if self.scheme else self.key}


@dataclass(frozen=True, slots=True)
class BasicAuth:
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class OAuthClientCredentials:
    """OAuth 2.0's client-credentials grant (RFC 6749 section 4.4)."""

    token_url: str
    client_id: str
    client_secret: str = field(repr=False)
    scope: str = ""


@dataclass(frozen=True, slots=True)
class OAuthRefreshToken:
    """A refresh token granted to Sendtime once (RFC 6749 section 6), traded for access tokens."""

    token_url: str
    client_id: str
    client_secret: str = field(repr=False)
    refresh_token: str = field(repr=False)


Credentials = ApiKey | BasicAuth | OAuthClientCredentials | OAuthRefreshToken


# --- what can go wrong ----------------------------------------------------------------------------


class ProviderError(Exception):
    """A request to a provider that did not get what it asked for."""

    def __init__(self, provider: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider = provider
        self.status = status


class ProviderRefused(ProviderError):
    """The provider answered no (a 4xx other than 408 and 429, or a 401 with a fresh token):
    sending the same request again would get the same answer. ``answer``: the provider's answer,
    when there was one, for a caller that reads per-item errors from it (never logged: it may
    hold personal data)."""

    def __init__(
        self, provider: str, message: str, status: int | None = None, answer: ProviderAnswer | None = None
    ) -> None:
        super().__init__(provider, message, status)
        self.answer = answer


class ProviderUnavailable(ProviderError):
    """No answer worth having after the retries (no answer, 5xx, 429), or the breaker is open:
    try again later. ``retry_after_s``: when the provider said it would take requests again."""

    def __init__(
        self, provider: str, message: str, status: int | None = None, retry_after_s: float | None = None
    ):
        super().__init__(provider, message, status)
        self.retry_after_s = retry_after_s


class _RetryableAnswer(Exception):
    """An answer worth another attempt; ``wait_s`` is what the provider asked us to wait."""

    def __init__(self, status: int, wait_s: float | None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.wait_s = wait_s


# --- policy ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProviderLimits:
    """How a connector may call one provider."""

    requests: int  # the published rate: at most ``requests`` ...
    per_s: float  # ... in any ``per_s`` seconds
    rate_share: float = 0.95  # of the published rate used: the margin for arrival jitter
    timeout_s: float = 30.0  # one request, connect to last byte
    attempts: int = 6  # per request, the first included
    retry_budget_s: float = 120.0  # all the attempts of one request, waits included
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    max_retry_after_s: float = 60.0  # a longer Retry-After ends the request: the next run retries
    max_answer_bytes: int = 16 * 1024 * 1024
    breaker_failures: int = 5  # requests in a row that ended ProviderUnavailable
    breaker_recovery_s: float = 60.0
    token_leeway_s: float = 60.0  # refresh an access token this long before it expires


@dataclass(frozen=True, slots=True)
class ProviderAnswer:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON.

        Raises:
            ValueError: it is not JSON.
        """
        return orjson.loads(self.body)


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """How long the provider asked to wait: ``Retry-After`` (seconds, or an HTTP date), else
    ``X-RateLimit-Reset`` (an epoch second, as SendGrid and Braze send it, or seconds to go);
    None when neither says."""
    now = time.time() if now is None else now
    value = headers.get("retry-after")
    if value:
        value = value.strip()
        if value.isdigit():
            return float(value)
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - now)
    reset = headers.get("x-ratelimit-reset")
    if reset:
        try:
            seconds = float(reset)
        except ValueError:
            return None
        return max(0.0, seconds - now) if seconds > 1e9 else max(0.0, seconds)
    return None


def _worth_retrying(exc: Exception) -> bool | float:
    """stamina's backoff hook: retry transport errors and retryable answers; wait what the
    provider asked for when it did."""
    if isinstance(exc, _RetryableAnswer):
        return exc.wait_s if exc.wait_s is not None else True
    return isinstance(exc, httpx2.TransportError)


# --- the client -----------------------------------------------------------------------------------

TokenSaver = Callable[[Mapping[str, Any]], Awaitable[None]]


class ProviderApi:
    """One provider's API, for one connector (see the module's text)."""

    def __init__(
        self,
        provider: str,
        base_url: str,
        credentials: Credentials,
        limits: ProviderLimits,
        *,
        on_token: TokenSaver | None = None,
        user_agent: str = "sendtime-sync/1",
    ) -> None:
        self.provider = provider
        self.limits = limits
        self._credentials = credentials
        self._on_token = on_token
        timeout = httpx2.Timeout(limits.timeout_s)
        headers = {"User-Agent": user_agent, "Accept": "application/json"}
        self._oauth: AsyncOAuth2Client | None = None
        self._client: httpx2.AsyncClient
        match credentials:
            case ApiKey():
                self._client = httpx2.AsyncClient(
                    base_url=base_url, headers={**headers, **credentials.headers()}, timeout=timeout
                )
            case BasicAuth(username=username, password=password):
                self._client = httpx2.AsyncClient(
                    base_url=base_url,
                    headers=headers,
                    timeout=timeout,
                    auth=httpx2.BasicAuth(username, password),
                )
            case OAuthClientCredentials() | OAuthRefreshToken():
                self._oauth = AsyncOAuth2Client(
                    client_id=credentials.client_id,
                    client_secret=credentials.client_secret,
                    scope=getattr(credentials, "scope", None) or None,
                    token_endpoint=credentials.token_url,
                    grant_type=(
                        "client_credentials"
                        if isinstance(credentials, OAuthClientCredentials)
                        else "refresh_token"
                    ),
                    token=self._initial_token(credentials),
                    update_token=self._token_changed,
                    leeway=int(limits.token_leeway_s),
                    base_url=base_url,
                    headers=headers,
                    timeout=timeout,
                )
                # A token endpoint overloaded or failing is retried like any request.
                self._oauth.register_compliance_hook("access_token_response", _check_token_answer)
                self._oauth.register_compliance_hook("refresh_token_response", _check_token_answer)
                self._client = self._oauth
        window_ms = int(limits.per_s * Duration.SECOND / limits.rate_share)
        self._limiter = Limiter(Rate(limits.requests, window_ms), buffer_ms=0)
        # ProviderUnavailable counts as a failure; any answer, a refusal too, closes the count.
        self._breaker = CircuitBreaker(
            failure_threshold=limits.breaker_failures,
            recovery_timeout=limits.breaker_recovery_s,
            expected_exception=ProviderUnavailable,
            name=f"{provider}-{id(self)}",
        )
        self._guarded = self._breaker.decorate(self._with_retries)
        self.requests_sent = 0  # attempts, retries and token requests included
        self.retries = 0

    @staticmethod
    def _initial_token(credentials: OAuthClientCredentials | OAuthRefreshToken) -> dict[str, Any] | None:
        if isinstance(credentials, OAuthRefreshToken):
            # Expired from the start: the first request trades the refresh token for an access token.
            return {
                "access_token": "",
                "token_type": "Bearer",
                "refresh_token": credentials.refresh_token,
                "expires_at": 0,
            }
        return None

    async def _token_changed(self, token: Mapping[str, Any], **_: Any) -> None:
        if self._on_token is not None:
            await self._on_token(token)

    @property
    def breaker_open(self) -> bool:
        return bool(self._breaker.opened)

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        json: Any = None,
    ) -> ProviderAnswer:
        """Send one request (with its retries) and return the provider's 2xx answer.

        Raises:
            ProviderRefused: a 4xx answer that another attempt would not change.
            ProviderUnavailable: no 2xx after the retries, or the breaker is open.
        """
        try:
            answer: ProviderAnswer = await self._guarded(method, path, params, json)
        except CircuitBreakerError:
            raise ProviderUnavailable(
                self.provider,
                f"circuit open after {self.limits.breaker_failures} failed requests in a row",
                retry_after_s=self._breaker.open_remaining,
            ) from None
        return answer

    async def _with_retries(
        self, method: str, path: str, params: Mapping[str, str | int] | None, json: Any
    ) -> ProviderAnswer:
        limits = self.limits
        last: Exception | None = None
        try:
            async for attempt in stamina.retry_context(
                on=_worth_retrying,
                attempts=limits.attempts,
                timeout=limits.retry_budget_s,
                wait_initial=limits.backoff_initial_s,
                wait_max=limits.backoff_max_s,
                wait_jitter=limits.backoff_initial_s,
            ):
                if attempt.num > 1:
                    self.retries += 1
                with attempt:
                    try:
                        return await self._send_once(method, path, params, json)
                    except (_RetryableAnswer, httpx2.TransportError) as exc:
                        last = exc
                        raise
        except _RetryableAnswer as exc:
            raise ProviderUnavailable(
                self.provider, f"HTTP {exc.status} after {limits.attempts} attempts", exc.status, exc.wait_s
            ) from None
        except httpx2.TransportError as exc:
            raise ProviderUnavailable(self.provider, f"no answer: {type(exc).__name__}") from None
        raise ProviderUnavailable(self.provider, f"gave up: {last!r}")  # pragma: no cover - stamina re-raises

    async def _send_once(
        self, method: str, path: str, params: Mapping[str, str | int] | None, json: Any
    ) -> ProviderAnswer:
        await self._authenticated()
        answer = await self._send(method, path, params, json)
        if answer.status == 401 and self._oauth is not None:
            # Revoked or rotated before its time: a new token, then the same request once more.
            await self._new_token()
            answer = await self._send(method, path, params, json)
        if 200 <= answer.status < 300:
            return answer
        if answer.status in RETRIED_STATUSES:
            wait = retry_after_s(answer.headers) if answer.status in (429, 503) else None
            if wait is not None and wait > self.limits.max_retry_after_s:
                raise ProviderUnavailable(
                    self.provider, f"HTTP {answer.status}, asked to wait {wait:.0f} s", answer.status, wait
                )
            raise _RetryableAnswer(answer.status, wait)
        raise ProviderRefused(
            self.provider, f"HTTP {answer.status}: {_reason(answer)}", answer.status, answer
        )

    async def _send(
        self, method: str, path: str, params: Mapping[str, str | int] | None, json: Any
    ) -> ProviderAnswer:
        await self._limiter.try_acquire_async(self.provider)
        self.requests_sent += 1
        content = None if json is None else orjson.dumps(json)
        headers = None if content is None else {"Content-Type": "application/json"}
        with self._token_errors():  # authlib refreshes an expiring token inside the request
            return await self._read(method, path, params, content, headers)

    async def _read(
        self,
        method: str,
        path: str,
        params: Mapping[str, str | int] | None,
        content: bytes | None,
        headers: Mapping[str, str] | None,
    ) -> ProviderAnswer:
        async with self._client.stream(
            method, path, params=params, content=content, headers=headers
        ) as response:
            body = bytearray()
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > self.limits.max_answer_bytes:
                    raise ProviderRefused(
                        self.provider,
                        f"answer over {self.limits.max_answer_bytes:,} bytes",
                        response.status_code,
                    )
            return ProviderAnswer(response.status_code, response.headers, bytes(body))

    async def _authenticated(self) -> None:
        """An OAuth client's first token (client credentials); authlib refreshes it from then on."""
        if self._oauth is not None and not self._oauth.token:
            await self._new_token()

    async def _new_token(self) -> None:
        assert self._oauth is not None
        credentials = self._credentials
        await self._limiter.try_acquire_async(self.provider)
        self.requests_sent += 1
        with self._token_errors():
            if isinstance(credentials, OAuthClientCredentials):
                token = await self._oauth.fetch_token(credentials.token_url, grant_type="client_credentials")
                await self._token_changed(token)
            else:
                assert isinstance(credentials, OAuthRefreshToken)
                current = self._oauth.token or {}
                await self._oauth.refresh_token(
                    credentials.token_url,
                    refresh_token=current.get("refresh_token") or credentials.refresh_token,
                )

    @contextlib.contextmanager
    def _token_errors(self) -> Iterator[None]:
        """The token endpoint's refusals as ProviderRefused: invalid_grant or invalid_client
        mean the grant is gone and a person must connect the provider again."""
        try:
            yield
        except OAuthError as exc:
            raise ProviderRefused(self.provider, f"token endpoint refused: {exc.error}", 400) from None
        except ValueError:  # a 4xx that is not OAuth's JSON error
            raise ProviderRefused(self.provider, "token endpoint answered no token") from None

    async def aclose(self) -> None:
        await self._client.aclose()


def _check_token_answer(response: httpx2.Response) -> httpx2.Response:
    """authlib's compliance hook on the token endpoint's answer, before it is parsed."""
    if response.status_code in RETRIED_STATUSES:
        raise _RetryableAnswer(response.status_code, retry_after_s(response.headers))
    return response


def _reason(answer: ProviderAnswer) -> str:
    """What kind of error the provider reported, for logs and errors: its machine-readable code
    (HubSpot's ``category``, Mailchimp's ``title``, an ``error`` code, SendGrid's
    ``errors[0].field``). Never its message or body: those may echo an address or a name."""
    try:
        data = answer.json()
    except ValueError:
        return "(not JSON)"
    code: Any = None
    if isinstance(data, dict):
        code = data.get("category") or data.get("title") or data.get("error")
        errors = data.get("errors")
        if not code and isinstance(errors, list) and errors and isinstance(errors[0], dict):
            code = f"field {errors[0].get('field')}"
    return str(code)[:100] if isinstance(code, str) and code else "(no error code)"
