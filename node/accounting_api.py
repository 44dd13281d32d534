"""Local API routes for open-book accounting (split previews, distributions and their
verification, policies) and the signed, re-verifiable archive of a constellation.

Routes read the daemon's final ledger state through the pure `protocol.accounting` API;
the archive (export, offline verification, loading into a stopped node's store) lives
here too because export needs the daemon's store and import reuses the same replay.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import csv
import io
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from valuemesh.node.api import NotFound, json_ok, read_json_object
from valuemesh.node.jsonbody import body_to_json
from valuemesh.node.store import CommitEntry, ConstellationInfo, Store
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
    try_policy,
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
from valuemesh.protocol.consensus import CheckpointCertificate, Committee, Consensus, Content
from valuemesh.protocol.errors import DecodeError, LocalError, ValidationError, ValuemeshError
from valuemesh.protocol.identity import Identity, MemberId
from valuemesh.protocol.ledger import Ledger, Outcome, StateReader
from valuemesh.protocol.plugins import Registry, Version
from valuemesh.protocol.records import (
    Block,
    Record,
    constellation_text,
    decode_block,
    decode_record,
    parse_constellation,
)

if TYPE_CHECKING:
    from valuemesh.node.daemon import Node
    from valuemesh.node.engine import Engine

ARCHIVE_FORMAT = "valuemesh-archive"
ARCHIVE_VERSION = 2
# Version 1 archives are still read; their checkpoint lines were signed over a payload this
# version no longer uses (docs/consensus.md §7), so only their blocks and records are checked.
READABLE_ARCHIVE_VERSIONS = (1, 2)
# An archive is read line by line; a line holds at most one block (4 MiB raw, base64 + JSON).
MAX_ARCHIVE_LINE = 8 * 1024 * 1024
MAX_ARCHIVE_BYTES = 1 << 30
MAX_ARCHIVE_ITEMS = 5_000_000
# Blocks and commits are written to a store in chunks so one import never builds a huge batch.
LOAD_CHUNK = 256
# Fixed CSV columns; other fields of an item travel as JSON in the `data` column.
CSV_COLUMNS = ("kind", "index", "id", "type", "op", "author", "seq", "round", "commit",
               "anchor_round", "created", "status", "reason", "raw", "data")
_INT_FIELDS = frozenset({"index", "seq", "round", "commit", "anchor_round", "created"})
_FORMULA_START = frozenset("=+-@\t\r'")
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


def _hex32(value: object, what: str) -> bytes:
    if not isinstance(value, str) or len(value.strip()) != 64:
        raise LocalError(f"{what} must be 64 hex characters.")
    try:
        return bytes.fromhex(value.strip())
    except ValueError:
        raise LocalError(f"{what} must be 64 hex characters.") from None


def _who(state: StateReader, to: bytes | str) -> dict[str, str]:
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


def _revenue_arg(state: StateReader, value: object) -> bytes:
    if value is None:
        return default_revenue(state)
    rid = _hex32(value, "A revenue id")
    if state.read(REVENUE_NS, f"r/{rid.hex()}") is None:
        raise NotFound(f"There is no final revenue {rid.hex()[:16]}… in this constellation.")
    return rid


def distribution_json(state: StateReader, dist: Distribution) -> dict[str, Any]:
    """The versioned distribution shape plus each recipient's vm1 id and name."""
    doc = dist.to_json()
    for line, src in zip(doc["lines"], dist.lines, strict=True):
        line.update(_who(state, src.to))
    return doc


