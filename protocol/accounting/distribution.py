"""The `distribution` plugin: a proposed split of one revenue record, which the
ledger recomputes and refuses unless identical, final once ratified by the
signatures the policy requires (by default the customer's).

State: `d/<record id hex>` per proposal, `done/<revenue hex>` once one is final,
and `paid/...` counters of what final distributions repaid on debts and terms.
"""

from __future__ import annotations

from typing import Any

from ..errors import AuthorizationError, ValidationError
from ..ledger import ApplyContext, StateReader
from ..plugins import Field, Plugin, Version
from ..records import Record
from .inputs import (
    AGREEMENT_NS,
    CONTRIBUTION_NS,
    DISTRIBUTION_NS,
    POLICY_NS,
    REVENUE_NS,
    SplitInputs,
    current_policy,
    gather_inputs,
    inputs_from_leaves,
    paid_debt_key,
    paid_term_key,
)
from .split import Distribution, compute_split, verify
from .splitpolicy import DEFAULT_POLICY, SplitPolicy, parse_policy


def current_split(state: StateReader, revenue_id: bytes) -> Distribution:
    """The distribution every node computes for `revenue_id` under the adopted policy now."""
    policy, _ = current_policy(state)
    return compute_split(policy, gather_inputs(state, revenue_id))


def ratifiers(state: StateReader, policy: SplitPolicy, dist: Distribution) -> list[bytes]:
    """The members whose signatures the policy requires to make `dist` final."""
    need: set[bytes] = set()
    if policy.ratify.customer:
        r = state.read(REVENUE_NS, f"r/{dist.revenue.hex()}")
        need.add(r["customer"])
    if policy.ratify.recipients:
        need |= {ln.to for ln in dist.lines if isinstance(ln.to, bytes)}
    if policy.ratify.roles:
        for key, m in state.scan("membership", "m/"):
            if m.get("status") == "active" and set(policy.ratify.roles) & set(m.get("roles", [])):
                need.add(bytes.fromhex(key[2:]))
    return sorted(k for k in need if state.is_active(k))


def find_policy(state: StateReader, digest: bytes) -> SplitPolicy:
    """The default policy or an adopted one, by its hash."""
    if digest == DEFAULT_POLICY.hash:
        return DEFAULT_POLICY
    for _, v in state.scan(POLICY_NS, "history/"):
        if v["hash"] == digest:
            return parse_policy(v["policy"])
    raise ValidationError("No policy this constellation adopted has that hash.")


def verify_recorded(state: StateReader, distribution_id: bytes) -> Distribution:
    """Re-verify a proposed or final distribution from the inputs it carries.

    Recomputes the split from the stored inputs and the policy it names, checks
    the Merkle root, and checks that every input names a record in this ledger.
    """
    d = state.read(DISTRIBUTION_NS, f"d/{distribution_id.hex()}")
    if not isinstance(d, dict):
        raise ValidationError("There is no distribution with that id.")
    dist = Distribution.from_map(d["distribution"])
    inputs = inputs_from_leaves(d["inputs"])
    verify(dist, inputs, find_policy(state, dist.policy_hash))
    if state.read(REVENUE_NS, f"r/{inputs.revenue.id.hex()}") is None:
        raise ValidationError("The distribution's revenue is not in this ledger.")
    for c in inputs.contributions:
        if state.read(CONTRIBUTION_NS, f"c/{c.id.hex()}") is None:
            raise ValidationError(f"Input contribution {c.id.hex()[:12]} is not in this ledger.")
    for t in inputs.terms:
        a = state.read(AGREEMENT_NS, f"a/{t.agreement.hex()}")
        if not isinstance(a, dict) or a["status"] != "final":
            raise ValidationError(f"Input agreement {t.agreement.hex()[:12]} is not final here.")
    return dist


