"""Tests of LAN discovery: strict TXT and address parsing, an in-process loopback test with
hostile announcements, and real mDNS between three network namespaces joined by a bridge.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import ifaddr
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from valuemesh.node.discovery import (
    MAX_REPORTED,
    MAX_TRACKED_SERVICES,
    REREPORT_INTERVAL,
    SERVICE_TYPE,
    Discovery,
    Found,
    PeerManager,
    add_bootstrap,
    announcement_txt,
    check_interfaces,
    default_interfaces,
    encode_txt,
    instance_name,
    parse_announcement,
    parse_hostport,
    parse_txt,
)
from valuemesh.node.peers import Address, Dial, Died, PeerTable, Revived, Source, State, Suspected, Timers
from valuemesh.node.transport import PeerLink, Transport
from valuemesh.protocol.errors import DecodeError, LocalError, RemoteError, ValuemeshError
from valuemesh.protocol.identity import Identity, MemberId

sys.path.insert(0, str(Path(__file__).parent))
import netns

NODE_SCRIPT = str(Path(__file__).parent / "discovery_node.py")
FIND_DEADLINE = 30.0


def member(i: int) -> MemberId:
    return Identity(bytes([i]) * 32).member


NET = bytes.fromhex("a1b2c3d4e5f60718")


def good_txt(m: MemberId | None = None, net: bytes = NET, port: int = 7000) -> bytes:
    return encode_txt(announcement_txt(m or member(1), net, port))


# --- TXT parsing -----------------------------------------------------------------------------


def test_good_announcement_round_trips() -> None:
    ann = parse_announcement(good_txt(), 7000)
    assert (ann.member, ann.network_id, ann.port, ann.version) == (member(1), NET, 7000, 1)
    # Unknown keys are tolerated for forward compatibility (RFC 6763 §6.4); case is folded.
    extra = good_txt() + encode_txt({"Future": "x"})
    assert parse_announcement(extra, 7000).member == member(1)


@pytest.mark.parametrize(
    ("raw", "srv_port"),
    [
        (b"", 7000),  # nothing at all
        (b"\x05id=x", 7000),  # truncated string
        (b"\x00" + good_txt(), 7000),  # empty string
        (good_txt() + b"\x04port", 7000),  # key without '='
        (good_txt() + encode_txt({"id": str(member(2))}), 7000),  # duplicate key
        (good_txt() + b"\x05\xffk=v", 7000),  # non-ASCII key
        (good_txt(), 7001),  # TXT and SRV ports disagree
        (good_txt(), None),
        (good_txt().replace(b"pv=1", b"pv=2"), 7000),  # unknown version
        (good_txt().replace(b"pv=1", b"pv=01"), 7000),  # non-canonical number
        (good_txt(port=7000).replace(b"port=7000", b"port=+7000"), 7000),
        (good_txt(port=7000).replace(b"port=7000", b"port=70000"), 70000),
        (good_txt().replace(b"id=vm1", b"id=vm2"), 7000),  # not a member id
        (encode_txt({**announcement_txt(member(1), NET, 7000),
                     "id": str(member(1))[:-1] + ("a" if str(member(1))[-1] != "a" else "b")}),
         7000),  # checksum mismatch
        (encode_txt({**announcement_txt(member(1), NET, 7000), "net": "xyz1"}), 7000),
        (encode_txt({**announcement_txt(member(1), NET, 7000), "net": "A1B2"}), 7000),
        (encode_txt({**announcement_txt(member(1), NET, 7000), "net": ""}), 7000),
        (encode_txt({**announcement_txt(member(1), NET, 7000), "net": "ab" * 65}), 7000),
        (b"".join(encode_txt({f"k{i}": "v"}) for i in range(20)) + good_txt(), 7000),
        (good_txt() + b"\xff" + b"x" * 255 + (b"\xff" + b"y" * 255) * 5, 7000),  # oversized
    ],
)
def test_bad_announcements_rejected(raw: bytes, srv_port: int | None) -> None:
    with pytest.raises(RemoteError):
        parse_announcement(raw, srv_port)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.none() | st.integers(0, 70000))
def test_any_bytes_parse_or_raise_typed_error(raw: bytes, port: int | None) -> None:
    try:
        parse_announcement(raw, port)
    except ValuemeshError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text("abcdefghijklmnop", min_size=1, max_size=9),
                       st.text(min_size=0, max_size=40), max_size=10))
def test_txt_encoding_round_trips(items: dict[str, str]) -> None:
    assert parse_txt(encode_txt(items)) == {k: v.encode() for k, v in items.items()}


def test_txt_limits() -> None:
    with pytest.raises(DecodeError):
        parse_txt(b"id=x")  # the first byte is read as a length, and the string is short
    with pytest.raises(LocalError):
        encode_txt({"k": "v" * 300})


# --- host:port parsing -----------------------------------------------------------------------


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


def test_add_bootstrap_is_all_or_nothing_and_dials() -> None:
    t = PeerTable(member(9), random.Random(0))
    with pytest.raises(LocalError):
        add_bootstrap(t, ["10.0.0.1:7000", "nonsense"], 0.0)
    assert t.anonymous() == []
    added = add_bootstrap(t, ["10.0.0.1:7000", "[2001:db8::1]:7001"], 0.0)
    assert t.anonymous() == sorted(added)
    dials = [a for a in t.tick(0.0) if isinstance(a, Dial)]
    assert {d.target.address for d in dials} == set(added)
    assert all(d.target.member is None and d.target.source is Source.BOOTSTRAP for d in dials)


# --- interfaces ------------------------------------------------------------------------------


def test_check_interfaces() -> None:
    assert check_interfaces(["127.0.0.1", "127.0.0.1"]) == ["127.0.0.1"]
    for bad in (["eth0"], ["0.0.0.0"], ["203.0.113.77"], [], "127.0.0.1"):
        with pytest.raises(LocalError):
            check_interfaces(bad)  # type: ignore[arg-type]


def test_default_interfaces_skip_loopback_link_local_and_down_links(tmp_path: Path) -> None:
    def adapter(name: str, *ips: str) -> ifaddr.Adapter:
        return ifaddr.Adapter(name, name, [ifaddr.IP(ip, 24, name) for ip in ips])

    # A fake /sys/class/net: flags as the kernel shows them there (no IFF_RUNNING), and
    # operstate for whether the link is really running.
    links = {
        "eth0": ("0x1003", "up"),  # up, broadcast, multicast: used
        "wlan0": ("0x1003", "unknown"),  # a driver that does not report state: used
        "eth1": ("0x1002", "down"),  # administratively down
        "eth2": ("0x1003", "down"),  # up but no carrier
        "tun0": ("0x91", "unknown"),  # point-to-point without multicast
        "lo": ("0x9", "unknown"),  # loopback, whatever address it carries
    }
    for name, (flags, oper) in links.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "flags").write_text(flags + "\n")
        (tmp_path / name / "operstate").write_text(oper + "\n")
    adapters = [
        adapter("eth0", "192.0.2.10", "127.0.0.5", "169.254.1.1"),
        adapter("wlan0", "198.51.100.7"),
        adapter("eth1", "203.0.113.1"),
        adapter("eth2", "203.0.113.2"),
        adapter("tun0", "203.0.113.3"),
        adapter("lo", "203.0.113.4"),
        adapter("nosuch0", "203.0.113.5"),  # state unreadable (not Linux): address rules only
        adapter("../../etc", "203.0.113.6"),  # a name that is not a plain file name
    ]
    assert default_interfaces(adapters, sysfs=str(tmp_path)) == [
        "192.0.2.10", "198.51.100.7", "203.0.113.5", "203.0.113.6"]
    for ip in default_interfaces():
        assert not ip.startswith("127.") and not ip.startswith("169.254.")


def test_discovery_rejects_bad_configuration() -> None:
    def cb(f: Found) -> None:
        raise AssertionError

    with pytest.raises(LocalError):
        Discovery(member(1), b"", 7000, cb, interfaces=["127.0.0.1"])
    for port in (0, 65536, True):
        with pytest.raises(LocalError):
            Discovery(member(1), NET, port, cb, interfaces=["127.0.0.1"])
    with pytest.raises(LocalError):
        Discovery(member(1), NET, 7000, cb, interfaces=["198.51.100.200"])


# --- in-process, on loopback: hostile announcements are ignored ---------------------------------


async def _wait_for(pred: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        if pred():  # type: ignore[operator]
            return True
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    return bool(pred())  # type: ignore[operator]


async def test_loopback_discovery_ignores_hostile_announcements() -> None:
    net = os.urandom(8)  # unique per run: concurrent runs on this host never mix
    a, b, c = member(11), member(12), member(13)
    found_a: list[Found] = []
    found_b: list[Found] = []
    lost_b: list[MemberId] = []

    def bad_cb(f: Found) -> None:
        raise RuntimeError("a buggy callback must not stop discovery")

    disc_a = Discovery(a, net, 7101, found_a.append, interfaces=["127.0.0.1"])
    disc_b = Discovery(b, net, 7102, lambda f: (found_b.append(f), bad_cb(f)),  # type: ignore[func-returns-value]
                       interfaces=["127.0.0.1"], on_lost=lost_b.append)
    rogue = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    good = announcement_txt(c, net, 7103)
    hostile: dict[str, tuple[bytes, int]] = {
        "bad-checksum": (encode_txt({**good, "id": str(c)[:-2] + "aa"}), 7104),
        "port-mismatch": (encode_txt(good), 7999),
        "duplicate-key": (encode_txt(good) + encode_txt({"id": str(member(14))}), 7103),
        "garbled": (b"\x40garbage", 7103),
        "not-hex-net": (encode_txt({**good, "net": "zz" * 8}), 7103),
        "future-version": (encode_txt({**good, "pv": "9"}), 7103),
        "other-network": (encode_txt({**good, "net": os.urandom(8).hex()}), 7103),
        "claims-to-be-b": (encode_txt(announcement_txt(b, net, 7105)), 7105),
    }
    tag = os.urandom(3).hex()
    infos = [
        AsyncServiceInfo(
            SERVICE_TYPE, f"{label}-{tag}.{SERVICE_TYPE}", port=port, properties=raw,
            server=f"{label}-{tag}.local.", parsed_addresses=["127.0.0.1"],
        )
        for label, (raw, port) in hostile.items()
    ]
    control = AsyncServiceInfo(
        SERVICE_TYPE, f"{instance_name(c, net)}.{SERVICE_TYPE}", port=7103, properties=good,
        server=f"control-{tag}.local.", parsed_addresses=["127.0.0.1"],
    )
    try:
        # Registered together: each registration probes for ~1.5 s (RFC 6762 §8.1).
        announced = await asyncio.gather(
            *(rogue.async_register_service(i) for i in [*infos, control])
        )
        await asyncio.gather(*announced)
        await asyncio.gather(disc_a.start(), disc_b.start())
        wanted_b = {(a, 7101), (c, 7103)}
        assert await _wait_for(lambda: {(f.member, f.port) for f in found_b} >= wanted_b,
                               FIND_DEADLINE), found_b
        hostile_names = {i.name for i in infos}
        assert await _wait_for(
            lambda: {n for n, _ in disc_b.rejections} >= hostile_names, FIND_DEADLINE
        ), list(disc_b.rejections)
        assert await _wait_for(lambda: {f.member for f in found_a} >= {b, c}, FIND_DEADLINE)
        # Only the two honest nodes were ever reported; never ourselves, never a hostile one.
        assert {(f.member, f.host, f.port) for f in found_b} == {
            (a, "127.0.0.1", 7101), (c, "127.0.0.1", 7103)}
        assert {f.member for f in found_a} == {b, c}
        reasons = dict(disc_b.rejections)
        assert reasons[f"other-network-{tag}.{SERVICE_TYPE}"] == "another network"
        assert reasons[f"claims-to-be-b-{tag}.{SERVICE_TYPE}"] == "our own member id"
        assert "SRV port" in reasons[f"port-mismatch-{tag}.{SERVICE_TYPE}"]
        # A clean stop sends a goodbye: the other side forgets us at once, not after a TTL.
        await disc_a.stop()
        assert await _wait_for(lambda: a in lost_b, FIND_DEADLINE)
    finally:
        await disc_a.stop()
        await disc_b.stop()
        await rogue.async_unregister_all_services()
        await rogue.async_close()


# --- for real: three network namespaces on one bridge ------------------------------------------


class _Node:
    """One discovery_node.py process; its JSON lines are collected by a reader thread."""

    def __init__(self, lan: netns.NetnsLan, host: netns.Host, seed: bytes, port: int,
                 network: bytes) -> None:
        self.member = Identity(seed).member
        self.events: queue.Queue[dict[str, object]] = queue.Queue()
        self.seen: list[dict[str, object]] = []
        self.proc = lan.popen(
            host,
            [sys.executable, NODE_SCRIPT, "--interface", host.ip, "--port", str(port),
             "--network", network.hex(), "--seed", seed.hex(), "--max-seconds", "90"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                self.events.put({"event": "garbage", "line": line})

    def drain(self) -> list[dict[str, object]]:
        while True:
            try:
                self.seen.append(self.events.get_nowait())
            except queue.Empty:
                return self.seen

    def found(self) -> set[tuple[str, str, int]]:
        return {(str(e["member"]), str(e["host"]), int(e["port"]))  # type: ignore[call-overload]
                for e in self.drain() if e["event"] == "found"}

    def lost(self) -> set[str]:
        return {str(e["member"]) for e in self.drain() if e["event"] == "lost"}


@pytest.mark.netns
@pytest.mark.slow
def test_three_namespaces_find_each_other_by_mdns_alone() -> None:
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    netns.remove_stale()
    network = os.urandom(16)
    lan = netns.NetnsLan(3)
    names = [h.netns for h in lan.hosts] + [lan.bridge_ns]
    try:
        lan.create()
        # Each namespace holds only its loopback and its veth into the test's bridge, so
        # multicast from it cannot reach any real interface of this machine.
        for h in lan.hosts:
            assert lan.interfaces(h) == ["eth0", "lo"]
        nodes = [_Node(lan, h, bytes([40 + i]) * 32, 7200 + i, network)
                 for i, h in enumerate(lan.hosts)]
        expect = [
            {(str(n.member), h.ip, 7200 + j) for j, (n, h) in enumerate(zip(nodes, lan.hosts,
                                                                             strict=True))
             if j != i}
            for i in range(3)
        ]
        ok = netns.wait_until(
            lambda: all(n.found() >= expect[i] for i, n in enumerate(nodes)), FIND_DEADLINE
        )
        assert ok, [(n.drain(), n.proc.poll()) for n in nodes]
        for i, n in enumerate(nodes):
            # Exactly the other two; never itself, nothing else.
            assert n.found() == expect[i]
        # Stopping one node by PID makes it say goodbye; the other two forget it.
        assert lan.stop(nodes[2].proc) == 0
        gone = str(nodes[2].member)
        assert netns.wait_until(lambda: all(gone in n.lost() for n in nodes[:2]), FIND_DEADLINE)
        for n in nodes:
            assert lan.stop(n.proc) == 0
            assert any(e["event"] == "stopped" for e in n.drain())
    finally:
        lan.destroy()
    assert lan.existing() == []
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    assert not any(name in left.stdout for name in names)


@pytest.mark.netns
@pytest.mark.slow
def test_same_member_twice_on_one_network_is_a_clear_error() -> None:
    """Two hosts of one LAN (namespaces on a bridge) announcing the same member: the second
    start is refused with a plain sentence and leaves nothing running; the first carries on.

    Two hosts, not two processes on one host's loopback: mDNS probes ask for unicast answers
    (QU), and a unicast datagram to port 5353 reaches only one of the sockets that share the
    port on a host, which on some kernels is the answering node's own (docs/discovery.md)."""
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    netns.remove_stale()
    network = os.urandom(16)
    seed = bytes([21]) * 32
    lan = netns.NetnsLan(2)
    try:
        lan.create()
        first = _Node(lan, lan.hosts[0], seed, 7301, network)
        assert netns.wait_until(
            lambda: any(e["event"] == "started" for e in first.drain()), FIND_DEADLINE
        ), first.drain()
        second = _Node(lan, lan.hosts[1], seed, 7302, network)
        assert second.proc.wait(FIND_DEADLINE) == 3
        refused = [e for e in second.drain() if e["event"] == "refused"]
        assert len(refused) == 1, second.drain()
        assert "already announced on this network" in str(refused[0]["reason"])
        assert not any(e["event"] == "started" for e in second.drain())
        # The first node was not disturbed: still running, and it stops cleanly.
        assert first.proc.poll() is None
        assert lan.stop(first.proc) == 0
        assert any(e["event"] == "stopped" for e in first.drain())
    finally:
        lan.destroy()
    assert lan.existing() == []


