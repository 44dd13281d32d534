"""Hostile address announcements against a real node in-process on loopback (#17, Bad input):
forged, replayed, oversized, far-future, non-member and flooding address records, and a record
claiming another node's address. Each is refused with one clear log line, the sender is
charged, and an honest member's record is still taken afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from node_kit import dial_node, start_node

from valuemesh.node.addresses import Address
from valuemesh.node.clock import now_ms
from valuemesh.node.daemon import Node
from valuemesh.node.home import Home
from valuemesh.node.link import PeerLink
from valuemesh.node.testing import QuietHandler
from valuemesh.node.transport import Transport
from valuemesh.protocol import cbor
from valuemesh.protocol import messages as m
from valuemesh.protocol.addressrec import AddressRecord, Kind, RecordAddress
from valuemesh.protocol.identity import Identity, MemberId
from valuemesh.protocol.records import parse_constellation

NET = "valuemesh-test-arec"
DEADLINE = 60.0


def rec(who: Identity, seq: int, port: int, host: str = "127.0.0.1", kind: Kind = Kind.LAN) -> bytes:
    return AddressRecord.sign(who, seq, [RecordAddress(kind, host, port)]).raw()


@dataclass
class Scene:
    node: Node
    attacker: Identity
    honest: Identity
    outsider: Identity  # shares nothing with the node
    absent: Identity  # a member that is not linked: the node dials its record's addresses
    link: PeerLink  # the attacker's link to the node
    honest_link: PeerLink
    transports: list[Transport]
    cid: bytes

    def held(self, who: Identity) -> int | None:
        r = self.node.addrs.table.get(who.member)
        return None if r is None else r.seq

    def score(self, who: Identity) -> float:
        return self.node.transport.reputation.score(who.member, time.monotonic())

    async def send(self, records: list[bytes], link: PeerLink | None = None) -> None:
        lk = link or self.link
        await lk.send(m.encode_message(m.AddressRecords(records)))
        await lk.ping(10.0)  # frames are handled in order: the records are handled now


async def connect_as(node: Node, identity: Identity) -> tuple[Transport, PeerLink]:
    return await dial_node(node, identity, QuietHandler())


@pytest.fixture
async def scene(tmp_path: Path) -> AsyncIterator[Scene]:
    async with asyncio.timeout(DEADLINE):
        home = Home(tmp_path / "home")
        node = await start_node(home, home.init("arec"), NET)
        attacker, honest, outsider, absent = (Identity(os.urandom(32)) for _ in range(4))
        transports: list[Transport] = []
        try:
            cid = parse_constellation((await node.create_constellation("arec", "test"))["id"])
            node.engines[cid].applicants.update({attacker.member.key, honest.member.key, absent.member.key})
            t, link = await connect_as(node, attacker)
            transports.append(t)
            th, honest_link = await connect_as(node, honest)
            transports.append(th)
            yield Scene(node, attacker, honest, outsider, absent, link, honest_link, transports, cid)
        finally:
            for t in transports:
                await t.stop()
            await node.stop()


def refused(caplog: pytest.LogCaptureFixture, words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "valuemesh.discovery" and "address" in r.getMessage() and words in r.getMessage()]


async def honest_still_heard(s: Scene) -> None:
    await s.send([rec(s.honest, now_ms(), 4242)], s.honest_link)
    assert s.held(s.honest) is not None and s.score(s.honest) == 100.0
    assert Address("127.0.0.1", 4242) in s.node.table.addresses(s.honest.member)


async def test_an_honest_members_record_is_taken_stored_and_dialed_first(scene: Scene) -> None:
    seq = now_ms()
    await scene.send([rec(scene.absent, seq, 4243)], scene.honest_link)  # relayed by a member
    assert scene.held(scene.absent) == seq
    assert scene.node.table.addresses(scene.absent.member) == {Address("127.0.0.1", 4243): "record"}
    stored = {k: q for k, q, _ in await scene.node.store.address_records()}
    assert stored[scene.absent.member] == seq
    assert stored[scene.node.identity.member] == scene.node.addrs.own().seq  # type: ignore[union-attr]
    await honest_still_heard(scene)


Attack = Callable[[Scene], list[bytes]]


def forged(s: Scene) -> list[bytes]:
    doc = cbor.decode(rec(s.honest, now_ms(), 4000))
    doc["addrs"] = [["lan", "127.0.0.1", 6666]]  # the attacker's address under the honest signature
    return [cbor.encode(doc)]


def forged_in_the_nodes_name(s: Scene) -> list[bytes]:
    doc = cbor.decode(rec(s.honest, now_ms(), 4000))
    doc["m"] = s.node.identity.member.key
    return [cbor.encode(doc)]


def far_future(s: Scene) -> list[bytes]:
    return [rec(s.honest, now_ms() + 3600_000, 4000)]


def non_member(s: Scene) -> list[bytes]:
    return [rec(s.outsider, now_ms(), 4000)]


def too_many_addresses(s: Scene) -> list[bytes]:
    doc = cbor.decode(rec(s.honest, now_ms(), 4000))
    doc["addrs"] = [["lan", f"10.0.0.{i}", 1] for i in range(9)]
    return [cbor.encode(doc)]


@pytest.mark.parametrize(("attack", "words"), [
    (forged, "does not verify"),
    (forged_in_the_nodes_name, "in our own name"),
    (far_future, "in the future"),
    (too_many_addresses, "at most 8 addresses"),
])
async def test_invalid_records_are_refused_logged_and_charged(
    scene: Scene, caplog: pytest.LogCaptureFixture, attack: Attack, words: str
) -> None:
    caplog.set_level(logging.INFO, logger="valuemesh.discovery")
    await scene.send(attack(scene))
    assert scene.held(scene.honest) is None and scene.held(scene.outsider) is None
    assert len(refused(caplog, words)) == 1
    assert scene.score(scene.attacker) == pytest.approx(80.0, abs=0.5)  # PENALTY_INVALID, once
    assert scene.node.store is not None
    stored = {k for k, _, _ in await scene.node.store.address_records()}
    assert scene.honest.member not in stored and scene.outsider.member not in stored
    await honest_still_heard(scene)


async def test_a_replayed_older_record_does_not_replace_the_newer(
    scene: Scene, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="valuemesh.discovery")
    old, new = rec(scene.absent, now_ms() - 60_000, 4001), rec(scene.absent, now_ms(), 4002)
    await scene.send([new], scene.honest_link)
    await scene.send([old])
    assert scene.node.table.addresses(scene.absent.member) == {Address("127.0.0.1", 4002): "record"}
    assert len(refused(caplog, "is older")) == 1
    assert scene.score(scene.attacker) < 100.0
    await scene.send([new])  # the same seq again (floods cross): silent, free
    assert len(refused(caplog, "")) == 1 and scene.score(scene.attacker) > 98.0


async def test_an_oversized_message_is_refused_whole(scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    big = rec(scene.honest, now_ms(), 4000) + b"\x00" * 1024
    await scene.send([big])
    await scene.send([rec(scene.honest, now_ms(), 4000)] * 33)
    assert scene.held(scene.honest) is None
    assert len([r for r in caplog.records if "bad data" in r.getMessage()]) == 2
    assert scene.score(scene.attacker) < 70.0
    await honest_still_heard(scene)


async def test_floods_are_cut_to_the_update_rate_and_the_senders_budget(
    scene: Scene, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="valuemesh.discovery")
    base = now_ms()
    for i in range(12):  # bounded: twelve updates of its own record, one per message, at once
        await scene.send([rec(scene.attacker, base + i, 5000 + i)])
    assert scene.held(scene.attacker) == base + 1  # the burst of 2, then nothing until it refills
    assert len(refused(caplog, "changes too often")) == 1  # one line for the ten refused
    flooded = scene.score(scene.attacker)
    assert flooded < 100.0
    junk = [rec(scene.honest, base - 1000 - i, 4000) for i in range(32)]
    for _ in range(10):  # 320 more records: over the sender's burst of 256 (refilled at 4 per s)
        await scene.send(junk)
    assert refused(caplog, "over its budget")
    assert scene.score(scene.attacker) < flooded
    await honest_still_heard(scene)


@pytest.mark.parametrize("kind", [Kind.DIRECT, Kind.LAN])
async def test_a_record_claiming_another_nodes_address_costs_its_announcer(
    scene: Scene, caplog: pytest.LogCaptureFixture, kind: Kind
) -> None:
    """A public (direct or mapped) address that proves to be another key's costs the member
    who announced it; a LAN address only gets dropped: two homes may number their LANs alike,
    so an honest member's LAN address can be another node's here."""
    caplog.set_level(logging.INFO, logger="valuemesh.discovery")
    victim = Identity(os.urandom(32))
    vt = Transport(victim, NET.encode(), QuietHandler())
    host, port = await vt.start("127.0.0.1", 0)
    scene.transports.append(vt)
    # `absent` (a member, not linked) announces the victim's address; the attacker relays it.
    await scene.send([rec(scene.absent, now_ms(), port, host, kind)])
    for _ in range(100):  # bounded: the node dials a new record address at once
        if scene.node.addrs.usable(scene.absent.member) == []:
            break
        await asyncio.sleep(0.1)
    assert scene.node.addrs.usable(scene.absent.member) == []  # dropped for this record
    assert Address(host, port) not in scene.node.table.addresses(scene.absent.member)
    if kind is Kind.DIRECT:
        assert scene.score(scene.absent) == pytest.approx(80.0, abs=0.5)  # the announcer pays
        assert len(refused(caplog, "another node's")) == 1
    else:
        assert scene.score(scene.absent) == 100.0
        assert len([r for r in caplog.records if "is another node's here: dropped" in r.getMessage()]) == 1
    assert scene.node.transport.reputation.score(victim.member, time.monotonic()) == 100.0  # the owner does not
    assert scene.score(scene.attacker) == 100.0  # relaying a validly signed record is no offence
    dials = scene.node.peers.dials_started if scene.node.peers else 0
    await asyncio.sleep(1.0)
    assert scene.node.peers is not None and scene.node.peers.dials_started == dials  # no more dials for it
    await honest_still_heard(scene)


async def test_a_nodes_own_older_record_coming_back_moves_its_seq_on(scene: Scene) -> None:
    own = scene.node.addrs.own()
    assert own is not None
    ahead = AddressRecord.sign(scene.node.identity, own.seq + 1000, own.addresses).raw()
    await scene.send([ahead])
    changed = scene.node.addrs.own()
    assert changed is not None and changed.seq == own.seq + 1000
    _ = MemberId  # the type appears in hints only


async def test_a_joiners_own_record_before_its_join_is_kept_until_it_is_a_member(
    scene: Scene, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="valuemesh.discovery")
    t, link = await connect_as(scene.node, scene.outsider)
    scene.transports.append(t)
    seq = now_ms()
    await scene.send([rec(scene.outsider, seq, 4300)], link)
    assert scene.held(scene.outsider) is None and scene.score(scene.outsider) == 100.0  # no fault of its own
    assert len(refused(caplog, "no member of a constellation we share (yet)")) == 1
    await scene.node.addrs.beat()
    assert scene.held(scene.outsider) is None  # still no member: still not taken
    scene.node.engines[scene.cid].applicants.add(scene.outsider.member.key)  # its join arrives
    await scene.node.addrs.beat()
    assert scene.held(scene.outsider) == seq


async def test_a_record_of_a_non_member_is_refused_and_kept_only_until_it_is_one(
    scene: Scene, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="valuemesh.discovery")
    await scene.send(non_member(scene))
    assert scene.held(scene.outsider) is None
    assert len(refused(caplog, "of no member")) == 1
    assert scene.score(scene.attacker) == pytest.approx(99.0, abs=0.5)  # our view may lag: a small charge
    for i in range(80):  # bounded: records of 80 made-up keys, more than MAX_PENDING
        await scene.send([rec(Identity(bytes([i]) * 32), now_ms(), 4000)])
    assert len(scene.node.addrs._pending) == 64
    assert scene.score(scene.attacker) < 50.0  # each message charged
    await honest_still_heard(scene)
