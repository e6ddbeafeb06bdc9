"""Identity rules, pure: limits on how many identifiers of a kind one profile may hold (so a
shared device or a family email does not collapse many people into one), and which identifier
wins when a merge is refused."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sendtime_common.identifier_proto import IdentifierKey
from sendtime_common.identifiers import IdentifierKind

# When a merge is refused, the event joins the customer of its most specific identifier.
RANK = (
    IdentifierKind.USER_ID,
    IdentifierKind.CRM_ID,
    IdentifierKind.EMAIL,
    IdentifierKind.DEVICE_ID,
    IdentifierKind.ANONYMOUS_ID,
)

DEFAULT_LIMITS: Mapping[IdentifierKind, int] = {
    IdentifierKind.USER_ID: 2,
    IdentifierKind.CRM_ID: 2,
    IdentifierKind.EMAIL: 3,
    IdentifierKind.DEVICE_ID: 10,
    IdentifierKind.ANONYMOUS_ID: 100,
}


class InvalidLimits(ValueError):
    """PROFILE_IDENTITY_LIMITS cannot be read; the message says which part."""


@dataclass(frozen=True, slots=True)
class IdentityLimits:
    per_kind: Mapping[IdentifierKind, int] = field(default_factory=lambda: dict(DEFAULT_LIMITS))

    @classmethod
    def parse(cls, text: str) -> IdentityLimits:
        """``email=3,device_id=10``: the kinds named override the defaults.

        Raises:
            InvalidLimits: an unknown kind or a limit that is not a positive integer.
        """
        limits = dict(DEFAULT_LIMITS)
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, _, number = part.partition("=")
            try:
                kind = IdentifierKind(name.strip())
            except ValueError:
                raise InvalidLimits(f"unknown identifier kind {name.strip()!r} in {part!r}") from None
            if not number.strip().isdigit() or int(number) < 1:
                raise InvalidLimits(f"limit for {kind.value} must be a positive integer, got {number!r}")
            limits[kind] = int(number)
        return cls(limits)

    def violation(self, identifiers: Iterable[IdentifierKey]) -> str | None:
        """Why one profile may not hold all of ``identifiers``, or None when it may."""
        counts = Counter(kind for kind, _ in set(identifiers))
        for kind in RANK:
            limit = self.per_kind.get(kind)
            if limit is not None and counts[kind] > limit:
                return f"at most {limit} {kind.value} identifiers per profile"
        return None


def best_identifier(identifiers: Iterable[IdentifierKey]) -> IdentifierKey:
    """The most specific identifier (user id over CRM id over email over device over anonymous)."""
    return min(identifiers, key=lambda key: (RANK.index(key[0]), key[1]))
