"""sync.provider_http against a local provider (tests/sync/provider_server.py): credentials and
OAuth 2.0 grants, refresh before expiry and on a 401, retries that wait what the provider asks,
refusals never retried, the published rate, the circuit breaker, the answer bound."""

from __future__ import annotations

import math
import socket
import time
from collections.abc import AsyncIterator, Mapping
from email.utils import formatdate
from types import SimpleNamespace
from typing import Any

import httpx2
import pytest
from authlib.oauth2.rfc6749 import wrappers as authlib_wrappers

from sync.provider_http import (
    ApiKey,
    BasicAuth,
    OAuthClientCredentials,
    OAuthRefreshToken,
    ProviderApi,
    ProviderLimits,
    ProviderRefused,
    ProviderUnavailable,
    retry_after_s,
)
from tests.sync.provider_server import ProviderServer, Scripted

# Fast backoff so that the tests do not wait: the behaviour, not the durations, is under test.
QUICK = ProviderLimits(requests=1000, per_s=1.0, backoff_initial_s=0.01, backoff_max_s=0.05, attempts=4)


@pytest.fixture
async def provider() -> AsyncIterator[ProviderServer]:
    server = await ProviderServer(api_key="key-1").start()
    yield server
    await server.stop()


async def _api(
    server: ProviderServer, credentials: Any = None, limits: ProviderLimits = QUICK, **kw: Any
) -> ProviderApi:
    return ProviderApi("fake", server.url, credentials or ApiKey("key-1"), limits, **kw)


async def test_an_api_key_goes_in_the_authorization_header_and_the_json_answer_comes_back(
    provider: ProviderServer,
) -> None:
    api = await _api(provider)
    answer = await api.request("GET", "/things")
    await api.aclose()
    assert answer.status == 200 and answer.json() == {"things": [1, 2, 3]}
    assert [s.authorization for s in provider.seen] == ["Bearer key-1"]


async def test_a_wrong_key_is_refused_at_once_never_retried(provider: ProviderServer) -> None:
    api = await _api(provider, ApiKey("wrong"))
    with pytest.raises(ProviderRefused) as refused:
        await api.request("GET", "/things")
    await api.aclose()
    assert refused.value.status == 401 and "INVALID_AUTHENTICATION" in str(refused.value)
    assert len(provider.seen) == 1


async def test_a_refusal_names_the_providers_error_code_never_its_message(provider: ProviderServer) -> None:
    body = b'{"status":"error","message":"Contact already exists: ada@example.com","category":"CONFLICT"}'
    provider.script.append(Scripted(409, body=body))
    api = await _api(provider)
    with pytest.raises(ProviderRefused) as refused:
        await api.request("GET", "/things")
    await api.aclose()
    assert str(refused.value) == "fake: HTTP 409: CONFLICT"
    assert "ada@" not in str(refused.value)


async def test_5xx_and_no_answer_are_retried_with_backoff_until_an_answer(provider: ProviderServer) -> None:
    provider.script.extend([Scripted(502), Scripted(500)])
    api = await _api(provider)
    answer = await api.request("GET", "/things")
    await api.aclose()
    assert answer.status == 200
    assert len(provider.seen) == 3 and api.retries == 2


async def test_429_waits_the_seconds_retry_after_asks_for(provider: ProviderServer) -> None:
    provider.script.append(Scripted(429, headers={"Retry-After": "1"}))
    api = await _api(provider)
    await api.request("GET", "/things")
    await api.aclose()
    first, second = provider.seen
    assert second.at - first.at >= 0.95  # its own backoff here would be 10-50 ms


async def test_503_waits_until_the_http_date_retry_after_names(provider: ProviderServer) -> None:
    # An HTTP date has whole seconds: a whole second 2 to 3 s from now, against the wall clock (the
    # client waits the date less its own time.time()), so scheduling delays only make it later.
    date = math.floor(time.time()) + 3
    provider.script.append(Scripted(503, headers={"Retry-After": formatdate(date, usegmt=True)}))
    api = await _api(provider)
    await api.request("GET", "/things")
    await api.aclose()
    first, second = provider.seen
    assert first.wall < date  # so the retry had a wait to honour (its own backoff: 10-50 ms)
    assert second.wall >= date - 0.01  # never before the date named (0.01: the timer's resolution)


def test_retry_after_forms() -> None:
    now = 1_800_000_000.0
    assert retry_after_s({"retry-after": "7"}, now) == 7.0
    assert retry_after_s({"retry-after": formatdate(now + 30, usegmt=True)}, now) == pytest.approx(30, abs=1)
    assert retry_after_s({"retry-after": formatdate(now - 30, usegmt=True)}, now) == 0.0
    assert retry_after_s({"x-ratelimit-reset": str(int(now + 12))}, now) == 12.0  # SendGrid, Braze: epoch
    assert retry_after_s({"x-ratelimit-reset": "3"}, now) == 3.0
    assert retry_after_s({"retry-after": "soon"}, now) is None
    assert retry_after_s({}, now) is None


