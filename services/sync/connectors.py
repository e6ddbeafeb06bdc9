"""The connectors an operator configures: a JSON document (``SYNC_CONNECTORS_FILE``, e.g. a
mounted ConfigMap) that names each connector, its kind, how often it runs, and where its
secrets are. Secrets are never in the document: it names environment variables (each also
readable from ``<NAME>_FILE``, as Kubernetes mounts Secrets), and a secret written inline is
refused. docs/connectors.md shows the format.

``parse_connectors`` checks the whole document up front and names the field of each problem
(``connectors[1].auth.api_key_env: MAILCHIMP_API_KEY is not set``): a service with a broken
connector does not start, rather than failing at its first run.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from sendtime_common.config import ConfigError, secret_from_env
from sync import braze, hubspot, mailchimp, sendgrid, sendgrid_contacts
from sync.braze import BrazeAttributes
from sync.hubspot import HubSpotContacts
from sync.provider_http import (
    ApiKey,
    BasicAuth,
    Credentials,
    OAuthClientCredentials,
    OAuthRefreshToken,
    ProviderApi,
    ProviderLimits,
    TokenSaver,
)
from sync.push import Destination
from sync.runner import Pull
from sync.sendgrid import SendGridSuppressions

_CONNECTOR_ID = re.compile(r"[a-z][a-z0-9-]{0,62}")
MIN_INTERVAL_S = 10.0
DEFAULT_INTERVAL_S = 300.0  # a pull: "every few minutes"
DEFAULT_PUSH_INTERVAL_S = 30.0  # a push: changes batched for half a minute


class ConnectorKind(enum.StrEnum):
    HUBSPOT_CONTACTS = "hubspot_contacts"
    MAILCHIMP_MEMBERS = "mailchimp_members"
    SENDGRID_SUPPRESSIONS = "sendgrid_suppressions"
    BRAZE_PUSH = "braze_push"
    MAILCHIMP_PUSH = "mailchimp_push"
    SENDGRID_PUSH = "sendgrid_push"


@dataclass(frozen=True, slots=True)
class _Defaults:
    base_url: str | None  # None: it must be given (or, for Mailchimp, comes from the key)
    requests: int
    per_s: float


# Each provider's published limits (docs/connectors.md has the sources).
_DEFAULTS: Mapping[ConnectorKind, _Defaults] = {
    ConnectorKind.HUBSPOT_CONTACTS: _Defaults("https://api.hubapi.com", 4, 1.0),  # search: 4/s a token
    ConnectorKind.MAILCHIMP_MEMBERS: _Defaults(None, 10, 1.0),
    ConnectorKind.SENDGRID_SUPPRESSIONS: _Defaults("https://api.sendgrid.com", 10, 1.0),
    ConnectorKind.BRAZE_PUSH: _Defaults(None, 3000, 3.0),  # /users/track: 3,000 per 3 s
    ConnectorKind.MAILCHIMP_PUSH: _Defaults(None, 10, 1.0),
    ConnectorKind.SENDGRID_PUSH: _Defaults("https://api.sendgrid.com", 10, 1.0),
}
PUSH_KINDS = frozenset({ConnectorKind.BRAZE_PUSH, ConnectorKind.MAILCHIMP_PUSH, ConnectorKind.SENDGRID_PUSH})


@dataclass(frozen=True, slots=True)
class ConnectorConfig:
    connector_id: str
    kind: ConnectorKind
    interval_s: float
    base_url: str
    credentials: Credentials = field(repr=False)
    limits: ProviderLimits
    options: Mapping[str, Any] = field(default_factory=dict)  # the kind's own (list_id, traits...)


def load_connectors(env: Mapping[str, str]) -> list[ConnectorConfig]:
    """The connectors of ``SYNC_CONNECTORS_FILE`` (none when it is unset).

    Raises:
        ConfigError: the file cannot be read, or a connector is not usable (see parse_connectors).
    """
    path = env.get("SYNC_CONNECTORS_FILE", "").strip()
    if not path:
        return []
    try:
        with open(path, "rb") as file:
            document = orjson.loads(file.read())
    except OSError as exc:
        raise ConfigError(f"SYNC_CONNECTORS_FILE: cannot read {path}: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"SYNC_CONNECTORS_FILE: not JSON: {exc}") from None
    return parse_connectors(document, env)


def parse_connectors(document: Any, env: Mapping[str, str]) -> list[ConnectorConfig]:
    """Every connector of the document, checked.

    Raises:
        ConfigError: the first problem found, naming its field.
    """
    if not isinstance(document, dict) or not isinstance(document.get("connectors"), list):
        raise ConfigError('SYNC_CONNECTORS_FILE: expected {"connectors": [...]}')
    unknown = set(document) - {"connectors"}
    if unknown:
        raise ConfigError(f"SYNC_CONNECTORS_FILE: unknown fields {sorted(unknown)}")
    found: list[ConnectorConfig] = []
    for index, raw in enumerate(document["connectors"]):
        connector = _connector(raw, f"connectors[{index}]", env)
        if any(c.connector_id == connector.connector_id for c in found):
            raise ConfigError(f"connectors[{index}].id: {connector.connector_id!r} is used twice")
        found.append(connector)
    return found


_FIELDS = frozenset({"id", "kind", "interval_s", "base_url", "auth", "rate", "options"})


def _connector(raw: Any, path: str, env: Mapping[str, str]) -> ConnectorConfig:
    obj = _object(raw, path)
    _only(obj, _FIELDS, path)
    connector_id = obj.get("id")
    if not isinstance(connector_id, str) or not _CONNECTOR_ID.fullmatch(connector_id):
        raise ConfigError(f"{path}.id: 1 to 63 of a-z, 0-9 and -, starting with a letter")
    try:
        kind = ConnectorKind(str(obj.get("kind")))
    except ValueError:
        raise ConfigError(f"{path}.kind: one of {', '.join(k.value for k in ConnectorKind)}") from None
    default_interval_s = DEFAULT_PUSH_INTERVAL_S if kind in PUSH_KINDS else DEFAULT_INTERVAL_S
    interval_s = _number(obj.get("interval_s", default_interval_s), f"{path}.interval_s", MIN_INTERVAL_S)
    credentials = _auth(obj.get("auth"), f"{path}.auth", env, kind)
    defaults = _DEFAULTS[kind]
    base_url = obj.get("base_url", defaults.base_url)
    if base_url is None and kind in (ConnectorKind.MAILCHIMP_MEMBERS, ConnectorKind.MAILCHIMP_PUSH):
        if not isinstance(credentials, BasicAuth):
            raise ConfigError(f"{path}.base_url: required with OAuth (the account's data center)")
        try:
            base_url = mailchimp.base_url_for_key(credentials.password)
        except ValueError as exc:
            raise ConfigError(f"{path}.auth.api_key_env: {exc}") from None
    if not isinstance(base_url, str) or not re.fullmatch(r"https?://[^\s/]+(:[0-9]+)?(/[^\s]*)?", base_url):
        raise ConfigError(f"{path}.base_url: required, an http(s) URL")
    rate = _object(obj.get("rate", {}), f"{path}.rate")
    _only(rate, frozenset({"requests", "per_s"}), f"{path}.rate")
    requests = int(_number(rate.get("requests", defaults.requests), f"{path}.rate.requests", 1))
    per_s = _number(rate.get("per_s", defaults.per_s), f"{path}.rate.per_s", 0.001)
    options = _object(obj.get("options", {}), f"{path}.options")
    _check_options(kind, options, f"{path}.options")
    return ConnectorConfig(
        connector_id,
        kind,
        interval_s,
        base_url.rstrip("/"),
        credentials,
        ProviderLimits(requests, per_s),
        options,
    )


def _auth(raw: Any, path: str, env: Mapping[str, str], kind: ConnectorKind) -> Credentials:
    obj = _object(raw, path)
    if len(obj) != 1:
        raise ConfigError(
            f"{path}: exactly one of api_key_env, basic, oauth_client_credentials, oauth_refresh_token"
        )
    ((form, value),) = obj.items()
    if form not in ("api_key_env", "basic", "oauth_client_credentials", "oauth_refresh_token"):
        raise ConfigError(
            f"{path}.{form}: not a kind of auth (api_key_env, basic, oauth_client_credentials, "
            "oauth_refresh_token)"
        )
    if form == "api_key_env":
        key = _secret(value, f"{path}.api_key_env", env)
        if kind in (ConnectorKind.MAILCHIMP_MEMBERS, ConnectorKind.MAILCHIMP_PUSH):
            return BasicAuth("sendtime", key)  # Mailchimp: any user name, the key as password
        return ApiKey(key)
    spec = _object(value, f"{path}.{form}")
    if form == "basic":
        _only(spec, frozenset({"username", "password_env"}), f"{path}.basic")
        return BasicAuth(
            _text(spec, "username", f"{path}.basic"),
            _secret(spec.get("password_env"), f"{path}.basic.password_env", env),
        )
    if form == "oauth_client_credentials":
        _only(spec, frozenset({"token_url", "client_id", "client_secret_env", "scope"}), f"{path}.{form}")
        return OAuthClientCredentials(
            _url(spec, "token_url", f"{path}.{form}"),
            _text(spec, "client_id", f"{path}.{form}"),
            _secret(spec.get("client_secret_env"), f"{path}.{form}.client_secret_env", env),
            str(spec.get("scope", "")),
        )
    if form == "oauth_refresh_token":
        _only(
            spec,
            frozenset({"token_url", "client_id", "client_secret_env", "refresh_token_env"}),
            f"{path}.{form}",
        )
        return OAuthRefreshToken(
            _url(spec, "token_url", f"{path}.{form}"),
            _text(spec, "client_id", f"{path}.{form}"),
            _secret(spec.get("client_secret_env"), f"{path}.{form}.client_secret_env", env),
            _secret(spec.get("refresh_token_env"), f"{path}.{form}.refresh_token_env", env),
        )
    raise AssertionError(form)  # every form above


_OPTIONS: Mapping[ConnectorKind, frozenset[str]] = {
    ConnectorKind.HUBSPOT_CONTACTS: frozenset({"traits", "page_size", "lookback_s"}),
    ConnectorKind.MAILCHIMP_MEMBERS: frozenset({"list_id", "merge_traits", "page_size", "lookback_s"}),
    ConnectorKind.SENDGRID_SUPPRESSIONS: frozenset({"lists", "lookback_s", "lag_s"}),
    ConnectorKind.BRAZE_PUSH: frozenset({"traits", "attribute_names"}),
    ConnectorKind.MAILCHIMP_PUSH: frozenset({"list_id", "traits", "merge_fields", "status_if_new"}),
    ConnectorKind.SENDGRID_PUSH: frozenset({"traits", "custom_field_ids"}),
}


def _check_options(kind: ConnectorKind, options: Mapping[str, Any], path: str) -> None:
    _only(options, _OPTIONS[kind], path)
    if kind in (ConnectorKind.MAILCHIMP_MEMBERS, ConnectorKind.MAILCHIMP_PUSH):
        _text(options, "list_id", path)
    if kind in PUSH_KINDS:
        traits = options.get("traits")
        if not isinstance(traits, list) or not traits or not all(isinstance(t, str) for t in traits):
            raise ConfigError(f"{path}.traits: required, the trait names to push")
    if kind == ConnectorKind.SENDGRID_PUSH:
        ids = _object(options.get("custom_field_ids", {}), f"{path}.custom_field_ids")
        try:
            sendgrid_contacts.check_custom_field_ids(ids, options["traits"])
        except ValueError as exc:
            raise ConfigError(f"{path}.{exc}") from None


# --- small readers ----------------------------------------------------------------------------


def _object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected an object")
    return value


def _only(obj: Mapping[str, Any], allowed: frozenset[str], path: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ConfigError(f"{path}: unknown fields {unknown} (allowed: {sorted(allowed)})")


def _text(obj: Mapping[str, Any], key: str, path: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{path}.{key}: required")
    return value.strip()


def _url(obj: Mapping[str, Any], key: str, path: str) -> str:
    value = _text(obj, key, path)
    if not re.fullmatch(r"https?://\S+", value):
        raise ConfigError(f"{path}.{key}: an http(s) URL")
    return value


def _number(value: Any, path: str, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise ConfigError(f"{path}: a number of at least {minimum:g}")
    return float(value)


def _secret(name: Any, path: str, env: Mapping[str, str]) -> str:
    """The secret in the environment variable ``name`` (or its ``_FILE``)."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Z][A-Z0-9_]{0,127}", name):
        raise ConfigError(
            f"{path}: the NAME of an environment variable holding the secret (never the secret)"
        )
    value = secret_from_env(env, name)
    if not value:
        raise ConfigError(f"{path}: {name} is not set (nor {name}_FILE)")
    return value


