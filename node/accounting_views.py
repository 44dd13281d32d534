"""The JSON views of a constellation's open book that the accounting routes serve: split
previews, distributions and their re-verification, policies, agreements, revenues, ValueFlows.

Each reads the final ledger state through the pure `protocol.accounting` API and changes
nothing; a missing revenue, proposal or distribution raises NotFoundError.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from valuemesh.protocol.accounting import (
    COMMONS,
    Distribution,
    SplitInputs,
    SplitPolicy,
    compute_split,
    current_policy,
    find_policy,
    format_minor,
    gather_inputs,
    parse_policy,
    pool_scores,
    ratifiers,
    verify_recorded,
)
from valuemesh.protocol.accounting.inputs import (
    AGREEMENT_NS,
    DISTRIBUTION_NS,
    POLICY_NS,
    REVENUE_NS,
    inputs_from_leaves,
)
from valuemesh.protocol.accounting.money import format_fraction
from valuemesh.protocol.accounting.policy import decide
from valuemesh.protocol.errors import LocalError, NotFoundError, ValuemeshError
from valuemesh.protocol.identity import MemberId
from valuemesh.protocol.ledger import StateReader
from valuemesh.protocol.records import constellation_text

VF_CONTEXT = {
    "vf": "https://w3id.org/valueflows/ont/vf#",
    "om2": "http://www.ontology-of-units-of-measure.org/resource/om-2/",
    "foaf": "http://xmlns.com/foaf/0.1/",
    "dcterms": "http://purl.org/dc/terms/",
    "vm": "https://valuemesh.org/ns/v1#",
}
# ValueFlows action ids for our contribution actions.
VF_ACTIONS = {"deliver-service": "deliverService"}


# --------------------------------------------------------------------------- helpers


def hex32(value: object, what: str) -> bytes:
    if not isinstance(value, str) or len(value.strip()) != 64:
        raise LocalError(f"{what} must be 64 hex characters.")
    try:
        return bytes.fromhex(value.strip())
    except ValueError:
        raise LocalError(f"{what} must be 64 hex characters.") from None


def who(state: StateReader, to: bytes | str) -> dict[str, str]:
    """A recipient as the CLI shows it: a vm1 id and the member's name, or the commons."""
    if not isinstance(to, bytes):
        return {"member": COMMONS, "name": COMMONS}
    m = state.member(to) or {}
    return {"member": str(MemberId(to)), "name": str(m.get("name", ""))}


def _ms_iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def default_revenue(state: StateReader) -> bytes:
    """The latest revenue without a final distribution, else the latest revenue."""
    revenues = sorted(((v["at"], k[2:]) for k, v in state.scan(REVENUE_NS, "r/")), reverse=True)
    if not revenues:
        raise LocalError("There is no final revenue to split yet; record one with 'valuemesh revenue'.")
    for _, rid in revenues:
        if state.read(DISTRIBUTION_NS, f"done/{rid}") is None:
            return bytes.fromhex(rid)
    return bytes.fromhex(revenues[0][1])


def revenue_arg(state: StateReader, value: object) -> bytes:
    if value is None:
        return default_revenue(state)
    rid = hex32(value, "A revenue id")
    if state.read(REVENUE_NS, f"r/{rid.hex()}") is None:
        raise NotFoundError(f"There is no final revenue {rid.hex()[:16]}… in this constellation.")
    return rid


def distribution_json(state: StateReader, dist: Distribution) -> dict[str, Any]:
    """The versioned distribution shape plus each recipient's vm1 id and name."""
    doc = dist.to_json()
    for line, src in zip(doc["lines"], dist.lines, strict=True):
        line.update(who(state, src.to))
    return doc


def scores_json(state: StateReader, policy: SplitPolicy, inputs: SplitInputs) -> list[dict[str, Any]]:
    """Each scoring contribution's factors, for `split --explain`."""
    out = []
    for s in pool_scores(policy, inputs):
        out.append({
            "contribution": s.contribution.hex(),
            **who(state, s.provider),
            "weight": format_fraction(s.weight),
            "quantity": format_fraction(s.quantity),
            "ack": format_fraction(s.ack_factor),
            "dispute": format_fraction(s.dispute_factor),
            "payback": format_fraction(s.payback_factor),
            "decay": format_fraction(s.decay),
            "score": format_fraction(s.value),
            "explain": s.explain(),
        })
    return out


