"""Where webhooks may go: address rules, URL rules, the allow-list, and the resolver that
checks the addresses a connection is about to use."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from sendtime_common.errors import FieldViolation
from tests.triggers.support import HostsResolver
from triggers.ssrf import (
    AddressRefusal,
    AddressRefused,
    AllowList,
    GuardedResolver,
    UrlPolicy,
    address_refusal,
)

LOOPBACK_ALLOWED = UrlPolicy(AllowList.parse(["127.0.0.0/8", "::1"]))
STRICT = UrlPolicy()
PUBLIC_V4 = "93.184.215.14"
PUBLIC_V6 = "2606:2800:21f:cb07:6820:80da:af6b:8b2c"


@pytest.mark.parametrize(
    ("address", "refusal"),
    [
        ("127.0.0.1", AddressRefusal.LOOPBACK),
        ("127.255.255.254", AddressRefusal.LOOPBACK),
        ("10.0.0.1", AddressRefusal.PRIVATE),
        ("172.16.0.1", AddressRefusal.PRIVATE),
        ("172.31.255.255", AddressRefusal.PRIVATE),
        ("192.168.1.1", AddressRefusal.PRIVATE),
        ("100.64.0.1", AddressRefusal.SHARED),
        ("100.127.255.254", AddressRefusal.SHARED),
        ("169.254.0.1", AddressRefusal.LINK_LOCAL),
        ("169.254.169.254", AddressRefusal.METADATA),
        ("169.254.170.2", AddressRefusal.METADATA),
        ("100.100.100.200", AddressRefusal.METADATA),
        ("0.0.0.0", AddressRefusal.UNSPECIFIED),
        ("0.1.2.3", AddressRefusal.UNSPECIFIED),
        ("224.0.0.1", AddressRefusal.MULTICAST),
        ("239.255.255.250", AddressRefusal.MULTICAST),
        ("240.0.0.1", AddressRefusal.RESERVED),
        ("255.255.255.255", AddressRefusal.RESERVED),
        ("192.0.0.8", AddressRefusal.RESERVED),
        ("192.0.2.1", AddressRefusal.RESERVED),
        ("198.18.0.1", AddressRefusal.RESERVED),
        ("198.51.100.1", AddressRefusal.RESERVED),
        ("203.0.113.1", AddressRefusal.RESERVED),
        ("::", AddressRefusal.UNSPECIFIED),
        ("::1", AddressRefusal.LOOPBACK),
        ("fc00::1", AddressRefusal.UNIQUE_LOCAL),
        ("fd12:3456:789a::1", AddressRefusal.UNIQUE_LOCAL),
        ("fd00:ec2::254", AddressRefusal.METADATA),
        ("fe80::1", AddressRefusal.LINK_LOCAL),
        ("fe80::1%1", AddressRefusal.LINK_LOCAL),
        ("fec0::1", AddressRefusal.SITE_LOCAL),
        ("ff02::1", AddressRefusal.MULTICAST),
        ("ff0e::1", AddressRefusal.MULTICAST),
        ("2001:db8::1", AddressRefusal.RESERVED),
        ("2001::1", AddressRefusal.RESERVED),  # Teredo
        ("100::1", AddressRefusal.RESERVED),
        ("64:ff9b:1::1", AddressRefusal.PRIVATE),
        ("::2", AddressRefusal.RESERVED),  # IPv4-compatible, deprecated
        ("4000::1", AddressRefusal.RESERVED),  # outside global unicast
        # IPv4 inside IPv6: what the address reaches is what counts.
        ("::ffff:127.0.0.1", AddressRefusal.LOOPBACK),
        ("::ffff:10.1.2.3", AddressRefusal.PRIVATE),
        ("::ffff:169.254.169.254", AddressRefusal.METADATA),
        ("::ffff:100.64.1.1", AddressRefusal.SHARED),
        ("::ffff:0.0.0.0", AddressRefusal.UNSPECIFIED),
        ("2002:7f00:1::1", AddressRefusal.LOOPBACK),  # 6to4 of 127.0.0.1
        ("2002:a9fe:a9fe::1", AddressRefusal.METADATA),  # 6to4 of 169.254.169.254
        ("64:ff9b::a9fe:a9fe", AddressRefusal.METADATA),  # NAT64 of 169.254.169.254
        ("64:ff9b::c0a8:101", AddressRefusal.PRIVATE),  # NAT64 of 192.168.1.1
    ],
)
def test_non_public_addresses_are_refused(address: str, refusal: AddressRefusal) -> None:
    assert address_refusal(ipaddress.ip_address(address)) == refusal
    assert STRICT.refusal_for("receiver.example", ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize(
    "address",
    [
        PUBLIC_V4,
        "1.1.1.1",
        "8.8.8.8",
        "100.63.255.255",  # either side of 100.64.0.0/10
        "100.128.0.1",
        "172.32.0.1",  # past 172.16.0.0/12
        PUBLIC_V6,
        "::ffff:8.8.8.8",
    ],
)
def test_public_addresses_pass(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://receiver.example/hooks", "must be https"),
        ("ftp://receiver.example/hooks", "must be https"),
        ("https://user:pw@receiver.example/hooks", "user name or password"),
        ("https://token@receiver.example/hooks", "user name or password"),
        ("/hooks", "absolute URL"),
        ("receiver.example/hooks", "absolute URL"),
        ("https://127.0.0.1/hooks", "loopback"),
        ("https://[::1]:8443/hooks", "loopback"),
        ("https://[::ffff:127.0.0.1]/hooks", "loopback"),
        ("https://[::ffff:169.254.169.254]/latest/meta-data", "metadata"),
        ("https://169.254.169.254/latest/meta-data", "metadata"),
        ("https://[fd00:ec2::254]/latest/meta-data", "metadata"),
        ("https://10.0.0.1/hooks", "private"),
        ("https://100.64.0.1/hooks", "shared"),
        ("https://[fe80::1]/hooks", "link-local"),
        ("https://224.0.0.1/hooks", "multicast"),
        ("https://0.0.0.0/hooks", "unspecified"),
        ("https://metadata.google.internal/computeMetadata/v1/", "metadata host"),
        ("https://METADATA.google.internal./computeMetadata/v1/", "metadata host"),
        ("https://2130706433/hooks", "canonical address"),
        ("https://127.1/hooks", "canonical address"),
        ("https://0x7f.0.0.1/hooks", "canonical address"),
        ("https://exa mple.com/hooks", "not a DNS name"),
        ("https://receiver.example/" + "a" * 2100, "longer than"),
    ],
)
def test_urls_are_refused_before_any_lookup(url: str, reason: str) -> None:
    refusal = STRICT.url_refusal(url)
    assert refusal is not None and reason in refusal


def test_loopback_passes_when_allow_listed_even_over_http() -> None:
    assert LOOPBACK_ALLOWED.url_refusal("http://127.0.0.1:8080/hooks") is None
    assert LOOPBACK_ALLOWED.url_refusal("https://[::1]:8443/hooks") is None
    assert LOOPBACK_ALLOWED.refusal_for("localhost", ipaddress.ip_address("127.0.0.1")) is None
    # Only what is listed: the rest of the rules still hold.
    assert LOOPBACK_ALLOWED.url_refusal("http://10.0.0.1/hooks") is not None
    assert LOOPBACK_ALLOWED.url_refusal("http://receiver.example/hooks") is not None


def test_an_allow_listed_host_name_may_use_http_and_any_address() -> None:
    policy = UrlPolicy(AllowList.parse(["Mailer.Internal.", ""]))
    assert policy.url_refusal("http://mailer.internal:8080/hooks") is None
    assert policy.refusal_for("mailer.internal", ipaddress.ip_address("10.1.2.3")) is None
    assert policy.refusal_for("other.internal", ipaddress.ip_address("10.1.2.3")) is not None


def test_an_allow_listed_metadata_host_is_let_through() -> None:
    policy = UrlPolicy(AllowList.parse(["metadata.google.internal"]))
    assert policy.url_refusal("https://metadata.google.internal/") is None


@pytest.mark.parametrize("entry", ["not a host", "10.0.0.0/33", "http://x", "a:b:c", "x/y"])
def test_a_bad_allow_list_entry_is_refused(entry: str) -> None:
    with pytest.raises(ValueError):
        AllowList.parse([entry])


def test_allow_list_entries_are_hosts_addresses_and_networks() -> None:
    allow = AllowList.parse([" receiver.test ", "10.1.0.0/16", "[::1]", "192.168.1.7"])
    assert allow.hosts == frozenset({"receiver.test"})
    assert allow.allows_address(ipaddress.ip_address("10.1.255.1"))
    assert not allow.allows_address(ipaddress.ip_address("10.2.0.1"))
    assert allow.allows_address(ipaddress.ip_address("::1"))
    assert allow.allows_address(ipaddress.ip_address("192.168.1.7"))
    assert not allow.allows_address(ipaddress.ip_address("::ffff:10.1.0.1"))


FIELD = "destination.webhook.url"


async def test_a_destination_url_is_checked_with_its_host_resolved() -> None:
    resolver = HostsResolver(
        {
            "public.example": [PUBLIC_V4, PUBLIC_V6],
            "inside.example": ["10.0.0.7"],
            "mixed.example": [PUBLIC_V4, "fd00::1"],
            "loopback.example": ["127.0.0.1"],
            "metadata.example": ["169.254.169.254"],
            "mapped.example": ["::ffff:192.168.0.1"],
        }
    )

    async def violations(url: str, policy: UrlPolicy = STRICT) -> list[FieldViolation]:
        return await policy.destination_url_violations(url, resolver)

    assert await violations("https://public.example/hooks") == []
    for host, reason in [
        ("inside.example", "10.0.0.7 is a private address"),
        ("mixed.example", "fd00::1 is an IPv6 unique local address"),
        ("loopback.example", "127.0.0.1 is a loopback address"),
        ("metadata.example", "169.254.169.254 is a cloud metadata address"),
        ("mapped.example", "::ffff:c0a8:1 is a private address"),
    ]:
        assert await violations(f"https://{host}/hooks") == [
            FieldViolation(FIELD, f"the URL's host is refused: {reason}")
        ]
    assert await violations("https://nowhere.example/hooks") == [
        FieldViolation(FIELD, "the URL's host does not resolve")
    ]
    assert await violations("http://public.example/hooks") == [
        FieldViolation(FIELD, "the URL must be https (http only to an allow-listed host)")
    ]
    # Allow-listed loopback: a name resolving there passes too.
    assert await violations("https://loopback.example/hooks", LOOPBACK_ALLOWED) == []


async def test_the_field_path_is_the_callers() -> None:
    violations = await STRICT.destination_url_violations(
        "https://10.0.0.1/", HostsResolver({}), "destination.webhook.url"
    )
    assert [v.field for v in violations] == ["destination.webhook.url"]


async def test_the_real_resolver_refuses_localhost() -> None:
    from aiohttp.resolver import ThreadedResolver

    violations = await STRICT.destination_url_violations("https://localhost/hooks", ThreadedResolver())
    assert len(violations) == 1 and "loopback" in violations[0].description


async def test_the_guarded_resolver_refuses_a_refused_address_among_the_answers() -> None:
    hosts = HostsResolver({"receiver.test": [PUBLIC_V4], "rebound.test": [PUBLIC_V4, "10.0.0.7"]})
    guarded = GuardedResolver(STRICT, hosts)
    assert [r["host"] for r in await guarded.resolve("receiver.test", 443, socket.AF_UNSPEC)] == [PUBLIC_V4]
    with pytest.raises(AddressRefused, match="10.0.0.7 is a private address"):
        await guarded.resolve("rebound.test", 443)
    with pytest.raises(AddressRefused, match="metadata"):
        await guarded.resolve("metadata.google.internal", 80)
    with pytest.raises(OSError):
        await guarded.resolve("nowhere.test", 443)
