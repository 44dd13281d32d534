"""The `sharing` record type: members offer idle things, post needs, and lend
and return them; every completed loan stays on the ledger as the lender's evidence.

Pure like every plugin: it reads the ledger through `ctx`, writes only its own
namespace, and takes time only from `ctx.now` (the consensus time of the block).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from valuemesh.plugin import (
    ApplyContext,
    AuthorizationError,
    Field,
    Plugin,
    Record,
    Route,
    StateReader,
    ValidationError,
    Version,
    text,
)

if TYPE_CHECKING:
    import click

NAME = "sharing"
DAY_MS = 86_400_000
TITLE_LEN = 120
NOTE_LEN = 1000
CATEGORY_LEN = 32

# Offer states: available -> lent -> available (after a return), or -> withdrawn.
# Need states: open -> matched -> fulfilled, or open -> withdrawn.
AVAILABLE, LENT, WITHDRAWN = "available", "lent", "withdrawn"
OPEN, MATCHED, FULFILLED = "open", "matched", "fulfilled"


def offer_key(offer: bytes) -> str:
    return f"o/{offer.hex()}"


def need_key(need: bytes) -> str:
    return f"n/{need.hex()}"


def proposal_key(offer: bytes, need: bytes) -> str:
    return f"p/{offer.hex()}/{need.hex()}"


def completed_key(return_record: bytes) -> str:
    return f"c/{return_record.hex()}"


def loan_days(since: int, returned: int) -> int:
    """Whole days a loan lasted, counting a started day as one (a same-day loan is 1)."""
    return max(1, -(-(returned - since) // DAY_MS))


def _posting() -> dict[str, Field]:
    return {
        "title": text(TITLE_LEN),
        "note": text(NOTE_LEN, required=False),
        "category": text(CATEGORY_LEN, required=False),
    }


class Sharing(Plugin):
    """Offers, needs, loans and returns inside one constellation (plugin API 2)."""

    name = NAME
    version = Version(1, 0)
    distribution = "valuemesh-sharing"
    description = "A local sharing economy: offer idle things, post needs, lend and return them."
    ops = {
        "offer": _posting(),
        "need": _posting(),
        # By the lender: the loan starts. By anyone else: a proposal the lender may confirm.
        "match": {"offer": Field("hash"), "need": Field("hash")},
        # Only the lender confirms that the thing came back.
        "return": {"offer": Field("hash"), "note": text(NOTE_LEN, required=False)},
        "withdraw": {"target": Field("hash")},
    }

    # -- validate: every refusal is decided here, so apply can trust the state --------
    def validate(self, ctx: ApplyContext, record: Record) -> None:
        b = record.body
        me = record.author.key
        if ctx.op in ("offer", "need"):
            if not b["title"].strip():
                raise ValidationError(f"An {ctx.op} needs a title that is not blank.")
            return
        if ctx.op == "withdraw":
            self._check_withdraw(ctx, b["target"], me)
            return
        offer = ctx.get(offer_key(b["offer"]))
        if offer is None:
            raise ValidationError("There is no final offer with that id.")
        if ctx.op == "return":
            if offer["lender"] != me:
                raise AuthorizationError("Only the lender can confirm that a loan was returned.")
            if offer["status"] != LENT:
                raise ValidationError("That offer is not lent out, so nothing can be returned.")
            return
        need = ctx.get(need_key(b["need"]))
        if need is None:
            raise ValidationError("There is no final need with that id.")
        if offer["status"] != AVAILABLE:
            raise ValidationError(f"That offer is {offer['status']}, not available.")
        if need["status"] != OPEN:
            raise ValidationError(f"That need is {need['status']}, not open.")
        if need["borrower"] == offer["lender"]:
            raise ValidationError("A member cannot borrow their own offer.")
        if me != offer["lender"] and ctx.get(proposal_key(b["offer"], b["need"])) is not None:
            raise ValidationError("That match is already proposed; the lender confirms it by matching it too.")

    @staticmethod
    def _check_withdraw(ctx: ApplyContext, target: bytes, me: bytes) -> None:
        offer = ctx.get(offer_key(target))
        if offer is not None:
            if offer["lender"] != me:
                raise AuthorizationError("Only the member who made an offer can withdraw it.")
            if offer["status"] != AVAILABLE:
                raise ValidationError(f"That offer is {offer['status']}; only an available offer can be withdrawn.")
            return
        need = ctx.get(need_key(target))
        if need is None:
            raise ValidationError("There is no final offer or need with that id.")
        if need["borrower"] != me:
            raise AuthorizationError("Only the member who posted a need can withdraw it.")
        if need["status"] != OPEN:
            raise ValidationError(f"That need is {need['status']}; only an open need can be withdrawn.")

    # -- apply ------------------------------------------------------------------------
    def apply(self, ctx: ApplyContext, record: Record) -> None:
        b = record.body
        me = record.author.key
        if ctx.op in ("offer", "need"):
            entry = {"title": b["title"], "note": b.get("note", ""), "category": b.get("category", ""),
                     "at": ctx.now}
            if ctx.op == "offer":
                ctx.put(offer_key(record.id), {"lender": me, **entry, "status": AVAILABLE, "loan": None,
                                               "loans": 0})
            else:
                ctx.put(need_key(record.id), {"borrower": me, **entry, "status": OPEN, "offer": None})
        elif ctx.op == "match":
            offer: dict[str, Any] = dict(ctx.get(offer_key(b["offer"])))
            if me != offer["lender"]:
                ctx.put(proposal_key(b["offer"], b["need"]), {"by": me, "at": ctx.now})
                return
            need: dict[str, Any] = dict(ctx.get(need_key(b["need"])))
            offer["status"] = LENT
            offer["loan"] = {"need": b["need"], "borrower": need["borrower"], "since": ctx.now,
                             "match": record.id}
            need["status"], need["offer"] = MATCHED, b["offer"]
            ctx.put(offer_key(b["offer"]), offer)
            ctx.put(need_key(b["need"]), need)
            self._drop_proposals(ctx, b["offer"])
        elif ctx.op == "return":
            offer = dict(ctx.get(offer_key(b["offer"])))
            loan = offer["loan"]
            need = dict(ctx.get(need_key(loan["need"])))
            ctx.put(completed_key(record.id), {
                "lender": me, "borrower": loan["borrower"], "offer": b["offer"], "need": loan["need"],
                "title": offer["title"], "since": loan["since"], "returned": ctx.now,
                "days": loan_days(loan["since"], ctx.now), "note": b.get("note", ""),
            })
            offer["status"], offer["loan"], offer["loans"] = AVAILABLE, None, offer["loans"] + 1
            need["status"] = FULFILLED
            ctx.put(offer_key(b["offer"]), offer)
            ctx.put(need_key(loan["need"]), need)
        else:  # withdraw
            key = offer_key(b["target"])
            entry = ctx.get(key)
            if entry is None:
                key = need_key(b["target"])
                entry = ctx.get(key)
            else:
                self._drop_proposals(ctx, b["target"])
            ctx.put(key, {**entry, "status": WITHDRAWN})

    @staticmethod
    def _drop_proposals(ctx: ApplyContext, offer: bytes) -> None:
        for key, _ in list(ctx.scan(NAME, f"p/{offer.hex()}/")):
            ctx.delete(key)

    # -- views ------------------------------------------------------------------------
    def views(self) -> dict[str, Any]:
        return {
            "offers": lambda s: [{"id": k[2:], **v} for k, v in s.scan(NAME, "o/")],
            "needs": lambda s: [{"id": k[2:], **v} for k, v in s.scan(NAME, "n/")],
            "proposals": _open_proposals,
            "completed": lambda s: [{"id": k[2:], **v} for k, v in s.scan(NAME, "c/")],
            "lenders": _lenders,
        }

    def examples(self) -> list[dict[str, Any]]:
        return [
            {"op": "offer", "title": "cordless drill", "note": "with two batteries", "category": "tools"},
            {"op": "need", "title": "a drill for an afternoon"},
            {"op": "match", "offer": b"\x01" * 32, "need": b"\x02" * 32},
            {"op": "return", "offer": b"\x01" * 32, "note": "came back clean"},
            {"op": "withdraw", "target": b"\x01" * 32},
        ]

    # Commands and routes live in their own modules, imported only when asked for:
    # the daemon never loads the commands, and a node applying records needs neither.
    def cli(self) -> click.Group:
        from .cli import sharing
        return sharing

    def api_routes(self) -> list[Route]:
        from .api import ROUTES
        return ROUTES


def _open_proposals(s: StateReader) -> list[dict[str, Any]]:
    out = []
    for k, v in s.scan(NAME, "p/"):
        offer_hex, need_hex = k[2:].split("/")
        offer = s.read(NAME, f"o/{offer_hex}")
        need = s.read(NAME, f"n/{need_hex}")
        # A proposal goes stale once either side is taken or withdrawn.
        if offer and need and offer["status"] == AVAILABLE and need["status"] == OPEN:
            out.append({"offer": offer_hex, "need": need_hex, **v})
    return out


def _lenders(s: StateReader) -> list[dict[str, Any]]:
    """Completed loans per lender: what the accounting may weigh as their contribution."""
    totals: dict[bytes, list[int]] = {}
    for _, c in s.scan(NAME, "c/"):
        t = totals.setdefault(c["lender"], [0, 0])
        t[0] += 1
        t[1] += c["days"]
    return [{"lender": k, "loans": n, "days": d} for k, (n, d) in sorted(totals.items())]


PLUGIN = Sharing()
