"""The `policy` plugin: Loomio-style proposals and votes, decided in ledger
order; an adopted split proposal becomes the constellation's split policy.

State: `p/<id hex>` per proposal, `v/<proposal hex>/<member hex>` per vote,
`current` (the adopted split policy) and `history/<at>-<id hex>` of adoptions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import cbor
from ..errors import AuthorizationError, DecodeError, ValidationError
from ..invite import ROLES
from ..ledger import ApplyContext, StateReader
from ..plugins import Field, Plugin, Version, integer, text
from ..records import Record
from .inputs import POLICY_NS
from .splitpolicy import BPS, SplitPolicy, parse_policy

MAX_VOTING_WINDOW_MS = 90 * 86_400_000
MAX_OPTIONS = 16
MAX_POLICY_BYTES = 8192
BINARY_OPTIONS = ("agree", "abstain", "disagree")
BLOCK = "block"
DEFAULT_QUORUM_BPS = 5000
DEFAULT_THRESHOLD_BPS = 5001


def encode_split(policy: SplitPolicy) -> bytes:
    """The `split` field of a proposal: the policy's canonical CBOR map."""
    return cbor.encode(policy.to_map())


def decode_split(raw: bytes) -> SplitPolicy:
    try:
        m = cbor.decode(raw, max_size=MAX_POLICY_BYTES)
    except DecodeError:
        raise ValidationError("The proposed split policy is not a valid encoding.") from None
    return parse_policy(m)


def decide(proposal: Mapping[str, Any], tally: Mapping[str, int]) -> dict[str, Any]:
    """The outcome of a proposal from its settings and vote counts; pure and exact.

    Quorum: votes cast (abstentions too) * 10000 >= quorum_bps * eligible voters.
    Binary proposals pass when agree * 10000 >= threshold_bps * (agree + disagree)
    and no one blocked (if blocking is allowed); polls choose the option with
    most votes if it holds the threshold share of the non-abstaining votes.
    """
    cast = sum(tally.values())
    eligible = len(proposal["voters"])
    base: dict[str, Any] = {
        "tally": dict(sorted(tally.items())),
        "cast": cast,
        "eligible": eligible,
    }
    if cast * BPS < proposal["quorum_bps"] * eligible:
        return {**base, "result": "no-quorum", "option": None}
    threshold = proposal["threshold_bps"]
    if "agree" in proposal["options"] and "disagree" in proposal["options"]:
        if tally.get(BLOCK, 0) > 0:
            return {**base, "result": "blocked", "option": None}
        agree, disagree = tally.get("agree", 0), tally.get("disagree", 0)
        passed = agree > 0 and agree * BPS >= threshold * (agree + disagree)
        return {**base, "result": "adopted" if passed else "rejected", "option": None}
    counted = {o: n for o, n in tally.items() if o != "abstain"}
    top = max(counted.values(), default=0)
    winners = sorted(o for o, n in counted.items() if n == top)
    if top == 0:
        return {**base, "result": "rejected", "option": None}
    if len(winners) > 1:
        return {**base, "result": "tied", "option": None}
    if top * BPS < threshold * sum(counted.values()):
        return {**base, "result": "no-majority", "option": None}
    return {**base, "result": "chosen", "option": winners[0]}


def _proposal(ctx: ApplyContext, pid: bytes) -> dict[str, Any]:
    p = ctx.get(f"p/{pid.hex()}")
    if not isinstance(p, dict):
        raise ValidationError("There is no proposal with that id.")
    return p


def _tally(ctx: StateReader, pid: bytes) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, v in ctx.scan(POLICY_NS, f"v/{pid.hex()}/"):
        out[v["option"]] = out.get(v["option"], 0) + 1
    return out


