"""Tests of the sharing plugin written only against valuemesh's public plugin API,
`valuemesh.plugin`: the kit (`check_plugin`, `TestConstellation`) and the route contract.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from valuemesh.plugin import ConstellationView, RouteRequest, TestConstellation, check_plugin

from valuemesh_sharing import PLUGIN
from valuemesh_sharing.plugin import DAY_MS, loan_days

DRILL = {"op": "offer", "title": "cordless drill", "category": "tools"}
NEED = {"op": "need", "title": "a drill for the weekend"}
LENDER, BORROWER, FACILITATOR = 0, 1, 2


def view(tc: TestConstellation, name: str) -> Any:
    return PLUGIN.views()[name](tc.ledger.reader)


def post_ok(tc: TestConstellation, who: int, body: dict[str, Any]) -> bytes:
    rec = tc.sign(who, "sharing", body)
    out = tc.apply(rec)
    assert out.applied, out.reason
    return rec.id


def refused(tc: TestConstellation, who: int, body: dict[str, Any]) -> str:
    before = tc.state_hash()
    out = tc.apply(tc.sign(who, "sharing", body))
    assert not out.applied
    assert tc.state_hash() == before
    return out.reason


@pytest.fixture
def tc() -> TestConstellation:
    return TestConstellation(3, plugins=[PLUGIN])


def test_conformance_kit_passes() -> None:
    report = check_plugin(PLUGIN)
    assert "apply is deterministic (two ledgers, reordered maps, same outcomes and hashes)" in report.checks
    assert len(report.checks) > 10


def test_full_cycle_records_the_loan_for_the_lender(tc: TestConstellation) -> None:
    offer = post_ok(tc, LENDER, DRILL)
    need = post_ok(tc, BORROWER, NEED)
    post_ok(tc, LENDER, {"op": "match", "offer": offer, "need": need})
    [o] = view(tc, "offers")
    assert o["status"] == "lent" and o["loan"]["borrower"] == tc.member(BORROWER).key
    assert view(tc, "needs")[0]["status"] == "matched"
    ret = post_ok(tc, LENDER, {"op": "return", "offer": offer, "note": "fine"})
    [done] = view(tc, "completed")
    assert done["id"] == ret.hex()
    assert (done["lender"], done["borrower"], done["days"]) == (tc.member(LENDER).key, tc.member(BORROWER).key, 1)
    assert view(tc, "offers")[0]["status"] == "available" and view(tc, "offers")[0]["loans"] == 1
    assert view(tc, "needs")[0]["status"] == "fulfilled"
    assert view(tc, "lenders") == [{"lender": tc.member(LENDER).key, "loans": 1, "days": 1}]
    # The same offer can be lent again once it is back.
    need2 = post_ok(tc, FACILITATOR, {"op": "need", "title": "drill again"})
    post_ok(tc, LENDER, {"op": "match", "offer": offer, "need": need2})


def test_a_proposal_by_someone_else_waits_for_the_lender(tc: TestConstellation) -> None:
    offer = post_ok(tc, LENDER, DRILL)
    need = post_ok(tc, BORROWER, NEED)
    post_ok(tc, FACILITATOR, {"op": "match", "offer": offer, "need": need})
    assert view(tc, "offers")[0]["status"] == "available"
    [p] = view(tc, "proposals")
    assert (p["offer"], p["need"], p["by"]) == (offer.hex(), need.hex(), tc.member(FACILITATOR).key)
    assert "already proposed" in refused(tc, BORROWER, {"op": "match", "offer": offer, "need": need})
    post_ok(tc, LENDER, {"op": "match", "offer": offer, "need": need})
    assert view(tc, "proposals") == []
    assert view(tc, "offers")[0]["status"] == "lent"


def test_refusals_leave_the_state_unchanged(tc: TestConstellation) -> None:
    assert "blank" in refused(tc, LENDER, {"op": "offer", "title": "   "})
    offer = post_ok(tc, LENDER, DRILL)
    need = post_ok(tc, BORROWER, NEED)
    own_need = post_ok(tc, LENDER, {"op": "need", "title": "my own"})
    missing = b"\x09" * 32
    assert "no final offer" in refused(tc, LENDER, {"op": "match", "offer": missing, "need": need})
    assert "no final need" in refused(tc, LENDER, {"op": "match", "offer": offer, "need": missing})
    assert "their own offer" in refused(tc, LENDER, {"op": "match", "offer": offer, "need": own_need})
    assert "not lent out" in refused(tc, LENDER, {"op": "return", "offer": offer})
    assert "Only the member who made an offer" in refused(tc, BORROWER, {"op": "withdraw", "target": offer})
    assert "Only the member who posted a need" in refused(tc, LENDER, {"op": "withdraw", "target": need})
    post_ok(tc, LENDER, {"op": "match", "offer": offer, "need": need})
    assert "Only the lender" in refused(tc, BORROWER, {"op": "return", "offer": offer})
    assert "lent, not available" in refused(tc, LENDER, {"op": "match", "offer": offer, "need": own_need})
    assert "only an available offer" in refused(tc, LENDER, {"op": "withdraw", "target": offer})
    assert "only an open need" in refused(tc, BORROWER, {"op": "withdraw", "target": need})
    # An outsider (not a member) is refused by the ledger before the plugin runs.
    outsider = tc.identity(7)
    before = tc.state_hash()
    assert not tc.apply(tc.sign(outsider, "sharing", DRILL)).applied
    assert tc.state_hash() == before


def test_withdrawn_offers_and_needs_cannot_be_matched(tc: TestConstellation) -> None:
    offer = post_ok(tc, LENDER, DRILL)
    need = post_ok(tc, BORROWER, NEED)
    post_ok(tc, FACILITATOR, {"op": "match", "offer": offer, "need": need})
    post_ok(tc, LENDER, {"op": "withdraw", "target": offer})
    assert view(tc, "proposals") == []
    assert "withdrawn, not available" in refused(tc, LENDER, {"op": "match", "offer": offer, "need": need})
    post_ok(tc, BORROWER, {"op": "withdraw", "target": need})
    assert view(tc, "needs")[0]["status"] == "withdrawn"


def test_loan_days_count_started_days() -> None:
    assert loan_days(0, 0) == 1
    assert loan_days(0, DAY_MS) == 1
    assert loan_days(0, DAY_MS + 1) == 2
    assert loan_days(5, 5 + 3 * DAY_MS) == 3


def test_two_ledgers_replaying_the_same_cycle_agree() -> None:
    a, b = TestConstellation(3, plugins=[PLUGIN]), TestConstellation(3, plugins=[PLUGIN])
    for tc in (a, b):
        offer = post_ok(tc, LENDER, DRILL)
        need = post_ok(tc, BORROWER, NEED)
        post_ok(tc, LENDER, {"op": "match", "offer": offer, "need": need})
        post_ok(tc, LENDER, {"op": "return", "offer": offer})
    assert a.state_hash() == b.state_hash()
    replay = a.fresh_ledger()
    now = a.log[0].created
    for step, rec in enumerate(a.log[1:], start=1):
        replay.apply(rec, now + step * 1_000)
    assert replay.state_hash() == a.state_hash()


def test_the_api_route_answers_the_views_as_json(tc: TestConstellation) -> None:
    offer = post_ok(tc, LENDER, DRILL)
    [route] = PLUGIN.api_routes()
    assert route.path == ""  # served as GET /plugins/sharing/{cid}
    doc = route.handler(RouteRequest(ConstellationView.of(tc.ledger), {}, {}))
    assert isinstance(doc, dict)
    assert doc["constellation"] == ConstellationView.of(tc.ledger).id and doc["v"] == 1
    assert doc["state_hash"] == tc.state_hash().hex()
    assert doc["offers"] == [{"id": offer.hex(), "lender": str(tc.member(LENDER)), "title": "cordless drill",
                              "note": "", "category": "tools", "at": doc["offers"][0]["at"],
                              "status": "available", "loan": None, "loans": 0}]
    assert json.loads(json.dumps(doc)) == doc