class DistributionPlugin(Plugin):
    name = "distribution"
    version = Version(1, 0)
    description = "A revenue's split, recomputed by every node and ratified by its stakeholders."
    ops = {
        "propose": {
            "revenue": Field("hash"),
            "hash": Field("hash"),
            "policy": Field("hash"),
            "root": Field("hash"),
        },
        "ratify": {"distribution": Field("hash"), "hash": Field("hash")},
    }

    def _fresh(
        self, ctx: ApplyContext, revenue: bytes, claimed: dict[str, Any]
    ) -> tuple[Distribution, SplitInputs, SplitPolicy, bytes | None]:
        """Recompute the split and explain exactly why a claimed one differs."""
        if ctx.get(f"done/{revenue.hex()}") is not None:
            raise ValidationError("This revenue already has a final distribution.")
        policy, proposal = current_policy(ctx)
        inputs = gather_inputs(ctx, revenue)
        dist = compute_split(policy, inputs)
        if claimed["policy"] != dist.policy_hash:
            raise ValidationError(
                "The distribution was computed under another policy than the current one."
            )
        if claimed["root"] != dist.inputs_root:
            raise ValidationError(
                "The ledger changed since this distribution was computed (its inputs differ); "
                "compute it again."
            )
        if claimed["hash"] != dist.hash:
            raise ValidationError(
                "The distribution does not match what every node computes for it."
            )
        return dist, inputs, policy, proposal

    def validate(self, ctx: ApplyContext, record: Record) -> None:
        b = record.body
        if ctx.op == "propose":
            # The split is recomputed once, in apply, which refuses a mismatch just
            # as validate would: a failing apply changes nothing.
            return
        d = ctx.get(f"d/{b['distribution'].hex()}")
        if not isinstance(d, dict):
            raise ValidationError("There is no proposed distribution with that id.")
        if d["status"] != "proposed":
            raise ValidationError(f"The distribution is already {d['status']}.")
        me = record.author.key
        if me not in d["required"]:
            raise AuthorizationError(
                f"{record.author.short}… is not asked to ratify this distribution."
            )
        if me in d["signed"]:
            raise ValidationError("You already ratified this distribution.")
        if ctx.get(f"done/{d['revenue'].hex()}") is not None:
            raise ValidationError("This revenue already has a final distribution.")
        if b["hash"] != d["hash"]:
            raise ValidationError("You ratified a different distribution than the one proposed.")
        if set(d["signed"]) | {me} == set(d["required"]):
            # The last signature makes it final: the figures must still hold now.
            self._fresh(
                ctx, d["revenue"], {"policy": d["policy"], "root": d["root"], "hash": d["hash"]}
            )

    def apply(self, ctx: ApplyContext, record: Record) -> None:
        b = record.body
        if ctx.op == "propose":
            dist, inputs, policy, proposal = self._fresh(ctx, b["revenue"], dict(b))
            required = ratifiers(ctx, policy, dist)
            if not required:
                raise ValidationError(
                    "No active member can ratify this distribution under the policy."
                )
            ctx.put(
                f"d/{record.id.hex()}",
                {
                    "revenue": dist.revenue,
                    "proposer": record.author.key,
                    "hash": dist.hash,
                    "policy": dist.policy_hash,
                    "policy_proposal": proposal,
                    "root": dist.inputs_root,
                    "distribution": dist.to_map(),
                    # The inputs travel with the distribution so it can be re-verified later,
                    # when repayments and new acknowledgements have moved the ledger on.
                    "inputs": inputs.leaves(),
                    "required": required,
                    "signed": [],
                    "status": "proposed",
                    "at": ctx.now,
                    "final_at": None,
                },
            )
            return
        key = f"d/{b['distribution'].hex()}"
        d = dict(ctx.get(key))
        d["signed"] = sorted([*d["signed"], record.author.key])
        if set(d["signed"]) == set(d["required"]):
            d["status"] = "final"
            d["final_at"] = ctx.now
            ctx.put(f"done/{d['revenue'].hex()}", b["distribution"])
            self._record_payments(ctx, Distribution.from_map(d["distribution"]))
        ctx.put(key, d)

    def _record_payments(self, ctx: ApplyContext, dist: Distribution) -> None:
        for ln in dist.lines:
            if ln.kind == "debt":
                key = paid_debt_key(ln.sources[0])
            elif ln.term is not None:
                key = paid_term_key(ln.sources[0], ln.term)
            else:
                continue
            ctx.put(key, (ctx.get(key) or 0) + ln.amount)

    def views(self) -> dict[str, Any]:
        def distributions(state: StateReader) -> list[dict[str, Any]]:
            return [{"id": k[2:], **v} for k, v in state.scan(DISTRIBUTION_NS, "d/")]

        def owed(state: StateReader) -> dict[str, dict[str, int]]:
            """Per currency, what final distributions assigned to each recipient in total."""
            out: dict[str, dict[str, int]] = {}
            for _, v in state.scan(DISTRIBUTION_NS, "d/"):
                if v["status"] != "final":
                    continue
                dist = Distribution.from_map(v["distribution"])
                per = out.setdefault(dist.currency, {})
                for to, amount in dist.totals().items():
                    name = to.hex() if isinstance(to, bytes) else to
                    per[name] = per.get(name, 0) + amount
            return out

        return {"distributions": distributions, "owed": owed}

    def examples(self) -> list[dict[str, Any]]:
        h = b"\x07" * 32
        return [
            {"op": "propose", "revenue": h, "hash": h, "policy": h, "root": h},
            {"op": "ratify", "distribution": h, "hash": h},
        ]


PLUGIN = DistributionPlugin()