def split_view(state: StateReader, doc: Mapping[str, Any]) -> dict[str, Any]:
    """Preview a split: under the adopted policy, a proposal's or one given inline.

    Nothing is adopted or recorded: this is "try before voting".
    """
    rid = revenue_arg(state, doc.get("revenue"))
    adopted, adopted_by = current_policy(state)
    done = state.read(DISTRIBUTION_NS, f"done/{rid.hex()}")
    if doc.get("policy") is not None and doc.get("proposal") is not None:
        raise LocalError("Give either a policy or a proposal to try, not both.")
    inputs = None
    ref: dict[str, str | None] = {"proposal": None, "distribution": None}
    if doc.get("policy") is None and doc.get("proposal") is None and isinstance(done, bytes):
        # A split revenue shows what was ratified: recomputing now would see the debts
        # and capped terms this very distribution repaid.
        d = state.read(DISTRIBUTION_NS, f"d/{done.hex()}")
        dist = Distribution.from_map(d["distribution"])
        policy, source = find_policy(state, dist.policy_hash), "final"
        ref["distribution"] = done.hex()
        inputs = inputs_from_leaves(d["inputs"])
    elif doc.get("policy") is not None:
        policy, source = parse_policy(doc["policy"]), "given"
    elif doc.get("proposal") is not None:
        pid = hex32(doc["proposal"], "A proposal id")
        p = state.read(POLICY_NS, f"p/{pid.hex()}")
        if not isinstance(p, dict):
            raise NotFoundError("There is no final proposal with that id.")
        if p["split"] is None:
            raise LocalError("That proposal does not propose a split policy.")
        policy, source = parse_policy(p["split"]), "proposal"
        ref["proposal"] = pid.hex()
    else:
        policy = adopted
        source = "adopted" if adopted_by is not None else "default"
    if inputs is None:
        inputs = gather_inputs(state, rid)
        dist = compute_split(policy, inputs)
    rev = state.read(REVENUE_NS, f"r/{rid.hex()}")
    out: dict[str, Any] = {
        "format": 1,
        "revenue": {"id": rid.hex(), "amount": format_minor(rev["amount"], rev["exponent"]),
                    "currency": rev["currency"], **who(state, rev["customer"]),
                    "agreement": rev["agreement"].hex() if rev["agreement"] else None},
        "policy": {"hash": policy.hash.hex(), "source": source, "adopted": policy.hash == adopted.hash,
                   **ref, "map": policy.to_map()},
        "distribution": distribution_json(state, dist),
        "ratifiers": [who(state, k) for k in ratifiers(state, policy, dist)],
        "final": isinstance(done, bytes),
    }
    if doc.get("explain"):
        out["scores"] = scores_json(state, policy, inputs)
    return out


def distributions_view(state: StateReader) -> list[dict[str, Any]]:
    out = []
    for k, d in state.scan(DISTRIBUTION_NS, "d/"):
        dist = Distribution.from_map(d["distribution"])
        out.append({
            "id": k[2:],
            "revenue": d["revenue"].hex(),
            "hash": d["hash"].hex(),
            "policy": d["policy"].hex(),
            "root": d["root"].hex(),
            "status": d["status"],
            "proposer": str(MemberId(d["proposer"])),
            "required": [who(state, x) for x in d["required"]],
            "signed": [who(state, x) for x in d["signed"]],
            "at": d["at"],
            "final_at": d["final_at"],
            "distribution": distribution_json(state, dist),
        })
    return out


def verify_view(state: StateReader, ids: Iterable[bytes]) -> dict[str, Any]:
    """Re-verify distributions from the inputs they carry; never raises for a failed one."""
    results = []
    for did in ids:
        d = state.read(DISTRIBUTION_NS, f"d/{did.hex()}")
        try:
            dist = verify_recorded(state, did)
        except ValuemeshError as exc:
            results.append({"id": did.hex(), "ok": False, "reason": exc.message,
                            "status": d["status"] if isinstance(d, dict) else None})
            continue
        results.append({"id": did.hex(), "ok": True, "status": d["status"], "hash": dist.hash.hex(),
                        "policy": dist.policy_hash.hex(), "root": dist.inputs_root.hex(),
                        "revenue": dist.revenue.hex(), "lines": len(dist.lines),
                        "amount": format_minor(dist.amount, dist.exponent), "currency": dist.currency})
    return {"ok": all(r["ok"] for r in results), "distributions": results}