# --- PeerManager: the table driven against two real transports on loopback ---------------------


class _Handler:
    """The part of a node's LinkHandler that feeds the peer manager."""

    def __init__(self) -> None:
        self.manager: PeerManager | None = None

    def authorize(self, remote: MemberId, inbound: bool) -> bool:
        return True

    async def on_connect(self, link: PeerLink) -> None:
        if self.manager is not None:
            self.manager.link_up(link)

    async def on_message(self, link: PeerLink, payload: bytes) -> None:
        if self.manager is not None:
            self.manager.heard_from(link.remote)

    async def on_disconnect(self, link: PeerLink, reason: str) -> None:
        if self.manager is not None:
            self.manager.link_down(link)


FAST = Timers(
    probe_interval=0.2, probe_timeout=0.1, suspicion_alpha=1.0, suspicion_beta=2.0,
    backoff_base=0.05, backoff_cap=0.4, reconnect_delay=0.05, dial_failures_to_suspect=2,
)


async def test_peer_manager_bootstraps_suspects_and_revives_over_real_links() -> None:
    net = os.urandom(8)
    id_a, id_b = Identity(bytes([31]) * 32), Identity(bytes([32]) * 32)
    h_a, h_b = _Handler(), _Handler()
    t_a, t_b = Transport(id_a, net, h_a), Transport(id_b, net, h_b)
    t_b2: Transport | None = None
    events: list[object] = []
    table = PeerTable(id_a.member, random.Random(1), timers=FAST, now=time.monotonic())
    mgr = PeerManager(table, t_a, rng=random.Random(2), on_event=events.append)
    h_a.manager = mgr
    b = id_b.member
    try:
        await t_a.start("127.0.0.1", 0)
        _, port_b = await t_b.start("127.0.0.1", 0)
        mgr.start()
        mgr.add_bootstrap([f"127.0.0.1:{port_b}"])
        assert await _wait_for(lambda: table.linked() == [b], FIND_DEADLINE)
        # The bootstrap address now belongs to b; nothing anonymous is left to dial.
        assert table.anonymous() == []
        view = table.snapshot(time.monotonic())[0]
        assert view.via is not None and view.via.source == "bootstrap"
        # Probes are answered over the encrypted link: b stays alive, our health stays good.
        await asyncio.sleep(1.0)
        assert table.state(b) is State.ALIVE and table.local_health == 0
        assert not any(isinstance(e, Suspected) for e in events)

        await t_b.stop()  # b goes away: redials fail, b is suspected, then declared dead
        assert await _wait_for(lambda: Died(b, 0) in events, FIND_DEADLINE), events
        assert Suspected(b, 0) in events
        assert b in table and table.state(b) is State.DEAD  # a proposal, not a removal

        t_b2 = Transport(id_b, net, h_b)
        await t_b2.start("127.0.0.1", port_b)  # b comes back where it was
        assert await _wait_for(lambda: table.linked() == [b], FIND_DEADLINE), events
        assert Revived(b, 0) in events and table.state(b) is State.ALIVE
    finally:
        await mgr.stop()
        await t_a.stop()
        await t_b.stop()
        if t_b2 is not None:
            await t_b2.stop()


