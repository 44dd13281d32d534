"""The `agreement` plugin: fixed terms between parties (a price, reimbursements,
fees, an investor's return, a customer's rebate), final once every party signed.

State: `a/<record id hex>` per agreement, with its terms in integer minor units,
its parties, who has signed and its status (proposed, final or withdrawn).
"""

from __future__ import annotations

from typing import Any

from ..errors import AuthorizationError, ValidationError
from ..ledger import ApplyContext, StateReader
from ..plugins import Field, Plugin, Version, integer, text
from ..records import Record
from .inputs import AGREEMENT_NS, TERM_KINDS
from .money import MAX_AMOUNT_TEXT, currency_exponent, parse_amount
from .splitpolicy import BPS

MAX_PARTIES = 32
MAX_TERMS = 32
APPLIES = ("linked", "all")

_term = Field(
    "map",
    fields={
        "kind": text(32, choices=TERM_KINDS),
        "to": Field("member", required=False),
        "amount": text(MAX_AMOUNT_TEXT, required=False),
        "bps": integer(1, BPS, required=False),
        "cap": text(MAX_AMOUNT_TEXT, required=False),
        "note": text(200, required=False),
    },
)


def _agreement(ctx: ApplyContext, aid: bytes) -> dict[str, Any]:
    a = ctx.get(f"a/{aid.hex()}")
    if not isinstance(a, dict):
        raise ValidationError("There is no agreement with that id.")
    return a


def _open_for(ctx: ApplyContext, record: Record) -> dict[str, Any]:
    """The agreement a sign/withdraw names, if the author is a party and it is still open."""
    a = _agreement(ctx, record.body["agreement"])
    if a["status"] != "proposed":
        raise ValidationError(f"The agreement is already {a['status']}.")
    if record.author.key not in a["parties"]:
        raise AuthorizationError(f"{record.author.short}… is not a party to this agreement.")
    return a


def _terms(body: dict[str, Any], code: str, exp: int, parties: list[bytes]) -> list[dict[str, Any]]:
    out = []
    total_bps = 0
    for i, t in enumerate(body["terms"]):
        where = f"Term {i + 1} ({t['kind']})"
        has_amount, has_bps = "amount" in t, "bps" in t
        if t["kind"] == "price":
            if not has_amount or has_bps or "cap" in t or "to" in t:
                raise ValidationError(f"{where} must state an amount and nothing else.")
        else:
            if "to" not in t:
                raise ValidationError(f"{where} must name the party it is owed to.")
            if t["to"] not in parties:
                raise ValidationError(f"{where} is owed to someone who is not a party.")
            if has_amount == has_bps:
                raise ValidationError(f"{where} needs either a fixed amount or bps, not both.")
            if "cap" in t and not has_bps:
                raise ValidationError(f"{where} may have a cap only with bps.")
            total_bps += t.get("bps", 0)
        out.append(
            {
                "kind": t["kind"],
                "to": t.get("to"),
                "amount": parse_amount(t["amount"], code, exp) if has_amount else None,
                "bps": t.get("bps"),
                "cap": parse_amount(t["cap"], code, exp) if "cap" in t else None,
                "note": t.get("note", ""),
            }
        )
    if total_bps > BPS:
        raise ValidationError("The terms together take more than the whole of each revenue.")
    return out


class Agreement(Plugin):
    name = "agreement"
    version = Version(1, 0)
    description = "Fixed terms between parties, final once every party has signed."
    ops = {
        "propose": {
            "title": text(200),
            "parties": Field("list", item=Field("member"), max=MAX_PARTIES),
            "terms": Field("list", item=_term, max=MAX_TERMS),
            "currency": text(8),
            "exponent": integer(0, 8, required=False),
            "customer": Field("member", required=False),
            "applies": text(8, required=False, choices=APPLIES),
            "note": text(1000, required=False),
        },
        "sign": {"agreement": Field("hash")},
        "withdraw": {"agreement": Field("hash"), "reason": text(500, required=False)},
    }

    def validate(self, ctx: ApplyContext, record: Record) -> None:
        b = record.body
        if ctx.op == "propose":
            exp = currency_exponent(b["currency"], b.get("exponent"))
            parties = b["parties"]
            if len(parties) < 2 or len(set(parties)) != len(parties):
                raise ValidationError("An agreement needs at least two distinct parties.")
            if record.author.key not in parties:
                raise ValidationError(
                    "The member proposing an agreement must be one of its parties."
                )
            for p in parties:
                if not ctx.is_active(p):
                    raise ValidationError("Every party to an agreement must be an active member.")
            if "customer" in b and b["customer"] not in parties:
                raise ValidationError("The agreement's customer must be one of its parties.")
            if not b["terms"]:
                raise ValidationError("An agreement needs at least one term.")
            _terms(dict(b), b["currency"], exp, parties)
        elif ctx.op == "sign":
            a = _open_for(ctx, record)
            if record.author.key in a["signed"]:
                raise ValidationError("You already signed this agreement.")
        else:
            _open_for(ctx, record)

    def apply(self, ctx: ApplyContext, record: Record) -> None:
        b = record.body
        if ctx.op == "propose":
            exp = currency_exponent(b["currency"], b.get("exponent"))
            # The proposal is the proposer's signature: it is a record they signed.
            ctx.put(
                f"a/{record.id.hex()}",
                {
                    "proposer": record.author.key,
                    "title": b["title"],
                    "parties": sorted(b["parties"]),
                    "customer": b.get("customer"),
                    "currency": b["currency"],
                    "exponent": exp,
                    "applies": b.get("applies", "linked"),
                    "terms": _terms(dict(b), b["currency"], exp, b["parties"]),
                    "note": b.get("note", ""),
                    "signed": [record.author.key],
                    "status": "proposed",
                    "at": ctx.now,
                    "final_at": None,
                },
            )
            return
        key = f"a/{b['agreement'].hex()}"
        a = dict(ctx.get(key))
        if ctx.op == "sign":
            a["signed"] = sorted([*a["signed"], record.author.key])
            if set(a["signed"]) == set(a["parties"]):
                a["status"] = "final"
                a["final_at"] = ctx.now
        else:
            a["status"] = "withdrawn"
            a["withdrawn_by"] = record.author.key
        ctx.put(key, a)

    def views(self) -> dict[str, Any]:
        def agreements(state: StateReader) -> list[dict[str, Any]]:
            return [{"id": k[2:], **v} for k, v in state.scan(AGREEMENT_NS, "a/")]

        return {"agreements": agreements}

    def examples(self) -> list[dict[str, Any]]:
        a, b = b"\x01" * 32, b"\x02" * 32
        return [
            {
                "op": "propose",
                "title": "Website for the bakery",
                "parties": [a, b],
                "currency": "EUR",
                "customer": b,
                "terms": [
                    {"kind": "price", "amount": "1200.00"},
                    {"kind": "reimbursement", "to": a, "amount": "80.00"},
                    {"kind": "fee", "to": a, "bps": 500},
                ],
            },
            {"op": "sign", "agreement": b"\x07" * 32},
            {"op": "withdraw", "agreement": b"\x07" * 32, "reason": "terms changed"},
        ]


PLUGIN = Agreement()