def policies_view(state: StateReader) -> dict[str, Any]:
    proposals = []
    for k, p in state.scan(POLICY_NS, "p/"):
        pid = bytes.fromhex(k[2:])
        tally: dict[str, int] = {}
        votes = []
        for vk, v in state.scan(POLICY_NS, f"v/{k[2:]}/"):
            tally[v["option"]] = tally.get(v["option"], 0) + 1
            votes.append({**who(state, bytes.fromhex(vk.rsplit("/", 1)[1])), "option": v["option"],
                          "reason": v["reason"], "at": v["at"]})
        proposals.append({
            "id": pid.hex(), "title": p["title"], "note": p["note"], "options": p["options"],
            "proposer": str(MemberId(p["proposer"])), "status": p["status"],
            "opens": p["opens"], "closes": p["closes"], "quorum_bps": p["quorum_bps"],
            "threshold_bps": p["threshold_bps"], "voters": [who(state, x) for x in p["voters"]],
            "split": p["split"], "split_hash": p["split_hash"].hex() if p["split_hash"] else None,
            "votes": votes, "outcome": p["outcome"],
            "standing": decide(p, tally) if p["status"] == "open" else None,
        })
    policy, by = current_policy(state)
    return {"proposals": proposals,
            "current": {"hash": policy.hash.hex(), "proposal": by.hex() if by else None,
                        "map": policy.to_map()}}


def agreements_view(state: StateReader) -> list[dict[str, Any]]:
    out = []
    for k, a in state.scan(AGREEMENT_NS, "a/"):
        exp = a["exponent"]
        out.append({
            "id": k[2:], "title": a["title"], "status": a["status"], "currency": a["currency"],
            "applies": a["applies"], "proposer": str(MemberId(a["proposer"])),
            "parties": [who(state, p) for p in a["parties"]],
            "signed": [who(state, p) for p in a["signed"]],
            "missing": [who(state, p) for p in a["parties"] if p not in a["signed"]],
            "customer": str(MemberId(a["customer"])) if a["customer"] else None,
            "terms": [{"kind": t["kind"], "to": str(MemberId(t["to"])) if t["to"] else None,
                       "amount": format_minor(t["amount"], exp) if t["amount"] is not None else None,
                       "bps": t["bps"], "cap": format_minor(t["cap"], exp) if t["cap"] is not None else None,
                       "note": t["note"]} for t in a["terms"]],
        })
    return out


def revenues_view(state: StateReader) -> list[dict[str, Any]]:
    out = []
    for k, r in state.scan(REVENUE_NS, "r/"):
        done = state.read(DISTRIBUTION_NS, f"done/{k[2:]}")
        out.append({"id": k[2:], "amount": format_minor(r["amount"], r["exponent"]),
                    "currency": r["currency"], "customer": str(MemberId(r["customer"])),
                    "recorder": str(MemberId(r["recorder"])), "note": r["note"], "at": r["at"],
                    "agreement": r["agreement"].hex() if r["agreement"] else None,
                    "distribution": done.hex() if isinstance(done, bytes) else None})
    return out


# --------------------------------------------------------------------------- ValueFlows


