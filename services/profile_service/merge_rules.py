"""Which source wins a tie: the source-priority matrix of profile resolution.

Per attribute, the value with the latest ``occurred_at`` wins. When two events set the same
attribute at the same ``occurred_at``, the one from the more authoritative source wins, and
"more authoritative" can differ per attribute: transactional backend data for the cart and
orders, the CRM for traits, the email provider for email engagement. The matrix lives in a TOML
file (``source_priority.toml`` next to this module is the default)::

    default = ["crm", "server", "import", "email", "mobile_app", "web"]

    [attributes]
    cart = ["server", "mobile_app", "web"]
    "traits.vip" = ["crm"]

Each list runs from the most to the least authoritative source. ``default`` must name every
source once. An attribute list may name only some sources: those come first, in its order, and
the rest follow in the default order. An attribute is looked up exactly ("traits.vip"), then by
its group ("traits"), then the default applies.

Priorities decide ties only. The order in which a history is folded
(``profile_service.state.event_order_key``) is a fixed total order that does not depend on
this file.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from sendtime.ingest.v1 import ingest_pb2

SOURCE_NAMES: Mapping[str, int] = {
    "web": ingest_pb2.EVENT_SOURCE_WEB,
    "mobile_app": ingest_pb2.EVENT_SOURCE_MOBILE_APP,
    "server": ingest_pb2.EVENT_SOURCE_SERVER,
    "crm": ingest_pb2.EVENT_SOURCE_CRM,
    "email": ingest_pb2.EVENT_SOURCE_EMAIL,
    "import": ingest_pb2.EVENT_SOURCE_IMPORT,
}

# Attribute groups, and the attributes inside a group that can have their own row.
ATTRIBUTE_GROUPS = frozenset(
    {"traits", "cart", "recently_viewed", "orders", "loyalty", "consents", "email", "last_seen"}
)
CONSENT_CHANNELS = frozenset({"email", "sms", "push", "whatsapp"})
EMAIL_ATTRIBUTES = frozenset({"bounce_state", "unsubscribed", "spam_reported"})
_TRAIT_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")

DEFAULT_FILE = "source_priority.toml"


class MergeRulesError(ValueError):
    """A source-priority file that cannot be used; the message names the file and the bad key."""


def _describe_attributes() -> str:
    return ", ".join(
        [*sorted(ATTRIBUTE_GROUPS), "traits.<trait name>", "consents.<channel>", "email.<attribute>"]
    )


def is_known_attribute(attribute: str) -> bool:
    """Whether ``attribute`` names something a row of the matrix can apply to."""
    group, dot, rest = attribute.partition(".")
    if not dot:
        return group in ATTRIBUTE_GROUPS
    if group == "traits":
        return _TRAIT_NAME.fullmatch(rest) is not None
    if group == "consents":
        return rest in CONSENT_CHANNELS
    if group == "email":
        return rest in EMAIL_ATTRIBUTES
    return False


@dataclass(frozen=True)
class MergeRules:
    """The source-priority matrix. ``default`` and each row of ``attributes`` list sources
    (``EventSource`` values) from the most to the least authoritative."""

    default: tuple[int, ...]
    attributes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    _tables: dict[str, dict[int, int]] = field(init=False, repr=False, compare=False)
    _default_table: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        default = _complete(self.default, ())
        object.__setattr__(self, "_default_table", _ranks(default))
        object.__setattr__(
            self,
            "_tables",
            {name: _ranks(_complete(row, default)) for name, row in self.attributes.items()},
        )

    def __hash__(self) -> int:
        return hash((self.default, tuple(sorted(self.attributes.items()))))

    def priority(self, attribute: str, source: int) -> int:
        """How authoritative ``source`` is for ``attribute``: higher wins a tie. A source the
        matrix does not know (UNSPECIFIED) gets 0, below every known one."""
        table = self._tables.get(attribute)
        if table is None:
            group, dot, _ = attribute.partition(".")
            table = self._tables.get(group, self._default_table) if dot else self._default_table
        return table.get(source, 0)


def _complete(row: Sequence[int], rest: Sequence[int]) -> tuple[int, ...]:
    """``row``, followed by the sources it leaves out: in ``rest``'s order, then any others."""
    listed = list(dict.fromkeys(row))
    for source in [*rest, *sorted(SOURCE_NAMES.values())]:
        if source not in listed:
            listed.append(source)
    return tuple(listed)


def _ranks(order: Sequence[int]) -> dict[int, int]:
    return {source: len(order) - i for i, source in enumerate(order)}


def _sources(value: Any, key: str, *, complete: bool) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MergeRulesError(f"{key}: must be a list of source names")
    known = ", ".join(sorted(SOURCE_NAMES))
    sources: list[int] = []
    for name in value:
        source = SOURCE_NAMES.get(name)
        if source is None:
            raise MergeRulesError(f"{key}: unknown source {name!r} (known: {known})")
        if source in sources:
            raise MergeRulesError(f"{key}: source {name!r} is listed twice")
        sources.append(source)
    if complete and len(sources) != len(SOURCE_NAMES):
        missing = sorted(n for n, s in SOURCE_NAMES.items() if s not in sources)
        raise MergeRulesError(f"{key}: must name every source; missing {', '.join(missing)}")
    return tuple(sources)


def parse_merge_rules(data: Mapping[str, Any]) -> MergeRules:
    """The rules in a parsed TOML document.

    Raises:
        MergeRulesError: an unknown key, attribute or source name, or a malformed list.
    """
    for key in data:
        if key not in ("default", "attributes"):
            raise MergeRulesError(f"{key}: unknown key (expected 'default' and 'attributes')")
    if "default" not in data:
        raise MergeRulesError("default: required (every source, most authoritative first)")
    default = _sources(data["default"], "default", complete=True)
    rows = data.get("attributes", {})
    if not isinstance(rows, dict):
        raise MergeRulesError("attributes: must be a table of attribute = [sources]")
    attributes: dict[str, tuple[int, ...]] = {}
    for attribute, value in rows.items():
        key = f"attributes.{attribute}"
        if not is_known_attribute(attribute):
            raise MergeRulesError(f"{key}: unknown attribute (known: {_describe_attributes()})")
        attributes[attribute] = _sources(value, key, complete=False)
    return MergeRules(default=default, attributes=attributes)


def load_merge_rules(path: str | Path) -> MergeRules:
    """The rules in a source-priority TOML file.

    Raises:
        MergeRulesError: the file cannot be read or parsed, or names an unknown key, attribute
            or source; the message starts with the file's path.
    """
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
        return parse_merge_rules(data)
    except MergeRulesError as exc:
        raise MergeRulesError(f"{path}: {exc}") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise MergeRulesError(f"{path}: {exc}") from exc


def _load_default() -> MergeRules:
    with resources.as_file(resources.files(__package__ or "profile_service") / DEFAULT_FILE) as path:
        return load_merge_rules(path)


DEFAULT_RULES: MergeRules = _load_default()
