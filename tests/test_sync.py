"""A peer streaming a gap: the stored bytes of every block the other side lacks, in order,
in messages bounded by count and by bytes, with the count still to come on each."""

from __future__ import annotations

from pathlib import Path

import pytest

from valuemesh.node import gossip as gossip_mod
from valuemesh.node.daemon import Node, installed_registry
from valuemesh.node.engine import Engine
from valuemesh.node.home import Home
from valuemesh.node.store import Store
from valuemesh.protocol import messages as m
from valuemesh.protocol.builtin.membership import make_genesis
from valuemesh.protocol.identity import Identity, MemberId
from valuemesh.protocol.records import Block, Record

FOUNDER = Identity(bytes([5]) * 32)
# The streaming node follows the founder's constellation without being a core member, so it
# holds exactly the founder's blocks and makes none of its own.
FOLLOWER = Identity(bytes([6]) * 32)
T0 = 1_795_000_000_000
BLOCKS = 24


class FakeLink:
    """What the daemon uses of a peer link while it streams."""

    def __init__(self) -> None:
        self.remote = MemberId(bytes([100]) * 32)
        self.closed = False
        self.sent: list[bytes] = []

    async def send(self, payload: bytes) -> None:
        self.sent.append(payload)


def _genesis() -> Record:
    registry = installed_registry()
    return make_genesis(FOUNDER, name="bakery", purpose="", nonce=bytes(16), created=T0,
                        plugins={n: str(p.version) for n, p in registry.plugins.items()})


async def _founder_blocks(path: Path) -> list[Block]:
    store = await Store.open(path)
    try:
        eng = Engine(store, installed_registry(), FOUNDER, _genesis())
        async with store.batch() as tx:
            tx.put_constellation(eng.info())
            tx.put_records([eng.genesis], T0)
        blocks: list[Block] = []
        body = {"op": "record", "action": "work", "quantity": "1", "unit": "hour", "note": "x" * 300}
        for seq in range(1, BLOCKS + 1):
            rec = Record.create(FOUNDER, type="contribution", v=1, constellation=eng.cid, seq=seq, body=body,
                                created=T0 + seq)
            blocks += (await eng.submit([rec], T0 + 10 * seq)).blocks
        return blocks
    finally:
        await store.close()


async def _follower(path: Path, blocks: list[Block]) -> tuple[Node, Engine]:
    path.mkdir()
    home = Home(path)
    store = await Store.open(home.db_file)
    eng = Engine(store, installed_registry(), FOLLOWER, _genesis())
    async with store.batch() as tx:
        tx.put_constellation(eng.info())
        tx.put_records([eng.genesis], T0)
    await store.close()
    node = Node(home, FOLLOWER, listen="127.0.0.1:0", api="127.0.0.1:0", network="test-sync")
    await node.start()
    eng = node.engines[eng.cid]
    _, errors = await eng.add_blocks(blocks, T0 + 100_000)
    assert errors == []
    return node, eng


@pytest.mark.parametrize("budget", [10**9, 3000])
async def test_a_gap_streams_as_stored_bytes_in_bounded_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 budget: int) -> None:
    blocks = await _founder_blocks(tmp_path / "founder.sqlite")
    node, eng = await _follower(tmp_path / "follower", blocks)
    try:
        monkeypatch.setattr(gossip_mod, "SYNC_BATCH", 10)
        monkeypatch.setattr(gossip_mod, "SYNC_BATCH_BYTES", budget)
        link = FakeLink()
        # The peer has nothing: it gets every block.
        await node.gossip.stream_gap(link, eng, 0, 0, {})  # type: ignore[arg-type]
        msgs = [m.decode_message(p) for p in link.sent]
        assert all(isinstance(x, m.Blocks) and x.c == eng.cid for x in msgs)
        got = [raw for x in msgs for raw in x.blocks]  # type: ignore[union-attr]
        want = sorted(blocks, key=lambda b: (b.round, b.author.key, b.id))
        assert got == [b.raw for b in want]  # the stored bytes, oldest rounds first, each once
        for x in msgs:
            assert len(x.blocks) <= 10  # type: ignore[union-attr]
            size = sum(len(r) for r in x.blocks)  # type: ignore[union-attr]
            assert size <= budget or len(x.blocks) == 1  # type: ignore[union-attr]
        if budget < 10**9:
            assert len(msgs) > -(-len(want) // 10)  # the byte budget split what the count would not
        lefts = [x.left for x in msgs]  # type: ignore[union-attr]
        assert lefts == sorted(lefts, reverse=True) and lefts[-1] == 0
    finally:
        await node.stop()


@pytest.mark.parametrize("budget", [10**9, 3000])
async def test_blocks_asked_by_id_come_as_stored_bytes_in_bounded_messages(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    blocks = await _founder_blocks(tmp_path / "founder.sqlite")
    node, eng = await _follower(tmp_path / "follower", blocks)
    try:
        monkeypatch.setattr(gossip_mod, "SYNC_BATCH", 10)
        monkeypatch.setattr(gossip_mod, "SYNC_BATCH_BYTES", budget)
        monkeypatch.setattr(eng, "may_receive", lambda key: True)
        link = FakeLink()
        asked = [b.id for b in reversed(blocks)] + [bytes(32)]  # an unknown id is left out
        await node.handlers.dispatch(link, m.GetBlocks(eng.cid, asked))  # type: ignore[arg-type]
        msgs = [m.decode_message(p) for p in link.sent]
        assert all(isinstance(x, m.Blocks) and x.c == eng.cid and x.left == 0 for x in msgs)
        got = [raw for x in msgs for raw in x.blocks]  # type: ignore[union-attr]
        assert got == [b.raw for b in reversed(blocks)]  # the stored bytes, in the order asked
        for x in msgs:
            assert len(x.blocks) <= 10  # type: ignore[union-attr]
            assert sum(len(r) for r in x.blocks) <= budget or len(x.blocks) == 1  # type: ignore[union-attr]
        if budget < 10**9:
            assert len(msgs) > -(-len(blocks) // 10)
    finally:
        await node.stop()