def valueflows_view(state: StateReader, cid: bytes) -> dict[str, Any]:
    """A JSON-LD view of the final ledger in ValueFlows terms, for other tools (not importable)."""
    c_id = f"urn:valuemesh:{constellation_text(cid)}"

    def agent(key: bytes) -> dict[str, str]:
        return {"@id": f"urn:valuemesh:{MemberId(key)}"}

    meta = state.read("membership", "meta") or {}
    graph: list[dict[str, Any]] = [{"@id": c_id, "@type": "foaf:Organization", "vf:name": meta.get("name", ""),
                                    "vf:note": meta.get("purpose", "")}]
    for k, m in state.scan("membership", "m/"):
        key = bytes.fromhex(k[2:])
        graph.append({**agent(key), "@type": "foaf:Agent", "vf:name": m.get("name", ""),
                      "vm:roles": list(m.get("roles", [])), "vm:tier": m.get("tier"),
                      "vm:status": m.get("status")})
        graph.append({"@id": f"{c_id}/relationship/{k[2:]}", "@type": "vf:AgentRelationship",
                      "vf:subject": agent(key), "vf:object": {"@id": c_id},
                      "vf:relationship": {"@id": "vm:memberOf"}, "vm:roles": list(m.get("roles", []))})
    for k, c in state.scan("contribution", "c/"):
        graph.append({
            "@id": f"urn:valuemesh:record:{k[2:]}", "@type": "vf:EconomicEvent",
            "vf:action": {"@id": f"vf:{VF_ACTIONS.get(c['action'], c['action'])}"},
            "vf:provider": agent(c["provider"]), "vf:receiver": {"@id": c_id},
            "vf:resourceQuantity": {"@type": "om2:Measure", "om2:hasNumericalValue": c["quantity"],
                                    "om2:hasUnit": c["unit"]},
            "vf:hasPointInTime": _ms_iso(c["at"]), "vf:note": c.get("note", ""),
            "vm:payback": c["payback"], "vm:acknowledgedBy": [agent(a) for a in c["acks"]],
            "vm:disputedBy": [{**agent(d[0]), "vf:note": d[1]} for d in c["disputes"]],
        })
    for k, a in state.scan(AGREEMENT_NS, "a/"):
        graph.append({
            "@id": f"urn:valuemesh:record:{k[2:]}", "@type": "vf:Agreement", "vf:name": a["title"],
            "vf:created": _ms_iso(a["at"]), "vm:status": a["status"], "vm:parties": [agent(p) for p in a["parties"]],
            "vm:signedBy": [agent(p) for p in a["signed"]],
            "vf:note": a.get("note", ""),
            "vm:terms": [{"vm:kind": t["kind"], "vm:to": agent(t["to"]) if t["to"] else None,
                          "vm:amount": format_minor(t["amount"], a["exponent"]) if t["amount"] is not None
                          else None, "vm:bps": t["bps"], "vm:currency": a["currency"]} for t in a["terms"]],
        })
    for k, r in state.scan(REVENUE_NS, "r/"):
        ev: dict[str, Any] = {
            "@id": f"urn:valuemesh:record:{k[2:]}", "@type": "vf:EconomicEvent",
            "vf:action": {"@id": "vf:transfer"}, "vf:provider": agent(r["customer"]),
            "vf:receiver": {"@id": c_id}, "vf:hasPointInTime": _ms_iso(r["at"]),
            "vf:resourceQuantity": {"@type": "om2:Measure",
                                    "om2:hasNumericalValue": format_minor(r["amount"], r["exponent"]),
                                    "om2:hasUnit": r["currency"]},
            "vf:note": r.get("note", ""),
        }
        if r["agreement"] is not None:
            ev["vf:realizationOf"] = {"@id": f"urn:valuemesh:record:{r['agreement'].hex()}"}
        graph.append(ev)
    for k, d in state.scan(DISTRIBUTION_NS, "d/"):
        if d["status"] != "final":
            continue
        dist = Distribution.from_map(d["distribution"])
        for i, ln in enumerate(dist.lines):
            graph.append({
                "@id": f"urn:valuemesh:record:{k[2:]}#line-{i + 1}", "@type": "vf:Claim",
                "vf:action": {"@id": "vf:transfer"}, "vf:provider": {"@id": c_id},
                "vf:receiver": agent(ln.to) if isinstance(ln.to, bytes) else {"@id": f"{c_id}/commons"},
                "vf:triggeredBy": {"@id": f"urn:valuemesh:record:{dist.revenue.hex()}"},
                "vf:resourceQuantity": {"@type": "om2:Measure",
                                        "om2:hasNumericalValue": format_minor(ln.amount, dist.exponent),
                                        "om2:hasUnit": dist.currency},
                "vf:created": _ms_iso(d["final_at"]), "vf:note": ln.explain, "vm:kind": ln.kind,
                "vm:sources": [{"@id": f"urn:valuemesh:record:{s.hex()}"} for s in ln.sources],
                "vm:distributionHash": dist.hash.hex(), "vm:policyHash": dist.policy_hash.hex(),
                "vm:inputsRoot": dist.inputs_root.hex(),
            })
    return {"@context": VF_CONTEXT, "@id": c_id, "@graph": graph}
