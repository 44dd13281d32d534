"""The leaderless DAG consensus state machine of one constellation: it takes verified
blocks, records to propose and clock ticks, and returns blocks to send and the final order.

Theory of operation
-------------------
Every core member appends one signed block per round. A block of round r > 0 names as
parents blocks of round r-1 whose authors hold a quorum q of the weight (q = ceil((n+f+1)/2),
f = floor((n-1)/3)); round 0 has no parents. A node creates its block of round r as soon as
it holds a quorum of round r-1 (the threshold clock) and either holds the block of the
anchor slot of r-1 or has waited ROUND_TIMEOUT_MS for it; so a silent member costs one
timeout, never a stall.

Anchor slot of round r = committee.leader(r), a fixed rotation over all members. For a
block L in the slot of round r (an equivocator may have several):
  vote        a block V of round r+1 votes for L iff L is among V's parents;
  certificate a block C of round r+2 certifies L iff the authors of C's parents voting for
              L hold >= q;
  direct commit  authors of certificates of L hold >= q;
  direct skip    round r+1 holds >= q of authors and, for every known L of the slot, authors
                 with a round r+1 block not voting for L hold >= q;
  indirect       otherwise find the lowest slot s >= r+3 whose decision is not skip; if it is
                 a commit of block A, commit the L certified by a block in A's history, or
                 skip if none; if it is undecided, r stays undecided.
Decided slots are consumed in round order; an undecided slot stops the sequence. A
committed anchor A orders every block of its causal history (parent links only) that
no earlier anchor ordered and whose round is > A.round - GC_DEPTH_ROUNDS, sorted by (round,
author key, id). An author with two blocks of one round in that history, or one there and
another already consumed, is an equivocator from then on: its not-yet-ordered blocks are
consumed without being ordered, by every node alike, since the history is a function of A.

Records are deduplicated by id at ordering, so re-proposing a record whose block may
never be ordered is safe. Nodes stop making rounds when no record is queued and no block
near the commit frontier carries an unordered record (quiescence); `propose`, a peer's
block carrying unordered records, or a peer's block of the round we would sign next (we
join that round) wakes them.

Epochs end at a committed anchor. The first committed anchor A whose ordered history
holds a record of a reconfiguring type ends the epoch: the machine hands out A's history
with `epoch_end = A.round` and then orders nothing more and signs nothing until the node,
having applied those records, calls `schedule_committee` (the next epoch, starting at
A.round + 1) or `keep_committee` (the records changed nothing). The old epoch's blocks
above A are never ordered (their records are re-proposed); the new epoch's first round has
no parents, like round 0, so its DAG never reaches back into the old one. Since A is the
same anchor in every honest node's order, every honest node switches at the same point,
and since the old epoch runs on untouched until A commits, the switch waits for nothing
but an ordinary commit: no undecided slot can hold the clock. Blocks carry their epoch, so
an old-epoch and a new-epoch block of one author and round are not an equivocation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..errors import AuthorizationError, LocalError, ValidationError, ValuemeshError
from ..identity import Identity, MemberId
from ..records import MAX_BLOCK_SIZE, Block, EquivocationProof, Record, check_equivocation
from .committee import Committee

# Virtual-ms a node waits for the anchor-slot block of a round once it holds a quorum.
ROUND_TIMEOUT_MS = 1_000
# Re-ask peers for still-missing blocks after this long.
FETCH_RETRY_MS = 500
# With work to do and no progress for this long, re-send our last block and ask for heads.
STALL_MS = 1_500
# Blocks this many rounds below the anchor being ordered are never ordered (deterministic),
# and are dropped from memory (the node keeps them on disk). Small on purpose: a late
# block's records are re-proposed anyway.
GC_DEPTH_ROUNDS = 6
# Record types whose commit may change the committee (the built-in membership plugin): an
# anchor ordering one ends the epoch.
RECONFIGURING_TYPES = frozenset({"membership"})
# Our own block still unordered this many rounds behind the commit frontier is given up on
# and its records go back to the queue; also the reach of "pending work in the DAG".
REPROPOSE_AFTER_ROUNDS = 4
MAX_PENDING_RECORDS = 10_000
MAX_RECORDS_PER_BLOCK = 512
# Bytes of a block left for everything but its records: the header and signature
# (BLOCK_HEADROOM) and one parent id per committee member (PARENT_BYTES, with its CBOR head).
BLOCK_HEADROOM = 16 * 1024
PARENT_BYTES = 40
MAX_BUFFERED_BLOCKS = 4_096
MAX_BUFFERED_PER_AUTHOR = 1_024
MAX_BLOCKS_PER_CALL = 16
MAX_MISSING_PER_OUTPUT = 512
# An anchor owner whose latest block here is more than this many rounds below the anchor's
# round is behind (down, cut off or catching up): its anchor block is not waited for.
ANCHOR_LAG_ROUNDS = 2
# The adaptive anchor wait is this many times the median of the last ROUND_SAMPLES rounds.
ADAPTIVE_FACTOR = 3
ROUND_SAMPLES = 32


@dataclass(frozen=True, slots=True)
class Params:
    """Tunable limits and timers; tests and the simulator may shorten them."""

    round_timeout_ms: int = ROUND_TIMEOUT_MS
    # When set, the anchor wait adapts: ADAPTIVE_FACTOR x the median of recent round
    # durations, never below this floor nor above round_timeout_ms. It changes when a
    # node moves on (liveness), never what is ordered (safety).
    min_round_timeout_ms: int | None = None
    fetch_retry_ms: int = FETCH_RETRY_MS
    stall_ms: int = STALL_MS
    max_pending_records: int = MAX_PENDING_RECORDS
    max_records_per_block: int = MAX_RECORDS_PER_BLOCK
    max_buffered_blocks: int = MAX_BUFFERED_BLOCKS
    max_buffered_per_author: int = MAX_BUFFERED_PER_AUTHOR
    reconfiguring_types: frozenset[str] = RECONFIGURING_TYPES
    # When set, an epoch also ends at its first committed anchor this many rounds or more
    # after its start, whatever the records: periodic checkpoints (a snapshot a newcomer can
    # start from) even for a core that never changes. The node then starts the next epoch
    # with the same committee.
    epoch_rounds: int | None = None


@dataclass(frozen=True, slots=True)
class Committed:
    """One block in the final order: its global position and the anchor that ordered it.

    `records` are the block's records not ordered before (a record re-proposed in two
    blocks is final at its first position only); the ledger applies exactly these.
    """

    block: Block
    anchor_round: int
    index: int
    records: tuple[Record, ...] = ()


@dataclass(frozen=True, slots=True)
class Output:
    """What the node must do after one input.

    Persist `blocks` (ours, new) before broadcasting them; fetch `missing` from peers;
    apply `committed` in order; gossip `proofs`; re-send `rebroadcast` and, if
    `request_sync`, ask peers for their latest blocks; call `tick` at `next_tick_ms`.
    If `epoch_end` is set, the last anchor of `committed` (of that round) ended the epoch:
    apply its records, then call `schedule_committee` or `keep_committee`.
    """

    blocks: tuple[Block, ...] = ()
    missing: tuple[bytes, ...] = ()
    committed: tuple[Committed, ...] = ()
    proofs: tuple[EquivocationProof, ...] = ()
    rebroadcast: tuple[Block, ...] = ()
    request_sync: bool = False
    next_tick_ms: int | None = None
    epoch_end: int | None = None


_EMPTY = Output()


@dataclass(slots=True)
class _Step:
    """Mutable accumulator for one call; turned into an Output at the end."""

    now: int
    blocks: list[Block] = field(default_factory=list)
    missing: list[bytes] = field(default_factory=list)
    committed: list[Committed] = field(default_factory=list)
    proofs: list[EquivocationProof] = field(default_factory=list)
    rebroadcast: list[Block] = field(default_factory=list)
    request_sync: bool = False


class _Decision:
    __slots__ = ("block", "kind")

    def __init__(self, kind: str, block: Block | None = None) -> None:
        self.kind = kind  # "commit", "skip" or "undecided"
        self.block = block


_UNDECIDED = _Decision("undecided")
_SKIP = _Decision("skip")


class Consensus:
    """The consensus machine of one constellation on one node (see the module docstring).

    `identity` None makes an observer: it follows the DAG and commits, never proposes.
    """

    def __init__(
        self,
        constellation: bytes,
        committee: Committee,
        identity: Identity | None,
        params: Params = Params(),
        *,
        first_index: int = 0,
    ) -> None:
        """`committee` may be a later epoch's (a node started from that epoch's checkpoint):
        the machine then starts at its first round, and `first_index` is the index of the
        first block it will order (the commit count the checkpoint attests)."""
        if first_index < 0:
            raise LocalError("The first commit index must not be negative.")
        start = committee.start_round
        self._cid = constellation
        self._committees: list[Committee] = [committee]
        self._identity = identity
        self._me = identity.member if identity else None
        self._p = params
        # The DAG: blocks whose every parent is known (or below the memory horizon).
        self._blocks: dict[bytes, Block] = {}
        self._rounds: dict[int, dict[MemberId, list[Block]]] = {}
        self._round_weight: dict[int, int] = {}
        self._quorum_round = start - 1
        self._quorum_at_ms: dict[int, int] = {}
        self._round_ms: list[int] = []  # recent round durations, for the adaptive anchor wait
        self._horizon = start  # blocks below this round are gone from memory
        # During `restore` only: the ids of every stored block, and per epoch the highest round
        # at which a stored block may lack a parent that was never stored (`_unknown_links`).
        self._stored: frozenset[bytes] | None = None
        self._boundary: dict[int, int] = {}
        # Blocks waiting for parents, and blocks of an epoch not yet scheduled.
        self._buffer: dict[bytes, Block] = {}
        self._buffer_per_author: dict[MemberId, int] = {}
        self._waiting_on: dict[bytes, list[bytes]] = {}
        self._missing: dict[bytes, int] = {}  # id -> when last requested
        self._future: dict[bytes, Block] = {}
        self._proved: set[tuple[MemberId, int]] = set()
        self.rejected = 0  # buffered blocks found invalid once their parents arrived
        # Our proposer state.
        self._last_own_round = start - 1
        self._last_own: Block | None = None
        self._pending: dict[bytes, Record] = {}
        self._inflight: dict[bytes, Block] = {}  # own blocks with records, not yet ordered
        self._last_progress_ms = 0
        # The commit state: a pure function of the DAG, identical on every honest node.
        self._decided_upto = start - 1
        self._dirty = False  # a block arrived that may change an undecided slot
        self._last_anchor_round = -1
        self._consumed: set[bytes] = set()
        self._slot_taken: dict[tuple[MemberId, int], bytes] = {}
        self._excluded: set[MemberId] = set()
        self._ordered_records: set[bytes] = set()
        self._unordered_work: dict[bytes, int] = {}  # block id -> round, blocks with records
        self._next_index = first_index
        self._first_index = first_index
        # Set from the commit of an epoch-ending anchor until the node says what comes next.
        self._closing: Block | None = None
        # Members the node has no link to: their anchor block is not waited for.
        self._unreachable: frozenset[MemberId] = frozenset()
        self._latest: dict[MemberId, int] = {}  # each author's highest round in this epoch
        self._epoch_start = committee.start_round

    # ------------------------------------------------------------------ queries

    @property
    def member(self) -> MemberId | None:
        return self._me

    @property
    def round(self) -> int:
        """The round this node would create next (threshold clock)."""
        return self._quorum_round + 1

    @property
    def last_committed_round(self) -> int:
        """Round of the last committed anchor, -1 before the first."""
        return self._last_anchor_round

    @property
    def decided_round(self) -> int:
        """Every anchor slot up to this round is decided and handed out."""
        return self._decided_upto

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def guarantee(self) -> str:
        return self.committee_at(max(self.round, 0)).guarantee

    @property
    def excluded(self) -> frozenset[MemberId]:
        """Authors excluded from ordering as equivocators (same on every honest node)."""
        return frozenset(self._excluded)

    @property
    def last_own_round(self) -> int:
        return self._last_own_round

    def missing(self) -> tuple[bytes, ...]:
        return tuple(sorted(self._missing))[:MAX_MISSING_PER_OUTPUT]

    def committee_at(self, round: int) -> Committee:
        for c in reversed(self._committees):
            if c.start_round <= round:
                return c
        return self._committees[0]

    def has_block(self, block_id: bytes) -> bool:
        return block_id in self._blocks

    def get_block(self, block_id: bytes) -> Block | None:
        return self._blocks.get(block_id) or self._buffer.get(block_id)

    def blocks_at(self, round: int) -> tuple[Block, ...]:
        per = self._rounds.get(round, {})
        return tuple(b for bs in per.values() for b in bs)

    @property
    def top_round(self) -> int:
        return max(self._rounds, default=-1)

    @property
    def anchor_wait_ms(self) -> int:
        """How long a node with a quorum waits for the round's anchor block."""
        floor = self._p.min_round_timeout_ms
        if floor is None or not self._round_ms:
            return self._p.round_timeout_ms
        median = sorted(self._round_ms)[len(self._round_ms) // 2]
        return max(floor, min(self._p.round_timeout_ms, ADAPTIVE_FACTOR * median))

    def has_work(self) -> bool:
        """True while this node should keep making rounds (the opposite of quiescent)."""
        if self._pending:
            return True
        floor = self._last_anchor_round - REPROPOSE_AFTER_ROUNDS
        return any(r >= floor for r in self._unordered_work.values())

    # ------------------------------------------------------------------ inputs

    def add_block(self, block: Block, now_ms: int) -> Output:
        """Take a block that the node decoded and signature-checked.

        Raise ValidationError (and change nothing) if it breaks a structural rule that
        can be checked now; buffer it and ask for its parents if some are unknown.
        """
        step = _Step(now_ms)
        if self._admit(block, step):
            self._advance(step)
        return self._finish(step)

    def add_blocks(self, blocks: Sequence[Block], now_ms: int) -> tuple[Output, list[tuple[int, ValuemeshError]]]:
        """`add_block` of each of `blocks` in one step, deciding and creating our block once,
        after all of them; also the refusals, as (index in `blocks`, error).

        The DAG, the decisions and the order are those of adding them one by one (each
        refused block changes nothing, and deciding depends on the DAG alone). Our own blocks
        differ, as they may with any message timing: one by one, a node catching up through
        many rounds in one batch joined every round its peers had signed, signing, storing
        and sending a block for each though nobody would build on them any more; now it
        signs only for the round the batch brings it to."""
        step = _Step(now_ms)
        errors: list[tuple[int, ValuemeshError]] = []
        inserted = False
        for i, block in enumerate(blocks):
            try:
                inserted = self._admit(block, step) or inserted
            except ValuemeshError as exc:  # _admit refuses before it changes anything
                errors.append((i, exc))
        if inserted:
            self._advance(step)
        return self._finish(step), errors

    def propose(self, records: Sequence[Record], now_ms: int) -> Output:
        """Queue records for our next blocks and wake the constellation."""
        if self._identity is None or self._me is None:
            raise LocalError("An observer node cannot propose; hand records to a core node.")
        if not any(self._me in c for c in self._committees if c.start_round >= self.round) and (
            self._me not in self.committee_at(self.round)
        ):
            raise LocalError("This node is not in the core; hand records to a core node.")
        fresh: dict[bytes, Record] = {}
        for rec in records:
            if rec.constellation != self._cid:
                raise ValidationError("A proposed record belongs to another constellation.")
            if rec.id not in self._ordered_records and rec.id not in self._pending:
                fresh[rec.id] = rec
        if len(self._pending) + len(fresh) > self._p.max_pending_records:
            raise LocalError("The queue of records to propose is full; try again shortly.")
        self._pending.update(fresh)
        step = _Step(now_ms)
        if fresh:
            self._last_progress_ms = now_ms
        self._advance(step)
        return self._finish(step)

    def set_unreachable(self, members: Iterable[MemberId], now_ms: int) -> Output:
        """Tell the machine which members the node has no link to now. It no longer waits
        for their anchor blocks (a dead anchor owner then costs nothing instead of one
        anchor wait). Only when this node moves on changes, never what is ordered."""
        self._unreachable = frozenset(members)
        step = _Step(now_ms)
        self._advance(step)
        return self._finish(step)

    def tick(self, now_ms: int) -> Output:
        """Run timers: the anchor wait, fetch retries and the stall guard."""
        step = _Step(now_ms)
        self._advance(step)
        retry = [m for m, t in self._missing.items() if now_ms - t >= self._p.fetch_retry_ms]
        for m in retry:
            self._missing[m] = now_ms
        step.missing.extend(sorted(retry)[:MAX_MISSING_PER_OUTPUT])
        if self.has_work() and now_ms - self._last_progress_ms >= self._p.stall_ms:
            self._last_progress_ms = now_ms
            if self._last_own is not None:
                step.rebroadcast.append(self._last_own)
            step.request_sync = True
        return self._finish(step)

    @property
    def epoch(self) -> int:
        """The epoch this node signs and orders in now."""
        return self._committees[-1].epoch

    @property
    def epoch_ending(self) -> int | None:
        """Round of the anchor that ended the epoch, while the node has not yet said what
        comes next (`schedule_committee` or `keep_committee`)."""
        return self._closing.round if self._closing is not None else None

    @property
    def epoch_seen(self) -> int:
        """The highest epoch of a block this machine holds or waits on (a node far behind
        sees later epochs' blocks it cannot take yet)."""
        return max((b.epoch for b in self._future.values()), default=self.epoch)

    def _due(self, anchor_round: int) -> bool:
        n = self._p.epoch_rounds
        return n is not None and anchor_round >= self._epoch_start + n

    @property
    def epoch_due(self) -> bool:
        """Whether the pending epoch end is a periodic one (`Params.epoch_rounds`): the node
        must start a next epoch (the same committee if nothing changed), not keep this one."""
        return self._closing is not None and self._due(self._closing.round)

    def schedule_committee(self, committee: Committee) -> Output:
        """Start the next epoch with `committee` right after the epoch-ending anchor.

        Only valid while an epoch end is pending (`Output.epoch_end`); the committee must be
        the next epoch and start at that anchor's round + 1.
        """
        anchor = self._closing
        if anchor is None:
            raise LocalError("A committee can change only at the anchor that ends an epoch.")
        if committee.epoch != self.epoch + 1 or committee.start_round != anchor.round + 1:
            raise LocalError("The new committee must be the next epoch, starting right after its anchor.")
        step = _Step(self._last_progress_ms)
        self._switch(committee, step)
        self._advance(step)
        return self._finish(step)

    def keep_committee(self) -> Output:
        """The epoch-ending anchor's records changed nothing: go on in the same epoch."""
        if self._closing is None:
            raise LocalError("No epoch end is waiting for a decision.")
        if self.epoch_due:
            raise LocalError("The epoch is due to end: schedule the next committee (the same one if nothing changed).")
        self._closing = None
        self._dirty = True
        step = _Step(self._last_progress_ms)
        self._advance(step)
        return self._finish(step)

    def _switch(self, committee: Committee, step: _Step) -> None:
        """Close the old epoch at its ending anchor and open `committee`'s first round.

        Nothing of the old epoch is ordered after the anchor, and the new epoch's first
        round has no parents, so the old DAG is dropped from memory (the node keeps it on
        disk for peers that still need it to reach the anchor). Our records in old blocks
        that were not ordered go back to the queue.
        """
        self._closing = None
        self._committees.append(committee)
        start = committee.start_round
        self._epoch_start = start
        for block in self._inflight.values():
            for rec in block.records:
                if rec.id not in self._ordered_records:
                    self._pending.setdefault(rec.id, rec)
        if self._me not in committee:
            self._pending.clear()  # a former core member hands its records to the core instead
        self._inflight.clear()
        self._blocks.clear()
        self._rounds.clear()
        self._latest.clear()
        self._round_weight.clear()
        self._quorum_at_ms = {start - 1: step.now}
        self._buffer.clear()
        self._buffer_per_author.clear()
        self._waiting_on.clear()
        self._missing.clear()
        self._proved.clear()
        # Exclusion lasts to the end of the epoch: every honest node switches at the same
        # anchor, so all start the next epoch with none, and a checkpoint is a clean cut
        # (nothing of the consensus state crosses it). The proofs stay on record for the
        # members to remove the equivocator.
        self._excluded.clear()
        self._consumed.clear()
        self._slot_taken.clear()
        self._unordered_work.clear()
        self._quorum_round = start - 1
        self._horizon = start
        self._decided_upto = start - 1
        self._dirty = False
        self._last_own_round = start - 1
        self._last_own = None
        self._last_progress_ms = step.now
        waiting = sorted(self._future.values(), key=lambda b: (b.epoch, b.round, b.id))
        self._future.clear()
        for b in waiting:
            try:
                self._admit(b, step)
            except ValidationError:
                continue

    def restore(
        self,
        blocks: Iterable[Block],
        committed: Sequence[bytes],
        committees: Sequence[Committee] = (),
        anchors: Sequence[int] | None = None,
    ) -> Output:
        """Rebuild after a restart from stored blocks and the block ids already handed out.

        `committees` are the later epochs the node had started. Blocks are replayed epoch by
        epoch; an epoch end inside `committed` switches to the listed committee starting
        right after its anchor, or keeps the committee if none is listed. The commit
        sequence is re-derived from the DAG and must start with `committed` (else
        LocalError: the store is inconsistent), and with `anchors` given (an archive's),
        each of them committed by the anchor of that round; only commits beyond it are returned, with
        `epoch_end` if they end an epoch. Our own stored blocks are re-added, so this node
        never signs a round twice.
        """
        if self._blocks or self._buffer or self._next_index != self._first_index:
            raise LocalError("Restore works only on a fresh consensus machine.")
        starts = {c.start_round: c for c in committees}
        done = list(committed)
        queue = sorted(blocks, key=lambda b: (b.epoch, b.round, b.id))
        self._stored = frozenset(b.id for b in queue)
        # Per epoch, the memory horizon the node had at its last stored commit: the rounds at
        # or below it are where a live boundary block can have been taken (`_unknown_links`).
        rounds = {b.id: (b.epoch, b.round) for b in queue}
        self._boundary = {}
        for bid in done:
            if bid in rounds:
                epoch, rnd = rounds[bid]
                self._boundary[epoch] = max(self._boundary.get(epoch, -1), rnd - GC_DEPTH_ROUNDS - 1)
        try:
            return self._replay(queue, starts, done, anchors)
        finally:
            self._stored, self._boundary = None, {}

    def _replay(self, queue: list[Block], starts: dict[int, Committee], done: list[bytes],
                anchors: Sequence[int] | None) -> Output:
        step = _Step(0)
        i = 0
        while True:
            while i < len(queue) and queue[i].epoch <= self.epoch:
                try:
                    self._admit(queue[i], step)
                except ValidationError:
                    pass
                i += 1
            self._decide(step)
            anchor = self._closing
            if anchor is None or len(step.committed) > len(done):
                break
            nxt = starts.get(anchor.round + 1)
            if nxt is not None and nxt.epoch == self.epoch + 1:
                self._switch(nxt, step)
            elif self.epoch_due:
                raise LocalError(f"The stored committees lack the periodic epoch end at round {anchor.round}.")
            else:
                self._closing = None
                self._dirty = True
        for b in queue[i:]:  # a later epoch the node has yet to decide on: wait as future
            try:
                self._admit(b, step)
            except ValidationError:
                continue
        got = [c.block.id for c in step.committed[: len(done)]]
        if got != done or (anchors is not None
                           and [c.anchor_round for c in step.committed[: len(done)]] != list(anchors)):
            raise LocalError("The stored blocks do not reproduce the stored commit order.")
        for rid in [rid for rid in self._pending if rid in self._ordered_records]:
            del self._pending[rid]
        return Output(
            committed=tuple(step.committed[len(done):]), missing=tuple(sorted(self._missing)),
            epoch_end=self.epoch_ending if len(step.committed) > len(done) else None,
        )

    # ------------------------------------------------------------------ admission

    def _admit(self, block: Block, step: _Step) -> bool:
        """Check what can be checked now; insert, buffer or refuse. True if inserted."""
        if block.constellation != self._cid:
            raise ValidationError("The block belongs to another constellation.")
        if block.id in self._blocks or block.id in self._buffer or block.id in self._future:
            return False
        committee = self._committees[-1]
        if block.epoch < committee.epoch:
            return False  # an epoch that is closed here: nothing of it is ordered any more
        if block.epoch == committee.epoch and block.round < committee.start_round:
            raise ValidationError(f"The block's round is before the start of its epoch {block.epoch}.")
        if block.round < self._horizon:
            return False  # older than anything we can still order: harmless, ignored
        if block.epoch > committee.epoch:
            if len(self._future) >= self._p.max_buffered_blocks:
                raise ValidationError("Too many blocks of a future epoch are waiting.")
            self._future[block.id] = block
            self._missing.pop(block.id, None)
            # Catching up across an epoch boundary: the way back to the block that will
            # schedule this epoch runs through these parents, so ask for them now.
            for pid in block.parents:
                known = pid in self._blocks or pid in self._buffer or pid in self._future
                if not known and pid not in self._missing:
                    self._missing[pid] = step.now
                    step.missing.append(pid)
            return False
        if block.author not in committee:
            raise AuthorizationError("The block's author is not a core member in its epoch.")
        if block.round == 0 and block.prev is not None:
            raise ValidationError("A round-0 block must have no prev.")
        if block.round == committee.start_round and block.parents:
            raise ValidationError("The first block of an epoch must have no parents.")
        if block.round > committee.start_round and block.round > self._horizon and not block.parents:
            raise ValidationError("A block after the first round of its epoch must name parents.")
        if block.prev is not None and block.prev == block.id:
            raise ValidationError("A block cannot be its own prev.")
        if len(self._rounds.get(block.round, {}).get(block.author, ())) >= len(committee.members):
            raise ValidationError("The author has flooded this round with conflicting blocks.")
        needed = self._unknown_links(block)
        if needed:
            count = self._buffer_per_author.get(block.author, 0)
            if len(self._buffer) >= self._p.max_buffered_blocks:
                raise ValidationError("Too many blocks are waiting for parents; send them later.")
            if count >= self._p.max_buffered_per_author:
                raise ValidationError("Too many of this author's blocks wait for parents.")
            self._buffer[block.id] = block
            self._buffer_per_author[block.author] = count + 1
            for n in needed:
                self._waiting_on.setdefault(n, []).append(block.id)
                if n not in self._missing and n not in self._buffer:
                    self._missing[n] = step.now
                    step.missing.append(n)
            return False
        self._check_links(block)
        self._insert(block, step)
        self._release_children(block.id, step)
        return True

    def _unknown_links(self, block: Block) -> list[bytes]:
        # prev is checked when known but never waited for: it may lie far below the memory
        # horizon after a catch-up jump, and it is not part of the causal history.
        if block.round <= self._horizon:
            return []  # its parents are below what we keep; accepted as the boundary
        unknown = [p for p in block.parents if p not in self._blocks]
        if self._stored is not None and block.round <= self._boundary.get(block.epoch, -1):
            # Replaying our own store, at or below the horizon the node had reached: a parent
            # that was never stored lay below the memory horizon when this block was taken live
            # (after a restart or a catch-up jump), and no anchor can still order it. Take the
            # block as a boundary again, as then; waiting for that parent would leave every
            # later block buffered and the stored order unreproduced. Above that horizon a
            # block whose parent never came was still waiting for it live, and waits again.
            unknown = [p for p in unknown if p in self._stored]
        return unknown

    def _check_links(self, block: Block) -> None:
        if block.round <= self._horizon:
            return
        if self._stored is not None and block.round <= self._boundary.get(block.epoch, -1) and \
                any(p not in self._blocks for p in block.parents):
            return  # a boundary block of our own store (see `_unknown_links`), checked when taken
        prev_committee = self.committee_at(block.round - 1)
        seen: set[MemberId] = set()
        weight = 0
        for pid in block.parents:
            parent = self._blocks[pid]
            if parent.round != block.round - 1:
                raise ValidationError("A block's parents must all be from the previous round.")
            if parent.author in seen:
                raise ValidationError("A block references two blocks of one author and round.")
            seen.add(parent.author)
            weight += prev_committee.weight(parent.author)
        if weight < prev_committee.quorum:
            raise ValidationError("A block's parents do not reach a quorum of the previous round.")
        if block.prev is not None:
            prev = self._blocks.get(block.prev)
            if prev is not None and (prev.author != block.author or prev.round >= block.round):
                raise ValidationError("A block's prev must be its author's block of an earlier round.")

    def _release_children(self, block_id: bytes, step: _Step) -> None:
        ready = [block_id]
        while ready:
            bid = ready.pop()
            self._missing.pop(bid, None)
            for child_id in self._waiting_on.pop(bid, []):
                child = self._buffer.get(child_id)
                if child is None or self._unknown_links(child):
                    continue
                self._unbuffer(child)
                try:
                    self._check_links(child)
                except ValidationError:
                    self.rejected += 1
                    continue
                self._insert(child, step)
                ready.append(child.id)

    def _unbuffer(self, block: Block) -> None:
        del self._buffer[block.id]
        left = self._buffer_per_author[block.author] - 1
        if left:
            self._buffer_per_author[block.author] = left
        else:
            del self._buffer_per_author[block.author]

    def _insert(self, block: Block, step: _Step) -> None:
        self._blocks[block.id] = block
        if block.round > self._latest.get(block.author, -1):
            self._latest[block.author] = block.round
        self._missing.pop(block.id, None)
        per = self._rounds.setdefault(block.round, {})
        variants = per.setdefault(block.author, [])
        if variants and (block.author, block.round) not in self._proved:
            proof = check_equivocation(variants[0], block)
            if proof is not None:
                self._proved.add((block.author, block.round))
                step.proofs.append(proof)
        variants.append(block)
        if block.round > self._decided_upto + 1:
            self._dirty = True
        if len(variants) == 1:
            w = self.committee_at(block.round).weight(block.author)
            total = self._round_weight.get(block.round, 0) + w
            self._round_weight[block.round] = total
            if total >= self.committee_at(block.round).quorum and block.round > self._quorum_round:
                for r in range(self._quorum_round + 1, block.round + 1):
                    self._quorum_at_ms.setdefault(r, step.now)
                    prev = self._quorum_at_ms.get(r - 1)
                    if prev is not None and 0 <= step.now - prev < self._p.round_timeout_ms:
                        self._round_ms.append(step.now - prev)
                        if len(self._round_ms) > ROUND_SAMPLES:
                            del self._round_ms[0]
                self._quorum_round = block.round
        if block.records and block.id not in self._consumed:
            self._unordered_work[block.id] = block.round
        if block.author == self._me and block.round > self._last_own_round:
            # Restored or echoed back after a restart: never sign this round again.
            self._last_own_round = block.round
            self._last_own = block
            if block.records:
                self._inflight[block.id] = block
        self._last_progress_ms = step.now

    def _remove(self, block: Block) -> None:
        self._blocks.pop(block.id, None)
        per = self._rounds.get(block.round, {})
        variants = per.get(block.author, [])
        if block in variants:
            variants.remove(block)
            if not variants:
                del per[block.author]
        self._unordered_work.pop(block.id, None)
        self._inflight.pop(block.id, None)

    def _recount_quorum(self) -> None:
        self._round_weight = {
            r: sum(self.committee_at(r).weight(a) for a in per) for r, per in self._rounds.items()
        }
        self._quorum_round = max(
            (r for r, w in self._round_weight.items() if w >= self.committee_at(r).quorum),
            default=-1,
        )

    # ------------------------------------------------------------------ progress

    def _advance(self, step: _Step) -> None:
        """Decide and commit what the DAG allows, then create our blocks; repeat."""
        for _ in range(MAX_BLOCKS_PER_CALL):
            self._decide(step)
            if not self._create(step):
                return
        self._decide(step)

    def _create(self, step: _Step) -> bool:
        """Create our block of the next round if every rule allows it now."""
        if self._identity is None or self._me is None:
            return False
        target = self._quorum_round + 1
        if target <= self._last_own_round or not self._wants_round(target):
            return False
        committee = self.committee_at(target)
        if self._me not in committee or self._closing is not None:
            return False  # not core, or the node must first apply the epoch-ending commit
        if target > self._epoch_start and not self._has_anchor(target - 1):
            since = self._quorum_at_ms.get(target - 1, step.now)
            if step.now - since < self.anchor_wait_ms:
                return False
        parents: list[bytes] = []
        if target > self._epoch_start:
            for variants in self._rounds.get(target - 1, {}).values():
                parents.append(variants[0].id)
        records = self._take_records(target)
        if not records and committee.leader(target) == self._me:
            records = self._carry(target)
        prev = self._last_own.id if self._last_own is not None else None
        block = Block.create(
            self._identity, constellation=self._cid, epoch=committee.epoch, round=target,
            prev=prev, parents=parents, records=records, created=step.now,
        )
        self._insert(block, step)
        step.blocks.append(block)
        self._release_children(block.id, step)
        return True

    def _wants_round(self, target: int) -> bool:
        # A peer already signed `target`: join it even with nothing of our own to do, or a
        # node whose records wait for this round's quorum would wait for ever.
        return self.has_work() or any(a != self._me for a in self._rounds.get(target, {}))

    def _has_anchor(self, round: int) -> bool:
        """Whether the anchor block of `round` is here, or not worth waiting for: its owner
        is unreachable, or behind (nothing of it since before round - ANCHOR_LAG_ROUNDS)."""
        leader = self.committee_at(round).leader(round)
        latest = self._latest.get(leader, self._epoch_start - 1)
        if leader in self._unreachable or latest < round - ANCHOR_LAG_ROUNDS:
            return True
        return bool(self._rounds.get(round, {}).get(leader))

    def _record_budget(self, target: int) -> int:
        """Bytes of records a block of round `target` may carry and stay within MAX_BLOCK_SIZE."""
        return MAX_BLOCK_SIZE - BLOCK_HEADROOM - PARENT_BYTES * len(self.committee_at(target).members)

    def _take_records(self, target: int) -> list[Record]:
        """Queued records for our block of `target`, oldest first, as many as fit in count
        and bytes; the rest stay queued, in order, for the next rounds."""
        out: list[Record] = []
        budget = self._record_budget(target)
        for rid in list(self._pending):
            if len(out) >= self._p.max_records_per_block:
                break
            rec = self._pending[rid]
            if rid in self._ordered_records:
                del self._pending[rid]
                continue
            if len(rec.raw) > budget:
                break
            budget -= len(rec.raw)
            del self._pending[rid]
            out.append(rec)
        return out

    def _carry(self, target: int) -> list[Record]:
        """The records of the peers' round-`target` blocks we hold, for our anchor block of
        `target` when we have nothing of our own to propose.

        A record in a non-anchor block of round r is ordered only by the anchor of r+1, one
        message delay after the anchor of r. In a quiet constellation the anchor owner of r
        signs r because a peer's round-r block woke it (the join rule), so it holds that block;
        carrying its records in the anchor block orders them at r, one delay sooner. The
        order stays a function of the DAG (records are deduplicated by id when ordered), no
        other node checks or needs this, and a record is carried at most once more: only by
        the anchor owner of its own round, only from blocks it already holds."""
        out: list[Record] = []
        seen: set[bytes] = set()
        room = self._p.max_records_per_block
        budget = self._record_budget(target)
        peers = sorted((a for a in self._rounds.get(target, {}) if a != self._me), key=lambda a: a.key)
        for author in peers:
            for rec in self._rounds[target][author][0].records:
                if len(out) >= room or len(rec.raw) > budget:
                    return out
                if rec.id not in self._ordered_records and rec.id not in seen:
                    seen.add(rec.id)
                    budget -= len(rec.raw)
                    out.append(rec)
        return out

    # ------------------------------------------------------------------ deciding

    def _decide(self, step: _Step) -> None:
        top = self.top_round
        if not self._dirty or top - 2 <= self._decided_upto or self._closing is not None:
            return
        self._dirty = False
        decisions: dict[int, _Decision] = {}
        for r in range(top - 2, self._decided_upto, -1):
            d = self._direct(r)
            decisions[r] = d if d is not _UNDECIDED else self._indirect(r, top, decisions)
        for r in range(self._decided_upto + 1, top - 1):
            d = decisions[r]
            if d is _UNDECIDED:
                break
            if d.block is not None:
                self._commit(d.block, step)
            self._decided_upto = r
            if self._closing is not None:
                break  # the node applies this anchor's records and says what comes next
        self._after_commits(step)

    def _slot(self, round: int) -> list[Block]:
        leader = self.committee_at(round).leader(round)
        return self._rounds.get(round, {}).get(leader, [])

    def _direct(self, r: int) -> _Decision:
        slot = self._slot(r)
        c1, c2 = self.committee_at(r + 1), self.committee_at(r + 2)
        voters = self._rounds.get(r + 1, {})
        for cand in slot:
            support = {
                b.id for bs in voters.values() for b in bs if cand.id in b.parents
            }
            certified = 0
            for author, bs in self._rounds.get(r + 2, {}).items():
                if any(self._certifies(c, support, c1) for c in bs):
                    certified += c2.weight(author)
            if certified >= c2.quorum:
                return _Decision("commit", cand)
        present = sum(c1.weight(a) for a in voters)
        if present < c1.quorum:
            return _UNDECIDED
        for cand in slot:
            against = sum(
                c1.weight(a) for a, bs in voters.items() if any(cand.id not in b.parents for b in bs)
            )
            if against < c1.quorum:
                return _UNDECIDED
        return _SKIP

    def _certifies(self, block: Block, support: set[bytes], c1: Committee) -> bool:
        weight = 0
        for pid in block.parents:
            if pid in support:
                weight += c1.weight(self._blocks[pid].author)
        return weight >= c1.quorum

    def _indirect(self, r: int, top: int, decisions: dict[int, _Decision]) -> _Decision:
        for s in range(r + 3, top - 1):
            d = decisions[s]
            if d is _SKIP:
                continue
            if d.block is None:
                return _UNDECIDED
            return self._certified_in_history(d.block, r)
        return _UNDECIDED

    def _certified_in_history(self, anchor: Block, r: int) -> _Decision:
        """Commit the slot-r block that some round r+2 block in anchor's history certifies."""
        slot = self._slot(r)
        if not slot:
            return _SKIP
        c1 = self.committee_at(r + 1)
        voters = self._rounds.get(r + 1, {})
        supports = [
            (cand, {b.id for bs in voters.values() for b in bs if cand.id in b.parents})
            for cand in slot
        ]
        for block in self._history_at(anchor, r + 2):
            for cand, support in supports:
                if self._certifies(block, support, c1):
                    return _Decision("commit", cand)
        return _SKIP

    def _history_at(self, anchor: Block, round: int) -> list[Block]:
        """Blocks of `round` in anchor's causal history, in id order."""
        seen = {anchor.id}
        frontier = [anchor]
        found: dict[bytes, Block] = {}
        while frontier:
            nxt: list[Block] = []
            for b in frontier:
                if b.round == round:
                    found[b.id] = b
                    continue
                for pid in b.parents:
                    p = self._blocks.get(pid)
                    if p is not None and pid not in seen and p.round >= round:
                        seen.add(pid)
                        nxt.append(p)
            frontier = nxt
        return [found[k] for k in sorted(found)]

    # ------------------------------------------------------------------ ordering

    def _commit(self, anchor: Block, step: _Step) -> None:
        floor = anchor.round - GC_DEPTH_ROUNDS
        history: list[Block] = []
        stack = [anchor]
        seen = {anchor.id}
        while stack:
            b = stack.pop()
            history.append(b)
            for pid in b.parents:
                if pid in seen or pid in self._consumed:
                    continue
                p = self._blocks.get(pid)
                if p is not None and p.round > floor:
                    seen.add(pid)
                    stack.append(p)
        history.sort(key=lambda b: (b.round, b.author.key, b.id))
        slots: dict[tuple[MemberId, int], bytes] = {}
        for b in history:
            key = (b.author, b.round)
            if key in slots or self._slot_taken.get(key, b.id) != b.id:
                self._excluded.add(b.author)
            slots[key] = b.id
        kinds = self._p.reconfiguring_types
        for b in history:
            self._consumed.add(b.id)
            self._unordered_work.pop(b.id, None)
            self._slot_taken[(b.author, b.round)] = b.id
            if b.author in self._excluded:
                continue
            fresh = tuple(r for r in b.records if r.id not in self._ordered_records)
            for rec in fresh:
                self._ordered_records.add(rec.id)
                self._pending.pop(rec.id, None)
                if rec.type in kinds:
                    self._closing = anchor
            step.committed.append(Committed(b, anchor.round, self._next_index, fresh))
            self._next_index += 1
        self._last_anchor_round = anchor.round
        if self._due(anchor.round):
            self._closing = anchor

    def _after_commits(self, step: _Step) -> None:
        """Re-queue our records whose blocks fell behind, and drop what no anchor can order."""
        for bid, block in list(self._inflight.items()):
            if bid in self._consumed:
                del self._inflight[bid]
            elif self._last_anchor_round >= block.round + REPROPOSE_AFTER_ROUNDS:
                del self._inflight[bid]
                back = {r.id: r for r in block.records if r.id not in self._ordered_records}
                self._pending = {**back, **self._pending}
        horizon = self._last_anchor_round - GC_DEPTH_ROUNDS - 1
        if horizon > self._horizon:
            self._gc(horizon)

    def _gc(self, horizon: int) -> None:
        for r in [r for r in self._rounds if r < horizon]:
            for bs in self._rounds.pop(r).values():
                for b in bs:
                    self._blocks.pop(b.id, None)
                    self._consumed.discard(b.id)
                    self._unordered_work.pop(b.id, None)
            self._round_weight.pop(r, None)
            self._quorum_at_ms.pop(r, None)
        for key in [k for k in self._slot_taken if k[1] < horizon]:
            del self._slot_taken[key]
        for bid in [b for b, blk in self._buffer.items() if blk.round < horizon]:
            self._unbuffer(self._buffer[bid])
        # A missing id nobody still waits for would be re-requested forever.
        for mid in list(self._waiting_on):
            if not any(c in self._buffer for c in self._waiting_on[mid]):
                del self._waiting_on[mid]
                self._missing.pop(mid, None)
        self._proved = {k for k in self._proved if k[1] >= horizon}
        self._horizon = horizon

    # ------------------------------------------------------------------ output

    def _finish(self, step: _Step) -> Output:
        if not (step.blocks or step.missing or step.committed or step.proofs
                or step.rebroadcast or step.request_sync or self._closing is not None):
            nt = self._next_tick(step)
            return _EMPTY if nt is None else Output(next_tick_ms=nt)
        return Output(
            blocks=tuple(step.blocks),
            missing=tuple(dict.fromkeys(step.missing))[:MAX_MISSING_PER_OUTPUT],
            committed=tuple(step.committed),
            proofs=tuple(step.proofs),
            rebroadcast=tuple(step.rebroadcast),
            request_sync=step.request_sync,
            next_tick_ms=self._next_tick(step),
            epoch_end=self.epoch_ending,
        )

    def _next_tick(self, step: _Step) -> int | None:
        times: list[int] = []
        if self._missing:
            times.append(min(self._missing.values()) + self._p.fetch_retry_ms)
        target = self._quorum_round + 1
        if self.has_work():
            times.append(self._last_progress_ms + self._p.stall_ms)
        if self._wants_round(target):
            if self._identity is not None and target > self._last_own_round:
                if target > self._epoch_start and not self._has_anchor(target - 1):
                    since = self._quorum_at_ms.get(target - 1, step.now)
                    times.append(since + self.anchor_wait_ms)
        return max(min(times), step.now) if times else None


__all__ = ["Committed", "Consensus", "Output", "Params"]
