"""Gossip through its own seam: a real store and engine, fake links and a recording send.
Blocks wait while a checkpoint is fetched, data goes to members only, missing parents are
asked of the peer that sent the child, records go to core members in bounded batches."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from nodefakes import FOUNDER, OTHER, T0, FakeLink, Sent, Spawned, founded

from valuemesh.node import gossip as gossip_mod
from valuemesh.node.engine import Effects, Engine
from valuemesh.node.gossip import Gossip, sync_chunks
from valuemesh.node.messaging import Handlers
from valuemesh.node.store import Store
from valuemesh.node.verify import ParallelVerifier
from valuemesh.protocol import messages as m
from valuemesh.protocol.errors import RemoteError, ValuemeshError
from valuemesh.protocol.identity import MemberId
from valuemesh.protocol.records import Record

MEMBER = MemberId(bytes([101]) * 32)
STRANGER = MemberId(bytes([102]) * 32)
WORK = {"op": "record", "action": "work", "quantity": "1", "unit": "hour"}


def _gossip(store: Store, eng: Engine, links: dict[MemberId, FakeLink], *, fetching: bool = False,
            ) -> tuple[Gossip, Sent, Spawned, asyncio.Event]:
    sent, spawned, wake = Sent(), Spawned(), asyncio.Event()
    g = Gossip(store, {eng.cid: eng}, links, send=sent, verifier=ParallelVerifier(1),  # type: ignore[arg-type]
               spawn=spawned, wake=wake, fetching=lambda cid: fetching)
    return g, sent, spawned, wake


def test_chunks_are_bounded_by_count_and_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gossip_mod, "SYNC_BATCH", 3)
    monkeypatch.setattr(gossip_mod, "SYNC_BATCH_BYTES", 10)
    raws = [b"a" * 4, b"b" * 4, b"c" * 20, b"d", b"e", b"f", b"g"]
    chunks = list(sync_chunks(raws))
    assert [r for c in chunks for r in c] == raws  # every block once, in order
    assert chunks == [[b"a" * 4, b"b" * 4], [b"c" * 20], [b"d", b"e", b"f"], [b"g"]]


async def test_it_takes_the_message_types_it_owns(tmp_path: Path) -> None:
    store, eng = await founded(tmp_path / "s.sqlite")
    try:
        g, *_ = _gossip(store, eng, {})
        handlers = Handlers()
        g.register(handlers)
        assert handlers.types() == {m.Heads, m.Blocks, m.GetBlocks, m.SubmitRecords, m.Proof}
    finally:
        await store.close()


async def test_blocks_wait_while_a_checkpoint_is_fetched(tmp_path: Path) -> None:
    store, eng = await founded(tmp_path / "s.sqlite")
    try:
        eng.may_receive = lambda key: key == MEMBER  # type: ignore[method-assign]
        link = FakeLink(MEMBER)
        waiting, *_ = _gossip(store, eng, {}, fetching=True)
        await waiting.on_blocks(link, m.Blocks(eng.cid, [b"not a block"], 0))  # type: ignore[arg-type]
        taking, *_ = _gossip(store, eng, {})
        with pytest.raises(ValuemeshError):  # the same bytes are decoded when nothing is fetched
            await taking.on_blocks(link, m.Blocks(eng.cid, [b"not a block"], 0))  # type: ignore[arg-type]
    finally:
        await store.close()


async def test_data_of_a_constellation_we_do_not_share_is_refused(tmp_path: Path) -> None:
    store, eng = await founded(tmp_path / "s.sqlite")
    try:
        g, sent, spawned, _ = _gossip(store, eng, {})
        stranger = FakeLink(STRANGER)
        for msg in (m.Heads(eng.cid, 0, 0, []), m.GetBlocks(eng.cid, [bytes(32)]), m.Blocks(eng.cid, [], 0),
                    m.Heads(bytes(32), 0, 0, [])):
            with pytest.raises(RemoteError):
                await {m.Heads: g.on_heads, m.GetBlocks: g.on_get_blocks,
                       m.Blocks: g.on_blocks}[type(msg)](stranger, msg)  # type: ignore[arg-type,operator]
        assert sent.log == [] and spawned.tasks == []
    finally:
        await store.close()


async def test_effects_reach_members_only_and_ask_missing_parents_of_the_source(tmp_path: Path) -> None:
    store, eng = await founded(tmp_path / "s.sqlite")
    try:
        eng.may_receive = lambda key: key in (MEMBER, OTHER.member)  # type: ignore[method-assign]
        member, other, stranger = FakeLink(MEMBER), FakeLink(OTHER.member), FakeLink(STRANGER)
        links = {MEMBER: member, OTHER.member: other, STRANGER: stranger}
        g, sent, _, wake = _gossip(store, eng, links)  # type: ignore[arg-type]
        rec = Record.create(FOUNDER, type="contribution", v=1, constellation=eng.cid, seq=1, body=WORK,
                            created=T0 + 1)
        own = (await eng.submit([rec], T0 + 10)).blocks
        assert own
        missing = [bytes([9]) * 32]
        await g.effects(eng, Effects(blocks=own, missing=missing, request_sync=True), source=member)  # type: ignore[arg-type]
        for link in (member, other):  # each new block of ours, pushed to every member at once
            assert [x.blocks for x in link.messages() if isinstance(x, m.Blocks)] == [[b.raw] for b in own]
        assert stranger.sent == []
        asks = [(lk, x) for lk, x in sent.log if isinstance(x, m.GetBlocks)]
        assert asks == [(member, m.GetBlocks(eng.cid, missing))]  # the parent, of the peer that sent the child
        assert {lk for lk, x in sent.log if isinstance(x, m.Heads)} == {member, other}  # a sync asked of members
        assert wake.is_set() == (eng.next_tick is not None)
        sent.log.clear()
        await g.effects(eng, Effects(missing=missing))  # no source: every member is asked
        assert sorted(id(lk) for lk, _ in sent.log) == sorted([id(member), id(other)])
    finally:
        await store.close()


async def test_records_are_forwarded_to_core_members_in_bounded_batches(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    store, eng = await founded(tmp_path / "s.sqlite")
    try:
        core, other = FakeLink(FOUNDER.member), FakeLink(OTHER.member)
        g, sent, _, _ = _gossip(store, eng, {FOUNDER.member: core, OTHER.member: other})  # type: ignore[arg-type]
        monkeypatch.setattr(m, "MAX_BATCH", 2)
        recs = [Record.create(OTHER, type="contribution", v=1, constellation=eng.cid, seq=s, body=WORK,
                              created=T0 + s) for s in range(1, 6)]
        await g.forward(eng, recs)
        batches = sent.to(core)
        assert all(isinstance(x, m.SubmitRecords) for x in batches)
        assert [len(x.records) for x in batches] == [2, 2, 1]  # type: ignore[union-attr]
        assert [r for x in batches for r in x.records] == [r.raw for r in recs]  # type: ignore[union-attr]
        assert sent.to(other) == []  # not core
    finally:
        await store.close()


async def test_a_new_stream_to_a_peer_replaces_its_older_one(tmp_path: Path) -> None:
    store, eng = await founded(tmp_path / "s.sqlite")
    try:
        g, _, spawned, _ = _gossip(store, eng, {})
        link = FakeLink(MEMBER)
        g.start_stream(link, eng, 0, 0, {})  # type: ignore[arg-type]
        g.start_stream(link, eng, 0, 0, {})  # type: ignore[arg-type]
        first, second = spawned.tasks
        await asyncio.gather(first, second, return_exceptions=True)
        assert first.cancelled() and not second.cancelled()
        assert g.streams == {}  # a finished stream is forgotten
    finally:
        await store.close()
