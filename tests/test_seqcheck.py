"""After a doubt about its database, a member asks its peers how far it signed before signing
again (node/seqcheck.py): a home restored from an older copy, with no record of its floors,
neither reuses a seq (an equivocation its peers would prove) nor leaves a gap. Real daemons on
loopback, through the CLI; plus the two messages' bounds.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from nodefakes import FakeLink, Sent

from valuemesh.node.home import HELD_FILE
from valuemesh.node.seqcheck import SeqCheck
from valuemesh.node.store import Store
from valuemesh.node.testing import cluster, wait_until
from valuemesh.protocol import messages as m
from valuemesh.protocol.consensus import Committee
from valuemesh.protocol.errors import DecodeError
from valuemesh.protocol.identity import Identity, MemberId
from valuemesh.protocol.records import Record

DEADLINE_S = 60.0


def _final(d, cid: str) -> list[dict]:  # type: ignore[no-untyped-def]
    return list(d.cli_json("ledger", cid)["final"])


def _db_files(home: Path) -> list[Path]:
    return [home / "node.db", home / "node.db-wal", home / "node.db-shm"]


def test_a_home_restored_without_its_floors_asks_peers_before_signing(tmp_path: Path) -> None:
    with cluster(tmp_path, 3) as c:
        cid = c.found("bakery")
        wait_until(lambda: all(len(_final(d, cid)) >= 3 for d in c.daemons), DEADLINE_S, "the joins to be final")
        me = c.daemons[0]
        # An operator's backup, taken on a clean stop.
        me.stop()
        backup = tmp_path / "backup"
        backup.mkdir()
        for p in _db_files(me.home):
            if p.exists():
                shutil.copy(p, backup / p.name)
        me.start()
        seqs = [me.cli_json("contribute", cid, "--action", "work", "--quantity", str(i + 1), "--unit", "hour")["seq"]
                for i in range(3)]
        wait_until(lambda: all(len(_final(d, cid)) >= 6 for d in c.daemons), DEADLINE_S, "the three to be final")
        # The disk dies; the whole home comes back from the old copy, held.json lost with it.
        me.kill()
        for p in _db_files(me.home):
            p.unlink(missing_ok=True)
            if (backup / p.name).exists():
                shutil.copy(backup / p.name, p)
        (me.home / HELD_FILE).unlink()
        # It comes back while its peers are away: nothing tells it how far it signed.
        for d in c.daemons[1:]:
            d.stop()
        me.start()
        early = me.cli("contribute", cid, "--action", "work", "--quantity", "9", "--unit", "hour", check=False)
        assert early.returncode == 1
        assert "confirming with its peers how far it signed" in early.stderr
        for d in c.daemons[1:]:
            d.start()
        got: list[int] = []

        def signed() -> bool:
            res = me.cli("--json", "contribute", cid, "--action", "work", "--quantity", "9", "--unit", "hour",
                         check=False)
            if res.returncode == 0:
                got.append(int(json.loads(res.stdout)["seq"]))
                return True
            assert "confirming with its peers" in res.stderr, res.stderr
            return False

        wait_until(signed, DEADLINE_S, "the peers to confirm the member's last seq")
        seq = got[0]
        assert seq == seqs[-1] + 1, "neither a reused seq nor a gap"
        wait_until(lambda: all(len(_final(d, cid)) >= 7 for d in c.daemons), DEADLINE_S, "the new record to be final")
        assert len({d.cli_json("ledger", cid)["state_hash"] for d in c.daemons}) == 1


def test_seq_messages_are_bounded() -> None:
    ok = m.YourSeq(b"\x01" * 32, b"")
    assert m.decode_message(m.encode_message(ok)) == ok
    assert m.decode_message(m.encode_message(m.MySeq(b"\x02" * 32))) == m.MySeq(b"\x02" * 32)
    with pytest.raises(DecodeError, match="out of bounds"):
        m.decode_message(m.encode_message(m.MySeq(b"\x02" * 31)))
    with pytest.raises(DecodeError, match="out of bounds"):
        m.decode_message(m.encode_message(m.YourSeq(b"\x01" * 32, b"x" * (64 * 1024 + 1))))


class _Ledger:
    def next_seq(self, member: object) -> int:
        return 0


class _Engine:
    """What SeqCheck reads of an engine: who may receive, the committee, the ledger."""

    def __init__(self, cid: bytes, members: list[MemberId]) -> None:
        self.cid = cid
        self.text_id = "vc1test"
        self.members = members
        self.ledger = _Ledger()

    def may_receive(self, member: MemberId) -> bool:
        return member in self.members

    def current_committee(self) -> Committee:
        return Committee.of(self.members)


async def test_a_peer_cannot_answer_with_a_record_that_is_not_the_askers(tmp_path: Path) -> None:
    me, peer, other = Identity.generate(os.urandom), Identity.generate(os.urandom), Identity.generate(os.urandom)
    cid = bytes([7]) * 32
    eng = _Engine(cid, [me.member, peer.member, other.member])
    async with await Store.open(tmp_path / "db") as store:
        sent = Sent()
        check = SeqCheck(me, store, {cid: eng}, {peer.member: FakeLink(peer.member)},  # type: ignore[dict-item]
                         send=sent, doubt={cid})
        assert check.waiting(cid) is not None
        await check.tick()
        assert [type(msg) for _, msg in sent.log] == [m.MySeq]
        link = FakeLink(peer.member)
        # Someone else's record (the peer's own), offered as ours: refused, the peer penalised.
        theirs = Record.create(peer, type="contribution", v=1, constellation=cid, seq=5, body={}, created=1)
        await check.on_answer(link, m.YourSeq(cid, theirs.encode()))  # type: ignore[arg-type]
        assert link.penalties and "not the asker's own" in link.penalties[0][1]
        assert check.waiting(cid) is not None  # a refused answer counts for nothing
        # Garbage is refused the same way.
        await check.on_answer(link, m.YourSeq(cid, b"\x00garbage"))  # type: ignore[arg-type]
        assert len(link.penalties) == 2
        # An honest "none of yours" counts: with n = 3 (f = 0) both others must answer.
        await check.on_answer(link, m.YourSeq(cid, b""))  # type: ignore[arg-type]
        assert check.waiting(cid) is not None
        # An answer nobody asked for is ignored, not counted.
        await check.on_answer(FakeLink(other.member), m.YourSeq(cid, b""))  # type: ignore[arg-type]
        assert check.waiting(cid) is not None


async def test_a_stranger_learns_nothing_and_a_member_is_answered_once_a_second(tmp_path: Path) -> None:
    me, member, stranger = Identity.generate(os.urandom), Identity.generate(os.urandom), Identity.generate(os.urandom)
    cid = bytes([8]) * 32
    eng = _Engine(cid, [me.member, member.member])
    async with await Store.open(tmp_path / "db") as store:
        sent = Sent()
        check = SeqCheck(me, store, {cid: eng}, {}, send=sent, doubt=set())  # type: ignore[dict-item]
        await check.on_ask(FakeLink(stranger.member), m.MySeq(cid))  # type: ignore[arg-type]
        assert sent.log == []
        link = FakeLink(member.member)
        await check.on_ask(link, m.MySeq(cid))  # type: ignore[arg-type]
        assert [msg for _, msg in sent.log] == [m.YourSeq(cid, b"")]
        await check.on_ask(link, m.MySeq(cid))  # type: ignore[arg-type]
        assert len(sent.log) == 1 and link.penalties
