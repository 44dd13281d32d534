"""Relays without servers (node/relay.py, protocol/circuit.py): reservations, circuits
through a relay member with the handshake run end to end inside them, budgets per
end-to-end member, failover between relays, and direct links winning over relayed ones.

Every test runs real transports on 127.0.0.1 under a deadline and stops them all.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from transport_kit import FAST, Cluster, Node, exchange, ident, recv, running_cluster, until

from valuemesh.node.daemon import Node as Daemon
from valuemesh.node.daemon import installed_registry
from valuemesh.node.home import Home
from valuemesh.node.link import PeerLink
from valuemesh.node.link_limits import PeerUnreachableError, RelayLimits, RelayRefusedError
from valuemesh.node.relay import CircuitCarrier
from valuemesh.protocol import circuit as cm
from valuemesh.protocol.builtin.membership import make_genesis
from valuemesh.protocol.errors import LocalError
from valuemesh.protocol.identity import MemberId


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with running_cluster() as c:
        yield c


def everyone(src: MemberId, dst: MemberId) -> bool:
    return True


async def relay_setup(cluster: Cluster, *, limits: object = FAST, n_ends: int = 2) -> tuple[Node, list[Node]]:
    """A relay R and ends linked to it (each dialled R); the first end reserves at R."""
    relay = await cluster.node(limits=limits)  # type: ignore[arg-type]
    relay.transport.may_relay = everyone
    ends = [await cluster.node(limits=limits) for _ in range(n_ends)]  # type: ignore[arg-type]
    for e in ends:
        await e.transport.connect(*relay.addr, expect=relay.member)
    await until(lambda: len(relay.transport.links) == n_ends, "ends linked to the relay")
    relay_link = ends[0].transport.link(relay.member)
    assert relay_link is not None
    await ends[0].transport.reserve(relay_link)
    return relay, ends


async def relayed_pair(cluster: Cluster) -> tuple[Node, Node, Node, PeerLink, PeerLink]:
    """Relay, target a (reserved), opener b, and b's and a's ends of a circuit between them."""
    relay, (a, b) = await relay_setup(cluster)
    link = await b.transport.dial_via(relay.member, a.member)
    await until(lambda: a.transport.link(b.member) is not None, "the target's end is up")
    far = a.transport.link(b.member)
    assert far is not None
    return relay, a, b, link, far


def watch_relay(relay: Node) -> list[bytes]:
    """Everything the relay's circuit code sees in the clear (CIRCUIT frame bodies)."""
    seen: list[bytes] = []
    relaying = relay.transport.relaying
    original = relaying.on_frame

    async def spy(link: object, body: bytes) -> None:
        seen.append(body)
        await original(link, body)  # type: ignore[arg-type]

    relaying.on_frame = spy  # type: ignore[method-assign]
    return seen


async def test_a_circuit_carries_an_end_to_end_link_the_relay_cannot_read(cluster: Cluster) -> None:
    relay, (a, b) = await relay_setup(cluster)
    seen = watch_relay(relay)
    assert a.transport.reservations == [relay.member]
    assert relay.transport.relaying.relayed_for == [a.member]
    link = await b.transport.dial_via(relay.member, a.member)
    assert link.path == "relayed" and link.via == relay.member and link.remote == a.member
    await until(lambda: a.transport.link(b.member) is not None, "the target's end is up")
    back = a.transport.link(b.member)
    assert back is not None and back.path == "relayed" and back.via == relay.member and back.inbound
    assert back.session_id == link.session_id
    marker = b"MARKER-" + os.urandom(8).hex().encode()
    for i in range(20):
        await exchange(a, b, marker + b"%d" % i)
    big = marker + os.urandom(cm.INITIAL_WINDOW * 3)  # several credit rounds
    await link.send(big)
    assert await recv(a) == (b.member, big)
    await until(lambda: link.rtt is not None, "rtt through the relay")
    # The relay saw the circuit's bytes and never the marker in the clear.
    assert sum(len(s) for s in seen) > len(big)
    assert not any(marker in s for s in seen)
    assert relay.transport.link(a.member) is not None and relay.transport.link(b.member) is not None
    assert not relay.handler.messages.qsize()


