"""The node's durable SQLite store: blocks, records, the final order, peers and node state.

One database per node (aiosqlite, WAL). See docs/storage.md for the schema, the
durability argument (why a SIGKILL at any instant loses nothing final) and the trust boundary.

Theory of operation
-------------------
* Two connections: one writer, used only under `_write_lock` and always inside an explicit
  `BEGIN IMMEDIATE … COMMIT`, and one `query_only` reader. In WAL mode the reader sees only
  committed transactions, so a query can never observe half of a batch.
* All writes go through `Batch`: callers queue operations synchronously (cheap validation
  happens at once, so a bad argument raises before anything touches the disk) and the batch is
  applied when the `async with` block exits. Batches that arrive while a transaction is running
  are group-committed: each in its own SAVEPOINT (a failing batch is undone alone and its caller
  gets the error), all under one COMMIT. A caller returns only once its batch is committed.
* Blocks and records are immutable rows keyed by their content hash and inserted idempotently,
  so replaying a batch after a crash is harmless. A second, different object in an author's
  slot is not stored as valid: it is kept as an equivocation proof.
* `commits` is the final order. Triggers in the schema keep it gap-free, append-only and within
  one constellation, and derive `final_records` from it in the same statement.
* `block_records` and `final_records` are derived (rebuildable from blocks and commits).
* Raw bytes are decoded on read with verify=False: they were verified before they were stored;
  the id is still recomputed, so on-disk corruption is reported, never returned.
* An advisory lock file lets one process at a time open the database.
"""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, cast

import aiosqlite

from valuemesh.node import trace
from valuemesh.protocol import cbor
from valuemesh.protocol.consensus import Content
from valuemesh.protocol.errors import DecodeError, LocalError, ValidationError, ValuemeshError
from valuemesh.protocol.identity import MemberId
from valuemesh.protocol.records import (
    HASH_LEN,
    Block,
    EquivocationProof,
    Record,
    decode_block,
    decode_record,
)
from valuemesh.protocol.snapshot import MAX_SNAPSHOT_SIZE, Snapshot

# "vmsh": marks the file as a valuemesh database so we never migrate someone else's SQLite file.
APPLICATION_ID: Final = 0x766D7368
SCHEMA_VERSION: Final = 4
BUSY_TIMEOUT_MS: Final = 5_000
# Bounds the WAL file after a checkpoint; SQLite truncates it back to this size.
JOURNAL_SIZE_LIMIT: Final = 64 * 1024 * 1024
# Page cache per connection (SQLite's default is 2 MiB): holds the hot index pages of a busy node.
CACHE_KIB: Final = 32 * 1024
MAX_PAGE: Final = 10_000
# Raw bytes one page of blocks may hold (iter_blocks), whatever the blocks' sizes.
MAX_PAGE_BYTES: Final = 32 * 1024 * 1024
MAX_BATCH_ITEMS: Final = 100_000
# Batches one group commit may take: bounds the time one transaction holds the write lock.
MAX_GROUP: Final = 64
# A small group commit (at most this many items: blocks + records + ids) that does not
# fsync runs on the event loop's own thread: its statements take a few tenths of a
# millisecond, less than handing it to the writer thread costs on a busy host (a thread
# switch and a contended GIL each way). A durable one waits for an fsync (0.5 ms idle, 2-7
# ms with four daemons fsyncing on one disk); it runs on the writer thread, so the loop
# keeps reading peers and API requests meanwhile and what they queue shares the next fsync,
# unless the batch is `urgent` (our block of a round: the round waits for it, nothing
# would share it). Measured back to back (4 daemons, this 2-core host): durable commits
# inline gave the better light-load latency (p50 56, 67 vs 63, 80 ms) and on the thread
# the better one-record-per-request throughput (439-554 vs 321-348 records/s).
# Large groups (catch-up batches) always run on the writer thread.
INLINE_MAX_ITEMS: Final = 64
MAX_KV_KEY: Final = 200
MAX_KV_VALUE: Final = 64 * 1024
MAX_HOST_LEN: Final = 255
MAX_PEERS: Final = 10_000
# Ledger snapshots kept per constellation: the latest to restart from, and one before it in
# case the latest's epoch is still being decided on by peers that lag.
SNAPSHOTS_KEPT: Final = 2
MAX_GENESIS_SIZE: Final = 1024 * 1024
# Rows per multi-row VALUES statement: 5 parameters each stays far below SQLite's variable limit.
_CHUNK: Final = 200
# Parameters per multi-row INSERT (`_Apply._insert`): SQLite allows 32 766 since 3.32.
_MAX_PARAMS: Final = 1_400

CONSTELLATION_STATUSES: Final = frozenset({"joining", "active", "left", "dissolved"})
# "applicant": this node asked to join and its join record is not final yet.
TIERS: Final = frozenset({"core", "contributor", "applicant"})
PEER_SOURCES: Final = frozenset({"mdns", "bootstrap", "invite", "exchange", "inbound", "manual"})
SYNCHRONOUS_MODES: Final = frozenset({"FULL", "NORMAL"})


class StoreError(LocalError):
    """Raised when the database cannot be opened, read or written as asked."""


class SchemaTooNewError(StoreError):
    """Raised when the database was written by a newer valuemesh with a newer schema."""


class FinalOrderError(StoreError):
    """Raised when a commit would leave a gap in, or rewrite, a constellation's final order."""


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True, slots=True)
class ConstellationInfo:
    """This node's membership of one constellation: its genesis and how we take part."""

    id: bytes
    genesis: bytes
    joined_at: int
    status: str
    my_tier: str
    plugins: Mapping[str, int] = field(default_factory=dict)
    name: str = ""


@dataclass(frozen=True, slots=True)
class CommitEntry:
    """One position of the final order: the `index`-th committed block and its anchor round."""

    index: int
    block_id: bytes
    anchor_round: int


@dataclass(frozen=True, slots=True)
class StoredBlock:
    """A stored block's slot and its bytes as stored, not decoded (`Store.iter_raw_blocks`)."""

    epoch: int
    author: MemberId
    round: int
    raw: bytes


@dataclass(frozen=True, slots=True)
class FinalRecord:
    """A finalised record and where it sits in the final order (commit index, position)."""

    commit_index: int
    position: int
    record: Record


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What closes an epoch (docs/consensus.md §7) and the signatures gathered for it so far."""

    constellation: bytes
    epoch: int
    round: int
    index: int
    state_hash: bytes
    snapshot_hash: bytes
    next_committee: bytes
    signatures: Mapping[bytes, bytes] = field(default_factory=dict)
    # The committee `next_committee` hashes (protocol.consensus.encode_committee), which a
    # newcomer needs to check the next link of the chain; empty if this node never knew it.
    next_members: bytes = b""

    @property
    def content(self) -> Content:
        return Content(self.constellation, self.epoch, self.round, self.index, self.state_hash,
                       self.snapshot_hash, self.next_committee)

    @classmethod
    def of(cls, content: Content, signatures: Mapping[bytes, bytes], next_members: bytes = b"") -> Checkpoint:
        c = content
        return cls(c.constellation, c.epoch, c.round, c.index, c.state_hash, c.snapshot_hash,
                   c.next_committee, dict(signatures), next_members)


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """An address at which a member's node was found, and how reachable it has been."""

    member: MemberId
    host: str
    port: int
    source: str
    last_seen: int
    failures: int = 0


@dataclass(frozen=True, slots=True)
class Equivocation:
    """Stored evidence that `author` signed two different objects for one slot."""

    kind: str
    constellation: bytes
    author: MemberId
    slot: int
    proof: EquivocationProof
    found_at: int


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What a committed batch changed: new rows and the equivocations it uncovered."""

    new_blocks: int = 0
    new_records: int = 0
    new_commits: int = 0
    proofs: tuple[EquivocationProof, ...] = ()


# --------------------------------------------------------------------------- schema

_SCHEMA_V1: Final = """
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
_SCHEMA_V2: Final = """
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
_SCHEMA_V3: Final = """
CREATE INDEX blocks_by_epoch ON blocks(constellation, epoch, author, round);
"""

Db = aiosqlite.Connection


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
    await _run_script(db, _SCHEMA_V1)


async def _migrate_2(db: Db) -> None:
    await _run_script(db, _SCHEMA_V2)
    await _derive(db)


async def _migrate_3(db: Db) -> None:
    await _run_script(db, _SCHEMA_V3)


async def _derive(db: Db) -> None:
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
            block = _decode_stored_block(raw, bid)
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
_SCHEMA_V4: Final = """
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
    await _run_script(db, _SCHEMA_V4)


