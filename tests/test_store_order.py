"""Tests of node/store/order.py: final records in ledger order (first commit wins, twins read
from their block) and the rebuild of the derived tables.
"""

from __future__ import annotations

import contextlib
import sqlite3

from store_kit import (
    ALICE,
    BOB,
    C,
    blk,
    rec,
    store_fixture,  # noqa: F401  (pytest finds the "store" fixture by this import)
)

from valuemesh.node.store import CommitEntry, Store


async def test_a_record_that_lost_its_slot_is_still_readable_when_final(store: Store) -> None:
    winner, loser = rec(ALICE, 0, {"v": 1}), rec(ALICE, 0, {"v": 2})
    b = blk(BOB, 0, [loser])
    async with store.batch() as tx:
        tx.put_records([winner], 1)
        tx.put_block(b, 1)
        tx.append_commits(C, [CommitEntry(0, b.id, 0)])
    assert len(tx.result.proofs) == 1
    [final] = await store.final_records(C)
    assert final.record.id == loser.id and final.record == loser


async def test_a_record_in_two_committed_blocks_is_final_once(store: Store) -> None:
    r = rec(ALICE, 0)
    b0, b1 = blk(ALICE, 0, [r]), blk(BOB, 0, [rec(BOB, 0), r])
    async with store.batch() as tx:
        tx.put_blocks([b0, b1], 1)
        tx.append_commits(C, [CommitEntry(0, b1.id, 0), CommitEntry(1, b0.id, 0)])
    finals = await store.final_records(C)
    assert [(f.commit_index, f.position, f.record.id) for f in finals] == [
        (0, 0, b1.records[0].id),
        (0, 1, r.id),
    ]


async def test_derived_tables_rebuild_from_blocks_and_commits(store: Store) -> None:
    r0, r1 = rec(ALICE, 0), rec(BOB, 0)
    b0, b1 = blk(ALICE, 0, [r0]), blk(BOB, 0, [r1, r0])
    async with store.batch() as tx:
        tx.put_blocks([b0, b1], 1)
        tx.append_commits(C, [CommitEntry(0, b1.id, 0), CommitEntry(1, b0.id, 0)])
    before = await store.final_records(C)
    with contextlib.closing(sqlite3.connect(store.path)) as db, db:
        db.execute("DELETE FROM final_records")
        db.execute("DELETE FROM block_records WHERE block_id = ?", (b1.id,))
    assert await store.final_records(C) == []
    await store.rebuild_derived()
    assert await store.final_records(C) == before
    assert [f.record.id for f in before] == [r1.id, r0.id]
