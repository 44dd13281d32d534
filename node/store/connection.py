"""Opening the database: the lock file that keeps it to one process, and the tuned connections.

Each connection is aiosqlite with explicit transactions (isolation_level=None); the writer turns on WAL.
"""

from __future__ import annotations

import fcntl
import sqlite3
from pathlib import Path
from typing import IO, Final

import aiosqlite

from valuemesh.node.store.errors import StoreError, StoreInUseError

BUSY_TIMEOUT_MS: Final = 5_000
# Bounds the WAL file after a checkpoint; SQLite truncates it back to this size.
JOURNAL_SIZE_LIMIT: Final = 64 * 1024 * 1024
# Page cache per connection (SQLite's default is 2 MiB): holds the hot index pages of a busy node.
CACHE_KIB: Final = 32 * 1024
SYNCHRONOUS_MODES: Final = frozenset({"FULL", "NORMAL"})

Db = aiosqlite.Connection


async def rollback(db: Db) -> None:
    try:
        await db.execute("ROLLBACK")
    except sqlite3.Error:
        pass  # SQLite already rolled back (e.g. after SQLITE_FULL); nothing is left to undo


def lock_file(path: Path) -> IO[bytes]:
    """Hold an exclusive advisory lock beside the database for as long as the store is open.

    SQLite would let two processes share the file, but two daemons writing as one member could
    sign two different records or blocks for one slot: an equivocation. The kernel drops the
    lock when the process dies, so a SIGKILL never leaves a stale lock behind.
    """
    f = open(f"{path}-lock", "a+b")  # held open until Store.close
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise StoreInUseError(f"The database {path} is in use by another valuemesh process.") from None
    return f


async def connect(path: Path, synchronous: str, busy_timeout_ms: int, *, query_only: bool) -> Db:
    try:
        # check_same_thread=False: small group commits run on the event loop's thread while
        # the connection's own thread is idle (see groupcommit.INLINE_MAX_ITEMS); never both at once.
        db = await aiosqlite.connect(str(path), isolation_level=None, check_same_thread=False)
    except sqlite3.Error as e:
        raise StoreError(f"The database {path} cannot be opened: {e}.") from None
    try:
        await db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        if not query_only:
            rows = list(await db.execute_fetchall("PRAGMA journal_mode = WAL"))
            if str(rows[0][0]).lower() != "wal":
                raise StoreError(f"The database {path} cannot use write-ahead logging on this file system.")
            await db.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        await db.execute(f"PRAGMA synchronous = {synchronous}")
        await db.execute(f"PRAGMA cache_size = {-CACHE_KIB}")
        await db.execute("PRAGMA foreign_keys = ON")
        if query_only:
            await db.execute("PRAGMA query_only = ON")
    except sqlite3.DatabaseError as e:
        await db.close()
        raise StoreError(f"The file {path} is not a usable database: {e}.") from None
    except BaseException:
        await db.close()
        raise
    return db