Migration = Callable[[Db], Awaitable[None]]
MIGRATIONS: Final[tuple[tuple[int, str, Migration], ...]] = (
    (1, "blocks, records, final order, peers, checkpoints, node state", _migrate_1),
    (2, "index records by block and by finality", _migrate_2),
    (3, "index blocks by epoch, for per-epoch sync heads", _migrate_3),
    (4, "checkpoints v2 (commit index, snapshot and next-committee hashes); ledger snapshots", _migrate_4),
)


# --------------------------------------------------------------------------- helpers


def _decode_stored_block(raw: bytes, expected_id: bytes) -> Block:
    try:
        block = decode_block(bytes(raw), verify=False)
    except ValuemeshError as e:
        raise StoreError(f"The stored block {expected_id.hex()[:16]} is unreadable ({e}).") from None
    if block.id != expected_id:
        raise StoreError(f"The stored block {expected_id.hex()[:16]} does not match its id.")
    return block


def _decode_stored_record(raw: bytes, expected_id: bytes) -> Record:
    try:
        record = decode_record(bytes(raw), verify=False)
    except ValuemeshError as e:
        raise StoreError(f"The stored record {expected_id.hex()[:16]} is unreadable ({e}).") from None
    if record.id != expected_id:
        raise StoreError(f"The stored record {expected_id.hex()[:16]} does not match its id.")
    return record


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise LocalError(message)


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_hash(value: object, what: str) -> bytes:
    _need(isinstance(value, bytes) and len(value) == HASH_LEN, f"{what} must be a 32-byte hash.")
    assert isinstance(value, bytes)
    return value


def _check_time(value: object, what: str) -> int:
    _need(_is_uint(value), f"{what} must be a non-negative integer of milliseconds.")
    assert isinstance(value, int)
    return value


def _check_limit(limit: int) -> None:
    _need(_is_uint(limit) and 0 < limit <= MAX_PAGE, f"A page holds 1 to {MAX_PAGE} rows.")


def _check_ids(ids: Sequence[bytes]) -> list[bytes]:
    # Lookups by id often come straight from a peer's request, so bound them here as well.
    _need(len(ids) <= MAX_PAGE, f"At most {MAX_PAGE} ids can be looked up at once.")
    return list(ids)


def _check_position(*values: int | None) -> None:
    _need(all(v is None or _is_uint(v) for v in values), "Rounds and indexes must be non-negative integers.")


def _check_block(block: object) -> Block:
    _need(isinstance(block, Block), "Only decoded and verified Block objects can be stored.")
    assert isinstance(block, Block)
    _need(len(block.id) == HASH_LEN and len(block.raw) > 0, "A block to store must carry its id and raw bytes.")
    return block


def _check_record(record: object) -> Record:
    _need(isinstance(record, Record), "Only decoded and verified Record objects can be stored.")
    assert isinstance(record, Record)
    _need(len(record.id) == HASH_LEN and len(record.raw) > 0, "A record to store must carry its id and raw bytes.")
    return record


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _seq_key(constellation: bytes, author: MemberId) -> str:
    return f"next-seq/{constellation.hex()}/{author.key.hex()}"


def _plain_sqlite_error(e: sqlite3.Error) -> str:
    text = str(e).rstrip(".")
    if "FOREIGN KEY" in text:
        return "a row refers to a constellation, block or record that is not stored"
    return text


# --------------------------------------------------------------------------- batch


