"""The internet bed (chaos/internet.py, docs/testbed.md) behaves as it claims, shown with
plain sockets: endpoint-independent and symmetric NAT, unsolicited inbound dropped, TCP
simultaneous open between two endpoint-independent homes (and not with the symmetric one),
miniupnpd mapping a port on request, mDNS between two hosts of one LAN and nowhere else,
a pulled cable, and a teardown that leaves nothing behind."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # chaos/ is a folder of scripts, not installed

from chaos import internet
from chaos.internet import HomeSpec, Internet

REASON = internet.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"internet bed: {REASON}")

LISTEN_PORT = 9001
DROP_WAIT_S = 1.0  # how long a dropped connection attempt is given before it counts as dropped
PUNCH_WAIT_S = 4.0  # a simultaneous open may need one SYN retransmission (1 s)


@pytest.fixture(scope="module")
def net() -> Iterator[Internet]:
    internet.remove_stale()
    with Internet() as bed:
        yield bed
    assert bed.leftovers() == []


def _listener(net: Internet, host: str, port: int) -> socket.socket:
    s = net.sock(host)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(8)
    s.settimeout(5.0)
    return s


def _bound(net: Internet, host: str, port: int) -> socket.socket:
    """A client socket bound to a fixed local port that other sockets may share."""
    s = net.sock(host)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("0.0.0.0", port))
    return s


def _seen_from(net: Internet, client: str, port: int, servers: list[str]) -> list[tuple[str, int]]:
    """Connect from `client`'s local `port` to each server; the addresses they saw."""
    seen = []
    for srv in servers:
        lst = _listener(net, srv, LISTEN_PORT)
        c = _bound(net, client, port)
        try:
            c.settimeout(5.0)
            c.connect((net.host(srv).ip, LISTEN_PORT))
            conn, addr = lst.accept()
            conn.close()
            seen.append((addr[0], addr[1]))
        finally:
            c.close()
            lst.close()
    return seen


def test_eim_home_shows_one_port_to_every_destination(net: Internet) -> None:
    seen = _seen_from(net, "eim1", 40001, ["pub1", "pub2"])
    router = net.homes["eim"].outside_ip
    assert seen == [(router, 40001), (router, 40001)]
    assert net.public_address("eim1", 40001) == (router, 40001)


def test_sym_home_shows_another_port_to_each_destination(net: Internet) -> None:
    seen = _seen_from(net, "sym1", 40002, ["pub1", "pub2"])
    router = net.homes["sym"].outside_ip
    assert [ip for ip, _ in seen] == [router, router]
    assert seen[0][1] != seen[1][1]
    assert net.public_address("sym1", 40002) == (router, None)


def _dropped(net: Internet, src: str, dst: tuple[str, int]) -> bool:
    """True if a TCP connection attempt from src to dst got no answer at all (dropped, not
    refused)."""
    c = net.sock(src)
    c.settimeout(DROP_WAIT_S)
    try:
        c.connect(dst)
    except TimeoutError:
        return True
    except OSError:
        return False
    finally:
        c.close()
    return False


def test_unsolicited_inbound_to_a_home_is_dropped(net: Internet) -> None:
    lst = _listener(net, "eim1", 40003)  # something listens inside: still unreachable
    try:
        assert _dropped(net, "pub1", (net.homes["eim"].outside_ip, 40003))
        assert _dropped(net, "pub1", (net.homes["sym"].outside_ip, 40003))
    finally:
        lst.close()
    # The public host has no route into a home's private LAN at all.
    c = net.sock("pub1")
    with pytest.raises(OSError):
        c.connect((net.host("eim1").ip, 40003))
    c.close()


