"""Who may call which RPC, enforced in one place.

Each RPC declares its access rule in the contract (``option (sendtime.auth.v1.access)``: the
scope it needs, whether calls are audited, and which request field names the target).
``AccessInterceptor`` reads those rules from the descriptors of the services a server hosts,
and in front of every call:

- lets health checks through (probes carry no credentials);
- authenticates the caller: ``authorization: Bearer <API key>``, or, on a mutual-TLS port, the
  client certificate's identity when it is mapped to scopes. Missing or bad credentials:
  UNAUTHENTICATED with an ``ErrorInfo`` reason (``sendtime_common.auth.keyring.AuthFailure``);
- checks the scope: PERMISSION_DENIED naming the scope when the credential lacks it;
- takes one rate-limit decision per call (``sendtime_common.rate_limit``; a stream's when it
  opens): past the credential's rate for the scope, RESOURCE_EXHAUSTED with an ``ErrorInfo``
  (reason ``RATE_LIMITED``, the scope, the limit, the key id) and a ``RetryInfo`` saying when to
  try again;
- for audited RPCs, appends the call and its outcome to the audit trail;
- refuses every call of a method without a rule (fail closed), and asks reflection for a valid
  credential of any scope unless the operator opened it.

The handler sees the caller as ``current_principal()``.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor
from google.rpc import code_pb2, status_pb2

from sendtime.auth.v1 import auth_pb2
from sendtime_common.auth.api_keys import Scope
from sendtime_common.auth.audit import AuditTrail, audit_target
from sendtime_common.auth.keyring import AuthFailure, KeyRing, Principal, Unauthenticated
from sendtime_common.errors import abort_with, error_info_status, retry_status
from sendtime_common.handlers import Behavior, Handler, WrappingInterceptor, replace_behavior
from sendtime_common.identifiers import IdentifierHasher
from sendtime_common.rate_limit import RATE_LIMITED, Decision, Rate, RateLimiter

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")
BEARER = "bearer "

_current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "sendtime_principal", default=None
)


def current_principal() -> Principal:
    """The caller of the RPC being handled.

    Raises:
        LookupError: called outside an authenticated call.
    """
    principal = _current_principal.get()
    if principal is None:
        raise LookupError("no authenticated caller in this context")
    return principal


@dataclass(frozen=True, slots=True)
class MethodAccess:
    """The access rule of one method. ``scope`` None: any authenticated caller (reflection)."""

    method: str
    scope: Scope | None
    audited: bool = False
    audit_target: str = ""


class MissingAccessRule(ValueError):
    """A hosted method declares no access rule (or an unusable one) in its contract."""


def method_path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def rule_of(method: MethodDescriptor) -> MethodAccess:
    """The access rule ``method`` declares.

    Raises:
        MissingAccessRule: it declares none, no scope, or an audit target it cannot read.
    """
    path = method_path(method)
    options = method.GetOptions()
    if not options.HasExtension(auth_pb2.access):
        raise MissingAccessRule(f"{path} declares no (sendtime.auth.v1.access) rule")
    rule = options.Extensions[auth_pb2.access]
    try:
        scope = Scope.from_proto(rule.scope)
    except ValueError:
        raise MissingAccessRule(f"{path} declares no scope") from None
    if rule.audited and (method.client_streaming or method.server_streaming):
        raise MissingAccessRule(f"{path} is audited but streams; audits cover unary calls only")
    if rule.audit_target and rule.audit_target not in method.input_type.fields_by_name:
        raise MissingAccessRule(f"{path}: audit_target {rule.audit_target!r} is not a request field")
    return MethodAccess(path, scope, rule.audited, rule.audit_target)


def access_rules(service_names: Iterable[str]) -> dict[str, MethodAccess]:
    """The rules of every method of the named services (``sendtime.x.v1.XService``).

    Raises:
        MissingAccessRule: a method has no usable rule.
    """
    pool = descriptor_pool.Default()
    rules: dict[str, MethodAccess] = {}
    for name in service_names:
        for method in pool.FindServiceByName(name).methods:
            rule = rule_of(method)
            rules[rule.method] = rule
    return rules


def parse_mtls_identities(text: str) -> dict[str, frozenset[Scope]]:
    """``AUTH_MTLS_IDENTITIES``: ``identity=scope,scope;identity=scope`` where an identity is a
    subject alternative name of client certificates (a DNS name, a URI such as
    ``spiffe://sendtime/render``).

    Raises:
        ValueError: an entry has no ``=``, no identity, no scope or an unknown scope.
    """
    identities: dict[str, frozenset[Scope]] = {}
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        identity, separator, scopes = entry.rpartition("=")
        if not separator or not identity.strip():
            raise ValueError(f"{entry!r} is not identity=scope,scope")
        names = [name for name in scopes.split(",") if name.strip()]
        if not names:
            raise ValueError(f"{identity.strip()!r} has no scopes")
        identities[identity.strip()] = frozenset(Scope.parse(name) for name in names)
    return identities


class Authenticator:
    """Turns a call's credentials into a principal: its API key, else (on a port that verifies
    client certificates) its certificate's mapped identity."""

    def __init__(
        self, keyring: KeyRing, mtls_identities: Mapping[str, frozenset[Scope]] | None = None
    ) -> None:
        self._keyring = keyring
        self._identities = {
            identity: Principal(f"mtls:{identity}", scopes)
            for identity, scopes in (mtls_identities or {}).items()
        }

    async def authenticate(
        self, metadata: Iterable[tuple[str, str | bytes]] | None, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Principal:
        """The principal of the call with ``metadata`` (its invocation metadata).

        Raises: Unauthenticated: no usable credential.
        """
        for key, value in metadata or ():
            if key == "authorization":
                return await self.authenticate_header(
                    value.decode(errors="replace") if isinstance(value, bytes) else value
                )
        if self._identities:
            for identity in _certificate_identities(context):
                principal = self._identities.get(identity)
                if principal is not None:
                    return principal
            raise Unauthenticated(
                AuthFailure.MISSING,
                "send 'authorization: Bearer <API key>', or a client certificate whose identity has scopes",
            )
        raise Unauthenticated(AuthFailure.MISSING, "send 'authorization: Bearer <API key>'")

    async def authenticate_header(self, authorization: str | None) -> Principal:
        """The principal of an ``Authorization`` header's API key (an HTTP request's; None: the
        request sent none).

        Raises: Unauthenticated: no usable credential.
        """
        if authorization is None:
            raise Unauthenticated(AuthFailure.MISSING, "send 'authorization: Bearer <API key>'")
        if authorization[: len(BEARER)].lower() != BEARER:
            raise Unauthenticated(
                AuthFailure.MALFORMED, "the authorization header must be 'Bearer <API key>'"
            )
        return await self._keyring.verify(authorization[len(BEARER) :].strip())


def _certificate_identities(context: grpc.aio.ServicerContext[Any, Any]) -> list[str]:
    """The subject alternative names of the client's verified certificate (none without one)."""
    auth = context.auth_context()
    return [value.decode(errors="replace") for value in auth.get("x509_subject_alternative_name", ())]


def _unauthenticated(error: Unauthenticated, method: str) -> status_pb2.Status:
    return error_info_status(code_pb2.UNAUTHENTICATED, str(error), error.reason.value, {"method": method})


def _permission_denied(principal: Principal, rule: MethodAccess) -> status_pb2.Status:
    scope = rule.scope.value if rule.scope else ""
    return error_info_status(
        code_pb2.PERMISSION_DENIED,
        f"{principal.name} lacks the scope {scope!r} that {rule.method} needs",
        "SCOPE_MISSING",
        {"scope": scope, "method": rule.method, "principal": principal.name},
    )


def _rate_limited(principal: Principal, scope: Scope, rate: Rate, decision: Decision) -> status_pb2.Status:
    return retry_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"{principal.name} is over its rate limit for {scope.value} ({rate}); "
        f"retry in {decision.retry_after_s:.3g} s",
        RATE_LIMITED,
        decision.retry_after_s,
        {"scope": scope.value, "limit": str(rate), "key_id": principal.key_id, "principal": principal.name},
    )