class Batch:
    """Writes queued by the caller and applied as one transaction when the block exits.

    Methods only validate and queue; nothing touches the database until `__aexit__`, so an
    exception inside the `async with` discards the batch with no state change.
    """

    def __init__(self, store: Store, durable: bool, urgent: bool = False) -> None:
        self._store = store
        self._durable = durable
        self._urgent = urgent
        self._ops: list[tuple[str, tuple[Any, ...]]] = []
        self._items = 0
        self.result = BatchResult()

    def _queue(self, op: str, *args: Any, weight: int = 1) -> None:
        self._items += weight
        _need(self._items <= MAX_BATCH_ITEMS, f"A batch holds at most {MAX_BATCH_ITEMS} items.")
        self._ops.append((op, args))

    async def __aenter__(self) -> Batch:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None and self._ops:
            self.result = await self._store._apply(self._ops, self._durable, self._items, self._urgent)

    # constellations ---------------------------------------------------------------
    def put_constellation(self, info: ConstellationInfo) -> None:
        """Insert or update this node's view of a constellation (genesis never changes)."""
        _check_hash(info.id, "A constellation id")
        _need(
            isinstance(info.genesis, bytes) and 0 < len(info.genesis) <= MAX_GENESIS_SIZE,
            "A constellation's genesis must be non-empty bytes of at most 1 MiB.",
        )
        _check_time(info.joined_at, "A join time")
        _need(info.status in CONSTELLATION_STATUSES, f"'{info.status}' is not a constellation status.")
        _need(info.my_tier in TIERS, f"'{info.my_tier}' is not a tier: use core, contributor or applicant.")
        _need(isinstance(info.name, str) and len(info.name) <= 200, "A constellation name is too long.")
        _need(
            all(isinstance(k, str) and _is_uint(v) for k, v in info.plugins.items()),
            "Plugins must map names to major versions.",
        )
        self._queue("constellation", info, cbor.encode(dict(info.plugins)))

    def set_constellation_status(self, constellation: bytes, status: str) -> None:
        _check_hash(constellation, "A constellation id")
        _need(status in CONSTELLATION_STATUSES, f"'{status}' is not a constellation status.")
        self._queue("status", constellation, status)

    # blocks and records -------------------------------------------------------------
    def put_block(self, block: Block, received_at: int) -> None:
        """Store a verified block and the records it carries (idempotent)."""
        self.put_blocks([block], received_at)

    def put_blocks(self, blocks: Sequence[Block], received_at: int) -> None:
        checked = [_check_block(b) for b in blocks]
        _check_time(received_at, "A receive time")
        weight = sum(1 + len(b.records) for b in checked)
        self._queue("blocks", checked, received_at, weight=weight)

    def put_records(self, records: Sequence[Record], received_at: int) -> None:
        """Store verified loose records, e.g. signed here or handed in by a contributor."""
        checked = [_check_record(r) for r in records]
        _check_time(received_at, "A receive time")
        self._queue("records", checked, received_at, weight=len(checked))

    def put_equivocation(self, proof: EquivocationProof, found_at: int) -> None:
        """Keep a proof received from a peer; the caller has checked it with proof.verify()."""
        _need(isinstance(proof, EquivocationProof), "Only EquivocationProof objects can be stored.")
        _check_time(found_at, "A discovery time")
        self._queue("proof", proof, found_at)

    # pending and final order ----------------------------------------------------------
    def add_pending(self, constellation: bytes, record_ids: Sequence[bytes], added_at: int) -> None:
        """Mark stored records as proposed here and not yet final."""
        _check_hash(constellation, "A constellation id")
        ids = [_check_hash(r, "A record id") for r in record_ids]
        _check_time(added_at, "A time")
        self._queue("pending_add", constellation, ids, added_at, weight=len(ids))

    def remove_pending(self, constellation: bytes, record_ids: Sequence[bytes]) -> None:
        _check_hash(constellation, "A constellation id")
        ids = [_check_hash(r, "A record id") for r in record_ids]
        self._queue("pending_remove", constellation, ids, weight=len(ids))

    def prune(self, constellation: bytes, *, below_epoch: int, below_index: int) -> None:
        """Delete the blocks of epochs before `below_epoch` and the final order before
        `below_index` (where the snapshot closing epoch `below_epoch - 1` stands; a kept
        snapshot at or above that index must exist, or the schema refuses). Records stay:
        each final record remains readable by id."""
        _check_hash(constellation, "A constellation id")
        _need(_is_uint(below_epoch) and _is_uint(below_index), "Prune bounds must be >= 0.")
        self._queue("prune", constellation, below_epoch, below_index)

    def append_commits(self, constellation: bytes, entries: Sequence[CommitEntry]) -> None:
        """Extend the final order; entries must continue it without a gap, in index order.

        Re-appending an entry that is already stored identically is accepted (replay after a
        crash); a different block at a stored index raises FinalOrderError.
        """
        _check_hash(constellation, "A constellation id")
        items = list(entries)
        for e in items:
            _need(isinstance(e, CommitEntry), "Commits must be CommitEntry objects.")
            _need(_is_uint(e.index) and _is_uint(e.anchor_round), "A commit index and round must be >= 0.")
            _check_hash(e.block_id, "A committed block id")
        for a, b in itertools.pairwise(items):
            if b.index != a.index + 1:
                raise FinalOrderError("Commits in one append must have consecutive indexes.")
        self._queue("commits", constellation, items, weight=len(items))

    # checkpoints, peers, kv --------------------------------------------------------------
    def put_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Store a checkpoint or add signatures to a stored one for the same epoch."""
        _check_hash(checkpoint.constellation, "A constellation id")
        for h in (checkpoint.state_hash, checkpoint.snapshot_hash, checkpoint.next_committee):
            _check_hash(h, "A checkpoint hash")
        _need(_is_uint(checkpoint.epoch) and _is_uint(checkpoint.round) and _is_uint(checkpoint.index),
              "A checkpoint epoch, round and index must be >= 0.")
        _need(
            all(
                isinstance(k, bytes) and len(k) == 32 and isinstance(v, bytes) and len(v) == 64
                for k, v in checkpoint.signatures.items()
            ),
            "Checkpoint signatures must map 32-byte member keys to 64-byte signatures.",
        )
        self._queue("checkpoint", checkpoint)

    def put_snapshot(self, snapshot: Snapshot) -> None:
        """Keep a ledger snapshot to restart from (the latest SNAPSHOTS_KEPT per constellation)."""
        _check_hash(snapshot.constellation, "A constellation id")
        _need(isinstance(snapshot.raw, bytes) and len(snapshot.raw) <= MAX_SNAPSHOT_SIZE,
              "A snapshot must be bytes within the size limit.")
        self._queue("snapshot", snapshot)

    def put_peer(self, peer: PeerInfo) -> None:
        """Insert or refresh a peer address; `last_seen` never moves backwards."""
        _need(isinstance(peer.member, MemberId), "A peer must be named by its member id.")
        _need(isinstance(peer.host, str) and 0 < len(peer.host) <= MAX_HOST_LEN, "A peer host is empty or too long.")
        _need(isinstance(peer.port, int) and 1 <= peer.port <= 65535, "A peer port must be 1 to 65535.")
        _need(peer.source in PEER_SOURCES, f"'{peer.source}' is not a peer source.")
        _check_time(peer.last_seen, "A last-seen time")
        _need(_is_uint(peer.failures), "A failure count must be >= 0.")
        self._queue("peer", peer)

    def peer_failed(self, member: MemberId, host: str, port: int) -> None:
        """Count one more failed contact with a stored peer address."""
        _need(isinstance(member, MemberId), "A peer must be named by its member id.")
        self._queue("peer_failed", member.key, str(host), int(port))

    def forget_peer(self, member: MemberId, host: str, port: int) -> None:
        _need(isinstance(member, MemberId), "A peer must be named by its member id.")
        self._queue("peer_forget", member.key, str(host), int(port))

    def put_kv(self, key: str, value: bytes) -> None:
        _need(isinstance(key, str) and 0 < len(key) <= MAX_KV_KEY, "A setting name is empty or too long.")
        _need(isinstance(value, bytes) and len(value) <= MAX_KV_VALUE, "A setting value is too large.")
        self._queue("kv", key, value)

    def delete_kv(self, key: str) -> None:
        _need(isinstance(key, str) and 0 < len(key) <= MAX_KV_KEY, "A setting name is empty or too long.")
        self._queue("kv_delete", key)


class _Apply:
    """Applies one batch's operations inside the writer's open transaction."""

    def __init__(self, db: Db | _NowDb) -> None:
        self.db = db
        self.new_blocks = 0
        self.new_records = 0
        self.new_commits = 0
        self.proofs: list[EquivocationProof] = []
        # Record id -> constellation of the records this batch stored or found stored: records
        # are never changed or deleted, so add_pending need not look them up again.
        self.stored: dict[bytes, bytes] = {}

    async def _insert(self, head: str, rows: list[tuple[Any, ...]]) -> None:
        """`head VALUES (…), (…), …`: up to _MAX_PARAMS parameters per statement, rows in order.

        One multi-row statement rather than executemany: the sqlite3 module releases the GIL
        around each statement step and takes it back after, so executemany of n rows takes
        the GIL n times. On the writer thread, while the event loop's thread decodes and
        applies the next blocks, each retake waits for the loop's thread to yield it (up to
        the 5 ms switch interval): a 128-block catch-up transaction took 0.29 s in a traced
        catch-up, the same transaction alone 75-110 ms. Rows are inserted in list order, so
        per-row triggers see what executemany showed them. A statement binds copies of its
        rows' values at once: one batch's blocks, which a message's size limit bounds.
        """
        if not rows:
            return
        width = len(rows[0])
        one = "(" + ", ".join("?" * width) + ")"
        for chunk in _chunks(rows, max(1, _MAX_PARAMS // width)):
            await self.db.execute(f"{head} VALUES {', '.join([one] * len(chunk))}",
                                  [v for row in chunk for v in row])

    async def run(self, ops: list[tuple[str, tuple[Any, ...]]]) -> BatchResult:
        for op, args in ops:
            await getattr(self, "op_" + op)(*args)
        return BatchResult(self.new_blocks, self.new_records, self.new_commits, tuple(self.proofs))

    async def op_constellation(self, info: ConstellationInfo, plugins: bytes) -> None:
        await self.db.execute(
            "INSERT INTO constellations (id, name, genesis, joined_at, status, my_tier, plugins) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET name = excluded.name, "
            "status = excluded.status, my_tier = excluded.my_tier, plugins = excluded.plugins",
            (info.id, info.name, info.genesis, info.joined_at, info.status, info.my_tier, plugins),
        )

    async def op_status(self, constellation: bytes, status: str) -> None:
        cur = await self.db.execute("UPDATE constellations SET status = ? WHERE id = ?", (status, constellation))
        if cur.rowcount == 0:
            raise StoreError("The constellation whose status was to change is not stored.")

    async def op_blocks(self, blocks: list[Block], received_at: int) -> None:
        unique: dict[bytes, Block] = {}
        for b in blocks:
            unique.setdefault(b.id, b)
        # One lookup by slot answers both questions: is this block stored, and does its author
        # have a different block in the same slot (an equivocation)?
        holders: dict[tuple[bytes, int, bytes, int], dict[bytes, bytes]] = {}
        for chunk in _chunks(list(unique.values())):
            values = ",".join("(?, ?, ?, ?)" for _ in chunk)
            params: list[Any] = []
            for b in chunk:
                params += [b.constellation, b.epoch, b.author.key, b.round]
            rows = await self.db.execute_fetchall(
                f"WITH v(c, e, a, r) AS (VALUES {values}) "
                "SELECT DISTINCT b.constellation, b.epoch, b.author, b.round, b.id, b.raw FROM v "
                "JOIN blocks b ON b.constellation = v.c AND b.author = v.a AND b.round = v.r AND b.epoch = v.e",
                params,
            )
            for c, e, a, r, bid, raw in rows:
                holders.setdefault((bytes(c), int(e), bytes(a), int(r)), {})[bytes(bid)] = bytes(raw)
        new: list[Block] = []
        for b in unique.values():
            held = holders.setdefault((b.constellation, b.epoch, b.author.key, b.round), {})
            if b.id in held:
                continue
            if held:
                other = next(iter(held.values()))
                await self._proof("block", b.constellation, b.author.key, b.round, other, b.raw, received_at)
            held[b.id] = b.raw
            new.append(b)
        if not new:
            return
        await self._insert(
            "INSERT INTO blocks (id, constellation, epoch, author, round, raw, received_at)",
            [(b.id, b.constellation, b.epoch, b.author.key, b.round, b.raw, received_at) for b in new],
        )
        await self._insert(
            "INSERT INTO block_records (block_id, pos, record_id)",
            [(b.id, pos, r.id) for b in new for pos, r in enumerate(b.records)],
        )
        self.new_blocks += len(new)
        await self.op_records([r for b in new for r in b.records], received_at)

    async def _proof(
        self, kind: str, constellation: bytes, author: bytes, slot: int, a: bytes, b: bytes, found_at: int
    ) -> None:
        proof = EquivocationProof(kind, a, b)
        cur = await self.db.execute(
            "INSERT OR IGNORE INTO equivocations (kind, constellation, author, slot, proof, found_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (kind, constellation, author, slot, proof.encode(), found_at),
        )
        if cur.rowcount:
            self.proofs.append(proof)

    async def op_records(self, records: list[Record], received_at: int) -> None:
        unique: dict[bytes, Record] = {}
        for r in records:
            unique.setdefault(r.id, r)
        # The slot's holder tells in one lookup whether a record is new, stored, or a twin.
        taken: dict[tuple[bytes, bytes, int], tuple[bytes, bytes]] = {}
        for chunk in _chunks(list(unique.values())):
            values = ",".join("(?, ?, ?)" for _ in chunk)
            params: list[Any] = []
            for r in chunk:
                params += [r.constellation, r.author.key, r.seq]
            rows = await self.db.execute_fetchall(
                f"WITH v(c, a, s) AS (VALUES {values}) SELECT DISTINCT r.constellation, r.author, r.seq, r.id, "
                "r.raw FROM v JOIN records r ON r.constellation = v.c AND r.author = v.a AND r.seq = v.s",
                params,
            )
            for c, a, seq, rid, raw in rows:
                taken[(bytes(c), bytes(a), int(seq))] = (bytes(rid), bytes(raw))
        insert: list[Record] = []
        for r in unique.values():
            slot = (r.constellation, r.author.key, r.seq)
            holder = taken.get(slot)
            if holder is None:
                taken[slot] = (r.id, r.raw)
                insert.append(r)
                self.stored[r.id] = r.constellation
            elif holder[0] == r.id:
                self.stored[r.id] = r.constellation
            else:
                await self._proof("record", r.constellation, r.author.key, r.seq, holder[1], r.raw, received_at)
        await self._insert(
            "INSERT INTO records (id, constellation, author, seq, type, raw, received_at)",
            [(r.id, r.constellation, r.author.key, r.seq, r.type, r.raw, received_at) for r in insert],
        )
        self.new_records += len(insert)

    async def op_proof(self, proof: EquivocationProof, found_at: int) -> None:
        try:
            first = (decode_record if proof.kind == "record" else decode_block)(proof.first, verify=False)
        except ValuemeshError as e:
            raise StoreError(f"The equivocation proof cannot be stored ({e}).") from None
        slot = first.seq if isinstance(first, Record) else first.round
        known = await self.db.execute_fetchall("SELECT 1 FROM constellations WHERE id = ?", (first.constellation,))
        if not list(known):
            raise ValidationError("The equivocation proof is about a constellation this node does not follow.")
        await self._proof(proof.kind, first.constellation, first.author.key, slot, proof.first, proof.second, found_at)

    async def op_pending_add(self, constellation: bytes, ids: list[bytes], added_at: int) -> None:
        wanted = set(ids)
        found = {i for i in wanted if self.stored.get(i) == constellation}
        for chunk in _chunks(list(wanted - found)):
            marks = ",".join("?" * len(chunk))
            # The unary + keeps the planner on the id key: offered the (constellation, author,
            # seq) index it scans every record of the constellation, once per batch.
            rows = await self.db.execute_fetchall(
                f"SELECT id FROM records WHERE id IN ({marks}) AND +constellation = ?",
                (*chunk, constellation),
            )
            found.update(bytes(r[0]) for r in rows)
        if found != wanted:
            raise StoreError("Only records stored in this constellation can be marked pending.")
        # A record that is already final is not pending any more; never resurrect it.
        await self.db.executemany(
            "INSERT OR IGNORE INTO pending (constellation, record_id, added_at) "
            "SELECT ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM final_records WHERE record_id = ?)",
            [(constellation, rid, added_at, rid) for rid in ids],
        )

    async def op_pending_remove(self, constellation: bytes, ids: list[bytes]) -> None:
        await self.db.executemany(
            "DELETE FROM pending WHERE constellation = ? AND record_id = ?",
            [(constellation, rid) for rid in ids],
        )

    async def op_prune(self, constellation: bytes, below_epoch: int, below_index: int) -> None:
        # Order matters for the foreign keys: the order, then the block-record links, then blocks.
        await self.db.execute("DELETE FROM commits WHERE constellation = ? AND idx < ?", (constellation, below_index))
        await self.db.execute(
            "DELETE FROM block_records WHERE block_id IN (SELECT id FROM blocks WHERE constellation = ? AND epoch < ?)",
            (constellation, below_epoch),
        )
        await self.db.execute("DELETE FROM blocks WHERE constellation = ? AND epoch < ?", (constellation, below_epoch))

    async def op_commits(self, constellation: bytes, entries: list[CommitEntry]) -> None:
        if not entries:
            return
        first, last = entries[0].index, entries[-1].index
        # One round trip: where the order ends now, and what it already holds in our range.
        rows = await self.db.execute_fetchall(
            "SELECT MAX(COALESCE((SELECT MAX(idx) + 1 FROM commits WHERE constellation = ?1), 0), "
            "COALESCE((SELECT MAX(commit_idx) FROM snapshots WHERE constellation = ?1), 0)), c.idx, c.block_id "
            "FROM (SELECT 1) LEFT JOIN commits c ON c.constellation = ?1 AND c.idx BETWEEN ?2 AND ?3",
            (constellation, first, last),
        )
        next_idx = 0
        held: dict[int, bytes] = {}
        for n, idx, bid in rows:
            next_idx = int(n)
            if idx is not None:
                held[int(idx)] = bytes(bid)
        if first > next_idx:
            raise FinalOrderError(f"Commit index {first} would leave a gap: the final order ends before {next_idx}.")
        for e in entries:
            if e.index in held and held[e.index] != e.block_id:
                raise FinalOrderError(
                    f"Commit index {e.index} already holds another block; the final order is never rewritten."
                )
        new = [e for e in entries if e.index >= next_idx]
        if not new:
            return
        # The schema's triggers check the rest and derive finality (see _SCHEMA_V2).
        await self._insert(
            "INSERT INTO commits (constellation, idx, block_id, anchor_round)",
            [(constellation, e.index, e.block_id, e.anchor_round) for e in new],
        )
        self.new_commits += len(new)

    async def op_checkpoint(self, cp: Checkpoint) -> None:
        rows = await self.db.execute_fetchall(
            "SELECT round, commit_idx, state_hash, snapshot_hash, next_committee, signatures FROM checkpoints "
            "WHERE constellation = ? AND epoch = ?",
            (cp.constellation, cp.epoch),
        )
        sigs: dict[bytes, bytes] = {}
        for rnd, idx, state_hash, snap, nxt, raw in rows:
            if (rnd, idx, bytes(state_hash), bytes(snap), bytes(nxt)) != (
                    cp.round, cp.index, cp.state_hash, cp.snapshot_hash, cp.next_committee):
                raise StoreError(
                    f"Epoch {cp.epoch} already has a different checkpoint; two states cannot both close it."
                )
            sigs.update(_decode_signatures(bytes(raw)))
        sigs.update(cp.signatures)
        await self.db.execute(
            "INSERT INTO checkpoints (constellation, epoch, round, commit_idx, state_hash, snapshot_hash, "
            "next_committee, next_members, signatures) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (constellation, epoch) DO UPDATE SET signatures = excluded.signatures, "
            "next_members = CASE WHEN length(next_members) = 0 THEN excluded.next_members ELSE next_members END",
            (cp.constellation, cp.epoch, cp.round, cp.index, cp.state_hash, cp.snapshot_hash, cp.next_committee,
             cp.next_members, _encode_signatures(sigs)),
        )

    async def op_snapshot(self, snap: Snapshot) -> None:
        await self.db.execute(
            "INSERT OR REPLACE INTO snapshots (constellation, epoch, round, commit_idx, hash, raw) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (snap.constellation, snap.epoch, snap.round, snap.index, snap.hash, snap.raw),
        )
        await self.db.execute(
            "DELETE FROM snapshots WHERE constellation = ? AND epoch NOT IN "
            "(SELECT epoch FROM snapshots WHERE constellation = ? ORDER BY epoch DESC LIMIT ?)",
            (snap.constellation, snap.constellation, SNAPSHOTS_KEPT),
        )

    async def op_peer(self, p: PeerInfo) -> None:
        await self.db.execute(
            "INSERT INTO peers (member, host, port, source, last_seen, failures) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (member, host, port) DO UPDATE SET source = excluded.source, "
            "last_seen = MAX(last_seen, excluded.last_seen), failures = excluded.failures",
            (p.member.key, p.host, p.port, p.source, p.last_seen, p.failures),
        )
        # Peer exchange lets strangers suggest addresses: keep the table bounded by dropping the
        # stalest, most failing entries.
        await self.db.execute(
            "DELETE FROM peers WHERE (member, host, port) IN (SELECT member, host, port FROM peers "
            "ORDER BY last_seen, failures DESC LIMIT MAX(0, (SELECT COUNT(*) FROM peers) - ?))",
            (MAX_PEERS,),
        )

    async def op_peer_failed(self, member: bytes, host: str, port: int) -> None:
        await self.db.execute(
            "UPDATE peers SET failures = failures + 1 WHERE member = ? AND host = ? AND port = ?",
            (member, host, port),
        )

    async def op_peer_forget(self, member: bytes, host: str, port: int) -> None:
        await self.db.execute("DELETE FROM peers WHERE member = ? AND host = ? AND port = ?", (member, host, port))

    async def op_kv(self, key: str, value: bytes) -> None:
        await self.db.execute(
            "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    async def op_kv_delete(self, key: str) -> None:
        await self.db.execute("DELETE FROM kv WHERE key = ?", (key,))


def _encode_signatures(sigs: Mapping[bytes, bytes]) -> bytes:
    # CBOR map keys are text or integers here, so signatures are a list of [signer, sig] pairs
    # sorted by signer: one canonical encoding per set of signatures.
    return cbor.encode([[k, sigs[k]] for k in sorted(sigs)])


def _decode_signatures(raw: bytes) -> dict[bytes, bytes]:
    try:
        value = cbor.decode(raw)
        return {bytes(k): bytes(v) for k, v in value}
    except (DecodeError, TypeError, ValueError):
        raise StoreError("A stored checkpoint's signatures are unreadable.") from None


# --------------------------------------------------------------------------- store


@dataclass(eq=False, slots=True)
class _Queued:
    """A batch waiting for the next group commit, and the future its caller awaits."""

    ops: list[tuple[str, tuple[Any, ...]]]
    durable: bool
    done: asyncio.Future[BatchResult]
    items: int = 0
    urgent: bool = False


def _store_error(e: BaseException) -> BaseException:
    text = str(e)
    if isinstance(e, sqlite3.IntegrityError) and text.startswith("final order: "):
        return FinalOrderError(f"The store refused the batch and changed nothing: {text[13:]}.")
    if isinstance(e, sqlite3.IntegrityError) and "commits.constellation, commits.block_id" in text:
        return FinalOrderError("The store refused the batch and changed nothing: a block cannot be committed twice.")
    if isinstance(e, sqlite3.Error):
        return StoreError(f"The store refused the batch and changed nothing: {_plain_sqlite_error(e)}.")
    return e


class _NowDb:
    """The writer's own sqlite3 connection behind the async interface `_Apply` uses, for
    running a whole transaction on the writer's thread: every call completes at once."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._conn.execute(sql, params)

    async def execute_fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self._conn.execute(sql, params).fetchall()

    async def executemany(self, sql: str, params: Iterable[Sequence[Any]]) -> sqlite3.Cursor:
        return self._conn.executemany(sql, params)


