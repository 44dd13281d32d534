"""The engine's JSON views (node/views.py): summary, ledger, members, one record and the
latest checkpoint, read from a real engine and store without a daemon."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_engine import FOUNDER, NEWCOMER, T0, _engine, _finalise, _grow_to_two_cores, _record

from valuemesh.node import engine as engine_mod
from valuemesh.node import views
from valuemesh.protocol.consensus import Committee
from valuemesh.protocol.errors import LocalError, NotFoundError
from valuemesh.protocol.identity import Identity


async def test_a_founder_alone_is_summarised_as_a_single_node(tmp_path: Path) -> None:
    store, eng = await _engine(tmp_path / "a.sqlite")
    try:
        s = views.summary(eng)
        assert (s["id"], s["name"], s["status"], s["my_tier"]) == (eng.text_id, "bakery", "active", "core")
        assert s["members"] == s["core"] == 1 and s["final"] == eng.final_count == 1 and s["pending"] == 0
        assert s["guarantee"] == "single-node" and "add a core member" in s["guarantee_text"]
        assert s["checkpoint"] is None and s["started_from"] is None and s["finality_ms_p50"] is None
        assert s["state_hash"] == eng.ledger.state_hash().hex()
        [me] = views.members(eng)
        assert me["member"] == str(FOUNDER.member) and (me["tier"], me["status"]) == ("core", "active")
        assert s["member_list"] == [me]
    finally:
        await store.close()


async def test_the_ledger_view_lists_final_and_pending_records_in_order(tmp_path: Path) -> None:
    store, eng = await _engine(tmp_path / "a.sqlite")
    try:
        done = await _finalise(eng, 2)
        waiting = _record(eng, 3)
        await eng.store_pending([waiting], T0 + 1_000)  # stored, not proposed: it stays pending
        led = views.ledger_view(eng)
        assert [e["index"] for e in led["final"]] == [0, 1, 2]
        assert [e["id"] for e in led["final"][1:]] == [r.id.hex() for r in done]
        assert all(e["status"] == "applied" for e in led["final"])
        assert led["final"][1]["body"]["quantity"] == "1" and led["final"][1]["author"] == str(FOUNDER.member)
        assert len(led["final_at"]) == len(led["final"]) and led["final_count"] == 3
        assert [p["id"] for p in led["pending"]] == [waiting.id.hex()] and led["pending"][0]["seq"] == 3
        assert led["state_hash"] == eng.ledger.state_hash().hex()
        assert views.summary(eng)["pending"] == 1
    finally:
        await store.close()


async def test_a_final_entry_is_rendered_once_and_kept(tmp_path: Path) -> None:
    store, eng = await _engine(tmp_path / "a.sqlite")
    try:
        await _finalise(eng, 1)
        assert isinstance(eng.final_log[1], tuple)  # nothing rendered until someone reads it
        first = views.final_entry(eng, 1)
        assert eng.final_log[1] is first and views.final(eng)[1] is first
    finally:
        await store.close()


async def test_a_record_is_found_final_pending_or_beyond_the_list_and_else_not_found(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "FINAL_VIEW_LIMIT", 2)  # genesis and the first record
    store, eng = await _engine(tmp_path / "a.sqlite")
    try:
        first, second = await _finalise(eng, 2)
        waiting = _record(eng, 3)
        await eng.store_pending([waiting], T0 + 1_000)
        got = await views.record_view(eng, first.id.hex())
        assert got["final"] is True and got["index"] == 1 and got["id"] == first.id.hex()
        beyond = await views.record_view(eng, second.id.hex())  # read back from the store
        assert beyond["final"] is True and beyond["seq"] == 2 and beyond["body"]["unit"] == "hour"
        pending = await views.record_view(eng, waiting.id.hex())
        assert pending["final"] is False and pending["seq"] == 3
        with pytest.raises(NotFoundError, match="No record"):
            await views.record_view(eng, "00" * 32)
        with pytest.raises(LocalError, match="not a record id") as info:
            await views.record_view(eng, "xyz")
        assert not isinstance(info.value, NotFoundError)  # a malformed id is a bad request, not a 404
    finally:
        await store.close()


async def test_a_certified_epoch_end_shows_in_the_summary(tmp_path: Path) -> None:
    store, eng = await _engine(tmp_path / "a.sqlite")
    try:
        await _grow_to_two_cores(eng)
        cp = views.checkpoint_view(eng)
        assert cp is not None and cp["epoch"] == 0 and cp["signers"] == [str(FOUNDER.member)]
        assert cp["state_hash"] == eng.certified[0].state_hash.hex()
        s = views.summary(eng)
        assert s["checkpoint"] == cp and s["core"] == 2 and s["epoch"] == 1
        assert s["guarantee"] == "no-fault-tolerance" and "both must be online" in s["guarantee_text"]
        assert {m["member"] for m in views.members(eng)} == {str(FOUNDER.member), str(NEWCOMER.member)}
    finally:
        await store.close()


def test_the_guarantee_text_says_what_each_core_size_survives() -> None:
    def text(n: int) -> str:
        return views.guarantee_text(Committee.of([Identity(bytes([i + 1]) * 32).member for i in range(n)]))

    assert "finalises alone" in text(1) and "add a core member" in text(1)
    assert "both must be online" in text(2)
    assert "survives 1 member(s) going offline but cannot tolerate a dishonest member" in text(3)
    assert text(4) == "4 core members: survives 1 member(s) offline or dishonest."
    assert text(7) == "7 core members: survives 2 member(s) offline or dishonest."


def test_reach_says_whether_new_records_can_become_final_now() -> None:
    ids = [Identity(bytes([i + 1]) * 32).member for i in range(7)]
    four, seven = Committee.of(ids[:4]), Committee.of(ids)

    def text(committee: Committee, me: int, linked: list[int]) -> str:
        return str(views.reach(committee, ids[me], {ids[i] for i in linked})["text"])

    assert text(four, 0, [1]) == "reachable core: 2 of 4 — new records cannot become final"
    assert text(four, 0, [1, 2]) == "reachable core: 3 of 4 — new records can become final; losing one more stops it"
    assert text(four, 0, [1, 2, 3]) == "reachable core: 4 of 4 — new records can become final; 1 more may go offline"
    assert text(seven, 0, [1, 2, 3, 4, 5, 6]).endswith("7 of 7 — new records can become final; 2 more may go offline")
    # A link to someone outside the committee counts for nothing.
    assert not views.reach(four, ids[0], {ids[5], ids[6]})["enough"]
    # Not in the committee: one core member reached is enough to hand records to the core.
    assert text(four, 6, []) == "reachable core: 0 of 4 — new records cannot become final"
    assert text(four, 6, [2]) == "reachable core: 1 of 4 — new records can become final"
    assert text(Committee.of(ids[:1]), 0, []) == "reachable core: 1 of 1 (this node) — new records become final here"
    # Weight, not heads: a heavy member away can stop finality that heads alone would promise.
    heavy = Committee.of({ids[0]: 1, ids[1]: 1, ids[2]: 1, ids[3]: 3})
    r = views.reach(heavy, ids[0], {ids[1], ids[2]})
    assert r["reachable"] == 3 and r["weight"] == 3 and r["quorum"] > 3 and not r["enough"]