async def test_closing_the_relay_link_closes_its_circuits_promptly_at_both_ends(cluster: Cluster) -> None:
    relay, a, b, link, far = await relayed_pair(cluster)
    relay_link = relay.transport.link(a.member)
    assert relay_link is not None
    relay_link.close("relay going away")
    await until(lambda: link.closed and far.closed, "both ends saw the circuit go", timeout=3.0)
    assert relay.transport.relaying.circuits == 0
    assert a.transport.reservations == []
    with pytest.raises(RelayRefusedError) as err:
        await b.transport.dial_via(relay.member, a.member)
    assert err.value.code == cm.Code.NO_RESERVATION


async def test_a_released_reservation_is_forgotten_at_the_relay(cluster: Cluster) -> None:
    relay, (a, b) = await relay_setup(cluster)
    assert relay.transport.relaying.relayed_for == [a.member]
    a.transport.release(relay.member)
    assert a.transport.reservations == []
    await until(lambda: relay.transport.relaying.relayed_for == [], "the relay forgot the reservation")
    with pytest.raises(RelayRefusedError) as err:
        await b.transport.dial_via(relay.member, a.member)
    assert err.value.code == cm.Code.NO_RESERVATION
    assert relay.transport.link(a.member) is not None  # the link itself stays


async def test_either_end_closing_ends_the_circuit_at_the_relay(cluster: Cluster) -> None:
    relay, a, b, link, far = await relayed_pair(cluster)
    far.close("done talking")
    await until(lambda: link.closed, "the opener saw the close")
    assert link.close_reason is not None and "done talking" in link.close_reason
    await until(lambda: relay.transport.relaying.circuits == 0, "the relay forgot the circuit")
    # The relay links themselves are untouched, and a new circuit works.
    again = await b.transport.dial_via(relay.member, a.member)
    assert again is not link and not again.closed
    await until(lambda: (lk := a.transport.link(b.member)) is not None and not lk.closed, "new circuit up")
    await exchange(a, b, b"again")


async def test_two_relays_either_reaches_and_one_dying_leaves_the_other(cluster: Cluster) -> None:
    r1 = await cluster.node()
    r2 = await cluster.node()
    for r in (r1, r2):
        r.transport.may_relay = everyone
    a, b = await cluster.node(), await cluster.node()
    for e in (a, b):
        for r in (r1, r2):
            await e.transport.connect(*r.addr, expect=r.member)
    for r in (r1, r2):
        lk = a.transport.link(r.member)
        assert lk is not None
        await a.transport.reserve(lk)
    assert sorted(a.transport.reservations, key=str) == sorted([r1.member, r2.member], key=str)
    first = await b.transport.dial_via(r1.member, a.member)
    assert first.via == r1.member
    await exchange(a, b, b"via r1")
    await r1.transport.stop()
    await until(lambda: first.closed, "the circuit through the dead relay closed")
    second = await b.transport.dial_via(r2.member, a.member)
    assert second.via == r2.member and not second.closed
    await until(lambda: (lk := a.transport.link(b.member)) is not None and lk.via == r2.member, "a's end")
    await exchange(a, b, b"via r2")
    assert a.transport.reservations == [r2.member]


async def test_a_direct_link_replaces_a_relayed_one_and_carries_its_queue(cluster: Cluster) -> None:
    relay, (a, b) = await relay_setup(cluster)
    relayed = await b.transport.dial_via(relay.member, a.member)
    await until(lambda: a.transport.link(b.member) is not None, "the target's end is up")
    # Payloads queued on the relayed link but not yet written move to the direct one. The
    # circuit gets no more credit, so the writer stops inside the frame it is writing (a
    # ping here): that frame is lost with the circuit, as is anything the relay still holds.
    carrier = relayed._carrier
    assert isinstance(carrier, CircuitCarrier)
    carrier._credit = 0
    relayed._keepalive()
    await until(lambda: not carrier._credited.is_set(), "the writer waits for credit")
    for i in range(5):
        assert relayed.try_send(b"queued %d" % i)
    direct = await b.transport.connect(*a.addr, expect=a.member)
    assert direct.path == "direct" and relayed.closed
    got = [await recv(a) for _ in range(5)]
    assert got == [(b.member, b"queued %d" % i) for i in range(5)]
    await until(lambda: (lk := a.transport.link(b.member)) is not None and lk.path == "direct", "a agrees")
    # A relayed dial never replaces the live direct link: it returns it.
    assert await b.transport.dial_via(relay.member, a.member) is direct
    await exchange(a, b, b"direct")


