"""Tests of node/store/schema.py: creating and marking the file, migrating old versions
(all or nothing), refusing newer and foreign files, and the triggers guarding the final order.
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
from pathlib import Path

import pytest
from store_kit import (
    ALICE,
    BOB,
    C,
    blk,
    count,
    rec,
    store_fixture,  # noqa: F401  (pytest finds the "store" fixture by this import)
)

from valuemesh.node.store import SCHEMA_VERSION, CommitEntry, SchemaTooNewError, Store, StoreError, schema
from valuemesh.protocol.errors import LocalError
from valuemesh.protocol.records import Block


async def test_open_sets_wal_schema_and_marks_the_file(tmp_path: Path) -> None:
    path = tmp_path / "n.sqlite"
    async with await Store.open(path) as s:
        assert await s.schema_version() == SCHEMA_VERSION
        assert await s.integrity_check() == []
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA application_id").fetchone()[0] == schema.APPLICATION_ID
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
        db.execute(f"PRAGMA application_id = {schema.APPLICATION_ID}")
        db.execute(
            "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, "
            "applied_at INTEGER NOT NULL, description TEXT NOT NULL)"
        )
        db.executescript(schema.SCHEMA_V1)
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
