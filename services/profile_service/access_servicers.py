"""gRPC handlers of KeyService and AuditService (sendtime.auth.v1), which the profile service
hosts: decode and check, call the key store or audit trail, encode."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
from google.protobuf import timestamp_pb2
from google.rpc import code_pb2

from sendtime.auth.v1 import auth_pb2, auth_pb2_grpc
from sendtime_common.auth.access import current_principal
from sendtime_common.auth.api_keys import Scope, key_resource_name, valid_key_id
from sendtime_common.auth.audit import AuditRecord, AuditTrail
from sendtime_common.auth.key_store import ApiKeyRecord, KeyNotActive, KeyNotFound, KeyState, KeyStore
from sendtime_common.errors import (
    FieldViolation,
    abort_invalid,
    abort_with,
    error_info_status,
    not_found_status,
)
from sendtime_common.paging import InvalidPageToken, decode_time_position, encode_time_position, page_size
from sendtime_common.rate_limit import Rate

MAX_DISPLAY_NAME = 200
MAX_GRACE = timedelta(days=30)
MAX_RATE = 1_000_000  # calls a second, and calls at once, of a key's own rate limit
_STATES = {
    KeyState.ACTIVE: auth_pb2.API_KEY_STATE_ACTIVE,
    KeyState.REVOKED: auth_pb2.API_KEY_STATE_REVOKED,
    KeyState.EXPIRED: auth_pb2.API_KEY_STATE_EXPIRED,
}

Context = grpc.aio.ServicerContext[Any, Any]
K = TypeVar("K")


def _timestamp(at: datetime | None) -> timestamp_pb2.Timestamp | None:
    if at is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(at)
    return stamp


def api_key_message(record: ApiKeyRecord, now: datetime) -> auth_pb2.ApiKey:
    return auth_pb2.ApiKey(
        name=key_resource_name(record.key_id),
        key_id=record.key_id,
        display_name=record.display_name,
        scopes=sorted(scope.proto for scope in record.scopes),
        creator=record.creator,
        create_time=_timestamp(record.created_at),
        expire_time=_timestamp(record.expires_at),
        last_use_time=_timestamp(record.last_used_at),
        revoke_time=_timestamp(record.revoked_at),
        state=_STATES[record.state(now)],
        rotated_from=key_resource_name(record.rotated_from) if record.rotated_from else "",
        rate_limits=[
            auth_pb2.RateLimit(scope=scope.proto, calls_per_second=rate.per_second, burst=rate.burst)
            for scope, rate in sorted(record.rate_limits.items(), key=lambda item: item[0].proto)
        ],
    )


def audit_event_message(record: AuditRecord) -> auth_pb2.AuditEvent:
    return auth_pb2.AuditEvent(
        name=f"auditEvents/{record.id}",
        time=_timestamp(record.at),
        principal=record.principal,
        method=record.method,
        target=record.target,
        outcome=record.outcome,
        service=record.service,
    )


def _key_id(name: str, field: str) -> str | FieldViolation:
    key_id = name.removeprefix("apiKeys/")
    if key_id == name or not valid_key_id(key_id):
        return FieldViolation(field, "must be apiKeys/{key_id}, the key id being 12 letters and digits")
    return key_id


def _scope_violations(scopes: list[int]) -> list[FieldViolation]:
    if not scopes:
        return [FieldViolation("scopes", "at least one scope")]
    violations = []
    for i, value in enumerate(scopes):
        try:
            Scope.from_proto(value)
        except ValueError:
            violations.append(FieldViolation(f"scopes[{i}]", f"not a scope; scopes are {', '.join(Scope)}"))
    return violations


def _known(values: Iterable[int]) -> list[Scope]:
    """The scopes among ``values`` (a request's; _scope_violations reports the others)."""
    known = []
    for value in values:
        try:
            known.append(Scope.from_proto(value))
        except ValueError:
            pass
    return known


def _rate_limits(
    limits: Sequence[auth_pb2.RateLimit], scopes: Iterable[Scope], field: str
) -> tuple[dict[Scope, Rate], list[FieldViolation]]:
    """A key's own rate limits as requested, at most one per scope, each for one of ``scopes``
    (the key's); and what is wrong with them."""
    held = frozenset(scopes)
    found: dict[Scope, Rate] = {}
    violations: list[FieldViolation] = []
    for i, limit in enumerate(limits):
        wrong: list[FieldViolation] = []
        try:
            scope: Scope | None = Scope.from_proto(limit.scope)
        except ValueError:
            scope = None
            wrong.append(FieldViolation(f"{field}[{i}].scope", "not a scope"))
        if scope is not None and scope not in held:
            wrong.append(
                FieldViolation(f"{field}[{i}].scope", f"{scope.value} is not one of the key's scopes")
            )
        elif scope is not None and scope in found:
            wrong.append(FieldViolation(f"{field}[{i}].scope", f"{scope.value} has a rate limit already"))
        if not 0 < limit.calls_per_second <= MAX_RATE:  # NaN fails this too
            wrong.append(
                FieldViolation(f"{field}[{i}].calls_per_second", f"must be above 0 and at most {MAX_RATE:,}")
            )
        if not 1 <= limit.burst <= MAX_RATE:
            wrong.append(FieldViolation(f"{field}[{i}].burst", f"must be 1 to {MAX_RATE:,}"))
        if scope is not None and not wrong:
            found[scope] = Rate(limit.calls_per_second, limit.burst)
        violations += wrong
    return found, violations


class PagedRequest(Protocol):
    page_size: int
    page_token: str


async def _page(
    request: PagedRequest, filters: dict[str, Any], key: Callable[[Any], K], context: Context, method: str
) -> tuple[int, tuple[datetime, K] | None]:
    """The page size and the position after which the page starts (AIP-158), or the call ends
    with INVALID_ARGUMENT naming the bad field."""
    try:
        size = page_size(request.page_size)
    except ValueError as exc:
        await abort_invalid(context, f"invalid {method} request", [FieldViolation("page_size", str(exc))])
    try:
        after = decode_time_position(request.page_token, filters, key) if request.page_token else None
    except InvalidPageToken as exc:
        await abort_invalid(context, f"invalid {method} request", [FieldViolation("page_token", str(exc))])
    return size, after


async def _abort_key_not_found(context: Context, name: str) -> NoReturn:
    await abort_with(context, not_found_status(f"no {name}", "API_KEY_NOT_FOUND", {"name": name}))


class KeyServicer(auth_pb2_grpc.KeyServiceServicer):
    def __init__(self, keys: KeyStore) -> None:
        self._keys = keys

    async def CreateApiKey(
        self, request: auth_pb2.CreateApiKeyRequest, context: Context
    ) -> auth_pb2.CreateApiKeyResponse:
        now = datetime.now(UTC)
        violations = _scope_violations(list(request.scopes))
        display_name = request.display_name.strip()
        if not display_name or len(display_name) > MAX_DISPLAY_NAME:
            violations.append(
                FieldViolation("display_name", f"required, at most {MAX_DISPLAY_NAME} characters")
            )
        expires_at = request.expire_time.ToDatetime(tzinfo=UTC) if request.HasField("expire_time") else None
        if expires_at is not None and expires_at <= now:
            violations.append(FieldViolation("expire_time", "must be in the future"))
        rate_limits, rate_violations = _rate_limits(
            request.rate_limits, _known(request.scopes), "rate_limits"
        )
        violations += rate_violations
        if violations:
            await abort_invalid(context, "invalid CreateApiKey request", violations)
        record, key = await self._keys.create(
            display_name,
            [Scope.from_proto(value) for value in request.scopes],
            current_principal().name,
            expires_at,
            rate_limits,
        )
        return auth_pb2.CreateApiKeyResponse(api_key=api_key_message(record, now), key=key)

    async def GetApiKey(
        self, request: auth_pb2.GetApiKeyRequest, context: Context
    ) -> auth_pb2.GetApiKeyResponse:
        key_id = _key_id(request.name, "name")
        if isinstance(key_id, FieldViolation):
            await abort_invalid(context, "invalid GetApiKey request", [key_id])
        record = await self._keys.get(key_id)
        if record is None:
            await _abort_key_not_found(context, request.name)
        return auth_pb2.GetApiKeyResponse(api_key=api_key_message(record, datetime.now(UTC)))

    async def ListApiKeys(
        self, request: auth_pb2.ListApiKeysRequest, context: Context
    ) -> auth_pb2.ListApiKeysResponse:
        filters = {"show_inactive": request.show_inactive}
        size, after = await _page(request, filters, str, context, "ListApiKeys")
        now = datetime.now(UTC)
        records = await self._keys.page(size + 1, after, include_inactive=request.show_inactive, now=now)
        page, more = records[:size], len(records) > size
        token = encode_time_position(page[-1].created_at, page[-1].key_id, filters) if more else ""
        return auth_pb2.ListApiKeysResponse(
            api_keys=[api_key_message(record, now) for record in page], next_page_token=token
        )

    async def RotateApiKey(
        self, request: auth_pb2.RotateApiKeyRequest, context: Context
    ) -> auth_pb2.RotateApiKeyResponse:
        violations: list[FieldViolation] = []
        key_id = _key_id(request.name, "name")
        if isinstance(key_id, FieldViolation):
            violations.append(key_id)
        grace = request.old_key_grace_period.ToTimedelta()
        if not timedelta(0) <= grace <= MAX_GRACE:
            violations.append(FieldViolation("old_key_grace_period", "must be 0 to 30 days"))
        if violations or isinstance(key_id, FieldViolation):
            await abort_invalid(context, "invalid RotateApiKey request", violations)
        now = datetime.now(UTC)
        try:
            new, key, old = await self._keys.rotate(key_id, grace, current_principal().name, now)
        except KeyNotFound:
            await _abort_key_not_found(context, request.name)
        except KeyNotActive as exc:
            await abort_with(
                context,
                error_info_status(
                    code_pb2.FAILED_PRECONDITION,
                    f"{request.name} cannot be rotated: {exc}",
                    "API_KEY_NOT_ACTIVE",
                    {"name": request.name},
                ),
            )
        return auth_pb2.RotateApiKeyResponse(
            api_key=api_key_message(new, now), key=key, replaced_api_key=api_key_message(old, now)
        )

    async def RevokeApiKey(
        self, request: auth_pb2.RevokeApiKeyRequest, context: Context
    ) -> auth_pb2.RevokeApiKeyResponse:
        key_id = _key_id(request.name, "name")
        if isinstance(key_id, FieldViolation):
            await abort_invalid(context, "invalid RevokeApiKey request", [key_id])
        now = datetime.now(UTC)
        try:
            record = await self._keys.revoke(key_id, now)
        except KeyNotFound:
            await _abort_key_not_found(context, request.name)
        return auth_pb2.RevokeApiKeyResponse(api_key=api_key_message(record, now))

    async def SetApiKeyRateLimits(
        self, request: auth_pb2.SetApiKeyRateLimitsRequest, context: Context
    ) -> auth_pb2.SetApiKeyRateLimitsResponse:
        key_id = _key_id(request.name, "name")
        if isinstance(key_id, FieldViolation):
            await abort_invalid(context, "invalid SetApiKeyRateLimits request", [key_id])
        record = await self._keys.get(key_id)
        if record is None:
            await _abort_key_not_found(context, request.name)
        rate_limits, violations = _rate_limits(request.rate_limits, record.scopes, "rate_limits")
        if violations:
            await abort_invalid(context, "invalid SetApiKeyRateLimits request", violations)
        try:
            record = await self._keys.set_rate_limits(key_id, rate_limits)
        except KeyNotFound:
            await _abort_key_not_found(context, request.name)
        return auth_pb2.SetApiKeyRateLimitsResponse(api_key=api_key_message(record, datetime.now(UTC)))


class AuditServicer(auth_pb2_grpc.AuditServiceServicer):
    def __init__(self, audit: AuditTrail) -> None:
        self._audit = audit

    async def ListAuditEvents(
        self, request: auth_pb2.ListAuditEventsRequest, context: Context
    ) -> auth_pb2.ListAuditEventsResponse:
        filters = {"method": request.method, "principal": request.principal}
        size, after = await _page(request, filters, int, context, "ListAuditEvents")
        records = await self._audit.page(size + 1, after, method=request.method, principal=request.principal)
        page, more = records[:size], len(records) > size
        token = encode_time_position(page[-1].at, page[-1].id, filters) if more else ""
        return auth_pb2.ListAuditEventsResponse(
            audit_events=[audit_event_message(record) for record in page], next_page_token=token
        )
