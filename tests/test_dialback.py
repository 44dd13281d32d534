"""Dial-back (node/dialback.py) between real transports on loopback: an address that reaches
the asker is `reachable`, a closed port or another node's key `unreachable`; a request naming
a third party's IP, a stranger's request and a flood of requests are refused with one log line
and charged, and nothing is dialed for them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from valuemesh.node.addresses import Address
from valuemesh.node.dialback import REACHABLE, UNKNOWN, UNREACHABLE, DialBack, merge
from valuemesh.node.link import PeerLink
from valuemesh.node.messaging import Handlers, send
from valuemesh.node.testing import QuietHandler
from valuemesh.node.transport import Transport
from valuemesh.protocol import messages as m
from valuemesh.protocol.errors import ValuemeshError
from valuemesh.protocol.identity import Identity, MemberId

NET = b"valuemesh-test-dialback"
DEADLINE = 60.0


class Peer:
    """A transport whose messages go to a DialBack, as the node wires it."""

    def __init__(self, *, shares: bool = True) -> None:
        self.identity = Identity(os.urandom(32))
        self.links: dict[MemberId, PeerLink] = {}
        self.handlers = Handlers()
        self.replies: asyncio.Queue[m.DialBackReply] = asyncio.Queue()
        self.announce: list[Address] = []
        self.transport = Transport(self.identity, NET, self)
        self.dialback = DialBack(self.identity, NET, self.links, send=send,
                                 groups=lambda k: [b"c" * 32] if shares else [],
                                 addresses=lambda: self.announce, dial_timeout=2.0)
        self.dialback.register(self.handlers)

    def authorize(self, remote: MemberId, inbound: bool) -> bool:
        return True

    async def on_connect(self, link: PeerLink) -> None:
        self.links[link.remote] = link

    async def on_message(self, link: PeerLink, payload: bytes) -> None:
        msg = m.decode_message(payload)
        if isinstance(msg, m.DialBackReply):
            await self.replies.put(msg)
        with contextlib.suppress(ValuemeshError):
            await self.handlers.dispatch(link, msg)

    async def on_disconnect(self, link: PeerLink, reason: str) -> None:
        if self.links.get(link.remote) is link:
            del self.links[link.remote]

    def score(self, of: Peer) -> float:
        return self.transport.reputation.score(of.identity.member, time.monotonic())


def closed_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture(params=["127.0.0.1", "::1"])
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Peer, Peer]]:
    loopback = request.param
    if loopback == "::1" and not has_ipv6_loopback():
        pytest.skip("This machine has no IPv6 loopback address (::1).")
    asker, helper = Peer(), Peer()
    async with asyncio.timeout(DEADLINE):
        try:
            host, port = await asker.transport.start(loopback, 0)
            await helper.transport.start(loopback, 0)
            asker.announce = [Address(host, port)]
            await asker.transport.connect(*helper.transport.address)  # type: ignore[misc]
            for _ in range(50):  # bounded: both ends take the link in
                if asker.links and helper.links:
                    break
                await asyncio.sleep(0.05)
            yield asker, helper
        finally:
            for p in (asker, helper):
                await p.dialback.close()
                await p.transport.stop()


def test_answers_merge_into_one_verdict_per_address() -> None:
    a, b, c = Address("10.0.0.1", 1), Address("10.0.0.2", 1), Address("10.0.0.3", 1)
    got = merge([a, b, c], [{a: UNREACHABLE, b: UNREACHABLE}, {a: REACHABLE}])
    assert got == {a: REACHABLE, b: UNREACHABLE, c: UNKNOWN}


async def test_a_reachable_and_an_unreachable_address(pair: tuple[Peer, Peer]) -> None:
    asker, helper = pair
    loopback = asker.announce[0].host
    dead = Address(loopback, closed_port(loopback))
    other = Transport(Identity(os.urandom(32)), NET, QuietHandler())  # someone else's node
    ohost, oport = await other.start(loopback, 0)
    try:
        asker.announce = [*asker.announce, dead, Address(ohost, oport)]
        state = await asker.dialback.ask()
    finally:
        await other.stop()
    assert state.results == {asker.announce[0]: REACHABLE, dead: UNREACHABLE, Address(ohost, oport): UNREACHABLE}
    assert state.helpers == (helper.identity.member,)
    assert state.observed[helper.identity.member].host == loopback
    assert state.to_json()["addresses"] == {str(a): r for a, r in sorted(state.results.items())}
    assert helper.score(asker) == 100.0  # an honest request costs the asker nothing


async def _ask_raw(asker: Peer, helper: Peer, addrs: list[list[object]]) -> m.DialBackReply:
    link = asker.links[helper.identity.member]
    await send(link, m.DialBackAsk(os.urandom(16), addrs))  # type: ignore[arg-type]
    async with asyncio.timeout(10):
        return await asker.replies.get()


async def test_a_third_partys_address_is_never_dialed(
    pair: tuple[Peer, Peer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="valuemesh.discovery")
    asker, helper = pair
    hits = 0

    async def count(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal hits
        hits += 1
        w.close()

    victim = await asyncio.start_server(count, "127.0.0.2", 0)  # another host, as far as IPs go
    vport = victim.sockets[0].getsockname()[1]
    try:
        reply = await _ask_raw(asker, helper, [["127.0.0.2", vport], ["192.0.2.7", 80]])
        await asyncio.sleep(0.5)
    finally:
        victim.close()
        await victim.wait_closed()
    assert hits == 0
    assert reply.results == [["127.0.0.2", vport, "refused"], ["192.0.2.7", 80, "refused"]]
    assert reply.observed[0] == asker.announce[0].host
    lines = [r.getMessage() for r in caplog.records if "refused a dial-back" in r.getMessage()]
    assert len(lines) == 1 and "other IPs" in lines[0]
    assert helper.score(asker) < 100.0


async def test_requests_over_the_rate_are_refused_and_charged(
    pair: tuple[Peer, Peer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="valuemesh.discovery")
    asker, helper = pair
    own = [[a.host, a.port] for a in asker.announce]
    answered = [await _ask_raw(asker, helper, own) for _ in range(4)]  # bounded: four requests at once
    assert [len(r.results) for r in answered] == [1, 1, 0, 0]  # the burst of 2, then refusals
    assert answered[0].results[0][2] == REACHABLE
    assert len([r for r in caplog.records if "at most one per" in r.getMessage()]) == 1
    assert helper.score(asker) < 100.0


async def test_a_stranger_gets_no_dial_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="valuemesh.discovery")
    asker, helper = Peer(), Peer(shares=False)
    async with asyncio.timeout(DEADLINE):
        try:
            host, port = await asker.transport.start("127.0.0.1", 0)
            await helper.transport.start("127.0.0.1", 0)
            await asker.transport.connect(*helper.transport.address)  # type: ignore[misc]
            for _ in range(50):
                if helper.links:
                    break
                await asyncio.sleep(0.05)
            reply = await _ask_raw(asker, helper, [[host, port]])
        finally:
            for p in (asker, helper):
                await p.dialback.close()
                await p.transport.stop()
    assert reply.results == []
    assert [r for r in caplog.records if "shares no constellation" in r.getMessage()]
