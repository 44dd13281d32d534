"""The `contribution` plugin: ValueFlows-style economic events that members
record, and that other members acknowledge, dispute or that the poster amends.

State: `c/<record id hex>` per contribution with its acknowledgements and
disputes, which the accounting plugins read to weigh contributions.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from ..errors import AuthorizationError, ValidationError
from ..ledger import ApplyContext
from ..plugins import Field, Plugin, Version, integer, text
from ..records import Record

ACTIONS = ("work", "use", "consume", "cite", "transfer", "deliver-service", "produce")
PAYBACK = ("once", "debt-like", "equity-like", "gift")
MAX_QUANTITY = Decimal(1_000_000_000)

_evidence = Field("map", required=False, fields={"uri": text(512), "hash": Field("hash")})
_period = Field("map", required=False, fields={"start": integer(0), "end": integer(0)})


def check_quantity(q: str) -> Decimal:
    value = Decimal(q)
    if value <= 0:
        raise ValidationError("A quantity must be greater than zero.")
    if value > MAX_QUANTITY:
        raise ValidationError(f"A quantity over {MAX_QUANTITY} is not plausible.")
    return value


class Contribution(Plugin):
    name = "contribution"
    version = Version(1, 0)
    description = "Who contributed what: work, resources, capital; acknowledged or disputed by peers."
    ops = {
        "record": {
            "action": text(32, choices=ACTIONS),
            "quantity": Field("decimal"),
            "unit": text(32),
            "note": text(1000, required=False),
            "period": _period,
            "evidence": _evidence,
            "payback": text(16, required=False, choices=PAYBACK),
            "provider": Field("member", required=False),
        },
        "ack": {"target": Field("hash")},
        "dispute": {"target": Field("hash"), "reason": text(500)},
        "amend": {
            "target": Field("hash"),
            "quantity": Field("decimal", required=False),
            "unit": text(32, required=False),
            "note": text(1000, required=False),
        },
    }

    def validate(self, ctx: ApplyContext, record: Record) -> None:
        b = record.body
        if ctx.op == "record":
            check_quantity(b["quantity"])
            if not b["unit"].strip():
                raise ValidationError("A contribution needs a unit.")
            p = b.get("period")
            if p is not None and p["end"] < p["start"]:
                raise ValidationError("A period must not end before it starts.")
            provider = b.get("provider", record.author.key)
            if provider != record.author.key and not ctx.is_active(provider):
                raise ValidationError("The provider named is not an active member.")
            return
        target = ctx.get(f"c/{b['target'].hex()}")
        if target is None:
            raise ValidationError("There is no final contribution with that id.")
        if ctx.op == "amend":
            if target["poster"] != record.author.key:
                raise AuthorizationError("Only the member who recorded a contribution can amend it.")
            if "quantity" in b:
                check_quantity(b["quantity"])
            if "unit" in b and not b["unit"].strip():
                raise ValidationError("A contribution needs a unit.")
            if len(b) == 2:
                raise ValidationError("An amendment must change the quantity, unit or note.")
            return
        # The poster counts as well as the provider: recording on someone's behalf
        # must not let the poster vouch for their own entry.
        if record.author.key in (target["provider"], target["poster"]):
            raise ValidationError("Members cannot acknowledge or dispute their own contribution.")
        me = record.author.key
        if ctx.op == "ack" and me in target["acks"]:
            raise ValidationError("You already acknowledged this contribution.")
        if ctx.op == "dispute" and any(d[0] == me for d in target["disputes"]):
            raise ValidationError("You already disputed this contribution.")

    def apply(self, ctx: ApplyContext, record: Record) -> None:
        b = record.body
        if ctx.op == "record":
            ctx.put(f"c/{record.id.hex()}", {
                "poster": record.author.key,
                "provider": b.get("provider", record.author.key),
                "action": b["action"],
                "quantity": b["quantity"],
                "unit": b["unit"],
                "note": b.get("note", ""),
                "period": b.get("period"),
                "evidence": b.get("evidence"),
                "payback": b.get("payback", "once"),
                "at": ctx.now,
                "acks": [],
                "disputes": [],
                "amended": 0,
            })
            return
        key = f"c/{b['target'].hex()}"
        c: dict[str, Any] = dict(ctx.get(key))
        me = record.author.key
        if ctx.op == "amend":
            for f in ("quantity", "unit", "note"):
                if f in b:
                    c[f] = b[f]
            c["amended"] += 1
            c["acks"] = []  # acknowledgements were of the old content
        elif ctx.op == "ack":
            c["acks"] = sorted([*c["acks"], me])
            c["disputes"] = [d for d in c["disputes"] if d[0] != me]
        else:
            c["disputes"] = sorted([*c["disputes"], [me, b["reason"]]])
            c["acks"] = [a for a in c["acks"] if a != me]
        ctx.put(key, c)

    def views(self) -> dict[str, Any]:
        def summary(state: Any) -> list[dict[str, Any]]:
            return [{"id": k[2:], **v} for k, v in state.scan(self.name, "c/")]
        return {"contributions": summary}

    def examples(self) -> list[dict[str, Any]]:
        return [
            {"op": "record", "action": "work", "quantity": "3.5", "unit": "hour", "note": "design"},
            {"op": "record", "action": "transfer", "quantity": "500", "unit": "EUR",
             "payback": "debt-like", "evidence": {"uri": "https://example.org/receipt", "hash": b"\x00" * 32},
             "period": {"start": 1, "end": 2}},
            {"op": "ack", "target": b"\x07" * 32},
            {"op": "dispute", "target": b"\x07" * 32, "reason": "not delivered"},
            {"op": "amend", "target": b"\x07" * 32, "quantity": "2"},
        ]


PLUGIN = Contribution()
