"""Address records on a real node in-process on loopback: which addresses a node announces,
how records spread (at link-up, and pushed on change, only to members that may hear of them),
and that a restarted node dials its peers' last signed addresses with no bootstrap flag."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from pathlib import Path

from node_kit import dial_node, start_node

from valuemesh.node.addresses import Address
from valuemesh.node.addrspread import OWN_RESIGN_INTERVAL_S, AddressSpread, own_addresses
from valuemesh.node.clock import now_ms
from valuemesh.node.daemon import Node
from valuemesh.node.home import Home
from valuemesh.node.link import PeerLink
from valuemesh.node.store import PeerInfo, Store
from valuemesh.node.transport import Transport
from valuemesh.protocol import messages as m
from valuemesh.protocol.addressrec import AddressRecord, Kind, RecordAddress, decode_record
from valuemesh.protocol.identity import Identity, MemberId
from valuemesh.protocol.records import parse_constellation

NET = "valuemesh-test-arec-spread"
DEADLINE = 60.0
IPS = ["127.0.0.1", "::1", "192.168.1.5", "fe80::1", "2001:db8::5", "93.184.216.34"]


def test_a_node_announces_its_interface_addresses_by_kind() -> None:
    lan = Kind.LAN
    v4 = own_addresses("0.0.0.0", 7700, IPS, {}, None)
    assert v4 == [RecordAddress(lan, "192.168.1.5", 7700), RecordAddress(lan, "93.184.216.34", 7700)]
    both = own_addresses("::", 7700, IPS, {Address("93.184.216.34", 7700): "reachable",
                                           Address("192.168.1.5", 7700): "reachable"},
                         Address("198.51.100.7", 40001))
    assert both == [RecordAddress(Kind.DIRECT, "93.184.216.34", 7700),  # public and dialed back
                    RecordAddress(Kind.MAPPED, "198.51.100.7", 40001),
                    RecordAddress(lan, "192.168.1.5", 7700),  # reachable, but not public
                    RecordAddress(lan, "2001:db8::5", 7700)]  # no link-local, no loopback
    assert own_addresses("0.0.0.0", 7700, ["127.0.0.1"], {}, None) == [RecordAddress(lan, "127.0.0.1", 7700)]
    assert own_addresses("127.0.0.1", 7700, IPS, {}, None) == [RecordAddress(lan, "127.0.0.1", 7700)]
    many = [f"10.0.0.{i}" for i in range(20)]
    assert len(own_addresses("0.0.0.0", 1, many, {}, None)) == 8


def test_a_port_forwarded_by_hand_is_announced_once_dial_back_reaches_it() -> None:
    """Behind a router (only a private interface address), the outside IP members observe,
    with our port, is announced as direct when dial-back reached it there; not when it did
    not, nor at another port, nor a mapping twice."""
    reach = {Address("93.184.216.34", 7700): "reachable", Address("93.184.216.35", 7701): "reachable",
             Address("8.8.8.8", 7700): "unreachable", Address("198.51.100.7", 7700): "reachable"}
    got = own_addresses("0.0.0.0", 7700, ["192.168.1.5"], reach, Address("198.51.100.7", 7700))
    assert got == [RecordAddress(Kind.DIRECT, "93.184.216.34", 7700),
                   RecordAddress(Kind.MAPPED, "198.51.100.7", 7700),
                   RecordAddress(Kind.LAN, "192.168.1.5", 7700)]


class Listener:
    """A member's side: takes every key, keeps every address record it receives."""

    def __init__(self) -> None:
        self.records: asyncio.Queue[AddressRecord] = asyncio.Queue()

    def authorize(self, remote: MemberId, inbound: bool) -> bool:
        return True

    async def on_connect(self, link: PeerLink) -> None:
        pass

    async def on_message(self, link: PeerLink, payload: bytes) -> None:
        msg = m.decode_message(payload)
        if isinstance(msg, m.AddressRecords):
            for raw in msg.records:
                await self.records.put(decode_record(raw))

    async def on_disconnect(self, link: PeerLink, reason: str) -> None:
        pass

    async def until(self, members: Iterable[MemberId]) -> dict[MemberId, AddressRecord]:
        want, got = set(members), {}
        async with asyncio.timeout(10):
            while not want <= set(got):
                r = await self.records.get()
                got[r.member] = r
        return got


async def start(home: Home, identity: Identity) -> Node:
    return await start_node(home, identity, NET)


async def member(node: Node, identity: Identity) -> tuple[Transport, Listener, PeerLink]:
    listener = Listener()
    t, link = await dial_node(node, identity, listener)
    return t, listener, link


