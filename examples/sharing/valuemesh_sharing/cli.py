"""`valuemesh sharing offer|need|match|return|claim|withdraw|list`: the plugin's
commands, thin clients of the local daemon's API like every valuemesh command.

After a return becomes final, `return` records the loan as the lender's
contribution (a `contribution.record` citing the return as evidence); see README.md.
"""

from __future__ import annotations

import re
import time
from typing import Any

import click
from valuemesh.plugin import Json, Submitted, api, emit, fail, json_option, submit

from .plugin import NAME

FINAL_WAIT_S = 60.0
POLL_S = 0.3
MIN_PREFIX = 6
EVIDENCE_URI = "valuemesh:sharing/completed/"
_HEX = re.compile(r"^[0-9a-f]+$")


def _state(cid: str) -> dict[str, Any]:
    doc: dict[str, Any] = api().call("GET", f"/plugins/{NAME}/{cid.strip().lower()}")
    return doc


def _resolve(cid: str, given: str, *collections: str) -> str:
    """A full record id from a full id or a unique prefix of a final offer/need/loan."""
    text = given.strip().lower()
    if not _HEX.match(text) or len(text) > 64:
        fail(f"'{given}' is not a record id (hex).")
    if len(text) == 64:
        return text
    if len(text) < MIN_PREFIX:
        fail(f"'{given}' is too short; give at least {MIN_PREFIX} hex characters of the id.")
    state = _state(cid)
    hits: list[str] = sorted({e["id"] for c in collections for e in state[c] if e["id"].startswith(text)})
    if not hits:
        fail(f"No final {' or '.join(c.rstrip('s') for c in collections)} has an id starting with '{text}'.")
    if len(hits) > 1:
        fail(f"'{text}' matches {len(hits)} ids; give more characters.")
    return hits[0]


def _posting_body(op: str, title: str, note: str, category: str) -> dict[str, Any]:
    body: dict[str, Any] = {"op": op, "title": title}
    if note:
        body["note"] = note
    if category:
        body["category"] = category
    return body


@click.group(NAME)
def sharing() -> None:
    """Lend and borrow idle things inside a constellation."""


@sharing.command()
@click.argument("cid")
@click.argument("title")
@click.option("--note", default="", help="Details: condition, where to pick it up, …")
@click.option("--category", default="", help="tools, kitchen, books, …")
@json_option
def offer(cid: str, title: str, note: str, category: str) -> None:
    """Offer something you can lend."""
    doc = submit(cid, NAME, _posting_body("offer", title, note, category))
    emit(doc, f"offer {doc['id']} ({doc['status']})")


@sharing.command()
@click.argument("cid")
@click.argument("title")
@click.option("--note", default="", help="Details: for how long, when, …")
@click.option("--category", default="", help="tools, kitchen, books, …")
@json_option
def need(cid: str, title: str, note: str, category: str) -> None:
    """Post something you need to borrow."""
    doc = submit(cid, NAME, _posting_body("need", title, note, category))
    emit(doc, f"need {doc['id']} ({doc['status']})")


@sharing.command()
@click.argument("cid")
@click.argument("offer_id")
@click.argument("need_id")
@json_option
def match(cid: str, offer_id: str, need_id: str) -> None:
    """Match a need to an offer: by the lender this starts the loan, by anyone else it proposes it."""
    body = {"op": "match", "offer": _resolve(cid, offer_id, "offers"), "need": _resolve(cid, need_id, "needs")}
    doc = submit(cid, NAME, body)
    offer_entry = next((o for o in _state(cid)["offers"] if o["id"] == body["offer"]), None)
    lender = offer_entry is not None and offer_entry["lender"] == api().call("GET", "/v1/id")["member"]
    then = "the loan starts when it is final" if lender else "the lender confirms it by matching the same pair"
    emit(doc, f"match {doc['id']} ({doc['status']}); {then}")


