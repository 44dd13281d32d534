"""Property tests of the pure revenue split: exact totals, order independence,
equal splits, disputes, caps, claims, decay, Merkle proofs and verification."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from valuemesh.protocol.accounting.decay import decay
from valuemesh.protocol.accounting.inputs import (
    ContributionInput,
    RevenueInput,
    SplitInputs,
    TermInput,
    inputs_from_leaves,
)
from valuemesh.protocol.accounting.merkle import inclusion_proof, merkle_root, verify_inclusion
from valuemesh.protocol.accounting.money import format_minor, parse_amount
from valuemesh.protocol.accounting.split import (
    COMMONS,
    Distribution,
    compute_split,
    largest_remainder,
    verify,
)
from valuemesh.protocol.accounting.splitpolicy import DEFAULT_POLICY, parse_policy
from valuemesh.protocol.builtin.contribution import ACTIONS, PAYBACK
from valuemesh.protocol.errors import DecodeError, ValidationError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEYS = [bytes([i + 1]) * 32 for i in range(6)]
REV_AT = 1_000_000_000_000
DAY = 86_400_000


def cid(i: int) -> bytes:
    return i.to_bytes(4, "big") * 8


def revenue(amount: int, exponent: int = 2, currency: str = "EUR", agreement: bytes | None = None):
    return RevenueInput(b"\xee" * 32, amount, currency, exponent, KEYS[5], agreement, REV_AT)


quantities = st.builds(
    lambda whole, cents: f"{whole}.{cents:02d}" if cents else str(whole),
    st.integers(1, 1000),
    st.integers(0, 99),
)


@st.composite
def contributions(draw, max_size: int = 12) -> tuple[ContributionInput, ...]:
    n = draw(st.integers(0, max_size))
    out = []
    for i in range(n):
        out.append(
            ContributionInput(
                id=cid(i + 1),
                provider=draw(st.sampled_from(KEYS[:5])),
                action=draw(st.sampled_from(ACTIONS)),
                quantity=draw(quantities),
                unit=draw(st.sampled_from(["hour", "EUR", "kg"])),
                payback=draw(st.sampled_from(PAYBACK)),
                acks=tuple(draw(st.sets(st.sampled_from(KEYS), max_size=3))),
                disputes=tuple(draw(st.sets(st.sampled_from(KEYS), max_size=2))),
                at=REV_AT - draw(st.integers(0, 400)) * DAY,
                paid=draw(st.sampled_from([0, 0, 100])),
            )
        )
    return tuple(out)


@st.composite
def terms(draw) -> tuple[TermInput, ...]:
    n = draw(st.integers(0, 4))
    out = []
    for i in range(n):
        fixed = draw(st.booleans())
        amount = draw(st.integers(1, 50_000)) if fixed else None
        out.append(
            TermInput(
                agreement=b"\xaa" * 31 + bytes([i]),
                index=i,
                kind=draw(st.sampled_from(["reimbursement", "fee", "investor_return", "rebate"])),
                to=draw(st.sampled_from(KEYS)),
                amount=amount,
                bps=None if fixed else draw(st.integers(1, 2000)),
                cap=None if fixed or draw(st.booleans()) else draw(st.integers(1, 100_000)),
                paid=draw(st.integers(0, amount)) if amount else 0,
                at=draw(st.integers(0, 10)),
            )
        )
    return tuple(out)


ratio = st.sampled_from(["0", "0.25", "0.5", "1", "2", "3.75"])
unit_ratio = st.sampled_from(["0", "0.5", "1"])


@st.composite
def policies(draw):
    m = {
        "levy_bps": draw(st.integers(0, 2000)),
        "weights": draw(
            st.dictionaries(
                st.sampled_from([*ACTIONS, "work:hour", "transfer:EUR", "use:kg"]),
                ratio,
                max_size=6,
            )
        ),
        "default_weight": draw(ratio),
        "acks": {"required": draw(st.integers(0, 2)), "below": draw(unit_ratio)},
        "disputes": {"threshold": draw(st.integers(1, 2)), "factor": draw(unit_ratio)},
        "debts": draw(st.booleans()),
        "half_life_days": draw(st.sampled_from([0, 30, 365])),
        "cap_bps": draw(st.sampled_from([0, 2500, 4000, 10_000])),
        "order": draw(
            st.permutations(["debt", "reimbursement", "investor_return", "fee", "levy", "rebate"])
        ),
    }
    return parse_policy(m)


amounts = st.integers(1, 10**9)


@SETTINGS
@given(policies(), amounts, contributions(), terms(), st.sampled_from([0, 2, 3]))
def test_lines_sum_exactly_to_the_amount(policy, amount, contribs, tms, exp) -> None:
    inputs = SplitInputs(revenue(amount, exp), tms, contribs)
    d = compute_split(policy, inputs)
    assert sum(ln.amount for ln in d.lines) == amount
    assert all(ln.amount > 0 for ln in d.lines)
    verify(d, inputs, policy)


@SETTINGS
@given(policies(), amounts, contributions(), terms(), st.randoms(use_true_random=False))
def test_permuting_inputs_never_changes_the_result(policy, amount, contribs, tms, rnd) -> None:
    a = SplitInputs(revenue(amount), tms, contribs)
    shuffled_c, shuffled_t = list(contribs), list(tms)
    rnd.shuffle(shuffled_c)
    rnd.shuffle(shuffled_t)
    b = SplitInputs(revenue(amount), tuple(shuffled_t), tuple(shuffled_c))
    da, db = compute_split(policy, a), compute_split(policy, b)
    assert da == db and da.hash == db.hash and da.inputs_root == db.inputs_root


@SETTINGS
@given(st.integers(1, 5), amounts, st.sampled_from(ACTIONS), quantities)
def test_all_equal_weights_split_equally(n, amount, action, quantity) -> None:
    contribs = tuple(
        ContributionInput(
            cid(i + 1), KEYS[i], action, quantity, "hour", "once", (), (), REV_AT - DAY
        )
        for i in range(n)
    )
    d = compute_split(DEFAULT_POLICY, SplitInputs(revenue(amount), (), contribs))
    totals = d.totals()
    got = [totals.get(KEYS[i], 0) for i in range(n)]
    assert set(totals) <= set(KEYS[:n]) and sum(got) == amount
    assert max(got) - min(got) <= 1
    # Largest remainder with equal remainders goes to the lowest keys first.
    assert got == sorted(got, reverse=True)


@SETTINGS
@given(st.sampled_from(["0", "0.5", "1"]), st.integers(100, 10**8))
def test_disputed_contribution_counts_as_the_policy_says(factor, amount) -> None:
    policy = parse_policy({"disputes": {"threshold": 1, "factor": factor}})
    a, b = KEYS[0], KEYS[1]
    contribs = (
        ContributionInput(cid(1), a, "work", "10", "hour", "once", (), (), REV_AT),
        ContributionInput(cid(2), b, "work", "10", "hour", "once", (), (KEYS[2],), REV_AT),
    )
    d = compute_split(policy, SplitInputs(revenue(amount), (), contribs))
    totals = d.totals()
    f = Fraction(factor)
    expected_b = Fraction(amount) * f / (1 + f)
    assert abs(totals.get(b, 0) - expected_b) < 1
    assert totals.get(a, 0) + totals.get(b, 0) == amount
    if f == 0:
        assert b not in totals


def test_unacknowledged_work_waits_for_the_required_acks() -> None:
    policy = parse_policy({"acks": {"required": 2, "below": "0.5"}})
    contribs = (
        ContributionInput(
            cid(1), KEYS[0], "work", "4", "hour", "once", (KEYS[1], KEYS[2]), (), REV_AT
        ),
        ContributionInput(cid(2), KEYS[1], "work", "4", "hour", "once", (KEYS[0],), (), REV_AT),
    )
    d = compute_split(policy, SplitInputs(revenue(300), (), contribs))
    assert d.totals() == {KEYS[0]: 200, KEYS[1]: 100}


def test_claims_come_first_in_policy_order_then_the_pool() -> None:
    # 1000.00 EUR: 500 lent as debt, a 5% fee, a 2% levy, a 2.5% rebate; the rest by work.
    investor, producer, customer = KEYS[0], KEYS[1], KEYS[5]
    contribs = (
        ContributionInput(
            cid(1), investor, "transfer", "500", "EUR", "debt-like", (producer,), (), 1
        ),
        ContributionInput(cid(2), producer, "work", "30", "hour", "once", (investor,), (), 2),
        ContributionInput(cid(3), investor, "work", "10", "hour", "once", (producer,), (), 3),
    )
    tms = (
        TermInput(b"\xa1" * 32, 1, "fee", producer, None, 500, None, 0, 5),
        TermInput(b"\xa1" * 32, 2, "rebate", customer, None, 250, None, 0, 5),
    )
    policy = parse_policy({"levy_bps": 200, "weights": {"work": 1}})
    d = compute_split(policy, SplitInputs(revenue(100_000, agreement=b"\xa1" * 32), tms, contribs))
    assert [(ln.kind, ln.to, ln.amount) for ln in d.lines] == [
        ("debt", investor, 50_000),
        ("fee", producer, 5_000),
        ("levy", COMMONS, 2_000),
        ("rebate", customer, 2_500),
        ("pool", investor, 10_125),  # 40 500 * 10/40
        ("pool", producer, 30_375),  # 40 500 * 30/40
    ]
    assert d.lines[0].sources == (cid(1),)
    assert d.lines[1].term == 1


def test_a_debt_is_paid_only_up_to_what_remains_and_stays_owed() -> None:
    c = ContributionInput(
        cid(1), KEYS[0], "transfer", "500", "EUR", "debt-like", (), (), 1, paid=45_000
    )
    d = compute_split(DEFAULT_POLICY, SplitInputs(revenue(20_000), (), (c,)))
    assert [(ln.kind, ln.amount) for ln in d.lines] == [("debt", 5_000), ("pool", 15_000)]
    assert d.lines[1].to == COMMONS  # nobody else scores, so the pool goes to the commons
    small = compute_split(DEFAULT_POLICY, SplitInputs(revenue(3_000), (), (c,)))
    assert [(ln.kind, ln.amount) for ln in small.lines] == [("debt", 3_000)]
    assert "stays owed" in small.lines[0].explain


@SETTINGS
@given(st.integers(2, 5), st.integers(1_000, 10**8), st.sampled_from([2000, 2500, 4000]))
def test_cap_limits_every_member_and_the_rest_goes_to_the_commons(n, amount, cap) -> None:
    policy = parse_policy({"cap_bps": cap})
    contribs = tuple(
        ContributionInput(
            cid(i + 1), KEYS[i], "work", str(10 ** (i + 1)), "hour", "once", (), (), REV_AT
        )
        for i in range(n)
    )
    d = compute_split(policy, SplitInputs(revenue(amount), (), contribs))
    limit = Fraction(amount * cap, 10_000)
    for to, got in d.totals().items():
        if to != COMMONS:
            assert got <= limit + 1
    assert sum(d.totals().values()) == amount


@SETTINGS
@given(
    st.lists(
        st.fractions(min_value=0, max_value=10**6, max_denominator=997), min_size=1, max_size=9
    )
)
def test_largest_remainder_is_exact_and_within_one_unit(parts) -> None:
    total_exact = sum(parts, Fraction(0))
    total = total_exact.numerator // total_exact.denominator
    if total != total_exact:
        parts = [*parts, Fraction(total + 1) - total_exact]
        total += 1
    exact = {KEYS[i % 6] + bytes([i]): p for i, p in enumerate(parts)}
    got = largest_remainder(exact, total)
    assert sum(got.values()) == total
    for k, v in exact.items():
        assert v - 1 < got[k] < v + 1


def test_decay_is_exact_at_whole_half_lives_and_never_grows() -> None:
    assert decay(0, 10) == 1
    assert decay(10, 10) == Fraction(1, 2)
    assert decay(30, 10) == Fraction(1, 8)
    assert decay(5, 0) == 1
    assert decay(-5, 10) == 1
    assert decay(10 * 200, 10) == 0
    previous = Fraction(2)
    for age in range(0, 200, 7):
        d = decay(age, 50)
        assert d <= previous
        previous = d
    assert abs(float(decay(1, 2)) - 2**-0.5) < 1e-9


@SETTINGS
@given(st.lists(st.binary(max_size=8), min_size=1, max_size=20), st.data())
def test_merkle_inclusion_proofs_hold_and_detect_changes(leaves, data) -> None:
    root = merkle_root(leaves)
    i = data.draw(st.integers(0, len(leaves) - 1))
    proof = inclusion_proof(leaves, i)
    assert verify_inclusion(leaves[i], i, len(leaves), proof, root)
    assert not verify_inclusion(leaves[i] + b"x", i, len(leaves), proof, root)
    altered = list(leaves)
    altered[i] = leaves[i] + b"!"
    assert merkle_root(altered) != root


@SETTINGS
@given(policies(), st.integers(100, 10**9), contributions(), terms(), st.data())
def test_verification_fails_on_any_altered_line_input_or_policy(
    policy, amount, contribs, tms, data
) -> None:
    inputs = SplitInputs(revenue(amount), tms, contribs)
    d = compute_split(policy, inputs)
    verify(d, inputs, policy)
    rebuilt = inputs_from_leaves(inputs.leaves())
    assert rebuilt.leaves() == inputs.leaves() and compute_split(policy, rebuilt) == d
    # An altered line: move one unit to another recipient, or rename the payee.
    lines = list(d.lines)
    i = data.draw(st.integers(0, len(lines) - 1))
    if len(lines) > 1:
        j = (i + 1) % len(lines)
        if lines[i].amount > 1:
            lines[i] = dataclasses.replace(lines[i], amount=lines[i].amount - 1)
            lines[j] = dataclasses.replace(lines[j], amount=lines[j].amount + 1)
        else:
            lines[i], lines[j] = lines[j], lines[i]
            if lines[i] == lines[j]:
                lines[i] = dataclasses.replace(lines[i], explain=lines[i].explain + " (edited)")
    else:
        lines[i] = dataclasses.replace(lines[i], to=KEYS[4] if lines[i].to != KEYS[4] else KEYS[3])
    with pytest.raises(ValidationError):
        verify(dataclasses.replace(d, lines=tuple(lines)), inputs, policy)
    # An altered input: one unit more revenue, or one contribution's quantity changed.
    bigger = dataclasses.replace(
        inputs, revenue=dataclasses.replace(inputs.revenue, amount=amount + 1)
    )
    with pytest.raises(ValidationError):
        verify(d, bigger, policy)
    if contribs:
        k = data.draw(st.integers(0, len(contribs) - 1))
        changed = list(contribs)
        changed[k] = dataclasses.replace(changed[k], quantity=changed[k].quantity + "1")
        with pytest.raises(ValidationError):
            verify(d, dataclasses.replace(inputs, contributions=tuple(changed)), policy)
    # An altered policy, even one that happens to give the same lines.
    other = dataclasses.replace(policy, levy_bps=(policy.levy_bps + 1) % 10_000)
    with pytest.raises(ValidationError, match="another policy"):
        verify(d, inputs, other)
    # And the stored form round-trips.
    assert Distribution.from_map(d.to_map()) == d


def test_policy_parsing_refuses_floats_unknown_keys_and_nonsense() -> None:
    for bad, words in [
        ({"weights": {"work": 1.5}}, "integer or a decimal string"),
        ({"levy": 3}, "unknown entry 'levy'"),
        ({"weights": {"dance": "1"}}, "must be an action"),
        ({"cap_bps": 10_001}, "from 0 to 10000"),
        ({"order": ["debt"]}, "must list each"),
        ({"acks": {"below": "1.5"}}, "at most 1"),
        ({"weights": {"work": "-1"}}, "must not be negative"),
        ({"weights": {"work": "0.1234567"}}, "more than 6 decimals"),
        ({"ratify": {"customer": False}}, "at least one ratifying signature"),
        ({"ratify": {"roles": ["king"]}}, "ratifying roles"),
    ]:
        with pytest.raises(ValidationError, match=words):
            parse_policy(bad)
    p = parse_policy({"weights": {"work": 2, "work:hour": "1.5"}})
    assert parse_policy(p.to_map()) == p and parse_policy(p.to_map()).hash == p.hash
    assert p.weight("work", "hour") == Fraction(3, 2) and p.weight("work", "day") == 2


def test_amounts_parse_exactly_and_refuse_what_the_currency_cannot_hold() -> None:
    assert parse_amount("1200.00", "EUR", 2) == 120_000
    assert parse_amount("1200.5", "EUR", 2) == 120_050
    assert parse_amount("5000", "JPY", 0) == 5000
    assert format_minor(120_050, 2) == "1200.50" and format_minor(7, 3) == "0.007"
    for text, code, exp, words in [
        ("12.345", "EUR", 2, "has 3 decimals but EUR allows at most 2"),
        ("100.5", "JPY", 0, "JPY allows no decimals"),
        ("-5", "EUR", 2, "must not be negative"),
        ("0.00", "EUR", 2, "greater than zero"),
        ("1e5", "EUR", 2, "plain decimal"),
        ("10000000000000", "EUR", 2, "plausible limit"),
    ]:
        with pytest.raises(ValidationError, match=words):
            parse_amount(text, code, exp)


def test_malformed_stored_distributions_and_leaves_are_refused() -> None:
    d = compute_split(DEFAULT_POLICY, SplitInputs(revenue(100)))
    bad = d.to_map()
    bad["lines"] = [{**bad["lines"][0], "amount": -1}]
    with pytest.raises(DecodeError):
        Distribution.from_map(bad)
    with pytest.raises(DecodeError):
        inputs_from_leaves([{"k": "contribution", "id": b"x"}])
    with pytest.raises(DecodeError):
        inputs_from_leaves([])


def test_malformed_distributions_are_refused_under_python_dash_o() -> None:
    # Every node must refuse the same stored distributions with and without -O (no asserts).
    from optimized import refused_under_dash_o

    from valuemesh.protocol import cbor

    d = compute_split(DEFAULT_POLICY, SplitInputs(revenue(100)))
    bad = d.to_map()
    bad["lines"] = [{**bad["lines"][0], "amount": -1, "kind": "theft"}]
    assert refused_under_dash_o(
        "from valuemesh.protocol import cbor\nfrom valuemesh.protocol.accounting.split import Distribution\n",
        f"Distribution.from_map(cbor.decode(bytes.fromhex({cbor.encode(bad).hex()!r})))")
