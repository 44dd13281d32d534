"""Catch-up through its own seam: a real store and engine, fake links, a send that can
answer as the peer would. Unasked answers are refused, a snapshot is taken only part by
part as asked, a silent peer costs a bounded wait, a stuck engine skips ahead once per stall."""

from __future__ import annotations

from collections.abc import Coroutine
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from nodefakes import OTHER, FakeLink, Sent, founded

from valuemesh.node import catchup as catchup_mod
from valuemesh.node.catchup import SKIP_AHEAD_EPOCHS, SKIP_AHEAD_STALL_S, Catchup
from valuemesh.node.engine import Effects, Engine
from valuemesh.node.messaging import Handlers
from valuemesh.node.store import Store
from valuemesh.protocol import messages as m
from valuemesh.protocol.errors import RemoteError
from valuemesh.protocol.identity import MemberId

MEMBER = MemberId(bytes([101]) * 32)


class Kept:
    """A spawn that keeps what it was asked to run, without running it."""

    def __init__(self) -> None:
        self.coros: list[Coroutine[Any, Any, None]] = []

    def __call__(self, coro: Coroutine[Any, Any, None]) -> Any:
        self.coros.append(coro)
        coro.close()
        return None


def _catchup(store: Store, engines: dict[bytes, Any], links: dict[MemberId, FakeLink], send: Any,
             spawn: Any = None) -> tuple[Catchup, list[tuple[Any, Engine]]]:
    heads: list[tuple[Any, Engine]] = []

    async def send_heads(link: Any, eng: Engine) -> None:
        heads.append((link, eng))

    async def effects(eng: Engine, eff: Effects) -> None:
        pass

    c = Catchup(store, engines, links, send=send, spawn=spawn or Kept(),  # type: ignore[arg-type]
                hello=lambda: m.Hello([], 7470, "test"), send_heads=send_heads, effects=effects)
    return c, heads


async def test_it_takes_the_message_types_it_owns(tmp_path: Path) -> None:
    store, eng = await founded(tmp_path / "s.sqlite")
    try:
        c, _ = _catchup(store, {eng.cid: eng}, {}, Sent())
        handlers = Handlers()
        c.register(handlers)
        assert handlers.types() == {m.CheckpointSig, m.GetCheckpoint, m.CheckpointChain, m.GetSnapshot,
                                    m.SnapshotPart}
    finally:
        await store.close()


async def test_answers_nobody_asked_for_are_refused(tmp_path: Path) -> None:
    store, eng = await founded(tmp_path / "s.sqlite")
    try:
        eng.may_receive = lambda key: key == MEMBER  # type: ignore[method-assign]
        c, _ = _catchup(store, {eng.cid: eng}, {}, Sent())
        link = FakeLink(MEMBER)
        with pytest.raises(RemoteError, match="nobody asked"):
            await c.on_checkpoint_chain(link, m.CheckpointChain(eng.cid, [], 0, 0))  # type: ignore[arg-type]
        with pytest.raises(RemoteError, match="nobody asked"):
            await c.on_snapshot_part(link, m.SnapshotPart(eng.cid, 1, 0, b"x", 1))  # type: ignore[arg-type]
        with pytest.raises(RemoteError, match="does not hold"):
            await c.on_get_snapshot(link, m.GetSnapshot(eng.cid, 1, 0))  # type: ignore[arg-type]
        with pytest.raises(RemoteError, match="does not follow"):
            await c.on_checkpoint_sig(link, m.CheckpointSig(bytes(32), b""))  # type: ignore[arg-type]
    finally:
        await store.close()


async def test_a_snapshot_comes_part_by_part_from_the_peer_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 ) -> None:
    store, eng = await founded(tmp_path / "s.sqlite")
    data = bytes(range(256)) * 5
    monkeypatch.setattr(m, "SNAPSHOT_CHUNK", 300)
    try:
        peer, stranger = FakeLink(MEMBER), FakeLink(OTHER.member)
        asked: list[m.GetSnapshot] = []
        c: Catchup

        async def answer(link: Any, msg: m.Message) -> None:  # the peer answers each request at once
            assert link is peer and isinstance(msg, m.GetSnapshot)
            asked.append(msg)
            with pytest.raises(RemoteError):  # the same part from another link is not taken
                await c.on_snapshot_part(stranger, m.SnapshotPart(eng.cid, 3, msg.offset, b"", len(data)))  # type: ignore[arg-type]
            await c.on_snapshot_part(link, m.SnapshotPart(eng.cid, 3, msg.offset, data[msg.offset:msg.offset + 300],
                                                          len(data)))

        c, _ = _catchup(store, {eng.cid: eng}, {}, answer)
        assert await c.fetch_snapshot(peer, eng.cid, 3, len(data)) == data  # type: ignore[arg-type]
        assert [a.offset for a in asked] == [0, 300, 600, 900, 1200]

        async def wrong(link: Any, msg: m.Message) -> None:
            await c.on_snapshot_part(link, m.SnapshotPart(eng.cid, 3, 1, b"x", len(data)))

        c, _ = _catchup(store, {eng.cid: eng}, {}, wrong)
        with pytest.raises(RemoteError, match="other than the one asked"):
            await c.fetch_snapshot(peer, eng.cid, 3, len(data))  # type: ignore[arg-type]
    finally:
        await store.close()


