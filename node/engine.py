"""One constellation inside a node: its consensus machine, its ledger, its
pending records, and the glue that turns consensus output into stored,
broadcast and applied effects.

The engine never touches sockets; it returns what to send (`Effects`) and the
node's gossip layer sends it. Everything it applies comes from committed
blocks, in commit order, so a restart replays exactly the same ledger. It alone
writes its constellation to a running node's store; node/views.py renders it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from valuemesh.node import trace
from valuemesh.node.epoch_ends import Closing, EarlyCheckpoints
from valuemesh.node.pending_pool import PendingPool
from valuemesh.node.rebuild_retry import RebuildRetry
from valuemesh.node.store import Checkpoint as StoredCheckpoint
from valuemesh.node.store import CommitEntry, ConstellationInfo, Store
from valuemesh.protocol.consensus import (
    Checkpoint,
    CheckpointAggregator,
    Committee,
    Consensus,
    Content,
    Output,
    Params,
    committee_hash,
    encode_committee,
)
from valuemesh.protocol.errors import AuthorizationError, LocalError, ValidationError, ValuemeshError
from valuemesh.protocol.identity import Identity, MemberId
from valuemesh.protocol.ledger import Ledger, Outcome
from valuemesh.protocol.plugins import Registry, Version
from valuemesh.protocol.records import Block, EquivocationProof, Record, constellation_text
from valuemesh.protocol.snapshot import Snapshot

log = logging.getLogger("valuemesh.engine")
# The anchor wait adapts to observed round times but never drops below this:
# on a LAN or loopback a dead member costs ~this per round it would anchor.
MIN_ANCHOR_WAIT_MS = 50
# Every epoch ends at its first committed anchor this many rounds after its start, even if
# the core did not change (Params.epoch_rounds): a certified checkpoint a newcomer can start
# from, at least this often. An epoch end restarts the DAG (about three rounds for the records
# queued then) and snapshots the whole ledger state, so it should be rare: at light load a
# round is ~15 ms and a record ~3.5 rounds, so this is thousands of records.
EPOCH_ROUNDS = 10_000
NODE_PARAMS = Params(min_round_timeout_ms=MIN_ANCHOR_WAIT_MS, epoch_rounds=EPOCH_ROUNDS)
MAX_PENDING = 10_000
FINAL_VIEW_LIMIT = 100_000
# Digests of the raw blocks taken lately: a block a second peer sends again (a restarted
# node asks every peer for its gap, and each streams it) is skipped before it is decoded
# and its signatures verified a second time. About 50 rounds of a 4-member constellation
# would be 200; this covers a long catch-up's overlapping streams.
SEEN_BLOCKS = 16_384
LOADING_TICK_MS = 20
OWN_CHECKPOINTS_KEPT = 4  # our latest checkpoint signatures, re-sent to peers that sync
# After a failed write, how often the engine tries to rebuild from the store (`recover`).
RECOVER_RETRY_MS = 5_000
RECOVER_RETRY_MAX_MS = 300_000


@dataclass
class Effects:
    """What the node must do after an engine step: send blocks, ask for ids, gossip proofs."""

    blocks: list[Block] = field(default_factory=list)
    missing: list[bytes] = field(default_factory=list)
    proofs: list[EquivocationProof] = field(default_factory=list)
    rebroadcast: list[Block] = field(default_factory=list)
    request_sync: bool = False
    committed: int = 0


class Engine:
    def __init__(self, store: Store, registry: Registry, identity: Identity, genesis: Record,
                 params: Params = NODE_PARAMS) -> None:
        self.consensus_params, self.store, self.registry, self.identity = params, store, registry, identity
        self.genesis, self.cid = genesis, genesis.constellation
        # Pruning (opt-in): keep the blocks of this many closed epochs, drop older ones.
        self.retain_epochs: int | None = None
        self._flusher: asyncio.Task[None] | None = None
        # Set when a step's write failed: memory is ahead of the store until `recover`.
        self.failed: str | None = None
        self._retry = RebuildRetry(RECOVER_RETRY_MS, RECOVER_RETRY_MAX_MS)
        self.ledger = Ledger(self.registry, self.cid)
        first = self.ledger.apply(self.genesis, self.genesis.created)
        if not first[0].applied:
            raise ValidationError(f"The genesis record is invalid: {first[0].reason}")
        plugins = self.ledger.reader.read("membership", "meta")["plugins"]
        self.registry.require({name: Version.parse(v) for name, v in plugins.items()})
        self.committee = Committee(0, self.ledger.committee(), 0)
        self.genesis_committee = self.committee
        self._committee_version = self.ledger.committee_version
        self.consensus = Consensus(self.cid, self.committee, self.identity, self.consensus_params)
        # Where this node's own history starts: 0, or the snapshot it started from.
        self.base: Snapshot | None = None
        # The first FINAL_VIEW_LIMIT final records: (index, outcome) until someone reads them,
        # then their JSON view, which node/views.py renders once and keeps here (rendering
        # every record as it becomes final cost about a tenth of a catch-up's CPU, for views
        # most nodes never read). `final_pos` finds an entry by record id (hex).
        self.final_log: list[dict[str, Any] | tuple[int, Outcome]] = []
        # When each of those became final on this node (wall-clock ms, rounded up): node-local,
        # so kept apart from `final_log`, which is identical on every node that agrees.
        self.final_at: list[int] = []
        self.final_pos: dict[str, int] = {}
        self.final_count = 0
        self.commit_index = 0
        self.clock = self.genesis.created
        self.pending = PendingPool()  # counts each author's share (node/budgets.py)
        self.applicants: set[bytes] = set()
        self.recent_commit_latency_ms: deque[int] = deque(maxlen=1000)
        self.catchup: dict[str, int] = {"blocks_done": 0, "blocks_left": 0}
        self._replaying: list[Committee] | None = None
        self._scheduled: list[Output] = []
        self._committees: dict[int, Committee] = {0: self.committee}
        self._aggregators: dict[int, CheckpointAggregator] = {}
        self._early_checkpoints = EarlyCheckpoints()
        self._certs_to_store: list[StoredCheckpoint] = []
        self._snapshots_to_store: list[Snapshot] = []
        self._closings: list[Closing] = []  # epoch ends whose snapshot is not encoded yet
        self.loading = False
        self._pruned_below = 0
        self._own_checkpoints: dict[int, Checkpoint] = {}
        self.checkpoints_out: list[Checkpoint] = []
        self.certified: dict[int, StoredCheckpoint] = {}
        self.closed: dict[int, Content] = {}  # what each epoch closed with, as its checkpoint says
        self.next_tick: int | None = self.genesis.created  # when consensus next needs a tick (ms)
        self.unreachable: set[MemberId] = set()  # core members we have no link to
        self._seen_raw: OrderedDict[bytes, None] = OrderedDict()
        # Our blocks whose transaction has not committed (or failed): never handed out again
        # (see _handle), since after a crash this node would not know it signed them.
        self._undurable: set[bytes] = set()
        self._note(first[0])

    @property
    def text_id(self) -> str:
        return constellation_text(self.cid)

    @property
    def name(self) -> str:
        meta = self.ledger.reader.read("membership", "meta")
        return str(meta["name"]) if meta else ""

    def may_receive(self, member: MemberId) -> bool:
        """Whether a peer may receive this constellation's data: members, applicants, and
        members who left (the book stays open to them: their contributions are in it, and
        their node must still see its own leave become final); not removed ones."""
        return self.ledger.member_status(member.key) in ("active", "applicant", "left") or \
            member.key in self.applicants

    def taking_part(self) -> bool:
        """Whether we are a member (or our join is pending), so peers will sync with us."""
        return self.may_receive(self.identity.member) or any(
            r.type == "membership" and r.body.get("op") == "join" for r in self.pending.values())

    def my_tier(self) -> str:
        m = self.ledger.reader.member(self.identity.member.key)
        return str(m["tier"]) if m else "applicant"

    def is_core(self) -> bool:
        """Whether this node takes part in agreement at the current round (a
        newly admitted core member proposes only once its epoch starts)."""
        return self.identity.member in self.current_committee()

    def current_committee(self) -> Committee:
        return self.consensus.committee_at(max(self.consensus.round, 0))

    # -- loading -------------------------------------------------------------
    async def load(self) -> Effects:
        """Rebuild ledger and consensus from the store after a (re)start (before the node
        hands the engine anything else), or after skipping ahead to a snapshot. While it
        runs, the machine is being rebuilt: ticks, proposals and blocks are not taken (the
        records stay pending, and sync brings the blocks again)."""
        self.loading = True
        try:
            eff = await self._load()
        finally:
            self.loading = False
        if self.pending and self.is_core():  # records submitted while it ran (the machine dedups)
            self._merge(eff, await self.propose(list(self.pending.values()), self.clock))
        return eff

    async def _load(self) -> Effects:
        start = 0
        snap = await self.store.latest_snapshot(self.cid)
        if snap is not None and not await self.store.holds_order_to(self.cid, snap.index):
            # This node started from a checkpoint, skipped ahead to one, or pruned what came
            # before (docs/consensus.md §7): it cannot replay up to it, so it starts there.
            self._start_from(snap)
            start = snap.index
        for cert in await self.store.checkpoints(self.cid):
            self.certified[cert.epoch] = cert
        blocks = {b.id: b async for b in self.store.iter_blocks(self.cid) if b.epoch >= self.committee.epoch}
        committed: list[bytes] = []
        self._replaying = []
        replay: list[tuple[Block, int]] = []
        async for entry in self.store.iter_commits(self.cid, start=start):
            block = blocks.get(entry.block_id)
            if block is None:
                raise LocalError("The database lost a committed block; restore it from a backup or a peer.")
            replay.append((block, entry.anchor_round))
            committed.append(block.id)
        self._apply_committed(replay)
        # Back to live: from now on an epoch end schedules its committee on the machine.
        committees, self._replaying = self._replaying, None
        now = self.clock
        out = self.consensus.restore(list(blocks.values()), committed, committees)
        stale = []
        for rec in await self.store.pending(self.cid):
            if rec.seq >= self.ledger.next_seq(rec.author):  # its slot is not used by a final record yet
                self.pending[rec.id] = rec
            else:
                stale.append(rec.id)
        if stale:  # final in a snapshot this node started from, so never committed here
            async with self.store.batch() as tx:
                tx.remove_pending(self.cid, stale)
        eff = await self._handle(out, now)
        await self.flush_checkpoints()  # epoch ends the replay met that were not certified yet
        return eff

    async def recover(self, now: int) -> Effects:
        """After a failed write: rebuild from the store as a restart would, in a fresh engine
        whose state then replaces ours (collaborators keep this object; until then ours, ahead
        of the store, still answers who is a member). While the store refuses (a full disk),
        again after RECOVER_RETRY_MS, doubling up to RECOVER_RETRY_MAX_MS (node/rebuild_retry.py)."""
        if now < self._retry.at:
            self.next_tick = self._retry.at
            return Effects()
        fresh = Engine(self.store, self.registry, self.identity, self.genesis, self.consensus_params)
        fresh.retain_epochs = self.retain_epochs
        try:
            eff = await fresh.load()
        except Exception as exc:
            if fresh._flusher is not None:
                fresh._flusher.cancel()
            self.next_tick = self._retry.failed(now)
            log.error("could not rebuild from the store yet (%s: %s); trying again in %d s", type(exc).__name__,
                      exc, (self.next_tick - now) // 1000, extra={"c": self.text_id})
            return Effects()
        if self._flusher is not None:
            self._flusher.cancel()
        cause, self.__dict__ = self.failed, {**fresh.__dict__, "_retry": self._retry}  # kept: see its module
        log.warning("rebuilt from the store after a failed write (%s); taking blocks and records again",
                    cause, extra={"c": self.text_id})
        return eff

    def _start_from(self, snap: Snapshot) -> None:
        """Take the ledger and counters of a snapshot and start consensus at the next epoch.

        The caller has checked the snapshot: our own (stored when we made it) or one whose
        hash a certificate chain from the genesis committee attests (`install_snapshot`)."""
        led = snap.ledger(self.registry)
        members = led.committee()
        if not members:
            raise ValidationError("The snapshot's ledger has no core members.")
        self.ledger = led
        self.clock = snap.clock
        self.commit_index = snap.index
        self.final_count = snap.final
        self.final_log, self.final_at, self.final_pos = [], [], {}
        self.committee = Committee(snap.epoch + 1, members, snap.round + 1)
        self._committee_version = led.committee_version
        self._committees = {self.committee.epoch: self.committee}
        self.consensus = Consensus(self.cid, self.committee, self.identity,
                                   self.consensus_params, first_index=snap.index)
        self.base = snap
        self.next_tick = self.clock

    def snapshot_committee(self, snap: Snapshot) -> Committee:
        """The committee a snapshot's epoch end starts (what its checkpoint attests)."""
        return Committee(snap.epoch + 1, snap.ledger(self.registry).committee(), snap.round + 1)

    async def install_snapshot(self, snap: Snapshot, certs: Sequence[StoredCheckpoint]) -> Effects:
        """Start from a verified snapshot (a newcomer): store it with the certificates that
        lead to it, then load as after a restart. Only on an engine that ordered nothing yet."""
        if self.commit_index or self.consensus.round > 0:
            raise LocalError("Only a node that holds nothing of the constellation yet can start from a snapshot.")
        await self._store_epoch_ends([snap], certs)
        return await self.load()

    async def fast_forward(self, snap: Snapshot, certs: Sequence[StoredCheckpoint]) -> Effects:
        """Skip ahead to a verified snapshot of a later epoch end (a node too far behind to
        catch up by blocks, e.g. from peers that pruned them). What this node ordered before
        is a prefix of the same order (agreement), so nothing it holds is contradicted; the
        records in between are final in the snapshot's state, not listed one by one."""
        if snap.epoch < self.committee.epoch or snap.index <= self.commit_index:
            raise LocalError("The snapshot is not ahead of this node.")
        await self._store_epoch_ends([snap], certs)
        self.certified.clear()
        self._closings.clear()
        self._scheduled.clear()
        self.pending.clear()  # load takes back those still to be final
        eff = await self.load()
        if self.unreachable:
            self._merge(eff, await self.set_unreachable(self.unreachable, self.clock))
        return eff

    # -- steps ---------------------------------------------------------------
    def precheck(self, record: Record, queued: int = 0) -> None:
        """Refuse a record that cannot apply to the final state (seq aside); `queued` more
        records are about to join the pending ones."""
        if len(self.pending) + queued >= MAX_PENDING:
            raise LocalError("Too many records are waiting to become final; try again shortly.")
        if record.constellation != self.cid:
            raise ValidationError("The record is for another constellation.")
        self.ledger.precheck(record, self.clock)

    async def submit(self, records: Sequence[Record], now: int) -> Effects:
        """Store records durably as pending, then propose them if we are core."""
        return await self.propose(await self.store_pending(records, now), now)

    async def store_pending(self, records: Sequence[Record], now: int) -> list[Record]:
        """Store records durably as pending (one transaction); return the new ones."""
        # A record whose seq slot a final record already took (a copy a peer forwards again
        # while it has not yet seen it final) would wait for ever: it is not pending.
        fresh = [r for r in records if r.id not in self.pending and r.seq >= self.ledger.next_seq(r.author)]
        if fresh:
            async with self.store.batch() as tx:
                tx.put_records(fresh, now)
                tx.add_pending(self.cid, [r.id for r in fresh], now)
            # A commit applied while the batch was written may have made some final already
            # (it found nothing pending to clear): those are done, not pending.
            fresh = [r for r in fresh if r.seq >= self.ledger.next_seq(r.author)]
            for r in fresh:
                self.pending[r.id] = r
        return fresh

    # Every step hands the machine's output to _handle with no await in between, and _handle
    # applies it (and whatever epoch decision it leads to) before its first await: so outputs
    # are applied, and their writes queued, in the order the machine made them, and an epoch
    # end is answered before anything else reaches the machine.
    async def propose(self, records: Sequence[Record], now: int) -> Effects:
        if not self.is_core() or not records or self.loading:
            return Effects()
        return await self._handle(self.consensus.propose(records, now), now)

    @staticmethod
    def _raw_digest(raw: bytes) -> bytes:
        return hashlib.blake2b(raw, digest_size=16).digest()

    def seen_before(self, raw: bytes) -> bool:
        """Whether these exact bytes are a block this engine already took (see SEEN_BLOCKS)."""
        return self._raw_digest(raw) in self._seen_raw

    def _remember(self, blocks: Sequence[Block]) -> None:
        for b in blocks:
            self._seen_raw[self._raw_digest(b.raw)] = None
        while len(self._seen_raw) > SEEN_BLOCKS:
            self._seen_raw.popitem(last=False)

    async def tick(self, now: int) -> Effects:
        if self.failed is not None:
            return await self.recover(now)
        if self.loading:
            self.next_tick = now + LOADING_TICK_MS  # the machine is being rebuilt: ask again soon
            return Effects()
        return await self._handle(self.consensus.tick(now), now)

    async def set_unreachable(self, members: set[MemberId], now: int) -> Effects:
        """The members this node has no link to (their anchors are not waited for)."""
        self.unreachable = set(members)
        if self.loading:
            return Effects()  # fast_forward passes them on once the machine is rebuilt
        return await self._handle(self.consensus.set_unreachable(members, now), now)

    async def add_blocks(self, blocks: Sequence[Block], now: int) -> tuple[Effects, list[str]]:
        """Feed verified blocks; return effects and the reasons of rejected ones.

        A whole batch, the blocks of ours it led to and its commits are stored in one
        transaction, which is what makes catch-up cost per batch rather than per
        block, and keeps a hop to one transaction (one fsync at most).
        """
        if self.loading:
            return Effects(), []
        out, refused = self.consensus.add_blocks(blocks, now)
        errors = [exc.message for _, exc in refused]
        skip = {i for i, _ in refused}
        accepted = [b for i, b in enumerate(blocks) if i not in skip]
        self._remember(accepted)
        tr = trace.tracer
        if tr is not None:
            tr.event("inserted", b=[[b.author.key.hex()[:8], b.round, len(b.records)] for b in accepted])
        if not accepted:
            return Effects(), errors
        # A parent asked for early in the batch may have come later in it.
        out = replace(out, missing=tuple(i for i in out.missing if not self.consensus.has_block(i)))
        self.catchup["blocks_done"] += len(accepted)
        return await self._handle(out, now, accepted), errors

    @staticmethod
    def _merge(into: Effects, more: Effects) -> None:
        into.blocks += more.blocks
        into.missing += more.missing
        into.proofs += more.proofs
        into.rebroadcast += more.rebroadcast
        into.request_sync = into.request_sync or more.request_sync
        into.committed += more.committed

    async def _handle(self, out: Output, now: int, received: Sequence[Block] = ()) -> Effects:
        """Apply the commits of one consensus step, and of the epoch decision they lead to,
        before the first await (see the note above `propose`); then store what they produced
        in one transaction: the `received` blocks the step took (first: our blocks and the
        commits refer to them), our new blocks, the commits and proofs. Durable (fsync) only
        when it holds our own blocks or proofs; see below."""
        eff = Effects(request_sync=out.request_sync)
        tr = trace.tracer
        own: list[Block] = []
        proofs: list[EquivocationProof] = []
        entries: list[CommitEntry] = []
        finished: list[bytes] = []
        final: list[bytes] = []  # every record of the committed blocks, for the trace
        steps = [out]
        while steps:
            o = steps.pop(0)
            self.next_tick = o.next_tick_ms
            eff.blocks += o.blocks
            eff.missing += o.missing
            eff.proofs += o.proofs
            eff.rebroadcast += o.rebroadcast
            eff.request_sync = eff.request_sync or o.request_sync
            own += o.blocks
            proofs += o.proofs
            first_index = self.commit_index
            closed = self._apply_committed([(c.block, c.anchor_round) for c in o.committed])
            if o.epoch_end is not None and o.epoch_end not in closed and \
                    self.consensus.epoch_ending == o.epoch_end:
                # The epoch-ending anchor's records left the committee as it was.
                self._scheduled.append(self.consensus.keep_committee())
            for i, c in enumerate(o.committed):
                entries.append(CommitEntry(first_index + i, c.block.id, c.anchor_round))
                if tr is not None:
                    final += [r.id for r in c.block.records]
                for r in c.block.records:
                    if r.id in self.pending:
                        del self.pending[r.id]
                        finished.append(r.id)
                        self.recent_commit_latency_ms.append(max(0, now - r.created))
            steps += self._scheduled
            self._scheduled.clear()
        if self._undurable:
            # The machine re-sends its last block when stalled; one whose write failed must
            # never leave: after a crash this node would sign that round again.
            eff.rebroadcast = [b for b in eff.rebroadcast if b.id not in self._undurable]
        if not (own or entries or proofs or received):
            return eff
        if tr is not None and own:
            tr.event("own", b=[[b.round, [r.id.hex()[:12] for r in b.records]] for b in own])
        # Own blocks are durable before anyone sees them: after a crash we must
        # never sign a different block for a round we already signed. Commits alone
        # need no fsync: a process crash loses nothing either way (WAL), and after a
        # power cut the lost tail of the order is re-derived from the blocks at restart
        # (Consensus.restore), identically on every node; our next durable commit (one
        # round later) makes it durable anyway. Skipping it saves about a third of the
        # fsyncs at light load, each 2-7 ms on a disk shared by four daemons.
        self._undurable.update(b.id for b in own)
        try:
            async with self.store.batch(durable=bool(own or proofs), urgent=bool(own)) as tx:
                if received:
                    tx.put_blocks(list(received), now)  # stores each block's records too
                if own:
                    tx.put_blocks(own, now)
                if entries:
                    tx.append_commits(self.cid, entries)
                if finished:
                    tx.remove_pending(self.cid, finished)
                for p in proofs:
                    tx.put_equivocation(p, now)
        except Exception as exc:
            # Memory is now ahead of the store and our blocks in this batch were never sent.
            # Take nothing until `recover` (the next tick) rebuilt memory from the store:
            # going on would store commits after a gap for ever (a full disk, say).
            self.failed, self.loading, self.next_tick = f"{type(exc).__name__}: {exc}", True, self._retry.failed(now)
            log.error("a step's write failed (%s); taking nothing until memory is rebuilt from the "
                      "store", self.failed, extra={"c": self.text_id})
            raise
        self._undurable.difference_update(b.id for b in own)
        self._retry.failures = 0
        if tr is not None:
            if received:
                tr.event("persisted", n=len(received))
            if own or entries:
                tr.event("stored", own=[b.round for b in own],
                         anchors=sorted({e.anchor_round for e in entries}),
                         final=[f.hex()[:12] for f in final])
        eff.committed = len(entries)
        self._kick_checkpoints()
        return eff

    def _apply_committed(self, items: list[tuple[Block, int]]) -> set[int]:
        """Apply committed blocks in order; close an epoch after the last block of
        the anchor that changed the committee (an anchor's history is ordered in
        one step, so "after its last block" is the same point on every node).
        Return the anchor rounds at which an epoch was closed."""
        closed: set[int] = set()
        for i, (block, anchor_round) in enumerate(items):
            self._apply_block(block)
            last_of_anchor = i + 1 == len(items) or items[i + 1][1] != anchor_round
            if not last_of_anchor:
                continue
            # The same rule as the machine's (Consensus._due), on the same committed anchors.
            due = anchor_round >= self.committee.start_round + self.consensus_params.epoch_rounds \
                if self.consensus_params.epoch_rounds is not None else False
            if self.ledger.committee_version != self._committee_version or due:
                self._committee_version = self.ledger.committee_version
                if self._close_epoch(anchor_round, due):
                    closed.add(anchor_round)
        return closed

    def _apply_block(self, block: Block) -> None:
        self.clock = max(self.clock, block.created)
        for rec in block.records:
            for o in self.ledger.apply(rec, self.clock):
                self._note(o)
        self.commit_index += 1

    def _close_epoch(self, anchor_round: int, due: bool = False) -> bool:
        """Start the next committee right after the anchor that ended the epoch, and sign
        the checkpoint that closes this epoch. False if the epoch goes on (the committee did
        not change and no periodic end is due)."""
        members = self.ledger.committee()
        old = self.committee
        if not members or members == old.members:
            if not due:
                return False
            members = old.members  # a periodic end: the same core goes on in a new epoch
        nxt = Committee(old.epoch + 1, members, anchor_round + 1)
        if old.epoch not in self.certified:  # (a restart's replay: already signed and stored)
            # A copy of the ledger now (cheap); encoding it, hashing it and signing the
            # checkpoint wait for `flush_checkpoints`, off the event loop.
            self._closings.append(Closing(old, anchor_round, self.commit_index, self.clock, self.final_count,
                                           self.ledger.state_hash(), nxt, self.ledger.parts()))
        if self._replaying is not None:
            self._replaying.append(nxt)
        else:
            self._scheduled.append(self.consensus.schedule_committee(nxt))
        self.committee = nxt
        self._committees[nxt.epoch] = nxt
        log.info("committee change scheduled", extra={"c": self.text_id, "epoch": nxt.epoch,
                                                      "start_round": nxt.start_round})
        agg = self._aggregators.setdefault(old.epoch, CheckpointAggregator(self.cid, old))
        for early in self._early_checkpoints.take(old.epoch):
            try:  # held signatures are anyone's: one that does not fit must not stop the step
                self._take_checkpoint(agg, early)
            except ValuemeshError as exc:
                log.info("dropped a held checkpoint signature by %s: %s", early.signer.short, exc.message)
        return True

    def _finish_closing(self, job: Closing, snap: Snapshot) -> None:
        """The encoded snapshot of an epoch end: what closes it, and our signature over it."""
        content = Content(self.cid, job.committee.epoch, job.round, job.index, job.state_hash, snap.hash,
                          committee_hash(job.next))
        self.closed[job.committee.epoch] = content
        self._snapshots_to_store.append(snap)
        agg = self._aggregators.setdefault(job.committee.epoch, CheckpointAggregator(self.cid, job.committee))
        if self.identity.member in job.committee:
            cp = Checkpoint.create(self.identity, content)
            self.checkpoints_out.append(cp)
            self._own_checkpoints[cp.epoch] = cp
            while len(self._own_checkpoints) > OWN_CHECKPOINTS_KEPT:
                del self._own_checkpoints[min(self._own_checkpoints)]
            self._take_checkpoint(agg, cp)

    def own_checkpoints_from(self, epoch: int) -> list[Checkpoint]:
        """Our signatures of the recent epoch ends from `epoch` on (for a peer that syncs)."""
        return [cp for e, cp in sorted(self._own_checkpoints.items()) if e >= epoch]

    def finish_closings_now(self) -> None:
        """Encode pending epoch-end snapshots in this thread (a replay that runs off the loop)."""
        while self._closings:
            job = self._closings.pop(0)
            self._finish_closing(job, job.encode())

    def _take_checkpoint(self, agg: CheckpointAggregator, cp: Checkpoint) -> None:
        cert = agg.add(cp)
        if cert is not None and cert.epoch not in self.certified:
            nxt = self._committees.get(cert.epoch + 1)
            self.certified[cert.epoch] = StoredCheckpoint.of(
                cert.content, {m.key: sig for m, sig in cert.signatures},
                encode_committee(nxt) if nxt is not None and committee_hash(nxt) == cert.content.next_committee
                else b"")
            self._certs_to_store.append(self.certified[cert.epoch])
            log.info("checkpoint certified", extra={"c": self.text_id, "epoch": cert.epoch})

    async def add_checkpoint(self, cp: Checkpoint) -> None:
        """A peer's checkpoint signature, decoded but not verified: the signer is checked against
        the epoch's committee first where it is known (a stranger's costs no signature check);
        one for an epoch whose committee is not known yet is verified and held, bounded."""
        if cp.constellation != self.cid:
            raise ValidationError("The checkpoint is for another constellation.")
        committee = self._committees.get(cp.epoch)
        if committee is not None and cp.signer not in committee:
            raise AuthorizationError("The checkpoint's signer is not a core member of its epoch.")
        if cp.epoch > self.committee.epoch + 1 or cp.epoch in self.certified:
            return  # far ahead of us (we will sync first) or already certified
        if cp.epoch not in self._aggregators:
            cp.verify()
            self._early_checkpoints.forget_before(self.committee.epoch)
            self._early_checkpoints.hold(cp, {m for m, _ in self.ledger.committee()}.__contains__)
            return
        self._take_checkpoint(self._aggregators[cp.epoch], cp)
        await self.flush_checkpoints()

    def _kick_checkpoints(self) -> None:
        """Encode, sign and store epoch ends in the background: a step (and the blocks it
        made, waiting to be sent) never waits for a snapshot of the whole ledger."""
        if (self._closings or self._certs_to_store or self._snapshots_to_store) and (
                self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.create_task(self._flush_logged())

    async def _flush_logged(self) -> None:
        try:
            await self.flush_checkpoints()
        except ValuemeshError as exc:
            log.warning("could not store an epoch end: %s", exc.message, extra={"c": self.text_id})
        except Exception:
            log.exception("internal error while storing an epoch end", extra={"c": self.text_id})

    async def settle(self) -> None:
        """Wait until the epoch ends taken so far are encoded, signed and stored."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)
        await self.flush_checkpoints()

    async def flush_checkpoints(self) -> None:
        while self._closings or self._certs_to_store or self._snapshots_to_store:
            while self._closings:
                job = self._closings.pop(0)  # popped first: a concurrent flush never takes it twice
                # A large ledger takes a while to encode: in a worker thread, so the loop keeps
                # serving (encoding is pure Python, so it shares the GIL in 5 ms slices).
                self._finish_closing(job, await asyncio.to_thread(job.encode))
            snaps, self._snapshots_to_store = self._snapshots_to_store, []
            certs, self._certs_to_store = self._certs_to_store, []
            if snaps or certs:
                await self._store_epoch_ends(snaps, certs)
        await self._prune()

    async def _store_epoch_ends(self, snaps: Sequence[Snapshot], certs: Sequence[StoredCheckpoint]) -> None:
        async with self.store.batch() as tx:
            for snap in snaps:
                tx.put_snapshot(snap)
            for c in certs:
                tx.put_checkpoint(c)

    async def _prune(self) -> None:
        """Drop the blocks of closed epochs beyond the retained ones, and the order below them.

        Epoch e's blocks go once epoch e + retain_epochs is certified: a peer still deciding a
        recent epoch end finds its blocks here, and a restart starts from the latest kept
        snapshot (all blocks after it are kept)."""
        if self.retain_epochs is None or not self.certified:
            return
        keep_from = max(self.certified) - self.retain_epochs + 1
        edge = self.certified.get(keep_from - 1)
        if keep_from <= self._pruned_below or edge is None:
            return
        async with self.store.batch() as tx:
            tx.prune(self.cid, below_epoch=keep_from, below_index=edge.index)
        self._pruned_below = keep_from
        log.info("pruned blocks before epoch %d", keep_from, extra={"c": self.text_id, "epoch": keep_from})

    def _note(self, o: Outcome) -> None:
        if o.status in ("duplicate", "deferred"):
            return
        if len(self.final_log) < FINAL_VIEW_LIMIT:
            self.final_pos[o.record.id.hex()] = len(self.final_log)
            self.final_log.append((self.final_count, o))
            self.final_at.append(-(-time.time_ns() // 1_000_000))
        self.final_count += 1

    async def register(self, now: int, tier: str | None = None, join: Record | None = None) -> None:
        """Store the constellation as one this node follows: a new one with its genesis, or one
        we are joining (`join`: our join record, pending until it is final)."""
        async with self.store.batch() as tx:
            tx.put_constellation(self.info(tier))
            tx.put_records([self.genesis if join is None else join], now)
            if join is not None:  # (if the write fails, the node drops this engine)
                tx.add_pending(self.cid, [join.id], now)
                self.pending[join.id] = join

    async def store_proof(self, proof: EquivocationProof, now: int) -> None:
        """Keep a peer's proof that a member signed two blocks for one round."""
        async with self.store.batch() as tx:
            tx.put_equivocation(proof, now)

    def info(self, tier: str | None = None) -> ConstellationInfo:
        meta = self.ledger.reader.read("membership", "meta") or {}
        return ConstellationInfo(self.cid, self.genesis.raw, self.genesis.created, "active", tier or self.my_tier(),
                                 {k: Version.parse(v).major for k, v in meta.get("plugins", {}).items()},
                                 meta.get("name", ""))