def _now(coro: Coroutine[Any, Any, BatchResult]) -> BatchResult:
    """Run a coroutine that never suspends (its awaits are all _NowDb calls) to its result."""
    try:
        coro.send(None)
    except StopIteration as done:
        return cast(BatchResult, done.value)
    coro.close()
    raise StoreError("A store operation waited inside a transaction; it was undone.")


def _commit_group_now(conn: sqlite3.Connection, groups: list[list[tuple[str, tuple[Any, ...]]]],
                      pragma: str | None) -> list[BatchResult | Exception]:
    """One group commit, run on the writer's thread (see Store._apply for the semantics).
    Returns each batch's result or error; raises if the transaction as a whole failed."""
    if pragma is not None:
        conn.execute(f"PRAGMA synchronous = {pragma}")
    t0 = time.monotonic()
    conn.execute("BEGIN IMMEDIATE")
    db = _NowDb(conn)
    results: list[BatchResult | Exception] = []
    try:
        if len(groups) == 1:
            # Alone, the batch is the transaction: no savepoints needed.
            results.append(_now(_Apply(db).run(groups[0])))
        else:
            for ops in groups:
                conn.execute("SAVEPOINT batch")
                try:
                    results.append(_now(_Apply(db).run(ops)))
                except Exception as e:
                    conn.execute("ROLLBACK TO batch")
                    results.append(e)
                conn.execute("RELEASE batch")
        t1 = time.monotonic()
        conn.execute("COMMIT")
        tr = trace.tracer
        if tr is not None:
            t2 = time.monotonic()
            sync = conn.execute("PRAGMA synchronous").fetchone()[0]
            tr.event("txn", work=t1 - t0, commit=t2 - t1, sync=sync, n=len(groups))
    except BaseException:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # SQLite already rolled back (e.g. after SQLITE_FULL)
        raise
    return results


