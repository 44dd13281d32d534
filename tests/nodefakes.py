"""Fakes for testing the node's collaborators through their own seams: a peer link that
records what it is sent, a send callable, a spawn that runs tasks the test awaits, and a
founder's engine on a real store in tmp_path."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from valuemesh.node.daemon import installed_registry
from valuemesh.node.engine import Engine
from valuemesh.node.store import Store
from valuemesh.protocol import messages as m
from valuemesh.protocol.builtin.membership import make_genesis
from valuemesh.protocol.identity import Identity, MemberId
from valuemesh.protocol.records import Record

FOUNDER = Identity(bytes([5]) * 32)
OTHER = Identity(bytes([7]) * 32)
T0 = 1_795_000_000_000


class FakeLink:
    """What the collaborators use of a peer link; records what it is sent and its penalties."""

    def __init__(self, remote: MemberId | None = None) -> None:
        self.remote = remote if remote is not None else MemberId(bytes([100]) * 32)
        self.closed = False
        self.read_at = 0.0
        self.addr = ("127.0.0.1", 1)
        self.sent: list[bytes] = []
        self.penalties: list[tuple[float, str]] = []

    async def send(self, payload: bytes) -> None:
        self.sent.append(payload)

    def penalize(self, points: float, reason: str) -> None:
        self.penalties.append((points, reason))

    def messages(self) -> list[m.Message]:
        return [m.decode_message(p) for p in self.sent]


class Sent:
    """A send callable that records (link, message) instead of encoding."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, m.Message]] = []

    async def __call__(self, link: Any, msg: m.Message) -> None:
        self.log.append((link, msg))

    def to(self, link: Any) -> list[m.Message]:
        return [msg for lk, msg in self.log if lk is link]


class Spawned:
    """A spawn callable that keeps its tasks for the test to await."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[None]] = []

    def __call__(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self.tasks.append(task)
        return task

    async def settle(self) -> None:
        await asyncio.gather(*self.tasks)


def genesis(founder: Identity = FOUNDER, name: str = "bakery") -> Record:
    registry = installed_registry()
    return make_genesis(founder, name=name, purpose="", nonce=bytes(16), created=T0,
                        plugins={n: str(p.version) for n, p in registry.plugins.items()})


async def founded(path: Path, identity: Identity = FOUNDER) -> tuple[Store, Engine]:
    """A store at `path` holding FOUNDER's constellation, and `identity`'s engine of it."""
    store = await Store.open(path)
    eng = Engine(store, installed_registry(), identity, genesis())
    async with store.batch() as tx:
        tx.put_constellation(eng.info())
        tx.put_records([eng.genesis], T0)
    await eng.load()
    return store, eng