# A caller over its limit is logged at most this often per scope, with the count refused since.
RATE_LIMIT_LOG_INTERVAL_S = 10.0


class _RefusalLog:
    """Logs refusals for rate, at most once per interval per caller and scope: a caller
    hammering past its limit must not turn each refused call into a log line."""

    def __init__(self, interval_s: float = RATE_LIMIT_LOG_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._seen: dict[tuple[str, Scope], tuple[float, int]] = {}  # last logged, refused since

    def refused(self, principal: Principal, scope: Scope, rate: Rate, decision: Decision) -> None:
        now = time.monotonic()
        last, count = self._seen.get((principal.name, scope), (float("-inf"), 0))
        if now - last < self._interval_s:
            self._seen[(principal.name, scope)] = (last, count + 1)
            return
        self._seen[(principal.name, scope)] = (now, 0)
        log.info(
            "calls refused for rate",
            extra={
                "principal": principal.name,
                "scope": scope.value,
                "limit": str(rate),
                "shared": decision.shared,
                "refused_since_last_log": count,
            },
        )


def _no_rule(method: str) -> status_pb2.Status:
    return error_info_status(
        code_pb2.PERMISSION_DENIED,
        f"{method} declares no access rule, so nobody may call it",
        "NO_ACCESS_RULE",
        {"method": method},
    )


@dataclass(frozen=True, slots=True)
class HttpRefusal:
    """Why an HTTP request is refused (AccessInterceptor.admit_http): its status and message."""

    status: int
    message: str
    retry_after_s: float | None = None


class AccessInterceptor(WrappingInterceptor):
    def __init__(
        self,
        rules: Mapping[str, MethodAccess],
        authenticator: Authenticator,
        audit: AuditTrail,
        hasher: IdentifierHasher,
        *,
        reflection_open: bool = False,
        limiter: RateLimiter | None = None,
    ) -> None:
        """``limiter`` None: no rate limits."""
        super().__init__()
        self._rules = dict(rules)
        self._authenticator = authenticator
        self._audit = audit
        self._hasher = hasher
        self._reflection_open = reflection_open
        self._limiter = limiter
        self._refusals = _RefusalLog()

    def wrap(self, method: str, handler: Handler) -> Handler:
        """The handler guarded by ``method``'s rule (health checks: as it is)."""
        if method.startswith(HEALTH_PREFIX):
            return handler
        rule = self._rules.get(method)
        if rule is None:
            if not method.startswith(REFLECTION_PREFIXES):
                return replace_behavior(handler, _refusing(_no_rule(method)))
            if self._reflection_open:
                return handler
            rule = MethodAccess(method, scope=None)
        return replace_behavior(handler, lambda behavior: self._guard(rule, behavior))

    async def _authorize(
        self, rule: MethodAccess, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Principal:
        """The caller, allowed; or the call ends (aborted) here."""
        try:
            metadata: Any = context.invocation_metadata()  # key-value pairs (the stubs say Metadata)
            principal = await self._authenticator.authenticate(metadata, context)
        except Unauthenticated as exc:
            log.info(
                "call not authenticated",
                extra={"method": rule.method, "reason": exc.reason.value, "key_id": exc.key_id},
            )
            await abort_with(context, _unauthenticated(exc, rule.method))
        if rule.scope is not None and rule.scope not in principal.scopes:
            log.info(
                "call refused for want of a scope",
                extra={"method": rule.method, "principal": principal.name, "scope": rule.scope.value},
            )
            if rule.audited:
                target = audit_target(request, rule.audit_target, self._hasher)
                await self._audit.record(principal.name, rule.method, target, "PERMISSION_DENIED")
            await abort_with(context, _permission_denied(principal, rule))
        if self._limiter is not None and rule.scope is not None:
            await self._limit(principal, rule.scope, context)
        return principal

    async def _limit(
        self, principal: Principal, scope: Scope, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """Let the call through if ``principal`` is within its rate for ``scope`` (the key's own
        rate, else the scope's), or end it (aborted) here. Refusals are not audited: a flood of
        them would be a flood of audit rows."""
        refused = await self._over_rate(principal, scope)
        if refused is not None:
            await abort_with(context, _rate_limited(principal, scope, *refused))

    async def _over_rate(self, principal: Principal, scope: Scope) -> tuple[Rate, Decision] | None:
        """None if ``principal`` is within its rate for ``scope``; else the rate and decision."""
        if self._limiter is None:
            return None
        rate = principal.rate_limits.get(scope) or self._limiter.rate(scope)
        if rate is None:
            return None
        decision = await self._limiter.decide(scope, principal.name, rate)
        if decision.allowed:
            return None
        self._refusals.refused(principal, scope, rate, decision)
        return rate, decision

    async def admit_http(self, authorization: str | None, scope: Scope) -> HttpRefusal | None:
        """Whether an HTTP request with the ``Authorization`` header ``authorization`` may do
        what ``scope`` allows, on a port outside the gateway (the metrics port): None if it may,
        else the answer to give. Authenticated, scoped and rate limited as a call is; not audited."""
        try:
            principal = await self._authenticator.authenticate_header(authorization)
        except Unauthenticated as exc:
            return HttpRefusal(401, str(exc))
        if scope not in principal.scopes:
            return HttpRefusal(403, f"{principal.name} lacks the scope {scope.value!r}")
        refused = await self._over_rate(principal, scope)
        if refused is not None:
            rate, decision = refused
            message = f"{principal.name} is over its rate limit for {scope.value} ({rate})"
            return HttpRefusal(429, message, retry_after_s=decision.retry_after_s)
        return None

    def _guard(self, rule: MethodAccess, behavior: Behavior) -> Behavior:
        if inspect.isasyncgenfunction(behavior):

            async def guarded_stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                principal = await self._authorize(rule, request, context)
                token = _current_principal.set(principal)
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    # A stream the client cancels is closed by the loop's async-generator
                    # finalizer, in a context of its own, where the token does not apply.
                    with contextlib.suppress(ValueError):
                        _current_principal.reset(token)

            return guarded_stream

        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            principal = await self._authorize(rule, request, context)
            token = _current_principal.set(principal)
            outcome = "OK"
            try:
                return await behavior(request, context)
            except BaseException:
                outcome = _status_name(context, default="UNKNOWN")
                raise
            finally:
                _current_principal.reset(token)
                if rule.audited:
                    if outcome == "OK":
                        outcome = _status_name(context, default="OK")
                    target = audit_target(request, rule.audit_target, self._hasher)
                    await self._audit.record(principal.name, rule.method, target, outcome)

        return guarded


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def _status_name(context: grpc.aio.ServicerContext[Any, Any], default: str) -> str:
    """How the call ended, as far as its context says: a status code's name."""
    code = context.code()
    if code is None:
        return default
    if isinstance(code, grpc.StatusCode):
        return code.name
    return _CODE_NAMES.get(code, str(code))


def _refusing(status: status_pb2.Status) -> Callable[[Behavior], Behavior]:
    def wrap(behavior: Behavior) -> Behavior:
        if inspect.isasyncgenfunction(behavior):

            async def refuse_stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                await abort_with(context, status)
                yield  # pragma: no cover - makes this an async generator

            return refuse_stream

        async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await abort_with(context, status)

        return refuse

    return wrap