async def test_a_silent_or_empty_handed_peer_gives_no_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 ) -> None:
    store, eng = await founded(tmp_path / "s.sqlite")
    monkeypatch.setattr(catchup_mod, "CHECKPOINT_TIMEOUT_S", 0.05)
    try:
        peer = FakeLink(MEMBER)
        sent = Sent()
        c, _ = _catchup(store, {eng.cid: eng}, {}, sent)
        assert await c.fetch_checkpoint(peer, eng, 0, "still behind") is None  # type: ignore[arg-type]
        assert sent.to(peer) == [m.GetCheckpoint(eng.cid)]
        assert not c.fetching(eng.cid)
        seen: list[bool] = []

        async def no_chain(link: Any, msg: m.Message) -> None:
            seen.append(c.fetching(eng.cid))  # blocks of the constellation wait meanwhile
            await c.on_checkpoint_chain(link, m.CheckpointChain(eng.cid, [], 0, 0))

        c, _ = _catchup(store, {eng.cid: eng}, {}, no_chain)
        assert await c.fetch_checkpoint(peer, eng, 0, "still behind") is None  # type: ignore[arg-type]
        assert seen == [True] and not c.fetching(eng.cid)
    finally:
        await store.close()


async def test_a_stuck_engine_skips_ahead_once_per_stall(tmp_path: Path) -> None:
    store, _ = await founded(tmp_path / "s.sqlite")
    try:
        eng = SimpleNamespace(cid=b"c" * 32, loading=False, commit_index=5, may_receive=lambda key: key == MEMBER,
                              consensus=SimpleNamespace(epoch=1, epoch_seen=1 + SKIP_AHEAD_EPOCHS))
        kept = Kept()
        c, _ = _catchup(store, {eng.cid: eng}, {MEMBER: FakeLink(MEMBER)}, Sent(), kept)
        c.check_stuck(eng, 100.0)  # type: ignore[arg-type]
        c.check_stuck(eng, 100.0 + SKIP_AHEAD_STALL_S / 2)  # type: ignore[arg-type]
        assert kept.coros == []  # not stalled long enough yet
        c.check_stuck(eng, 100.0 + SKIP_AHEAD_STALL_S)  # type: ignore[arg-type]
        assert len(kept.coros) == 1
        c.check_stuck(eng, 100.0 + SKIP_AHEAD_STALL_S + 1)  # type: ignore[arg-type]
        assert len(kept.coros) == 1  # the next try waits a full stall again
        eng.commit_index = 6  # progress restarts the clock
        c.check_stuck(eng, 100.0 + 2 * SKIP_AHEAD_STALL_S + 1)  # type: ignore[arg-type]
        assert len(kept.coros) == 1
        eng.consensus.epoch_seen = eng.consensus.epoch + 1  # not far enough ahead to be stuck
        c.check_stuck(eng, 1000.0)  # type: ignore[arg-type]
        assert len(kept.coros) == 1
    finally:
        await store.close()


async def test_a_newcomer_without_a_welcomer_says_hello_and_asks_members_and_inviter(tmp_path: Path) -> None:
    store, eng = await founded(tmp_path / "s.sqlite")
    try:
        eng.may_receive = lambda key: key == MEMBER  # type: ignore[method-assign]
        member, inviter, stranger = FakeLink(MEMBER), FakeLink(OTHER.member), FakeLink(MemberId(bytes([9]) * 32))
        sent = Sent()
        links = {MEMBER: member, OTHER.member: inviter, stranger.remote: stranger}
        c, heads = _catchup(store, {eng.cid: eng}, links, sent)
        await c.first_sync(eng, None, OTHER.member)
        assert all(sent.to(lk) == [m.Hello([], 7470, "test")] for lk in (member, inviter, stranger))
        assert [lk for lk, _ in heads] == [member, inviter]
    finally:
        await store.close()


async def test_a_strangers_checkpoint_signature_is_refused_before_it_is_checked(tmp_path: Path) -> None:
    """The signer is checked against the epoch's committee first: a stranger's signature costs
    no verification (this one is not even valid), and the refusal is the sender's fault."""
    from dataclasses import replace

    from valuemesh.protocol.consensus import Checkpoint, Content
    from valuemesh.protocol.errors import AuthorizationError
    from valuemesh.protocol.identity import Identity

    store, eng = await founded(tmp_path / "s.sqlite")
    try:
        c, _ = _catchup(store, {eng.cid: eng}, {}, Sent())
        content = Content(eng.cid, 0, 3, 3, b"\x01" * 32, b"\x02" * 32, b"\x03" * 32)
        cp = replace(Checkpoint.create(Identity(b"\x09" * 32), content), sig=b"\x00" * 64)
        with pytest.raises(AuthorizationError, match="not a core member"):
            await c.on_checkpoint_sig(FakeLink(OTHER), m.CheckpointSig(eng.cid, cp.encode()))  # type: ignore[arg-type]
    finally:
        await store.close()