async def test_a_retry_after_longer_than_the_cap_ends_the_request_for_the_next_run(
    provider: ProviderServer,
) -> None:
    provider.script.append(Scripted(429, headers={"Retry-After": "3600"}))
    api = await _api(provider)
    with pytest.raises(ProviderUnavailable) as unavailable:
        await api.request("GET", "/things")
    await api.aclose()
    assert unavailable.value.retry_after_s == 3600.0 and unavailable.value.status == 429
    assert len(provider.seen) == 1


async def test_failing_requests_open_the_breaker_then_fail_at_once(provider: ProviderServer) -> None:
    limits = ProviderLimits(
        requests=1000, per_s=1.0, backoff_initial_s=0.01, backoff_max_s=0.02, attempts=2, breaker_failures=2
    )
    provider.script.extend(Scripted(500) for _ in range(4))
    api = await _api(provider, limits=limits)
    for _ in range(2):
        with pytest.raises(ProviderUnavailable, match="HTTP 500 after 2 attempts"):
            await api.request("GET", "/things")
    assert len(provider.seen) == 4 and api.breaker_open
    with pytest.raises(ProviderUnavailable, match="circuit open") as open_:
        await api.request("GET", "/things")
    await api.aclose()
    assert len(provider.seen) == 4  # no request while open
    assert open_.value.retry_after_s is not None and 0 < open_.value.retry_after_s <= 60


async def test_a_refusal_is_an_answer_and_does_not_count_toward_the_breaker(provider: ProviderServer) -> None:
    limits = ProviderLimits(requests=1000, per_s=1.0, backoff_initial_s=0.01, attempts=1, breaker_failures=2)
    provider.script.extend([Scripted(500), Scripted(404), Scripted(500)])
    api = await _api(provider, limits=limits)
    for expected in (ProviderUnavailable, ProviderRefused, ProviderUnavailable):
        with pytest.raises(expected):
            await api.request("GET", "/things")
    assert not api.breaker_open
    await api.aclose()


async def test_no_answer_is_retried_then_unavailable() -> None:
    with socket.socket() as listener:  # a port nobody listens on
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
    api = ProviderApi("fake", f"http://127.0.0.1:{port}", ApiKey("k"), QUICK)
    with pytest.raises(ProviderUnavailable, match="no answer: ConnectError"):
        await api.request("GET", "/things")
    assert api.retries == QUICK.attempts - 1
    await api.aclose()


