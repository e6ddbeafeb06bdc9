"""Where webhooks may go: never into Sendtime's own network (server-side request forgery).

A destination URL is https (http only to an allow-listed host), names a host without user
info, and every address its host resolves to is globally routable: not private, loopback,
link-local, multicast, reserved, unspecified, shared (CGNAT, 100.64.0.0/10), an IPv6 unique
local or site-local address, nor a cloud metadata address, and not one of those inside an
IPv4-mapped, 6to4 or NAT64 IPv6 address. ``metadata.google.internal`` is refused by name.

It is checked twice: when a destination is made (``destination_url_violations``, with field
reasons) and on every connection (``GuardedResolver``, given to aiohttp's connector, checks the
addresses the connection is about to use; ``url_refusal`` checks a literal address, which
aiohttp connects to without resolving). The second check is what stops DNS rebinding: a name
that resolved to a public address at creation and to 10.0.0.1 at delivery.

The allow-list (``AllowList``, from the service's settings) names hosts and networks that may
be reached anyway: an allow-listed host name is trusted whatever it resolves to, and over http
too; an address inside an allow-listed network is accepted for any name, and a literal one
over http too. Tests allow-list loopback.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from sendtime_common.errors import FieldViolation

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_URL_LENGTH = 2048
# A destination is made while its creator waits: a name that does not resolve by then is refused.
RESOLVE_TIMEOUT_S = 5.0
# A host name as DNS and yarl (which IDNA-encodes) give it; yarl lets spaces through.
_HOST_NAME = re.compile(r"[a-z0-9_.-]+", re.IGNORECASE)


class AddressRefusal(enum.StrEnum):
    """Why an address is not one webhooks may reach."""

    METADATA = "a cloud metadata address"
    LOOPBACK = "a loopback address"
    PRIVATE = "a private address"
    SHARED = "a shared (carrier-grade NAT) address"
    LINK_LOCAL = "a link-local address"
    UNIQUE_LOCAL = "an IPv6 unique local address"
    SITE_LOCAL = "an IPv6 site-local address"
    MULTICAST = "a multicast address"
    UNSPECIFIED = "an unspecified address"
    RESERVED = "a reserved address"


_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean...
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS over IPv6
        "100.100.100.200",  # Alibaba Cloud
    )
)
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog"})


def _networks(*entries: tuple[str, AddressRefusal]) -> tuple[tuple[IPNetwork, AddressRefusal], ...]:
    return tuple((ipaddress.ip_network(cidr), refusal) for cidr, refusal in entries)


# IANA's special-purpose registries, spelled out: ipaddress's is_private and is_global differ
# between 3.11 patch releases (and call 224.0.0.0/4 global).
_IPV4_REFUSED = _networks(
    ("0.0.0.0/8", AddressRefusal.UNSPECIFIED),
    ("10.0.0.0/8", AddressRefusal.PRIVATE),
    ("100.64.0.0/10", AddressRefusal.SHARED),
    ("127.0.0.0/8", AddressRefusal.LOOPBACK),
    ("169.254.0.0/16", AddressRefusal.LINK_LOCAL),
    ("172.16.0.0/12", AddressRefusal.PRIVATE),
    ("192.0.0.0/24", AddressRefusal.RESERVED),  # IETF protocol assignments
    ("192.0.2.0/24", AddressRefusal.RESERVED),  # documentation
    ("192.88.99.0/24", AddressRefusal.RESERVED),  # 6to4 relays
    ("192.168.0.0/16", AddressRefusal.PRIVATE),
    ("198.18.0.0/15", AddressRefusal.RESERVED),  # benchmarking
    ("198.51.100.0/24", AddressRefusal.RESERVED),
    ("203.0.113.0/24", AddressRefusal.RESERVED),
    ("224.0.0.0/4", AddressRefusal.MULTICAST),
    ("240.0.0.0/4", AddressRefusal.RESERVED),  # and the broadcast address
)
_IPV6_REFUSED = _networks(
    ("::/128", AddressRefusal.UNSPECIFIED),
    ("::1/128", AddressRefusal.LOOPBACK),
    ("64:ff9b:1::/48", AddressRefusal.PRIVATE),  # local-use NAT64
    ("fc00::/7", AddressRefusal.UNIQUE_LOCAL),
    ("fe80::/10", AddressRefusal.LINK_LOCAL),
    ("fec0::/10", AddressRefusal.SITE_LOCAL),
    ("ff00::/8", AddressRefusal.MULTICAST),
    ("100::/64", AddressRefusal.RESERVED),  # discard-only
    ("2001::/23", AddressRefusal.RESERVED),  # IETF protocol assignments, Teredo
    ("2001:db8::/32", AddressRefusal.RESERVED),  # documentation
    ("3fff::/20", AddressRefusal.RESERVED),  # documentation
)
# Unicast IPv6 outside 2000::/3 is unassigned (or one of the prefixes above).
_IPV6_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries to the IPv4 network: IPv4-mapped (what a dual-stack
    socket connects to as IPv4), 6to4, or NAT64's well-known prefix."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_refusal(address: IPAddress) -> AddressRefusal | None:
    """Why webhooks may not reach ``address`` (allow-list aside); ``None`` when they may."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            address = ipaddress.IPv6Address(int(address))  # fe80::1%eth0 is fe80::1
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return address_refusal(embedded)
    if address in _METADATA_ADDRESSES:
        return AddressRefusal.METADATA
    refused = _IPV4_REFUSED if isinstance(address, ipaddress.IPv4Address) else _IPV6_REFUSED
    for network, refusal in refused:
        if address in network:
            return refusal
    if isinstance(address, ipaddress.IPv6Address) and address not in _IPV6_GLOBAL_UNICAST:
        return AddressRefusal.RESERVED
    return None


