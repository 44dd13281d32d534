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

Layout (one module per part, as Synapse splits `storage/databases/main/`)
------------------------------------------------------------------------
* `rows` and `errors`: what goes in and comes out; `schema`: the tables and their migrations.
* `connection`, `groupcommit` and `core`: the connections, the write lock and group commit.
* `batch` (what may be written) and `apply` (how each kind of write reaches its tables).
* One read mixin per domain on top of `core`: `constellations`, `blocks`, `records`
  (with pending, seqs and equivocations), `order` (commits and final records),
  `checkpoints` (with snapshots) and `peers` (with kv). `Store` composes them.
"""

from __future__ import annotations

from valuemesh.node.store.batch import Batch
from valuemesh.node.store.blocks import BlockReads
from valuemesh.node.store.checkpoints import CheckpointReads
from valuemesh.node.store.constellations import ConstellationReads
from valuemesh.node.store.errors import (
    FinalOrderError,
    NotOurDatabaseError,
    SchemaTooNewError,
    StoreDamagedError,
    StoreError,
    StoreInUseError,
)
from valuemesh.node.store.order import OrderReads
from valuemesh.node.store.peers import PeerReads
from valuemesh.node.store.records import RecordReads
from valuemesh.node.store.rows import (
    BatchResult,
    Checkpoint,
    CommitEntry,
    ConstellationInfo,
    Equivocation,
    FinalRecord,
    PeerInfo,
    StoredBlock,
)
from valuemesh.node.store.schema import MIGRATIONS, SCHEMA_VERSION


class Store(ConstellationReads, OrderReads, BlockReads, RecordReads, CheckpointReads, PeerReads):
    """The node's database. Open with `await Store.open(path)`; close with `await close()`.

    Writes go through `batch()`; each read belongs to its domain's mixin (see the module docstring).
    """


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
    "NotOurDatabaseError",
    "PeerInfo",
    "SchemaTooNewError",
    "Store",
    "StoreDamagedError",
    "StoreError",
    "StoreInUseError",
    "StoredBlock",
]
