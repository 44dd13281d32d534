"""A hostile peer against a real daemon: garbage, data for constellations it is
not in, forged blocks. Each is refused, the peer is cut off, and the daemon
keeps serving its honest peer with no change to the ledger."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from pathlib import Path

import pytest

from valuemesh.node.testing import Cluster, QuietHandler, wait_until
from valuemesh.node.transport import Transport
from valuemesh.protocol import messages as m
from valuemesh.protocol.errors import ValuemeshError
from valuemesh.protocol.identity import Identity
from valuemesh.protocol.records import Block, Record, parse_constellation

pytestmark = pytest.mark.slow


def _agreed(c: Cluster, cid: str, n: int) -> bool:
    ls = [d.cli_json("ledger", cid) for d in c.daemons]
    return all(len(x["final"]) >= n and not x["pending"] for x in ls) and len({x["state_hash"] for x in ls}) == 1


async def test_hostile_peer_is_refused_and_cut_off(tmp_path: Path) -> None:
    c = Cluster(tmp_path, 2)
    try:
        await asyncio.to_thread(c.start)
        cid = await asyncio.to_thread(c.found, "target")
        await asyncio.to_thread(wait_until, lambda: _agreed(c, cid, 2), 40, "the join")
        before = await asyncio.to_thread(c.daemons[0].cli_json, "ledger", cid)
        raw_cid = parse_constellation(cid)

        evil = Identity.generate(os.urandom)
        handler = QuietHandler()
        t = Transport(evil, c.network.encode(), handler)
        await t.start("127.0.0.1", 0)
        try:
            link = await t.connect("127.0.0.1", c.daemons[0].port)
            now = int(time.time() * 1000)
            rec = Record.create(evil, type="contribution", v=1, constellation=raw_cid, seq=0,
                                body={"op": "record", "action": "work", "quantity": "9", "unit": "h"},
                                created=now)
            forged = Block.create(evil, constellation=raw_cid, epoch=0, round=1, prev=None,
                                  parents=[secrets.token_bytes(32)], records=[rec], created=now)
            bad_sig = bytearray(forged.raw)
            bad_sig[-5] ^= 0xFF
            attacks = [
                b"\xff\x00garbage",
                m.encode_message(m.Blocks(raw_cid, [forged.raw], 0)),
                m.encode_message(m.Blocks(raw_cid, [bytes(bad_sig)], 0)),
                m.encode_message(m.Blocks(secrets.token_bytes(32), [forged.raw], 0)),
                m.encode_message(m.SubmitRecords(raw_cid, [rec.raw])),
                m.encode_message(m.Heads(raw_cid, 0, 0, [])),
                m.encode_message(m.GetBlocks(raw_cid, [secrets.token_bytes(32)])),
                # Checkpoint start: a stranger may not ask, and answers nobody asked for are refused.
                m.encode_message(m.GetCheckpoint(raw_cid)),
                m.encode_message(m.GetSnapshot(raw_cid, 0, 0)),
                m.encode_message(m.CheckpointChain(raw_cid, [[b"cert", b"committee"]], 10, 1)),
                m.encode_message(m.SnapshotPart(raw_cid, 0, 0, b"x", 1)),
            ]
            for payload in attacks:
                try:
                    await link.send(payload)
                except ValuemeshError:
                    break
            await asyncio.wait_for(handler.closed.wait(), 20)
        finally:
            await t.stop()

        # The honest pair keeps finalising, and nothing of the attacker's got in.
        d0, d1 = c.daemons
        await asyncio.to_thread(d1.cli, "contribute", cid, "--action", "work", "--quantity", "1", "--unit", "h")
        await asyncio.to_thread(wait_until, lambda: _agreed(c, cid, len(before["final"]) + 1), 40, "finality")
        after = await asyncio.to_thread(d0.cli_json, "ledger", cid)
        assert after["final"][: len(before["final"])] == before["final"]
        assert all(r["author"] != str(evil.member) for r in after["final"] + after["pending"])
        log = (d0.home / "daemon.log").read_text()
        assert "does not share" in log or "not share" in log
    finally:
        await asyncio.to_thread(c.stop)
