"""NAT-PMP (RFC 6886) and PCP (RFC 6887) port mapping: the messages (pure encode/decode,
strict: exact sizes, versions, opcodes, the request's own nonce and port echoed back) and a
small asyncio UDP client that asks the default gateway, found in the routing table.

No well-kept Python client exists for either (docs/decisions.md); both protocols are a few
fixed-size fields, so ours is small. Only the gateway's port 5351 is ever addressed, from a
connected UDP socket, so only its answers are read; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SERVER_PORT = 5351
PCP_VERSION = 2
NATPMP_VERSION = 0
OP_MAP = 1  # PCP MAP; NAT-PMP's UDP mapping is 1, TCP is 2
NATPMP_OP_ADDRESS = 0
NATPMP_OP_TCP = 2
PROTO_TCP = 6
PCP_HEADER = 24
PCP_MAP_PAYLOAD = 36
PCP_MAX = 1100  # RFC 6887 §7: no PCP message is longer
NONCE_LEN = 12
# RFC 6886 §3.1 retransmits from 250 ms, doubling, 9 times (64 s); a node starting up should
# not wait that long on a router that does not answer: 3 sends, 1.75 s at most.
FIRST_WAIT_S = 0.25
SENDS = 3
MAX_LIFETIME_S = 86400 * 7
ROUTE_FILES = ("/proc/thread-self/net/route", "/proc/self/net/route")

NATPMP_RESULTS = {1: "unsupported version", 2: "not authorized (mapping refused by the router)",
                  3: "network failure (the router has no outside address)", 4: "out of resources",
                  5: "unsupported opcode"}
PCP_RESULTS = {1: "unsupported version", 2: "not authorized (mapping refused by the router)",
               3: "malformed request", 4: "unsupported opcode", 5: "unsupported option",
               6: "malformed option", 7: "network failure", 8: "no resources",
               9: "unsupported protocol", 10: "user exceeded quota",
               11: "cannot provide the external address or port", 12: "address mismatch",
               13: "excessive remote peers"}


class MappingError(Exception):
    """A port mapping request failed: the router said no, or answered nonsense. One sentence."""


class NoAnswer(MappingError):
    """Nothing (or only ICMP unreachable) came back from the gateway: no server there."""


class UnsupportedVersion(MappingError):
    """The server speaks the other protocol (a NAT-PMP server answering PCP, or the reverse)."""


@dataclass(frozen=True)
class Granted:
    """What the router granted: its outside address and port, for how long."""

    external_ip: str
    external_port: int
    internal_port: int
    lifetime_s: int
    epoch_s: int


# -- NAT-PMP (RFC 6886) ---------------------------------------------------------------------


def natpmp_address_request() -> bytes:
    return struct.pack("!BB", NATPMP_VERSION, NATPMP_OP_ADDRESS)


def natpmp_map_request(internal_port: int, external_port: int, lifetime_s: int) -> bytes:
    """A TCP mapping request (lifetime 0 and external port 0: delete it)."""
    _check_port(internal_port, allow_zero=False)
    _check_port(external_port, allow_zero=True)
    _check_lifetime(lifetime_s)
    return struct.pack("!BBHHHI", NATPMP_VERSION, NATPMP_OP_TCP, 0, internal_port, external_port, lifetime_s)


def _natpmp_head(data: bytes, op: int, size: int) -> int:
    """Check version, opcode, result and size of an answer; its epoch."""
    if len(data) < 4:
        raise MappingError(f"A NAT-PMP answer is {size} bytes; this one is {len(data)}.")
    if data[0] != NATPMP_VERSION:
        raise UnsupportedVersion(f"The router answers NAT-PMP with version {data[0]}: it does not speak NAT-PMP.")
    if data[1] != 128 + op:
        raise MappingError(f"The NAT-PMP answer is for opcode {data[1]}, not {128 + op}.")
    result = struct.unpack_from("!H", data, 2)[0]
    if result == 1:
        raise UnsupportedVersion("The router does not speak this NAT-PMP version.")
    if result:
        why = NATPMP_RESULTS.get(result, f"result code {result}")
        raise MappingError(f"The router refused the NAT-PMP request: {why}.")
    if len(data) != size:
        raise MappingError(f"A NAT-PMP answer is {size} bytes; this one is {len(data)}.")
    return int(struct.unpack_from("!I", data, 4)[0])


def decode_natpmp_address(data: bytes) -> str:
    """The router's outside IPv4 address from an external-address answer (12 bytes)."""
    _natpmp_head(data, NATPMP_OP_ADDRESS, 12)
    ip = ipaddress.IPv4Address(data[8:12])
    if ip.is_unspecified:
        raise MappingError("The router reports no outside address (0.0.0.0).")
    return str(ip)


