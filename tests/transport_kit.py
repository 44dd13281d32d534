"""Shared helpers of the transport and relay tests: a recording LinkHandler, a cluster of
transports on 127.0.0.1 stopped at the end, bounded polling, a message each way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

from valuemesh.node.link import PeerLink
from valuemesh.node.link_limits import Limits
from valuemesh.node.transport import Transport
from valuemesh.protocol.errors import ValidationError
from valuemesh.protocol.identity import Identity, MemberId

DEADLINE = 30.0
NET = b"valuemesh-test"

FAST = Limits(
    handshake_timeout=3.0,
    connect_timeout=5.0,
    ping_interval=0.5,
    idle_timeout=5.0,
    send_timeout=2.0,
    close_timeout=1.0,
    duplicate_probe_timeout=1.0,
)


def ident() -> Identity:
    return Identity(os.urandom(32))


class Recorder:
    """A LinkHandler that records everything and can be told to refuse or stall."""

    def __init__(self, allow: set[MemberId] | None = None) -> None:
        self.allow = allow
        self.messages: asyncio.Queue[tuple[MemberId, bytes]] = asyncio.Queue()
        self.events: list[tuple[str, MemberId, str]] = []
        self.changed = asyncio.Event()
        self.stall: asyncio.Event | None = None
        self.invalid_prefix: bytes | None = None

    def authorize(self, remote: MemberId, inbound: bool) -> bool:
        return self.allow is None or remote in self.allow

    async def on_connect(self, link: PeerLink) -> None:
        self.events.append(("connect", link.remote, ""))
        self.changed.set()

    async def on_message(self, link: PeerLink, payload: bytes) -> None:
        if self.stall is not None:
            await self.stall.wait()
        if self.invalid_prefix is not None and payload.startswith(self.invalid_prefix):
            raise ValidationError("The message breaks a rule.")
        await self.messages.put((link.remote, payload))

    async def on_disconnect(self, link: PeerLink, reason: str) -> None:
        self.events.append(("disconnect", link.remote, reason))
        self.changed.set()

    def count(self, kind: str, who: MemberId) -> int:
        return sum(1 for k, m, _ in self.events if k == kind and m == who)


@dataclass
class Node:
    identity: Identity
    handler: Recorder
    transport: Transport
    addr: tuple[str, int]

    @property
    def member(self) -> MemberId:
        return self.identity.member


class Cluster:
    def __init__(self) -> None:
        self.nodes: list[Node] = []

    async def node(
        self,
        *,
        net: bytes = NET,
        limits: Limits = FAST,
        identity: Identity | None = None,
        allow: set[MemberId] | None = None,
        clock: object = None,
    ) -> Node:
        identity = identity or ident()
        handler = Recorder(allow)
        kwargs = {} if clock is None else {"clock": clock}
        t = Transport(identity, net, handler, limits=limits, **kwargs)  # type: ignore[arg-type]
        addr = await t.start("127.0.0.1", 0)
        n = Node(identity, handler, t, addr)
        self.nodes.append(n)
        return n

    async def stop(self) -> None:
        await asyncio.gather(*(n.transport.stop() for n in self.nodes))


@contextlib.asynccontextmanager
async def running_cluster() -> AsyncIterator[Cluster]:
    """A cluster under the test deadline, every transport stopped at the end."""
    c = Cluster()
    try:
        async with asyncio.timeout(DEADLINE):
            yield c
    finally:
        async with asyncio.timeout(DEADLINE):
            await c.stop()


async def until(pred: object, what: str, timeout: float = 10.0) -> None:
    """Poll a condition (bounded in time and count) for state set by other tasks."""
    for _ in range(int(timeout / 0.01)):
        if pred():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for: {what}")


async def recv(node: Node, timeout: float = 5.0) -> tuple[MemberId, bytes]:
    async with asyncio.timeout(timeout):
        return await node.handler.messages.get()


async def exchange(a: Node, b: Node, tag: bytes) -> None:
    """Assert the live link a↔b carries a message each way."""
    la, lb = a.transport.link(b.member), b.transport.link(a.member)
    assert la is not None and lb is not None and not la.closed and not lb.closed
    await la.send(b"a>" + tag)
    assert await recv(b) == (a.member, b"a>" + tag)
    await lb.send(b"b>" + tag)
    assert await recv(a) == (b.member, b"b>" + tag)
