"""NAT-PMP (RFC 6886) and PCP (RFC 6887) messages (node/natpmp.py): requests byte for byte,
answers decoded, and every hostile or broken answer refused with one MappingError sentence
(never another exception); the gateway read from a routing table; the UDP exchange ignoring
what does not answer its request. The real server is in tests/test_portmap.py."""

from __future__ import annotations

import asyncio
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from valuemesh.node import natpmp
from valuemesh.node.natpmp import MappingError, NoAnswer, UnsupportedVersion

NONCE = bytes(range(12))


def pcp_answer(*, result: int = 0, lifetime: int = 3600, nonce: bytes = NONCE, proto: int = 6,
               inner: int = 7470, outer: int = 7470, ext: bytes = b"\x00" * 10 + b"\xff\xff" + bytes([11, 17, 0, 23]),
               version: int = 2, r_op: int = 0x81, options: bytes = b"") -> bytes:
    head = struct.pack("!BBBBII", version, r_op, 0, result, lifetime, 42) + bytes(12)
    return head + nonce + struct.pack("!B3xHH", proto, inner, outer) + ext + options


def natpmp_map_answer(*, result: int = 0, inner: int = 7470, outer: int = 7470, lifetime: int = 3600,
                      op: int = 130, version: int = 0) -> bytes:
    return struct.pack("!BBHIHHI", version, op, result, 42, inner, outer, lifetime)


def natpmp_address_answer(ip: bytes = bytes([11, 17, 0, 23]), result: int = 0) -> bytes:
    return struct.pack("!BBHI", 0, 128, result, 42) + ip


# -- requests -------------------------------------------------------------------------------


def test_natpmp_requests_are_the_rfc_layout() -> None:
    assert natpmp.natpmp_address_request() == b"\x00\x00"
    assert natpmp.natpmp_map_request(7470, 7471, 7200) == bytes.fromhex("0002 0000 1d2e 1d2f 00001c20".replace(" ", ""))


def test_pcp_map_request_is_the_rfc_layout() -> None:
    req = natpmp.pcp_map_request("192.168.3.2", NONCE, 7470, 7470, 7200)
    assert len(req) == 60
    assert req[:4] == bytes([2, 1, 0, 0]) and struct.unpack_from("!I", req, 4)[0] == 7200
    assert req[8:24] == bytes(10) + b"\xff\xff" + bytes([192, 168, 3, 2])
    assert req[24:36] == NONCE
    assert req[36] == 6 and req[37:40] == bytes(3)
    assert struct.unpack_from("!HH", req, 40) == (7470, 7470)
    assert req[44:60] == bytes(10) + b"\xff\xff" + bytes(4)


@pytest.mark.parametrize("call", [
    lambda: natpmp.natpmp_map_request(0, 0, 10),
    lambda: natpmp.natpmp_map_request(70000, 0, 10),
    lambda: natpmp.natpmp_map_request(7470, 0, -1),
    lambda: natpmp.natpmp_map_request(7470, 0, natpmp.MAX_LIFETIME_S + 1),
    lambda: natpmp.pcp_map_request("192.168.3.2", b"short", 7470, 0, 10),
    lambda: natpmp.pcp_map_request("192.168.3.2", NONCE, 7470, 65536, 10),
])
def test_bad_request_arguments_are_refused(call: object) -> None:
    with pytest.raises(ValueError):
        call()  # type: ignore[operator]


# -- answers --------------------------------------------------------------------------------


def test_good_answers_decode() -> None:
    g = natpmp.decode_pcp_map(pcp_answer(outer=40000), NONCE, 7470)
    assert (g.external_ip, g.external_port, g.internal_port) == ("11.17.0.23", 40000, 7470)
    assert (g.lifetime_s, g.epoch_s) == (3600, 42)
    assert natpmp.decode_natpmp_address(natpmp_address_answer()) == "11.17.0.23"
    assert natpmp.decode_natpmp_map(natpmp_map_answer(outer=40001), 7470) == (40001, 3600, 42)
    # A delete answer: lifetime 0, no port.
    assert natpmp.decode_natpmp_map(natpmp_map_answer(outer=0, lifetime=0), 7470) == (0, 0, 42)
    # Well-formed options after the payload are skipped.
    opt = struct.pack("!BBH", 1, 0, 5) + b"abcde" + bytes(3)
    assert natpmp.decode_pcp_map(pcp_answer(options=opt), NONCE, 7470).external_port == 7470


@pytest.mark.parametrize(("answer", "words"), [
    (pcp_answer()[:59], "60 to 1100"),
    (pcp_answer() + bytes(2), "multiple of 4"),
    (pcp_answer(options=bytes(1044)), "60 to 1100"),
    (pcp_answer(version=3), "version 3"),
    (pcp_answer(r_op=0x01), "response bit 0"),
    (pcp_answer(r_op=0x82), "opcode 2"),
    (pcp_answer(nonce=bytes(12)), "not for this request"),
    (pcp_answer(proto=17), "not for this request"),
    (pcp_answer(inner=7471), "not for this request"),
    (pcp_answer(result=2), "not authorized"),
    (pcp_answer(result=8), "no resources"),
    (pcp_answer(result=99), "result code 99"),
    (pcp_answer(lifetime=2**32 - 1), "more than any router"),
    (pcp_answer(outer=0), "without an outside address or port"),
    (pcp_answer(ext=bytes(10) + b"\xff\xff" + bytes(4)), "without an outside address or port"),
    (pcp_answer(options=struct.pack("!BBH", 1, 0, 9) + bytes(4)), "longer than the message"),
    (pcp_answer(options=struct.pack("!BBH", 1, 0, 0) + bytes(8) + struct.pack("!BBH", 1, 0, 40)), "longer than"),
])
def test_hostile_pcp_answers_are_refused(answer: bytes, words: str) -> None:
    with pytest.raises(MappingError, match=words):
        natpmp.decode_pcp_map(answer, NONCE, 7470)