def _fail_all(group: list[_Queued], e: BaseException) -> None:
    for q in group:
        if not q.done.done():
            if isinstance(e, Exception):
                q.done.set_exception(_store_error(e))
            else:
                q.done.set_exception(StoreError("The write was interrupted and changed nothing."))


class Store:
    """The node's database. Open with `await Store.open(path)`; close with `await close()`."""

    def __init__(self, path: Path, writer: Db, reader: Db, synchronous: str, lock: IO[bytes]) -> None:
        self.path = path
        self._lock = lock
        self._writer = writer
        self._reader = reader
        self._synchronous = synchronous
        self._write_lock = asyncio.Lock()
        self._queue: list[_Queued] = []
        self._sync_now: str | None = synchronous
        self._closed = False

    # lifecycle ----------------------------------------------------------------------
    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        synchronous: str = "FULL",
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
        now_ms: int | None = None,
    ) -> Store:
        """Open (creating or migrating) the database at `path`.

        `synchronous="FULL"` (the default) makes every committed batch survive power loss;
        "NORMAL" survives process crashes only (see docs/storage.md). `now_ms` stamps applied
        migrations and defaults to the wall clock.
        """
        mode = synchronous.upper()
        _need(mode in SYNCHRONOUS_MODES, "synchronous must be FULL or NORMAL.")
        _need(_is_uint(busy_timeout_ms), "The busy timeout must be a non-negative integer.")
        p = Path(path)
        if str(path) == ":memory:" or not p.parent.is_dir():
            raise StoreError(f"The database must be a file in an existing directory, not '{path}'.")
        lock = _lock_file(p)
        try:
            writer = await _connect(p, mode, busy_timeout_ms, query_only=False)
        except BaseException:
            lock.close()
            raise
        try:
            await _migrate(writer, p, now_ms if now_ms is not None else int(time.time() * 1000))
            reader = await _connect(p, mode, busy_timeout_ms, query_only=True)
        except BaseException:
            await writer.close()
            lock.close()
            raise
        return cls(p, writer, reader, mode, lock)

    async def close(self) -> None:
        """Write the batches already waiting, then close; later batches raise StoreError."""
        if self._closed:
            return
        async with self._write_lock:
            # Waiting in line for the lock lets the batches queued before us commit first.
            if self._closed:
                return
            self._closed = True
            try:
                # Keep the WAL short for the next start; PASSIVE never blocks a reader.
                await self._writer.execute("PRAGMA optimize")
                await self._writer.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error:
                pass  # closing must still release both connections
            finally:
                try:
                    await self._reader.close()
                    await self._writer.close()
                finally:
                    self._lock.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # writing -------------------------------------------------------------------------
    def batch(self, *, durable: bool = True, urgent: bool = False) -> Batch:
        """Queue writes and apply them in one transaction at the end of `async with`.

        `durable=False` commits with synchronous=NORMAL: safe against a process crash but it
        may be lost on power failure until the next durable commit. Use it only for data that
        can be fetched again or re-derived (blocks from peers, peer addresses, commit
        entries), never for our own blocks or records, or sequence numbers.

        `urgent=True` lets a small durable batch commit on the event loop's thread, fsync
        included: for a write the caller's next step waits on and that little else would
        share (our block of a round). See INLINE_MAX_ITEMS.
        """
        self._check_open()
        return Batch(self, durable, urgent)

    async def _apply(self, ops: list[tuple[str, tuple[Any, ...]]], durable: bool, items: int = 0,
                     urgent: bool = False) -> BatchResult:
        """Group commit: whoever holds the write lock commits every batch queued meanwhile.

        Each batch runs inside its own SAVEPOINT, so a batch that fails is undone alone and its
        caller gets the error while the others commit; all of them share one COMMIT (one fsync).
        Every caller returns only after the transaction holding its batch has committed.
        """
        self._check_open()
        item = _Queued(ops, durable, asyncio.get_running_loop().create_future(), items, urgent)
        self._queue.append(item)
        try:
            async with self._write_lock:
                while not item.done.done():
                    group, self._queue = self._queue[:MAX_GROUP], self._queue[MAX_GROUP:]
                    if self._closed:
                        _fail_all(group, StoreError("The store was closed before the batch was written."))
                    else:
                        await self._commit_group(group)
        except asyncio.CancelledError:
            if item in self._queue:
                self._queue.remove(item)  # never applied: cancelling leaves no trace
            elif item.done.done() and not item.done.cancelled():
                item.done.exception()  # consumed here: the caller sees CancelledError instead
            raise
        return await item.done

    async def _commit_group(self, group: list[_Queued]) -> None:
        # The whole transaction is one call on the writer's thread: awaiting each statement
        # would cost a thread hop and an event-loop wake-up per statement (about ten per
        # block), which on a busy host made a one-block commit take 3-5 ms.
        want = self._synchronous if any(q.durable for q in group) else "NORMAL"
        pragma = want if want != self._sync_now else None
        ops = [q.ops for q in group]
        small = sum(q.items for q in group) <= INLINE_MAX_ITEMS
        if small and (want == "NORMAL" or all(q.urgent for q in group if q.durable)):
            # The writer's thread is idle: every use of the writer connection holds _write_lock.
            try:
                results = _commit_group_now(self._writer._conn, ops, pragma)
            except BaseException as e:
                self._sync_now = None
                _fail_all(group, e)
                if not isinstance(e, Exception):
                    raise
                return
            self._sync_now = want
            self._settle(group, results)
            return
        job = asyncio.ensure_future(self._writer._execute(_commit_group_now, self._writer._conn, ops, pragma))
        cancelled = False
        while not job.done():
            # Once handed to the thread the transaction runs to its end: wait for it so that
            # every caller learns what really happened, then let the cancellation through.
            try:
                await asyncio.shield(job)
            except asyncio.CancelledError:
                cancelled = True
            except BaseException:
                break
        e = job.exception()
        if e is not None:
            self._sync_now = None  # unknown whether the pragma ran
            _fail_all(group, e)
        else:
            self._sync_now = want
            self._settle(group, job.result())
        if cancelled:
            raise asyncio.CancelledError

    @staticmethod
    def _settle(group: list[_Queued], results: list[BatchResult | Exception]) -> None:
        for q, r in zip(group, results, strict=True):
            if isinstance(r, BaseException):
                q.done.set_exception(_store_error(r))
            else:
                q.done.set_result(r)

    async def _set_sync(self, durable: bool) -> None:
        want = self._synchronous if durable else "NORMAL"
        if want != self._sync_now:
            await self._writer.execute(f"PRAGMA synchronous = {want}")
            self._sync_now = want

    async def rebuild_derived(self) -> None:
        """Recompute block_records and final_records from blocks and commits in one transaction.

        A repair tool: these tables are derived, so rebuilding them loses nothing.
        """
        self._check_open()
        async with self._write_lock:
            await self._set_sync(True)
            db = self._writer
            await db.execute("BEGIN IMMEDIATE")
            try:
                await db.execute("DELETE FROM final_records")
                await db.execute("DELETE FROM block_records")
                await _derive(db)
                await db.execute("COMMIT")
            except BaseException:
                await _rollback(db)
                raise

    async def reserve_seq(self, constellation: bytes, author: MemberId) -> int:
        """Durably reserve the next record seq for `author` before signing with it.

        Reserving first means a crash between signing and storing can never lead us to sign
        a second, different record with the same seq (an equivocation).
        """
        _check_hash(constellation, "A constellation id")
        self._check_open()
        async with self._write_lock:
            await self._set_sync(True)
            db = self._writer
            await db.execute("BEGIN IMMEDIATE")
            try:
                seq = await _next_seq(db, constellation, author)
                await db.execute(
                    "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (_seq_key(constellation, author), (seq + 1).to_bytes(8, "big")),
                )
                await db.execute("COMMIT")
            except BaseException:
                await _rollback(db)
                raise
            return seq

    # reading -------------------------------------------------------------------------
    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        self._check_open()
        try:
            return list(await self._reader.execute_fetchall(sql, params))
        except sqlite3.Error as e:
            raise StoreError(f"The database could not be read: {_plain_sqlite_error(e)}.") from None

    async def schema_version(self) -> int:
        rows = await self._rows("SELECT MAX(version) FROM schema_version")
        return int(rows[0][0])

    async def integrity_check(self) -> list[str]:
        """Run SQLite's integrity and foreign-key checks; an empty list means healthy."""
        problems = [str(r[0]) for r in await self._rows("PRAGMA integrity_check")]
        problems = [p for p in problems if p != "ok"]
        fk = await self._rows("PRAGMA foreign_key_check")
        problems += [f"row {r[1]} of {r[0]} refers to a missing row of {r[2]}" for r in fk]
        return problems

    async def constellation(self, constellation: bytes) -> ConstellationInfo | None:
        rows = await self._rows(_CONSTELLATION_SELECT + " WHERE id = ?", (constellation,))
        return _constellation_row(rows[0]) if rows else None

    async def constellations(self) -> list[ConstellationInfo]:
        rows = await self._rows(_CONSTELLATION_SELECT + " ORDER BY joined_at, id")
        return [_constellation_row(r) for r in rows]

    async def get_block(self, block_id: bytes) -> Block | None:
        rows = await self._rows("SELECT raw FROM blocks WHERE id = ?", (block_id,))
        return _decode_stored_block(rows[0][0], block_id) if rows else None

    async def get_blocks(self, block_ids: Sequence[bytes]) -> dict[bytes, Block]:
        """Blocks by id; ids that are not stored are absent from the result."""
        out: dict[bytes, Block] = {}
        for chunk in _chunks(_check_ids(block_ids), 500):
            marks = ",".join("?" * len(chunk))
            for bid, raw in await self._rows(f"SELECT id, raw FROM blocks WHERE id IN ({marks})", chunk):
                out[bytes(bid)] = _decode_stored_block(raw, bytes(bid))
        return out

    async def get_raw_blocks(self, constellation: bytes, block_ids: Sequence[bytes]) -> list[bytes]:
        """The stored bytes of the constellation's blocks with these ids, in the order asked
        (each once), without decoding.

        For answering a peer's request for blocks by id: the peer decodes and verifies every
        block it takes (decoding a large block here first cost more than sending it). As with
        `iter_raw_blocks`, on-disk corruption reaches the peer, which refuses it."""
        found: dict[bytes, bytes] = {}
        for chunk in _chunks(_check_ids(block_ids), 500):
            marks = ",".join("?" * len(chunk))
            for bid, raw in await self._rows(
                    f"SELECT id, raw FROM blocks WHERE constellation = ? AND id IN ({marks})", (constellation, *chunk)):
                found[bytes(bid)] = bytes(raw)
        return [found[i] for i in dict.fromkeys(block_ids) if i in found]

    async def has_blocks(self, block_ids: Sequence[bytes]) -> set[bytes]:
        out: set[bytes] = set()
        for chunk in _chunks(_check_ids(block_ids), 500):
            marks = ",".join("?" * len(chunk))
            out.update(bytes(r[0]) for r in await self._rows(f"SELECT id FROM blocks WHERE id IN ({marks})", chunk))
        return out

    async def blocks(
        self,
        constellation: bytes,
        *,
        from_round: int = 0,
        to_round: int | None = None,
        author: MemberId | None = None,
        limit: int = MAX_PAGE,
        max_bytes: int | None = None,
    ) -> list[Block]:
        """Blocks with from_round <= round <= to_round, ordered by (round, author, id).

        With `max_bytes`, the list also ends before the block that would take the total of raw
        sizes past it (but always holds at least one block), bounding memory for large blocks.
        """
        _check_limit(limit)
        _check_position(from_round, to_round, max_bytes)
        where = "constellation = ? AND round >= ?"
        params: list[Any] = [constellation, from_round]
        if to_round is not None:
            where += " AND round <= ?"
            params.append(to_round)
        if author is not None:
            where += " AND author = ?"
            params.append(author.key)
        rows = _sorted_page(await self._rows(_budgeted(where), [*params, limit, max_bytes, max_bytes]))
        return [_decode_stored_block(raw, bytes(bid)) for _, _, bid, raw in rows]

    async def iter_blocks(
        self, constellation: bytes, *, from_round: int = 0, epoch: int | None = None, page: int = 500
    ) -> AsyncIterator[Block]:
        """Every block from `from_round` on (of `epoch` only, if given), in (round, author, id)
        order, read page by page.

        A page holds at most `page` blocks and `MAX_PAGE_BYTES` of raw bytes, so memory stays
        bounded however large the blocks are.
        """
        async for _rnd, _author, bid, raw in self._block_rows(constellation, from_round, epoch, page, ""):
            yield _decode_stored_block(raw, bytes(bid))

    async def iter_raw_blocks(
        self, constellation: bytes, *, from_round: int = 0, epoch: int | None = None, page: int = 500
    ) -> AsyncIterator[StoredBlock]:
        """`iter_blocks` without decoding: each block's slot and its bytes as stored.

        For relaying blocks to a peer (catch-up streams), which decodes and verifies every
        block it takes: decoding each one here as well, every record of it included, was
        most of a streaming peer's CPU. Unlike every other read, the bytes are not checked
        against the block's id, so on-disk corruption reaches the peer, which refuses it.
        """
        async for rnd, author, _bid, raw, ep in self._block_rows(constellation, from_round, epoch, page, ", b.epoch"):
            yield StoredBlock(int(ep), MemberId(bytes(author)), int(rnd), bytes(raw))

    async def _block_rows(
        self, constellation: bytes, from_round: int, epoch: int | None, page: int, extra: str
    ) -> AsyncIterator[Any]:
        """The rows of `iter_blocks`, page by page: (round, author, id, raw[, extra columns])."""
        _check_limit(page)
        _check_position(from_round)
        where = "constellation = ? AND (round, author, id) > (?, ?, ?)"
        scope: tuple[Any, ...] = (constellation,)
        if epoch is not None:
            _check_position(epoch)
            where = "constellation = ? AND epoch = ? AND (round, author, id) > (?, ?, ?)"
            scope = (constellation, epoch)
        key: tuple[int, bytes, bytes] = (from_round, b"", b"")
        while True:
            rows = _sorted_page(
                await self._rows(
                    _budgeted(where, extra=extra),
                    (*scope, *key, page, MAX_PAGE_BYTES, MAX_PAGE_BYTES),
                )
            )
            if not rows:
                return
            for row in rows:
                yield row
                key = (int(row[0]), bytes(row[1]), bytes(row[2]))

    async def heads(self, constellation: bytes, from_epoch: int = 0) -> dict[tuple[MemberId, int], int]:
        """Per author and epoch (from `from_epoch` on), the highest stored round: what a peer
        needs to say what we miss. Rounds restart at each epoch's first round."""
        _check_position(from_epoch)
        # Loose index scans on blocks_by_epoch: hop from epoch to epoch, then from author to
        # author, and read each one's maximum, so the cost grows with epochs x authors, not
        # with blocks.
        epochs = await self._rows(
            "WITH RECURSIVE e(epoch) AS ("
            " SELECT MIN(epoch) FROM blocks WHERE constellation = ?1 AND epoch >= ?2"
            " UNION ALL"
            " SELECT (SELECT MIN(epoch) FROM blocks WHERE constellation = ?1 AND epoch > e.epoch)"
            " FROM e WHERE e.epoch IS NOT NULL)"
            " SELECT epoch FROM e WHERE epoch IS NOT NULL",
            (constellation, from_epoch),
        )
        out: dict[tuple[MemberId, int], int] = {}
        for (epoch,) in epochs:
            rows = await self._rows(
                "WITH RECURSIVE a(author) AS ("
                " SELECT MIN(author) FROM blocks WHERE constellation = ?1 AND epoch = ?2"
                " UNION ALL"
                " SELECT (SELECT MIN(author) FROM blocks WHERE constellation = ?1 AND epoch = ?2"
                " AND author > a.author) FROM a WHERE a.author IS NOT NULL)"
                " SELECT author, (SELECT MAX(round) FROM blocks WHERE constellation = ?1 AND epoch = ?2"
                " AND author = a.author) FROM a WHERE author IS NOT NULL",
                (constellation, int(epoch)),
            )
            out.update({(MemberId(bytes(a)), int(epoch)): int(r) for a, r in rows})
        return out

    async def block_count(self, constellation: bytes) -> int:
        rows = await self._rows("SELECT COUNT(*) FROM blocks WHERE constellation = ?", (constellation,))
        return int(rows[0][0])

    async def get_record(self, record_id: bytes) -> Record | None:
        rows = await self._rows("SELECT raw FROM records WHERE id = ?", (record_id,))
        return _decode_stored_record(rows[0][0], record_id) if rows else None

    async def get_records(self, record_ids: Sequence[bytes]) -> dict[bytes, Record]:
        out: dict[bytes, Record] = {}
        for chunk in _chunks(_check_ids(record_ids), 500):
            marks = ",".join("?" * len(chunk))
            for rid, raw in await self._rows(f"SELECT id, raw FROM records WHERE id IN ({marks})", chunk):
                out[bytes(rid)] = _decode_stored_record(raw, bytes(rid))
        return out

    async def record_status(self, record_id: bytes) -> str | None:
        """ "final", "pending" (proposed here, not final), "known" (stored) or None."""
        rows = await self._rows(
            "SELECT EXISTS (SELECT 1 FROM final_records WHERE record_id = ?), "
            "EXISTS (SELECT 1 FROM pending WHERE record_id = ?), "
            "EXISTS (SELECT 1 FROM records WHERE id = ?)",
            (record_id, record_id, record_id),
        )
        final, pending, known = rows[0]
        return "final" if final else "pending" if pending else "known" if known else None

    async def pending(self, constellation: bytes, *, limit: int = MAX_PAGE) -> list[Record]:
        """Records proposed here and not yet final, oldest first."""
        _check_limit(limit)
        rows = await self._rows(
            "SELECT r.id, r.raw FROM pending p JOIN records r ON r.id = p.record_id "
            "WHERE p.constellation = ? ORDER BY p.added_at, r.author, r.seq LIMIT ?",
            (constellation, limit),
        )
        return [_decode_stored_record(raw, bytes(rid)) for rid, raw in rows]

    async def next_seq(self, constellation: bytes, author: MemberId) -> int:
        """The seq `reserve_seq` would hand out next (a read; reserves nothing)."""
        self._check_open()
        return await _next_seq(self._reader, constellation, author)

    async def commit_count(self, constellation: bytes) -> int:
        """How many blocks are final; also the index the next commit must carry."""
        rows = await self._rows(
            "SELECT MAX(COALESCE((SELECT MAX(idx) + 1 FROM commits WHERE constellation = ?1), 0), "
            "COALESCE((SELECT MAX(commit_idx) FROM snapshots WHERE constellation = ?1), 0))", (constellation,)
        )
        return int(rows[0][0])

    async def holds_order_to(self, constellation: bytes, end: int) -> bool:
        """Whether the final order from 0 to `end` (exclusive) is all here."""
        rows = await self._rows("SELECT COUNT(*) FROM commits WHERE constellation = ? AND idx < ?",
                                (constellation, end))
        return int(rows[0][0]) == end

    async def first_commit_index(self, constellation: bytes) -> int | None:
        """The index of the first commit held (0, or a snapshot's for a node started from
        one); None if none."""
        rows = await self._rows("SELECT MIN(idx) FROM commits WHERE constellation = ?", (constellation,))
        return None if rows[0][0] is None else int(rows[0][0])

    async def commits(self, constellation: bytes, *, start: int = 0, limit: int = MAX_PAGE) -> list[CommitEntry]:
        """The final order from index `start`, one page."""
        _check_limit(limit)
        _check_position(start)
        rows = await self._rows(
            "SELECT idx, block_id, anchor_round FROM commits WHERE constellation = ? AND idx >= ? ORDER BY idx LIMIT ?",
            (constellation, start, limit),
        )
        return [CommitEntry(int(i), bytes(b), int(r)) for i, b, r in rows]

    async def iter_commits(
        self, constellation: bytes, *, start: int = 0, page: int = 2_000
    ) -> AsyncIterator[CommitEntry]:
        """The whole final order from `start`, e.g. for Consensus.restore after a restart."""
        while True:
            entries = await self.commits(constellation, start=start, limit=page)
            for e in entries:
                yield e
            if len(entries) < page:
                return
            start = entries[-1].index + 1

    async def final_records(self, constellation: bytes, *, start: int = 0, limit: int = MAX_PAGE) -> list[FinalRecord]:
        """Final records in ledger order from commit index `start`, each once (first commit wins)."""
        _check_limit(limit)
        _check_position(start)
        rows = await self._rows(
            "SELECT f.commit_idx, f.pos, f.record_id, r.raw, c.block_id FROM final_records f "
            "JOIN commits c ON c.constellation = f.constellation AND c.idx = f.commit_idx "
            "LEFT JOIN records r ON r.id = f.record_id "
            "WHERE f.constellation = ? AND f.commit_idx >= ? ORDER BY f.commit_idx, f.pos LIMIT ?",
            (constellation, start, limit),
        )
        out: list[FinalRecord] = []
        for idx, pos, rid, raw, bid in rows:
            if raw is not None:
                record = _decode_stored_record(raw, bytes(rid))
            else:
                # The record lost its slot to an equivocating twin: read it from its block.
                block = await self.get_block(bytes(bid))
                if block is None:
                    raise StoreError("A committed block is missing from the store.")
                record = block.records[int(pos)]
            out.append(FinalRecord(int(idx), int(pos), record))
        return out

    async def equivocations(self, constellation: bytes) -> list[Equivocation]:
        rows = await self._rows(
            "SELECT kind, author, slot, proof, found_at FROM equivocations WHERE constellation = ? "
            "ORDER BY found_at, kind, author, slot",
            (constellation,),
        )
        out = []
        for kind, author, slot, proof, found_at in rows:
            try:
                m = cbor.decode(bytes(proof))
                p = EquivocationProof(str(m["kind"]), bytes(m["a"]), bytes(m["b"]))
            except (DecodeError, KeyError, TypeError):
                raise StoreError("A stored equivocation proof is unreadable.") from None
            out.append(Equivocation(str(kind), constellation, MemberId(bytes(author)), int(slot), p, int(found_at)))
        return out

    async def equivocators(self, constellation: bytes) -> set[MemberId]:
        rows = await self._rows("SELECT DISTINCT author FROM equivocations WHERE constellation = ?", (constellation,))
        return {MemberId(bytes(r[0])) for r in rows}

    async def checkpoints(self, constellation: bytes) -> list[Checkpoint]:
        rows = await self._rows(
            "SELECT epoch, round, commit_idx, state_hash, snapshot_hash, next_committee, signatures, next_members "
            "FROM checkpoints WHERE constellation = ? ORDER BY epoch",
            (constellation,),
        )
        return [
            Checkpoint(constellation, int(e), int(r), int(i), bytes(h), bytes(sh), bytes(n),
                       _decode_signatures(bytes(s)), bytes(nm))
            for e, r, i, h, sh, n, s, nm in rows
        ]

    async def latest_checkpoint(self, constellation: bytes) -> Checkpoint | None:
        cps = await self.checkpoints(constellation)
        return cps[-1] if cps else None

    async def snapshot_part(
        self, constellation: bytes, epoch: int, offset: int, size: int
    ) -> tuple[bytes, int] | None:
        """`size` bytes of an epoch's kept snapshot from `offset`, and its whole length; None if
        not kept or `offset` is past its end. Read as a slice, not decoded: a peer fetching a
        large snapshot part by part would otherwise cost a full decode per part here (the
        fetching node checks the whole against its certificate)."""
        _check_position(epoch, offset)
        _need(_is_uint(size) and 0 < size <= MAX_PAGE_BYTES, f"A snapshot part holds 1 to {MAX_PAGE_BYTES} bytes.")
        rows = await self._rows(
            "SELECT substr(raw, ? + 1, ?), length(raw) FROM snapshots WHERE constellation = ? AND epoch = ?",
            (offset, size, constellation, epoch),
        )
        if not rows or offset >= int(rows[0][1]):
            return None
        return bytes(rows[0][0]), int(rows[0][1])

    async def latest_snapshot(self, constellation: bytes, epoch: int | None = None) -> Snapshot | None:
        """The newest kept ledger snapshot (of `epoch`, if given), checked against its stored
        hash; None if none."""
        rows = await self._rows(
            "SELECT hash, raw FROM snapshots WHERE constellation = ? AND epoch = COALESCE(?, epoch) "
            "ORDER BY epoch DESC LIMIT 1", (constellation, epoch)
        )
        if not rows:
            return None
        h, raw = bytes(rows[0][0]), bytes(rows[0][1])
        try:
            snap = Snapshot.decode(raw)
        except ValuemeshError:
            raise StoreError("A stored ledger snapshot is unreadable.") from None
        if snap.hash != h or snap.constellation != constellation:
            raise StoreError("A stored ledger snapshot does not match its hash.")
        return snap

    async def peers(self, *, limit: int = MAX_PAGE) -> list[PeerInfo]:
        """Known peer addresses, most recently seen and least failing first."""
        _check_limit(limit)
        rows = await self._rows(
            "SELECT member, host, port, source, last_seen, failures FROM peers "
            "ORDER BY last_seen DESC, failures, member, host, port LIMIT ?",
            (limit,),
        )
        return [PeerInfo(MemberId(bytes(m)), str(h), int(p), str(s), int(t), int(f)) for m, h, p, s, t, f in rows]

    async def get_kv(self, key: str) -> bytes | None:
        rows = await self._rows("SELECT value FROM kv WHERE key = ?", (key,))
        return bytes(rows[0][0]) if rows else None

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("The store is closed.")


