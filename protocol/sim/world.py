"""A virtual constellation for the simulator and tests: nodes running the real consensus
machine over a message pool, with crash/restart from each node's store and safety checks.

The world never decides when a message arrives: a driver (the seeded event loop in
`runner`, or a Hypothesis state machine) picks envelopes from `outbox` and delivers them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..consensus import Committed, Committee, Consensus, Output, Params
from ..identity import Identity, MemberId
from ..messages import SYNC_WINDOW_ROUNDS
from ..records import Block, Record, decode_block

# Timers shortened for the simulator's virtual clock (the production defaults are longer).
SIM_PARAMS = Params(round_timeout_ms=250, fetch_retry_ms=200, stall_ms=400)
SIM_CONSTELLATION = bytes(range(32))
# How many peers a node asks for a missing block at a time.
FETCH_FANOUT = 3
# How many top rounds a node sends back to a sync request (besides the window of
# messages.SYNC_WINDOW_ROUNDS from the asker's first undecided round, as the node does).
SYNC_ROUNDS = 2
# `settle` moves the clock by at least this much when nothing is in flight.
SETTLE_STEP_MS = 10

# Called for every committed block; when the machine reports an epoch end, a committee
# returned for a block of that output is scheduled, else the committee is kept.
Reconfigure = Callable[["SimNode", Committed], Committee | None]


class UnsignedIdentity(Identity):
    """An identity whose signatures are zeros: for benchmarks that measure without crypto."""

    __slots__ = ()

    def sign(self, message: bytes) -> bytes:
        return bytes(64)


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message in flight: a block, a batch of blocks (an answer to a fetch or a sync, as
    a real node's Blocks message carries many), a fetch request (ids) or a sync request
    (with the asker's epoch and first undecided round, as a real node's Heads carry them)."""

    src: int
    dst: int
    kind: str  # "block", "blocks", "fetch" or "sync"
    block: Block | None = None
    ids: tuple[bytes, ...] = ()
    epoch: int = 0
    since: int = 0
    blocks: tuple[Block, ...] = ()


@dataclass(slots=True)
class SimNode:
    """One node: its consensus machine and what a real node would keep on disk."""

    index: int
    identity: Identity | None
    byzantine: bool
    consensus: Consensus
    alive: bool = True
    crashed_for_good: bool = False
    store: dict[bytes, Block] = field(default_factory=dict)
    log: list[bytes] = field(default_factory=list)
    log_records: list[bytes] = field(default_factory=list)
    proposed: dict[bytes, Record] = field(default_factory=dict)
    seq: int = 0
    twins: dict[bytes, Block] = field(default_factory=dict)
    committees: list[Committee] = field(default_factory=list)
    # Per scheduled committee: the commit count when it began (what a checkpoint attests).
    starts: list[int] = field(default_factory=list)

    @property
    def honest(self) -> bool:
        return not self.byzantine


