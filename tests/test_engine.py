"""The engine's own bookkeeping around consensus: blocks it already took are known by
their bytes, so a second peer streaming the same gap costs no second decode and verify."""

from __future__ import annotations

import itertools
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from valuemesh.node import engine as engine_mod
from valuemesh.node import views
from valuemesh.node.archive import build_archive
from valuemesh.node.daemon import installed_registry
from valuemesh.node.engine import Effects, Engine
from valuemesh.node.store import Store, StoreError
from valuemesh.protocol.builtin.membership import make_genesis
from valuemesh.protocol.consensus import CheckpointCertificate, Output, Params, verify_chain
from valuemesh.protocol.errors import LocalError
from valuemesh.protocol.identity import Identity, MemberId
from valuemesh.protocol.invite import Invite
from valuemesh.protocol.records import Record

FOUNDER = Identity(bytes([3]) * 32)
T0 = 1_795_000_000_000


async def _engine(path: Path, params: Params = engine_mod.NODE_PARAMS) -> tuple[Store, Engine]:
    registry = installed_registry()
    genesis = make_genesis(FOUNDER, name="bakery", purpose="", nonce=bytes(16), created=T0,
                           plugins={n: str(p.version) for n, p in registry.plugins.items()})
    store = await Store.open(path)
    eng = Engine(store, registry, FOUNDER, genesis, params)
    await eng.register(T0)
    return store, eng


async def _finalise(eng: Engine, count: int) -> list[Record]:
    """The founder's next `count` records, one at a time; a single core member finalises
    each at once (bounded ticks)."""
    return await _finalise_from(eng, 1, count)


async def _finalise_from(eng: Engine, first: int, count: int) -> list[Record]:
    out = []
    for seq in range(first, first + count):
        out.append(_record(eng, seq))
        await eng.submit([out[-1]], T0 + 100 * seq)
        for t in range(5):
            await eng.tick(T0 + 100 * seq + 10 * (t + 1))
    await eng.settle()  # epoch ends are encoded and stored in the background
    return out


def _record(eng: Engine, seq: int) -> Record:
    body = {"op": "record", "action": "work", "quantity": "1", "unit": "hour"}
    return Record.create(FOUNDER, type="contribution", v=1, constellation=eng.cid, seq=seq, body=body,
                         created=T0 + seq)


async def test_blocks_taken_once_are_known_by_their_bytes(tmp_path: Path) -> None:
    store_a, a = await _engine(tmp_path / "a.sqlite")
    store_b, b = await _engine(tmp_path / "b.sqlite")  # a copy of the same member's node
    try:
        eff = await a.submit([_record(a, 1)], T0 + 10)
        assert eff.blocks, "a single core member makes a block for its record at once"
        block = eff.blocks[0]
        assert not b.seen_before(block.raw)
        _, errors = await b.add_blocks([block], T0 + 20)
        assert errors == []
        assert b.seen_before(block.raw)
        assert not b.seen_before(block.raw[:-1] + bytes([block.raw[-1] ^ 1]))  # other bytes: not known
        # Taking it again changes nothing (the daemon skips it before decoding).
        _, errors = await b.add_blocks([block], T0 + 30)
        assert errors == []
    finally:
        await store_a.close()
        await store_b.close()


