"""The revenue split: a pure function of (policy, finalised inputs) to lines in
integer minor units that sum exactly to the revenue, and its verification.

Fixed claims are paid in the policy's order until the money runs out; the
pool left is shared by score with exact rationals, capped by water-filling,
and rounded by largest remainder with ties broken by recipient key.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from .. import cbor
from ..errors import DecodeError, ValidationError
from ..ledger import StateReader
from ..records import blake2b256
from .decay import decay
from .inputs import ContributionInput, RevenueInput, SplitInputs, debt_minor, gather_inputs
from .money import format_fraction, format_minor, parse_decimal
from .splitpolicy import BPS, SplitPolicy

DISTRIBUTION_FORMAT_VERSION = 1
DISTRIBUTION_DOMAIN = b"valuemesh/distribution/v1\x00"
COMMONS = "commons"
POOL = "pool"
MAX_LINES = 4096
MAX_EXPLAIN = 1000
_LINE_KEYS = frozenset({"to", "amount", "kind", "sources", "explain", "term"})
_LINE_KINDS = frozenset({"debt", "reimbursement", "investor_return", "fee", "levy", "rebate", POOL})

Recipient = bytes | str


def recipient_order(to: Recipient) -> tuple[int, bytes]:
    """Members by key, then the commons: the tie-break of largest-remainder rounding."""
    return (0, to) if isinstance(to, bytes) else (1, to.encode())


def recipient_text(to: Recipient) -> str:
    return to.hex() if isinstance(to, bytes) else to


@dataclass(frozen=True, slots=True)
class Line:
    """One payee's share for one reason, with the records behind it and its arithmetic."""

    to: Recipient
    amount: int
    kind: str
    sources: tuple[bytes, ...]
    explain: str
    term: int | None = None  # which term of the agreement in `sources`, for term claims

    def to_map(self) -> dict[str, Any]:
        return {
            "to": self.to,
            "amount": self.amount,
            "kind": self.kind,
            "sources": list(self.sources),
            "explain": self.explain,
            "term": self.term,
        }


@dataclass(frozen=True, slots=True)
class Distribution:
    """A computed split of one revenue record; `hash` is what ratifiers sign for."""

    revenue: bytes
    currency: str
    exponent: int
    amount: int
    policy_hash: bytes
    inputs_root: bytes
    lines: tuple[Line, ...]

    def to_map(self) -> dict[str, Any]:
        return {
            "v": DISTRIBUTION_FORMAT_VERSION,
            "revenue": self.revenue,
            "currency": self.currency,
            "exp": self.exponent,
            "amount": self.amount,
            "policy": self.policy_hash,
            "root": self.inputs_root,
            "lines": [ln.to_map() for ln in self.lines],
        }

    @property
    def hash(self) -> bytes:
        return blake2b256(DISTRIBUTION_DOMAIN + cbor.encode(self.to_map()))

    def totals(self) -> dict[Recipient, int]:
        """Minor units per recipient over all their lines."""
        out: dict[Recipient, int] = {}
        for ln in self.lines:
            out[ln.to] = out.get(ln.to, 0) + ln.amount
        return out

    def to_json(self) -> dict[str, Any]:
        """The versioned JSON shape that users script against (hex ids, decimal amounts)."""

        def money(m: int) -> str:
            return format_minor(m, self.exponent)

        return {
            "format": DISTRIBUTION_FORMAT_VERSION,
            "hash": self.hash.hex(),
            "revenue": self.revenue.hex(),
            "currency": self.currency,
            "amount": money(self.amount),
            "amount_minor": self.amount,
            "policy": self.policy_hash.hex(),
            "inputs_root": self.inputs_root.hex(),
            "lines": [
                {
                    "to": recipient_text(ln.to),
                    "amount": money(ln.amount),
                    "amount_minor": ln.amount,
                    "kind": ln.kind,
                    "sources": [s.hex() for s in ln.sources],
                    "term": ln.term,
                    "explain": ln.explain,
                }
                for ln in self.lines
            ],
        }

    @classmethod
    def from_map(cls, m: object) -> Distribution:
        """Rebuild a distribution from its map form; raise DecodeError if malformed."""
        # Explicit checks, not `assert`: under `python -O` asserts vanish and nodes would diverge.
        _dist_ok(isinstance(m, dict) and m.get("v") == DISTRIBUTION_FORMAT_VERSION)
        assert isinstance(m, dict)  # narrowing for the type checker; checked just above
        _dist_ok(set(m) == {"v", "revenue", "currency", "exp", "amount", "policy", "root", "lines"})
        for k in ("revenue", "policy", "root"):
            _dist_ok(isinstance(m[k], bytes) and len(m[k]) == 32)
        _dist_ok(isinstance(m["currency"], str) and isinstance(m["exp"], int))
        _dist_ok(isinstance(m["amount"], int) and m["amount"] > 0)
        _dist_ok(isinstance(m["lines"], list) and len(m["lines"]) <= MAX_LINES)
        lines = []
        for ln in m["lines"]:
            _dist_ok(isinstance(ln, dict) and set(ln) == _LINE_KEYS)
            to, term, sources = ln["to"], ln["term"], ln["sources"]
            _dist_ok((isinstance(to, bytes) and len(to) == 32) or to == COMMONS)
            _dist_ok(isinstance(ln["amount"], int) and ln["amount"] > 0)
            _dist_ok(isinstance(ln["kind"], str) and ln["kind"] in _LINE_KINDS)
            _dist_ok(isinstance(sources, list) and all(isinstance(s, bytes) and len(s) == 32 for s in sources))
            _dist_ok(isinstance(ln["explain"], str) and len(ln["explain"]) <= MAX_EXPLAIN)
            _dist_ok(term is None or (isinstance(term, int) and 0 <= term < MAX_LINES))
            lines.append(Line(to, ln["amount"], ln["kind"], tuple(sources), ln["explain"], term))
        return cls(
            m["revenue"], m["currency"], m["exp"], m["amount"], m["policy"], m["root"], tuple(lines)
        )


