"""Peer exchange and what a node tells strangers, against a real node in-process on
loopback: a stranger learns no constellation id and cannot make the node dial anyone; a
member is heard only about members, within a budget; what exchange alone taught the node
is forgotten at restart.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from valuemesh.node.addresses import Address
from valuemesh.node.daemon import Node
from valuemesh.node.home import Home
from valuemesh.node.link import PeerLink
from valuemesh.node.transport import Transport
from valuemesh.protocol import messages as m
from valuemesh.protocol.identity import Identity, MemberId
from valuemesh.protocol.records import parse_constellation

NET = "valuemesh-test-pex"
DEADLINE = 60.0


class Listener:
    """A peer's side: takes every key, keeps every message it receives."""

    def __init__(self) -> None:
        self.got: asyncio.Queue[m.Message] = asyncio.Queue()

    def authorize(self, remote: MemberId, inbound: bool) -> bool:
        return True

    async def on_connect(self, link: PeerLink) -> None:
        pass

    async def on_message(self, link: PeerLink, payload: bytes) -> None:
        await self.got.put(m.decode_message(payload))

    async def on_disconnect(self, link: PeerLink, reason: str) -> None:
        pass


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens there once closed


def bogus(keys: list[bytes], port: int) -> m.PeerExchange:
    return m.PeerExchange([[k, f"127.0.0.{2 + i % 200}", port, 0] for i, k in enumerate(keys)])


@pytest.fixture
async def home(tmp_path: Path) -> AsyncIterator[Home]:
    async with asyncio.timeout(DEADLINE):
        yield Home(tmp_path / "home")


async def start(home: Home, identity: Identity) -> Node:
    node = Node(home, identity, listen="127.0.0.1:0", api="127.0.0.1:0", network=NET)
    await node.start()
    return node


async def connect_as(node: Node, identity: Identity) -> tuple[Transport, Listener, PeerLink]:
    listener = Listener()
    t = Transport(identity, NET.encode(), listener)
    await t.start("127.0.0.1", 0)
    return t, listener, await t.connect(node.listen_host, node.listen_port)


async def first_hello(listener: Listener) -> m.Hello:
    async with asyncio.timeout(10):
        while True:
            msg = await listener.got.get()
            if isinstance(msg, m.Hello):
                return msg


async def test_strangers_and_members_cannot_make_the_node_dial_or_remember_fake_peers(home: Home) -> None:
    me = home.init("pex")
    node = await start(home, me)
    stranger, member = Identity(os.urandom(32)), Identity(os.urandom(32))
    other_member = Identity(os.urandom(32)).member
    port = closed_port()
    fakes = [os.urandom(32) for _ in range(32)]
    peers: list[Transport] = []
    try:
        cid = parse_constellation((await node.create_constellation("pex", "test"))["id"])
        eng = node.engines[cid]
        # `member` and `other_member` are applicants: the node shares the constellation with them.
        eng.applicants.update({member.member.key, other_member.key})

        t, heard, link = await connect_as(node, stranger)
        peers.append(t)
        assert (await first_hello(heard)).constellations == []  # no constellation id for a stranger
        for _ in range(8):  # the audit's 8 messages, 128 fake peers and more
            await link.send(m.encode_message(bogus(fakes, port)))
        await link.ping(10.0)  # frames are handled in order: every exchange is handled now
        assert not any(MemberId(k) in node.table for k in fakes)

        t, heard, link = await connect_as(node, member)
        peers.append(t)
        assert (await first_hello(heard)).constellations == [cid]  # a member hears of what it shares
        exchange = bogus(fakes, port)
        exchange.peers[0] = [other_member.key, "127.0.0.1", port, 0]  # one real member, a dead address
        for _ in range(8):
            await link.send(m.encode_message(exchange))
        await link.ping(10.0)
        # Fake keys are no members: ignored. The member's address is taken, as a hint.
        assert not any(MemberId(k) in node.table for k in fakes)
        assert node.table.addresses(other_member) == {Address("127.0.0.1", port): "exchange"}
        assert node.peers is not None and node.peers.dials_started <= 1
    finally:
        for t in peers:
            await t.stop()
        await node.stop()
    # Restarted, the node remembers nothing it only heard in exchange.
    node = await start(home, me)
    try:
        assert not any(MemberId(k) in node.table for k in fakes)
        assert node.table.addresses(other_member) == {}
    finally:
        await node.stop()


async def test_a_proven_address_is_on_disk_while_the_node_runs(tmp_path: Path) -> None:
    # A node killed -9 must find its peers again without a bootstrap flag: what it learned is
    # written when it changes, not only at a clean stop (which a kill never reaches).
    a_home, b_home = Home(tmp_path / "a"), Home(tmp_path / "b")
    async with asyncio.timeout(DEADLINE):
        a = await start(a_home, a_home.init("a"))
        b = await start(b_home, b_home.init("b"))
        try:
            await a.add_peer(f"{b.listen_host}:{b.listen_port}")
            saved: list[tuple[MemberId, str, int]] = []
            for _ in range(100):  # bounded: the tick loop writes within RESUBMIT_S of a change
                saved = [(p.member, p.host, p.port) for p in await a.store.peers()]
                if (b.identity.member, b.listen_host, b.listen_port) in saved:
                    break
                await asyncio.sleep(0.1)
            assert (b.identity.member, b.listen_host, b.listen_port) in saved
        finally:
            await b.stop()
            await a.stop()