async def test_peer_manager_moves_an_address_that_proves_to_be_another_key() -> None:
    net = os.urandom(8)
    id_a, id_b = Identity(bytes([33]) * 32), Identity(bytes([34]) * 32)
    h_a, h_b = _Handler(), _Handler()
    t_a, t_b = Transport(id_a, net, h_a), Transport(id_b, net, h_b)
    table = PeerTable(id_a.member, random.Random(3), timers=FAST, now=time.monotonic())
    mgr = PeerManager(table, t_a, rng=random.Random(4))
    h_a.manager = mgr
    liar = member(35)
    try:
        await t_a.start("127.0.0.1", 0)
        _, port_b = await t_b.start("127.0.0.1", 0)
        mgr.start()
        # A hostile announcement says b's address is `liar`'s. The handshake shows b's key
        # there: the address moves to b (now linked) and `liar` keeps no address to dial.
        mgr.found(Found(liar, "127.0.0.1", port_b))
        assert await _wait_for(lambda: id_b.member in table.linked(), FIND_DEADLINE)
        assert await _wait_for(lambda: table.addresses(liar) == {}, FIND_DEADLINE)
        assert liar not in table.linked()
        assert Address("127.0.0.1", port_b) in table.addresses(id_b.member)
        # b did not hold the dial against us: no penalty for a completed handshake.
        assert t_b.banned_for("127.0.0.1") == 0 and t_b.banned_for(id_a.member) == 0
    finally:
        await mgr.stop()
        await t_a.stop()
        await t_b.stop()


