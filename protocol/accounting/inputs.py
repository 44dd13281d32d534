"""The finalised ledger facts a revenue split depends on, as frozen inputs with
a canonical order and a Merkle root, and how to read them from ledger state.

A split is a pure function of these inputs and a policy; gathering them from
the state is the only place the accounting code looks at the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import DecodeError, ValidationError
from ..ledger import StateReader
from .merkle import merkle_root
from .money import parse_decimal, to_minor_floor
from .splitpolicy import DEFAULT_POLICY, SplitPolicy, parse_policy

AGREEMENT_NS = "agreement"
REVENUE_NS = "revenue"
POLICY_NS = "policy"
DISTRIBUTION_NS = "distribution"
CONTRIBUTION_NS = "contribution"
TERM_KINDS = ("price", "reimbursement", "fee", "investor_return", "rebate")


def paid_term_key(agreement: bytes, index: int) -> str:
    return f"paid/t/{agreement.hex()}/{index}"


def paid_debt_key(contribution: bytes) -> str:
    return f"paid/c/{contribution.hex()}"


@dataclass(frozen=True, slots=True)
class RevenueInput:
    """The revenue being split: integer minor units of one currency."""

    id: bytes
    amount: int
    currency: str
    exponent: int
    customer: bytes
    agreement: bytes | None
    at: int

    def leaf(self) -> dict[str, Any]:
        return {
            "k": "revenue",
            "id": self.id,
            "amount": self.amount,
            "currency": self.currency,
            "exp": self.exponent,
            "customer": self.customer,
            "agreement": self.agreement,
            "at": self.at,
        }


@dataclass(frozen=True, slots=True)
class TermInput:
    """One fixed term of a final agreement, with what final distributions already paid on it.

    A term has either a fixed `amount` (owed once, paid across revenues until
    repaid) or `bps` of each revenue (optionally up to a total `cap`).
    """

    agreement: bytes
    index: int
    kind: str
    to: bytes
    amount: int | None
    bps: int | None
    cap: int | None
    paid: int
    at: int

    def leaf(self) -> dict[str, Any]:
        return {
            "k": "term",
            "id": self.agreement,
            "i": self.index,
            "kind": self.kind,
            "to": self.to,
            "amount": self.amount,
            "bps": self.bps,
            "cap": self.cap,
            "paid": self.paid,
            "at": self.at,
        }


@dataclass(frozen=True, slots=True)
class ContributionInput:
    """One final contribution as it stands, with acknowledgements, disputes and debt repaid."""

    id: bytes
    provider: bytes
    action: str
    quantity: str
    unit: str
    payback: str
    acks: tuple[bytes, ...]
    disputes: tuple[bytes, ...]
    at: int
    paid: int = 0

    def leaf(self) -> dict[str, Any]:
        return {
            "k": "contribution",
            "id": self.id,
            "provider": self.provider,
            "action": self.action,
            "quantity": self.quantity,
            "unit": self.unit,
            "payback": self.payback,
            "acks": sorted(self.acks),
            "disputes": sorted(self.disputes),
            "at": self.at,
            "paid": self.paid,
        }


@dataclass(frozen=True, slots=True)
class SplitInputs:
    """Everything a split reads. Order of the tuples does not matter: leaves are sorted."""

    revenue: RevenueInput
    terms: tuple[TermInput, ...] = ()
    contributions: tuple[ContributionInput, ...] = ()

    def leaves(self) -> list[dict[str, Any]]:
        terms = sorted(self.terms, key=lambda t: (t.agreement, t.index))
        contribs = sorted(self.contributions, key=lambda c: c.id)
        return [self.revenue.leaf(), *(t.leaf() for t in terms), *(c.leaf() for c in contribs)]

    def root(self) -> bytes:
        return merkle_root(self.leaves())


def current_policy(state: StateReader) -> tuple[SplitPolicy, bytes | None]:
    """The adopted split policy and the proposal that adopted it (None: the default)."""
    cur = state.read(POLICY_NS, "current")
    if not isinstance(cur, dict):
        return DEFAULT_POLICY, None
    return parse_policy(cur["policy"]), cur["proposal"]


def _term_inputs(state: StateReader, agreement_id: bytes, a: dict[str, Any]) -> list[TermInput]:
    out = []
    for i, t in enumerate(a["terms"]):
        if t["kind"] == "price":
            continue
        paid = state.read(DISTRIBUTION_NS, paid_term_key(agreement_id, i)) or 0
        out.append(
            TermInput(
                agreement_id,
                i,
                t["kind"],
                t["to"],
                t.get("amount"),
                t.get("bps"),
                t.get("cap"),
                paid,
                a["final_at"],
            )
        )
    return out


def gather_inputs(state: StateReader, revenue_id: bytes) -> SplitInputs:
    """Read the final facts that a split of `revenue_id` depends on, as of now."""
    r = state.read(REVENUE_NS, f"r/{revenue_id.hex()}")
    if not isinstance(r, dict):
        raise ValidationError("There is no final revenue record with that id.")
    revenue = RevenueInput(
        revenue_id,
        r["amount"],
        r["currency"],
        r["exponent"],
        r["customer"],
        r["agreement"],
        r["at"],
    )
    terms: list[TermInput] = []
    for key, a in state.scan(AGREEMENT_NS, "a/"):
        aid = bytes.fromhex(key[2:])
        if a["status"] != "final" or a["currency"] != revenue.currency:
            continue
        linked = revenue.agreement == aid
        general = a["applies"] == "all" and a["final_at"] <= revenue.at
        if linked or general:
            terms.extend(_term_inputs(state, aid, a))
    contributions: list[ContributionInput] = []
    for key, c in state.scan(CONTRIBUTION_NS, "c/"):
        if c["at"] > revenue.at:
            continue  # work recorded after the income did not earn it
        cid = bytes.fromhex(key[2:])
        paid = state.read(DISTRIBUTION_NS, paid_debt_key(cid)) or 0
        contributions.append(
            ContributionInput(
                cid,
                c["provider"],
                c["action"],
                c["quantity"],
                c["unit"],
                c["payback"],
                tuple(c["acks"]),
                tuple(d[0] for d in c["disputes"]),
                c["at"],
                paid,
            )
        )
    return SplitInputs(revenue, tuple(terms), tuple(contributions))


def debt_minor(c: ContributionInput, revenue: RevenueInput) -> int | None:
    """Minor units a debt-like contribution in the revenue's currency is owed in total."""
    if c.payback != "debt-like" or c.unit != revenue.currency:
        return None
    return to_minor_floor(parse_decimal(c.quantity), revenue.exponent)