def _wait_final(cid: str, rid: str, wait: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + wait
    while True:
        rec: dict[str, Any] = api().call("GET", f"/v1/constellations/{cid}/records/{rid}")
        if rec.get("final"):
            return rec
        if time.monotonic() >= deadline:
            return None
        time.sleep(POLL_S)


def _claim(cid: str, rid: str) -> Submitted:
    """Submit the contribution for the completed loan `rid`; refuse a second claim."""
    state = _state(cid)
    loan = next((c for c in state["completed"] if c["id"] == rid), None)
    if loan is None:
        fail(f"No completed loan has the return id {rid[:16]}….")
    me = api().call("GET", "/v1/id")["member"]
    if loan["lender"] != me:
        fail("Only the lender can record a loan as their contribution.")
    ledger = api().call("GET", f"/v1/constellations/{cid}/ledger")
    for r in [*ledger["final"], *ledger["pending"]]:
        ev = r["body"].get("evidence") if r["type"] == "contribution" else None
        if isinstance(ev, dict) and ev.get("hash") == rid and r.get("status", "applied") == "applied":
            fail(f"This loan is already recorded as contribution {r['id'][:16]}….")
    body: dict[str, Json] = {"op": "record", "action": "use", "quantity": str(loan["days"]), "unit": "day",
            "note": f"lent '{loan['title']}' to {loan['borrower'][:16]}… ({NAME})"[:1000],
            "evidence": {"uri": EVIDENCE_URI + rid, "hash": rid}}
    return submit(cid, "contribution", body)


@sharing.command("return")
@click.argument("cid")
@click.argument("offer_id")
@click.option("--note", default="", help="How it came back.")
@click.option("--wait", type=click.FloatRange(0, 600), default=FINAL_WAIT_S, show_default=True,
              help="Seconds to wait for the return to become final before recording the contribution.")
@click.option("--no-contribution", is_flag=True, help="Only confirm the return; claim it later with 'claim'.")
@json_option
def return_(cid: str, offer_id: str, note: str, wait: float, no_contribution: bool) -> None:
    """Confirm, as the lender, that a lent thing came back; then record the loan as your contribution."""
    cid = cid.strip().lower()
    body: dict[str, Any] = {"op": "return", "offer": _resolve(cid, offer_id, "offers")}
    if note:
        body["note"] = note
    doc = submit(cid, NAME, body)
    out: dict[str, Any] = {"return": doc, "contribution": None}
    if no_contribution:
        emit(out, f"return {doc['id']} ({doc['status']})")
        return
    rec = _wait_final(cid, doc["id"], wait)
    if rec is None:
        fail(f"The return {doc['id']} is recorded but not final after {wait:.0f} s; run "
             f"'valuemesh {NAME} claim {cid} {doc['id']}' once it is.")
    if rec.get("status") != "applied":
        fail(f"The return was refused when it became final: {rec.get('reason', 'no reason given')}")
    out["contribution"] = _claim(cid, doc["id"])
    emit(out, f"return {doc['id']} (final)\ncontribution {out['contribution']['id']} "
              f"({out['contribution']['status']})")


@sharing.command()
@click.argument("cid")
@click.argument("return_id")
@json_option
def claim(cid: str, return_id: str) -> None:
    """Record a completed loan (by its return id) as your contribution, if not yet recorded."""
    cid = cid.strip().lower()
    doc = _claim(cid, _resolve(cid, return_id, "completed"))
    emit(doc, f"contribution {doc['id']} ({doc['status']})")


@sharing.command()
@click.argument("cid")
@click.argument("record_id")
@json_option
def withdraw(cid: str, record_id: str) -> None:
    """Withdraw your available offer or open need."""
    doc = submit(cid, NAME, {"op": "withdraw", "target": _resolve(cid, record_id, "offers", "needs")})
    emit(doc, f"withdraw {doc['id']} ({doc['status']})")


@sharing.command("list")
@click.argument("cid")
@click.option("--all", "show_all", is_flag=True, help="Include withdrawn offers and closed needs.")
@json_option
def list_(cid: str, show_all: bool) -> None:
    """Offers, needs, proposed matches and completed loans (final state only)."""
    state = _state(cid)
    offers = [o for o in state["offers"] if show_all or o["status"] != "withdrawn"]
    needs = [n for n in state["needs"] if show_all or n["status"] in ("open", "matched")]
    lines = [f"offers ({len(offers)}):"]
    for o in offers:
        loan = f" to {o['loan']['borrower'][:16]}…" if o.get("loan") else ""
        lines.append(f"  {o['id'][:12]}  {o['status']:<9}{loan}  {o['title']}  by {o['lender'][:16]}…")
    lines.append(f"needs ({len(needs)}):")
    for n in needs:
        lines.append(f"  {n['id'][:12]}  {n['status']:<9}  {n['title']}  by {n['borrower'][:16]}…")
    lines.append(f"proposed matches ({len(state['proposals'])}):")
    for p in state["proposals"]:
        lines.append(f"  offer {p['offer'][:12]} <- need {p['need'][:12]}  by {p['by'][:16]}…")
    lines.append(f"completed loans ({len(state['completed'])}):")
    for c in state["completed"]:
        lines.append(f"  {c['id'][:12]}  {c['title']}  {c['days']} day(s)  lender {c['lender'][:16]}…")
    emit({**state, "offers": offers, "needs": needs}, "\n".join(lines))