async def test_peer_exchange_leads_to_a_new_link() -> None:
    net = os.urandom(8)
    ids = [Identity(bytes([36 + i]) * 32) for i in range(3)]
    handlers = [_Handler() for _ in ids]
    transports = [Transport(i, net, h) for i, h in zip(ids, handlers, strict=True)]
    managers = []
    for i, (ident, h, t) in enumerate(zip(ids, handlers, transports, strict=True)):
        table = PeerTable(ident.member, random.Random(i), timers=FAST, now=time.monotonic())
        h.manager = PeerManager(table, t, rng=random.Random(10 + i))
        managers.append(h.manager)
    a, b, c = (i.member for i in ids)
    try:
        ports = [(await t.start("127.0.0.1", 0))[1] for t in transports]
        for mgr in managers:
            mgr.start()
        # a knows b and c; b knows only a.
        managers[0].add_bootstrap([f"127.0.0.1:{ports[1]}", f"127.0.0.1:{ports[2]}"])
        assert await _wait_for(lambda: managers[0].table.linked() == sorted([b, c]),
                               FIND_DEADLINE)
        assert await _wait_for(lambda: a in managers[1].table.linked(), FIND_DEADLINE)
        offer = managers[0].exchange_offer(b)
        assert {e.member for e in offer} == {c}  # never b itself
        link_b_to_a = transports[1].link(a)
        assert link_b_to_a is not None
        report = managers[1].exchange_received(link_b_to_a, offer)
        assert report.accepted == 1
        assert await _wait_for(lambda: c in managers[1].table.linked(), FIND_DEADLINE)
        assert managers[1].table.addresses(c) == {Address("127.0.0.1", ports[2]): Source.EXCHANGE}
        with pytest.raises(RemoteError):
            managers[1].exchange_received(link_b_to_a, offer * 65)
    finally:
        for mgr in managers:
            await mgr.stop()
        for t in transports:
            await t.stop()