def test_a_natpmp_server_answering_pcp_is_a_version_mismatch() -> None:
    with pytest.raises(UnsupportedVersion):
        natpmp.decode_pcp_map(struct.pack("!BBHI", 0, 129, 1, 42), NONCE, 7470)
    with pytest.raises(UnsupportedVersion):
        natpmp.decode_natpmp_map(pcp_answer(), 7470)


@pytest.mark.parametrize(("answer", "words"), [
    (b"", "16 bytes"),
    (natpmp_map_answer()[:15], "16 bytes"),
    (natpmp_map_answer() + b"\x00", "16 bytes"),
    (natpmp_map_answer(op=129), "opcode 129"),
    (natpmp_map_answer(inner=1), "for port 1"),
    (natpmp_map_answer(result=2), "not authorized"),
    (natpmp_map_answer(result=3), "network failure"),
    (natpmp_map_answer(result=1), "does not speak"),
    (natpmp_map_answer(lifetime=2**32 - 1), "more than any router"),
    (natpmp_map_answer(outer=0), "port 0"),
])
def test_hostile_natpmp_map_answers_are_refused(answer: bytes, words: str) -> None:
    with pytest.raises(MappingError, match=words):
        natpmp.decode_natpmp_map(answer, 7470)


@pytest.mark.parametrize("answer", [
    natpmp_address_answer(bytes(4)),
    natpmp_address_answer()[:11],
    natpmp_address_answer() + b"\x00",
    natpmp_address_answer(result=3),
])
def test_hostile_natpmp_address_answers_are_refused(answer: bytes) -> None:
    with pytest.raises(MappingError):
        natpmp.decode_natpmp_address(answer)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1200))
def test_any_bytes_decode_or_raise_one_mapping_error(data: bytes) -> None:
    for decode in (lambda: natpmp.decode_pcp_map(data, NONCE, 7470),
                   lambda: natpmp.decode_natpmp_map(data, 7470),
                   lambda: natpmp.decode_natpmp_address(data)):
        try:
            decode()
        except MappingError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=36, max_size=36), st.binary(max_size=64))
def test_pcp_answers_with_our_nonce_but_random_rest_never_crash(payload_rest: bytes, opts: bytes) -> None:
    data = struct.pack("!BBBBII", 2, 0x81, 0, 0, 60, 1) + bytes(12) + NONCE + payload_rest[12:] + opts
    try:
        natpmp.decode_pcp_map(data, NONCE, 7470)
    except MappingError:
        pass


# -- the routing table ----------------------------------------------------------------------

ROUTE = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t0003A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth0\t00000000\t0103A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
"""


def test_the_default_gateway_is_read_from_the_routing_table() -> None:
    assert natpmp.parse_route_table(ROUTE) == "192.168.3.1"
    assert natpmp.parse_route_table(ROUTE.splitlines()[0] + "\n" + ROUTE.splitlines()[1]) is None
    assert natpmp.parse_route_table("") is None
    assert natpmp.parse_route_table("head\nthis is\tnot\ta\troute\nx y\n" + ROUTE.splitlines()[2]) == "192.168.3.1"
    down = ROUTE.replace("\t0003\t", "\t0002\t")  # a default route that is not up
    assert natpmp.parse_route_table(down) is None


# -- the exchange ---------------------------------------------------------------------------


class _Hostile(asyncio.DatagramProtocol):
    """A loopback 'gateway' that first sends junk, an oversized datagram and another
    opcode's answer, then the real answer."""

    def __init__(self, answers: list[bytes]) -> None:
        self.answers = answers
        self.requests: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        self.requests.append(data)
        assert self.transport is not None
        for a in self.answers:
            self.transport.sendto(a, addr)


async def _serve(answers: list[bytes]) -> tuple[asyncio.DatagramTransport, _Hostile, int]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(lambda: _Hostile(answers), local_addr=("127.0.0.1", 0))
    return transport, proto, transport.get_extra_info("sockname")[1]


async def test_the_exchange_skips_answers_to_other_requests() -> None:
    good = natpmp_map_answer(outer=40000)
    transport, server, port = await _serve([b"\x00", bytes(2000), natpmp_map_answer(op=128 + 1), good])
    try:
        req = natpmp.natpmp_map_request(7470, 0, 60)
        data = await natpmp.exchange("127.0.0.1", req, (130,), port=port, sends=1, first_wait_s=2.0)
    finally:
        transport.close()
    assert data == good
    assert server.requests == [req]


async def test_silence_is_no_answer_after_the_bounded_tries() -> None:
    transport, server, port = await _serve([])
    try:
        with pytest.raises(NoAnswer, match="did not answer"):
            await natpmp.exchange("127.0.0.1", b"\x00\x00", port=port, sends=2, first_wait_s=0.05)
    finally:
        transport.close()
    assert len(server.requests) == 2  # resent once, then gave up


async def test_nobody_listening_is_no_answer_at_once() -> None:
    transport, _server, port = await _serve([])
    transport.close()  # the port is now closed: ICMP port unreachable
    with pytest.raises(NoAnswer, match="port unreachable"):
        await natpmp.exchange("127.0.0.1", b"\x00\x00", port=port, sends=3, first_wait_s=5.0)
