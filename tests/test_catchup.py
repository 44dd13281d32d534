"""A node taking a catch-up stream through its lane (blocks decoded on the loop, their
signatures checked in the verifier's helper process, applied in arrival order): the same
blocks from several peers are taken once; a batch with one badly signed block is refused
whole, changes nothing and costs its sender, and the copies of that batch's good blocks
that another peer sent meanwhile are taken; malformed bytes are refused before the lane."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from valuemesh.node import daemon as daemon_mod
from valuemesh.node.daemon import Node, installed_registry
from valuemesh.node.engine import Engine
from valuemesh.node.home import Home
from valuemesh.node.store import Store
from valuemesh.node.verifier import Verifier
from valuemesh.protocol.builtin.membership import make_genesis
from valuemesh.protocol.errors import DecodeError, SignatureError
from valuemesh.protocol.identity import Identity, MemberId
from valuemesh.protocol.records import Block, Record, SignatureCheck, decode_block_unverified

FOUNDER = Identity(bytes([5]) * 32)
# The late node follows the founder's constellation without being a core member, so it never
# makes blocks of its own while it catches up (a copy of the founder's node would, for rounds
# the founder had already signed).
FOLLOWER = Identity(bytes([6]) * 32)
T0 = 1_795_000_000_000
BLOCKS = 3 * daemon_mod.PIPELINE_MIN_BLOCKS
LANE_WAIT_S = 30.0


class FakeLink:
    """What the daemon uses of a peer link while it takes blocks."""

    def __init__(self, n: int) -> None:
        self.remote = MemberId(bytes([100 + n]) * 32)
        self.read_at = 0.0
        self.closed = False
        self.penalties: list[str] = []
        self.sent: list[bytes] = []

    def penalize(self, points: float, reason: str) -> None:
        self.penalties.append(reason)

    async def send(self, payload: bytes) -> None:
        self.sent.append(payload)


def _genesis() -> Record:
    registry = installed_registry()
    return make_genesis(FOUNDER, name="bakery", purpose="", nonce=bytes(16), created=T0,
                        plugins={n: str(p.version) for n, p in registry.plugins.items()})


async def _source_blocks(path: Path) -> tuple[list[Block], dict[str, Any]]:
    """BLOCKS blocks of a one-member constellation, made by an engine of the same member,
    and the summary that engine reached."""
    store = await Store.open(path)
    try:
        eng = Engine(store, installed_registry(), FOUNDER, _genesis())
        async with store.batch() as tx:
            tx.put_constellation(eng.info())
            tx.put_records([eng.genesis], T0)
        blocks: list[Block] = []
        body = {"op": "record", "action": "work", "quantity": "1", "unit": "hour"}
        for seq in range(1, BLOCKS + 1):
            rec = Record.create(FOUNDER, type="contribution", v=1, constellation=eng.cid, seq=seq, body=body,
                                created=T0 + seq)
            blocks += (await eng.submit([rec], T0 + 10 * seq)).blocks
        assert len(blocks) >= BLOCKS
        return blocks, {"final": eng.final_count, "state_hash": eng.ledger.state_hash()}
    finally:
        await store.close()


async def _node(path: Path) -> tuple[Node, Engine]:
    """A node that holds only the genesis (it missed every block)."""
    path.mkdir()
    home = Home(path)
    store = await Store.open(home.db_file)
    eng = Engine(store, installed_registry(), FOLLOWER, _genesis())
    async with store.batch() as tx:
        tx.put_constellation(eng.info())
        tx.put_records([eng.genesis], T0)
    await store.close()
    node = Node(home, FOLLOWER, listen="127.0.0.1:0", api="127.0.0.1:0", network="test-lane")
    await node.start()
    return node, node.engines[eng.cid]


async def _lane_idle(node: Node, eng: Engine) -> None:
    lane = node._lanes.get(eng.cid)
    deadline = asyncio.get_running_loop().time() + LANE_WAIT_S
    while lane is not None and lane.jobs:
        assert asyncio.get_running_loop().time() < deadline, "the lane never emptied"
        await asyncio.sleep(0.01)


def _forged(b: Block) -> bytes:
    """The block's bytes with one bit of its signature flipped: well formed, badly signed."""
    bad = bytearray(b.raw)
    bad[b.raw.index(b.sig) + 7] ^= 0x01
    return bytes(bad)


