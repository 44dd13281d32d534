"""Tests of node/store/batch.py and apply.py: idempotent writes, equivocation evidence, the
checks on the final order, atomic batches and arguments refused before anything is written.
"""

from __future__ import annotations

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

from valuemesh.node.store import (
    Checkpoint,
    CommitEntry,
    ConstellationInfo,
    FinalOrderError,
    PeerInfo,
    Store,
    StoreError,
    batch,
    checks,
)
from valuemesh.protocol.errors import LocalError


async def test_inserts_are_idempotent(store: Store) -> None:
    b = blk(ALICE, 0, [rec(ALICE, 0), rec(ALICE, 1)])
    async with store.batch() as tx:
        tx.put_block(b, 10)
        tx.put_block(b, 10)
        tx.put_records(list(b.records), 10)
    assert (tx.result.new_blocks, tx.result.new_records) == (1, 2)
    async with store.batch() as tx:
        tx.put_block(b, 11)
        tx.append_commits(C, [CommitEntry(0, b.id, 0)])
    assert (tx.result.new_blocks, tx.result.new_records, tx.result.new_commits) == (0, 0, 1)
    # Replaying the same commit after a crash is accepted and changes nothing.
    async with store.batch() as tx:
        tx.append_commits(C, [CommitEntry(0, b.id, 0)])
    assert tx.result.new_commits == 0
    assert await store.block_count(C) == 1
    assert await store.commit_count(C) == 1
    assert len(await store.final_records(C)) == 2
    assert tx.result.proofs == ()


async def test_record_equivocation_is_kept_as_evidence_not_as_a_record(store: Store) -> None:
    first, twin = rec(ALICE, 3, {"amount": 1}), rec(ALICE, 3, {"amount": 1000})
    async with store.batch() as tx:
        tx.put_records([first], 10)
    async with store.batch() as tx:
        tx.put_records([twin], 11)
    assert len(tx.result.proofs) == 1
    assert tx.result.proofs[0].verify() == ALICE.member
    assert await store.get_record(first.id) == first
    assert await store.get_record(twin.id) is None
    [ev] = await store.equivocations(C)
    assert (ev.kind, ev.author, ev.slot, ev.found_at) == ("record", ALICE.member, 3, 11)
    assert ev.proof.verify() == ALICE.member
    assert {ev.proof.first, ev.proof.second} == {first.raw, twin.raw}
    assert await store.equivocators(C) == {ALICE.member}
    # The same evidence again adds nothing; a third variant in one batch is still evidence.
    async with store.batch() as tx:
        tx.put_records([twin, rec(ALICE, 4, {"a": 1}), rec(ALICE, 4, {"a": 2})], 12)
    assert len(tx.result.proofs) == 1
    assert [e.slot for e in await store.equivocations(C)] == [3, 4]


async def test_block_equivocation_keeps_both_blocks_and_a_proof(store: Store) -> None:
    a = blk(BOB, 5, [rec(BOB, 0)])
    b = blk(BOB, 5, [rec(BOB, 1)])
    async with store.batch() as tx:
        tx.put_block(a, 1)
    async with store.batch() as tx:
        tx.put_block(b, 2)
    [proof] = tx.result.proofs
    assert proof.kind == "block" and proof.verify() == BOB.member
    assert set(await store.has_blocks([a.id, b.id])) == {a.id, b.id}
    [ev] = await store.equivocations(C)
    assert (ev.kind, ev.slot) == ("block", 5)
    # Different epochs are different slots, so no evidence.
    async with store.batch() as tx:
        tx.put_block(blk(ALICE, 6, [], epoch=0), 3)
        tx.put_block(blk(ALICE, 6, [], epoch=1), 3)
    assert tx.result.proofs == ()


async def test_final_order_refuses_gaps_rewrites_and_double_commits(store: Store) -> None:
    b0, b1, b2 = blk(ALICE, 0, []), blk(BOB, 0, []), blk(ALICE, 1, [], parents=[])
    async with store.batch() as tx:
        tx.put_blocks([b0, b1, b2], 1)
        tx.append_commits(C, [CommitEntry(0, b0.id, 0)])
    with pytest.raises(FinalOrderError, match="gap"):
        async with store.batch() as tx:
            tx.append_commits(C, [CommitEntry(2, b2.id, 1)])
    with pytest.raises(FinalOrderError, match="never rewritten"):
        async with store.batch() as tx:
            tx.append_commits(C, [CommitEntry(0, b1.id, 0)])
    with pytest.raises(FinalOrderError, match="twice"):
        async with store.batch() as tx:
            tx.append_commits(C, [CommitEntry(1, b0.id, 0)])
    with pytest.raises(FinalOrderError, match="consecutive"):
        store.batch().append_commits(C, [CommitEntry(1, b1.id, 0), CommitEntry(3, b2.id, 1)])
    with pytest.raises(StoreError, match="not stored"):
        async with store.batch() as tx:
            tx.append_commits(C, [CommitEntry(1, b"\x05" * 32, 0)])
    assert await store.commits(C) == [CommitEntry(0, b0.id, 0)]


