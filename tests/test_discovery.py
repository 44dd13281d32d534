"""Tests of the zeroconf Discovery service: its configuration checks, an in-process loopback
test with hostile announcements, and real mDNS between three network namespaces on a bridge.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from valuemesh.node.announcement import SERVICE_TYPE, Found, announcement_txt, encode_txt, instance_name
from valuemesh.node.discovery import MAX_REPORTED, MAX_TRACKED_SERVICES, REREPORT_INTERVAL, Discovery
from valuemesh.node.interfaces import default_interfaces
from valuemesh.protocol.errors import LocalError
from valuemesh.protocol.identity import Identity, MemberId

sys.path.insert(0, str(Path(__file__).parent))
import netns
from polling import wait_for

NODE_SCRIPT = str(Path(__file__).parent / "discovery_node.py")
FIND_DEADLINE = 30.0


def member(i: int) -> MemberId:
    return Identity(bytes([i]) * 32).member


NET = bytes.fromhex("a1b2c3d4e5f60718")


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
        assert await wait_for(lambda: {(f.member, f.port) for f in found_b} >= wanted_b,
                               FIND_DEADLINE), found_b
        hostile_names = {i.name for i in infos}
        assert await wait_for(
            lambda: {n for n, _ in disc_b.rejections} >= hostile_names, FIND_DEADLINE
        ), list(disc_b.rejections)
        assert await wait_for(lambda: {f.member for f in found_a} >= {b, c}, FIND_DEADLINE)
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
        assert await wait_for(lambda: a in lost_b, FIND_DEADLINE)
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
                          "--api", "127.0.0.1:7471", "--mdns", "--mdns-interface", h.ip,
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
