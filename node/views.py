"""The JSON views of one constellation's engine that the local API serves: its summary,
its ledger (final and pending records), its members, one record, the latest checkpoint.

They only read the engine (and, for a record beyond the in-memory list, the store); the
one thing they write is the engine's memo of a final record's JSON, made on first read.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from valuemesh.node.engine import Engine
from valuemesh.node.jsonbody import body_to_json
from valuemesh.protocol.consensus import Committee
from valuemesh.protocol.errors import LocalError, NotFoundError
from valuemesh.protocol.identity import MemberId

GUARANTEE_TEXT = {
    "single-node": "1 core member: it finalises alone, and if this node is lost nothing else holds the data; "
                   "add a core member.",
    "no-fault-tolerance": "2 core members: both must be online to finalise, so losing either stops agreement; "
                          "add a third core member (or a witness seat).",
}


def guarantee_text(committee: Committee) -> str:
    """What the committee's agreement guarantee means for its members, in one sentence."""
    g = committee.guarantee
    if g in GUARANTEE_TEXT:
        return GUARANTEE_TEXT[g]
    n = len(committee.members)
    if g.startswith("crash-tolerant"):
        crash = committee.total - committee.quorum
        return (f"{n} core members: survives {crash} member(s) going offline but cannot tolerate a dishonest "
                f"member; add core members until there are 4 to tolerate one.")
    return f"{n} core members: survives {committee.f} member(s) offline or dishonest."


def reach(committee: Committee, me: MemberId, linked: Collection[MemberId]) -> dict[str, Any]:
    """What this node can reach of the core *now*: the core members it holds an open link to
    (itself included when it is one), by head and by weight, and whether that is enough for
    new records to become final: a quorum of the weight for a core member, at least one core
    member for anyone else (who hands its records to the core to be ordered).

    Direct links only: blocks do travel further through peers that fetch each other's
    parents, so a node short of a quorum may still see records become final; what it cannot
    promise is that they will, which is what a member needs to know."""
    reachable = [m for m, _ in committee.members if m == me or m in linked]
    weight = sum(committee.weight(m) for m in reachable)
    n = len(committee.members)
    need = committee.quorum if me in committee else 1
    ok = weight >= need
    text = f"reachable core: {len(reachable)} of {n}"
    if n == 1 and me in committee:
        text += " (this node) — new records become final here"
    elif ok:
        text += " — new records can become final"
        if me in committee:
            # How many of the others can drop off, the heaviest first, with a quorum left.
            spare, left = 0, weight
            for w in sorted((committee.weight(m) for m in reachable if m != me), reverse=True):
                if left - w < need:
                    break
                spare, left = spare + 1, left - w
            text += f"; {spare} more may go offline" if spare else "; losing one more stops it"
    else:
        text += " — new records cannot become final"
    return {"core": n, "reachable": len(reachable), "weight": weight, "quorum": committee.quorum,
            "enough": ok, "text": text}


def final_entry(eng: Engine, pos: int) -> dict[str, Any]:
    """The JSON of the engine's `pos`-th listed final record, rendered once and kept."""
    item = eng.final_log[pos]
    if isinstance(item, dict):
        return item
    index, o = item
    r = o.record
    entry = {
        "index": index,
        "id": r.id.hex(),
        "type": r.type,
        "author": str(r.author),
        "seq": r.seq,
        "body": body_to_json(eng.registry.plugins.get(r.type), r.body),
        "created": r.created,
        "status": o.status,
    }
    if o.reason:
        entry["reason"] = o.reason
    eng.final_log[pos] = entry
    return entry


def final(eng: Engine) -> list[dict[str, Any]]:
    """The first FINAL_VIEW_LIMIT final records, as JSON."""
    return [final_entry(eng, i) for i in range(len(eng.final_log))]


def ledger_view(eng: Engine) -> dict[str, Any]:
    return {
        "constellation": eng.text_id,
        "name": eng.name,
        "final": final(eng),
        "final_at": eng.final_at,
        "pending": [
            {"id": r.id.hex(), "type": r.type, "author": str(r.author), "seq": r.seq,
             "body": body_to_json(eng.registry.plugins.get(r.type), r.body), "created": r.created}
            for r in sorted(eng.pending.values(), key=lambda r: (r.author.key, r.seq))
        ],
        "state_hash": eng.ledger.state_hash().hex(),
        "final_count": eng.final_count,
    }


def members(eng: Engine) -> list[dict[str, Any]]:
    out = []
    for key, m in eng.ledger.reader.scan("membership", "m/"):
        out.append({"member": str(MemberId(bytes.fromhex(key[2:]))), "name": m.get("name", ""),
                    "roles": m.get("roles", []), "tier": m.get("tier"), "status": m.get("status"),
                    "weight": m.get("weight", 1)})
    return out


def summary(eng: Engine) -> dict[str, Any]:
    meta = eng.ledger.reader.read("membership", "meta") or {}
    listed = members(eng)
    active = [m for m in listed if m["status"] == "active"]
    lat = sorted(eng.recent_commit_latency_ms)
    return {
        "id": eng.text_id,
        "name": meta.get("name", ""),
        "purpose": meta.get("purpose", ""),
        "status": "dissolved" if eng.ledger.dissolved else "active",
        "plugins": meta.get("plugins", {}),
        "member_list": listed,
        "members": len(active),
        "core": sum(1 for m in active if m["tier"] == "core"),
        "my_tier": eng.my_tier(),
        "final": eng.final_count,
        "pending": len(eng.pending),
        "round": eng.consensus.round,
        "epoch": eng.committee.epoch,
        "guarantee": eng.committee.guarantee,
        "guarantee_text": guarantee_text(eng.committee),
        "state_hash": eng.ledger.state_hash().hex(),
        "catchup": dict(eng.catchup),
        "checkpoint": checkpoint_view(eng),
        # A node that started from a checkpoint holds the state, not the history before it.
        "started_from": None if eng.base is None else {
            "epoch": eng.base.epoch, "round": eng.base.round, "index": eng.base.index,
            "final": eng.base.final},
        "finality_ms_p50": lat[len(lat) // 2] if lat else None,
    }


def checkpoint_view(eng: Engine) -> dict[str, Any] | None:
    """The latest certified epoch end and who signed it; None before the first."""
    if not eng.certified:
        return None
    c = eng.certified[max(eng.certified)]
    return {"epoch": c.epoch, "round": c.round, "index": c.index, "state_hash": c.state_hash.hex(),
            "snapshot_hash": c.snapshot_hash.hex(),
            "signers": [str(MemberId(k)) for k in sorted(c.signatures)]}


async def record_view(eng: Engine, rid: str) -> dict[str, Any]:
    """One record of the constellation by id, final or pending; NotFoundError if neither."""
    try:
        key = bytes.fromhex(rid)
    except ValueError:
        raise LocalError(f"'{rid}' is not a record id (64 hex characters).") from None
    pos = eng.final_pos.get(key.hex())
    if pos is not None:
        return {**final_entry(eng, pos), "final": True}
    r = eng.pending.get(key)
    is_final = False
    if r is None and await eng.store.record_status(key) == "final":
        # Beyond the in-memory view (FINAL_VIEW_LIMIT): the store still knows it.
        r, is_final = await eng.store.get_record(key), True
    if r is not None and r.constellation == eng.cid:
        return {"id": rid, "type": r.type, "author": str(r.author), "seq": r.seq, "final": is_final,
                "body": body_to_json(eng.registry.plugins.get(r.type), r.body)}
    raise NotFoundError(f"No record {rid[:16]}… in this constellation.")