# --- from configuration to connectors -----------------------------------------------------------


def open_api(config: ConnectorConfig, on_token: TokenSaver | None = None) -> ProviderApi:
    """The provider API a connector calls (close it with ``aclose``)."""
    return ProviderApi(
        config.kind.value.split("_")[0], config.base_url, config.credentials, config.limits, on_token=on_token
    )


def build_pull(config: ConnectorConfig, api: ProviderApi) -> Pull:
    """A pull connector's pull (runner.run_pull), from its options.

    Raises:
        ValueError: a push kind, or an option the connector refuses (a page size past the
            provider's, a trait name ingest would refuse).
    """
    options = config.options
    if config.kind == ConnectorKind.HUBSPOT_CONTACTS:
        contacts = HubSpotContacts(
            api,
            options.get("traits", hubspot.DEFAULT_TRAITS),
            page_size=int(options.get("page_size", 100)),
            lookback_s=float(options.get("lookback_s", 120)),
        )
        return contacts.pull
    if config.kind == ConnectorKind.MAILCHIMP_MEMBERS:
        members = mailchimp.MailchimpMembers(
            api,
            str(options["list_id"]),
            options.get("merge_traits", mailchimp.DEFAULT_MERGE_TRAITS),
            page_size=int(options.get("page_size", 500)),
            lookback_s=float(options.get("lookback_s", 120)),
        )
        return members.pull
    if config.kind == ConnectorKind.SENDGRID_SUPPRESSIONS:
        suppressions = SendGridSuppressions(
            api,
            lists=options.get("lists", tuple(sendgrid.LISTS)),
            lookback_s=int(options.get("lookback_s", 120)),
            lag_s=int(options.get("lag_s", 60)),
        )
        return suppressions.pull
    raise ValueError(f"{config.connector_id}: {config.kind} pushes, it does not pull")


def build_destination(config: ConnectorConfig, api: ProviderApi) -> Destination:
    """A push connector's destination, from its options.

    Raises:
        ValueError: a pull kind, or an option the destination refuses.
    """
    options = config.options
    if config.kind == ConnectorKind.BRAZE_PUSH:
        return BrazeAttributes(api, {**braze.STANDARD_ATTRIBUTES, **options.get("attribute_names", {})})
    if config.kind == ConnectorKind.MAILCHIMP_PUSH:
        return mailchimp.MailchimpPush(
            api,
            str(options["list_id"]),
            options.get("merge_fields", mailchimp.DEFAULT_PUSH_FIELDS),
            status_if_new=str(options.get("status_if_new", "transactional")),
        )
    if config.kind == ConnectorKind.SENDGRID_PUSH:
        return sendgrid_contacts.SendGridContacts(
            api,
            options.get("custom_field_ids", {}),
            traits=options["traits"],
            api_base_url=config.base_url,
        )
    raise ValueError(f"{config.connector_id}: {config.kind} pulls, it does not push")
