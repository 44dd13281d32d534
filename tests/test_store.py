"""Tests of node/store.py: schema migrations, idempotent writes, equivocation evidence, queries,
and a crash test that SIGKILLs a writing subprocess at random instants and checks what survived.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from valuemesh.node import store as store_mod
from valuemesh.node.store import (
    SCHEMA_VERSION,
    Checkpoint,
    CommitEntry,
    ConstellationInfo,
    FinalOrderError,
    PeerInfo,
    SchemaTooNewError,
    Store,
    StoreError,
)
from valuemesh.protocol.errors import LocalError
from valuemesh.protocol.identity import Identity
from valuemesh.protocol.records import Block, Record

C = bytes([7]) * 32
OTHER_C = bytes([8]) * 32
ALICE = Identity(bytes([1]) * 32)
BOB = Identity(bytes([2]) * 32)
WRITER = Path(__file__).with_name("store_writer.py")


def rec(author: Identity, seq: int, body: dict[str, object] | None = None, c: bytes = C) -> Record:
    return Record.create(
        author,
        type="contribution",
        v=1,
        constellation=c,
        seq=seq,
        body=body if body is not None else {"seq": seq},
        created=1000 + seq,
    )


def blk(
    author: Identity,
    rnd: int,
    records: list[Record],
    parents: list[bytes] | None = None,
    c: bytes = C,
    epoch: int = 0,
) -> Block:
    return Block.create(
        author,
        constellation=c,
        epoch=epoch,
        round=rnd,
        prev=None,
        parents=parents or [],
        records=records,
        created=2000 + rnd,
    )


def info(c: bytes = C) -> ConstellationInfo:
    return ConstellationInfo(c, b"genesis:" + c, 5, "active", "core", {"membership": 1}, "bakery")


@pytest.fixture
async def store(tmp_path: Path):
    s = await Store.open(tmp_path / "node.sqlite")
    async with s.batch() as tx:
        tx.put_constellation(info())
    try:
        yield s
    finally:
        await s.close()


def count(path: Path, sql: str) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return int(db.execute(sql).fetchone()[0])


# --------------------------------------------------------------------------- opening, schema


async def test_open_sets_wal_schema_and_marks_the_file(tmp_path: Path) -> None:
    path = tmp_path / "n.sqlite"
    async with await Store.open(path) as s:
        assert await s.schema_version() == SCHEMA_VERSION
        assert await s.integrity_check() == []
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA application_id").fetchone()[0] == store_mod.APPLICATION_ID
        versions = [r[0] for r in db.execute("SELECT version FROM schema_version ORDER BY version")]
    assert versions == list(range(1, SCHEMA_VERSION + 1))
    # Reopening an up-to-date database applies nothing twice.
    async with await Store.open(path) as s:
        assert await s.schema_version() == SCHEMA_VERSION
    assert count(path, "SELECT COUNT(*) FROM schema_version") == SCHEMA_VERSION


def make_v1_database(path: Path) -> None:
    """A database exactly as schema version 1 left it (released migrations are append-only)."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA application_id = {store_mod.APPLICATION_ID}")
        db.execute(
            "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, "
            "applied_at INTEGER NOT NULL, description TEXT NOT NULL)"
        )
        db.executescript(store_mod._SCHEMA_V1)
        db.execute("INSERT INTO schema_version VALUES (1, 0, 'v1')")


def insert_v1_rows(path: Path, blocks: list[Block], commits: list[Block]) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(
            "INSERT INTO constellations VALUES (?, 'old', ?, 1, 'active', 'core', ?)",
            (C, b"g", b"\xa0"),
        )
        for b in blocks:
            db.execute(
                "INSERT INTO blocks VALUES (?, ?, ?, ?, ?, ?, ?)",
                (b.id, C, b.epoch, b.author.key, b.round, b.raw, 9),
            )
            for r in b.records:
                db.execute(
                    "INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (r.id, C, r.author.key, r.seq, r.type, r.raw, 9),
                )
        for i, b in enumerate(commits):
            db.execute("INSERT INTO commits VALUES (?, ?, ?, ?)", (C, i, b.id, b.round))