def scores_json(state: StateReader, policy: SplitPolicy, inputs: SplitInputs) -> list[dict[str, Any]]:
    """Each scoring contribution's factors, for `split --explain`."""
    out = []
    for s in pool_scores(policy, inputs):
        out.append({
            "contribution": s.contribution.hex(),
            **_who(state, s.provider),
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
    rid = _revenue_arg(state, doc.get("revenue"))
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
        pid = _hex32(doc["proposal"], "A proposal id")
        p = state.read(POLICY_NS, f"p/{pid.hex()}")
        if not isinstance(p, dict):
            raise NotFound("There is no final proposal with that id.")
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
                    "currency": rev["currency"], **_who(state, rev["customer"]),
                    "agreement": rev["agreement"].hex() if rev["agreement"] else None},
        "policy": {"hash": policy.hash.hex(), "source": source, "adopted": policy.hash == adopted.hash,
                   **ref, "map": policy.to_map()},
        "distribution": distribution_json(state, dist),
        "ratifiers": [_who(state, k) for k in ratifiers(state, policy, dist)],
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
            "required": [_who(state, x) for x in d["required"]],
            "signed": [_who(state, x) for x in d["signed"]],
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
            votes.append({**_who(state, bytes.fromhex(vk.rsplit("/", 1)[1])), "option": v["option"],
                          "reason": v["reason"], "at": v["at"]})
        proposals.append({
            "id": pid.hex(), "title": p["title"], "note": p["note"], "options": p["options"],
            "proposer": str(MemberId(p["proposer"])), "status": p["status"],
            "opens": p["opens"], "closes": p["closes"], "quorum_bps": p["quorum_bps"],
            "threshold_bps": p["threshold_bps"], "voters": [_who(state, x) for x in p["voters"]],
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
            "parties": [_who(state, p) for p in a["parties"]],
            "signed": [_who(state, p) for p in a["signed"]],
            "missing": [_who(state, p) for p in a["parties"] if p not in a["signed"]],
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


# --------------------------------------------------------------------------- archive


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise DecodeError(f"The archive's {what} must be base64 text.")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise DecodeError(f"The archive's {what} is not valid base64.") from None


@dataclass(frozen=True, slots=True)
class Replay:
    """The ledger a constellation's genesis and committed blocks produce, and its record list."""

    ledger: Ledger
    records: list[dict[str, Any]]
    committees: list[Committee]
    first: Committee
    closes: dict[int, Content]  # epoch -> what it closed with (what its checkpoint signs)

    def committee_of(self, epoch: int) -> Committee | None:
        return next((c for c in [self.first, *self.committees] if c.epoch == epoch), None)


def _note(o: Outcome, registry: Registry, block: bytes | None, position: int) -> dict[str, Any] | None:
    # The same rule as the engine's final view: duplicates and deferrals are not listed.
    if o.status in ("duplicate", "deferred"):
        return None
    r = o.record
    item: dict[str, Any] = {
        "kind": "record", "index": position, "id": r.id.hex(), "type": r.type,
        "op": str(r.body.get("op", "")), "author": str(r.author), "seq": r.seq, "created": r.created,
        "status": o.status, "reason": o.reason, "block": block.hex() if block else None,
        "body": body_to_json(registry.plugins.get(r.type), r.body), "raw": _b64(r.raw),
    }
    return item


def replay(registry: Registry, genesis: Record, commits: Iterable[tuple[Block, int]]) -> Replay:
    """Apply the genesis and committed blocks in order, exactly as a node's engine does on restart.

    The replay runs the engine's own code (its clock rule, and when a membership change closes
    an epoch), so an archive is judged by the rules the node itself follows. The engine gets a
    fresh identity that is no member, so it signs nothing, and it never touches a store here.
    """
    from valuemesh.node.engine import Engine

    items = list(commits)
    carried: dict[bytes, bytes] = {}
    for b, _ in items:
        for r in b.records:
            carried.setdefault(r.id, b.id)
    eng = Engine(None, registry, Identity.generate(os.urandom), genesis)  # type: ignore[arg-type]
    first = eng.committee
    outcomes: list[Outcome] = [Outcome("applied", genesis)]
    # Every outcome, not the engine's bounded final view: an archive lists all of them.
    note = eng._note

    def noting(o: Outcome) -> None:
        outcomes.append(o)
        note(o)  # the engine's count goes into the snapshot its checkpoints sign

    eng._note = noting  # type: ignore[method-assign]
    eng._replaying = []
    eng._apply_committed(items)
    eng.finish_closings_now()
    committees = list(eng._replaying)
    records: list[dict[str, Any]] = []
    for o in outcomes:
        item = _note(o, registry, carried.get(o.record.id), len(records))
        if item is not None:
            records.append(item)
    # What each epoch closed with is what its committee signs as a checkpoint.
    return Replay(eng.ledger, records, committees, first, dict(eng.closed))


async def build_archive(store: Store, eng: Engine, registry: Registry) -> list[dict[str, Any]]:
    """Every block of the constellation with its commit order, and the records they make final.

    Commits are read before blocks: a commit is stored only after the blocks that decide it,
    so the blocks read afterwards always reproduce every commit in the archive.
    """
    first = await store.first_commit_index(eng.cid)
    if first not in (0, None):
        raise LocalError("This node holds the ledger from a checkpoint on (it started from one, or prunes old "
                         "blocks); export the archive from a node that keeps the whole history.")
    # Checkpoints first: one is stored only after the commit that closed its epoch.
    stored_checkpoints = await store.checkpoints(eng.cid)
    entries = [e async for e in store.iter_commits(eng.cid)]
    blocks = {b.id: b async for b in store.iter_blocks(eng.cid)}
    missing = [e.block_id for e in entries if e.block_id not in blocks]
    if missing:
        blocks.update(await store.get_blocks(missing))
    if any(e.block_id not in blocks for e in entries):
        raise LocalError("The database lacks a committed block; the archive cannot be complete.")
    committed = [(blocks[e.block_id], e.anchor_round) for e in entries]
    rep = await asyncio.to_thread(replay, registry, eng.genesis, committed)
    head = {"kind": "archive", "format": ARCHIVE_FORMAT, "v": ARCHIVE_VERSION,
            "constellation": eng.text_id, "name": eng.name, "genesis": _b64(eng.genesis.raw),
            "exported_at": int(time.time() * 1000), "exported_by": str(eng.identity.member)}
    items: list[dict[str, Any]] = [head]
    ordered = {b.id for b, _ in committed}
    for i, (b, anchor) in enumerate(committed):
        items.append({"kind": "block", "commit": i, "anchor_round": anchor, "id": b.id.hex(),
                      "round": b.round, "author": str(b.author), "created": b.created, "raw": _b64(b.raw)})
    for b in sorted((b for b in blocks.values() if b.id not in ordered), key=lambda b: (b.round, b.id)):
        items.append({"kind": "block", "commit": None, "anchor_round": None, "id": b.id.hex(),
                      "round": b.round, "author": str(b.author), "created": b.created, "raw": _b64(b.raw)})
    items.extend(rep.records)
    for cp in stored_checkpoints:
        cert = CheckpointCertificate(cp.content, tuple((MemberId(k), v) for k, v in cp.signatures.items()))
        committee = rep.committee_of(cp.epoch)
        try:
            if committee is None:
                continue
            cert.verify(committee)
        except ValuemeshError:
            continue  # signatures still being gathered: not yet a certificate
        items.append({"kind": "checkpoint", "epoch": cp.epoch, "round": cp.round, "index": cp.index,
                      "state_hash": cp.state_hash.hex(), "snapshot_hash": cp.snapshot_hash.hex(),
                      "next_committee": cp.next_committee.hex(),
                      "sigs": [[str(MemberId(k)), _b64(v)] for k, v in sorted(cp.signatures.items())]})
    items.append({"kind": "end", "state_hash": rep.ledger.state_hash().hex(), "records": len(rep.records),
                  "commits": len(committed), "blocks": len(blocks)})
    return items


def _checkpoint_hash(it: Mapping[str, Any], key: str, n: int) -> bytes:
    v = it.get(key)
    if not isinstance(v, str) or len(v) != 64:
        raise DecodeError(f"The checkpoint on line {n} is malformed.")
    try:
        return bytes.fromhex(v)
    except ValueError:
        raise DecodeError(f"The checkpoint on line {n} is malformed.") from None


def _checkpoint_item(cid: bytes, it: Mapping[str, Any], n: int) -> CheckpointCertificate:
    epoch, rnd, index, sigs = it.get("epoch"), it.get("round"), it.get("index"), it.get("sigs")
    if not (all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (epoch, rnd, index))
            and isinstance(sigs, list) and len(sigs) <= 512):
        raise DecodeError(f"The checkpoint on line {n} is malformed.")
    assert isinstance(epoch, int) and isinstance(rnd, int) and isinstance(index, int) and isinstance(sigs, list)
    pairs = []
    for pair in sigs:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
            raise DecodeError(f"The checkpoint on line {n} is malformed.")
        pairs.append((MemberId.parse(pair[0]), _unb64(pair[1], f"checkpoint signature on line {n}")))
    content = Content(cid, epoch, rnd, index, _checkpoint_hash(it, "state_hash", n),
                      _checkpoint_hash(it, "snapshot_hash", n), _checkpoint_hash(it, "next_committee", n))
    return CheckpointCertificate(content, tuple(pairs))


def archive_jsonl(items: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    for it in items:
        yield json.dumps(it, sort_keys=True, separators=(",", ":")) + "\n"


def _cell(v: str) -> str:
    # Spreadsheets run a cell starting with = + - @ as a formula, and record types and reasons
    # are text from other members; a leading quote defuses it and is removed again on import.
    return "'" + v if v[:1] in _FORMULA_START else v


def _uncell(v: str) -> str:
    return v[1:] if v.startswith("'") else v


def archive_csv(items: Iterable[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for it in items:
        row = []
        rest = {k: v for k, v in it.items() if k not in CSV_COLUMNS}
        for col in CSV_COLUMNS:
            if col == "data":
                row.append(json.dumps(rest, sort_keys=True, separators=(",", ":")) if rest else "")
            else:
                v = it.get(col)
                row.append("" if v is None else _cell(str(v)))
        w.writerow(row)
    return buf.getvalue()


def _items_from_csv(text: str) -> list[dict[str, Any]]:
    # A block's base64 cell is far over csv's default field limit of 128 KiB.
    csv.field_size_limit(max(csv.field_size_limit(), MAX_ARCHIVE_LINE))
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if header is None or tuple(header) != CSV_COLUMNS:
        raise DecodeError("The CSV archive does not start with valuemesh's archive columns.")
    out = []
    for n, row in enumerate(rows, start=2):
        if len(row) != len(CSV_COLUMNS):
            raise DecodeError(f"Line {n} of the CSV archive has {len(row)} columns, not {len(CSV_COLUMNS)}.")
        it: dict[str, Any] = {}
        for col, v in zip(CSV_COLUMNS, row, strict=True):
            if col == "data":
                if v:
                    extra = json.loads(v)
                    if not isinstance(extra, dict):
                        raise DecodeError(f"Line {n} of the CSV archive has a malformed data column.")
                    it.update(extra)
            elif v == "":
                it[col] = "" if col == "reason" else None
            elif (v := _uncell(v)) == "":
                raise DecodeError(f"Line {n} of the CSV archive has a malformed {col}.")
            elif col in _INT_FIELDS:
                if not v.isdigit() or len(v) > 20:
                    raise DecodeError(f"Line {n} of the CSV archive has a malformed {col}.")
                it[col] = int(v)
            else:
                it[col] = v
        out.append(it)
    return out


def read_archive(path: Path) -> list[dict[str, Any]]:
    """The items of a JSONL or CSV archive file; DecodeError if it is not one."""
    try:
        size = path.stat().st_size
        if size > MAX_ARCHIVE_BYTES:
            raise DecodeError(f"The archive is {size} bytes, over the limit of {MAX_ARCHIVE_BYTES}.")
        data = path.read_bytes()
    except OSError as exc:
        raise LocalError(f"Cannot read {path}: {exc.strerror or exc}.") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("The archive is not UTF-8 text.") from None
    if text.lstrip().startswith("{") and '"@context"' in text[:4096]:
        try:
            whole = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            whole = None
        if isinstance(whole, dict) and "@context" in whole:
            raise DecodeError("This is a ValueFlows view, which is for other tools; import a jsonl or csv archive.")
    try:
        if text.startswith("kind,"):
            items = _items_from_csv(text)
        else:
            items = []
            for n, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                if len(line) > MAX_ARCHIVE_LINE:
                    raise DecodeError(f"Line {n} of the archive is over the size limit.")
                it = json.loads(line)
                if not isinstance(it, dict):
                    raise DecodeError(f"Line {n} of the archive is not a JSON object.")
                items.append(it)
                if len(items) > MAX_ARCHIVE_ITEMS:
                    raise DecodeError("The archive has too many lines.")
    except (json.JSONDecodeError, csv.Error):
        raise DecodeError("The archive is neither valuemesh JSONL nor CSV (it does not parse).") from None
    except RecursionError:
        raise DecodeError("The archive nests too deeply.") from None
    return items


@dataclass(frozen=True, slots=True)
class VerifiedArchive:
    """An archive whose every signature, commit and record was checked against a replay."""

    genesis: Record
    blocks: list[Block]
    commits: list[CommitEntry]
    replay: Replay
    name: str
    checkpoints: list[int]  # epochs whose quorum-signed checkpoint the archive carried and matched

    @property
    def cid(self) -> bytes:
        return self.genesis.constellation

    def summary(self) -> dict[str, Any]:
        state = self.replay.ledger.reader
        dists = [bytes.fromhex(k[2:]) for k, _ in state.scan(DISTRIBUTION_NS, "d/")]
        return {"constellation": constellation_text(self.cid), "name": self.name,
                "state_hash": self.replay.ledger.state_hash().hex(), "records": len(self.replay.records),
                "blocks": len(self.blocks), "commits": len(self.commits), "checkpoints": self.checkpoints,
                "distributions": verify_view(state, dists)}


def verify_archive(items: list[dict[str, Any]], registry: Registry) -> VerifiedArchive:
    """Check an archive offline; raise a typed one-sentence error at the first fault.

    Every block and record signature is verified; the commit order is re-derived from the
    blocks by the consensus rule (never trusted); the ledger is replayed, and the record
    list and state hash must be exactly those the archive states.
    """
    if not items or items[0].get("kind") != "archive" or items[0].get("format") != ARCHIVE_FORMAT:
        raise DecodeError("The file is not a valuemesh archive (its first line is not the archive header).")
    head = items[0]
    version = head.get("v")
    if version not in READABLE_ARCHIVE_VERSIONS:
        raise DecodeError("This valuemesh reads archive versions 1 and 2 only.")
    genesis = decode_record(_unb64(head.get("genesis"), "genesis"))
    cid = genesis.constellation
    if genesis.type != "membership" or genesis.seq != 0 or genesis.body.get("op") != "genesis":
        raise ValidationError("The archive's genesis is not a genesis record.")
    named = head.get("constellation")
    if not isinstance(named, str) or parse_constellation(named) != cid:
        raise ValidationError("The archive's header names another constellation than its genesis.")
    if items[-1].get("kind") != "end":
        raise DecodeError("The archive is cut short (it has no closing line).")
    end = items[-1]
    blocks: dict[bytes, Block] = {}
    commits: list[CommitEntry] = []
    stated: list[dict[str, Any]] = []
    certs: list[CheckpointCertificate] = []
    for n, it in enumerate(items[1:-1], start=2):
        kind = it.get("kind")
        if kind == "block":
            b = decode_block(_unb64(it.get("raw"), f"block on line {n}"))
            if b.constellation != cid:
                raise ValidationError(f"The block on line {n} belongs to another constellation.")
            if it.get("id") != b.id.hex():
                raise ValidationError(f"The block on line {n} does not have the id the archive states.")
            if b.id in blocks:
                raise ValidationError(f"The block on line {n} appears twice.")
            blocks[b.id] = b
            c, ar = it.get("commit"), it.get("anchor_round")
            if c is not None:
                if c != len(commits) or not isinstance(ar, int) or isinstance(ar, bool) or ar < 0:
                    raise ValidationError(f"The block on line {n} breaks the archive's commit sequence.")
                commits.append(CommitEntry(c, b.id, ar))
        elif kind == "record":
            stated.append(it)
        elif kind == "checkpoint":
            if version != 1:
                certs.append(_checkpoint_item(cid, it, n))
        else:
            raise DecodeError(f"Line {n} of the archive is of an unknown kind.")
    rep = replay(registry, genesis, [(blocks[e.block_id], e.anchor_round) for e in commits])
    # The order is derived from the DAG, so a reordered or forged commit list fails here.
    cons = Consensus(cid, rep.first, None)
    try:
        cons.restore(list(blocks.values()), [e.block_id for e in commits], rep.committees)
    except LocalError:
        raise ValidationError("The archive's commit order is not the one its blocks decide.") from None
    if len(stated) != len(rep.records):
        raise ValidationError(f"The archive lists {len(stated)} final records; its blocks make "
                              f"{len(rep.records)} final.")
    for got, want in zip(stated, rep.records, strict=True):
        for k in ("id", "status", "reason", "raw", "index", "type", "author", "seq"):
            if got.get(k) != want[k]:
                raise ValidationError(f"Final record {want['index']} ({want['id'][:12]}) differs from what "
                                      f"its block says (field '{k}').")
    if end.get("state_hash") != rep.ledger.state_hash().hex():
        raise ValidationError("The archive's state hash is not the one its records produce.")
    for cert in certs:
        # A quorum of the epoch's own committee signed the state its blocks close the epoch with.
        committee = rep.committee_of(cert.epoch)
        if committee is None or cert.epoch not in rep.closes:
            raise ValidationError(f"The archive's checkpoint of epoch {cert.epoch} is of an epoch its blocks "
                                  "never close.")
        cert.verify(committee)
        if rep.closes[cert.epoch] != cert.content:
            raise ValidationError(f"The archive's checkpoint of epoch {cert.epoch} is not the state its blocks "
                                  "close that epoch with.")
    return VerifiedArchive(genesis, list(blocks.values()), commits, rep, str(head.get("name", ""))[:200],
                           sorted(c.epoch for c in certs))


async def load_archive(store: Store, archive: VerifiedArchive, identity: Identity) -> None:
    """Write a verified archive into a node's store; the node replays it when it starts."""
    if await store.constellation(archive.cid) is not None:
        raise LocalError(f"This node already follows {constellation_text(archive.cid)}; "
                         "import into a fresh home.")
    state = archive.replay.ledger.reader
    if state.member(identity.member.key) is not None:
        # A member's node restored from an archive older than its last block could sign a
        # second block for a round it already signed: an equivocation. Members catch up from peers.
        raise LocalError("This home's member belongs to that constellation; a member's node must catch up "
                         "from its peers, not from an archive (import into a home of another identity).")
    tier = "applicant"
    meta = state.read("membership", "meta")
    plugins = {k: Version.parse(v).major for k, v in meta["plugins"].items()}
    now = int(time.time() * 1000)
    g = archive.genesis
    async with store.batch() as tx:
        tx.put_constellation(ConstellationInfo(g.constellation, g.raw, now, "active", tier, plugins,
                                               archive.name))
        tx.put_records([g], now)
    for i in range(0, len(archive.blocks), LOAD_CHUNK):
        async with store.batch() as tx:
            chunk = archive.blocks[i:i + LOAD_CHUNK]
            tx.put_blocks(chunk, now)
            tx.put_records([r for b in chunk for r in b.records], now)
    for i in range(0, len(archive.commits), LOAD_CHUNK):
        async with store.batch() as tx:
            tx.append_commits(g.constellation, archive.commits[i:i + LOAD_CHUNK])


# --------------------------------------------------------------------------- routes


def add_accounting_routes(routes: web.RouteTableDef, node: Node) -> None:
    """Add the accounting and archive routes to the daemon's API (called by make_app)."""

    ok, body = json_ok, read_json_object

    def engine(request: web.Request) -> Engine:
        return node.engine_for(request.match_info["cid"])

    base = "/v1/constellations/{cid}/accounting"

    @routes.get(f"{base}/agreements")
    async def agreements(request: web.Request) -> web.Response:
        """Agreements with their terms, parties and signatures."""
        return ok({"agreements": agreements_view(engine(request).ledger.reader)})

    @routes.get(f"{base}/revenues")
    async def revenues(request: web.Request) -> web.Response:
        """Final revenue records and the distribution that split each."""
        return ok({"revenues": revenues_view(engine(request).ledger.reader)})

    @routes.get(f"{base}/policies")
    async def policies(request: web.Request) -> web.Response:
        """The adopted split policy and every proposal with votes and outcome."""
        return ok(policies_view(engine(request).ledger.reader))

    @routes.post(f"{base}/split")
    async def split(request: web.Request) -> web.Response:
        """Preview a revenue's split under the adopted, a proposed or a given policy (adopts nothing)."""
        doc = await body(request)
        return ok(split_view(engine(request).ledger.reader, doc))

    @routes.get(f"{base}/distributions")
    async def distributions(request: web.Request) -> web.Response:
        """Proposed and final distributions with their lines and signatures."""
        return ok({"distributions": distributions_view(engine(request).ledger.reader)})

    @routes.post(f"{base}/distributions")
    async def propose(request: web.Request) -> web.Response:
        """Propose the split every node computes now for a revenue."""
        doc = await body(request)
        eng = engine(request)
        state = eng.ledger.reader
        rid = _revenue_arg(state, doc.get("revenue"))
        if state.read(DISTRIBUTION_NS, f"done/{rid.hex()}") is not None:
            raise LocalError("This revenue already has a final distribution.")
        policy, _ = current_policy(state)
        dist = try_policy(state, rid, policy)
        res = await node.submit(eng, "distribution", {"op": "propose", "revenue": rid, "hash": dist.hash,
                                                      "policy": dist.policy_hash, "root": dist.inputs_root})
        return ok({**res, "revenue": rid.hex(), "distribution": distribution_json(state, dist),
                   "ratifiers": [_who(state, k) for k in ratifiers(state, policy, dist)]}, 202)

    @routes.post(f"{base}/distributions/{{did}}/ratify")
    async def ratify(request: web.Request) -> web.Response:
        """Ratify a proposed distribution (optionally pinned to the hash reviewed)."""
        doc = await body(request)
        eng = engine(request)
        did = _hex32(request.match_info["did"], "A distribution id")
        d = eng.ledger.reader.read(DISTRIBUTION_NS, f"d/{did.hex()}")
        if not isinstance(d, dict):
            raise NotFound("There is no final distribution proposal with that id.")
        if doc.get("hash") is not None and _hex32(doc["hash"], "The hash") != d["hash"]:
            raise LocalError("The distribution's hash is not the one you reviewed; look at it again.")
        res = await node.submit(eng, "distribution", {"op": "ratify", "distribution": did, "hash": d["hash"]})
        return ok({**res, "distribution": did.hex(), "hash": d["hash"].hex()}, 202)

    @routes.post(f"{base}/verify")
    async def verify(request: web.Request) -> web.Response:
        """Re-verify distributions from the inputs and policy they carry."""
        doc = await body(request)
        state = engine(request).ledger.reader
        wanted = doc.get("distributions")
        if wanted is None:
            ids = [bytes.fromhex(k[2:]) for k, _ in state.scan(DISTRIBUTION_NS, "d/")]
        elif isinstance(wanted, list) and len(wanted) <= 1000:
            ids = [_hex32(x, "A distribution id") for x in wanted]
            for did in ids:
                if state.read(DISTRIBUTION_NS, f"d/{did.hex()}") is None:
                    raise NotFound(f"There is no final distribution {did.hex()[:16]}… in this constellation.")
        else:
            raise LocalError("Give the distributions to verify as a list of ids.")
        if not ids:
            raise LocalError("There is no distribution to verify yet.")
        return ok(verify_view(state, ids))

    @routes.get("/v1/constellations/{cid}/export")
    async def export(request: web.Request) -> web.Response:
        """The signed archive: every block and final record in consensus order."""
        eng = engine(request)
        assert node.store is not None
        return ok({"items": await build_archive(node.store, eng, node.registry)})

    @routes.get("/v1/constellations/{cid}/valueflows")
    async def valueflows(request: web.Request) -> web.Response:
        """A ValueFlows JSON-LD view of the final ledger."""
        eng = engine(request)
        return ok(valueflows_view(eng.ledger.reader, eng.cid))