_CONSTELLATION_SELECT: Final = "SELECT id, genesis, joined_at, status, my_tier, plugins, name FROM constellations"


def _budgeted(where: str, extra: str = "") -> str:
    """A page of blocks matching `where`, cut by count, then by bytes (parameters: limit, budget, budget);
    each row is (round, author, id, raw) and then the `extra` columns of `b`.

    The inner query reads only each row's length (SQLite gets it from the record header, not
    the blob), so rows past the byte budget are never loaded. A NULL budget means no byte cut.
    """
    return (
        f"SELECT b.round, b.author, b.id, b.raw{extra} FROM (SELECT id, "
        "SUM(length(raw)) OVER (ORDER BY round, author, id ROWS UNBOUNDED PRECEDING) - length(raw) AS before "
        f"FROM blocks WHERE {where} ORDER BY round, author, id LIMIT ?) p "
        "JOIN blocks b ON b.id = p.id WHERE ? IS NULL OR p.before = 0 OR p.before < ?"
    )


def _sorted_page(rows: list[Any]) -> list[Any]:
    # Sorting here, not in SQL, spares SQLite copying every raw blob through a sorter.
    return sorted(rows, key=lambda r: (int(r[0]), bytes(r[1]), bytes(r[2])))


def _constellation_row(row: Any) -> ConstellationInfo:
    cid, genesis, joined_at, status, tier, plugins, name = row
    try:
        plugin_map = cbor.decode(bytes(plugins))
    except DecodeError:
        raise StoreError("A stored constellation's plugin set is unreadable.") from None
    return ConstellationInfo(
        bytes(cid), bytes(genesis), int(joined_at), str(status), str(tier), dict(plugin_map), str(name)
    )


