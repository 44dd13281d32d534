"""Joining through its own seam: a member's Joining and an invitee's Joining on their own
real stores, their sends wired to each other's handlers. The welcome comes before the join
record is taken, only the member asked can welcome or refuse, an unreachable inviter is
a plain error."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from nodefakes import FOUNDER, OTHER, FakeLink, Sent, Spawned, founded

from valuemesh.node.daemon import installed_registry
from valuemesh.node.engine import Engine
from valuemesh.node.joining import Joining
from valuemesh.node.messaging import Handlers
from valuemesh.node.store import Store
from valuemesh.protocol import messages as m
from valuemesh.protocol.errors import LocalError
from valuemesh.protocol.identity import Identity
from valuemesh.protocol.invite import Invite
from valuemesh.protocol.records import Record


def _invite(eng: Engine, *, ttl_ms: int = 3_600_000) -> Invite:
    return Invite.create(FOUNDER, constellation=eng.cid, name=eng.name, tier="contributor", roles=(), uses=1,
                         expires=int(time.time() * 1000) + ttl_ms, addrs=(("127.0.0.1", 1),), nonce=bytes(16))


def _join_record(inv: Invite, author: Identity = OTHER) -> Record:
    return Record.create(author, type="membership", v=1, constellation=inv.constellation, seq=0,
                         body={"op": "join", "token": inv.raw()}, created=int(time.time() * 1000))


class Invitee:
    """The invitee's Joining on its own store; `connect` gives the link to the member."""

    def __init__(self, store: Store, send: Any, connect: Any) -> None:
        self.forwarded: list[list[Record]] = []
        self.first_syncs: list[tuple[Engine, Any, Any]] = []
        self.spawned = Spawned()
        self.engines: dict[bytes, Engine] = {}

        async def forward(eng: Engine, recs: list[Record]) -> None:
            self.forwarded.append(recs)

        async def first_sync(eng: Engine, welcomer: Any, inviter: Any) -> None:
            self.first_syncs.append((eng, welcomer, inviter))

        self.joining = Joining(OTHER, store, self.engines, {}, send=send, spawn=self.spawned,
                               connect=connect, forward=forward, first_sync=first_sync,
                               new_engine=lambda g: Engine(store, installed_registry(), OTHER, g))


def _member(store: Store, eng: Engine, send: Any) -> Joining:
    async def unused(*args: Any) -> Any:
        raise AssertionError("a member answering a join request neither connects, forwards nor syncs")

    return Joining(FOUNDER, store, {eng.cid: eng}, {}, send=send, spawn=Spawned(), connect=unused,
                   forward=unused, first_sync=unused, new_engine=lambda g: eng)


async def test_it_takes_the_message_types_it_owns(tmp_path: Path) -> None:
    store, eng = await founded(tmp_path / "s.sqlite")
    try:
        handlers = Handlers()
        _member(store, eng, Sent()).register(handlers)
        assert handlers.types() == {m.JoinRequest, m.JoinReply, m.Refuse}
    finally:
        await store.close()


async def test_a_member_refuses_what_it_cannot_welcome(tmp_path: Path) -> None:
    store, eng = await founded(tmp_path / "s.sqlite")
    try:
        sent = Sent()
        member = _member(store, eng, sent)
        inv = _invite(eng)
        joiner = FakeLink(OTHER.member)
        await member.on_join_request(joiner, m.JoinRequest(inv.raw(), _join_record(inv, FOUNDER).raw))  # type: ignore[arg-type]
        other_inv = Invite.create(FOUNDER, constellation=bytes(32), name="x", tier="contributor", roles=(), uses=1,
                                  expires=inv.expires, addrs=(), nonce=bytes(16))
        await member.on_join_request(joiner, m.JoinRequest(other_inv.raw(), _join_record(other_inv).raw))  # type: ignore[arg-type]
        reasons = [x.reason for x in sent.to(joiner)]  # type: ignore[union-attr]
        assert reasons == ["The join record is not signed by the connecting member.",
                           "This node does not follow that constellation."]
        assert OTHER.member.key not in eng.applicants
    finally:
        await store.close()