async def test_a_block_of_ours_whose_write_failed_is_never_sent(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """After a crash this node would not know it signed a block whose transaction failed, and
    could sign that round again: so the block must never leave, not even as the machine's
    re-send of its last block when stalled."""
    store, eng = await _engine(tmp_path / "a.sqlite")
    try:
        await _finalise(eng, 1)
        me = FOUNDER.member
        stored = next(b for b in eng.consensus.blocks_at(eng.consensus.last_own_round) if b.author == me)
        real = store.batch

        def refuse_our_blocks(*, durable: bool = True, urgent: bool = False):  # type: ignore[no-untyped-def]
            if urgent:  # the batch holding our new blocks
                raise StoreError("The store refused the batch and changed nothing: disk full.")
            return real(durable=durable, urgent=urgent)

        monkeypatch.setattr(store, "batch", refuse_our_blocks)
        with pytest.raises(StoreError):
            await eng.submit([_record(eng, 2)], T0 + 1_000)
        lost = next(b for b in eng.consensus.blocks_at(eng.consensus.last_own_round) if b.author == me)
        assert lost.round > stored.round
        # While the engine waits to be rebuilt, the machine's stall guard re-sends nothing.
        monkeypatch.setattr(eng.consensus, "tick", lambda now: Output(rebroadcast=(stored, lost)))
        monkeypatch.setattr(eng._retry, "at", T0 + 10_000)
        assert await eng.tick(T0 + 5_000) == Effects()
        monkeypatch.setattr(store, "batch", real)
        # Rebuilt from the store, the machine knows only the stored block of ours: the lost
        # one never left and is forgotten, so its round is free to sign again.
        eff = await eng.tick(T0 + 10_000)
        assert eng.failed is None and lost.id not in {b.id for b in eff.blocks + eff.rebroadcast}
        assert lost.id not in {b.id for b in eng.consensus.blocks_at(lost.round)}
        assert stored.id in {b.id for b in eng.consensus.blocks_at(stored.round)}
        assert await store.get_block(lost.id) is None
    finally:
        await store.close()


async def test_the_memory_of_taken_blocks_is_bounded(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(engine_mod, "SEEN_BLOCKS", 2)
    store_a, a = await _engine(tmp_path / "a.sqlite")
    store_b, b = await _engine(tmp_path / "b.sqlite")
    try:
        blocks = []
        for seq in range(1, 4):
            blocks += (await a.submit([_record(a, seq)], T0 + 10 * seq)).blocks
        assert len(blocks) >= 3
        for blk in blocks:
            await b.add_blocks([blk], T0 + 100)
        assert len(b._seen_raw) == 2
        assert b.seen_before(blocks[-1].raw) and not b.seen_before(blocks[0].raw)
    finally:
        await store_a.close()
        await store_b.close()


NEWCOMER = Identity(bytes([4]) * 32)


async def _grow_to_two_cores(eng: Engine) -> None:
    """The founder invites a second core member who joins: the committee changes, so epoch 0
    closes with a snapshot and a checkpoint the founder alone certifies (quorum 1 of 1)."""
    inv = Invite.create(FOUNDER, constellation=eng.cid, name="bakery", tier="core", roles=("producer",), uses=1,
                        expires=T0 + 3_600_000, addrs=(("127.0.0.1", 7300),), nonce=bytes(16))
    invite = Record.create(FOUNDER, type="membership", v=1, constellation=eng.cid, seq=1,
                           body={"op": "invite", "token": inv.raw()}, created=T0 + 1)
    join = Record.create(NEWCOMER, type="membership", v=1, constellation=eng.cid, seq=0,
                         body={"op": "join", "token": inv.raw()}, created=T0 + 2)
    await eng.submit([invite], T0 + 10)
    for t in range(20):  # a single core member finalises alone; bounded
        await eng.tick(T0 + 100 * (t + 1))
        if eng.final_count >= 2:
            break
    await eng.submit([join], T0 + 3_000)
    for t in range(40):
        await eng.tick(T0 + 3_000 + 100 * (t + 1))
        if eng.committee.epoch == 1:
            break
    assert eng.committee.epoch == 1 and len(eng.committee.members) == 2
    await eng.settle()


async def test_a_newcomer_starts_from_the_checkpoint_and_restarts_from_it(tmp_path: Path) -> None:
    store, founder = await _engine(tmp_path / "founder.sqlite")
    try:
        await _grow_to_two_cores(founder)
        snap = await store.latest_snapshot(founder.cid)
        [cert] = await store.checkpoints(founder.cid)
        assert snap is not None and snap.epoch == 0 and cert.epoch == 0
        # What the certificate attests is this snapshot, and the committee it starts.
        assert cert.snapshot_hash == snap.hash and cert.index == snap.index == founder.commit_index
        assert cert.state_hash == founder.ledger.state_hash()
        chain = [(CheckpointCertificate(cert.content, tuple((MemberId(k), v) for k, v in cert.signatures.items())),
                  founder.snapshot_committee(snap))]
        assert verify_chain(founder.genesis_committee, chain) == founder.committee
        # The founder's own restart replays its whole history (it holds it), to the same state.
        again = Engine(store, founder.registry, FOUNDER, founder.genesis)
        await again.load()
        assert again.base is None and again.ledger.state_hash() == founder.ledger.state_hash()
        assert again.committee == founder.committee and len(views.final(again)) == founder.final_count
    finally:
        await store.close()

    registry = installed_registry()
    path = tmp_path / "newcomer.sqlite"
    store2 = await Store.open(path)
    try:
        eng = Engine(store2, registry, NEWCOMER, founder.genesis)
        await eng.register(T0)
        await eng.install_snapshot(snap, [cert])
        assert eng.base == snap and eng.ledger.state_hash() == founder.ledger.state_hash()
        assert eng.committee == founder.committee and eng.is_core()
        assert eng.commit_index == founder.commit_index and eng.final_count == founder.final_count
        assert eng.consensus.round == founder.committee.start_round
        with pytest.raises(LocalError):  # only onto an empty engine
            await eng.install_snapshot(snap, [cert])
    finally:
        await store2.close()
    store3 = await Store.open(path)
    try:  # a restart of the newcomer starts from its stored snapshot: it holds nothing before
        eng = Engine(store3, registry, NEWCOMER, founder.genesis)
        await eng.load()
        assert eng.base == snap and eng.ledger.state_hash() == founder.ledger.state_hash()
        assert eng.committee == founder.committee and eng.certified[0].snapshot_hash == snap.hash
    finally:
        await store3.close()


async def test_an_epoch_also_ends_every_epoch_rounds_with_the_same_core(tmp_path: Path) -> None:
    params = replace(engine_mod.NODE_PARAMS, epoch_rounds=3)
    store, eng = await _engine(tmp_path / "a.sqlite", params)
    try:
        await _finalise(eng, 12)
        assert eng.final_count == 13
        assert eng.committee.epoch >= 2 and eng.committee.members == eng.genesis_committee.members
        starts = [c.start_round for c in sorted(eng._committees.values(), key=lambda c: c.epoch)]
        assert all(b - a >= 3 for a, b in itertools.pairwise(starts))
        cps = await store.checkpoints(eng.cid)
        assert [c.epoch for c in cps] == list(range(eng.committee.epoch))  # each certified (quorum 1 of 1)
        snap = await store.latest_snapshot(eng.cid)
        assert snap is not None and snap.epoch == eng.committee.epoch - 1
        # A restart replays the same epochs (the machine checks the stored committees cover
        # every periodic end) to the same state.
        again = Engine(store, eng.registry, FOUNDER, eng.genesis, params)
        await again.load()
        assert again.committee == eng.committee and again.ledger.state_hash() == eng.ledger.state_hash()
    finally:
        await store.close()


async def test_pruning_keeps_the_retained_epochs_and_a_restart_needs_nothing_older(tmp_path: Path) -> None:
    params = replace(engine_mod.NODE_PARAMS, epoch_rounds=3)
    path = tmp_path / "a.sqlite"
    store, eng = await _engine(path, params)
    try:
        eng.retain_epochs = 1
        records = await _finalise(eng, 15)
        assert eng.final_count == 16 and eng.committee.epoch >= 3
        newest = max(eng.certified)
        kept = {b.epoch async for b in store.iter_blocks(eng.cid)}
        assert min(kept) == newest  # the last closed epoch stays for lagging peers; older ones are gone
        assert await store.first_commit_index(eng.cid) == eng.certified[newest - 1].index > 0
        # Every final record is still readable by id, pruned blocks or not.
        assert await store.record_status(records[0].id) == "final"
        with pytest.raises(StoreError, match="never rewritten"):  # the order above a snapshot stays
            async with store.batch() as tx:
                tx.prune(eng.cid, below_epoch=0, below_index=eng.commit_index)
        with pytest.raises(LocalError, match="whole history"):
            await build_archive(store, eng, eng.registry)
        state, committee = eng.ledger.state_hash(), eng.committee
    finally:
        await store.close()
    store = await Store.open(path)
    try:  # a restart starts from the latest snapshot: it needs nothing that was pruned
        again = Engine(store, eng.registry, FOUNDER, eng.genesis, params)
        again.retain_epochs = 1
        await again.load()
        assert again.base is not None and again.ledger.state_hash() == state and again.committee == committee
        assert again.final_count == 16
    finally:
        await store.close()


async def test_a_node_far_behind_skips_ahead_to_a_later_snapshot(tmp_path: Path) -> None:
    params = replace(engine_mod.NODE_PARAMS, epoch_rounds=3)
    store_a, a = await _engine(tmp_path / "a.sqlite", params)
    store_b = await Store.open(tmp_path / "b.sqlite")
    try:
        b = Engine(store_b, a.registry, NEWCOMER, a.genesis, params)  # a follower of the founder
        await b.register(T0)
        await _finalise(a, 2)
        _, errors = await b.add_blocks([blk async for blk in store_a.iter_blocks(a.cid)], T0 + 500)
        assert errors == [] and b.final_count == a.final_count == 3
        seen = {blk.id async for blk in store_a.iter_blocks(a.cid)}
        more = await _finalise_from(a, 3, 13)  # b misses all of it: several epochs
        snap = await store_a.latest_snapshot(a.cid)
        assert snap is not None and snap.epoch > b.committee.epoch and b.commit_index < snap.index
        await b.fast_forward(snap, await store_a.checkpoints(a.cid))
        assert b.base == snap and b.commit_index == snap.index and b.final_count == snap.final
        with pytest.raises(LocalError, match="not ahead"):
            await b.fast_forward(snap, [])
        # It goes on with the blocks after the snapshot, to the founder's state.
        later = [blk async for blk in store_a.iter_blocks(a.cid) if blk.id not in seen and blk.epoch > snap.epoch]
        _, errors = await b.add_blocks(later, T0 + 10_000)
        assert errors == [] and b.ledger.state_hash() == a.ledger.state_hash() and b.final_count == a.final_count
        # Its record list begins at the snapshot, and from there is the founder's, entry for entry.
        assert [(e["index"], e["id"], e["status"]) for e in views.final(b)] == \
            [(e["index"], e["id"], e["status"]) for e in views.final(a)[snap.final:]]
        assert more[-1].id.hex() in {e["id"] for e in views.final(a)}
    finally:
        await store_a.close()
        await store_b.close()
    store_b = await Store.open(tmp_path / "b.sqlite")
    try:  # its order has a gap now, so a restart starts from the snapshot it skipped to
        again = Engine(store_b, a.registry, NEWCOMER, a.genesis, params)
        await again.load()
        assert again.base == snap and again.ledger.state_hash() == a.ledger.state_hash()
    finally:
        await store_b.close()


async def test_a_kept_snapshot_is_served_in_slices_without_decoding(tmp_path: Path) -> None:
    store, eng = await _engine(tmp_path / "a.sqlite", replace(engine_mod.NODE_PARAMS, epoch_rounds=3))
    try:
        await _finalise(eng, 6)
        snap = await store.latest_snapshot(eng.cid)
        assert snap is not None
        size = len(snap.raw) // 3 + 1
        parts, offset = [], 0
        while offset < len(snap.raw):  # bounded: each part advances by size > 0
            got = await store.snapshot_part(eng.cid, snap.epoch, offset, size)
            assert got is not None and got[1] == len(snap.raw)
            parts.append(got[0])
            offset += len(got[0])
        assert b"".join(parts) == snap.raw and len(parts) == 3
        assert await store.snapshot_part(eng.cid, snap.epoch, len(snap.raw), size) is None
        assert await store.snapshot_part(eng.cid, snap.epoch + 5, 0, size) is None
        with pytest.raises(LocalError):
            await store.snapshot_part(eng.cid, snap.epoch, -1, size)
    finally:
        await store.close()


STRANGER = Identity(bytes([9]) * 32)


async def test_a_strangers_checkpoint_signatures_neither_stall_nor_abort_an_epoch_end(tmp_path: Path) -> None:
    """A key outside the core signs checkpoints of the current and the next epoch (#16, the
    epoch-change stall): the current one is refused before its signature is checked, the next
    one is held and, when that epoch ends, dropped without aborting the step."""
    from valuemesh.protocol.consensus import Checkpoint, Content
    from valuemesh.protocol.errors import AuthorizationError

    params = replace(engine_mod.NODE_PARAMS, epoch_rounds=3)
    store, eng = await _engine(tmp_path / "a.sqlite", params)
    try:
        def forged(epoch: int) -> Checkpoint:
            return Checkpoint.create(STRANGER, Content(eng.cid, epoch, 3, 3, b"\x01" * 32, b"\x02" * 32,
                                                       b"\x03" * 32))
        with pytest.raises(AuthorizationError):
            await eng.add_checkpoint(forged(0))
        await eng.add_checkpoint(forged(1))
        assert eng._early_checkpoints.held(1) == 1
        await _finalise(eng, 12)
        assert eng.final_count == 13 and eng.committee.epoch >= 2
        cps = await store.checkpoints(eng.cid)
        assert [c.epoch for c in cps] == list(range(eng.committee.epoch))  # every epoch end certified
        assert all(set(c.signatures) == {FOUNDER.member.key} for c in cps)
    finally:
        await store.close()


class _FullDisk:
    """Stands in for a store whose disk is full: every transaction fails at commit."""

    def __init__(self, store: Store) -> None:
        self.real = store.batch
        self.full = True

    def batch(self, **kwargs: bool) -> Any:
        return _Refused() if self.full else self.real(**kwargs)


class _Refused:
    async def __aenter__(self) -> Any:
        return _Sink()

    async def __aexit__(self, *exc: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")


class _Sink:
    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


async def test_a_failed_write_stops_the_engine_until_memory_is_rebuilt_from_the_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, eng = await _engine(tmp_path / "n.sqlite")
    try:
        await _finalise(eng, 2)
        final = eng.final_count
        rec = _record(eng, 3)
        await eng.store_pending([rec], T0 + 1_000)  # acknowledged: stored as pending
        disk = _FullDisk(store)
        monkeypatch.setattr(store, "batch", disk.batch)
        with pytest.raises(sqlite3.OperationalError):
            await eng.propose([rec], T0 + 1_010)  # the step orders it, but its write fails
        assert eng.failed is not None and "disk is full" in eng.failed
        # Nothing is taken meanwhile, and the memory that ran ahead is not trusted.
        assert await eng.propose([rec], T0 + 1_020) == Effects()
        now = T0 + 1_030
        await eng.tick(now)  # tries to rebuild; the disk is still full, so the rebuild fails
        # Until a rebuild succeeds, the engine keeps what it had (who is a member, above all):
        # a half-rebuilt one would take its peers for strangers and cut them off.
        assert eng.failed is not None and eng.final_count == final + 1
        disk.full = False
        for _ in range(20):  # bounded: a retry, then the record is ordered again
            now += engine_mod.RECOVER_RETRY_MS if eng.failed else 50
            await eng.tick(now)
            if eng.failed is None and eng.ledger.next_seq(FOUNDER.member) == 4:
                break
        assert eng.failed is None and eng.final_count == final + 1
        await eng.settle()
        # The store holds the same order: a restart finds exactly this.
        again = Engine(store, eng.registry, FOUNDER, eng.genesis)
        await again.load()
        assert (again.commit_index, again.final_count) == (eng.commit_index, eng.final_count)
        assert again.ledger.state_hash() == eng.ledger.state_hash()
    finally:
        await store.close()


async def test_a_disk_that_stays_full_is_retried_with_back_off_not_in_a_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rebuild only reads, so on a disk that is still full it succeeds, and the next write
    fails again. That must back off like a failed rebuild (5 s, doubling), not rebuild at once
    for ever: a real daemon did 173 rebuilds in a 7.4 s full-disk fault, each a replay of its
    whole store and two log lines. Once a write succeeds, the next failure is retried at once."""
    store, eng = await _engine(tmp_path / "n.sqlite")
    try:
        await _finalise(eng, 2)
        final = eng.final_count
        rec = _record(eng, 3)
        disk = _FullDisk(store)
        monkeypatch.setattr(store, "batch", disk.batch)
        now, rebuilds, failures = T0 + 1_000, 0, 0
        for _ in range(600):  # one minute of the daemon's ticks, 100 ms apart, the record offered each time
            now += 100
            was_failed = eng.failed is not None
            await eng.tick(now)
            rebuilds += was_failed and eng.failed is None
            if eng.failed is None:
                with pytest.raises(sqlite3.OperationalError):
                    await eng.propose([rec], now)
                failures += 1
        # At once, then after 5, 10 and 20 s (35 s), then 40 s later (75 s): not in this minute.
        assert failures >= 2 and rebuilds <= 4, (failures, rebuilds)
        assert eng.final_count == final + 1  # memory ahead of the store is not trusted…
        disk.full = False
        for _ in range(900):  # …until space returns: bounded, within the longest wait (40 s) and then some
            now += 100
            await eng.tick(now)
            if eng.failed is None:
                await eng.propose([rec], now)
            if eng.failed is None and await store.record_status(rec.id) == "final":
                break
        assert eng.failed is None and await store.record_status(rec.id) == "final"
        disk.full = True  # a new failure after good writes is retried at once again
        with pytest.raises(sqlite3.OperationalError):
            await eng.propose([_record(eng, 4)], now + 10)
        disk.full = False
        await eng.tick(now + 20)
        assert eng.failed is None
    finally:
        await store.close()