def decode_natpmp_map(data: bytes, internal_port: int) -> tuple[int, int, int]:
    """(external port, lifetime, epoch) from a TCP mapping answer (16 bytes) to a request
    for `internal_port`."""
    epoch = _natpmp_head(data, NATPMP_OP_TCP, 16)
    inner, outer, lifetime = struct.unpack_from("!HHI", data, 8)
    if inner != internal_port:
        raise MappingError(f"The NAT-PMP answer is for port {inner}, not {internal_port}.")
    if lifetime > MAX_LIFETIME_S:
        raise MappingError(f"The NAT-PMP answer grants {lifetime} s, more than any router would.")
    if lifetime and not outer:
        raise MappingError("The NAT-PMP answer grants a mapping on port 0.")
    return outer, lifetime, epoch


# -- PCP (RFC 6887) -------------------------------------------------------------------------


def _mapped(ip: str) -> bytes:
    """An address in PCP's 16-byte form (IPv4 as ::ffff:a.b.c.d)."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv4Address):
        return bytes(10) + b"\xff\xff" + addr.packed
    return addr.packed


def _unmapped(raw: bytes) -> str:
    addr = ipaddress.IPv6Address(raw)
    return str(addr.ipv4_mapped) if addr.ipv4_mapped is not None else str(addr)


def pcp_map_request(client_ip: str, nonce: bytes, internal_port: int, external_port: int,
                    lifetime_s: int, external_ip: str = "0.0.0.0") -> bytes:
    """A PCP MAP request for TCP `internal_port` (lifetime 0: delete the mapping made with
    this nonce). `client_ip` is this host's address as the router sees it."""
    if len(nonce) != NONCE_LEN:
        raise ValueError("A PCP nonce is 12 bytes.")
    _check_port(internal_port, allow_zero=False)
    _check_port(external_port, allow_zero=True)
    _check_lifetime(lifetime_s)
    head = struct.pack("!BBHI", PCP_VERSION, OP_MAP, 0, lifetime_s) + _mapped(client_ip)
    body = nonce + struct.pack("!B3xHH", PROTO_TCP, internal_port, external_port) + _mapped(external_ip)
    return head + body


def decode_pcp_map(data: bytes, nonce: bytes, internal_port: int) -> Granted:
    """The mapping granted by a PCP MAP answer to the request with `nonce` for
    `internal_port`; MappingError for anything else (another request's answer, a refusal,
    malformed options)."""
    if len(data) >= 2 and data[0] == NATPMP_VERSION:
        raise UnsupportedVersion("The router answers PCP with NAT-PMP (version 0): it does not speak PCP.")
    if len(data) < PCP_HEADER + PCP_MAP_PAYLOAD or len(data) > PCP_MAX or len(data) % 4:
        raise MappingError(f"A PCP MAP answer is 60 to {PCP_MAX} bytes, a multiple of 4; this one is {len(data)}.")
    version, r_op, _reserved, result, lifetime, epoch = struct.unpack_from("!BBBBII", data, 0)
    if version != PCP_VERSION:
        raise UnsupportedVersion(f"The router answers PCP version {version}, not {PCP_VERSION}.")
    if r_op != 0x80 | OP_MAP:
        raise MappingError(f"The PCP answer is for opcode {r_op & 0x7F} (response bit {r_op >> 7}), not MAP.")
    got_nonce = data[PCP_HEADER:PCP_HEADER + NONCE_LEN]
    proto, inner, outer = struct.unpack_from("!B3xHH", data, PCP_HEADER + NONCE_LEN)
    if got_nonce != nonce or proto != PROTO_TCP or inner != internal_port:
        raise MappingError("The PCP answer is not for this request (nonce, protocol or port differ).")
    _check_options(data[PCP_HEADER + PCP_MAP_PAYLOAD:])
    if result:
        why = PCP_RESULTS.get(result, f"result code {result}")
        raise MappingError(f"The router refused the PCP request: {why}.")
    if lifetime > MAX_LIFETIME_S:
        raise MappingError(f"The PCP answer grants {lifetime} s, more than any router would.")
    ext_ip = _unmapped(data[PCP_HEADER + 20:PCP_HEADER + PCP_MAP_PAYLOAD])
    if lifetime and (not outer or ipaddress.ip_address(ext_ip).is_unspecified):
        raise MappingError("The PCP answer grants a mapping without an outside address or port.")
    return Granted(ext_ip, outer, inner, lifetime, epoch)


def _check_options(opts: bytes) -> None:
    """Options after the MAP payload: each a 4-byte head and its data padded to 4 bytes,
    filling the rest exactly. Their content is not needed."""
    i = 0
    while i < len(opts):
        if len(opts) - i < 4:
            raise MappingError("A PCP option is cut short.")
        length = struct.unpack_from("!H", opts, i + 2)[0]
        i += 4 + (length + 3) // 4 * 4
        if i > len(opts):
            raise MappingError("A PCP option is longer than the message.")


