"""Peer addresses as the node handles them: validated (host, port) pairs, where each was
learnt, the entries of a peer-exchange message, and strict parsing of operator text.

Pure: no I/O. Everything here checks untrusted input and raises ValidationError or LocalError.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from valuemesh.protocol.errors import LocalError, ValidationError
from valuemesh.protocol.identity import MemberId

MAX_HOSTNAME_LEN = 253


class Source(enum.StrEnum):
    """How we learnt an address; first-hand sources are never overridden by exchange."""

    MDNS = "mdns"
    BOOTSTRAP = "bootstrap"
    INVITE = "invite"
    INBOUND = "inbound"
    EXCHANGE = "exchange"
    RECORD = "record"  # the member's own signed address record (protocol/addressrec.py)


_HOST_LABEL_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-")
# An IPv6 zone is an interface name (at most IFNAMSIZ-1 = 15 bytes) or index.
_ZONE_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")


def is_hostname(text: str) -> bool:
    """True for an RFC 1123 DNS name (letters, digits, hyphens; dot-separated labels)."""
    if not text or len(text) > MAX_HOSTNAME_LEN:
        return False
    labels = text.lower().rstrip(".").split(".")
    for label in labels:
        if not label or len(label) > 63 or not set(label) <= _HOST_LABEL_CHARS:
            return False
        if label[0] == "-" or label[-1] == "-":
            return False
    # An all-numeric last label would be a mistyped IPv4 address, not a name.
    return not labels[-1].isdigit()


def ip_or_none(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def is_global(host: str) -> bool:
    """Whether the IP literal `host` is a globally routable address (False for a name)."""
    ip = ip_or_none(host)
    return ip is not None and ip.is_global


def on_networks(host: str, networks: Sequence[Network]) -> bool:
    """Whether the IP literal `host` is on one of `networks` (False for a name)."""
    ip = ip_or_none(host)
    return ip is not None and any(ip.version == n.version and ip in n for n in networks)


@dataclass(frozen=True, slots=True, order=True)
class Address:
    """A dialable (host, port); host is an IP literal (canonical form) or a DNS name."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or isinstance(self.port, bool):
            raise ValidationError("A port must be a whole number.")
        if not 1 <= self.port <= 65535:
            raise ValidationError(f"Port {self.port} is outside 1-65535.")
        if not isinstance(self.host, str):
            raise ValidationError("A host must be text.")
        ip = ip_or_none(self.host)
        if ip is not None:
            if ip.is_unspecified or ip.is_multicast:
                raise ValidationError(f"'{self.host}' is not an address a peer can be dialed on.")
            zone = getattr(ip, "scope_id", None)
            if zone is not None and not _ZONE_RE.fullmatch(zone):
                raise ValidationError(f"'{self.host[:80]}' has an invalid interface zone.")
            object.__setattr__(self, "host", ip.compressed)
        elif not is_hostname(self.host):
            raise ValidationError(f"'{self.host[:80]}' is neither an IP address nor a host name.")
        else:
            object.__setattr__(self, "host", self.host.lower().rstrip("."))

    @property
    def is_ip(self) -> bool:
        return ip_or_none(self.host) is not None

    @property
    def is_loopback(self) -> bool:
        ip = ip_or_none(self.host)
        return ip is not None and ip.is_loopback

    @property
    def is_link_local(self) -> bool:
        ip = ip_or_none(self.host)
        return ip is not None and ip.is_link_local

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ExchangeEntry:
    """One address offered by a peer: `age` is seconds since the sender last confirmed it."""

    member: MemberId
    address: Address
    age: float

    def __post_init__(self) -> None:
        if not isinstance(self.member, MemberId) or not isinstance(self.address, Address):
            raise ValidationError("A peer-exchange entry needs a member id and an address.")
        if not isinstance(self.age, (int, float)) or isinstance(self.age, bool):
            raise ValidationError("A peer-exchange entry's age must be a number.")
        if not math.isfinite(self.age) or self.age < 0:
            raise ValidationError("A peer-exchange entry's age must be finite and not negative.")
        if not self.address.is_ip:
            raise ValidationError("Peer exchange carries IP addresses only, never host names.")