async def test_the_published_rate_is_never_exceeded(
    provider: ProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # When each request leaves: the limiter's decision. The local provider's arrival times also
    # carry this process's scheduling (it shares the event loop), which on a loaded machine
    # exceeded the 5% margin meant for network jitter; that margin is measured by make bench-sync.
    sent: list[float] = []
    send = httpx2.AsyncClient.send

    async def recording_send(
        client: httpx2.AsyncClient, request: httpx2.Request, **kw: Any
    ) -> httpx2.Response:
        sent.append(time.monotonic())
        return await send(client, request, **kw)

    monkeypatch.setattr(httpx2.AsyncClient, "send", recording_send)
    limits = ProviderLimits(requests=4, per_s=0.5)
    api = await _api(provider, limits=limits)
    for _ in range(10):
        await api.request("GET", "/things")
    await api.aclose()
    # any 5 requests in a row span at least the window (stretched by the 95% share, whole ms): the
    # fifth waited for the first to leave it
    window_s = int(1000 * 0.5 / 0.95) / 1000
    assert min(later - earlier for earlier, later in zip(sent, sent[4:], strict=False)) >= window_s - 0.001
    assert len(sent) == 10 and len(provider.seen) == 10


async def test_an_answer_over_the_bound_is_refused(provider: ProviderServer) -> None:
    provider.script.append(Scripted(200, body=b'{"x":"' + b"y" * 5000 + b'"}'))
    api = await _api(provider, limits=ProviderLimits(requests=100, per_s=1.0, max_answer_bytes=4096))
    with pytest.raises(ProviderRefused, match="answer over 4,096 bytes"):
        await api.request("GET", "/things")
    await api.aclose()


def test_secrets_are_never_in_a_repr() -> None:
    shown = repr(
        [
            ApiKey("key-secret"),
            BasicAuth("any", "pw-secret"),
            OAuthClientCredentials("https://x/token", "id", "client-secret"),
            OAuthRefreshToken("https://x/token", "id", "client-secret", "refresh-secret"),
        ]
    )
    assert "secret" not in shown.replace("client_secret", "").replace("OAuthClientCredentials", "")


# --- OAuth 2.0 -------------------------------------------------------------------------------------


@pytest.fixture
async def oauth_provider() -> AsyncIterator[ProviderServer]:
    server = await ProviderServer(rotate_refresh_tokens=True).start()
    yield server
    await server.stop()


async def test_client_credentials_fetch_a_token_once_and_use_it(oauth_provider: ProviderServer) -> None:
    credentials = OAuthClientCredentials(oauth_provider.token_url, "sendtime", "s3cret", scope="contacts")
    api = await _api(oauth_provider, credentials)
    for _ in range(3):
        await api.request("GET", "/things")
    await api.aclose()
    assert [r["grant_type"] for r in oauth_provider.token_requests] == ["client_credentials"]
    assert oauth_provider.token_requests[0]["scope"] == "contacts"
    assert len({s.authorization for s in oauth_provider.seen}) == 1


async def test_a_token_is_renewed_before_it_expires_not_after_a_401(
    oauth_provider: ProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # authlib's clock for a token's expires_at (set when the answer is parsed) and its expiry check,
    # faked: the leeway is decided on this clock, not on how fast the machine runs. The provider's
    # own clock is real, so the first token stays valid there for the whole test: had the client not
    # renewed it, the last request would still pass with the old token, and no second token.
    now = [1_800_000_000.0]
    monkeypatch.setattr(authlib_wrappers, "time", SimpleNamespace(time=lambda: now[0]))
    oauth_provider.token_lifetime_s = 120
    credentials = OAuthClientCredentials(oauth_provider.token_url, "sendtime", "s3cret")
    limits = ProviderLimits(requests=1000, per_s=1.0, token_leeway_s=60)
    api = await _api(oauth_provider, credentials, limits=limits)
    await api.request("GET", "/things")
    now[0] += 59  # 61 s before it expires: outside the leeway, the same token
    await api.request("GET", "/things")
    now[0] += 2  # 59 s before it expires: inside the leeway, a new one before this request
    await api.request("GET", "/things")
    await api.aclose()
    assert [r["grant_type"] for r in oauth_provider.token_requests] == ["client_credentials"] * 2
    # three API requests, none refused and sent again: the renewal came before, not after a 401
    first, same, renewed = (s.authorization for s in oauth_provider.seen)
    assert first == same != renewed


async def test_the_refresh_token_is_traded_and_a_rotated_one_kept(oauth_provider: ProviderServer) -> None:
    saved: list[Mapping[str, Any]] = []

    async def keep(token: Mapping[str, Any]) -> None:
        saved.append(dict(token))

    credentials = OAuthRefreshToken(oauth_provider.token_url, "sendtime", "s3cret", "refresh-1")
    api = await _api(oauth_provider, credentials, on_token=keep)
    await api.request("GET", "/things")
    oauth_provider.revoke_tokens()  # e.g. the provider rotated its keys: the next request gets a 401
    await api.request("GET", "/things")
    await api.aclose()
    grants = [(r["grant_type"], r["refresh_token"]) for r in oauth_provider.token_requests]
    assert grants[0] == ("refresh_token", "refresh-1")
    assert grants[1] == ("refresh_token", saved[0]["refresh_token"])  # the rotated one
    assert saved[-1]["refresh_token"] == oauth_provider.refresh_token
    # 200; 401 (revoked); the same request again with the new token: 200
    first, refused, again = (s.authorization for s in oauth_provider.seen)
    assert first == refused != again


async def test_a_401_with_a_fresh_token_is_a_refusal(oauth_provider: ProviderServer) -> None:
    body = b'{"category":"INVALID_AUTHENTICATION"}'
    oauth_provider.script.extend([Scripted(401, body=body), Scripted(401, body=body)])
    credentials = OAuthClientCredentials(oauth_provider.token_url, "sendtime", "s3cret")
    api = await _api(oauth_provider, credentials)
    with pytest.raises(ProviderRefused, match="HTTP 401"):
        await api.request("GET", "/things")
    await api.aclose()
    assert len(oauth_provider.token_requests) == 2 and len(oauth_provider.seen) == 2


async def test_a_grant_gone_is_a_refusal_naming_the_oauth_error(oauth_provider: ProviderServer) -> None:
    credentials = OAuthRefreshToken(oauth_provider.token_url, "sendtime", "s3cret", "revoked-long-ago")
    api = await _api(oauth_provider, credentials)
    with pytest.raises(ProviderRefused, match="token endpoint refused: invalid_grant"):
        await api.request("GET", "/things")
    await api.aclose()
    assert oauth_provider.seen == []


async def test_an_overloaded_token_endpoint_is_retried(oauth_provider: ProviderServer) -> None:
    oauth_provider.token_script.extend([Scripted(503), Scripted(429, headers={"Retry-After": "0"})])
    credentials = OAuthClientCredentials(oauth_provider.token_url, "sendtime", "s3cret")
    api = await _api(oauth_provider, credentials)
    answer = await api.request("GET", "/things")
    await api.aclose()
    assert answer.status == 200 and len(oauth_provider.token_requests) == 3
