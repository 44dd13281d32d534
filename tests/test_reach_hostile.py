"""Hole-punch messages against a real node (node/reach.py): they are taken only over a relayed
link from a member, a malformed one costs its sender, a flood is cut to a bounded queue and
the responder budget, and an honest punch-connect is answered over the same relayed link.

One node in-process on loopback; the relay and the peers are bare transports."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from node_kit import start_node
from transport_kit import Recorder, until

from valuemesh.node.daemon import Node
from valuemesh.node.home import Home
from valuemesh.node.link import PeerLink
from valuemesh.node.transport import Transport
from valuemesh.protocol import messages as m
from valuemesh.protocol import punch
from valuemesh.protocol.identity import Identity
from valuemesh.protocol.records import parse_constellation

NET = "reach-hostile"
DEADLINE = 60.0


@dataclass
class Scene:
    node: Node
    relay: Transport
    member: Identity
    stranger: Identity
    member_t: Transport
    member_rec: Recorder
    relayed: PeerLink  # the member's link to the node through the relay
    stranger_relayed: PeerLink
    direct: PeerLink  # the relay's direct link to the node (the relay is an applicant)

    def score(self, who: Identity) -> float:
        return self.node.transport.reputation.score(who.member, time.monotonic())


def lower_than(other: Identity) -> Identity:
    for _ in range(100_000):  # bounded; a key above 2**-16 of the range needs far fewer
        who = Identity(os.urandom(32))
        if who.member.key < other.member.key:
            return who
    raise AssertionError("no lower key found")


def connect_msg(port: int = 40000) -> m.PunchMessage:
    return m.PunchMessage(punch.encode(punch.Connect(os.urandom(punch.ATTEMPT_ID_LEN),
                                                     (punch.Candidate("127.0.0.1", port),))))


async def sent(link: PeerLink, msg: m.Message) -> None:
    await link.send(m.encode_message(msg))
    await link.ping(10.0)  # frames are handled in order: this one is handled now


@pytest.fixture
async def scene(tmp_path: Path) -> AsyncIterator[Scene]:
    async with asyncio.timeout(DEADLINE):
        home = Home(tmp_path / "home")
        node = await start_node(home, home.init("reach"), NET)
        # Peers with lower keys than the node's: it never asks them to punch itself (the lower
        # key asks), so every exchange here is one the test starts.
        member, stranger, relay_id = (lower_than(node.identity) for _ in range(3))
        ts: list[Transport] = []
        try:
            cid = parse_constellation((await node.create_constellation("reach", "test"))["id"])
            node.engines[cid].applicants.update({member.member.key, relay_id.member.key})
            relay = Transport(relay_id, node.network_id, Recorder())
            relay.may_relay = lambda src, dst: True  # a relay that carries anyone: the node must judge
            ts.append(relay)
            await relay.start("127.0.0.1", 0)
            direct = await node.transport.connect(*relay.address)
            await node.transport.reserve(direct)  # the node is reachable through the relay
            links = []
            rec = Recorder()
            for who, handler in ((member, rec), (stranger, Recorder())):
                t = Transport(who, node.network_id, handler)
                ts.append(t)
                await t.start("127.0.0.1", 0)
                await t.connect(*relay.address)
                links.append(await t.dial_via(relay_id.member, node.identity.member))
            await until(lambda: all(node.links.get(k.member) is not None for k in (member, stranger)), "linked")
            back = relay.link(node.identity.member)
            assert back is not None
            yield Scene(node, relay, member, stranger, ts[1], rec, links[0], links[1], back)
        finally:
            for t in ts:
                await t.stop()
            await node.stop()


async def test_an_honest_punch_connect_is_answered_over_the_relayed_link(scene: Scene) -> None:
    assert scene.node.links[scene.member.member].path == "relayed"
    await sent(scene.relayed, connect_msg())
    async with asyncio.timeout(10):
        while True:
            _, payload = await scene.member_rec.messages.get()
            msg = m.decode_message(payload)
            if isinstance(msg, m.PunchMessage):
                break
    answer = punch.decode(msg.data)
    assert isinstance(answer, punch.Connect)  # the node's own candidates, for the same attempt
    assert answer.addrs and all(c.port == scene.node.listen_port for c in answer.addrs)
    assert scene.score(scene.member) == 100.0


async def test_a_malformed_punch_message_costs_its_sender(scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    await sent(scene.relayed, m.PunchMessage(b"\xa1at" + b"\x00" * 8))  # CBOR, but no punch message
    await until(lambda: scene.score(scene.member) < 100.0, "the sender charged")
    assert any("hole-punch message" in r.getMessage() for r in caplog.records)
    assert not scene.node.reach._sessions  # nothing was started for it


async def test_punch_messages_from_a_stranger_or_on_a_direct_link_start_nothing(
    scene: Scene, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="valuemesh.reach")

    def ignored() -> int:
        return len([r for r in caplog.records if "ignored a hole-punch message" in r.getMessage()])

    await sent(scene.stranger_relayed, connect_msg())  # relayed, but shares nothing with the node
    await until(lambda: ignored() == 1, "the stranger's request ignored")
    await sent(scene.direct, connect_msg())  # the relay is an applicant, but its link is direct
    await until(lambda: ignored() == 2, "the request on a direct link ignored")
    assert not scene.node.reach._sessions
    assert scene.node.reach.punches["answered"] == 0


async def test_a_punch_flood_gets_at_most_the_responder_budget_of_answers(scene: Scene) -> None:
    """200 punch-connects at once: the node answers (and would dial for) at most
    punch.MAX_TRIES of them in the responder window; the rest cost it a decode each."""
    for _ in range(200):  # bounded: far more than any exchange needs
        await scene.relayed.send(m.encode_message(connect_msg()))
    await scene.relayed.ping(10.0)
    answers = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + 3.0
    while (left := end - loop.time()) > 0:  # bounded in time: what arrives within 3 s
        try:
            _, payload = await asyncio.wait_for(scene.member_rec.messages.get(), left)
        except TimeoutError:
            break
        if isinstance(m.decode_message(payload), m.PunchMessage):
            answers += 1
    assert 1 <= answers <= punch.MAX_TRIES
    assert len(scene.node.reach._sessions) <= 1  # one exchange per member at a time
    assert scene.node.links.get(scene.member.member) is not None  # well-formed requests are no offence