class Policy(Plugin):
    name = "policy"
    version = Version(1, 0)
    description = "Proposals and votes; an adopted split policy decides how revenue is divided."
    ops = {
        "propose": {
            "title": text(200),
            "note": text(2000, required=False),
            "options": Field("list", required=False, item=text(32), max=MAX_OPTIONS),
            "split": Field("bytes", required=False, max_len=MAX_POLICY_BYTES),
            "block": Field("bool", required=False),
            "quorum_bps": integer(0, BPS, required=False),
            "threshold_bps": integer(1, BPS, required=False),
            "opens": integer(0, required=False),
            "closes": integer(0),
            "voters": Field("list", required=False, item=text(16, choices=ROLES), max=4),
        },
        "vote": {
            "proposal": Field("hash"),
            "option": text(32),
            "reason": text(500, required=False),
        },
        "close": {"proposal": Field("hash")},
    }

    def _settings(self, ctx: ApplyContext, record: Record) -> dict[str, Any]:
        b = record.body
        split = decode_split(b["split"]) if "split" in b else None
        if split is not None:
            if "options" in b:
                raise ValidationError(
                    "A split proposal has the fixed options agree, abstain, disagree."
                )
            options = [*BINARY_OPTIONS, BLOCK] if b.get("block") else list(BINARY_OPTIONS)
        else:
            options = list(b.get("options", BINARY_OPTIONS))
            if len(options) < 2 or len(set(options)) != len(options):
                raise ValidationError("A proposal needs at least two distinct options.")
            if b.get("block"):
                if "agree" not in options or "disagree" not in options:
                    raise ValidationError("Only an agree/disagree proposal can allow blocking.")
                if BLOCK not in options:
                    options.append(BLOCK)
        opens = b.get("opens", ctx.now)
        closes = b["closes"]
        if closes <= ctx.now:
            raise ValidationError("The proposal's closing time is already past.")
        if closes - ctx.now > MAX_VOTING_WINDOW_MS:
            raise ValidationError("A proposal may stay open for at most 90 days.")
        if not ctx.now <= opens < closes:
            raise ValidationError("Voting must open between now and the closing time.")
        roles = b.get("voters")
        voters = sorted(
            bytes.fromhex(k[2:])
            for k, m in ctx.scan("membership", "m/")
            if m.get("status") == "active" and (not roles or set(roles) & set(m.get("roles", [])))
        )
        if not voters:
            raise ValidationError("No active member holds the roles allowed to vote.")
        return {
            "proposer": record.author.key,
            "title": b["title"],
            "note": b.get("note", ""),
            "options": options,
            "split": split.to_map() if split is not None else None,
            "split_hash": split.hash if split is not None else None,
            "quorum_bps": b.get("quorum_bps", DEFAULT_QUORUM_BPS),
            "threshold_bps": b.get("threshold_bps", DEFAULT_THRESHOLD_BPS),
            "opens": opens,
            "closes": closes,
            "voters": voters,
            "status": "open",
            "at": ctx.now,
            "outcome": None,
        }

    def validate(self, ctx: ApplyContext, record: Record) -> None:
        b = record.body
        if ctx.op == "propose":
            self._settings(ctx, record)
            return
        pid = b["proposal"]
        p = _proposal(ctx, pid)
        if p["status"] != "open":
            raise ValidationError("Voting on this proposal is closed.")
        me = record.author.key
        if ctx.op == "vote":
            if ctx.now > p["closes"]:
                raise ValidationError(
                    f"Voting on this proposal closed at {p['closes']}; "
                    f"this vote was ordered at {ctx.now}."
                )
            if ctx.now < p["opens"]:
                raise ValidationError(f"Voting on this proposal opens at {p['opens']}, not before.")
            if me not in p["voters"]:
                raise AuthorizationError(
                    f"{record.author.short}… is not among this proposal's voters."
                )
            if b["option"] not in p["options"]:
                raise ValidationError(f"The option must be one of: {', '.join(p['options'])}.")
            if ctx.get(f"v/{pid.hex()}/{me.hex()}") is not None:
                raise ValidationError(
                    "You already voted on this proposal; a vote cannot be cast twice."
                )
            return
        everyone = sum(_tally(ctx, pid).values()) == len(p["voters"])
        if ctx.now < p["closes"] and not everyone:
            raise ValidationError(
                "The proposal can be closed only at its closing time or once all voted."
            )

    def apply(self, ctx: ApplyContext, record: Record) -> None:
        b = record.body
        if ctx.op == "propose":
            ctx.put(f"p/{record.id.hex()}", self._settings(ctx, record))
            return
        pid = b["proposal"]
        if ctx.op == "vote":
            ctx.put(
                f"v/{pid.hex()}/{record.author.key.hex()}",
                {
                    "option": b["option"],
                    "reason": b.get("reason", ""),
                    "at": ctx.now,
                },
            )
            return
        p = dict(_proposal(ctx, pid))
        outcome = decide(p, _tally(ctx, pid))
        p.update(status="closed", outcome=outcome, closed_at=ctx.now)
        ctx.put(f"p/{pid.hex()}", p)
        if p["split"] is not None and outcome["result"] == "adopted":
            adopted = {
                "proposal": pid,
                "hash": p["split_hash"],
                "policy": p["split"],
                "adopted_at": ctx.now,
            }
            ctx.put("current", adopted)
            ctx.put(f"history/{ctx.now:020d}-{pid.hex()}", adopted)

    def views(self) -> dict[str, Any]:
        def proposals(state: StateReader) -> list[dict[str, Any]]:
            out = []
            for k, v in state.scan(POLICY_NS, "p/"):
                pid = bytes.fromhex(k[2:])
                live = decide(v, _tally(state, pid)) if v["status"] == "open" else None
                out.append({"id": k[2:], **v, "standing": live})
            return out

        def current(state: StateReader) -> Any:
            return state.read(POLICY_NS, "current")

        return {"proposals": proposals, "current": current}

    def examples(self) -> list[dict[str, Any]]:
        return [
            {
                "op": "propose",
                "title": "Equal weights",
                "split": encode_split(SplitPolicy()),
                "closes": 10**13,
            },
            {
                "op": "propose",
                "title": "Where to meet",
                "options": ["online", "berlin", "abstain"],
                "quorum_bps": 3000,
                "threshold_bps": 4000,
                "closes": 10**13,
            },
            {"op": "vote", "proposal": b"\x07" * 32, "option": "agree", "reason": "fair"},
            {"op": "close", "proposal": b"\x07" * 32},
        ]


PLUGIN = Policy()