async def test_records_spread_at_link_up_and_on_change_to_members_only(tmp_path: Path) -> None:
    home = Home(tmp_path / "n")
    p, q, stranger = (Identity(os.urandom(32)) for _ in range(3))
    async with asyncio.timeout(DEADLINE):
        node = await start(home, home.init("n"))
        ts: list[Transport] = []
        try:
            cid = parse_constellation((await node.create_constellation("spread", "test"))["id"])
            node.engines[cid].applicants.update({p.member.key, q.member.key})
            tq, heard_q, _ = await member(node, q)
            ts.append(tq)
            got = await heard_q.until([node.identity.member])  # the node's own record, at link-up
            own = got[node.identity.member]
            assert own.addresses == (RecordAddress(Kind.LAN, "127.0.0.1", node.listen_port),)
            tp, heard_p, link_p = await member(node, p)
            ts.append(tp)
            p_rec = AddressRecord.sign(p, now_ms(), [RecordAddress(Kind.LAN, "127.0.0.1", 4100)])
            await link_p.send(m.encode_message(m.AddressRecords([p_rec.raw()])))
            assert (await heard_q.until([p.member]))[p.member] == p_rec  # pushed on change
            ts_, heard_s, _ = await member(node, stranger)
            ts.append(ts_)
            await asyncio.sleep(0.5)  # what the node would send the stranger, it sends at link-up
        finally:
            for t in ts:
                await t.stop()
            await node.stop()
    assert heard_s.records.empty()  # a stranger hears of nobody's record
    assert p.member not in {r.member for r in _drain(heard_p)}  # no echo to who told us


async def _peers_on_disk(home: Home, me: Identity) -> list[PeerInfo]:
    async with await Store.open(home.db_file) as s:
        return await s.peers()


def _drain(listener: Listener) -> list[AddressRecord]:
    out = []
    while not listener.records.empty():
        out.append(listener.records.get_nowait())
    return out


async def test_a_restarted_node_dials_its_peers_last_signed_addresses(tmp_path: Path) -> None:
    home = Home(tmp_path / "n")
    me, x = home.init("n"), Identity(os.urandom(32))
    async with asyncio.timeout(DEADLINE):
        tx_ = Transport(x, NET.encode(), Listener())
        xhost, xport = await tx_.start("127.0.0.1", 0)
        try:
            node = await start(home, me)
            try:
                cid = parse_constellation((await node.create_constellation("restart", "test"))["id"])
                node.engines[cid].applicants.add(x.member.key)
                link = await tx_.connect(node.listen_host, node.listen_port)
                await link.send(m.encode_message(m.Hello([cid], 0, "test")))  # first, as a node does (no listen port)
                x_rec = AddressRecord.sign(x, now_ms(), [RecordAddress(Kind.LAN, xhost, xport)])
                await link.send(m.encode_message(m.AddressRecords([x_rec.raw()])))
                await link.ping(10.0)
                stored = {k: raw for k, _, raw in await node.store.address_records()}
                assert stored[x.member] == x_rec.raw()  # on disk at once, not at a clean stop
                assert x.member not in {pi.member for pi in await node.store.peers()}
            finally:
                await node.stop()
                # Only the record knows where x listens: the peer list on disk does not.
            assert x.member not in {pi.member for pi in await _peers_on_disk(home, me)}
            for _ in range(50):  # bounded: x's side of the closed link goes
                if tx_.link(me.member) is None:
                    break
                await asyncio.sleep(0.1)
            assert tx_.link(me.member) is None
            node = await start(home, me)  # no bootstrap: only the stored record says where x is
            try:
                for _ in range(100):  # bounded: the node dials a restored record at once
                    if tx_.link(me.member) is not None:
                        break
                    await asyncio.sleep(0.1)
                assert tx_.link(me.member) is not None
                assert node.table.addresses(x.member).get(Address(xhost, xport)) == "record"
            finally:
                await node.stop()
        finally:
            await tx_.stop()


async def test_own_record_is_resigned_on_change_at_most_once_per_interval(tmp_path: Path) -> None:
    me, relay = Identity(os.urandom(32)), Identity(os.urandom(32))
    t = [1000.0]
    wall = [1_767_225_600_000]
    async with await Store.open(tmp_path / "n.db") as store:
        spread = AddressSpread(me, store, {}, send=_no_send, groups=lambda k: [b"c" * 32], feed=lambda k, a: None,
                               penalize=lambda k, p, w: None, listen=lambda: ("0.0.0.0", 7700),
                               clock=lambda: t[0], wall=lambda: wall[0], interfaces=lambda: ["192.168.1.5"])
        assert await spread.refresh_own()
        first = spread.own()
        assert first is not None and first.seq == wall[0]
        spread.set_relays([relay.member, me.member])  # never itself
        t[0] += OWN_RESIGN_INTERVAL_S / 2
        assert not await spread.refresh_own()  # changed, but signed too recently: next beat
        t[0] += OWN_RESIGN_INTERVAL_S
        wall[0] -= 5000  # the clock was set back meanwhile
        assert await spread.refresh_own()
        second = spread.own()
        assert second is not None and second.seq == first.seq + 1  # still above the last
        assert second.relays == (relay.member,)
        # A new port mapping is re-signed at once: members should dial it, not a relay.
        spread.set_mapped(Address("198.51.100.7", 40001))
        assert await spread.refresh_own()
        third = spread.own()
        assert third is not None and third.seq == second.seq + 1
        assert spread.own_json() == {
            "seq": third.seq, "relays": [str(relay.member)], "records_held": 1,
            "addresses": [{"kind": "lan", "address": "192.168.1.5:7700"},  # the record's canonical order
                          {"kind": "mapped", "address": "198.51.100.7:40001"}]}
        spread.set_mapped(Address("198.51.100.7", 40001))  # the same mapping renewed: no change
        assert not await spread.refresh_own()  # nothing changed
        assert {k: q for k, q, _ in await store.address_records()} == {me.member: third.seq}


async def _no_send(link: PeerLink, msg: m.Message) -> None:
    raise AssertionError("nobody is linked")
