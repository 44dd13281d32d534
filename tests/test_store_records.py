"""Tests of node/store/records.py: pending records until final, and seq reservation that never
hands out a seq twice, across restarts and concurrent callers.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from store_kit import (
    ALICE,
    BOB,
    C,
    blk,
    info,
    rec,
    store_fixture,  # noqa: F401  (pytest finds the "store" fixture by this import)
)

from valuemesh.node.store import CommitEntry, Store


async def test_pending_records_become_final_with_their_block(store: Store) -> None:
    mine = [rec(ALICE, i) for i in range(3)]
    async with store.batch() as tx:
        tx.put_records(mine, 1)
        tx.add_pending(C, [r.id for r in mine], 1)
    assert await store.pending(C) == mine
    assert await store.record_status(mine[0].id) == "pending"
    b = blk(BOB, 0, mine[:2])
    async with store.batch() as tx:
        tx.put_block(b, 2)
        tx.append_commits(C, [CommitEntry(0, b.id, 0)])
    assert await store.pending(C) == mine[2:]
    assert [await store.record_status(r.id) for r in mine] == ["final", "final", "pending"]
    assert await store.record_status(b"\x00" * 32) is None
    # A final record is never made pending again, e.g. by a replayed proposal.
    async with store.batch() as tx:
        tx.add_pending(C, [mine[0].id], 3)
    assert await store.pending(C) == mine[2:]
    async with store.batch() as tx:
        tx.remove_pending(C, [mine[2].id])
    assert await store.pending(C) == []


async def test_reserved_seqs_never_repeat_even_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    async with await Store.open(path) as s:
        async with s.batch() as tx:
            tx.put_constellation(info())
        assert await s.next_seq(C, ALICE.member) == 0
        got = [await s.reserve_seq(C, ALICE.member) for _ in range(3)]
        assert got == [0, 1, 2]
        # A record stored with a higher seq (e.g. restored from a peer) moves the counter on.
        async with s.batch() as tx:
            tx.put_records([rec(ALICE, 9)], 1)
        assert await s.next_seq(C, ALICE.member) == 10
        assert await s.next_seq(C, BOB.member) == 0
        concurrent = await asyncio.gather(*(s.reserve_seq(C, ALICE.member) for _ in range(5)))
        assert sorted(concurrent) == [10, 11, 12, 13, 14]
    async with await Store.open(path) as s:
        assert await s.reserve_seq(C, ALICE.member) == 15