async def test_an_invitee_joins_through_the_member_it_asked(tmp_path: Path) -> None:
    m_store, eng = await founded(tmp_path / "member.sqlite")
    i_store = await Store.open(tmp_path / "invitee.sqlite")
    try:
        at_member, at_invitee = FakeLink(OTHER.member), FakeLink(FOUNDER.member)  # each side's link to the other
        to_member: list[m.Message] = []
        member: Joining
        invitee: Invitee

        async def member_sends(link: Any, msg: m.Message) -> None:
            assert link is at_member
            await {m.JoinReply: invitee.joining.on_join_reply,
                   m.Refuse: invitee.joining.on_refuse}[type(msg)](at_invitee, msg)  # type: ignore[operator]

        async def invitee_sends(link: Any, msg: m.Message) -> None:
            assert link is at_invitee
            to_member.append(msg)
            if isinstance(msg, m.JoinRequest):
                await member.on_join_request(at_member, msg)  # type: ignore[arg-type]

        async def connect(host: str, port: int) -> Any:
            assert (host, port) == ("127.0.0.1", 1)
            return at_invitee

        member = _member(m_store, eng, member_sends)
        invitee = Invitee(i_store, invitee_sends, connect)
        inv = _invite(eng)
        doc = await invitee.joining.join(inv.text(), name="olga")
        assert doc["status"] == "pending" and doc["id"] == eng.text_id
        assert OTHER.member.key in eng.applicants  # welcomed first
        joined = invitee.engines[eng.cid]
        (record,) = joined.pending.values()
        assert record.body["name"] == "olga" and record.author == OTHER.member
        assert [type(x) for x in to_member] == [m.JoinRequest, m.SubmitRecords]  # the record, once welcomed
        assert to_member[1] == m.SubmitRecords(eng.cid, [record.raw])
        assert invitee.forwarded == [[record]]
        await invitee.spawned.settle()
        assert invitee.first_syncs == [(joined, at_invitee, FOUNDER.member)]
        assert await i_store.next_seq(eng.cid, OTHER.member) == record.seq + 1  # stored durably
        with pytest.raises(LocalError, match="already follows"):
            await invitee.joining.join(inv.text())
    finally:
        await m_store.close()
        await i_store.close()


async def test_only_the_member_asked_can_refuse_and_an_unreachable_inviter_is_a_plain_error(tmp_path: Path) -> None:
    m_store, eng = await founded(tmp_path / "member.sqlite")
    i_store = await Store.open(tmp_path / "invitee.sqlite")
    try:
        asked = FakeLink(FOUNDER.member)
        invitee: Invitee

        async def refuse(link: Any, msg: m.Message) -> None:
            await invitee.joining.on_refuse(FakeLink(FOUNDER.member), m.Refuse("not you"))  # type: ignore[arg-type]
            await invitee.joining.on_refuse(link, m.Refuse("the invite is used up"))

        async def connect(host: str, port: int) -> Any:
            return asked

        invitee = Invitee(i_store, refuse, connect)
        with pytest.raises(LocalError, match="refused the join: the invite is used up"):
            await invitee.joining.join(_invite(eng).text())
        assert invitee.engines == {}

        async def unreachable(host: str, port: int) -> Any:
            raise OSError("connection refused")

        invitee = Invitee(i_store, Sent(), unreachable)
        with pytest.raises(LocalError, match=r"No member could be reached to join \(tried 127.0.0.1:1\)"):
            await invitee.joining.join(_invite(eng).text())
        with pytest.raises(LocalError, match="expired"):
            await invitee.joining.join(_invite(eng, ttl_ms=-1000).text())
    finally:
        await m_store.close()
        await i_store.close()
