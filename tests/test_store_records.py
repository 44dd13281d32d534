"""Tests of node/store/records.py: pending records until final, and seq reservation that never
hands out a seq twice, across restarts and concurrent callers.
"""

from __future__ import annotations

import asyncio
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

from valuemesh.node.store import CommitEntry, Store
from valuemesh.protocol.errors import LocalError


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


async def test_a_seq_floor_only_rises_and_no_seq_is_given_out_below_it(store: Store) -> None:
    """The home's floor (node/held.py) for a store that holds less than the member signed."""
    async with store.batch() as tx:
        tx.put_records([rec(ALICE, 0), rec(ALICE, 1)], 1)
    assert await store.own_seq(C, ALICE.member) == (2, 0)
    await store.raise_seq_floor(C, ALICE.member, 7)
    await store.raise_seq_floor(C, ALICE.member, 5)  # never lowered
    assert await store.own_seq(C, ALICE.member) == (2, 7)
    assert await store.next_seq(C, ALICE.member) == 7
    assert await store.reserve_seq(C, ALICE.member) == 7
    assert await store.own_seq(C, ALICE.member) == (8, 7)  # the reservation is held now
    assert await store.next_seq(C, BOB.member) == 0
    await store.raise_seq_floor(OTHER_C, ALICE.member, 3)  # a constellation not (yet) followed again
    assert await store.next_seq(OTHER_C, ALICE.member) == 3
    with pytest.raises(LocalError):
        await store.raise_seq_floor(C, ALICE.member, -1)