def _dist_ok(cond: bool) -> None:
    if not cond:
        raise DecodeError("The distribution is malformed.")


@dataclass(frozen=True, slots=True)
class Score:
    """How one contribution scores under a policy, factor by factor."""

    contribution: bytes
    provider: bytes
    weight: Fraction
    quantity: Fraction
    ack_factor: Fraction
    dispute_factor: Fraction
    payback_factor: Fraction
    decay: Fraction
    value: Fraction  # the product of the six factors above

    def explain(self) -> str:
        f = format_fraction
        return (
            f"{f(self.weight)} weight * {f(self.quantity)} * ack {f(self.ack_factor)} * dispute "
            f"{f(self.dispute_factor)} * payback {f(self.payback_factor)} * decay {f(self.decay)} "
            f"= {f(self.value)}"
        )


def _recognised(policy: SplitPolicy, c: ContributionInput) -> tuple[Fraction, Fraction]:
    ack = Fraction(1) if len(c.acks) >= policy.acks_required else policy.below_acks_factor
    dispute = (
        policy.disputed_factor if len(c.disputes) >= policy.disputes_threshold else Fraction(1)
    )
    return ack, dispute


def score(policy: SplitPolicy, c: ContributionInput, revenue: RevenueInput) -> Score:
    ack, dispute = _recognised(policy, c)
    factors = (
        policy.weight(c.action, c.unit),
        parse_decimal(c.quantity),
        ack,
        dispute,
        policy.payback_factor(c.payback),
        decay(revenue.at - c.at, policy.half_life_ms),
    )
    value = Fraction(0)
    if all(factors):
        value = factors[0] * factors[1] * factors[2] * factors[3] * factors[4] * factors[5]
    return Score(c.id, c.provider, *factors, value)


def _is_debt(policy: SplitPolicy, c: ContributionInput, revenue: RevenueInput) -> bool:
    return policy.debts and debt_minor(c, revenue) is not None


def pool_scores(policy: SplitPolicy, inputs: SplitInputs) -> list[Score]:
    """Scores of the contributions that share the pool, sorted by contribution id."""
    rev = inputs.revenue
    out = []
    for c in sorted(inputs.contributions, key=lambda c: c.id):
        if c.at > rev.at or _is_debt(policy, c, rev):
            continue
        s = score(policy, c, rev)
        if s.value > 0:
            out.append(s)
    return out


@dataclass(frozen=True, slots=True)
class _Claim:
    to: Recipient
    owed: int
    sources: tuple[bytes, ...]
    what: str
    term: int | None = None


