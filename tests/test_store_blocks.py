"""Tests of node/store/blocks.py (and the stored-bytes checks of codec.py): block queries,
paging by count and bytes, raw reads for peers, per-epoch heads, corruption reported.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest
from store_kit import (
    ALICE,
    BOB,
    OTHER_C,
    C,
    blk,
    info,
    rec,
    store_fixture,  # noqa: F401  (pytest finds the "store" fixture by this import)
)

from valuemesh.node.store import CommitEntry, Store, StoreError, blocks
from valuemesh.protocol.identity import Identity
from valuemesh.protocol.records import Block


async def test_block_queries_heads_and_paging(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    rounds: dict[int, list[Block]] = {}
    parents: list[bytes] = []
    for rnd in range(5):
        rounds[rnd] = [blk(a, rnd, [rec(a, rnd)], parents=parents) for a in (ALICE, BOB)]
        parents = [b.id for b in rounds[rnd]]
    everything = [b for rnd in range(5) for b in rounds[rnd]]
    async with store.batch() as tx:
        tx.put_blocks(list(reversed(everything)), 1)
    want = sorted(everything, key=lambda b: (b.round, b.author.key, b.id))
    assert await store.blocks(C) == want
    assert await store.blocks(C, from_round=1, to_round=2) == [b for b in want if 1 <= b.round <= 2]
    assert await store.blocks(C, from_round=3, author=BOB.member) == [
        b for b in want if b.round >= 3 and b.author == BOB.member
    ]
    assert await store.blocks(C, limit=3) == want[:3]
    assert [b async for b in store.iter_blocks(C, page=3)] == want
    assert [b async for b in store.iter_blocks(C, from_round=4, page=1)] == want[-2:]
    # Byte budgets cut pages early but never lose or reorder a block.
    assert await store.blocks(C, max_bytes=1) == want[:1]
    two = len(want[0].raw) + len(want[1].raw)
    assert await store.blocks(C, max_bytes=two) == want[:2]
    assert await store.blocks(C, max_bytes=two + 1) == want[:3]
    monkeypatch.setattr(blocks, "MAX_PAGE_BYTES", 1)
    assert [b async for b in store.iter_blocks(C, page=4)] == want
    assert await store.heads(C) == {(ALICE.member, 0): 4, (BOB.member, 0): 4}
    carol = Identity(bytes([3]) * 32)
    async with store.batch() as tx:
        tx.put_blocks([blk(carol, 1, []), blk(carol, 7, [])], 1)
    assert await store.heads(C) == {(ALICE.member, 0): 4, (BOB.member, 0): 4, (carol.member, 0): 7}
    assert await store.heads(OTHER_C) == {}
    # Rounds restart with each epoch: heads are per (author, epoch), and a floor skips closed epochs.
    async with store.batch() as tx:
        tx.put_blocks([blk(carol, 3, [], epoch=1), blk(ALICE, 2, [], epoch=2)], 1)
    assert await store.heads(C) == {(ALICE.member, 0): 4, (BOB.member, 0): 4, (carol.member, 0): 7,
                                    (carol.member, 1): 3, (ALICE.member, 2): 2}
    assert await store.heads(C, 1) == {(carol.member, 1): 3, (ALICE.member, 2): 2}
    assert await store.heads(C, 3) == {}
    assert [b.round async for b in store.iter_blocks(C, from_round=2, epoch=1)] == [3]
    assert [(b.epoch, b.round) async for b in store.iter_blocks(C, from_round=4, epoch=0)] == [(0, 4), (0, 4), (0, 7)]
    # The raw form (for relaying) walks the same blocks in the same order, with their stored bytes.
    for kw in ({}, {"from_round": 2, "epoch": 1}, {"from_round": 4, "epoch": 0}, {"from_round": 3}):
        decoded = [b async for b in store.iter_blocks(C, page=2, **kw)]  # type: ignore[arg-type]
        raw = [b async for b in store.iter_raw_blocks(C, page=2, **kw)]  # type: ignore[arg-type]
        assert [(b.epoch, b.author, b.round, b.raw) for b in decoded] == \
            [(b.epoch, b.author, b.round, b.raw) for b in raw]
    assert await store.get_block(want[3].id) == want[3]
    assert await store.get_block(b"\x00" * 32) is None
    got = await store.get_blocks([want[0].id, b"\x00" * 32])
    assert list(got) == [want[0].id]
    # Raw, for a peer's request by id: in the order asked, each once, unknown ids and other
    # constellations' blocks left out.
    asked = [want[4].id, b"\x00" * 32, want[1].id, want[4].id]
    assert await store.get_raw_blocks(C, asked) == [want[4].raw, want[1].raw]
    assert await store.get_raw_blocks(b"\x01" * 32, asked) == []
    recs = await store.get_records([b.records[0].id for b in want])
    assert len(recs) == len(want)

    async with store.batch() as tx:
        tx.append_commits(C, [CommitEntry(i, b.id, b.round) for i, b in enumerate(want)])
    assert [e.block_id for e in await store.commits(C, start=4, limit=2)] == [want[4].id, want[5].id]
    assert [e.index async for e in store.iter_commits(C, page=3)] == list(range(len(want)))
    assert [f.commit_index for f in await store.final_records(C, start=8)] == [8, 9]


async def test_corrupt_stored_bytes_are_reported_not_returned(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    b = blk(ALICE, 0, [rec(ALICE, 0)])
    async with await Store.open(path) as s:
        async with s.batch() as tx:
            tx.put_constellation(info())
            tx.put_block(b, 1)
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        # Corruption comes from below SQLite (disk, other tools), so step around the triggers.
        db.execute("DROP TRIGGER blocks_are_immutable")
        db.execute("DROP TRIGGER records_are_immutable")
        db.execute("UPDATE blocks SET raw = ? WHERE id = ?", (blk(ALICE, 1, []).raw, b.id))
        db.execute("UPDATE records SET raw = x'00'")
    async with await Store.open(path) as s:
        with pytest.raises(StoreError, match="does not match its id"):
            await s.get_block(b.id)
        with pytest.raises(StoreError, match="unreadable"):
            await s.get_record(b.records[0].id)
