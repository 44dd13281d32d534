"""Opening the database: the lock file that keeps it to one process, and the tuned connections.

Each connection is aiosqlite with explicit transactions (isolation_level=None); nothing here
writes to the file: the writer turns on WAL (`use_wal`) only once the file is known to be ours.
"""

from __future__ import annotations

import fcntl
import os
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
# The database, its -wal and -shm (SQLite gives both the database's mode) and the lock file:
# readable by the node's user only (docs/operator.md, Home directory).
FILE_MODE: Final = 0o600

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
    fd = os.open(f"{path}-lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    f = os.fdopen(fd, "a+b")  # held open until Store.close
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise StoreInUseError(f"The database {path} is in use by another valuemesh process.") from None
    return f


async def connect(path: Path, busy_timeout_ms: int) -> Db:
    """A query-only connection that has not read the file yet (no pragma here loads the schema,
    so schema.check_file sees a damaged file first); `tune` sets it up, `use_wal` lets the writer write."""
    try:
        # check_same_thread=False: small group commits run on the event loop's thread while
        # the connection's own thread is idle (see groupcommit.INLINE_MAX_ITEMS); never both at once.
        db = await aiosqlite.connect(str(path), isolation_level=None, check_same_thread=False)
    except sqlite3.Error as e:
        raise StoreError(f"The database {path} cannot be opened: {e}.") from None
    try:
        await db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        # The writer too starts read-only: nothing may write to a file before it is known to
        # be ours and sound (schema.check_file); use_wal lifts it.
        await db.execute("PRAGMA query_only = ON")
    except sqlite3.DatabaseError as e:
        await db.close()
        raise StoreError(f"The file {path} is not a usable database: {e}.") from None
    except BaseException:
        await db.close()
        raise
    return db


async def tune(db: Db, path: Path, synchronous: str) -> None:
    """The per-connection settings, once the file is known to be ours (cache_size reads its schema)."""
    try:
        await db.execute(f"PRAGMA synchronous = {synchronous}")
        await db.execute(f"PRAGMA cache_size = {-CACHE_KIB}")
        await db.execute("PRAGMA foreign_keys = ON")
    except sqlite3.DatabaseError as e:
        raise StoreError(f"The file {path} is not a usable database: {e}.") from None


async def use_wal(db: Db, path: Path) -> None:
    """Make the writer able to write, in WAL mode: the first write to the file."""
    try:
        await db.execute("PRAGMA query_only = OFF")
        rows = list(await db.execute_fetchall("PRAGMA journal_mode = WAL"))
        if str(rows[0][0]).lower() != "wal":
            raise StoreError(f"The database {path} cannot use write-ahead logging on this file system.")
        await db.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
    except sqlite3.DatabaseError as e:
        raise StoreError(f"The file {path} is not a usable database: {e}.") from None


def create_private(path: Path) -> None:
    """Create the database file with FILE_MODE if it does not exist (SQLite would make it 0644),
    and take group and other access away from an older one and its -wal and -shm."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE))
    except FileExistsError:
        pass
    except OSError as e:
        raise StoreError(f"The database {path} cannot be created: {e.strerror}.") from None


def tighten_modes(path: Path) -> None:
    """Databases made before files were created 0600: the same mode for the database and its files."""
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            if p.stat().st_mode & 0o077:
                p.chmod(FILE_MODE)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreError(f"The database file {p} cannot be made private: {e.strerror}.") from None
