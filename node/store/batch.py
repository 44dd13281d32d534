"""The write side's front: `Batch` validates and queues writes, applied as one transaction at exit.

What may be written is checked here, at the call; how each write reaches the tables is `apply.Apply`.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Final

from valuemesh.node.store.apply import Op
from valuemesh.node.store.checks import check_block, check_hash, check_record, check_time, is_uint, need
from valuemesh.node.store.errors import FinalOrderError
from valuemesh.node.store.rows import BatchResult, Checkpoint, CommitEntry, ConstellationInfo, PeerInfo
from valuemesh.protocol import cbor
from valuemesh.protocol.identity import MemberId
from valuemesh.protocol.records import Block, EquivocationProof, Record
from valuemesh.protocol.snapshot import MAX_SNAPSHOT_SIZE, Snapshot

MAX_BATCH_ITEMS: Final = 100_000
MAX_KV_KEY: Final = 200
MAX_KV_VALUE: Final = 64 * 1024
MAX_HOST_LEN: Final = 255
MAX_ADDRESS_RECORD: Final = 1024  # protocol/addressrec.py MAX_RECORD_SIZE
MAX_GENESIS_SIZE: Final = 1024 * 1024

CONSTELLATION_STATUSES: Final = frozenset({"joining", "active", "left", "dissolved"})
# "applicant": this node asked to join and its join record is not final yet.
TIERS: Final = frozenset({"core", "contributor", "applicant"})
PEER_SOURCES: Final = frozenset({"mdns", "bootstrap", "invite", "exchange", "inbound", "manual", "record"})

# The store's group commit (StoreCore._apply): ops, durable, item count, urgent -> what changed.
Commit = Callable[[list[Op], bool, int, bool], Awaitable[BatchResult]]


class Batch:
    """Writes queued by the caller and applied as one transaction when the block exits.

    Methods only validate and queue; nothing touches the database until `__aexit__`, so an
    exception inside the `async with` discards the batch with no state change.
    """

    def __init__(self, commit: Commit, durable: bool, urgent: bool = False) -> None:
        self._commit = commit
        self._durable = durable
        self._urgent = urgent
        self._ops: list[Op] = []
        self._items = 0
        self.result = BatchResult()

    def _queue(self, op: str, *args: Any, weight: int = 1) -> None:
        self._items += weight
        need(self._items <= MAX_BATCH_ITEMS, f"A batch holds at most {MAX_BATCH_ITEMS} items.")
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
            self.result = await self._commit(self._ops, self._durable, self._items, self._urgent)

    # constellations ---------------------------------------------------------------
    def put_constellation(self, info: ConstellationInfo) -> None:
        """Insert or update this node's view of a constellation (genesis never changes)."""
        check_hash(info.id, "A constellation id")
        need(
            isinstance(info.genesis, bytes) and 0 < len(info.genesis) <= MAX_GENESIS_SIZE,
            "A constellation's genesis must be non-empty bytes of at most 1 MiB.",
        )
        check_time(info.joined_at, "A join time")
        need(info.status in CONSTELLATION_STATUSES, f"'{info.status}' is not a constellation status.")
        need(info.my_tier in TIERS, f"'{info.my_tier}' is not a tier: use core, contributor or applicant.")
        need(isinstance(info.name, str) and len(info.name) <= 200, "A constellation name is too long.")
        need(
            all(isinstance(k, str) and is_uint(v) for k, v in info.plugins.items()),
            "Plugins must map names to major versions.",
        )
        self._queue("constellation", info, cbor.encode(dict(info.plugins)))

    def set_constellation_status(self, constellation: bytes, status: str) -> None:
        check_hash(constellation, "A constellation id")
        need(status in CONSTELLATION_STATUSES, f"'{status}' is not a constellation status.")
        self._queue("status", constellation, status)

    # blocks and records -------------------------------------------------------------
    def put_block(self, block: Block, received_at: int) -> None:
        """Store a verified block and the records it carries (idempotent)."""
        self.put_blocks([block], received_at)

    def put_blocks(self, blocks: Sequence[Block], received_at: int) -> None:
        checked = [check_block(b) for b in blocks]
        check_time(received_at, "A receive time")
        weight = sum(1 + len(b.records) for b in checked)
        self._queue("blocks", checked, received_at, weight=weight)

    def put_records(self, records: Sequence[Record], received_at: int) -> None:
        """Store verified loose records, e.g. signed here or handed in by a contributor."""
        checked = [check_record(r) for r in records]
        check_time(received_at, "A receive time")
        self._queue("records", checked, received_at, weight=len(checked))

    def put_equivocation(self, proof: EquivocationProof, found_at: int) -> None:
        """Keep a proof received from a peer; the caller has checked it with proof.verify()."""
        need(isinstance(proof, EquivocationProof), "Only EquivocationProof objects can be stored.")
        check_time(found_at, "A discovery time")
        self._queue("proof", proof, found_at)

    # pending and final order ----------------------------------------------------------
    def add_pending(self, constellation: bytes, record_ids: Sequence[bytes], added_at: int) -> None:
        """Mark stored records as proposed here and not yet final."""
        check_hash(constellation, "A constellation id")
        ids = [check_hash(r, "A record id") for r in record_ids]
        check_time(added_at, "A time")
        self._queue("pending_add", constellation, ids, added_at, weight=len(ids))

    def remove_pending(self, constellation: bytes, record_ids: Sequence[bytes]) -> None:
        check_hash(constellation, "A constellation id")
        ids = [check_hash(r, "A record id") for r in record_ids]
        self._queue("pending_remove", constellation, ids, weight=len(ids))

    def prune(self, constellation: bytes, *, below_epoch: int, below_index: int) -> None:
        """Delete the blocks of epochs before `below_epoch` and the final order before
        `below_index` (where the snapshot closing epoch `below_epoch - 1` stands; a kept
        snapshot at or above that index must exist, or the schema refuses). Records stay:
        each final record remains readable by id."""
        check_hash(constellation, "A constellation id")
        need(is_uint(below_epoch) and is_uint(below_index), "Prune bounds must be >= 0.")
        self._queue("prune", constellation, below_epoch, below_index)

    def append_commits(self, constellation: bytes, entries: Sequence[CommitEntry]) -> None:
        """Extend the final order; entries must continue it without a gap, in index order.

        Re-appending an entry that is already stored identically is accepted (replay after a
        crash); a different block at a stored index raises FinalOrderError.
        """
        check_hash(constellation, "A constellation id")
        items = list(entries)
        for e in items:
            need(isinstance(e, CommitEntry), "Commits must be CommitEntry objects.")
            need(is_uint(e.index) and is_uint(e.anchor_round), "A commit index and round must be >= 0.")
            check_hash(e.block_id, "A committed block id")
        for a, b in itertools.pairwise(items):
            if b.index != a.index + 1:
                raise FinalOrderError("Commits in one append must have consecutive indexes.")
        self._queue("commits", constellation, items, weight=len(items))

    # checkpoints, peers, kv --------------------------------------------------------------
    def put_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Store a checkpoint or add signatures to a stored one for the same epoch."""
        check_hash(checkpoint.constellation, "A constellation id")
        for h in (checkpoint.state_hash, checkpoint.snapshot_hash, checkpoint.next_committee):
            check_hash(h, "A checkpoint hash")
        need(is_uint(checkpoint.epoch) and is_uint(checkpoint.round) and is_uint(checkpoint.index),
              "A checkpoint epoch, round and index must be >= 0.")
        need(
            all(
                isinstance(k, bytes) and len(k) == 32 and isinstance(v, bytes) and len(v) == 64
                for k, v in checkpoint.signatures.items()
            ),
            "Checkpoint signatures must map 32-byte member keys to 64-byte signatures.",
        )
        self._queue("checkpoint", checkpoint)

    def put_snapshot(self, snapshot: Snapshot) -> None:
        """Keep a ledger snapshot to restart from (the latest SNAPSHOTS_KEPT per constellation)."""
        check_hash(snapshot.constellation, "A constellation id")
        need(isinstance(snapshot.raw, bytes) and len(snapshot.raw) <= MAX_SNAPSHOT_SIZE,
              "A snapshot must be bytes within the size limit.")
        self._queue("snapshot", snapshot)

    def put_peer(self, peer: PeerInfo) -> None:
        """Insert or refresh a peer address; `last_seen` never moves backwards."""
        need(isinstance(peer.member, MemberId), "A peer must be named by its member id.")
        need(isinstance(peer.host, str) and 0 < len(peer.host) <= MAX_HOST_LEN, "A peer host is empty or too long.")
        need(isinstance(peer.port, int) and 1 <= peer.port <= 65535, "A peer port must be 1 to 65535.")
        need(peer.source in PEER_SOURCES, f"'{peer.source}' is not a peer source.")
        check_time(peer.last_seen, "A last-seen time")
        need(is_uint(peer.failures), "A failure count must be >= 0.")
        self._queue("peer", peer)

    def peer_failed(self, member: MemberId, host: str, port: int) -> None:
        """Count one more failed contact with a stored peer address."""
        need(isinstance(member, MemberId), "A peer must be named by its member id.")
        self._queue("peer_failed", member.key, str(host), int(port))

    def forget_peer(self, member: MemberId, host: str, port: int) -> None:
        need(isinstance(member, MemberId), "A peer must be named by its member id.")
        self._queue("peer_forget", member.key, str(host), int(port))

    def put_address_record(self, member: MemberId, seq: int, raw: bytes, stored_at: int) -> None:
        """Keep `member`'s signed address record unless one with a higher seq is stored."""
        need(isinstance(member, MemberId), "An address record must be named by its member id.")
        need(is_uint(seq) and seq < 1 << 63, "An address record's seq must be 0 to 2**63-1.")
        need(isinstance(raw, bytes) and 0 < len(raw) <= MAX_ADDRESS_RECORD, "An address record is empty or too large.")
        check_time(stored_at, "A stored-at time")
        self._queue("address_record", member.key, seq, raw, stored_at)

    def put_kv(self, key: str, value: bytes) -> None:
        need(isinstance(key, str) and 0 < len(key) <= MAX_KV_KEY, "A setting name is empty or too long.")
        need(isinstance(value, bytes) and len(value) <= MAX_KV_VALUE, "A setting value is too large.")
        self._queue("kv", key, value)

    def delete_kv(self, key: str) -> None:
        need(isinstance(key, str) and 0 < len(key) <= MAX_KV_KEY, "A setting name is empty or too long.")
        self._queue("kv_delete", key)
