"""Tests of what Store.open refuses before writing anything: another program's SQLite file
(its bytes and journal mode unchanged) and a damaged database (PRAGMA quick_check); and the
modes the database's files are created with.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
from pathlib import Path

import pytest
from store_kit import info

from valuemesh.node.store import NotOurDatabaseError, Store, StoreDamagedError, StoreError

GARBAGE = 64 * 1024


def _foreign(path: Path) -> None:
    """Another program's file, as the sqlite3 shell leaves it: rollback journal, its own table."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, t TEXT)")
        db.executemany("INSERT INTO notes (t) VALUES (?)", [(f"note {i}",) for i in range(200)])


async def test_another_programs_file_is_refused_before_anything_writes_to_it(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    _foreign(path)
    before = path.read_bytes()
    with pytest.raises(NotOurDatabaseError, match="another program"):
        await Store.open(path)
    assert path.read_bytes() == before  # not switched to WAL, not marked, no schema
    assert not Path(f"{path}-wal").exists()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


async def test_a_file_marked_by_another_program_without_tables_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA application_id = 1234")
        db.execute("PRAGMA user_version = 7")
    before = path.read_bytes()
    with pytest.raises(NotOurDatabaseError):
        await Store.open(path)
    assert path.read_bytes() == before


async def _filled(path: Path) -> None:
    """A database of ours of about 1 MiB, every frame checkpointed into the main file."""
    async with await Store.open(path) as s, s.batch() as tx:
        tx.put_constellation(info())
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.executemany("INSERT INTO kv (key, value) VALUES (?, ?)",
                       [(f"filler/{i:05d}", random.Random(i).randbytes(1000)) for i in range(1000)])
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


async def test_garbage_in_the_middle_refuses_to_open_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    await _filled(path)
    size = path.stat().st_size
    assert size > 4 * GARBAGE
    with open(path, "r+b") as f:
        f.seek(size // 2 // 4096 * 4096)
        f.write(random.Random(7).randbytes(GARBAGE))
    before = path.read_bytes()
    with pytest.raises(StoreDamagedError) as info_:
        await Store.open(path)
    msg = info_.value.message
    assert "is damaged" in msg and "valuemesh import" in msg and "--recover" in msg and "constellation join" in msg
    assert msg.count(". ") == 0 and msg.endswith(".")  # one sentence
    assert path.read_bytes() == before


async def test_damaged_database_stops_the_daemon_with_one_sentence(tmp_path: Path) -> None:
    import subprocess
    import sys

    home = tmp_path / "home"
    subprocess.run([sys.executable, "-m", "valuemesh.cli.main", "--home", str(home), "init"],
                   check=True, capture_output=True, timeout=60)
    await _filled(home / "node.db")
    with open(home / "node.db", "r+b") as f:
        f.seek(8 * 4096)
        f.write(random.Random(8).randbytes(GARBAGE))
    before = (home / "node.db").read_bytes()
    res = subprocess.run([sys.executable, "-m", "valuemesh.cli.main", "--home", str(home), "daemon",
                          "--listen", "127.0.0.1:0", "--api", "127.0.0.1:0", "--no-mdns"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "is damaged" in res.stderr and "Traceback" not in res.stderr
    assert res.stdout == ""  # never ready
    assert (home / "node.db").read_bytes() == before


async def test_a_sound_database_opens_after_the_check(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    await _filled(path)
    async with await Store.open(path) as s:
        assert await s.integrity_check() == []
        assert [c.id for c in await s.constellations()] == [info().id]


async def test_database_files_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = tmp_path / "node.db"
        async with await Store.open(path) as s, s.batch() as tx:
            tx.put_constellation(info())
            for name in ("node.db", "node.db-wal", "node.db-shm", "node.db-lock"):
                assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
    finally:
        os.umask(old)


async def test_an_older_database_made_0644_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    await (await Store.open(path)).close()
    path.chmod(0o644)
    async with await Store.open(path):
        for name in ("node.db", "node.db-wal", "node.db-shm"):
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name


async def test_not_a_database_at_all(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    path.write_bytes(random.Random(3).randbytes(8192))
    before = path.read_bytes()
    with pytest.raises(StoreError, match="not a usable database"):
        await Store.open(path)
    assert path.read_bytes() == before
