"""The rows the store hands out and takes in: frozen dataclasses, one per kind of stored thing.

Callers build these to write (through `Batch`) and get them back from reads; none holds a connection.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from valuemesh.protocol.consensus import Content
from valuemesh.protocol.identity import MemberId
from valuemesh.protocol.records import EquivocationProof, Record


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