class World:
    """n core nodes (some Byzantine equivocators) plus observers over a virtual network."""

    def __init__(
        self,
        n: int,
        *,
        byzantine: Iterable[int] = (),
        observers: int = 1,
        crypto: bool = True,
        params: Params = SIM_PARAMS,
        seed_bytes: bytes = b"",
        reconfigure: Reconfigure | None = None,
    ) -> None:
        self.crypto = crypto
        self.reconfigure = reconfigure
        self.params = params
        self.now = 0
        byz = set(byzantine)
        cls = Identity if crypto else UnsignedIdentity
        ids = [cls(_seed(seed_bytes, i)) for i in range(n)]
        self.committee = Committee.of([i.member for i in ids])
        self.nodes: list[SimNode] = []
        for i, ident in enumerate(ids):
            c = Consensus(SIM_CONSTELLATION, self.committee, ident, params)
            self.nodes.append(SimNode(i, ident, i in byz, c))
        for j in range(observers):
            c = Consensus(SIM_CONSTELLATION, self.committee, None, params)
            self.nodes.append(SimNode(n + j, None, False, c))
        self.by_member: dict[MemberId, SimNode] = {i.member: self.nodes[k] for k, i in enumerate(ids)}
        self.outbox: list[Envelope] = []
        self.partition: list[set[int]] | None = None
        self.verified: set[bytes] = set()
        self.signed: dict[tuple[MemberId, int, int], bytes] = {}
        self.proposer: dict[bytes, int] = {}
        self.proposed_at: dict[bytes, tuple[int, int]] = {}  # record id -> (ms, round)
        self.latency_ms: list[int] = []
        self.latency_rounds: list[int] = []
        self.proofs = 0
        self.violations: list[str] = []
        self.tick_requests: list[tuple[int, int]] = []  # (time, node) for the driver
        # For equivocators: which peers get the twin of each block (set by the driver).
        self.twin_split: dict[int, set[int]] = {}

    # ------------------------------------------------------------------ network

    def connected(self, a: int, b: int) -> bool:
        if self.partition is None:
            return True
        return any(a in g and b in g for g in self.partition)

    def send(self, src: int, dst: int, kind: str, block: Block | None = None,
             ids: tuple[bytes, ...] = ()) -> None:
        if src != dst:
            if kind == "sync":
                c = self.nodes[src].consensus
                self.outbox.append(Envelope(src, dst, kind, block, ids, c.epoch, c.decided_round + 1))
            else:
                self.outbox.append(Envelope(src, dst, kind, block, ids))

    def send_blocks(self, src: int, dst: int, blocks: list[Block]) -> None:
        """Blocks in one message, taken in one step as the real node takes a Blocks message."""
        if src != dst and blocks:
            self.outbox.append(Envelope(src, dst, "blocks", blocks=tuple(blocks)))

    def peers(self, i: int) -> list[int]:
        return [n.index for n in self.nodes if n.index != i]

    def deliver(self, env: Envelope) -> None:
        """Hand one envelope to its destination (if up and reachable)."""
        node = self.nodes[env.dst]
        if not node.alive or not self.connected(env.src, env.dst):
            return
        if env.kind == "block" and env.block is not None:
            self._receive_blocks(node, [env.block])
        elif env.kind == "blocks":
            self._receive_blocks(node, list(env.blocks))
        elif env.kind == "fetch":
            found = [node.store.get(bid) or node.twins.get(bid) for bid in env.ids]
            self.send_blocks(node.index, env.src, [b for b in found if b is not None])
        elif env.kind == "sync":
            c = node.consensus
            reply = self._sync_window(node, env.epoch, env.since)
            if env.epoch < c.epoch:
                # The asker still needs the end of an epoch we closed: our stored tail of it.
                reply += self._epoch_tails(node, env.epoch, c.epoch)
            top = c.top_round
            for r in range(max(top - SYNC_ROUNDS + 1, 0), top + 1):
                reply += c.blocks_at(r)
            self.send_blocks(node.index, env.src, reply)

    @staticmethod
    def _sync_window(node: SimNode, epoch: int, since: int) -> list[Block]:
        end = since + SYNC_WINDOW_ROUNDS
        return sorted(
            (b for b in node.store.values() if b.epoch == epoch and since <= b.round < end),
            key=lambda b: (b.round, b.id),
        )

    @staticmethod
    def _epoch_tails(node: SimNode, first: int, last: int) -> list[Block]:
        by_epoch: dict[int, list[Block]] = {}
        for b in node.store.values():
            if first <= b.epoch < last:
                by_epoch.setdefault(b.epoch, []).append(b)
        out: list[Block] = []
        for blocks in by_epoch.values():
            top = max(b.round for b in blocks)
            out += sorted((b for b in blocks if b.round > top - SYNC_ROUNDS), key=lambda b: (b.round, b.id))
        return out

    def _receive_blocks(self, node: SimNode, blocks: list[Block]) -> None:
        if self.crypto:
            for block in blocks:
                if block.id not in self.verified:
                    decode_block(block.raw)  # a real node verifies every signature before consensus
                    self.verified.add(block.id)
        out, errors = node.consensus.add_blocks(blocks, self.now)
        for i, e in errors:
            author = self.by_member.get(blocks[i].author)
            if author is not None and author.honest and "Too many" not in e.message:
                self.violations.append(f"node {node.index} rejected honest block r{blocks[i].round}: {e.message}")
        refused = {i for i, _ in errors}
        for i, block in enumerate(blocks):
            if i not in refused:
                node.store[block.id] = block
        self.handle(node, out)

    # ------------------------------------------------------------------ node actions

    def handle(self, node: SimNode, out: Output) -> None:
        """Carry out one Output the way the real node does."""
        for b in out.blocks:
            key = (b.author, b.epoch, b.round)
            if node.honest and self.signed.get(key, b.id) != b.id:
                self.violations.append(f"honest node {node.index} signed round {b.round} twice")
            self.signed[key] = b.id
            node.store[b.id] = b
            self._broadcast(node, b)
        for b in out.rebroadcast:
            self._broadcast(node, b)
        if out.missing:
            others = self.peers(node.index)
            k = min(FETCH_FANOUT, len(others))
            start = (self.now // 7 + node.index) % len(others) if others else 0
            for j in range(k):
                self.send(node.index, others[(start + j) % len(others)], "fetch", ids=out.missing)
        if out.request_sync:
            for p in self.peers(node.index):
                self.send(node.index, p, "sync")
        nxt: Committee | None = None
        for c in out.committed:
            node.log.append(c.block.id)
            if self.reconfigure is not None and c.anchor_round == out.epoch_end:
                nxt = self.reconfigure(node, c) or nxt
            for rec in c.records:
                node.log_records.append(rec.id)
                if rec.id in node.proposed and rec.id in self.proposed_at:
                    t, r = self.proposed_at.pop(rec.id)
                    self.latency_ms.append(self.now - t)
                    self.latency_rounds.append(max(node.consensus.round - r, 0))
        self.proofs += len(out.proofs)
        if out.next_tick_ms is not None:
            self.tick_requests.append((out.next_tick_ms, node.index))
        if out.epoch_end is not None and node.consensus.epoch_ending == out.epoch_end:
            if nxt is None and node.consensus.epoch_due:  # a periodic end: the same core goes on
                cur = node.consensus.committee_at(1 << 60)
                nxt = Committee(cur.epoch + 1, cur.members, out.epoch_end + 1)
            if nxt is not None:
                node.committees.append(nxt)
                node.starts.append(len(node.log))
                self.handle(node, node.consensus.schedule_committee(nxt))
            else:
                self.handle(node, node.consensus.keep_committee())

    def _broadcast(self, node: SimNode, b: Block) -> None:
        split = self.twin_split.get(node.index)
        if not node.byzantine or split is None or node.identity is None:
            for p in self.peers(node.index):
                self.send(node.index, p, "block", b)
            return
        twin = Block.create(
            node.identity, constellation=b.constellation, epoch=b.epoch, round=b.round,
            prev=b.prev, parents=b.parents, records=(), created=b.created + 1,
        )
        node.twins[twin.id] = twin
        for p in self.peers(node.index):
            self.send(node.index, p, "block", twin if p in split else b)

    def propose(
        self, i: int, *, body: int = 0, type: str = "sim", data: Mapping[str, Any] | None = None
    ) -> Record | None:
        node = self.nodes[i]
        if not node.alive or node.identity is None:
            return None
        rec = Record.create(
            node.identity, type=type, v=1, constellation=SIM_CONSTELLATION, seq=node.seq,
            body=dict(data) if data is not None else {"n": body}, created=self.now,
        )
        node.seq += 1
        node.proposed[rec.id] = rec
        self.proposer[rec.id] = i
        self.proposed_at[rec.id] = (self.now, node.consensus.round)
        self.handle(node, node.consensus.propose([rec], self.now))
        return rec

    def tick(self, i: int) -> None:
        node = self.nodes[i]
        if node.alive:
            self.handle(node, node.consensus.tick(self.now))

    def crash(self, i: int, *, for_good: bool = False) -> None:
        node = self.nodes[i]
        node.alive = False
        node.crashed_for_good = for_good

    def restart(self, i: int) -> None:
        """Bring a node back from its store alone, as after a process restart."""
        node = self.nodes[i]
        if node.committees and len(node.log) % 2 == 0:
            # Half the restarts after an epoch change start from the latest epoch's
            # checkpoint, as a node that loads its local snapshot does: only that epoch's
            # blocks are replayed, and the order goes on from the index it closed at.
            com = node.committees[-1]
            first = node.starts[-1]
            node.consensus = Consensus(SIM_CONSTELLATION, com, node.identity, self.params, first_index=first)
            blocks = [b for b in node.store.values() if b.epoch >= com.epoch]
            out = node.consensus.restore(blocks, node.log[first:], [])
        else:
            node.consensus = Consensus(SIM_CONSTELLATION, self.committee, node.identity, self.params)
            out = node.consensus.restore(node.store.values(), node.log, node.committees)
        node.alive = True
        node.crashed_for_good = False
        self.handle(node, out)
        waiting = [r for rid, r in node.proposed.items() if rid not in set(node.log_records)]
        if waiting:
            self.handle(node, node.consensus.propose(waiting, self.now))
        self.reconnect(i)

    def reconnect(self, i: int) -> None:
        """What peers do on (re)connecting: ask each other for their latest blocks."""
        for p in self.peers(i):
            self.send(i, p, "sync")
            self.send(p, i, "sync")
        self.tick_requests.append((self.now, i))

    def heal(self) -> None:
        self.partition = None
        for n in self.nodes:
            if n.alive:
                for p in self.peers(n.index):
                    self.send(n.index, p, "sync")
                self.tick_requests.append((self.now, n.index))

    def settle(self, max_events: int = 20_000) -> bool:
        """Deliver everything in order and run timers until nothing is left to do.

        A fair, loss-free schedule for tests; returns False if `max_events` ran out first.
        """
        for _ in range(max_events):
            if self.outbox:
                self.deliver(self.outbox.pop(0))
                continue
            due = [(t, i) for t, i in self.tick_requests if self.nodes[i].alive]
            self.tick_requests.clear()
            if not due:
                return True
            t, _ = min(due)
            self.now = max(self.now + SETTLE_STEP_MS, t) if t <= self.now else t
            for i in sorted({i for _, i in due}):
                self.tick(i)
        return False

    # ------------------------------------------------------------------ checks

    def honest_nodes(self) -> list[SimNode]:
        return [n for n in self.nodes if n.honest]

    def check_safety(self) -> list[str]:
        """Prefix agreement, no double ordering, authorship, identical exclusion."""
        out = list(self.violations)
        honest = self.honest_nodes()
        longest = max(honest, key=lambda n: len(n.log))
        for n in honest:
            if n.log != longest.log[: len(n.log)]:
                out.append(f"node {n.index}'s log is not a prefix of node {longest.index}'s")
            if len(set(n.log)) != len(n.log):
                out.append(f"node {n.index} ordered a block twice")
            if len(set(n.log_records)) != len(n.log_records):
                out.append(f"node {n.index} ordered a record twice")
            slots = [(b.author, b.round) for b in (n.store.get(i) for i in n.log) if b is not None]
            if len(set(slots)) != len(slots):
                out.append(f"node {n.index} ordered two blocks of one author and round")
        for rid in longest.log_records:
            who = self.proposer.get(rid)
            if who is None:
                out.append("a committed record was never proposed")
        for n in honest:
            for b in (n.store[i] for i in n.log if i in n.store):
                for rec in b.records:
                    who = self.proposer.get(rec.id)
                    if who is not None and self.nodes[who].identity is not None:
                        ident = self.nodes[who].identity
                        if ident is not None and ident.member != rec.author:
                            out.append("a committed record's author is not its proposer")
        members = {n.identity.member for n in honest if n.identity is not None}
        schedules = {tuple(n.committees) for n in honest if n.committees}
        if len(schedules) > 1:
            out.append("honest nodes scheduled different committees")
        for n in honest:
            # A node restarted from a checkpoint knows the committees from its epoch on only.
            known = n.consensus.committee_at(0).start_round
            for ob in (n.store.get(i) for i in n.log):
                if ob is not None and ob.round >= known and ob.epoch != n.consensus.committee_at(ob.round).epoch:
                    out.append(f"node {n.index} ordered a block of the wrong epoch")
                    break
        # Exclusion lasts to the end of an epoch, so compare nodes within one epoch.
        by_decided: dict[tuple[int, int], frozenset[MemberId]] = {}
        for n in sorted(honest, key=lambda n: (n.consensus.epoch, n.consensus.decided_round)):
            if not n.alive:
                continue
            ex = n.consensus.excluded
            if ex & members:
                out.append(f"node {n.index} excluded an honest member")
            e, d = n.consensus.epoch, n.consensus.decided_round
            if (e, d) in by_decided and by_decided[e, d] != ex:
                out.append(f"node {n.index} excludes different equivocators at round {d}")
            if any(not v <= ex for (ke, k), v in by_decided.items() if ke == e and k < d):
                out.append(f"node {n.index} forgot an equivocator another node excludes")
            by_decided[e, d] = ex
        return out

    def check_liveness(self) -> list[str]:
        """Every live honest node has ordered every record an honest, live core proposed."""
        out: list[str] = []
        wanted = [
            rid for n in self.nodes if n.honest and not n.crashed_for_good
            for rid in n.proposed
        ]
        for n in self.honest_nodes():
            if n.crashed_for_good:
                continue
            have = set(n.log_records)
            lost = [rid for rid in wanted if rid not in have]
            if lost:
                out.append(f"node {n.index} never ordered {len(lost)} honest record(s)")
        return out


def _seed(seed_bytes: bytes, i: int) -> bytes:
    return hashlib.blake2b(seed_bytes + i.to_bytes(4, "big"), digest_size=32).digest()
