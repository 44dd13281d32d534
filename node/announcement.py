"""What a node announces over mDNS/DNS-SD and how an announcement is read: the service type,
the TXT record (strictly parsed, since anyone on the LAN may send one) and its validated content.

Pure: no sockets. node/discovery.py runs the zeroconf service that sends and receives these.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from valuemesh.node.addresses import Address
from valuemesh.protocol.errors import DecodeError, LocalError, ValidationError, ValuemeshError
from valuemesh.protocol.identity import MemberId

SERVICE_TYPE = "_valuemesh._tcp.local."
DISCOVERY_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
MAX_NETWORK_ID = 64  # bytes; matches the transport's limit

# TXT keys. Short, because every announcement carries them (RFC 6763 §6.4 asks for <= 9).
TXT_MEMBER = "id"
TXT_NETWORK = "net"
TXT_PORT = "port"
TXT_VERSION = "pv"
_REQUIRED_KEYS = (TXT_MEMBER, TXT_NETWORK, TXT_PORT, TXT_VERSION)

# Bounds on hostile input. A well-formed announcement of ours is about 220 bytes.
MAX_TXT_BYTES = 1300
MAX_TXT_ENTRIES = 16


def parse_txt(raw: bytes) -> dict[str, bytes]:
    """Parse DNS TXT rdata (length-prefixed strings of key=value) strictly.

    Unlike a lenient DNS-SD reader, a duplicate key, a key without '=', a non-ASCII key or
    an empty string makes the whole record invalid: a node never emits those, so they mark
    a garbled or hostile announcement.
    """
    if not isinstance(raw, bytes):
        raise DecodeError("A TXT record must be bytes.")
    if len(raw) > MAX_TXT_BYTES:
        raise DecodeError(f"The TXT record is {len(raw)} bytes; the limit is {MAX_TXT_BYTES}.")
    out: dict[str, bytes] = {}
    i = 0
    while i < len(raw):
        n = raw[i]
        item = raw[i + 1 : i + 1 + n]
        if n == 0 or len(item) != n:
            raise DecodeError("The TXT record has an empty or truncated string.")
        i += 1 + n
        key_raw, eq, value = item.partition(b"=")
        if not eq or not key_raw:
            raise DecodeError("A TXT string has no 'key=' part.")
        if any(c < 0x20 or c > 0x7E for c in key_raw):
            raise DecodeError("A TXT key holds characters outside printable ASCII.")
        key = key_raw.decode("ascii").lower()
        if key in out:
            raise DecodeError(f"The TXT key '{key}' appears twice.")
        if len(out) >= MAX_TXT_ENTRIES:
            raise DecodeError(f"The TXT record has more than {MAX_TXT_ENTRIES} entries.")
        out[key] = value
    return out


def encode_txt(items: dict[str, str]) -> bytes:
    """Encode our own TXT rdata (the inverse of `parse_txt`)."""
    out = bytearray()
    for k, v in items.items():
        s = f"{k}={v}".encode()
        if len(s) > 255:
            raise LocalError(f"The TXT entry '{k}' is longer than 255 bytes.")
        out += bytes((len(s),)) + s
    return bytes(out)


def _ascii(value: bytes, what: str) -> str:
    if not value or any(c < 0x21 or c > 0x7E for c in value):
        raise ValidationError(f"The announced {what} is empty or not printable ASCII.")
    return value.decode("ascii")


def _decimal(value: bytes, what: str, low: int, high: int) -> int:
    text = _ascii(value, what)
    # Only canonical decimals: no sign, no spaces, no leading zeros, no underscores.
    if not text.isdigit() or (len(text) > 1 and text[0] == "0") or len(text) > 10:
        raise ValidationError(f"The announced {what} is not a plain decimal number.")
    number = int(text)
    if not low <= number <= high:
        raise ValidationError(f"The announced {what} {number} is outside {low}-{high}.")
    return number


@dataclass(frozen=True, slots=True)
class Announcement:
    """The validated content of one node's DNS-SD announcement."""

    member: MemberId
    network_id: bytes
    port: int
    version: int


def announcement_txt(member: MemberId, network_id: bytes, port: int) -> dict[str, str]:
    return {
        TXT_MEMBER: str(member),
        TXT_NETWORK: network_id.hex(),
        TXT_PORT: str(port),
        TXT_VERSION: str(DISCOVERY_VERSION),
    }


def parse_announcement(txt: bytes, srv_port: int | None) -> Announcement:
    """Validate raw TXT rdata plus the SRV port; raises a RemoteError subclass if bad."""
    fields = parse_txt(txt)
    missing = [k for k in _REQUIRED_KEYS if k not in fields]
    if missing:
        raise ValidationError(f"The announcement lacks the TXT key '{missing[0]}'.")
    version = _decimal(fields[TXT_VERSION], "protocol version", 0, 65535)
    if version not in SUPPORTED_VERSIONS:
        raise ValidationError(f"The announcement uses discovery version {version}, unknown here.")
    try:
        member = MemberId.parse(_ascii(fields[TXT_MEMBER], "member id"))
    except ValuemeshError as e:
        raise ValidationError(f"The announced member id is invalid: {e}") from None
    net_text = _ascii(fields[TXT_NETWORK], "network id")
    if len(net_text) % 2 or len(net_text) > 2 * MAX_NETWORK_ID or net_text != net_text.lower():
        raise ValidationError("The announced network id is not lower-case hex of 1-64 bytes.")
    try:
        network_id = bytes.fromhex(net_text)
    except ValueError:
        raise ValidationError("The announced network id is not hexadecimal.") from None
    port = _decimal(fields[TXT_PORT], "port", 1, 65535)
    if srv_port != port:
        raise ValidationError("The announced TXT port and SRV port disagree.")
    return Announcement(member, network_id, port, version)


@dataclass(frozen=True, slots=True)
class Found:
    """A peer of our network announced on the LAN; the handshake will prove its key."""

    member: MemberId
    host: str
    port: int

    @property
    def address(self) -> Address:
        return Address(self.host, self.port)


def instance_name(member: MemberId, network_id: bytes) -> str:
    # 12 chars of the id plus a tag of the network: readable in mDNS browsers, unique per
    # (member, network), and far below the 63-byte DNS label limit.
    tag = hashlib.blake2b(network_id, digest_size=4).hexdigest()
    return f"{member.short}-{tag}"
