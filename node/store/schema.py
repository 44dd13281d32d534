"""The database schema, version by version, and the migrations that bring a file up to date.

Released steps are never edited (docs/storage.md, Migrations); a change is a new step in `MIGRATIONS`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

from valuemesh.node.store.codec import decode_stored_block
from valuemesh.node.store.connection import Db, rollback
from valuemesh.node.store.errors import NotOurDatabaseError, SchemaTooNewError, StoreDamagedError, StoreError

# "vmsh": marks the file as a valuemesh database so we never migrate someone else's SQLite file.
APPLICATION_ID: Final = 0x766D7368
SCHEMA_VERSION: Final = 5

SCHEMA_V1: Final = """
CREATE TABLE constellations (
    id         BLOB PRIMARY KEY CHECK (length(id) = 32),
    name       TEXT NOT NULL,
    genesis    BLOB NOT NULL,
    joined_at  INTEGER NOT NULL,
    status     TEXT NOT NULL CHECK (status IN ('joining', 'active', 'left', 'dissolved')),
    my_tier    TEXT NOT NULL CHECK (my_tier IN ('core', 'contributor', 'applicant')),
    plugins    BLOB NOT NULL
);
CREATE TABLE blocks (
    id            BLOB PRIMARY KEY CHECK (length(id) = 32),
    constellation BLOB NOT NULL REFERENCES constellations(id),
    epoch         INTEGER NOT NULL,
    author        BLOB NOT NULL,
    round         INTEGER NOT NULL,
    raw           BLOB NOT NULL,
    received_at   INTEGER NOT NULL
);
CREATE INDEX blocks_by_author ON blocks(constellation, author, round);
-- Carries author and id so paging in (round, author, id) order needs no sort.
CREATE INDEX blocks_by_round ON blocks(constellation, round, author, id);
CREATE TABLE records (
    id            BLOB PRIMARY KEY CHECK (length(id) = 32),
    constellation BLOB NOT NULL REFERENCES constellations(id),
    author        BLOB NOT NULL,
    seq           INTEGER NOT NULL,
    type          TEXT NOT NULL,
    raw           BLOB NOT NULL,
    received_at   INTEGER NOT NULL,
    UNIQUE (constellation, author, seq)
);
CREATE TABLE equivocations (
    kind          TEXT NOT NULL CHECK (kind IN ('record', 'block')),
    constellation BLOB NOT NULL REFERENCES constellations(id),
    author        BLOB NOT NULL,
    slot          INTEGER NOT NULL,
    proof         BLOB NOT NULL,
    found_at      INTEGER NOT NULL,
    PRIMARY KEY (kind, constellation, author, slot)
);
CREATE TABLE pending (
    constellation BLOB NOT NULL REFERENCES constellations(id),
    record_id     BLOB NOT NULL REFERENCES records(id),
    added_at      INTEGER NOT NULL,
    PRIMARY KEY (constellation, record_id)
) WITHOUT ROWID;
CREATE TABLE commits (
    constellation BLOB NOT NULL REFERENCES constellations(id),
    idx           INTEGER NOT NULL CHECK (idx >= 0),
    block_id      BLOB NOT NULL REFERENCES blocks(id),
    anchor_round  INTEGER NOT NULL,
    PRIMARY KEY (constellation, idx),
    UNIQUE (constellation, block_id)
) WITHOUT ROWID;
CREATE TABLE checkpoints (
    constellation BLOB NOT NULL REFERENCES constellations(id),
    epoch         INTEGER NOT NULL,
    round         INTEGER NOT NULL,
    state_hash    BLOB NOT NULL,
    signatures    BLOB NOT NULL,
    PRIMARY KEY (constellation, epoch)
);
CREATE TABLE peers (
    member    BLOB NOT NULL CHECK (length(member) = 32),
    host      TEXT NOT NULL,
    port      INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
    source    TEXT NOT NULL,
    last_seen INTEGER NOT NULL,
    failures  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (member, host, port)
) WITHOUT ROWID;
CREATE TABLE kv (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;
"""

# Version 2 indexes records by the blocks that carry them and records when each became final,
# so "is this record final" and "the final records in order" are index lookups, not scans that
# decode every committed block. Both tables are derived and are backfilled from raw blocks.
# Its triggers make the schema itself keep the invariants (the order grows by one, is never
# rewritten, holds only its own constellation's blocks; finality follows every commit), so no
# code path, present or future, can write a final order that breaks them.
SCHEMA_V2: Final = """
CREATE TABLE block_records (
    block_id  BLOB NOT NULL REFERENCES blocks(id),
    pos       INTEGER NOT NULL,
    record_id BLOB NOT NULL,
    PRIMARY KEY (block_id, pos)
) WITHOUT ROWID;
CREATE TABLE final_records (
    record_id     BLOB PRIMARY KEY,
    constellation BLOB NOT NULL REFERENCES constellations(id),
    commit_idx    INTEGER NOT NULL,
    pos           INTEGER NOT NULL
) WITHOUT ROWID;
CREATE UNIQUE INDEX final_records_in_order ON final_records(constellation, commit_idx, pos);
CREATE TRIGGER commits_extend_the_order BEFORE INSERT ON commits
WHEN NEW.idx != (SELECT COALESCE(MAX(idx) + 1, 0) FROM commits WHERE constellation = NEW.constellation)
BEGIN
    SELECT RAISE(ABORT, 'final order: a commit must extend the order without a gap');
END;
CREATE TRIGGER commits_of_this_constellation BEFORE INSERT ON commits
WHEN EXISTS (SELECT 1 FROM blocks WHERE id = NEW.block_id AND constellation != NEW.constellation)
BEGIN
    SELECT RAISE(ABORT, 'final order: a block of another constellation cannot enter it');
END;
CREATE TRIGGER commits_are_append_only BEFORE UPDATE ON commits
BEGIN
    SELECT RAISE(ABORT, 'final order: it is never rewritten');
END;
CREATE TRIGGER commits_are_never_deleted BEFORE DELETE ON commits
BEGIN
    SELECT RAISE(ABORT, 'final order: it is never rewritten');
END;
CREATE TRIGGER blocks_are_immutable BEFORE UPDATE ON blocks
BEGIN
    SELECT RAISE(ABORT, 'immutable: a stored block never changes');
END;
CREATE TRIGGER records_are_immutable BEFORE UPDATE ON records
BEGIN
    SELECT RAISE(ABORT, 'immutable: a stored record never changes');
END;
-- First appearance wins: a record carried by two committed blocks is final at the first.
CREATE TRIGGER commits_finalise AFTER INSERT ON commits
BEGIN
    INSERT OR IGNORE INTO final_records (record_id, constellation, commit_idx, pos)
        SELECT record_id, NEW.constellation, NEW.idx, pos FROM block_records
        WHERE block_id = NEW.block_id ORDER BY pos;
    DELETE FROM pending WHERE constellation = NEW.constellation
        AND record_id IN (SELECT record_id FROM block_records WHERE block_id = NEW.block_id);
END;
"""

# Rounds restart at each epoch's first round, so sync compares what two nodes hold per
# (author, epoch); this index makes that a loose scan.
SCHEMA_V3: Final = """
CREATE INDEX blocks_by_epoch ON blocks(constellation, epoch, author, round);
"""


async def _run_script(db: Db, script: str) -> None:
    # executescript would COMMIT the open migration transaction, so run statements one by one;
    # complete_statement keeps a trigger's BEGIN … END body (with its inner semicolons) whole.
    statement = ""
    for part in script.split(";"):
        statement += part + ";"
        if sqlite3.complete_statement(statement):
            if statement.strip(" \n;"):
                await db.execute(statement)
            statement = ""


async def _migrate_1(db: Db) -> None:
    await _run_script(db, SCHEMA_V1)


async def _migrate_2(db: Db) -> None:
    await _run_script(db, SCHEMA_V2)
    await derive(db)


async def _migrate_3(db: Db) -> None:
    await _run_script(db, SCHEMA_V3)


async def derive(db: Db) -> None:
    """Fill block_records and final_records from raw blocks and commits (inside a transaction)."""
    last = 0
    while True:
        rows = await db.execute_fetchall(
            "SELECT rowid, id, raw FROM blocks WHERE rowid > ? ORDER BY rowid LIMIT 500", (last,)
        )
        if not rows:
            break
        links: list[tuple[bytes, int, bytes]] = []
        for rowid, bid, raw in rows:
            last = rowid
            block = decode_stored_block(raw, bid)
            links.extend((bid, pos, rec.id) for pos, rec in enumerate(block.records))
        await db.executemany("INSERT OR IGNORE INTO block_records VALUES (?, ?, ?)", links)
    await db.execute(
        "INSERT OR IGNORE INTO final_records (record_id, constellation, commit_idx, pos) "
        "SELECT br.record_id, c.constellation, c.idx, br.pos FROM commits c "
        "JOIN block_records br ON br.block_id = c.block_id ORDER BY c.constellation, c.idx, br.pos"
    )


# Version 4: checkpoints attest the commit index, the whole-state snapshot hash and the next
# committee (docs/consensus.md §7), and a node keeps its latest ledger snapshots to restart
# from. Version-1 checkpoint signatures covered only (epoch, round, state hash) and cannot
# certify the new content, so they are dropped; the next epoch end signs a new one.
SCHEMA_V4: Final = """
DROP TABLE checkpoints;
CREATE TABLE checkpoints (
    constellation  BLOB NOT NULL REFERENCES constellations(id),
    epoch          INTEGER NOT NULL,
    round          INTEGER NOT NULL,
    commit_idx     INTEGER NOT NULL,
    state_hash     BLOB NOT NULL,
    snapshot_hash  BLOB NOT NULL,
    next_committee BLOB NOT NULL,
    next_members   BLOB NOT NULL,
    signatures     BLOB NOT NULL,
    PRIMARY KEY (constellation, epoch)
);
CREATE TABLE snapshots (
    constellation BLOB NOT NULL REFERENCES constellations(id),
    epoch         INTEGER NOT NULL,
    round         INTEGER NOT NULL,
    commit_idx    INTEGER NOT NULL,
    hash          BLOB NOT NULL CHECK (length(hash) = 32),
    raw           BLOB NOT NULL,
    PRIMARY KEY (constellation, epoch)
);
-- A node that started (or, far behind, went on) from a snapshot holds no order between
-- its last commit and the snapshot: its next commit is the snapshot's index. Otherwise the
-- rule is unchanged (extend the order without a gap).
DROP TRIGGER commits_extend_the_order;
CREATE TRIGGER commits_extend_the_order BEFORE INSERT ON commits
WHEN NEW.idx != MAX(
    COALESCE((SELECT MAX(idx) + 1 FROM commits WHERE constellation = NEW.constellation), 0),
    COALESCE((SELECT MAX(commit_idx) FROM snapshots WHERE constellation = NEW.constellation), 0))
BEGIN
    SELECT RAISE(ABORT, 'final order: a commit must extend the order without a gap');
END;
-- Pruning (opt-in, docs/operator.md) may drop the order below a kept snapshot: the snapshot
-- holds what it led to. Above it, the order is still never deleted.
DROP TRIGGER commits_are_never_deleted;
CREATE TRIGGER commits_are_never_deleted BEFORE DELETE ON commits
WHEN OLD.idx >= COALESCE((SELECT MAX(commit_idx) FROM snapshots WHERE constellation = OLD.constellation), 0)
BEGIN
    SELECT RAISE(ABORT, 'final order: it is never rewritten');
END;
"""


async def _migrate_4(db: Db) -> None:
    await _run_script(db, SCHEMA_V4)


# Version 5: the latest signed address record per member (protocol/addressrec.py), written
# when it changes and read at start, so a node killed -9 dials its peers' last signed addresses.
SCHEMA_V5: Final = """
CREATE TABLE address_records (
    member    BLOB PRIMARY KEY CHECK (length(member) = 32),
    seq       INTEGER NOT NULL CHECK (seq >= 0),
    raw       BLOB NOT NULL CHECK (length(raw) <= 1024),
    stored_at INTEGER NOT NULL
) WITHOUT ROWID;
"""


async def _migrate_5(db: Db) -> None:
    await _run_script(db, SCHEMA_V5)


Migration = Callable[[Db], Awaitable[None]]
MIGRATIONS: Final[tuple[tuple[int, str, Migration], ...]] = (
    (1, "blocks, records, final order, peers, checkpoints, node state", _migrate_1),
    (2, "index records by block and by finality", _migrate_2),
    (3, "index blocks by epoch, for per-epoch sync heads", _migrate_3),
    (4, "checkpoints v2 (commit index, snapshot and next-committee hashes); ledger snapshots", _migrate_4),
    (5, "the latest signed address record per member", _migrate_5),
)


async def migrate(db: Db, path: Path, now_ms: int) -> None:
    try:
        # IMMEDIATE takes the write lock first, so two processes opening one file migrate once.
        await db.execute("BEGIN IMMEDIATE")
        try:
            version = await _current_version(db, path)
            if version > SCHEMA_VERSION:
                raise SchemaTooNewError(
                    f"The database {path} has schema version {version}, newer than this valuemesh "
                    f"understands ({SCHEMA_VERSION}); upgrade valuemesh to open it."
                )
            if version == 0:
                await db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                await db.execute(
                    "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, "
                    "applied_at INTEGER NOT NULL, description TEXT NOT NULL)"
                )
            for number, description, step in MIGRATIONS:
                if number > version:
                    await step(db)
                    await db.execute(
                        "INSERT INTO schema_version (version, applied_at, description) VALUES (?, ?, ?)",
                        (number, now_ms, description),
                    )
            await db.execute("COMMIT")
        except BaseException:
            await rollback(db)
            raise
    except sqlite3.DatabaseError as e:
        raise StoreError(f"The database {path} could not be prepared: {e}.") from None


# What the operator can do about a damaged database: the commands that really exist
# (cli/accounting.py import, cli/main.py daemon --recover and constellation join).
RECOVERY_HINT: Final = (
    "move node.db, node.db-wal and node.db-shm aside, load each constellation you hold an archive of "
    "with 'valuemesh import FILE', start with 'valuemesh daemon --recover' and join the others again "
    "from peers with 'valuemesh constellation join TOKEN'"
)


async def check_file(db: Db, path: Path) -> None:
    """Refuse a file that is not ours or is damaged, before anything writes to it.

    Run on the writer while it is still query-only (connection.connect). A file with no
    tables and no other program's marks is new; one with tables must carry our application
    id and schema_version table; ours must pass `PRAGMA quick_check` (docs/storage.md, Opening).
    """
    try:
        app_id = int(next(iter(await db.execute_fetchall("PRAGMA application_id")))[0])
    except sqlite3.DatabaseError as e:
        raise StoreError(f"The file {path} is not a usable database: {e}.") from None
    try:
        user_version = int(next(iter(await db.execute_fetchall("PRAGMA user_version")))[0])
        tables = {str(r[0]) for r in await db.execute_fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables and app_id in (0, APPLICATION_ID) and user_version == 0:
            return  # new (or empty): nothing to check
        if app_id != APPLICATION_ID or "schema_version" not in tables:
            raise NotOurDatabaseError(
                f"The file {path} is an SQLite database of another program, not valuemesh's.")
        problems = [str(r[0]) for r in await db.execute_fetchall("PRAGMA quick_check(1)")]
    except sqlite3.DatabaseError as e:
        if app_id != APPLICATION_ID:
            raise StoreError(f"The file {path} is not a usable database: {e}.") from None
        problems = [str(e)]  # ours (the header says so) but its schema cannot be read
    if problems != ["ok"]:
        raise StoreDamagedError(f"The database {path} is damaged ({problems[0].rstrip('.')}); {RECOVERY_HINT}.")


async def _current_version(db: Db, path: Path) -> int:
    app_id = int(next(iter(await db.execute_fetchall("PRAGMA application_id")))[0])
    tables = {str(r[0]) for r in await db.execute_fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables:
        return 0
    if app_id != APPLICATION_ID or "schema_version" not in tables:
        raise NotOurDatabaseError(f"The file {path} is an SQLite database of another program, not valuemesh's.")
    rows = list(await db.execute_fetchall("SELECT MAX(version) FROM schema_version"))
    return int(rows[0][0] or 0)
