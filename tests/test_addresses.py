"""Tests of peer addresses: validation of (host, port) pairs and peer-exchange entries, and the
strict parsing of operator-given host:port text for dialing and for listening.
"""

from __future__ import annotations

import math

import pytest

from valuemesh.node.addresses import Address, ExchangeEntry, parse_hostport
from valuemesh.protocol.errors import LocalError, ValidationError
from valuemesh.protocol.identity import MemberId


def mid(i: int) -> MemberId:
    return MemberId(bytes([i]) * 32)


# --- addresses and exchange entries ------------------------------------------------------------


def test_address_validation() -> None:
    assert Address("::1", 1).host == "::1"
    assert str(Address("2001:db8::1", 80)) == "[2001:db8::1]:80"
    assert Address("Node.Example.ORG.", 5).host == "node.example.org"
    for host, port in [
        ("0.0.0.0", 1), ("224.0.0.251", 1), ("", 1), ("a..b", 1), ("-a", 1), ("1.2.3", 1),
        ("x" * 300, 1), ("ok", 0), ("ok", 65536), ("under_score", 1), ("ff02::fb", 1),
    ]:
        with pytest.raises(ValidationError):
            Address(host, port)
    with pytest.raises(ValidationError):
        Address("ok", True)


def test_exchange_entry_validation() -> None:
    a = Address("10.1.1.1", 1)
    for age in (-1.0, math.inf, math.nan):
        with pytest.raises(ValidationError):
            ExchangeEntry(mid(1), a, age)
    with pytest.raises(ValidationError):
        ExchangeEntry(mid(1), Address("peer.example", 1), 0.0)


# --- host:port parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1:7000", ("10.0.0.1", 7000)),
        ("  seed.example.org:443 ", ("seed.example.org", 443)),
        ("Seed.Example.ORG.:1", ("seed.example.org", 1)),
        ("[2001:db8::1]:7000", ("2001:db8::1", 7000)),
        ("[::1]:65535", ("::1", 65535)),
        ("[fe80::1%eth0]:7000", ("fe80::1%eth0", 7000)),
        ("localhost:80", ("localhost", 80)),
    ],
)
def test_parse_hostport_good(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "", "   ", "host", "host:", ":7000", "host:0", "host:65536", "host:-1", "host:+80",
        "host:8o", "host:७०००", "2001:db8::1:7000", "[2001:db8::1]", "[2001:db8::1]7000",
        "[10.0.0.1]:80", "[2001:db8::1:80", "bad_host:80", "-bad.example:80", "a..b:80",
        "0.0.0.0:80", "224.0.0.251:5353", "1.2.3:80", "host:123456", "[fe80::1%a b]:80",
        "[fe80::1%]:80", "[fe80::1%" + "x" * 16 + "]:80",
    ],
)
def test_parse_hostport_bad(text: str) -> None:
    with pytest.raises(LocalError) as e:
        parse_hostport(text)
    assert "\n" not in str(e.value) and str(e.value).endswith(".")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:7470", ("0.0.0.0", 7470)),
        (":7470", ("127.0.0.1", 7470)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::]:7470", ("::", 7470)),
        ("[0:0::1]:1", ("::1", 1)),
        ("LocalHost:80", ("localhost", 80)),
        ("10.0.0.1:7000", ("10.0.0.1", 7000)),
    ],
)
def test_parse_hostport_listen_address(text: str, expected: tuple[str, int]) -> None:
    # A listen address may bind everything and any port; a dial target may not.
    assert parse_hostport(text, default_host="127.0.0.1") == expected


@pytest.mark.parametrize(
    "text",
    ["", "7470", "host:", "host:65536", "224.0.0.251:5353", "[ff02::fb]:1", "bad_host:80",
     "[10.0.0.1]:80", "2001:db8::1:7000"],
)
def test_parse_hostport_bad_listen_address(text: str) -> None:
    with pytest.raises(LocalError) as e:
        parse_hostport(text, default_host="0.0.0.0")
    assert "\n" not in str(e.value) and str(e.value).endswith(".")