async def test_old_version_database_is_migrated_and_backfilled(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    make_v1_database(path)
    b0 = blk(ALICE, 0, [rec(ALICE, 0), rec(ALICE, 1)])
    b1 = blk(BOB, 1, [rec(BOB, 0)], parents=[b0.id])
    b2 = blk(ALICE, 2, [rec(ALICE, 2)])  # stored, not committed
    insert_v1_rows(path, [b0, b1, b2], [b0, b1])
    async with await Store.open(path, now_ms=77) as s:
        assert await s.schema_version() == SCHEMA_VERSION
        assert await s.heads(C) == {(ALICE.member, 0): 2, (BOB.member, 0): 1}
        finals = await s.final_records(C)
        assert [(f.commit_index, f.position, f.record.id) for f in finals] == [
            (0, 0, b0.records[0].id),
            (0, 1, b0.records[1].id),
            (1, 0, b1.records[0].id),
        ]
        assert await s.record_status(b2.records[0].id) == "known"
        assert await s.integrity_check() == []
        # The migrated store keeps working: the next commit extends the old order.
        async with s.batch() as tx:
            tx.append_commits(C, [CommitEntry(2, b2.id, 2)])
        assert await s.record_status(b2.records[0].id) == "final"
    assert count(path, "SELECT applied_at FROM schema_version WHERE version = 2") == 77
    assert count(path, "SELECT applied_at FROM schema_version WHERE version = 3") == 77


async def test_failed_migration_leaves_the_old_version_intact(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    make_v1_database(path)
    good = blk(ALICE, 0, [rec(ALICE, 0)])
    insert_v1_rows(path, [good], [good])
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        # A block whose raw bytes do not decode makes the version 2 backfill fail midway.
        db.execute("INSERT INTO blocks VALUES (?, ?, 0, ?, 5, ?, 9)", (b"\x09" * 32, C, b"\x01" * 32, b"junk"))
    with pytest.raises(StoreError, match="unreadable"):
        await Store.open(path)
    assert count(path, "SELECT MAX(version) FROM schema_version") == 1
    assert count(path, "SELECT COUNT(*) FROM sqlite_master WHERE name = 'block_records'") == 0


async def test_newer_schema_is_refused_without_change(tmp_path: Path) -> None:
    path = tmp_path / "n.sqlite"
    await (await Store.open(path)).close()
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("INSERT INTO schema_version VALUES (?, 0, 'from the future')", (SCHEMA_VERSION + 1,))
    with pytest.raises(SchemaTooNewError, match="newer than this valuemesh"):
        await Store.open(path)
    assert count(path, "SELECT MAX(version) FROM schema_version") == SCHEMA_VERSION + 1


async def test_foreign_files_are_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.sqlite"
    with contextlib.closing(sqlite3.connect(other)) as db, db:
        db.execute("CREATE TABLE notes (t TEXT)")
    with pytest.raises(StoreError, match="another program"):
        await Store.open(other)
    assert count(other, "SELECT COUNT(*) FROM sqlite_master") == 1
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(random.Random(1).randbytes(8192))
    with pytest.raises(StoreError):
        await Store.open(junk)
    with pytest.raises(StoreError):
        await Store.open(":memory:")
    with pytest.raises(StoreError):
        await Store.open(tmp_path / "missing-dir" / "x.sqlite")
    with pytest.raises(LocalError):
        await Store.open(tmp_path / "y.sqlite", synchronous="OFF")


# --------------------------------------------------------------------------- writes


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


async def test_the_schema_itself_guards_the_final_order(store: Store) -> None:
    b0, b1 = blk(ALICE, 0, [rec(ALICE, 0)]), blk(BOB, 0, [])
    async with store.batch() as tx:
        tx.put_blocks([b0, b1], 1)
        tx.append_commits(C, [CommitEntry(0, b0.id, 0)])
    # Any writer, not only this module, is held to the invariants.
    with contextlib.closing(sqlite3.connect(store.path)) as db:
        db.execute("PRAGMA foreign_keys = ON")
        for sql, params in [
            ("INSERT INTO commits VALUES (?, 5, ?, 0)", (C, b1.id)),
            ("UPDATE commits SET block_id = ? WHERE idx = 0", (b1.id,)),
            ("DELETE FROM commits", ()),
            ("UPDATE blocks SET raw = x'00'", ()),
            ("UPDATE records SET seq = 9", ()),
        ]:
            with pytest.raises(sqlite3.IntegrityError):
                db.execute(sql, params)
        db.rollback()
    assert await store.commits(C) == [CommitEntry(0, b0.id, 0)]
    assert await store.record_status(b0.records[0].id) == "final"


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
        lambda: tx.put_kv("k", b"x" * (store_mod.MAX_KV_VALUE + 1)),
        lambda: tx.put_checkpoint(Checkpoint(C, 0, 0, 0, b"\x00" * 32, b"\x00" * 32, b"\x00" * 32, {b"k": b"s"})),
    ]
    for call in bad_calls:
        with pytest.raises(LocalError):
            call()
    with pytest.raises(LocalError):
        await store.blocks(C, limit=store_mod.MAX_PAGE + 1)
    with pytest.raises(LocalError):
        await store.blocks(C, from_round=-1)
    with pytest.raises(LocalError):
        await store.final_records(C, start=-5)
    with pytest.raises(LocalError):
        await store.get_blocks([b"\x00" * 32] * (store_mod.MAX_PAGE + 1))
    with pytest.raises(LocalError):
        await store.get_raw_blocks(C, [b"\x00" * 32] * (store_mod.MAX_PAGE + 1))
    with pytest.raises(StoreError, match="stored in this constellation"):
        async with store.batch() as tx2:
            tx2.add_pending(C, [b"\x01" * 32], 1)


# --------------------------------------------------------------------------- queries


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
    monkeypatch.setattr(store_mod, "MAX_PAGE_BYTES", 1)
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
    n = store_mod.INLINE_MAX_ITEMS + 1
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


async def test_constellations_checkpoints_peers_and_settings(store: Store) -> None:
    assert await store.constellation(C) == info()
    async with store.batch() as tx:
        tx.set_constellation_status(C, "left")
    assert (await store.constellation(C)).status == "left"  # type: ignore[union-attr]
    with pytest.raises(StoreError):
        async with store.batch() as tx:
            tx.set_constellation_status(OTHER_C, "left")
    assert [c.id for c in await store.constellations()] == [C]

    h = b"\x0c" * 32
    async with store.batch() as tx:
        tx.put_checkpoint(Checkpoint(C, 1, 100, 40, h, h, h, {ALICE.member.key: b"a" * 64}))
        tx.put_checkpoint(Checkpoint(C, 1, 100, 40, h, h, h, {BOB.member.key: b"b" * 64}))
    [cp] = await store.checkpoints(C)
    assert cp.signatures == {ALICE.member.key: b"a" * 64, BOB.member.key: b"b" * 64}
    with pytest.raises(StoreError, match="different checkpoint"):
        async with store.batch() as tx:
            tx.put_checkpoint(Checkpoint(C, 1, 100, 40, b"\x0d" * 32, h, h, {}))
    with pytest.raises(StoreError, match="different checkpoint"):  # another commit index
        async with store.batch() as tx:
            tx.put_checkpoint(Checkpoint(C, 1, 100, 41, h, h, h, {}))
    assert await store.latest_checkpoint(C) == cp

    async with store.batch() as tx:
        tx.put_peer(PeerInfo(ALICE.member, "127.0.0.1", 7000, "bootstrap", 50))
        tx.put_peer(PeerInfo(BOB.member, "::1", 7001, "mdns", 40))
        tx.peer_failed(BOB.member, "::1", 7001)
        tx.peer_failed(BOB.member, "::1", 7001)
        # An older sighting never moves last_seen backwards.
        tx.put_peer(PeerInfo(ALICE.member, "127.0.0.1", 7000, "exchange", 10))
    peers = await store.peers()
    assert [(p.member, p.last_seen, p.failures, p.source) for p in peers] == [
        (ALICE.member, 50, 0, "exchange"),
        (BOB.member, 40, 2, "mdns"),
    ]
    async with store.batch() as tx:
        tx.forget_peer(BOB.member, "::1", 7001)
        tx.put_kv("api-port", b"8080")
    assert [p.member for p in await store.peers()] == [ALICE.member]
    assert await store.get_kv("api-port") == b"8080"
    async with store.batch() as tx:
        tx.delete_kv("api-port")
    assert await store.get_kv("api-port") is None


async def test_the_peer_table_stays_bounded(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "MAX_PEERS", 5)
    async with store.batch() as tx:
        for i in range(8):
            tx.put_peer(PeerInfo(ALICE.member, "127.0.0.1", 7000 + i, "exchange", 100 + i))
    assert sorted(p.port for p in await store.peers()) == [7003, 7004, 7005, 7006, 7007]


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


async def test_one_process_at_a_time_may_open_a_database(tmp_path: Path) -> None:
    path = tmp_path / "x.sqlite"
    first = await Store.open(path)
    try:
        with pytest.raises(StoreError, match="in use"):
            await Store.open(path)
    finally:
        await first.close()
    async with await Store.open(path) as again:
        assert await again.schema_version() == SCHEMA_VERSION


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


# --------------------------------------------------------------------------- crash safety

KILLS = 15
START_DEADLINE_S = 20.0


def _parse(out: bytes, commits: list[int], sent: dict[int, set[str]]) -> None:
    # A line cut short by the kill was not fully reported, so it promises nothing.
    for line in out.decode().split("\n")[:-1]:
        kind, *rest = line.split()
        if kind == "commit":
            commits.append(int(rest[0]))
        else:
            sent.setdefault(int(rest[0]), set()).add(rest[1])


async def _run_and_kill(path: Path, seed: int, rng: random.Random, mode: str) -> bytes:
    """Start the writer, SIGKILL it at a random instant, return everything it printed.

    mode "early": 0-600 ms after spawn (start-up, schema checks, first transactions);
    "steady": 0-300 ms after its first line; "signed": 0-3 ms after it reports a record
    it signed, aiming at the window between signing and storing.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WRITER),
        str(path),
        str(seed),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        head = b""
        if mode == "early":
            await asyncio.sleep(rng.uniform(0.0, 0.6))
        else:
            skip = rng.randint(0, 20) if mode == "signed" else 0
            for _ in range(skip + 1):
                line = b""
                while not line.startswith(b"sent"):
                    line = await asyncio.wait_for(proc.stdout.readline(), START_DEADLINE_S)
                    assert line.endswith(b"\n"), (await proc.stderr.read()).decode()
                    head += line
            await asyncio.sleep(rng.uniform(0.0, 0.3 if mode == "steady" else 0.003))
        assert proc.returncode is None, (await proc.stderr.read()).decode()
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), START_DEADLINE_S)
        out = head + await asyncio.wait_for(proc.stdout.read(), START_DEADLINE_S)
        await proc.stderr.read()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return out


@pytest.mark.slow
async def test_sigkill_at_random_instants_loses_nothing_committed(tmp_path: Path) -> None:
    path = tmp_path / "crash.sqlite"
    rng = random.Random(20261123)
    reported: list[int] = []
    sent: dict[int, set[str]] = {}
    for i in range(KILLS):
        mode = ("early", "steady", "signed")[i % 3]
        _parse(await _run_and_kill(path, i, rng, mode), reported, sent)
        # Checked before the next run can rewrite anything: the database is intact and holds
        # every index reported so far, with its block.
        with contextlib.closing(sqlite3.connect(path)) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            if reported:
                held = db.execute(
                    "SELECT COUNT(*) FROM commits c JOIN blocks b ON b.id = c.block_id WHERE c.idx <= ?",
                    (max(reported),),
                ).fetchone()[0]
                assert held == max(reported) + 1, f"kill {i} lost reported commits"
    assert len(reported) > KILLS, "the writer must have committed before most kills"

    # One clean run proves the store resumes exactly where the last kill left it.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WRITER),
        str(path),
        "99",
        "--count",
        "5",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), START_DEADLINE_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    _parse(out, reported, sent)
    # Reserving a seq durably before signing means no seq was ever signed with two contents,
    # however the kills fell between reserving, signing, sending and storing.
    assert sent and all(len(ids) == 1 for ids in sent.values()), "a seq was signed twice"

    sys.path.insert(0, str(WRITER.parent))
    try:
        import store_writer
    finally:
        sys.path.remove(str(WRITER.parent))
    async with await Store.open(path) as s:
        assert await s.integrity_check() == []
        n = await s.commit_count(store_writer.CONSTELLATION)
        assert max(reported) < n
        commits = [e async for e in s.iter_commits(store_writer.CONSTELLATION)]
        assert [e.index for e in commits] == list(range(n)), "the final order has a gap"
        for e in commits:
            want = store_writer.block_for(e.index)
            assert e.block_id == want.id
            block = await s.get_block(e.block_id)
            assert block == want
            stored = await s.get_records([r.id for r in want.records])
            assert len(stored) == len(want.records)
        finals = 0
        while page := await s.final_records(store_writer.CONSTELLATION, start=finals // 12):
            assert page[0].commit_index == finals // 12
            finals += len(page)
            if page[-1].commit_index == n - 1:
                break
        assert finals == n * store_writer.RECORDS_PER_BLOCK
        # Records carried by committed blocks left `pending`; only the writer's own remain.
        pending = await s.pending(store_writer.CONSTELLATION)
        assert pending and {r.author for r in pending} == {store_writer.LOCAL.member}
        assert await s.equivocations(store_writer.CONSTELLATION) == []


# --------------------------------------------------------------------------- model-based


_AUTHORS = (ALICE, BOB)
# Two variants per (author, seq) slot and per (author, round) slot, so equivocations happen.
_RECORDS = {(a, s, v): rec(_AUTHORS[a], s, {"v": v}) for a in range(2) for s in range(3) for v in range(2)}
_BLOCKS = {
    (a, r, v): blk(_AUTHORS[a], r, [_RECORDS[(a, r, v)], _RECORDS[(1 - a, r, 0)]])
    for a in range(2)
    for r in range(3)
    for v in range(2)
}
_REC_KEYS = sorted(_RECORDS)
_BLOCK_KEYS = sorted(_BLOCKS)


class StoreModel(RuleBasedStateMachine):
    """Random batches against the store and a plain-Python model of what it must hold."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.loop = asyncio.new_event_loop()
        self.store = self.run(Store.open(Path(self.dir.name) / "m.sqlite"))
        self.run(self._write(lambda tx: tx.put_constellation(info())))
        self.slot_holder: dict[tuple[bytes, int], bytes] = {}  # (author, seq) -> record id
        self.record_evidence: set[tuple[bytes, int]] = set()
        self.block_slots: dict[tuple[bytes, int], set[bytes]] = {}
        self.blocks: set[bytes] = set()
        self.commits: list[bytes] = []
        self.final: list[bytes] = []
        self.pending: set[bytes] = set()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def _write(self, fill: Any) -> Any:
        async with self.store.batch() as tx:
            fill(tx)
        return tx.result

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()
        self.dir.cleanup()

    # model transitions ---------------------------------------------------------------
    def _model_records(self, records: list[Record]) -> int:
        proofs = 0
        for r in records:
            slot = (r.author.key, r.seq)
            holder = self.slot_holder.setdefault(slot, r.id)
            if holder != r.id and slot not in self.record_evidence:
                self.record_evidence.add(slot)
                proofs += 1
        return proofs

    def _model_block(self, b: Block) -> int:
        if b.id in self.blocks:
            return 0
        self.blocks.add(b.id)
        same = self.block_slots.setdefault((b.author.key, b.round), set())
        proofs = 1 if len(same) == 1 else 0  # one proof per slot, found with the second block
        same.add(b.id)
        return proofs + self._model_records(list(b.records))

    # rules ------------------------------------------------------------------------------
    @rule(keys=st.lists(st.sampled_from(_REC_KEYS), min_size=1, max_size=4))
    def put_records(self, keys: list[tuple[int, int, int]]) -> None:
        records = [_RECORDS[k] for k in keys]
        result = self.run(self._write(lambda tx: tx.put_records(records, 1)))
        unique = list({r.id: r for r in records}.values())
        assert len(result.proofs) == self._model_records(unique)

    @rule(key=st.sampled_from(_BLOCK_KEYS))
    def put_block(self, key: tuple[int, int, int]) -> None:
        b = _BLOCKS[key]
        result = self.run(self._write(lambda tx: tx.put_block(b, 1)))
        assert len(result.proofs) == self._model_block(b)

    @rule(key=st.sampled_from(_BLOCK_KEYS))
    def commit(self, key: tuple[int, int, int]) -> None:
        b = _BLOCKS[key]
        entry = CommitEntry(len(self.commits), b.id, b.round)
        if b.id not in self.blocks:
            with pytest.raises(StoreError, match="not stored"):
                self.run(self._write(lambda tx: tx.append_commits(C, [entry])))
        elif b.id in self.commits:
            with pytest.raises(FinalOrderError):
                self.run(self._write(lambda tx: tx.append_commits(C, [entry])))
        else:
            self.run(self._write(lambda tx: tx.append_commits(C, [entry])))
            self.commits.append(b.id)
            for r in b.records:
                if r.id not in self.final:
                    self.final.append(r.id)
                self.pending.discard(r.id)

    @rule(key=st.sampled_from(_REC_KEYS))
    def propose(self, key: tuple[int, int, int]) -> None:
        r = _RECORDS[key]
        if self.slot_holder.get((r.author.key, r.seq)) != r.id:
            with pytest.raises(StoreError, match="stored in this constellation"):
                self.run(self._write(lambda tx: tx.add_pending(C, [r.id], 2)))
            return
        self.run(self._write(lambda tx: tx.add_pending(C, [r.id], 2)))
        if r.id not in self.final:
            self.pending.add(r.id)

    @rule(key=st.sampled_from(_BLOCK_KEYS), gap=st.integers(1, 3))
    def failing_batch_changes_nothing(self, key: tuple[int, int, int], gap: int) -> None:
        b = _BLOCKS[key]
        bad = CommitEntry(len(self.commits) + gap, b.id, b.round)

        def fill(tx: Any) -> None:
            tx.put_block(b, 1)
            tx.put_records(list(_RECORDS.values()), 1)
            tx.append_commits(C, [bad])

        with pytest.raises(FinalOrderError):
            self.run(self._write(fill))

    @rule()
    def reopen(self) -> None:
        self.run(self.store.close())
        self.store = self.run(Store.open(Path(self.dir.name) / "m.sqlite"))

    # invariants --------------------------------------------------------------------------
    @invariant()
    def store_matches_model(self) -> None:
        s = self.store
        assert [e.block_id for e in self.run(s.commits(C))] == self.commits
        assert [f.record.id for f in self.run(s.final_records(C))] == self.final
        assert {r.id for r in self.run(s.pending(C))} == self.pending
        assert self.run(s.has_blocks(list({b.id for b in _BLOCKS.values()}))) == self.blocks
        stored = self.run(s.get_records([r.id for r in _RECORDS.values()]))
        assert set(stored) == set(self.slot_holder.values())
        evidence = self.run(s.equivocations(C))
        assert {(e.author.key, e.slot) for e in evidence if e.kind == "record"} == self.record_evidence
        assert {(e.author.key, e.slot) for e in evidence if e.kind == "block"} == {
            slot for slot, ids in self.block_slots.items() if len(ids) > 1
        }
        assert all(e.proof.verify() == e.author for e in evidence)


TestStoreModel = StoreModel.TestCase
TestStoreModel.settings = settings(
    max_examples=25, stateful_step_count=15, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
