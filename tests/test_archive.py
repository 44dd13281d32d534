"""The signed archive (node/archive.py): exported from a real engine's store, verified
offline by replay, refused at the first tampered byte, written as JSONL and CSV, and loaded
into a fresh store that replays to the same state. The four-daemon accounting scenario
(test_accounting_cli.py) runs `tampering_is_refused` and `a_member_cannot_import` on its export.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest
from test_engine import FOUNDER, NEWCOMER, _engine, _grow_to_two_cores

from valuemesh.node import views
from valuemesh.node.archive import (
    archive_csv,
    archive_jsonl,
    build_archive,
    load_archive,
    read_archive,
    verify_archive,
)
from valuemesh.node.daemon import installed_registry
from valuemesh.node.engine import Engine
from valuemesh.node.home import Home
from valuemesh.node.store import Store
from valuemesh.node.testing import Daemon
from valuemesh.protocol.errors import LocalError, SignatureError, ValuemeshError
from valuemesh.protocol.identity import Identity
from valuemesh.protocol.records import decode_block

AUDITOR = Identity(bytes([5]) * 32)  # no member: may load the archive


async def test_an_engine_s_archive_verifies_round_trips_and_loads_to_the_same_state(tmp_path: Path) -> None:
    store, eng = await _engine(tmp_path / "founder.sqlite")
    try:
        await _grow_to_two_cores(eng)  # an invite and a join final, epoch 0 closed and certified
        items = await build_archive(store, eng, eng.registry)
    finally:
        await store.close()
    registry = installed_registry()
    kinds = [it["kind"] for it in items]
    assert kinds[0] == "archive" and kinds[-1] == "end" and kinds.count("checkpoint") == 1
    checked = verify_archive(items, registry)
    assert checked.checkpoints == [0] and checked.cid == eng.cid and checked.name == "bakery"
    assert checked.replay.ledger.state_hash() == eng.ledger.state_hash()
    assert [r["id"] for r in checked.replay.records] == [e["id"] for e in views.final(eng)]
    summary = checked.summary()
    assert summary["records"] == eng.final_count and summary["commits"] == eng.commit_index
    # The same items back from both file formats.
    (tmp_path / "a.jsonl").write_text("".join(archive_jsonl(items)))
    (tmp_path / "a.csv").write_text(archive_csv(items))
    for name in ("a.jsonl", "a.csv"):
        again = verify_archive(read_archive(tmp_path / name), registry)
        assert again.replay.ledger.state_hash() == eng.ledger.state_hash() and again.checkpoints == [0]
    # One byte of a signed block changed: refused at its signature.
    at = next(i for i, it in enumerate(items) if it["kind"] == "block" and _records_in(it))
    raw = bytearray(base64.b64decode(items[at]["raw"]))
    raw[raw.index(b"producer")] ^= 1  # a role inside the signed invite
    with pytest.raises(SignatureError, match="signature"):
        verify_archive([*items[:at], {**items[at], "raw": base64.b64encode(bytes(raw)).decode()},
                        *items[at + 1:]], registry)

    fresh = await Store.open(tmp_path / "auditor.sqlite")
    try:
        for member in (FOUNDER, NEWCOMER):  # could sign a round twice: refused, nothing written
            with pytest.raises(LocalError, match="belongs to that constellation"):
                await load_archive(fresh, checked, member)
        assert await fresh.constellations() == []
        await load_archive(fresh, checked, AUDITOR)
        with pytest.raises(LocalError, match="already follows"):
            await load_archive(fresh, checked, AUDITOR)
        loaded = Engine(fresh, registry, AUDITOR, eng.genesis)
        await loaded.load()  # what the daemon does when it starts on the imported home
        assert loaded.ledger.state_hash() == eng.ledger.state_hash() and loaded.committee == eng.committee
        # It recomputes what epoch 0 closed with (the certificate itself comes from peers).
        assert views.final(loaded) == views.final(eng) and loaded.closed[0] == eng.certified[0].content
    finally:
        await fresh.close()


def _records_in(block_item: dict[str, Any]) -> int:
    return len(decode_block(base64.b64decode(block_item["raw"])).records)


def tampering_is_refused(jsonl: Path, vf_file: Path, tmp: Path) -> Path:
    """An altered amount, a reordered commit list, a forged status or state, a cut archive, other
    files: all refused with one sentence. Returns the altered archive for the CLI to refuse too."""
    items = read_archive(jsonl)
    registry = installed_registry()
    assert verify_archive(items, registry).summary()["distributions"]["ok"] is True

    def fails(changed: list[dict[str, Any]], words: str) -> None:
        with pytest.raises(ValuemeshError) as info:
            verify_archive(changed, registry)
        assert re.search(words, info.value.message) and "\n" not in info.value.message, info.value.message

    # The revenue's amount changed inside its signed block: the signature no longer holds.
    altered = [dict(x) for x in items]
    at = next(i for i, x in enumerate(altered) if x["kind"] == "block" and b"1200.00" in base64.b64decode(x["raw"]))
    altered[at]["raw"] = base64.b64encode(base64.b64decode(altered[at]["raw"]).replace(b"1200.00", b"1900.00")).decode()
    fails(altered, "signature")

    # Two committed blocks swapped: every signature holds but the DAG decides another order.
    blocks = [i for i, x in enumerate(items) if x["kind"] == "block" and x["commit"] is not None]
    carrying = [(a, b) for a, b in itertools.pairwise(blocks) if _records_in(items[b])][:3]
    assert carrying
    for a, b in carrying:
        swapped = [dict(x) for x in items]
        swapped[a], swapped[b] = ({**items[b], "commit": items[a]["commit"]},
                                  {**items[a], "commit": items[b]["commit"]})
        fails(swapped, "commit order|differs|lists")
    # A block left out, a stated status, a closing state hash changed, or the end cut off.
    fails([x for i, x in enumerate(items) if i != blocks[-1]], "commit sequence|commit order|lists")
    forged = [dict(x) for x in items]
    idx = next(i for i, x in enumerate(forged) if x["kind"] == "record" and x["type"] == "revenue")
    forged[idx]["status"] = "rejected"
    fails(forged, "differs from what its block says")
    forged = [dict(x) for x in items]
    forged[-1]["state_hash"] = "00" * 32
    fails(forged, "state hash")
    fails(items[:-1], "cut short")
    # The membership changes closed epochs whose quorum-signed checkpoints the archive carries.
    cps = [i for i, x in enumerate(items) if x["kind"] == "checkpoint"]
    assert cps and verify_archive(items, registry).checkpoints == sorted(items[i]["epoch"] for i in cps)
    forged = [dict(x) for x in items]
    forged[cps[0]]["state_hash"] = "11" * 32
    fails(forged, "signature")
    forged[cps[0]] = {**items[cps[0]], "sigs": []}
    fails(forged, "lacks a quorum")
    forged[cps[0]] = {**items[cps[0]], "epoch": items[cps[0]]["epoch"] + 50}
    fails(forged, "never close")
    fails([{**items[0], "constellation": "vc1" + "a" * 58}, *items[1:]], "constellation")
    (tmp / "garbage.jsonl").write_text("{not json\n")
    for path, words in ((tmp / "garbage.jsonl", "neither valuemesh JSONL nor CSV"), (vf_file, "ValueFlows view"),
                        (tmp / "missing.jsonl", "Cannot read")):
        with pytest.raises(ValuemeshError) as info:
            read_archive(path)
        assert re.search(words, info.value.message), info.value.message
    path = tmp / "altered.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in altered))
    return path


def a_member_cannot_import(items: list[dict[str, Any]], member: Daemon, tmp: Path) -> None:
    """A member's node restored from an archive could sign a round twice: refused, nothing written."""
    archive = verify_archive(items, installed_registry())
    identity = Home(member.home).load_identity()
    (tmp / "member-copy").mkdir()

    async def attempt() -> None:
        store = await Store.open(tmp / "member-copy" / "node.db")
        try:
            with pytest.raises(ValuemeshError, match="belongs to that constellation"):
                await load_archive(store, archive, identity)
            assert await store.constellations() == []
        finally:
            await store.close()

    asyncio.run(attempt())


