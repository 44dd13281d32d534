"""The `revenue` plugin: income from a customer, in integer minor units of a
currency, optionally linked to the final agreement it realises.

State: `r/<record id hex>` per revenue record; the distribution plugin splits it.
"""

from __future__ import annotations

from typing import Any

from ..errors import ValidationError
from ..ledger import ApplyContext, StateReader
from ..plugins import Field, Plugin, Version, integer, text
from ..records import Record
from .inputs import AGREEMENT_NS, REVENUE_NS
from .money import MAX_AMOUNT_TEXT, MAX_EXPONENT, currency_exponent, parse_amount


class Revenue(Plugin):
    name = "revenue"
    version = Version(1, 0)
    description = "Income from a customer, linked to the agreement it realises."
    ops = {
        "record": {
            "amount": text(MAX_AMOUNT_TEXT),
            "currency": text(8),
            "exponent": integer(0, MAX_EXPONENT, required=False),
            "customer": Field("member", required=False),
            "agreement": Field("hash", required=False),
            "note": text(1000, required=False),
        },
    }

    def _parsed(self, ctx: ApplyContext, record: Record) -> dict[str, Any]:
        b = record.body
        exp = currency_exponent(b["currency"], b.get("exponent"))
        amount = parse_amount(b["amount"], b["currency"], exp)
        customer = b.get("customer", record.author.key)
        if not ctx.is_active(customer):
            raise ValidationError("The customer named is not an active member.")
        aid = b.get("agreement")
        if aid is not None:
            a = ctx.read(AGREEMENT_NS, f"a/{aid.hex()}")
            if not isinstance(a, dict):
                raise ValidationError("The revenue names an agreement that does not exist.")
            if a["status"] != "final":
                raise ValidationError(
                    "The revenue names an agreement that is not final (signed by all)."
                )
            if a["currency"] != b["currency"]:
                raise ValidationError(f"The agreement is in {a['currency']}, not {b['currency']}.")
            if a["customer"] is not None and a["customer"] != customer:
                raise ValidationError("The revenue's customer is not the agreement's customer.")
        return {
            "recorder": record.author.key,
            "customer": customer,
            "amount": amount,
            "currency": b["currency"],
            "exponent": exp,
            "agreement": aid,
            "note": b.get("note", ""),
            "at": ctx.now,
        }

    def validate(self, ctx: ApplyContext, record: Record) -> None:
        self._parsed(ctx, record)

    def apply(self, ctx: ApplyContext, record: Record) -> None:
        ctx.put(f"r/{record.id.hex()}", self._parsed(ctx, record))

    def views(self) -> dict[str, Any]:
        def revenues(state: StateReader) -> list[dict[str, Any]]:
            return [{"id": k[2:], **v} for k, v in state.scan(REVENUE_NS, "r/")]

        return {"revenues": revenues}

    def examples(self) -> list[dict[str, Any]]:
        return [
            {"op": "record", "amount": "1200.00", "currency": "EUR"},
            {
                "op": "record",
                "amount": "5000",
                "currency": "JPY",
                "customer": b"\x02" * 32,
                "agreement": b"\x07" * 32,
                "note": "first instalment",
            },
            {"op": "record", "amount": "12.5", "currency": "HOURS", "exponent": 1},
        ]


PLUGIN = Revenue()
