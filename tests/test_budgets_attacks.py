"""Issue #16 findings 2, 3 and 9, each the attack itself on loopback against a real node
(an in-process `Node` with its real transport, store and handlers): a member's proofs about
strangers, its far-future or endless records, a stranger's join requests and join batches,
and a member asking for the whole history again and again. Each is refused, penalised or
held to its budget (node/budgets.py), and the node's state is unchanged beyond the budget."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

from nodefakes import FOUNDER, T0, genesis

from valuemesh.node.budgets import Budgets
from valuemesh.node.daemon import Node, installed_registry
from valuemesh.node.engine import Engine
from valuemesh.node.home import Home
from valuemesh.node.link import PeerLink
from valuemesh.node.store import Store
from valuemesh.node.transport import Transport
from valuemesh.protocol import messages as m
from valuemesh.protocol.errors import ValuemeshError
from valuemesh.protocol.identity import Identity, MemberId
from valuemesh.protocol.invite import Invite
from valuemesh.protocol.records import Block, EquivocationProof, Record

# The node under attack follows FOUNDER's constellation without being a member of it, so it
# stores what members send and proposes nothing. The attacker holds FOUNDER's key: a member.
NODE = Identity(bytes([6]) * 32)
NETWORK = "test-budgets"
DEADLINE_S = 30.0
BODY = {"op": "record", "action": "work", "quantity": "1", "unit": "hour", "note": "x" * 200}


class Peer:
    """A raw peer on loopback that keeps every message it is sent."""

    def __init__(self) -> None:
        self.got: list[m.Message] = []
        self.closed = asyncio.Event()
        self.changed = asyncio.Event()

    def authorize(self, remote: MemberId, inbound: bool) -> bool:
        return True

    async def on_connect(self, link: PeerLink) -> None:
        pass

    async def on_message(self, link: PeerLink, payload: bytes) -> None:
        self.got.append(m.decode_message(payload))
        self.changed.set()

    async def on_disconnect(self, link: PeerLink, reason: str) -> None:
        self.closed.set()
        self.changed.set()

    def of(self, kind: type[m.Message]) -> list[m.Message]:
        return [x for x in self.got if isinstance(x, kind)]

    async def until(self, cond: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not cond():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), min(left, 0.2))
            except TimeoutError:
                pass


async def _node(path: Path, budgets: Budgets | None = None, blocks: list[Block] | None = None) -> tuple[Node, Engine]:
    path.mkdir()
    home = Home(path)
    store = await Store.open(home.db_file)
    eng = Engine(store, installed_registry(), NODE, genesis())
    async with store.batch() as tx:
        tx.put_constellation(eng.info())
        tx.put_records([eng.genesis], T0)
    await store.close()
    node = Node(home, NODE, listen="127.0.0.1:0", api="127.0.0.1:0", network=NETWORK)
    if budgets is not None:
        node.budgets = budgets
    await node.start()
    eng = node.engines[eng.cid]
    if blocks:
        _, errors = await eng.add_blocks(blocks, T0 + 100_000)
        assert errors == []
    return node, eng


async def _connect(node: Node, who: Identity) -> tuple[Transport, PeerLink, Peer]:
    peer = Peer()
    t = Transport(who, NETWORK.encode(), peer)
    await t.start("127.0.0.1", 0)
    link = await t.connect("127.0.0.1", node.listen_port)
    return t, link, peer


async def _send_all(link: PeerLink, msgs: list[m.Message]) -> None:
    for msg in msgs:
        try:
            await link.send(m.encode_message(msg))
        except ValuemeshError:
            return  # cut off: the rest is not sent


def _record(cid: bytes, seq: int, who: Identity = FOUNDER, note: str = "x") -> Record:
    return Record.create(who, type="contribution", v=1, constellation=cid, seq=seq,
                         body={**BODY, "note": note * 200}, created=T0 + 1)


def _pending_of(eng: Engine, who: Identity) -> int:
    return sum(1 for r in eng.pending.values() if r.author == who.member)


# -- finding 2: proofs -----------------------------------------------------------------------
async def test_proofs_naming_strangers_are_refused_and_cut_the_sender_off(tmp_path: Path) -> None:
    node, eng = await _node(tmp_path / "node")
    try:
        t, link, peer = await _connect(node, FOUNDER)
        try:
            proofs = []
            for _ in range(12):
                stranger = Identity.generate(os.urandom)
                a, b = _record(eng.cid, 0, stranger, "a"), _record(eng.cid, 0, stranger, "b")
                proofs.append(m.Proof(eng.cid, EquivocationProof("record", a.raw, b.raw).encode()))
            await _send_all(link, proofs)
            await asyncio.wait_for(peer.closed.wait(), DEADLINE_S)
        finally:
            await t.stop()
        assert await node.store.equivocations(eng.cid) == []
        assert any("not a member" in x.reason for x in peer.of(m.Refuse))  # type: ignore[attr-defined]
    finally:
        await node.stop()


async def test_a_members_proofs_are_of_this_constellation_and_bounded_per_author(tmp_path: Path) -> None:
    node, eng = await _node(tmp_path / "node", Budgets(proofs_per_author=3))
    try:
        t, link, peer = await _connect(node, FOUNDER)
        try:
            # Its own equivocations, each a different slot: real proofs, kept up to the bound.
            own = [m.Proof(eng.cid, EquivocationProof("record", _record(eng.cid, s, note="a").raw,
                                                      _record(eng.cid, s, note="b").raw).encode())
                   for s in range(1, 9)]
            await _send_all(link, own)
            await peer.until(lambda: len(peer.of(m.Refuse)) >= 5, "the refusals past the bound")
            # A proof about another constellation, sent as one of this one: refused.
            other = bytes(32)
            alien = EquivocationProof("record", _record(other, 1, note="a").raw, _record(other, 1, note="b").raw)
            await _send_all(link, [m.Proof(eng.cid, alien.encode())])
            await peer.until(lambda: len(peer.of(m.Refuse)) >= 6, "the refusal of another constellation's proof")
        finally:
            await t.stop()
        assert len(await node.store.equivocations(eng.cid)) == 3
        assert "another constellation" in peer.of(m.Refuse)[-1].reason  # type: ignore[attr-defined]
    finally:
        await node.stop()


# -- finding 2: records ----------------------------------------------------------------------
async def test_far_future_records_are_refused_and_cut_the_sender_off(tmp_path: Path) -> None:
    node, eng = await _node(tmp_path / "node")
    try:
        t, link, peer = await _connect(node, FOUNDER)
        try:
            batches = [m.SubmitRecords(eng.cid, [_record(eng.cid, 1_000_000 + 64 * i + j).raw for j in range(64)])
                       for i in range(20)]
            await _send_all(link, batches)
            await asyncio.wait_for(peer.closed.wait(), DEADLINE_S)
        finally:
            await t.stop()
        assert _pending_of(eng, FOUNDER) == 0
        assert await node.store.pending(eng.cid) == []
        assert "ahead" in peer.of(m.Refuse)[0].reason  # type: ignore[attr-defined]
    finally:
        await node.stop()


async def test_one_member_gets_only_its_share_of_the_pending_pool(tmp_path: Path) -> None:
    node, eng = await _node(tmp_path / "node", Budgets(pending_share_records=100))
    try:
        t, link, peer = await _connect(node, FOUNDER)
        try:
            batches = [m.SubmitRecords(eng.cid, [_record(eng.cid, 1 + 64 * i + j).raw for j in range(64)])
                       for i in range(6)]
            await _send_all(link, batches)
            await peer.until(lambda: len(peer.of(m.Refuse)) >= 5, "a refusal per batch past the share")
        finally:
            await t.stop()
        assert _pending_of(eng, FOUNDER) == 100
        assert "share" in peer.of(m.Refuse)[0].reason  # type: ignore[attr-defined]
    finally:
        await node.stop()


async def test_one_member_stores_only_its_budget_of_bytes(tmp_path: Path) -> None:
    burst = sum(len(_record(bytes(32), seq).raw) for seq in range(1, 51))  # the first 50 records
    node, eng = await _node(tmp_path / "node", Budgets(stored_burst_bytes=burst, stored_bytes_per_s=1.0))
    try:
        t, link, peer = await _connect(node, FOUNDER)
        try:
            batches = [m.SubmitRecords(eng.cid, [_record(eng.cid, 1 + 64 * i + j).raw for j in range(64)])
                       for i in range(3)]
            await _send_all(link, batches)
            await peer.until(lambda: len(peer.of(m.Refuse)) >= 3, "a refusal per batch past the budget")
        finally:
            await t.stop()
        assert _pending_of(eng, FOUNDER) == 50
        assert "budget of bytes" in peer.of(m.Refuse)[0].reason  # type: ignore[attr-defined]
    finally:
        await node.stop()


async def test_an_honest_burst_of_64_records_per_request_is_all_taken(tmp_path: Path) -> None:
    node, eng = await _node(tmp_path / "node")  # the default budgets
    try:
        t, link, peer = await _connect(node, FOUNDER)
        try:
            n = 30 * 64
            batches = [m.SubmitRecords(eng.cid, [_record(eng.cid, 1 + 64 * i + j).raw for j in range(64)])
                       for i in range(n // 64)]
            await _send_all(link, batches)
            await peer.until(lambda: _pending_of(eng, FOUNDER) == n, "every record pending")
            assert peer.of(m.Refuse) == [] and not peer.closed.is_set()
        finally:
            await t.stop()
    finally:
        await node.stop()


# -- finding 3: joins ------------------------------------------------------------------------
def _invite(cid: bytes, *, expires: int, uses: int = 10) -> Invite:
    return Invite.create(FOUNDER, constellation=cid, name="bakery", tier="core", roles=(), uses=uses,
                         expires=expires, addrs=(("127.0.0.1", 1),), nonce=os.urandom(16))


def _join(cid: bytes, who: Identity, inv: Invite) -> Record:
    return Record.create(who, type="membership", v=1, constellation=cid, seq=0,
                         body={"op": "join", "token": inv.raw()}, created=T0 + 1)


async def test_a_strangers_join_requests_with_a_dead_invite_cut_it_off(tmp_path: Path) -> None:
    node, eng = await _node(tmp_path / "node")
    try:
        stranger = Identity.generate(os.urandom)
        inv = _invite(eng.cid, expires=1)  # long expired
        t, link, peer = await _connect(node, stranger)
        try:
            req = m.JoinRequest(inv.raw(), _join(eng.cid, stranger, inv).raw)
            await _send_all(link, [req] * 20)
            await asyncio.wait_for(peer.closed.wait(), DEADLINE_S)
        finally:
            await t.stop()
        assert len(peer.of(m.Refuse)) < 20 and not peer.of(m.JoinReply)
        assert eng.applicants == set()
    finally:
        await node.stop()


async def test_a_strangers_batches_of_join_records_cut_it_off(tmp_path: Path) -> None:
    node, eng = await _node(tmp_path / "node")
    try:
        stranger = Identity.generate(os.urandom)
        t, link, peer = await _connect(node, stranger)
        try:
            inv = _invite(eng.cid, expires=T0 * 2)
            batch = [_join(eng.cid, stranger, inv).raw] * 256
            await _send_all(link, [m.SubmitRecords(eng.cid, batch)] * 20)
            await asyncio.wait_for(peer.closed.wait(), DEADLINE_S)
        finally:
            await t.stop()
        assert len(peer.of(m.Refuse)) < 20
        assert eng.applicants == set() and await node.store.pending(eng.cid) == []
    finally:
        await node.stop()


async def test_join_attempts_under_way_are_bounded_per_invite(tmp_path: Path) -> None:
    node, eng = await _node(tmp_path / "node", Budgets(join_attempts_per_invite=2))
    try:
        inv = _invite(eng.cid, expires=T0 * 2)
        answers = []
        for _ in range(4):
            who = Identity.generate(os.urandom)
            t, link, peer = await _connect(node, who)
            try:
                await _send_all(link, [m.JoinRequest(inv.raw(), _join(eng.cid, who, inv).raw)])
                await peer.until(lambda: bool(peer.of(m.JoinReply) or peer.of(m.Refuse)), "an answer")  # noqa: B023
                answers.append(type((peer.of(m.JoinReply) or peer.of(m.Refuse))[0]))
            finally:
                await t.stop()
        assert answers == [m.JoinReply, m.JoinReply, m.Refuse, m.Refuse]
        assert len(eng.applicants) == 2
    finally:
        await node.stop()


# -- finding 9: history served -----------------------------------------------------------------
async def _founder_blocks(path: Path, n: int) -> list[Block]:
    store = await Store.open(path)
    try:
        eng = Engine(store, installed_registry(), FOUNDER, genesis())
        async with store.batch() as tx:
            tx.put_constellation(eng.info())
            tx.put_records([eng.genesis], T0)
        blocks: list[Block] = []
        for seq in range(1, n + 1):
            rec = _record(eng.cid, seq)
            blocks += (await eng.submit([rec], T0 + 10 * seq)).blocks
        return blocks
    finally:
        await store.close()


async def test_asking_for_the_whole_history_again_and_again_is_held_to_a_budget(tmp_path: Path) -> None:
    blocks = await _founder_blocks(tmp_path / "founder.sqlite", 24)
    history = sum(len(b.raw) for b in blocks)
    rate = 1024.0
    node, eng = await _node(tmp_path / "node", Budgets(history_burst_bytes=history + 1, history_bytes_per_s=rate),
                            blocks)
    try:
        t, link, peer = await _connect(node, FOUNDER)
        try:
            start = time.monotonic()
            # An honest first ask: the whole history, within the budget.
            await _send_all(link, [m.Heads(eng.cid, 0, 0, [])])
            await peer.until(lambda: sum(len(x.blocks) for x in peer.of(m.Blocks)) >= len(blocks),  # type: ignore[attr-defined]
                             "the whole history once")
            # Then 66-byte requests for all of it, over and over.
            ids = [b.id for b in blocks]
            await _send_all(link, [m.Heads(eng.cid, 0, 0, []), m.GetBlocks(eng.cid, ids)] * 10)
            await peer.until(lambda: len(peer.of(m.Refuse)) >= 10, "the refused asks")
            await asyncio.sleep(1.0)  # whatever a stream still had in flight
            elapsed = time.monotonic() - start
            assert not peer.closed.is_set()  # asking is no offence; it only waits its turn
        finally:
            await t.stop()
        served = sum(len(raw) for x in peer.of(m.Blocks) for raw in x.blocks)  # type: ignore[attr-defined]
        biggest = max(len(b.raw) for b in blocks)
        assert served <= history + 1 + rate * elapsed + biggest
    finally:
        await node.stop()