def test_csv_archives_round_trip_big_cells_and_defuse_formulas(tmp_path: Path) -> None:
    items: list[dict[str, Any]] = [
        {"kind": "archive", "format": "valuemesh-archive", "v": 1, "name": "=HYPERLINK(1)"},
        {"kind": "record", "index": 3, "type": "=cmd|' /C calc'!A0", "op": "+1", "reason": "@x", "seq": 0,
         "status": "rejected", "raw": "q" * 300_000, "body": {"note": "-2"}},
        {"kind": "record", "index": 4, "type": "'quoted", "op": "", "reason": "", "seq": 7, "status": "applied",
         "raw": "+AAAA", "block": None},
        {"kind": "end", "state_hash": "00" * 32, "records": 2},
    ]
    text = archive_csv(items)
    assert not any(cell.startswith(("=", "+", "@")) for line in text.splitlines() for cell in line.split(","))
    (tmp_path / "a.csv").write_text(text)
    back = read_archive(tmp_path / "a.csv")
    assert back[1]["type"] == items[1]["type"] and back[1]["op"] == "+1" and back[1]["reason"] == "@x"
    assert back[1]["raw"] == items[1]["raw"] and back[1]["body"] == {"note": "-2"} and back[1]["index"] == 3
    assert back[2]["type"] == "'quoted" and back[2]["raw"] == "+AAAA" and back[2]["reason"] == ""
    assert back[0]["name"] == "=HYPERLINK(1)" and back[3]["records"] == 2
    (tmp_path / "a.jsonl").write_text("".join(archive_jsonl(items)))
    assert read_archive(tmp_path / "a.jsonl") == items
