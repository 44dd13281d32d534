"""The handler table on its own: one handler per type, found by the message's exact type;
an unknown type is a RemoteError; a second handler for a type is a programming error."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from nodefakes import FakeLink

from valuemesh.node.messaging import Handlers, NotYetKnown, engine_for_peer, send
from valuemesh.protocol import messages as m
from valuemesh.protocol.errors import RemoteError
from valuemesh.protocol.identity import MemberId


async def test_dispatch_calls_the_handler_of_the_exact_type() -> None:
    got: list[tuple[str, Any]] = []

    async def on_refuse(link: Any, msg: m.Refuse) -> None:
        got.append(("refuse", msg))

    async def on_hello(link: Any, msg: m.Hello) -> None:
        got.append(("hello", msg))

    handlers = Handlers()
    handlers.add(m.Refuse, on_refuse)
    handlers.add(m.Hello, on_hello)
    link = FakeLink()
    await handlers.dispatch(link, m.Refuse("no"))  # type: ignore[arg-type]
    await handlers.dispatch(link, m.Hello([], 1, "v"))  # type: ignore[arg-type]
    assert got == [("refuse", m.Refuse("no")), ("hello", m.Hello([], 1, "v"))]
    with pytest.raises(RemoteError, match="does not take 'pex' messages"):
        await handlers.dispatch(link, m.PeerExchange([]))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        handlers.add(m.Refuse, on_refuse)
    assert handlers.types() == {m.Refuse, m.Hello}


async def test_send_drops_what_a_closed_link_refuses() -> None:
    class Broken(FakeLink):
        async def send(self, payload: bytes) -> None:
            raise ConnectionError("gone")

    await send(Broken(), m.Refuse("no"))  # type: ignore[arg-type]
    link = FakeLink()
    await send(link, m.Refuse("no"))  # type: ignore[arg-type]
    assert link.messages() == [m.Refuse("no")]


def test_a_peer_gets_only_engines_it_shares() -> None:
    member, other = MemberId(bytes([1]) * 32), MemberId(bytes([2]) * 32)

    me = MemberId(bytes([3]) * 32)

    class Eng:
        identity = SimpleNamespace(member=me)
        mine = "active"
        ledger = SimpleNamespace(member_status=lambda key: Eng.mine if key == me.key else "unknown")

        def may_receive(self, key: MemberId) -> bool:
            return key == member

    engines: dict[bytes, Any] = {b"c": Eng()}
    assert engine_for_peer(engines, FakeLink(member), b"c") is engines[b"c"]  # type: ignore[arg-type]
    for cid, remote in ((b"c", other), (b"x", member)):  # not its member; not a constellation we follow
        with pytest.raises(RemoteError):
            engine_for_peer(engines, FakeLink(remote), cid)  # type: ignore[arg-type]
    # While our own join is not final here, a key we do not know yet may be a member who
    # joined before us: ignored, not charged. A constellation we do not follow still is.
    Eng.mine = "applicant"
    with pytest.raises(NotYetKnown):
        engine_for_peer(engines, FakeLink(other), b"c")  # type: ignore[arg-type]
    with pytest.raises(RemoteError):
        engine_for_peer(engines, FakeLink(other), b"x")  # type: ignore[arg-type]