def _leaf_ok(cond: bool) -> None:
    if not cond:
        raise DecodeError("A split input leaf is malformed.")


def _is_key(v: object) -> bool:
    return isinstance(v, bytes) and len(v) == 32


def _is_uint(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def inputs_from_leaves(leaves: object) -> SplitInputs:
    """Rebuild inputs from their leaf maps (as a distribution carries them); DecodeError if bad."""
    _leaf_ok(isinstance(leaves, list) and 0 < len(leaves) <= MAX_LEAVES)
    assert isinstance(leaves, list)
    terms: list[TermInput] = []
    contributions: list[ContributionInput] = []
    revenue: RevenueInput | None = None
    for leaf in leaves:
        _leaf_ok(isinstance(leaf, dict) and isinstance(leaf.get("k"), str))
        kind = leaf["k"]
        if kind == "revenue" and revenue is None:
            _leaf_ok(set(leaf) == _REVENUE_LEAF)
            _leaf_ok(_is_key(leaf["id"]) and _is_key(leaf["customer"]))
            _leaf_ok(leaf["agreement"] is None or _is_key(leaf["agreement"]))
            _leaf_ok(all(_is_uint(leaf[k]) for k in ("amount", "exp", "at")))
            _leaf_ok(isinstance(leaf["currency"], str) and leaf["amount"] > 0)
            revenue = RevenueInput(
                leaf["id"],
                leaf["amount"],
                leaf["currency"],
                leaf["exp"],
                leaf["customer"],
                leaf["agreement"],
                leaf["at"],
            )
        elif kind == "term":
            _leaf_ok(set(leaf) == _TERM_LEAF and leaf["kind"] in TERM_KINDS)
            _leaf_ok(_is_key(leaf["id"]) and _is_key(leaf["to"]))
            _leaf_ok(all(_is_uint(leaf[k]) for k in ("i", "paid", "at")))
            _leaf_ok(all(leaf[k] is None or _is_uint(leaf[k]) for k in ("amount", "bps", "cap")))
            terms.append(
                TermInput(
                    leaf["id"],
                    leaf["i"],
                    leaf["kind"],
                    leaf["to"],
                    leaf["amount"],
                    leaf["bps"],
                    leaf["cap"],
                    leaf["paid"],
                    leaf["at"],
                )
            )
        elif kind == "contribution":
            _leaf_ok(set(leaf) == _CONTRIBUTION_LEAF)
            _leaf_ok(_is_key(leaf["id"]) and _is_key(leaf["provider"]))
            _leaf_ok(
                all(isinstance(leaf[k], str) for k in ("action", "quantity", "unit", "payback"))
            )
            _leaf_ok(_is_uint(leaf["at"]) and _is_uint(leaf["paid"]))
            for k in ("acks", "disputes"):
                _leaf_ok(isinstance(leaf[k], list) and all(_is_key(x) for x in leaf[k]))
            try:
                parse_decimal(leaf["quantity"])
            except ValidationError:
                raise DecodeError("A split input leaf is malformed.") from None
            contributions.append(
                ContributionInput(
                    leaf["id"],
                    leaf["provider"],
                    leaf["action"],
                    leaf["quantity"],
                    leaf["unit"],
                    leaf["payback"],
                    tuple(leaf["acks"]),
                    tuple(leaf["disputes"]),
                    leaf["at"],
                    leaf["paid"],
                )
            )
        else:
            raise DecodeError("A split input leaf is of an unknown kind or repeats the revenue.")
    if revenue is None:
        raise DecodeError("The split inputs lack their revenue.")
    return SplitInputs(revenue, tuple(terms), tuple(contributions))


MAX_LEAVES = 100_000
_REVENUE_LEAF = frozenset({"k", "id", "amount", "currency", "exp", "customer", "agreement", "at"})
_TERM_LEAF = frozenset({"k", "id", "i", "kind", "to", "amount", "bps", "cap", "paid", "at"})
_CONTRIBUTION_LEAF = frozenset(
    {
        "k",
        "id",
        "provider",
        "action",
        "quantity",
        "unit",
        "payback",
        "acks",
        "disputes",
        "at",
        "paid",
    }
)