async def test_streams_from_several_peers_are_taken_once_in_order(tmp_path: Path) -> None:
    blocks, want = await _source_blocks(tmp_path / "source.sqlite")
    node, eng = await _node(tmp_path / "late")
    try:
        raws = [b.raw for b in blocks]
        links = [FakeLink(i) for i in range(3)]
        half = len(raws) // 2
        # Every peer streams the whole gap in two batches, interleaved as links deliver them.
        for part in (raws[:half], raws[half:]):
            for link in links:
                await node._receive_blocks(link, eng, list(part), 0)  # type: ignore[arg-type]
        await _lane_idle(node, eng)
        assert eng.final_count == want["final"] and eng.ledger.state_hash() == want["state_hash"]
        assert eng.catchup["blocks_done"] == len(blocks)  # each block decoded and taken once
        assert all(not link.penalties for link in links)
        assert node.store is not None and await node.store.block_count(eng.cid) == len(blocks)
    finally:
        await node.stop()


async def test_a_bad_batch_is_refused_whole_and_its_good_copies_from_others_are_taken(tmp_path: Path) -> None:
    blocks, want = await _source_blocks(tmp_path / "source.sqlite")
    node, eng = await _node(tmp_path / "late")
    try:
        assert node.store is not None
        raws = [b.raw for b in blocks]
        hostile, honest = FakeLink(0), FakeLink(1)
        bad = [*raws[:-1], _forged(blocks[-1])]
        await node._receive_blocks(hostile, eng, bad, 0)  # type: ignore[arg-type]
        await _lane_idle(node, eng)
        assert len(hostile.penalties) == 1 and "signature" in hostile.penalties[0].lower()
        assert eng.final_count == 1 and eng.catchup["blocks_done"] == 0
        assert await node.store.block_count(eng.cid) == 0

        # The same bad batch again, and the honest peer's good copies while it is in the lane:
        # they wait behind it, and once it is refused they are decoded, verified and taken.
        await node._receive_blocks(hostile, eng, bad, 0)  # type: ignore[arg-type]
        await node._receive_blocks(honest, eng, list(raws), 0)  # type: ignore[arg-type]
        await _lane_idle(node, eng)
        assert len(hostile.penalties) == 2 and not honest.penalties
        assert eng.final_count == want["final"] and eng.ledger.state_hash() == want["state_hash"]
        assert await node.store.block_count(eng.cid) == len(blocks)
    finally:
        await node.stop()


async def test_a_small_batch_on_an_idle_lane_is_taken_at_once(tmp_path: Path) -> None:
    blocks, _ = await _source_blocks(tmp_path / "source.sqlite")
    node, eng = await _node(tmp_path / "late")
    try:
        link = FakeLink(0)
        await node._receive_blocks(link, eng, [blocks[0].raw], 0)  # type: ignore[arg-type]
        assert eng.catchup["blocks_done"] == 1  # taken before the call returned: no thread hop
        assert not node._lanes[eng.cid].jobs
    finally:
        await node.stop()


async def test_a_malformed_batch_is_refused_before_it_enters_the_lane(tmp_path: Path) -> None:
    blocks, _ = await _source_blocks(tmp_path / "source.sqlite")
    node, eng = await _node(tmp_path / "late")
    try:
        link = FakeLink(0)
        junk = [b.raw for b in blocks[:BLOCKS - 1]] + [b"\xa1\x61c\x00"]
        with pytest.raises(DecodeError):
            await node._receive_blocks(link, eng, junk, 0)  # type: ignore[arg-type]
        assert not node._lanes[eng.cid].jobs and not node._lanes[eng.cid].inflight
        assert eng.catchup["blocks_done"] == 0 and eng.final_count == 1
    finally:
        await node.stop()


async def test_the_verifier_process_checks_stops_when_idle_and_survives_its_death() -> None:
    good = Block.create(FOUNDER, constellation=bytes(32), epoch=0, round=0, prev=None, parents=[], records=[],
                        created=T0)
    _, checks = decode_block_unverified(good.raw)
    _, forged = decode_block_unverified(good.raw)
    forged[0] = SignatureCheck(forged[0].author, forged[0].message, bytes(64))
    v = Verifier(idle_s=0.0)
    try:
        # Until the helper has started, checks run here.
        await v.check(checks)
        with pytest.raises(SignatureError):
            await v.check(forged)
        v.start()
        assert v.running
        deadline = asyncio.get_running_loop().time() + LANE_WAIT_S
        while not v.ready:
            assert asyncio.get_running_loop().time() < deadline, "the helper never answered"
            await asyncio.sleep(0.02)
        await v.check(checks)
        with pytest.raises(SignatureError):
            await v.check(forged)
        v.stop_if_idle()
        assert not v.running and not v.ready
        # A helper that dies (here: killed) costs nothing but time: the check runs here instead.
        v.start()
        while not v.ready:
            assert asyncio.get_running_loop().time() < deadline, "the helper never answered"
            await asyncio.sleep(0.02)
        assert v._pool is not None
        for pid in list(v._pool._processes):  # type: ignore[union-attr]
            os.kill(pid, signal.SIGKILL)
        await v.check(checks)
        with pytest.raises(SignatureError):
            await v.check(forged)
    finally:
        v.close()
