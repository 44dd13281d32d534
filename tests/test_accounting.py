"""Accounting plugins on a real ledger: agreements, revenue, votes, distributions,
end to end, and every kind of bad input refused with one sentence and no change."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from valuemesh.protocol.accounting import PLUGINS, try_policy
from valuemesh.protocol.accounting.distribution import current_split, verify_recorded
from valuemesh.protocol.accounting.inputs import current_policy, paid_debt_key
from valuemesh.protocol.accounting.policy import decide, encode_split
from valuemesh.protocol.accounting.split import COMMONS
from valuemesh.protocol.accounting.splitpolicy import DEFAULT_POLICY, parse_policy
from valuemesh.protocol.errors import ValidationError
from valuemesh.protocol.ledger import Ledger
from valuemesh.protocol.records import Record
from valuemesh.protocol.testing import GENESIS_TIME, STEP_MS, TestConstellation, check_plugin

F, INV, P, C, OUTSIDER = 0, 1, 2, 3, 9
ROLES = [["facilitator", "producer"], ["investor"], ["producer"], ["customer"]]
TIERS = ["core", "core", "core", "contributor"]
DAY = 86_400_000
SPLIT = {"levy_bps": 200, "weights": {"work:hour": "1"}, "acks": {"required": 1}}


def constellation() -> TestConstellation:
    return TestConstellation(4, roles=ROLES, tiers=TIERS, plugins=PLUGINS)


def ok(tc: TestConstellation, who: int, type: str, body: dict[str, Any]) -> Record:
    rec = tc.sign(who, type, body)
    out = tc.apply(rec)
    assert out.applied, out.reason
    return rec


def refused(tc: TestConstellation, who: int, type: str, body: dict[str, Any], words: str) -> str:
    before = tc.state_hash()
    out = tc.post(who, type, body)
    assert out.status == "rejected", f"expected a refusal, got {out.status}"
    assert tc.state_hash() == before
    assert re.search(words, out.reason), out.reason
    # One plain sentence: no line breaks, no traceback, a full stop at the end.
    assert "\n" not in out.reason and out.reason.endswith(".") and "Traceback" not in out.reason
    return out.reason


def key(tc: TestConstellation, who: int) -> bytes:
    return tc.member(who).key


def agreement(tc: TestConstellation) -> Record:
    rec = ok(
        tc,
        F,
        "agreement",
        {
            "op": "propose",
            "title": "Bakery website",
            "parties": [key(tc, F), key(tc, C)],
            "currency": "EUR",
            "customer": key(tc, C),
            "terms": [
                {"kind": "price", "amount": "1200.00"},
                {"kind": "fee", "to": key(tc, F), "bps": 500},
                {"kind": "rebate", "to": key(tc, C), "bps": 250},
            ],
        },
    )
    return rec


def adopt(tc: TestConstellation, split: dict[str, Any]) -> Record:
    prop = ok(
        tc,
        F,
        "policy",
        {
            "op": "propose",
            "title": "Hours count, 2% levy",
            "split": encode_split(parse_policy(split)),
            "closes": tc.now + DAY,
        },
    )
    for who, vote in [(F, "agree"), (INV, "agree"), (P, "agree"), (C, "disagree")]:
        ok(tc, who, "policy", {"op": "vote", "proposal": prop.id, "option": vote})
    ok(tc, P, "policy", {"op": "close", "proposal": prop.id})
    return prop


def work_and_capital(tc: TestConstellation) -> dict[str, bytes]:
    loan = ok(
        tc,
        INV,
        "contribution",
        {
            "op": "record",
            "action": "transfer",
            "quantity": "500",
            "unit": "EUR",
            "payback": "debt-like",
        },
    )
    f_work = ok(
        tc, F, "contribution", {"op": "record", "action": "work", "quantity": "10", "unit": "hour"}
    )
    p_work = ok(
        tc, P, "contribution", {"op": "record", "action": "work", "quantity": "30", "unit": "hour"}
    )
    ok(tc, F, "contribution", {"op": "ack", "target": loan.id})
    ok(tc, INV, "contribution", {"op": "ack", "target": f_work.id})
    ok(tc, INV, "contribution", {"op": "ack", "target": p_work.id})
    return {"loan": loan.id, "f_work": f_work.id, "p_work": p_work.id}


def propose_distribution(tc: TestConstellation, who: int, revenue: bytes) -> Record:
    d = current_split(tc.ledger.reader, revenue)
    return ok(
        tc,
        who,
        "distribution",
        {
            "op": "propose",
            "revenue": revenue,
            "hash": d.hash,
            "policy": d.policy_hash,
            "root": d.inputs_root,
        },
    )


def test_four_member_value_network_end_to_end() -> None:
    tc = constellation()
    ids = work_and_capital(tc)
    a = agreement(tc)
    assert tc.ledger.reader.read("agreement", f"a/{a.id.hex()}")["status"] == "proposed"
    ok(tc, C, "agreement", {"op": "sign", "agreement": a.id})
    assert tc.ledger.reader.read("agreement", f"a/{a.id.hex()}")["status"] == "final"
    prop = adopt(tc, SPLIT)
    policy, adopted_by = current_policy(tc.ledger.reader)
    assert adopted_by == prop.id and policy == parse_policy(SPLIT)

    rev = ok(
        tc,
        F,
        "revenue",
        {
            "op": "record",
            "amount": "1200.00",
            "currency": "EUR",
            "customer": key(tc, C),
            "agreement": a.id,
        },
    )
    d = current_split(tc.ledger.reader, rev.id)
    got = [(ln.kind, ln.to, ln.amount) for ln in d.lines]
    assert got == [
        ("debt", key(tc, INV), 50_000),  # the 500 EUR loan first
        ("fee", key(tc, F), 6_000),  # 5% of 1200
        ("levy", COMMONS, 2_400),  # 2% to the commons
        ("rebate", key(tc, C), 3_000),  # 2.5% back to the customer
        *sorted([("pool", key(tc, F), 14_650), ("pool", key(tc, P), 43_950)], key=lambda x: x[1]),
    ]
    assert sum(x[2] for x in got) == 120_000

    shape = d.to_json()
    assert shape["amount"] == "1200.00" and shape["lines"][0]["amount"] == "500.00"
    assert shape["lines"][0]["sources"] == [ids["loan"].hex()]

    prop_d = propose_distribution(tc, F, rev.id)
    stored = tc.ledger.reader.read("distribution", f"d/{prop_d.id.hex()}")
    assert stored["required"] == [key(tc, C)] and stored["status"] == "proposed"
    refused(
        tc,
        P,
        "distribution",
        {"op": "ratify", "distribution": prop_d.id, "hash": d.hash},
        "not asked to ratify",
    )
    ok(tc, C, "distribution", {"op": "ratify", "distribution": prop_d.id, "hash": d.hash})
    stored = tc.ledger.reader.read("distribution", f"d/{prop_d.id.hex()}")
    assert stored["status"] == "final"
    assert tc.ledger.reader.read("distribution", paid_debt_key(ids["loan"])) == 50_000
    refused(
        tc,
        F,
        "distribution",
        {
            "op": "propose",
            "revenue": rev.id,
            "hash": d.hash,
            "policy": d.policy_hash,
            "root": d.inputs_root,
        },
        "already has a final distribution",
    )

    # A second sale: the loan is repaid, so no debt line any more; the claims repeat.
    rev2 = ok(
        tc,
        P,
        "revenue",
        {
            "op": "record",
            "amount": "100.00",
            "currency": "EUR",
            "customer": key(tc, C),
            "agreement": a.id,
        },
    )
    d2 = current_split(tc.ledger.reader, rev2.id)
    assert [ln.kind for ln in d2.lines] == ["fee", "levy", "rebate", "pool", "pool"]
    assert sum(ln.amount for ln in d2.lines) == 10_000
    prop_d2 = propose_distribution(tc, P, rev2.id)
    ok(tc, C, "distribution", {"op": "ratify", "distribution": prop_d2.id, "hash": d2.hash})

    # Both still verify from the inputs they carry, though the ledger moved on.
    assert verify_recorded(tc.ledger.reader, prop_d.id).hash == d.hash
    assert verify_recorded(tc.ledger.reader, prop_d2.id).hash == d2.hash
    owed = PLUGINS[3].views()["owed"](tc.ledger.reader)["EUR"]
    assert owed[key(tc, INV).hex()] == 50_000 and sum(owed.values()) == 130_000

    # Every node that applies the same records in the same order holds the same ledger.
    replay = Ledger(tc.registry, tc.constellation)
    now = GENESIS_TIME
    for rec in tc.log:
        assert all(o.status in ("applied", "rejected") for o in replay.apply(rec, now))
        now += STEP_MS
    assert replay.state_hash() == tc.state_hash()
    assert replay.reader.read("distribution", f"d/{prop_d.id.hex()}") == stored


def test_try_before_voting_changes_nothing() -> None:
    tc = constellation()
    work_and_capital(tc)
    rev = ok(
        tc,
        F,
        "revenue",
        {"op": "record", "amount": "90.00", "currency": "EUR", "customer": key(tc, C)},
    )
    before = tc.state_hash()
    now_split = current_split(tc.ledger.reader, rev.id)
    tried = try_policy(tc.ledger.reader, rev.id, parse_policy({**SPLIT, "debts": False}))
    assert tc.state_hash() == before
    assert now_split.policy_hash == DEFAULT_POLICY.hash
    # Under the default policy the 500 EUR loan swallows the 90 EUR; the proposal pools it.
    assert [ln.kind for ln in now_split.lines] == ["debt"]
    assert {ln.kind for ln in tried.lines} == {"levy", "pool"}
    assert sum(ln.amount for ln in tried.lines) == 9_000


def test_revenue_amounts_are_refused_unless_exact_and_plausible() -> None:
    tc = constellation()
    for body, words in [
        ({"amount": "12.345", "currency": "EUR"}, "has 3 decimals but EUR allows at most 2"),
        ({"amount": "100.5", "currency": "JPY"}, "JPY allows no decimals"),
        ({"amount": "-5.00", "currency": "EUR"}, "must not be negative"),
        ({"amount": "0", "currency": "EUR"}, "greater than zero"),
        ({"amount": "99999999999999.00", "currency": "EUR"}, "plausible limit"),
        ({"amount": "1.0", "currency": "XTS"}, "not known; give its number of decimals"),
        ({"amount": "1.00", "currency": "EUR", "exponent": 3}, "EUR has 2 decimals, not 3"),
        ({"amount": "1", "currency": "eur"}, "not a currency code"),
        (
            {"amount": "10", "currency": "EUR", "agreement": b"\x05" * 32},
            "agreement that does not exist",
        ),
        (
            {"amount": "10", "currency": "EUR", "customer": tc.member(OUTSIDER).key},
            "not an active member",
        ),
    ]:
        refused(tc, F, "revenue", {"op": "record", **body}, words)
    ok(tc, F, "revenue", {"op": "record", "amount": "5000", "currency": "JPY"})
    ok(tc, F, "revenue", {"op": "record", "amount": "1.234", "currency": "KWD"})
    ok(tc, F, "revenue", {"op": "record", "amount": "12.5", "currency": "HOURS", "exponent": 1})


def test_agreements_need_every_party_and_only_parties() -> None:
    tc = constellation()
    a = agreement(tc)
    refused(tc, P, "agreement", {"op": "sign", "agreement": a.id}, "not a party")
    refused(tc, F, "agreement", {"op": "sign", "agreement": a.id}, "already signed")
    refused(
        tc,
        F,
        "revenue",
        {
            "op": "record",
            "amount": "1200.00",
            "currency": "EUR",
            "customer": key(tc, C),
            "agreement": a.id,
        },
        "not final",
    )
    ok(tc, C, "agreement", {"op": "sign", "agreement": a.id})
    refused(tc, C, "agreement", {"op": "sign", "agreement": a.id}, "already final")
    refused(
        tc,
        F,
        "revenue",
        {
            "op": "record",
            "amount": "10",
            "currency": "USD",
            "customer": key(tc, C),
            "agreement": a.id,
        },
        "in EUR, not USD",
    )
    refused(
        tc,
        F,
        "revenue",
        {
            "op": "record",
            "amount": "10",
            "currency": "EUR",
            "customer": key(tc, P),
            "agreement": a.id,
        },
        "not the agreement's customer",
    )
    base = {"op": "propose", "title": "t", "currency": "EUR", "parties": [key(tc, F), key(tc, P)]}
    for terms, words in [
        (
            [{"kind": "fee", "to": key(tc, P), "bps": 100, "amount": "1"}],
            "either a fixed amount or bps",
        ),
        ([{"kind": "fee", "to": key(tc, C), "bps": 100}], "not a party"),
        ([{"kind": "price", "amount": "1.001"}], "allows at most 2"),
        (
            [
                {"kind": "fee", "to": key(tc, P), "bps": 6000},
                {"kind": "fee", "to": key(tc, F), "bps": 5000},
            ],
            "more than the whole",
        ),
        (
            [{"kind": "reimbursement", "to": key(tc, P), "amount": "5", "cap": "9"}],
            "cap only with bps",
        ),
    ]:
        refused(tc, F, "agreement", {**base, "terms": terms}, words)
    refused(
        tc,
        P,
        "agreement",
        {**base, "parties": [key(tc, F), key(tc, C)], "terms": [{"kind": "price", "amount": "1"}]},
        "must be one of its parties",
    )
    withdrawn = ok(tc, F, "agreement", {**base, "terms": [{"kind": "price", "amount": "1"}]})
    ok(tc, P, "agreement", {"op": "withdraw", "agreement": withdrawn.id})
    refused(tc, F, "agreement", {"op": "sign", "agreement": withdrawn.id}, "already withdrawn")


def test_votes_outside_the_window_twice_or_by_non_voters_are_refused() -> None:
    tc = constellation()
    refused(
        tc, F, "policy", {"op": "propose", "title": "late", "closes": tc.now - 1}, "already past"
    )
    refused(
        tc, F, "policy", {"op": "propose", "title": "long", "closes": tc.now + 100 * DAY}, "90 days"
    )
    refused(
        tc,
        F,
        "policy",
        {"op": "propose", "title": "bad", "split": b"\xff", "closes": tc.now + DAY},
        "not a valid encoding",
    )
    opens = tc.now + 10 * STEP_MS
    prop = ok(
        tc,
        F,
        "policy",
        {
            "op": "propose",
            "title": "Meet where?",
            "options": ["online", "berlin"],
            "opens": opens,
            "closes": opens + 20 * STEP_MS,
            "voters": ["producer"],
        },
    )
    refused(tc, P, "policy", {"op": "vote", "proposal": prop.id, "option": "online"}, "opens at")
    while tc.now < opens:
        tc.now += STEP_MS
    ok(tc, P, "policy", {"op": "vote", "proposal": prop.id, "option": "online"})
    refused(
        tc,
        P,
        "policy",
        {"op": "vote", "proposal": prop.id, "option": "berlin"},
        "cannot be cast twice",
    )
    refused(tc, INV, "policy", {"op": "vote", "proposal": prop.id, "option": "online"}, "not among")
    refused(
        tc, F, "policy", {"op": "vote", "proposal": prop.id, "option": "paris"}, "must be one of"
    )
    refused(tc, P, "policy", {"op": "close", "proposal": prop.id}, "only at its closing time")
    tc.now = opens + 20 * STEP_MS
    refused(tc, F, "policy", {"op": "vote", "proposal": prop.id, "option": "online"}, "closed at")
    ok(tc, INV, "policy", {"op": "close", "proposal": prop.id})
    p = tc.ledger.reader.read("policy", f"p/{prop.id.hex()}")
    # 1 of 2 producers voted: exactly the default 50% quorum; 'online' has all votes cast.
    assert p["outcome"]["result"] == "chosen" and p["outcome"]["option"] == "online"
    refused(tc, F, "policy", {"op": "vote", "proposal": prop.id, "option": "online"}, "closed")
    assert tc.ledger.reader.read("policy", "current") is None  # a poll adopts no split policy


def test_a_split_proposal_that_fails_leaves_the_policy_unchanged() -> None:
    tc = constellation()
    prop = ok(
        tc,
        F,
        "policy",
        {
            "op": "propose",
            "title": "x",
            "split": encode_split(parse_policy(SPLIT)),
            "closes": tc.now + DAY,
            "block": True,
        },
    )
    ok(tc, F, "policy", {"op": "vote", "proposal": prop.id, "option": "agree"})
    ok(tc, INV, "policy", {"op": "vote", "proposal": prop.id, "option": "agree"})
    ok(tc, P, "policy", {"op": "vote", "proposal": prop.id, "option": "agree"})
    ok(tc, C, "policy", {"op": "vote", "proposal": prop.id, "option": "block"})
    ok(tc, C, "policy", {"op": "close", "proposal": prop.id})
    assert tc.ledger.reader.read("policy", f"p/{prop.id.hex()}")["outcome"]["result"] == "blocked"
    assert current_policy(tc.ledger.reader) == (DEFAULT_POLICY, None)


def test_outcomes_follow_quorum_threshold_and_ties() -> None:
    binary = {
        "voters": [b"a", b"b", b"c", b"d"],
        "options": ["agree", "abstain", "disagree"],
        "quorum_bps": 5000,
        "threshold_bps": 6667,
    }
    assert decide(binary, {"agree": 1})["result"] == "no-quorum"
    assert decide(binary, {"agree": 1, "abstain": 1})["result"] == "adopted"
    assert decide(binary, {"agree": 2, "disagree": 1})["result"] == "rejected"  # 6666 < 6667 bps
    assert decide(binary, {"agree": 3, "disagree": 1})["result"] == "adopted"
    assert decide(binary, {"abstain": 4})["result"] == "rejected"
    poll = {**binary, "options": ["x", "y", "z"], "threshold_bps": 1}
    assert decide(poll, {"x": 1, "y": 1})["result"] == "tied"
    assert decide(poll, {"x": 2, "y": 1})["option"] == "x"


def test_distributions_are_refused_when_stale_wrong_or_unratifiable() -> None:
    tc = constellation()
    ids = work_and_capital(tc)
    rev = ok(
        tc,
        F,
        "revenue",
        {"op": "record", "amount": "600.00", "currency": "EUR", "customer": key(tc, C)},
    )
    d = current_split(tc.ledger.reader, rev.id)
    body = {
        "op": "propose",
        "revenue": rev.id,
        "hash": d.hash,
        "policy": d.policy_hash,
        "root": d.inputs_root,
    }
    refused(tc, F, "distribution", {**body, "hash": b"\x01" * 32}, "does not match what every node")
    refused(tc, F, "distribution", {**body, "policy": b"\x01" * 32}, "another policy")
    refused(tc, F, "distribution", {**body, "revenue": b"\x02" * 32}, "no final revenue")
    prop = ok(tc, F, "distribution", body)
    refused(
        tc,
        C,
        "distribution",
        {"op": "ratify", "distribution": prop.id, "hash": b"\x03" * 32},
        "different distribution",
    )
    # The ledger moves on (a new acknowledgement) before the customer's signature:
    ok(tc, C, "contribution", {"op": "record", "action": "work", "quantity": "1", "unit": "hour"})
    last = tc.log[-1].id
    ok(tc, F, "contribution", {"op": "ack", "target": last})
    assert (
        current_split(tc.ledger.reader, rev.id).hash == d.hash
    )  # work after the revenue earns nothing
    ok(tc, C, "contribution", {"op": "dispute", "target": ids["f_work"], "reason": "not 10 hours"})
    refused(
        tc,
        C,
        "distribution",
        {"op": "ratify", "distribution": prop.id, "hash": d.hash},
        "ledger changed since",
    )
    refused(tc, F, "distribution", body, "ledger changed since")
    d2 = current_split(tc.ledger.reader, rev.id)
    prop2 = ok(tc, F, "distribution", {**body, "hash": d2.hash, "root": d2.inputs_root})
    ok(tc, C, "distribution", {"op": "ratify", "distribution": prop2.id, "hash": d2.hash})
    refused(
        tc,
        C,
        "distribution",
        {"op": "ratify", "distribution": prop.id, "hash": d.hash},
        "already has a final distribution",
    )


def test_recipients_ratify_when_the_policy_says_so() -> None:
    tc = constellation()
    work_and_capital(tc)
    adopt(tc, {**SPLIT, "ratify": {"customer": True, "recipients": True}})
    rev = ok(
        tc,
        F,
        "revenue",
        {"op": "record", "amount": "1000.00", "currency": "EUR", "customer": key(tc, C)},
    )
    prop = propose_distribution(tc, P, rev.id)
    d = tc.ledger.reader.read("distribution", f"d/{prop.id.hex()}")
    assert d["required"] == sorted([key(tc, C), key(tc, F), key(tc, INV), key(tc, P)])
    for who in (C, F, INV):
        ok(tc, who, "distribution", {"op": "ratify", "distribution": prop.id, "hash": d["hash"]})
        assert tc.ledger.reader.read("distribution", f"d/{prop.id.hex()}")["status"] == "proposed"
    ok(tc, P, "distribution", {"op": "ratify", "distribution": prop.id, "hash": d["hash"]})
    assert tc.ledger.reader.read("distribution", f"d/{prop.id.hex()}")["status"] == "final"


@pytest.mark.parametrize("index", [0, 1, 2])
def test_plugins_pass_the_conformance_kit(index: int) -> None:
    tc = constellation()
    a, b = key(tc, 0), key(tc, 1)
    examples: list[list[dict[str, Any]]] = [
        [
            {
                "op": "propose",
                "title": "t",
                "parties": [a, b],
                "currency": "EUR",
                "terms": [
                    {"kind": "price", "amount": "10.00"},
                    {"kind": "fee", "to": b, "bps": 100},
                ],
            },
            {"op": "sign", "agreement": b"\x07" * 32},
        ],
        PLUGINS[1].examples()[:1],
        [
            {"op": "propose", "title": "x", "options": ["a", "b"], "closes": GENESIS_TIME + DAY},
            {"op": "vote", "proposal": b"\x07" * 32, "option": "a"},
        ],
    ]
    check_plugin(
        PLUGINS[index], examples=examples[index], registry_factory=lambda: constellation().registry
    )


def test_an_investor_return_on_all_sales_is_paid_until_its_cap() -> None:
    tc = constellation()
    terms = [{"kind": "investor_return", "to": key(tc, INV), "bps": 1000, "cap": "150.00"}]
    a = ok(
        tc,
        INV,
        "agreement",
        {
            "op": "propose",
            "title": "Seed money",
            "currency": "EUR",
            "parties": [key(tc, INV), key(tc, F)],
            "applies": "all",
            "terms": terms,
        },
    )
    ok(tc, F, "agreement", {"op": "sign", "agreement": a.id})
    ok(tc, P, "contribution", {"op": "record", "action": "work", "quantity": "8", "unit": "hour"})
    got = []
    for amount in ("1000.00", "1000.00", "1000.00"):
        rev = ok(
            tc,
            F,
            "revenue",
            {"op": "record", "amount": amount, "currency": "EUR", "customer": key(tc, C)},
        )
        d = current_split(tc.ledger.reader, rev.id)
        got.append([(ln.kind, ln.amount) for ln in d.lines])
        prop = propose_distribution(tc, F, rev.id)
        ok(tc, C, "distribution", {"op": "ratify", "distribution": prop.id, "hash": d.hash})
    assert got == [
        [("investor_return", 10_000), ("pool", 90_000)],
        [("investor_return", 5_000), ("pool", 95_000)],  # only 50.00 of the 150.00 cap was left
        [("pool", 100_000)],
    ]
    # Revenue in another currency is not touched by a EUR agreement.
    usd = ok(
        tc,
        F,
        "revenue",
        {"op": "record", "amount": "10", "currency": "USD", "customer": key(tc, C)},
    )
    assert [ln.kind for ln in current_split(tc.ledger.reader, usd.id).lines] == ["pool"]


amount_texts = st.one_of(
    st.from_regex(r"\A-?[0-9]{1,16}(\.[0-9]{0,5})?\Z"),
    st.text(alphabet="0123456789.-e ", min_size=1, max_size=12),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=amount_texts, currency=st.sampled_from(["EUR", "JPY", "KWD"]))
def test_any_amount_text_is_stored_exactly_or_refused_without_change(
    text: str, currency: str
) -> None:
    tc = _SHARED
    exp = {"EUR": 2, "JPY": 0, "KWD": 3}[currency]
    try:
        value = Decimal(text)
        exact = (
            re.fullmatch(r"(0|[1-9][0-9]*)(\.[0-9]+)?", text) is not None
            and value > 0
            and value <= 10**12
            and -value.as_tuple().exponent <= exp  # type: ignore[operator]
        )
    except InvalidOperation:
        exact = False
    before = tc.state_hash()
    rec = tc.sign(F, "revenue", {"op": "record", "amount": text, "currency": currency})
    out = tc.apply(rec)
    if exact:
        assert out.applied, out.reason
        stored = tc.ledger.reader.read("revenue", f"r/{rec.id.hex()}")
        assert stored["amount"] == int(Decimal(text).scaleb(exp))
    else:
        assert out.status == "rejected" and tc.state_hash() == before
        assert "\n" not in out.reason and out.reason.endswith(".")


_SHARED = constellation()


def test_every_plugin_example_fits_its_schema() -> None:
    for plugin in PLUGINS:
        for body in plugin.examples():
            assert plugin.check_body(body) == body["op"]


votes = st.lists(
    st.tuples(
        st.sampled_from([F, INV, P, C]),
        st.sampled_from(["agree", "disagree", "abstain", "maybe"]),
        st.integers(0, 4),
    ),
    max_size=10,
)


@settings(max_examples=25, deadline=None)
@given(
    votes=votes,
    quorum=st.sampled_from([0, 5000, 10_000]),
    threshold=st.sampled_from([1, 5001, 10_000]),
)
def test_voting_follows_the_window_and_one_vote_each(
    votes: list[tuple[int, str, int]], quorum: int, threshold: int
) -> None:
    tc = constellation()
    opens, closes = tc.now + 3 * STEP_MS, tc.now + 12 * STEP_MS
    prop = ok(
        tc,
        F,
        "policy",
        {
            "op": "propose",
            "title": "t",
            "opens": opens,
            "closes": closes,
            "quorum_bps": quorum,
            "threshold_bps": threshold,
            "split": encode_split(parse_policy(SPLIT)),
            "voters": ["producer", "investor"],
        },
    )
    eligible = {F, INV, P}
    tally: dict[str, int] = {}
    voted: set[int] = set()
    for who, option, wait in votes:
        tc.now += wait * STEP_MS
        before = tc.state_hash()
        out = tc.post(who, "policy", {"op": "vote", "proposal": prop.id, "option": option})
        vote_time = tc.now
        valid = (
            opens <= vote_time <= closes
            and who in eligible
            and who not in voted
            and option in ("agree", "disagree", "abstain")
        )
        assert out.applied == valid, (who, option, vote_time, out.reason)
        if valid:
            voted.add(who)
            tally[option] = tally.get(option, 0) + 1
        else:
            assert tc.state_hash() == before
    tc.now = max(tc.now, closes)
    ok(tc, C, "policy", {"op": "close", "proposal": prop.id})
    outcome = tc.ledger.reader.read("policy", f"p/{prop.id.hex()}")["outcome"]
    cast, agree, disagree = sum(tally.values()), tally.get("agree", 0), tally.get("disagree", 0)
    if cast * 10_000 < quorum * 3:
        expected = "no-quorum"
    elif agree > 0 and agree * 10_000 >= threshold * (agree + disagree):
        expected = "adopted"
    else:
        expected = "rejected"
    assert outcome["result"] == expected and outcome["tally"] == dict(sorted(tally.items()))
    adopted = current_policy(tc.ledger.reader)[1] == prop.id
    assert adopted == (expected == "adopted")


def test_a_tampered_stored_distribution_no_longer_verifies() -> None:
    from valuemesh.protocol import cbor

    tc = constellation()
    work_and_capital(tc)
    rev = ok(
        tc,
        F,
        "revenue",
        {"op": "record", "amount": "700.00", "currency": "EUR", "customer": key(tc, C)},
    )
    prop = propose_distribution(tc, F, rev.id)
    verify_recorded(tc.ledger.reader, prop.id)
    slot = f"distribution/d/{prop.id.hex()}"
    original = tc.ledger._data[slot]
    stored = cbor.decode(original)
    lines = stored["distribution"]["lines"]
    for tamper, words in [
        (
            lambda d: d["distribution"]["lines"].__setitem__(
                -1, {**lines[-1], "amount": lines[-1]["amount"] + 1}
            ),
            "do not add up",
        ),
        (lambda d: d["inputs"][-1].__setitem__("quantity", "300"), "Merkle root"),
        (
            lambda d: d["distribution"].__setitem__("policy", b"\x09" * 32),
            "another policy|No policy",
        ),
    ]:
        changed = cbor.decode(original)
        tamper(changed)
        tc.ledger._data[slot] = cbor.encode(changed)
        with pytest.raises(ValidationError, match=words):
            verify_recorded(tc.ledger.reader, prop.id)
    tc.ledger._data[slot] = original
    # Another constellation's ledger does not hold these inputs.
    other = constellation()
    other.ledger._data[slot] = original
    other.ledger._data[f"revenue/r/{rev.id.hex()}"] = tc.ledger._data[f"revenue/r/{rev.id.hex()}"]
    with pytest.raises(ValidationError, match="not in this ledger"):
        verify_recorded(other.ledger.reader, prop.id)