def _claims(policy: SplitPolicy, kind: str, inputs: SplitInputs) -> Iterator[_Claim]:
    """Each fixed claim of `kind` with what it is owed now, in payment order."""
    rev = inputs.revenue

    def fmt(m: int) -> str:
        return format_minor(m, rev.exponent)

    if kind == "levy":
        owed = rev.amount * policy.levy_bps // BPS
        yield _Claim(
            COMMONS,
            owed,
            (rev.id,),
            f"commons levy {policy.levy_bps} bps of {fmt(rev.amount)} = {fmt(owed)}",
        )
        return
    if kind == "debt":
        if not policy.debts:
            return
        for c in sorted(inputs.contributions, key=lambda c: (c.at, c.id)):
            total = debt_minor(c, rev)
            if total is None or c.at > rev.at:
                continue
            ack, dispute = _recognised(policy, c)
            if ack < 1 or dispute < 1:
                continue  # an unacknowledged or disputed debt is not yet owed
            yield _Claim(
                c.provider,
                total - c.paid,
                (c.id,),
                f"debt-like contribution of {c.quantity} {c.unit}: {fmt(total)} lent, "
                f"{fmt(c.paid)} repaid before, {fmt(total - c.paid)} owed",
            )
        return
    for t in sorted(
        (t for t in inputs.terms if t.kind == kind), key=lambda t: (t.at, t.agreement, t.index)
    ):
        where = f"{kind.replace('_', ' ')} of agreement {t.agreement.hex()[:12]} term {t.index}"
        if t.amount is not None:
            yield _Claim(
                t.to,
                t.amount - t.paid,
                (t.agreement,),
                f"{where}: {fmt(t.amount)} agreed, {fmt(t.paid)} paid before, "
                f"{fmt(t.amount - t.paid)} owed",
                t.index,
            )
        else:
            bps = t.bps or 0
            owed = rev.amount * bps // BPS
            text = f"{where}: {bps} bps of {fmt(rev.amount)} = {fmt(owed)}"
            if t.cap is not None and owed > t.cap - t.paid:
                owed = max(0, t.cap - t.paid)
                text += (
                    f", limited by the cap {fmt(t.cap)} with {fmt(t.paid)} paid before "
                    f"to {fmt(owed)}"
                )
            yield _Claim(t.to, owed, (t.agreement,), text, t.index)


def _capped_shares(weights: Mapping[bytes, Fraction], cap_bps: int) -> dict[Recipient, Fraction]:
    """Shares of 1 proportional to `weights`, none above the cap.

    What the cap keeps from every member goes to the commons.
    """
    if cap_bps == 0 or cap_bps == BPS:
        total = sum(weights.values(), Fraction(0))
        return {k: w / total for k, w in weights.items()}
    cap = Fraction(cap_bps, BPS)
    fixed: dict[Recipient, Fraction] = {}
    free = dict(weights)
    budget = Fraction(1)
    # Each pass caps at least one more member, so this ends within len(weights) passes.
    for _ in range(len(weights) + 1):
        total = sum(free.values(), Fraction(0))
        over = [k for k, w in free.items() if budget * w / total > cap]
        if not over:
            fixed.update({k: budget * w / total for k, w in free.items()})
            break
        for k in over:
            fixed[k] = cap
            budget -= cap
            del free[k]
        if not free:
            break
    leftover = 1 - sum(fixed.values(), Fraction(0))
    if leftover > 0:
        fixed[COMMONS] = leftover
    return fixed


