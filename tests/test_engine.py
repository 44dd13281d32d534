"""The engine's own bookkeeping around consensus: blocks it already took are known by
their bytes, so a second peer streaming the same gap costs no second decode and verify."""

from __future__ import annotations

from pathlib import Path

from valuemesh.node import engine as engine_mod
from valuemesh.node.daemon import installed_registry
from valuemesh.node.engine import Engine
from valuemesh.node.store import Store
from valuemesh.protocol.builtin.membership import make_genesis
from valuemesh.protocol.identity import Identity
from valuemesh.protocol.records import Record

FOUNDER = Identity(bytes([3]) * 32)
T0 = 1_795_000_000_000


async def _engine(path: Path) -> tuple[Store, Engine]:
    registry = installed_registry()
    genesis = make_genesis(FOUNDER, name="bakery", purpose="", nonce=bytes(16), created=T0,
                           plugins={n: str(p.version) for n, p in registry.plugins.items()})
    store = await Store.open(path)
    eng = Engine(store, registry, FOUNDER, genesis)
    async with store.batch() as tx:
        tx.put_constellation(eng.info())
        tx.put_records([genesis], T0)
    return store, eng


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