def _normal_host(host: str) -> str:
    return host.rstrip(".").lower()


@dataclass(frozen=True, slots=True)
class AllowList:
    """Hosts and networks webhooks may reach although they are not public."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        """Entries as in the setting: host names (``receiver.internal``), addresses
        (``127.0.0.1``, ``::1``) and networks (``10.1.0.0/16``); blanks are skipped.

        Raises:
            ValueError: an entry is none of those.
        """
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for raw in entries:
            entry = raw.strip()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            if "/" in entry or ":" in entry or not entry.replace("-", "").replace(".", "").isalnum():
                raise ValueError(f"allow-list entry {entry!r} is not a host name, an address or a network")
            hosts.add(_normal_host(entry))
        return cls(frozenset(hosts), tuple(networks))

    def allows_host(self, host: str) -> bool:
        """``host`` is allow-listed by name, or is a literal address in an allowed network."""
        if _normal_host(host) in self.hosts:
            return True
        address = _literal_address(host)
        return address is not None and self.allows_address(address)

    def allows_address(self, address: IPAddress) -> bool:
        return any(address.version == network.version and address in network for network in self.networks)


def _literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _looks_numeric(host: str) -> bool:
    """A host such as ``2130706433`` or ``127.1``: not a canonical address, yet one to
    inet_aton (and so to getaddrinfo)."""
    return host.replace(".", "").isdigit() or host.lower().startswith("0x")


@dataclass(frozen=True, slots=True)
class UrlPolicy:
    """The rules above, with the service's allow-list."""

    allow: AllowList = field(default_factory=AllowList)

    def refusal_for(self, host: str, address: IPAddress) -> str | None:
        """Why a connection to ``host`` may not use ``address``; ``None`` when it may."""
        if self.allow.allows_host(host) or self.allow.allows_address(address):
            return None
        refusal = address_refusal(address)
        return None if refusal is None else f"{address.compressed} is {refusal.value}"

    def url_refusal(self, url: str) -> str | None:
        """What is wrong with ``url`` without resolving its host (its form, its scheme, a literal
        address, a metadata name); ``None`` when nothing is."""
        if len(url) > MAX_URL_LENGTH:
            return f"is longer than {MAX_URL_LENGTH} characters"
        try:
            parsed = URL(url)
        except (TypeError, ValueError):
            return "is not a URL"
        host = parsed.raw_host
        if not parsed.absolute or not host:
            return "is not an absolute URL with a host"
        if parsed.scheme not in ("https", "http"):
            return "must be https"
        if parsed.scheme == "http" and not self.allow.allows_host(host):
            return "must be https (http only to an allow-listed host)"
        if parsed.user is not None or parsed.password is not None:
            return "must not hold a user name or password (send credentials in headers)"
        if self.allow.allows_host(host):
            return None
        if _normal_host(host) in METADATA_HOSTS:
            return "names a cloud metadata host"
        address = _literal_address(host)
        if address is not None:
            refusal = self.refusal_for(host, address)
            return None if refusal is None else f"is refused: {refusal}"
        if _looks_numeric(host):
            return "has a host that is neither a name nor a canonical address"
        if not _HOST_NAME.fullmatch(host):
            return "has a host that is not a DNS name"
        return None

    async def destination_url_violations(
        self, url: str, resolver: AbstractResolver, field_path: str = "destination.webhook.url"
    ) -> list[FieldViolation]:
        """Why ``url`` cannot be a destination's, its host resolved now through ``resolver``;
        empty when it can."""
        refusal = self.url_refusal(url)
        if refusal is not None:
            return [FieldViolation(field_path, f"the URL {refusal}")]
        parsed = URL(url)
        host = parsed.raw_host or ""
        if self.allow.allows_host(host) or _literal_address(host) is not None:
            return []
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_S):
                resolved = await resolver.resolve(host, parsed.port or 443, family=socket.AF_UNSPEC)
        except (OSError, TimeoutError):
            return [FieldViolation(field_path, "the URL's host does not resolve")]
        refusal = self.refusal_among(host, resolved)
        if refusal is not None:
            return [FieldViolation(field_path, f"the URL's host is refused: {refusal}")]
        if not resolved:
            return [FieldViolation(field_path, "the URL's host does not resolve")]
        return []

    def refusal_among(self, host: str, resolved: Sequence[ResolveResult]) -> str | None:
        """Why a connection to ``host`` may not use one of the ``resolved`` addresses; ``None``
        when it may use them all."""
        for result in resolved:
            address = _literal_address(result["host"])
            if address is None:
                return f"{result['host']!r} is not an address"
            refusal = self.refusal_for(host, address)
            if refusal is not None:
                return refusal
        return None


class AddressRefused(OSError):
    """A connection was about to use an address webhooks may not reach (aiohttp wraps it in
    ``ClientConnectorDNSError``)."""


class GuardedResolver(AbstractResolver):
    """Resolves with ``inner`` and refuses the whole answer when any address in it is refused:
    the connection then cannot reach it, whatever order happy eyeballs tries them in."""

    def __init__(self, policy: UrlPolicy, inner: AbstractResolver) -> None:
        self._policy = policy
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Raises:
        AddressRefused: the host is a metadata name, or resolves to a refused address.
        OSError: the inner resolver's failures.
        """
        if _normal_host(host) in METADATA_HOSTS and not self._policy.allow.allows_host(host):
            raise AddressRefused(f"{host} is a cloud metadata host")
        resolved = await self._inner.resolve(host, port, family)
        refusal = self._policy.refusal_among(host, resolved)
        if refusal is not None:
            raise AddressRefused(refusal)
        return resolved

    async def close(self) -> None:
        await self._inner.close()