def parse_hostport(text: str, *, default_host: str | None = None) -> tuple[str, int]:
    """Parse `HOST:PORT`, `IPv4:PORT` or `[IPv6]:PORT` strictly; raises LocalError.

    Without `default_host` the text names a peer to dial, such as a bootstrap address.
    With it, the text names where to listen: `:PORT` means `default_host:PORT`, the
    unspecified address (0.0.0.0, [::]) is allowed and port 0 asks for any free port.
    """
    what = "A bootstrap address" if default_host is None else "A listen address"
    if not isinstance(text, str):
        raise LocalError(f"{what} must be text like host:port.")
    t = text.strip()
    if not t:
        raise LocalError(f"{what} is empty; write it as host:port.")
    if t.startswith("["):
        close = t.find("]")
        if close < 0:
            raise LocalError(f"'{text}' opens '[' without closing it; write [IPv6]:port.")
        host, rest = t[1:close], t[close + 1 :]
        if not rest.startswith(":"):
            raise LocalError(f"'{text}' lacks ':port' after the bracketed address.")
        ip = ip_or_none(host)
        if ip is None or ip.version != 6:
            raise LocalError(f"'{host}' in brackets is not an IPv6 address.")
        port_text = rest[1:]
    else:
        if t.count(":") > 1:
            raise LocalError(f"'{text}' looks like an IPv6 address; put it in brackets: [addr]:port.")
        host, colon, port_text = t.partition(":")
        if not colon:
            raise LocalError(f"'{text}' has no port; write it as host:port.")
        if not host and default_host is not None:
            host = default_host
        if ip_or_none(host) is None and not is_hostname(host):
            raise LocalError(f"'{host}' is neither an IP address nor a valid host name.")
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise LocalError(f"'{port_text}' in '{text}' is not a port number.")
    port = int(port_text)
    if default_host is not None:
        return _listen_address(text, host, port)
    if not 1 <= port <= 65535:
        raise LocalError(f"Port {port} in '{text}' is outside 1-65535.")
    try:
        address = Address(host, port)
    except ValidationError as e:
        raise LocalError(f"'{text}' cannot be dialed: {e}") from None
    return address.host, address.port


def _listen_address(text: str, host: str, port: int) -> tuple[str, int]:
    # Unlike a dial target, a socket may bind the unspecified address and port 0.
    if port > 65535:
        raise LocalError(f"Port {port} in '{text}' is outside 0-65535.")
    ip = ip_or_none(host)
    if ip is None:
        return host.lower().rstrip("."), port
    if ip.is_multicast:
        raise LocalError(f"'{text}' is a multicast address; a node cannot listen on it.")
    return ip.compressed, port


# How many leading bits of a source address name its owner: a hoster or ISP hands out IPv4
# addresses by the /24 at the least, and IPv6 by the /48 (a free tunnel broker gives anyone a
# /48, so a finer grouping would hand one attacker 256 or 65 536 "owners").
IPV4_RANGE_BITS = 24
IPV6_RANGE_BITS = 48


def address_range(ip: str) -> str:
    """The address range (IPv4 /24, IPv6 /48) that pre-authentication limits count `ip` in.

    An IPv4-mapped IPv6 address counts as its IPv4 address; text that is not an IP address
    (a test transport, a Unix socket) is its own range.
    """
    parsed = ip_or_none(ip.split("%", 1)[0])
    if parsed is None:
        return ip
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    bits = IPV4_RANGE_BITS if parsed.version == 4 else IPV6_RANGE_BITS
    return ipaddress.ip_network(f"{parsed}/{bits}", strict=False).compressed
