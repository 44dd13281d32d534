"""Tests of the peer manager: bootstrap addresses, and the peer table driven against real
transports on loopback (dials, probes, suspicion and revival, peer exchange).
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import sys
import time
from pathlib import Path

import pytest

from valuemesh.node.addresses import Address, Source
from valuemesh.node.announcement import Found
from valuemesh.node.link import PeerLink
from valuemesh.node.peer_actions import Dial, Died, Revived, State, Suspected
from valuemesh.node.peer_manager import PeerManager, add_bootstrap
from valuemesh.node.peers import PeerTable, Timers
from valuemesh.node.transport import Transport
from valuemesh.protocol.errors import LocalError, RemoteError
from valuemesh.protocol.identity import Identity, MemberId

sys.path.insert(0, str(Path(__file__).parent))
from polling import wait_for

DEADLINE = 30.0


def member(i: int) -> MemberId:
    return Identity(bytes([i]) * 32).member


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
        assert await wait_for(lambda: table.linked() == [b], DEADLINE)
        # The bootstrap address now belongs to b; nothing anonymous is left to dial.
        assert table.anonymous() == []
        view = table.snapshot(time.monotonic())[0]
        assert view.via is not None and view.via.source == "bootstrap"
        # Probes are answered over the encrypted link: b stays alive, our health stays good.
        await asyncio.sleep(1.0)
        assert table.state(b) is State.ALIVE and table.local_health == 0
        assert not any(isinstance(e, Suspected) for e in events)

        await t_b.stop()  # b goes away: redials fail, b is suspected, then declared dead
        assert await wait_for(lambda: Died(b, 0) in events, DEADLINE), events
        assert Suspected(b, 0) in events
        assert b in table and table.state(b) is State.DEAD  # a proposal, not a removal

        t_b2 = Transport(id_b, net, h_b)
        await t_b2.start("127.0.0.1", port_b)  # b comes back where it was
        assert await wait_for(lambda: table.linked() == [b], DEADLINE), events
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
        assert await wait_for(lambda: id_b.member in table.linked(), DEADLINE)
        assert await wait_for(lambda: table.addresses(liar) == {}, DEADLINE)
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
        # All three are members of one constellation: exchange is only ever between members.
        h.manager = PeerManager(table, t, rng=random.Random(10 + i), groups=lambda member: (b"c" * 32,))
        managers.append(h.manager)
    a, b, c = (i.member for i in ids)
    try:
        ports = [(await t.start("127.0.0.1", 0))[1] for t in transports]
        for mgr in managers:
            mgr.start()
        # a knows b and c; b knows only a.
        managers[0].add_bootstrap([f"127.0.0.1:{ports[1]}", f"127.0.0.1:{ports[2]}"])
        assert await wait_for(lambda: managers[0].table.linked() == sorted([b, c]),
                               DEADLINE)
        assert await wait_for(lambda: a in managers[1].table.linked(), DEADLINE)
        offer = managers[0].exchange_offer(b)
        assert {e.member for e in offer} == {c}  # never b itself
        link_b_to_a = transports[1].link(a)
        assert link_b_to_a is not None
        report = managers[1].exchange_received(link_b_to_a, offer)
        assert report.accepted == 1
        assert await wait_for(lambda: c in managers[1].table.linked(), DEADLINE)
        assert managers[1].table.addresses(c) == {Address("127.0.0.1", ports[2]): Source.EXCHANGE}
        with pytest.raises(RemoteError):
            managers[1].exchange_received(link_b_to_a, offer * 65)
    finally:
        for mgr in managers:
            await mgr.stop()
        for t in transports:
            await t.stop()


async def test_many_members_named_at_one_dead_address_cost_one_dial_per_back_off_step() -> None:
    ident = Identity(bytes([60]) * 32)
    t = Transport(ident, os.urandom(8), _Handler())
    frozen = time.monotonic()
    table = PeerTable(ident.member, random.Random(1), timers=FAST, now=frozen)
    mgr = PeerManager(table, t, rng=random.Random(2), clock=lambda: frozen)  # time stands still
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = Address("127.0.0.1", s.getsockname()[1])  # nothing listens once closed
    fakes = [Identity(bytes([61 + i]) * 32).member for i in range(100)]
    for f in fakes:  # e.g. fake members a peer pointed at one victim's address
        mgr.add_known(f, dead, Source.MDNS)
    try:
        await t.start("127.0.0.1", 0)
        mgr.start()
        assert await wait_for(lambda: dead in mgr._targets, DEADLINE)  # the first dial failed
        await asyncio.sleep(0.2)  # several loop turns: nothing else is due on the frozen clock
        assert mgr.dials_started == 1
    finally:
        await mgr.stop()
        await t.stop()