def _check_port(port: int, *, allow_zero: bool) -> None:
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ValueError(f"Port {port} is not a TCP port.")


def _check_lifetime(lifetime_s: int) -> None:
    if not 0 <= lifetime_s <= MAX_LIFETIME_S:
        raise ValueError(f"A mapping lifetime is 0 to {MAX_LIFETIME_S} s.")


# -- the gateway ----------------------------------------------------------------------------


def parse_route_table(text: str) -> str | None:
    """The IPv4 default gateway in /proc/net/route's format, or None."""
    lines = text.splitlines()[1:]
    for line in lines[:1024]:
        cols = line.split()
        if len(cols) < 4:
            continue
        try:
            dest, gw, flags = int(cols[1], 16), int(cols[2], 16), int(cols[3], 16)
        except ValueError:
            continue
        if dest == 0 and gw and flags & 0x3 == 0x3:  # RTF_UP | RTF_GATEWAY
            return str(ipaddress.IPv4Address(struct.pack("<I", gw & 0xFFFFFFFF)))
    return None


def default_gateway() -> str | None:
    """This network namespace's IPv4 default gateway (the calling thread's namespace)."""
    for path in ROUTE_FILES:
        try:
            return parse_route_table(Path(path).read_text())
        except OSError:
            continue
    return None


# -- the client -----------------------------------------------------------------------------


class _Answers(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=16)

    def datagram_received(self, data: bytes, addr: object) -> None:
        if len(data) <= PCP_MAX and not self.queue.full():
            self.queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable: nobody there
        if not self.queue.full():
            self.queue.put_nowait(None)


async def exchange(gateway: str, request: bytes, accept: Sequence[int] = (),
                   *, sends: int = SENDS, first_wait_s: float = FIRST_WAIT_S,
                   port: int = SERVER_PORT) -> bytes:
    """Send `request` to gateway:5351, resending on silence (waits double each time), and
    return the first answer whose first two bytes the caller accepts (`accept` holds
    version*256+opcode values; empty: any), or an answer of the other protocol (a version
    mismatch the caller's decoder reports)."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(_Answers, remote_addr=(gateway, port))
    try:
        wait = first_wait_s
        for _ in range(sends):
            transport.sendto(request)
            deadline = loop.time() + wait
            while (left := deadline - loop.time()) > 0:
                try:
                    data = await asyncio.wait_for(proto.queue.get(), left)
                except TimeoutError:
                    break
                if data is None:
                    raise NoAnswer(f"Nothing listens on {gateway}:{port} (port unreachable).")
                if not accept or (len(data) >= 2 and data[0] * 256 + data[1] in accept):
                    return data
                if len(data) >= 2 and data[0] != request[0]:  # the other protocol's answer
                    return data
            wait *= 2
        raise NoAnswer(f"{gateway}:{port} did not answer ({sends} tries).")
    finally:
        transport.close()


def local_address(gateway: str) -> str:
    """The address this host uses towards the gateway (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((gateway, SERVER_PORT))
        return str(s.getsockname()[0])


async def pcp_map(gateway: str, internal_port: int, lifetime_s: int, nonce: bytes,
                  external_port: int = 0, *, sends: int = SENDS,
                  first_wait_s: float = FIRST_WAIT_S) -> Granted:
    """Ask the gateway for (or renew, same nonce; or delete, lifetime 0) a TCP mapping."""
    request = pcp_map_request(local_address(gateway), nonce, internal_port, external_port, lifetime_s)
    data = await exchange(gateway, request, (PCP_VERSION * 256 + (0x80 | OP_MAP),),
                          sends=sends, first_wait_s=first_wait_s)
    return decode_pcp_map(data, nonce, internal_port)


async def natpmp_map(gateway: str, internal_port: int, lifetime_s: int,
                     external_port: int = 0, *, sends: int = SENDS,
                     first_wait_s: float = FIRST_WAIT_S) -> Granted:
    """Ask the gateway for (or renew; or delete, lifetime 0) a TCP mapping by NAT-PMP, and
    its outside address."""
    answer = await exchange(gateway, natpmp_address_request(), (128 + NATPMP_OP_ADDRESS,),
                            sends=sends, first_wait_s=first_wait_s)
    ext_ip = decode_natpmp_address(answer)
    request = natpmp_map_request(internal_port, 0 if lifetime_s == 0 else external_port, lifetime_s)
    answer = await exchange(gateway, request, (128 + NATPMP_OP_TCP,), sends=sends, first_wait_s=first_wait_s)
    outer, lifetime, epoch = decode_natpmp_map(answer, internal_port)
    return Granted(ext_ip, outer, internal_port, lifetime, epoch)