def _simultaneous_open(net: Internet, a: str, b: str, port: int) -> list[bool]:
    """Both hosts connect() at once from `port` to the other's predicted public address."""
    socks = {h: _bound(net, h, port) for h in (a, b)}
    results: dict[str, bool] = {}

    def dial(me: str, other: str) -> None:
        s = socks[me]
        s.settimeout(PUNCH_WAIT_S)
        ip, p = net.public_address(other, port)
        try:
            s.connect((ip, p if p is not None else port))
            s.sendall(me.encode())
            results[me] = s.recv(16) == other.encode()
        except OSError:
            results[me] = False

    threads = [threading.Thread(target=dial, args=(x, y)) for x, y in ((a, b), (b, a))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(PUNCH_WAIT_S + 2)
    for s in socks.values():
        s.close()
    return [results.get(a, False), results.get(b, False)]


def test_tcp_simultaneous_open_between_two_eim_homes(net: Internet) -> None:
    assert net.nat("eim1") == net.nat("lan1") == "eim"
    assert _simultaneous_open(net, "eim1", "lan1", 40010) == [True, True]


def test_tcp_simultaneous_open_with_the_sym_home_fails(net: Internet) -> None:
    assert net.nat("sym1") == "sym"
    assert _simultaneous_open(net, "eim1", "sym1", 40011) == [False, False]


def _natpmp_map(net: Internet, host: str, port: int, lifetime: int) -> tuple[int, int]:
    """A NAT-PMP TCP mapping request (RFC 6886 §3.3) to the host's gateway, by hand:
    (result code, mapped external port)."""
    s = net.sock(host, socket.SOCK_DGRAM)
    try:
        s.settimeout(2.0)
        gw = net.host(host).gateway
        assert gw is not None
        s.sendto(struct.pack("!BBHHHI", 0, 2, 0, port, port, lifetime), (gw, 5351))
        data, _ = s.recvfrom(64)
    finally:
        s.close()
    ver, op, result, _epoch, inner, outer, _life = struct.unpack("!BBHIHHI", data[:16])
    assert (ver, op, inner) == (0, 130, port)
    return result, outer


def test_miniupnpd_mapping_lets_a_public_host_in(net: Internet) -> None:
    router = net.homes["upnp"].outside_ip
    lst = _listener(net, "upnp1", 40020)
    try:
        assert _dropped(net, "pub1", (router, 40020))
        result, outer = _natpmp_map(net, "upnp1", 40020, 60)
        assert result == 0
        c = net.sock("pub1")
        c.settimeout(5.0)
        c.connect((router, outer))
        conn, addr = lst.accept()
        assert addr[0] == net.host("pub1").ip  # no source NAT on the way in
        conn.close()
        c.close()
        assert _natpmp_map(net, "upnp1", 40020, 0)[0] == 0  # lifetime 0: delete
        assert _dropped(net, "pub1", (router, outer))
    finally:
        lst.close()
    assert net.miniupnpd("upnp").poll() is None


def test_a_router_without_miniupnpd_does_not_answer_natpmp(net: Internet) -> None:
    with pytest.raises(TimeoutError):
        _natpmp_map(net, "eim1", 40021, 60)


MDNS_PROBE = r"""
import socket, sys, time
from zeroconf import ServiceInfo, Zeroconf
ip, mode = sys.argv[1], sys.argv[2]
zc = Zeroconf(interfaces=[ip])
kind, name = "_vmbed._tcp.local.", "lan1._vmbed._tcp.local."
try:
    if mode == "serve":
        zc.register_service(ServiceInfo(kind, name, addresses=[socket.inet_aton(ip)], port=7470,
                                        server="lan1-bed.local."))
        print("ready", flush=True)
        sys.stdin.read()
    else:
        info = zc.get_service_info(kind, name, timeout=int(float(sys.argv[3]) * 1000))
        print(",".join(info.parsed_addresses()) if info else "none", flush=True)
finally:
    zc.close()
"""


def test_two_hosts_of_one_lan_find_each_other_by_mdns_and_nobody_else_does(net: Internet) -> None:

    serve = net.popen("lan1", [sys.executable, "-c", MDNS_PROBE, net.host("lan1").ip, "serve"],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert serve.stdout is not None and serve.stdout.readline().strip() == "ready"

        def look(host: str, wait_s: float) -> str:
            out = net.run(host, [sys.executable, "-c", MDNS_PROBE, net.host(host).ip, "look",
                                 str(wait_s)], timeout=wait_s + 15)
            return out.stdout.strip()

        assert look("lan2", 5.0) == net.host("lan1").ip
        # Multicast stays on the home's bridge: neither the public segment nor another
        # home hears it.
        assert look("pub1", 1.5) == "none"
        assert look("eim1", 1.5) == "none"
    finally:
        net.stop(serve)


def test_ipv6_on_the_public_segment(net: Internet) -> None:
    pub2 = net.host("pub2")
    assert pub2.ip6 is not None
    lst = net.call("pub2", lambda: socket.create_server(("::", 9006), family=socket.AF_INET6))
    try:
        c = net.sock("pub1", family=socket.AF_INET6)
        c.settimeout(5.0)
        c.connect((pub2.ip6, 9006))
        conn, addr = lst.accept()
        assert addr[0] == net.host("pub1").ip6
        conn.close()
        c.close()
    finally:
        lst.close()


def test_a_pulled_cable_cuts_a_host_off_until_restored(net: Internet) -> None:
    assert _seen_from(net, "eim1", 40030, ["pub1"])
    net.link("eim1", False)
    try:
        assert _dropped(net, "eim1", (net.host("pub1").ip, LISTEN_PORT))
    finally:
        net.link("eim1", True)
    assert _seen_from(net, "eim1", 40031, ["pub1"])


def test_teardown_removes_everything_and_stops_every_process() -> None:
    before = socket.if_nameindex()
    with pytest.raises(RuntimeError), Internet([HomeSpec("u", "eim", upnp=True)], public_hosts=1) as bed:
        sleeper = bed.popen("u1", ["sleep", "60"])
        upnpd = bed.miniupnpd("u")
        assert bed.leftovers()
        assert socket.if_nameindex() == before  # nothing made in the machine's own namespace
        raise RuntimeError("a test failing inside the bed")
    assert bed.leftovers() == []
    assert sleeper.poll() is not None and upnpd.poll() is not None