@pytest.mark.netns
@pytest.mark.slow
def test_three_daemons_in_namespaces_connect_by_mdns_alone(tmp_path: Path) -> None:
    """The issue's LAN test: whole daemons, no bootstrap address, found by mDNS alone."""
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    exe = Path(sys.executable).parent / "valuemesh"
    if not exe.exists():
        pytest.skip("the valuemesh command is not installed in this environment")
    network = "vmtest-" + os.urandom(6).hex()
    homes = [tmp_path / f"n{i}" for i in range(3)]
    lan = netns.NetnsLan(3)
    try:
        lan.create()
        procs = [
            lan.popen(h, [str(exe), "--home", str(home), "daemon", "--listen", f"{h.ip}:7470",
                          "--api", "127.0.0.1:7471", "--mdns-interface", h.ip,
                          "--network", network, "--init-if-missing"],
                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            for h, home in zip(lan.hosts, homes, strict=True)
        ]

        def connected(i: int) -> dict[str, str]:
            r = subprocess.run(
                ["ip", "netns", "exec", lan.hosts[i].netns, str(exe), "--home", str(homes[i]),
                 "--json", "peers"], capture_output=True, text=True, timeout=20,
            )
            if r.returncode != 0 or not r.stdout.strip():
                return {}
            return {p["member"]: p.get("via", "") for p in json.loads(r.stdout)["peers"]
                    if p.get("connected")}

        seen: list[dict[str, str]] = [{}, {}, {}]

        def all_linked() -> bool:
            for i in range(3):
                if len(seen[i]) < 2:
                    seen[i] = connected(i)
            return all(len(s) == 2 for s in seen)

        assert netns.wait_until(all_linked, 60.0, step=0.5), (
            seen, [p.poll() for p in procs])
        # Each daemon's first stdout line, once ready, names its own member id.
        own = [json.loads(p.stdout.readline())["member"] for p in procs]  # type: ignore[union-attr]
        members = [set(s) | {m} for s, m in zip(seen, own, strict=True)]
        assert members[0] == members[1] == members[2] and len(members[0]) == 3
        # No bootstrap was given: every link was dialed because of an mDNS announcement
        # (and is "inbound" on the side that accepted it).
        vias = {v for s in seen for v in s.values()}
        assert "mdns" in vias and vias <= {"mdns", "inbound"}, seen
        for p in procs:
            assert lan.stop(p, grace=15.0) == 0
    finally:
        lan.destroy()
    assert lan.existing() == []



def test_accepted_announcements_filter_addresses_and_throttle_reports() -> None:
    ifs = default_interfaces()
    if not ifs:
        pytest.skip("no non-loopback IPv4 interface to name (the object is never started)")
    found: list[Found] = []
    now = [0.0]
    # Never started: no socket is opened, nothing is sent on that interface.
    d = Discovery(member(1), NET, 7000, found.append, interfaces=[ifs[0]], clock=lambda: now[0])

    def info(port: int, addrs: list[str], m: MemberId = member(2)) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            SERVICE_TYPE, f"x{port}.{SERVICE_TYPE}", port=port,
            properties=announcement_txt(m, NET, port), server=f"x{port}.local.",
            parsed_addresses=addrs,
        )

    i = info(7002, ["127.0.0.1", "10.1.2.3", "fe80::1", "2001:db8::5"])
    d._accept(i.name, i)
    # Loopback (we are not on loopback) and scope-less IPv6 link-local are dropped; IPv4 first.
    assert found == [Found(member(2), "10.1.2.3", 7002), Found(member(2), "2001:db8::5", 7002)]
    d._accept(i.name, i)
    assert len(found) == 2  # the same news is not reported again at once
    now[0] = REREPORT_INTERVAL + 1
    d._accept(i.name, i)
    assert len(found) == 4
    only_loopback = info(7003, ["127.0.0.1"])
    d._accept(only_loopback.name, only_loopback)
    assert len(found) == 4 and d.rejections[-1][1] == "no usable address"
    # A flood of ever-changing announcements keeps memory bounded.
    for port in range(10_000, 10_000 + MAX_REPORTED * 2):
        flood = info(port, ["10.9.9.9"], member(3))
        d._accept(flood.name, flood)
    assert len(d._reported) <= MAX_REPORTED
    assert len(d._names) <= MAX_TRACKED_SERVICES