async def _next_seq(db: Db, constellation: bytes, author: MemberId) -> int:
    rows = list(
        await db.execute_fetchall(
            "SELECT (SELECT value FROM kv WHERE key = ?), "
            "(SELECT MAX(seq) + 1 FROM records WHERE constellation = ? AND author = ?)",
            (_seq_key(constellation, author), constellation, author.key),
        )
    )
    reserved, stored = rows[0]
    return max(int.from_bytes(reserved, "big") if reserved is not None else 0, stored or 0)


async def _rollback(db: Db) -> None:
    try:
        await db.execute("ROLLBACK")
    except sqlite3.Error:
        pass  # SQLite already rolled back (e.g. after SQLITE_FULL); nothing is left to undo


def _lock_file(path: Path) -> IO[bytes]:
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
        raise StoreError(f"The database {path} is in use by another valuemesh process.") from None
    return f


async def _connect(path: Path, synchronous: str, busy_timeout_ms: int, *, query_only: bool) -> Db:
    try:
        # check_same_thread=False: small group commits run on the event loop's thread while
        # the connection's own thread is idle (see INLINE_MAX_ITEMS); never both at once.
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


async def _migrate(db: Db, path: Path, now_ms: int) -> None:
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
            await _rollback(db)
            raise
    except sqlite3.DatabaseError as e:
        raise StoreError(f"The database {path} could not be prepared: {e}.") from None


async def _current_version(db: Db, path: Path) -> int:
    app_id = int(next(iter(await db.execute_fetchall("PRAGMA application_id")))[0])
    tables = {str(r[0]) for r in await db.execute_fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables:
        return 0
    if app_id != APPLICATION_ID or "schema_version" not in tables:
        raise StoreError(f"The file {path} is an SQLite database of another program, not valuemesh's.")
    rows = list(await db.execute_fetchall("SELECT MAX(version) FROM schema_version"))
    return int(rows[0][0] or 0)


__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Batch",
    "BatchResult",
    "Checkpoint",
    "CommitEntry",
    "ConstellationInfo",
    "Equivocation",
    "FinalOrderError",
    "FinalRecord",
    "PeerInfo",
    "SchemaTooNewError",
    "Store",
    "StoreError",
    "StoredBlock",
]
