"""Model-based test of the store (Hypothesis stateful): random batches against a plain-Python
model of the final order, final and pending records, stored objects and equivocation evidence.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from store_kit import ALICE, BOB, C, blk, info, rec

from valuemesh.node.store import CommitEntry, FinalOrderError, Store, StoreError
from valuemesh.protocol.records import Block, Record

_AUTHORS = (ALICE, BOB)
# Two variants per (author, seq) slot and per (author, round) slot, so equivocations happen.
_RECORDS = {(a, s, v): rec(_AUTHORS[a], s, {"v": v}) for a in range(2) for s in range(3) for v in range(2)}
_BLOCKS = {
    (a, r, v): blk(_AUTHORS[a], r, [_RECORDS[(a, r, v)], _RECORDS[(1 - a, r, 0)]])
    for a in range(2)
    for r in range(3)
    for v in range(2)
}
_REC_KEYS = sorted(_RECORDS)
_BLOCK_KEYS = sorted(_BLOCKS)


class StoreModel(RuleBasedStateMachine):
    """Random batches against the store and a plain-Python model of what it must hold."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.loop = asyncio.new_event_loop()
        self.store = self.run(Store.open(Path(self.dir.name) / "m.sqlite"))
        self.run(self._write(lambda tx: tx.put_constellation(info())))
        self.slot_holder: dict[tuple[bytes, int], bytes] = {}  # (author, seq) -> record id
        self.record_evidence: set[tuple[bytes, int]] = set()
        self.block_slots: dict[tuple[bytes, int], set[bytes]] = {}
        self.blocks: set[bytes] = set()
        self.commits: list[bytes] = []
        self.final: list[bytes] = []
        self.pending: set[bytes] = set()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def _write(self, fill: Any) -> Any:
        async with self.store.batch() as tx:
            fill(tx)
        return tx.result

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()
        self.dir.cleanup()

    # model transitions ---------------------------------------------------------------
    def _model_records(self, records: list[Record]) -> int:
        proofs = 0
        for r in records:
            slot = (r.author.key, r.seq)
            holder = self.slot_holder.setdefault(slot, r.id)
            if holder != r.id and slot not in self.record_evidence:
                self.record_evidence.add(slot)
                proofs += 1
        return proofs

    def _model_block(self, b: Block) -> int:
        if b.id in self.blocks:
            return 0
        self.blocks.add(b.id)
        same = self.block_slots.setdefault((b.author.key, b.round), set())
        proofs = 1 if len(same) == 1 else 0  # one proof per slot, found with the second block
        same.add(b.id)
        return proofs + self._model_records(list(b.records))

    # rules ------------------------------------------------------------------------------
    @rule(keys=st.lists(st.sampled_from(_REC_KEYS), min_size=1, max_size=4))
    def put_records(self, keys: list[tuple[int, int, int]]) -> None:
        records = [_RECORDS[k] for k in keys]
        result = self.run(self._write(lambda tx: tx.put_records(records, 1)))
        unique = list({r.id: r for r in records}.values())
        assert len(result.proofs) == self._model_records(unique)

    @rule(key=st.sampled_from(_BLOCK_KEYS))
    def put_block(self, key: tuple[int, int, int]) -> None:
        b = _BLOCKS[key]
        result = self.run(self._write(lambda tx: tx.put_block(b, 1)))
        assert len(result.proofs) == self._model_block(b)

    @rule(key=st.sampled_from(_BLOCK_KEYS))
    def commit(self, key: tuple[int, int, int]) -> None:
        b = _BLOCKS[key]
        entry = CommitEntry(len(self.commits), b.id, b.round)
        if b.id not in self.blocks:
            with pytest.raises(StoreError, match="not stored"):
                self.run(self._write(lambda tx: tx.append_commits(C, [entry])))
        elif b.id in self.commits:
            with pytest.raises(FinalOrderError):
                self.run(self._write(lambda tx: tx.append_commits(C, [entry])))
        else:
            self.run(self._write(lambda tx: tx.append_commits(C, [entry])))
            self.commits.append(b.id)
            for r in b.records:
                if r.id not in self.final:
                    self.final.append(r.id)
                self.pending.discard(r.id)

    @rule(key=st.sampled_from(_REC_KEYS))
    def propose(self, key: tuple[int, int, int]) -> None:
        r = _RECORDS[key]
        if self.slot_holder.get((r.author.key, r.seq)) != r.id:
            with pytest.raises(StoreError, match="stored in this constellation"):
                self.run(self._write(lambda tx: tx.add_pending(C, [r.id], 2)))
            return
        self.run(self._write(lambda tx: tx.add_pending(C, [r.id], 2)))
        if r.id not in self.final:
            self.pending.add(r.id)

    @rule(key=st.sampled_from(_BLOCK_KEYS), gap=st.integers(1, 3))
    def failing_batch_changes_nothing(self, key: tuple[int, int, int], gap: int) -> None:
        b = _BLOCKS[key]
        bad = CommitEntry(len(self.commits) + gap, b.id, b.round)

        def fill(tx: Any) -> None:
            tx.put_block(b, 1)
            tx.put_records(list(_RECORDS.values()), 1)
            tx.append_commits(C, [bad])

        with pytest.raises(FinalOrderError):
            self.run(self._write(fill))

    @rule()
    def reopen(self) -> None:
        self.run(self.store.close())
        self.store = self.run(Store.open(Path(self.dir.name) / "m.sqlite"))

    # invariants --------------------------------------------------------------------------
    @invariant()
    def store_matches_model(self) -> None:
        s = self.store
        assert [e.block_id for e in self.run(s.commits(C))] == self.commits
        assert [f.record.id for f in self.run(s.final_records(C))] == self.final
        assert {r.id for r in self.run(s.pending(C))} == self.pending
        assert self.run(s.has_blocks(list({b.id for b in _BLOCKS.values()}))) == self.blocks
        stored = self.run(s.get_records([r.id for r in _RECORDS.values()]))
        assert set(stored) == set(self.slot_holder.values())
        evidence = self.run(s.equivocations(C))
        assert {(e.author.key, e.slot) for e in evidence if e.kind == "record"} == self.record_evidence
        assert {(e.author.key, e.slot) for e in evidence if e.kind == "block"} == {
            slot for slot, ids in self.block_slots.items() if len(ids) > 1
        }
        assert all(e.proof.verify() == e.author for e in evidence)


TestStoreModel = StoreModel.TestCase
TestStoreModel.settings = settings(
    max_examples=25, stateful_step_count=15, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
