"""Tests of node/store/core.py, groupcommit.py and connection.py: one process per database,
group commit (atomic per batch, inline or on the writer thread, cancellation), a full disk, closing.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from store_kit import (
    ALICE,
    BOB,
    C,
    blk,
    info,
    rec,
    store_fixture,  # noqa: F401  (pytest finds the "store" fixture by this import)
)

from valuemesh.node.store import (
    SCHEMA_VERSION,
    CommitEntry,
    FinalOrderError,
    PeerInfo,
    Store,
    StoreError,
    StoreInUseError,
    groupcommit,
)
from valuemesh.protocol.records import Block


async def test_one_process_at_a_time_may_open_a_database(tmp_path: Path) -> None:
    path = tmp_path / "x.sqlite"
    first = await Store.open(path)
    try:
        # Typed, so the CLI can tell a running daemon from a broken database; still a StoreError.
        with pytest.raises(StoreInUseError, match="in use") as refused:
            await Store.open(path)
        assert isinstance(refused.value, StoreError)
    finally:
        await first.close()
    async with await Store.open(path) as again:
        assert await again.schema_version() == SCHEMA_VERSION


async def test_concurrent_batches_are_serialised(store: Store) -> None:
    blocks = [blk(ALICE, r, [rec(ALICE, r)]) for r in range(20)]

    async def write(b: Block) -> None:
        async with store.batch() as tx:
            tx.put_block(b, 1)

    await asyncio.gather(*(write(b) for b in blocks))
    assert await store.block_count(C) == 20
    async with store.batch(durable=False) as tx:
        tx.put_peer(PeerInfo(BOB.member, "127.0.0.1", 4000, "mdns", 5))
    assert len(await store.peers()) == 1


async def test_group_commit_keeps_each_batch_atomic(store: Store) -> None:
    blocks = [blk(ALICE, r, [rec(ALICE, r)]) for r in range(12)]

    async def write(i: int) -> None:
        async with store.batch() as tx:
            tx.put_block(blocks[i], 1)
            if i == 5:
                tx.append_commits(C, [CommitEntry(3, blocks[i].id, 5)])  # a gap: this batch fails

    results = await asyncio.gather(*(write(i) for i in range(12)), return_exceptions=True)
    assert [i for i, r in enumerate(results) if r is not None] == [5]
    assert isinstance(results[5], FinalOrderError)
    assert await store.has_blocks([b.id for b in blocks]) == {b.id for i, b in enumerate(blocks) if i != 5}


async def test_batches_queued_behind_the_writer_share_one_transaction_and_stay_atomic(store: Store) -> None:
    blocks = [blk(ALICE, r, [rec(ALICE, r)]) for r in range(12)]

    async def write(i: int) -> None:
        async with store.batch() as tx:
            tx.put_block(blocks[i], 1)
            if i == 5:
                tx.append_commits(C, [CommitEntry(3, blocks[i].id, 5)])  # a gap: this batch fails

    async with store._write_lock:  # all twelve queue, so one group commit takes them together
        tasks = [asyncio.create_task(write(i)) for i in range(12)]
        for _ in range(10):
            await asyncio.sleep(0)
        assert len(store._queue) == 12
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert [i for i, r in enumerate(results) if r is not None] == [5]
    assert isinstance(results[5], FinalOrderError)
    assert await store.has_blocks([b.id for b in blocks]) == {b.id for i, b in enumerate(blocks) if i != 5}


def big_block(rnd: int) -> Block:
    """A block with more items than a group commit runs inline: it goes to the writer thread."""
    n = groupcommit.INLINE_MAX_ITEMS + 1
    return blk(ALICE, rnd, [rec(ALICE, rnd * 1000 + i) for i in range(n)])


async def test_a_large_batch_runs_on_the_writer_thread_all_or_nothing(store: Store) -> None:
    good, bad = big_block(1), big_block(2)
    async with store.batch() as tx:
        tx.put_block(good, 1)
    with pytest.raises(FinalOrderError):
        async with store.batch() as tx:
            tx.put_block(bad, 1)
            tx.append_commits(C, [CommitEntry(3, bad.id, 2)])  # a gap: the whole batch is undone
    assert await store.has_blocks([good.id, bad.id]) == {good.id}
    assert len(await store.get_records([r.id for r in good.records])) == len(good.records)
    assert await store.get_records([r.id for r in bad.records]) == {}


async def test_an_urgent_durable_batch_commits_on_the_loop_all_or_nothing(store: Store) -> None:
    good, bad = blk(ALICE, 1, [rec(ALICE, 1)]), blk(ALICE, 2, [rec(ALICE, 2)])
    async with store.batch(urgent=True) as tx:
        tx.put_block(good, 1)
    with pytest.raises(FinalOrderError):
        async with store.batch(urgent=True) as tx:
            tx.put_block(bad, 1)
            tx.append_commits(C, [CommitEntry(3, bad.id, 2)])  # a gap: the whole batch is undone
    assert await store.has_blocks([good.id, bad.id]) == {good.id}
    async with store.batch() as tx:  # then a durable batch on the writer thread, same connection
        tx.put_kv("after", b"1")
    assert await store.get_kv("after") == b"1"


async def test_a_batch_cancelled_while_its_transaction_runs_is_committed_all_the_same(store: Store) -> None:
    b = big_block(1)

    async def write() -> None:
        async with store.batch() as tx:
            tx.put_block(b, 1)

    task = asyncio.create_task(write())
    await asyncio.sleep(0)  # the batch is handed to the writer thread; from here it runs to its end
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await store.has_blocks([b.id]) == {b.id}
    async with store.batch() as tx:  # the writer is free again, and in a known sync mode
        tx.put_kv("after", b"1")
    assert await store.get_kv("after") == b"1"


async def test_a_cancelled_batch_that_never_ran_leaves_no_trace(store: Store) -> None:
    b = blk(ALICE, 0, [rec(ALICE, 0)])

    async def write() -> None:
        async with store.batch() as tx:
            tx.put_block(b, 1)

    async with store._write_lock:  # hold the writer so the batch has to queue
        task = asyncio.create_task(write())
        for _ in range(10):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    async with store.batch() as tx:
        tx.put_kv("after", b"1")
    assert await store.block_count(C) == 0
    assert await store.get_kv("after") == b"1"


async def test_a_full_disk_fails_the_batch_and_the_store_recovers(store: Store) -> None:
    small = blk(ALICE, 0, [rec(ALICE, 0)])
    async with store.batch() as tx:
        tx.put_block(small, 1)
    pages = int((await store._writer.execute_fetchall("PRAGMA page_count"))[0][0])
    # Cap the file a few pages above its size: the next big batch cannot fit.
    await store._writer.execute(f"PRAGMA max_page_count = {pages + 8}")
    big = [blk(BOB, r, [rec(BOB, r, {"pad": "x" * 3000})]) for r in range(40)]
    with pytest.raises(StoreError, match="full"):
        async with store.batch() as tx:
            tx.put_blocks(big, 2)
            tx.append_commits(C, [CommitEntry(0, small.id, 0)])
    assert await store.block_count(C) == 1 and await store.commit_count(C) == 0
    async with store.batch() as tx:
        tx.append_commits(C, [CommitEntry(0, small.id, 0)])
    assert await store.record_status(small.records[0].id) == "final"
    assert await store.integrity_check() == []


async def test_close_writes_queued_batches_and_refuses_later_ones(tmp_path: Path) -> None:
    s = await Store.open(tmp_path / "q.sqlite")
    async with s.batch() as tx:
        tx.put_constellation(info())

    async def write(r: int) -> None:
        async with s.batch() as tx:
            tx.put_block(blk(ALICE, r, []), 1)

    async with s._write_lock:  # the writer is busy: batches queue up, then close is asked for
        queued = [asyncio.create_task(write(r)) for r in range(3)]
        for _ in range(10):
            await asyncio.sleep(0)
        closing = asyncio.create_task(s.close())
        await asyncio.sleep(0)
    results = await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), 30)
    await asyncio.wait_for(closing, 30)
    assert results == [None, None, None]
    with pytest.raises(StoreError, match="closed"):
        await write(9)
    async with await Store.open(tmp_path / "q.sqlite") as again:
        assert await again.block_count(C) == 3


async def test_a_closed_store_refuses_work(tmp_path: Path) -> None:
    s = await Store.open(tmp_path / "x.sqlite")
    await s.close()
    await s.close()
    with pytest.raises(StoreError, match="closed"):
        await s.heads(C)
    with pytest.raises(StoreError, match="closed"):
        s.batch()