def largest_remainder(exact: Mapping[Recipient, Fraction], total: int) -> dict[Recipient, int]:
    """Integers summing to `total`, each the floor of its exact share or one more.

    The units left after flooring go to the largest fractional parts; equal
    parts are ordered by recipient (members by key, the commons last).
    """
    base = {k: v.numerator // v.denominator for k, v in exact.items()}
    left = total - sum(base.values())
    order = sorted(exact, key=lambda k: (-(exact[k] - base[k]), recipient_order(k)))
    if not 0 <= left <= len(order):
        raise ValidationError("The exact shares do not add up to the amount.")
    for k in order[:left]:
        base[k] += 1
    return base


def compute_split(policy: SplitPolicy, inputs: SplitInputs) -> Distribution:
    """Split `inputs.revenue` under `policy`. Pure and deterministic: same inputs, same lines."""
    rev = inputs.revenue

    def fmt(m: int) -> str:
        return format_minor(m, rev.exponent)

    remaining = rev.amount
    lines: list[Line] = []
    for kind in policy.order:
        for c in _claims(policy, kind, inputs):
            take = min(max(c.owed, 0), remaining)
            if take == 0:
                continue
            remaining -= take
            note = "" if take == c.owed else f"; only {fmt(take)} was left, the rest stays owed"
            lines.append(Line(c.to, take, kind, c.sources, (c.what + note)[:MAX_EXPLAIN], c.term))
    if remaining > 0:
        lines.extend(_pool_lines(policy, inputs, remaining))
    return Distribution(
        rev.id, rev.currency, rev.exponent, rev.amount, policy.hash, inputs.root(), tuple(lines)
    )


def _pool_lines(policy: SplitPolicy, inputs: SplitInputs, pool: int) -> list[Line]:
    exp = inputs.revenue.exponent
    scores = pool_scores(policy, inputs)
    by_member: dict[bytes, Fraction] = {}
    sources: dict[Recipient, list[bytes]] = {}
    for s in scores:
        by_member[s.provider] = by_member.get(s.provider, Fraction(0)) + s.value
        sources.setdefault(s.provider, []).append(s.contribution)
    total = sum(by_member.values(), Fraction(0))
    shares: dict[Recipient, Fraction] = (
        _capped_shares(by_member, policy.cap_bps) if by_member else {COMMONS: Fraction(1)}
    )
    exact = {k: share * pool for k, share in shares.items()}
    rounded = largest_remainder(exact, pool)
    out = []
    for k in sorted(rounded, key=recipient_order):
        if rounded[k] == 0:
            continue
        if k == COMMONS:
            why = (
                "no contribution scores under this policy"
                if not by_member
                else "the part of the pool the cap kept from every member"
            )
            text = f"pool {format_minor(pool, exp)}: {why}"
        else:
            assert isinstance(k, bytes)
            text = (
                f"pool {format_minor(pool, exp)} * score {format_fraction(by_member[k])} of "
                f"{format_fraction(total)} from {len(sources[k])} contribution(s)"
            )
            natural = by_member[k] / total
            if shares[k] < natural:
                text += f", capped at {policy.cap_bps} bps"
            elif shares[k] > natural:
                text += ", raised by what the cap kept from others"
        text += f" = {format_fraction(exact[k] / 10**exp, exp + 4)} exact"
        diff = rounded[k] - exact[k]
        if diff > 0:
            text += ", rounded up by largest remainder"
        elif diff < 0:
            text += ", rounded down"
        out.append(Line(k, rounded[k], POOL, tuple(sources.get(k, ())), text[:MAX_EXPLAIN]))
    return out


def verify(distribution: Distribution, inputs: SplitInputs, policy: SplitPolicy) -> None:
    """Recompute the split and raise ValidationError at the first difference."""
    if distribution.policy_hash != policy.hash:
        raise ValidationError(
            "The distribution was computed under another policy than the one given."
        )
    if distribution.revenue != inputs.revenue.id:
        raise ValidationError("The distribution is of another revenue record than the inputs.")
    if distribution.inputs_root != inputs.root():
        raise ValidationError("The inputs do not hash to the distribution's Merkle root.")
    if sum(ln.amount for ln in distribution.lines) != distribution.amount:
        raise ValidationError("The distribution's lines do not add up to its amount.")
    fresh = compute_split(policy, inputs)
    for attr in ("currency", "exponent", "amount"):
        if getattr(fresh, attr) != getattr(distribution, attr):
            raise ValidationError(f"The distribution's {attr} does not match its revenue.")
    if len(fresh.lines) != len(distribution.lines):
        raise ValidationError(
            f"The distribution has {len(distribution.lines)} lines; "
            f"recomputing gives {len(fresh.lines)}."
        )
    for i, (got, want) in enumerate(zip(distribution.lines, fresh.lines, strict=True)):
        if got != want:
            raise ValidationError(
                f"Line {i + 1} ({recipient_text(got.to)[:12]}, {got.kind}) says "
                f"{format_minor(got.amount, fresh.exponent)}; recomputing gives "
                f"{format_minor(want.amount, fresh.exponent)} to {recipient_text(want.to)[:12]} "
                f"({want.kind})."
            )
    if fresh.hash != distribution.hash:
        raise ValidationError("The distribution differs from its recomputation.")


def try_policy(state: StateReader, revenue_id: bytes, policy: SplitPolicy) -> Distribution:
    """Split a revenue on the real ledger under any policy, adopting nothing.

    This is "try before voting": members see a proposal's effect on real figures.
    """
    return compute_split(policy, gather_inputs(state, revenue_id))
