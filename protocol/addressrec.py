"""Address records: one signed, versioned statement per member of where its node can be
reached now (addresses with a kind, relays), spread between members and used for dialing.

Pure: the sequence number (from the member's clock) and the identity come in as arguments.
The exact encoding and the rules a receiver applies are in docs/protocol.md (Address records).
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from . import cbor
from .errors import DecodeError, LocalError, RemoteError
from .identity import Identity, MemberId

RECORD_VERSION = 1
# Domain separation: a record signature can never be taken for any other signed thing.
RECORD_DOMAIN = b"valuemesh/address-record/v1\x00"
MAX_RECORD_ADDRESSES = 8
MAX_RECORD_RELAYS = 4
# 8 IPv6 addresses with kinds and ports, 4 relay keys and a signature fit in about 600 bytes.
MAX_RECORD_SIZE = 1024
MAX_SEQ = (1 << 63) - 1
_KEYS = frozenset({"v", "m", "seq", "addrs", "relays", "sig"})


class Kind(enum.StrEnum):
    """How an address reaches the member: on its own network, from anywhere, or through a
    port mapping its router made."""

    LAN = "lan"
    DIRECT = "direct"
    MAPPED = "mapped"


def canonical_ip(host: str) -> str | None:
    """The canonical text of an IPv4 or IPv6 literal without a zone; None if it is not one
    that a remote node could dial (a name, a zone, unspecified or multicast)."""
    if not isinstance(host, str) or "%" in host or len(host) > 45:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.is_unspecified or ip.is_multicast:
        return None
    return ip.compressed


@dataclass(frozen=True, slots=True, order=True)
class RecordAddress:
    """One address of a record: its kind and an IP literal (canonical form) and port."""

    kind: Kind
    host: str
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.kind, Kind):
            raise LocalError("An address kind must be lan, direct or mapped.")
        if type(self.port) is not int or not 1 <= self.port <= 65535:
            raise LocalError("A record address's port must be a whole number from 1 to 65535.")
        ip = canonical_ip(self.host)
        if ip is None or ip != self.host:
            raise LocalError(f"'{str(self.host)[:60]}' is not an IP address in canonical form.")

    def to_cbor(self) -> list[object]:
        return [self.kind.value, self.host, self.port]


@dataclass(frozen=True, slots=True)
class AddressRecord:
    """A member's signed statement of where its node is reachable; a higher `seq` replaces
    a lower one. Construct with `AddressRecord.sign` or `decode_record`."""

    member: MemberId
    seq: int
    addresses: tuple[RecordAddress, ...]
    relays: tuple[MemberId, ...]
    sig: bytes
    version: int = RECORD_VERSION

    def payload(self) -> dict[str, object]:
        return {
            "v": self.version,
            "m": self.member.key,
            "seq": self.seq,
            "addrs": [a.to_cbor() for a in self.addresses],
            "relays": [r.key for r in self.relays],
        }

    def raw(self) -> bytes:
        return cbor.encode({**self.payload(), "sig": self.sig})

    def signed_message(self) -> bytes:
        return RECORD_DOMAIN + cbor.encode(self.payload())

    def verify(self) -> None:
        """Raise SignatureError unless the member signed exactly this record."""
        self.member.verify(self.signed_message(), self.sig)

    def same_content(self, addresses: tuple[RecordAddress, ...], relays: tuple[MemberId, ...]) -> bool:
        return self.addresses == addresses and self.relays == relays

    @classmethod
    def sign(
        cls, identity: Identity, seq: int, addresses: tuple[RecordAddress, ...] | list[RecordAddress],
        relays: tuple[MemberId, ...] | list[MemberId] = (),
    ) -> AddressRecord:
        """Our own record; addresses are deduplicated and sorted, so one content has one form."""
        addrs = tuple(sorted(set(addresses)))
        rel = tuple(dict.fromkeys(relays))
        if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
            raise LocalError("A record's sequence number must be a whole number from 0 to 2**63-1.")
        if len(addrs) > MAX_RECORD_ADDRESSES or len(rel) > MAX_RECORD_RELAYS:
            raise LocalError(
                f"A record holds at most {MAX_RECORD_ADDRESSES} addresses and {MAX_RECORD_RELAYS} relays."
            )
        if identity.member in rel:
            raise LocalError("A member cannot be its own relay.")
        unsigned = cls(identity.member, seq, addrs, rel, b"")
        rec = cls(identity.member, seq, addrs, rel, identity.sign(unsigned.signed_message()))
        if len(rec.raw()) > MAX_RECORD_SIZE:
            raise LocalError(f"The address record would exceed {MAX_RECORD_SIZE} bytes.")
        return rec


def next_seq(previous: int | None, now_ms: int) -> int:
    """The member's next sequence number: its clock in ms, but always above the last one
    (a clock set back must not make a newer record look older)."""
    return now_ms if previous is None else max(previous + 1, now_ms)


def _refuse(reason: str) -> DecodeError:
    return DecodeError(f"An address record is malformed: {reason}.")


def decode_record(raw: bytes, *, verify: bool = True) -> AddressRecord:
    """Decode strictly (and by default verify) a record; one plain sentence per refusal.

    A node decodes unverified first to refuse a stale or unwanted record without paying
    for a signature check.
    """
    if not isinstance(raw, bytes):
        raise _refuse("it is not bytes")
    if len(raw) > MAX_RECORD_SIZE:
        raise DecodeError(f"An address record of {len(raw)} bytes exceeds the limit of {MAX_RECORD_SIZE}.")
    try:
        doc = cbor.decode(raw, max_size=MAX_RECORD_SIZE)
    except RemoteError as e:
        raise _refuse(f"not canonical CBOR ({e.message.rstrip('.')})") from None
    if not isinstance(doc, dict) or set(doc) != _KEYS:
        raise _refuse("it must be a map of exactly v, m, seq, addrs, relays and sig")
    if doc["v"] != RECORD_VERSION or type(doc["v"]) is not int:
        raise DecodeError(f"An address record has version {str(doc['v'])[:20]}; this node reads version "
                          f"{RECORD_VERSION}.")
    key, seq, addrs, relays, sig = doc["m"], doc["seq"], doc["addrs"], doc["relays"], doc["sig"]
    if not isinstance(key, bytes) or len(key) != 32:
        raise _refuse("its member must be a 32-byte key")
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise _refuse("its seq must be a whole number from 0 to 2**63-1")
    if not isinstance(sig, bytes) or len(sig) != 64:
        raise _refuse("its signature must be 64 bytes")
    if not isinstance(addrs, list) or len(addrs) > MAX_RECORD_ADDRESSES:
        raise _refuse(f"it must list at most {MAX_RECORD_ADDRESSES} addresses")
    if not isinstance(relays, list) or len(relays) > MAX_RECORD_RELAYS:
        raise _refuse(f"it must list at most {MAX_RECORD_RELAYS} relays")
    out: list[RecordAddress] = []
    for a in addrs:
        if not (isinstance(a, list) and len(a) == 3 and isinstance(a[0], str) and isinstance(a[1], str)
                and type(a[2]) is int):
            raise _refuse("an address must be [kind, host, port]")
        try:
            out.append(RecordAddress(Kind(a[0]), a[1], a[2]))
        except (ValueError, LocalError):
            raise _refuse(f"'{a[0][:10]}' {a[1][:60]}:{a[2]} is not a kind and a canonical IP address and port"
                          ) from None
    if out != sorted(set(out)):
        raise _refuse("its addresses must be sorted and distinct")
    try:
        member = MemberId(key)
        rel = [MemberId(r) for r in relays]
    except (TypeError, ValueError, RemoteError, LocalError):
        raise _refuse("a key in it is not a member id") from None
    if len(set(rel)) != len(rel) or member in rel:
        raise _refuse("its relays must be distinct and not the member itself")
    rec = AddressRecord(member, seq, tuple(out), tuple(rel), sig)
    if verify:
        rec.verify()
    return rec