async def test_a_relayed_link_arriving_after_a_direct_one_loses_at_both_ends(cluster: Cluster) -> None:
    relay, (a, b) = await relay_setup(cluster)
    direct = await b.transport.connect(*a.addr, expect=a.member)
    await until(lambda: a.transport.link(b.member) is not None, "direct up at a")
    # Force a circuit anyway, below dial_via's shortcut: the established direct link wins.
    carrier_link = b.transport.link(relay.member)
    assert carrier_link is not None
    relaying = b.transport.relaying
    cid = relaying._cid(carrier_link)
    carrier = CircuitCarrier(relaying, carrier_link, cid)
    relaying._ends[(carrier_link, cid)] = carrier
    fut: asyncio.Future[cm.Message] = asyncio.get_running_loop().create_future()
    relaying._opening[(carrier_link, cid)] = fut
    carrier_link._send_circuit(cm.open_(cid, a.member))
    assert (await fut).code is cm.Code.OK
    winner = await b.transport._adopt(
        carrier, "test", initiator=True, expect=a.member, path="relayed", via=relay.member
    )
    assert winner is direct and not direct.closed
    await until(lambda: relay.transport.relaying.circuits == 0, "the losing circuit closed")
    live = a.transport.link(b.member)
    assert live is not None and live.path == "direct"
    await exchange(a, b, b"still direct")


async def test_reserve_and_dial_refusals_say_why(cluster: Cluster) -> None:
    plain = await cluster.node()  # serves as no relay
    a, b = await cluster.node(), await cluster.node()
    for e in (a, b):
        await e.transport.connect(*plain.addr)
    lk = a.transport.link(plain.member)
    assert lk is not None
    with pytest.raises(RelayRefusedError, match="does not serve as a relay") as err:
        await a.transport.reserve(lk)
    assert err.value.code == cm.Code.NOT_A_RELAY
    with pytest.raises(RelayRefusedError, match="does not serve as a relay"):
        await b.transport.dial_via(plain.member, a.member)
    with pytest.raises(PeerUnreachableError, match="no live link to the relay"):
        await b.transport.dial_via(ident().member, a.member)
    assert b.transport.link(a.member) is None


def test_relay_limits_refuse_nonsense() -> None:
    with pytest.raises(LocalError):
        RelayLimits(max_circuits=0)
    assert replace(FAST, relay=RelayLimits(max_pending=2)).relay.max_pending == 2


# -- the daemon's wiring -------------------------------------------------------------------


async def test_the_daemon_relays_only_between_active_members_of_its_constellations(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    me = home.init("relay")
    node = Daemon(home, me, listen="127.0.0.1:0", api="127.0.0.1:0", network="valuemesh-test-relay")
    await node.start()
    try:
        bob, carol = ident(), ident()
        registry = installed_registry()
        members = [{"key": k.member.key, "name": n, "roles": [], "tier": "core", "weight": 1}
                   for k, n in ((me, "relay"), (bob, "bob"))]
        g = make_genesis(me, name="c", purpose="", nonce=bytes(16), created=1_700_000_000_000,
                         plugins={n: str(p.version) for n, p in registry.plugins.items()}, members=members)
        eng = node._new_engine(g)
        async with node.store.batch() as tx:
            tx.put_constellation(eng.info())
            tx.put_records([eng.genesis], 1_700_000_000_000)
        await eng.load()
        node.engines[eng.cid] = eng
        decide = node.transport.may_relay
        assert decide is not None
        assert decide(bob.member, me.member) and decide(bob.member, bob.member)
        assert not decide(carol.member, bob.member) and not decide(bob.member, carol.member)
        assert not decide(carol.member, carol.member)
    finally:
        await node.stop()
    home2 = Home(tmp_path / "home2")
    quiet = Daemon(home2, home2.init("quiet"), listen="127.0.0.1:0", api="127.0.0.1:0",
                 network="valuemesh-test-relay", serve_relay=False)
    await quiet.start()
    try:
        assert quiet.transport.may_relay is None
    finally:
        await quiet.stop()