async def test_a_failed_batch_changes_nothing(store: Store) -> None:
    good = blk(ALICE, 0, [rec(ALICE, 0)])
    with pytest.raises(FinalOrderError):
        async with store.batch() as tx:
            tx.put_block(good, 1)
            tx.put_kv("k", b"v")
            tx.append_commits(C, [CommitEntry(5, good.id, 0)])
    with pytest.raises(RuntimeError):
        async with store.batch() as tx:
            tx.put_block(good, 1)
            raise RuntimeError("caller changed its mind")
    # A block of a constellation this node never joined breaks a foreign key.
    stranger = blk(ALICE, 0, [rec(ALICE, 0, c=OTHER_C)], c=OTHER_C)
    with pytest.raises(StoreError, match="not stored"):
        async with store.batch() as tx:
            tx.put_block(good, 1)
            tx.put_block(stranger, 1)
    assert await store.block_count(C) == 0
    assert await store.get_record(good.records[0].id) is None
    assert await store.get_kv("k") is None
    assert await store.integrity_check() == []


async def test_a_block_of_another_constellation_cannot_enter_the_order(store: Store) -> None:
    async with store.batch() as tx:
        tx.put_constellation(info(OTHER_C))
    other = blk(ALICE, 0, [], c=OTHER_C)
    with pytest.raises(FinalOrderError, match="another constellation"):
        async with store.batch() as tx:
            tx.put_block(other, 1)
            tx.append_commits(C, [CommitEntry(0, other.id, 0)])
    assert await store.commit_count(C) == 0 and await store.block_count(OTHER_C) == 0


async def test_records_stored_in_the_same_batch_are_pending_only_in_their_constellation(store: Store) -> None:
    async with store.batch() as tx:
        tx.put_constellation(info(OTHER_C))
    theirs = rec(ALICE, 0, c=OTHER_C)
    with pytest.raises(StoreError, match="stored in this constellation"):
        async with store.batch() as tx:
            tx.put_records([theirs], 1)
            tx.add_pending(C, [theirs.id], 1)
    assert await store.get_record(theirs.id) is None
    mine = rec(ALICE, 0)
    async with store.batch() as tx:
        tx.put_records([mine, theirs], 1)
        tx.add_pending(C, [mine.id], 1)
        tx.add_pending(OTHER_C, [theirs.id], 1)
    assert await store.pending(C) == [mine] and await store.pending(OTHER_C) == [theirs]


async def test_bad_arguments_raise_before_anything_is_written(store: Store) -> None:
    tx = store.batch()
    bad_calls = [
        lambda: tx.put_block("not a block", 1),  # type: ignore[arg-type]
        lambda: tx.put_block(blk(ALICE, 0, []), -1),
        lambda: tx.put_records([b"raw"], 1),  # type: ignore[list-item]
        lambda: tx.put_constellation(ConstellationInfo(C, b"g", 1, "sleeping", "core")),
        lambda: tx.put_constellation(ConstellationInfo(C, b"g", 1, "active", "boss")),
        lambda: tx.put_constellation(ConstellationInfo(b"short", b"g", 1, "active", "core")),
        lambda: tx.add_pending(C, [b"short"], 1),
        lambda: tx.append_commits(C, [CommitEntry(-1, b"\x00" * 32, 0)]),
        lambda: tx.put_peer(PeerInfo(ALICE.member, "", 1, "mdns", 0)),
        lambda: tx.put_peer(PeerInfo(ALICE.member, "h", 70000, "mdns", 0)),
        lambda: tx.put_peer(PeerInfo(ALICE.member, "h", 1, "rumour", 0)),
        lambda: tx.put_kv("", b""),
        lambda: tx.put_kv("k", b"x" * (batch.MAX_KV_VALUE + 1)),
        lambda: tx.put_checkpoint(Checkpoint(C, 0, 0, 0, b"\x00" * 32, b"\x00" * 32, b"\x00" * 32, {b"k": b"s"})),
    ]
    for call in bad_calls:
        with pytest.raises(LocalError):
            call()
    with pytest.raises(LocalError):
        await store.blocks(C, limit=checks.MAX_PAGE + 1)
    with pytest.raises(LocalError):
        await store.blocks(C, from_round=-1)
    with pytest.raises(LocalError):
        await store.final_records(C, start=-5)
    with pytest.raises(LocalError):
        await store.get_blocks([b"\x00" * 32] * (checks.MAX_PAGE + 1))
    with pytest.raises(LocalError):
        await store.get_raw_blocks(C, [b"\x00" * 32] * (checks.MAX_PAGE + 1))
    with pytest.raises(StoreError, match="stored in this constellation"):
        async with store.batch() as tx2:
            tx2.add_pending(C, [b"\x01" * 32], 1)
