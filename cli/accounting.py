"""The accounting commands of the `valuemesh` CLI: agreements, revenue, policies, splits,
distributions, and the signed archive (export, and import which runs without a daemon).

`register(cli)` mounts them on the main group; every command is a thin client of the
daemon's accounting routes (node/accounting_api.py) except `import`, which works offline.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import click

from valuemesh.cli.common import (
    current,
    emit,
    fail,
    json_option,
    parse_cid,
    parse_duration,
    parse_hex_id,
    parse_member,
    submit,
    wait_final,
    wait_option,
)
from valuemesh.protocol.errors import LocalError

_BPS = re.compile(r"^(\d{1,5})bps$")
TERM_KINDS = ("reimbursement", "fee", "investor_return", "rebate")
MAX_POLICY_FILE = 64 * 1024


# --------------------------------------------------------------------------- helpers


def _call(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    return current().api.call(method, path, body)


def _acct(cid: str, rest: str) -> str:
    return f"/v1/constellations/{parse_cid(cid)}/accounting/{rest}"


def _name(w: dict[str, str]) -> str:
    return f"{w['name']} ({w['member'][:12]}…)" if w["name"] and w["member"] != "commons" else \
        (w["member"] if w["member"] == "commons" else w["member"][:16] + "…")


def _json_file(path: str, what: str) -> Any:
    p = Path(path)
    try:
        if p.stat().st_size > MAX_POLICY_FILE:
            raise LocalError(f"The {what} file is larger than {MAX_POLICY_FILE} bytes.")
        return json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise LocalError(f"Cannot read {path}: {exc.strerror or exc}.") from None
    except (ValueError, UnicodeDecodeError):
        raise LocalError(f"The {what} file {path} is not valid JSON.") from None


def _policy_file(path: str) -> dict[str, Any]:
    from valuemesh.protocol.accounting import parse_policy

    doc = _json_file(path, "policy")
    parse_policy(doc)  # one sentence on a bad policy, before anything is sent
    assert isinstance(doc, dict)
    return doc


# --------------------------------------------------------------------------- agreement


def _term(kind: str, text: str) -> dict[str, Any]:
    """`MEMBER=500bps[:cap=AMOUNT]` or `MEMBER=AMOUNT` into an agreement term."""
    who, sep, rest = text.partition("=")
    if not sep or not rest:
        raise LocalError(f"Write the {kind.replace('_', ' ')} term as MEMBER=AMOUNT or MEMBER=BPSbps[:cap=AMOUNT].")
    value, _, cap = rest.partition(":cap=")
    term: dict[str, Any] = {"kind": kind, "to": parse_member(who)}
    m = _BPS.match(value.strip())
    if m:
        term["bps"] = int(m.group(1))
    else:
        term["amount"] = value.strip()
    if cap:
        term["cap"] = cap.strip()
    return term


def _show_agreement(a: dict[str, Any]) -> str:
    lines = [f"{a['id']}  {a['title']}  [{a['status']}]  {a['currency']}, applies to {a['applies']} revenue",
             "  parties: " + ", ".join(_name(p) for p in a["parties"])]
    if a["missing"]:
        lines.append("  waiting for: " + ", ".join(_name(p) for p in a["missing"]))
    for t in a["terms"]:
        what = t["amount"] if t["amount"] is not None else f"{t['bps']} bps"
        cap = f" up to {t['cap']}" if t["cap"] else ""
        to = f" to {t['to'][:16]}…" if t["to"] else ""
        lines.append(f"  {t['kind']:<16} {what}{cap}{to}")
    return "\n".join(lines)


@click.group()
def agreement() -> None:
    """Propose, sign and list agreements (fixed terms signed by every party)."""


@agreement.command("propose")
@click.argument("cid")
@click.option("--title", required=True, help="What the agreement is about.")
@click.option("--currency", required=True, help="EUR, JPY, … or any code with --exponent.")
@click.option("--exponent", type=click.IntRange(0, 8), default=None, help="Decimals of a non-ISO currency.")
@click.option("--party", "parties", multiple=True, help="Another party (vm1…); repeatable.")
@click.option("--customer", default=None, help="The customer party, whose revenue realises it.")
@click.option("--price", default=None, help="The agreed price, e.g. 1200.00.")
@click.option("--fee", multiple=True, metavar="MEMBER=AMOUNT|Nbps[:cap=AMOUNT]", help="A facilitator's fee.")
@click.option("--reimbursement", multiple=True, metavar="MEMBER=AMOUNT|Nbps", help="Repaying an expense.")
@click.option("--investor-return", "investor_return", multiple=True, metavar="MEMBER=AMOUNT|Nbps[:cap=AMOUNT]",
              help="An investor's return.")
@click.option("--rebate", multiple=True, metavar="MEMBER=AMOUNT|Nbps", help="A customer's rebate.")
@click.option("--applies", type=click.Choice(["linked", "all"]), default=None,
              help="linked: revenue naming it (default); all: every later revenue in its currency.")
@click.option("--note", default="", help="Anything else the parties agreed.")
@wait_option
@json_option
def agreement_propose(cid: str, title: str, currency: str, exponent: int | None, parties: tuple[str, ...],
                      customer: str | None, price: str | None, fee: tuple[str, ...],
                      reimbursement: tuple[str, ...], investor_return: tuple[str, ...],
                      rebate: tuple[str, ...], applies: str | None, note: str, wait: bool) -> None:
    """Propose an agreement; your proposal is your signature, the other parties sign after."""
    terms: list[dict[str, Any]] = []
    if price is not None:
        terms.append({"kind": "price", "amount": price.strip()})
    for kind, given in (("reimbursement", reimbursement), ("investor_return", investor_return),
                        ("fee", fee), ("rebate", rebate)):
        terms.extend(_term(kind, t) for t in given)
    if not terms:
        raise LocalError("An agreement needs at least one term: --price, --fee, --reimbursement, "
                         "--investor-return or --rebate.")
    me = _call("GET", "/v1/id")["member"]
    everyone = [me, *(parse_member(p) for p in parties)]
    if customer:
        everyone.append(parse_member(customer))
    everyone += [t["to"] for t in terms if "to" in t]
    body: dict[str, Any] = {"op": "propose", "title": title, "currency": currency.strip(),
                            "parties": list(dict.fromkeys(everyone)), "terms": terms}
    if exponent is not None:
        body["exponent"] = exponent
    if customer:
        body["customer"] = parse_member(customer)
    if applies:
        body["applies"] = applies
    if note:
        body["note"] = note
    doc = submit(cid, "agreement", body)
    others = len(body["parties"]) - 1
    emit(doc, f"agreement {doc['id']} ({doc['status']}); {others} other part{'y' if others == 1 else 'ies'} "
              f"must sign with 'valuemesh agreement sign {cid} {doc['id']}'")


@agreement.command("sign")
@click.argument("cid")
@click.argument("agreement_id")
@wait_option
@json_option
def agreement_sign(cid: str, agreement_id: str, wait: bool) -> None:
    """Sign an agreement you are a party to."""
    doc = submit(cid, "agreement", {"op": "sign", "agreement": parse_hex_id(agreement_id, "an agreement id")})
    emit(doc, f"signature {doc['id']} ({doc['status']})")


@agreement.command("list")
@click.argument("cid")
@json_option
def agreement_list(cid: str) -> None:
    """Final agreements, their terms and who still has to sign."""
    doc = _call("GET", _acct(cid, "agreements"))
    emit(doc, "\n".join(_show_agreement(a) for a in doc["agreements"]) or "no agreements")


# --------------------------------------------------------------------------- revenue


@click.command()
@click.argument("cid")
@click.option("--amount", required=True, help="A decimal amount, e.g. 1200.00.")
@click.option("--currency", required=True, help="EUR, JPY, … or any code with --exponent.")
@click.option("--exponent", type=click.IntRange(0, 8), default=None, help="Decimals of a non-ISO currency.")
@click.option("--customer", default=None, help="Who paid (vm1…); default: you.")
@click.option("--agreement", "agreement_id", default=None, help="The final agreement this revenue realises.")
@click.option("--note", default="", help="An invoice number, say.")
@wait_option
@json_option
def revenue(cid: str, amount: str, currency: str, exponent: int | None, customer: str | None,
            agreement_id: str | None, note: str, wait: bool) -> None:
    """Record income from a customer (exact: more decimals than the currency has are refused)."""
    body: dict[str, Any] = {"op": "record", "amount": amount.strip(), "currency": currency.strip()}
    if exponent is not None:
        body["exponent"] = exponent
    if customer:
        body["customer"] = parse_member(customer)
    if agreement_id:
        body["agreement"] = parse_hex_id(agreement_id, "an agreement id")
    if note:
        body["note"] = note
    doc = submit(cid, "revenue", body)
    emit(doc, f"revenue {doc['id']} ({doc['status']})")


# --------------------------------------------------------------------------- policy


@click.group()
def policy() -> None:
    """Propose split policies (or any question), vote, close and show outcomes."""


@policy.command("propose")
@click.argument("cid")
@click.option("--title", required=True)
@click.option("--split", "split_file", type=click.Path(dir_okay=False), default=None,
              help="A split policy JSON file (see docs/accounting.md); options are then agree/abstain/disagree.")
@click.option("--option", "options", multiple=True, help="An option of a poll; repeatable.")
@click.option("--closes", default="7d", show_default=True, help="Voting closes after this long, e.g. 30m, 7d.")
@click.option("--opens", default=None, help="Voting opens after this long (default: at once).")
@click.option("--quorum-bps", type=click.IntRange(0, 10000), default=None, help="Default 5000 (half).")
@click.option("--threshold-bps", type=click.IntRange(1, 10000), default=None, help="Default 5001.")
@click.option("--voters", multiple=True, type=click.Choice(["investor", "producer", "customer", "facilitator"]),
              help="Only members with these roles vote (default: every active member).")
@click.option("--block", is_flag=True, help="Allow a blocking vote.")
@click.option("--note", default="")
@wait_option
@json_option
def policy_propose(cid: str, title: str, split_file: str | None, options: tuple[str, ...], closes: str,
                   opens: str | None, quorum_bps: int | None, threshold_bps: int | None,
                   voters: tuple[str, ...], block: bool, note: str, wait: bool) -> None:
    """Open a proposal for a vote."""
    now = int(time.time() * 1000)
    body: dict[str, Any] = {"op": "propose", "title": title, "closes": now + parse_duration(closes) * 1000}
    if split_file:
        from valuemesh.protocol.accounting import parse_policy
        from valuemesh.protocol.accounting.policy import encode_split
        if options:
            raise LocalError("A split proposal has the fixed options agree, abstain, disagree.")
        body["split"] = encode_split(parse_policy(_policy_file(split_file))).hex()
    if options:
        body["options"] = list(options)
    if opens:
        body["opens"] = now + parse_duration(opens) * 1000
    for k, v in (("quorum_bps", quorum_bps), ("threshold_bps", threshold_bps)):
        if v is not None:
            body[k] = v
    if voters:
        body["voters"] = list(voters)
    if block:
        body["block"] = True
    if note:
        body["note"] = note
    doc = submit(cid, "policy", body)
    emit(doc, f"proposal {doc['id']} ({doc['status']})")


@policy.command("vote")
@click.argument("cid")
@click.argument("proposal")
@click.argument("option")
@click.option("--reason", default="")
@wait_option
@json_option
def policy_vote(cid: str, proposal: str, option: str, reason: str, wait: bool) -> None:
    """Vote once on an open proposal (agree, abstain, disagree, block, or a poll option)."""
    body: dict[str, Any] = {"op": "vote", "proposal": parse_hex_id(proposal, "a proposal id"), "option": option}
    if reason:
        body["reason"] = reason
    doc = submit(cid, "policy", body)
    emit(doc, f"vote {doc['id']} ({doc['status']})")


@policy.command("close")
@click.argument("cid")
@click.argument("proposal")
@wait_option
@json_option
def policy_close(cid: str, proposal: str, wait: bool) -> None:
    """Close a proposal at its closing time (or once all voted); an adopted split applies from then."""
    doc = submit(cid, "policy", {"op": "close", "proposal": parse_hex_id(proposal, "a proposal id")})
    emit(doc, f"close {doc['id']} ({doc['status']})")


@policy.command("show")
@click.argument("cid")
@click.argument("proposal", required=False)
@json_option
def policy_show(cid: str, proposal: str | None) -> None:
    """The adopted split policy and every proposal with its votes and outcome."""
    doc = _call("GET", _acct(cid, "policies"))
    if proposal:
        pid = parse_hex_id(proposal, "a proposal id")
        doc = {"proposals": [p for p in doc["proposals"] if p["id"] == pid], "current": doc["current"]}
        if not doc["proposals"]:
            raise LocalError(f"There is no final proposal {pid[:16]}… in this constellation.")
    cur = doc["current"]
    lines = [f"split policy {cur['hash'][:16]}… "
             + (f"adopted by proposal {cur['proposal'][:16]}…" if cur["proposal"] else "(the default)")]
    for p in doc["proposals"]:
        res = p["outcome"] or p["standing"]
        lines.append(f"{p['id']}  {p['title']}  [{p['status']}]  {'split policy' if p['split'] else 'poll'}")
        lines.append(f"  votes {res['cast']}/{res['eligible']}: "
                     + (", ".join(f"{k} {v}" for k, v in res["tally"].items()) or "none")
                     + f" -> {res['result']}" + ("" if p["outcome"] else " so far"))
    emit(doc, "\n".join(lines))


# --------------------------------------------------------------------------- split & distribution


def _dist_text(d: dict[str, Any], explain: bool) -> list[str]:
    lines = [f"revenue {d['revenue'][:16]}…  {d['amount']} {d['currency']}",
             f"policy {d['policy'][:16]}…  inputs root {d['inputs_root'][:16]}…  hash {d['hash'][:16]}…"]
    for i, ln in enumerate(d["lines"], start=1):
        lines.append(f"  {i:>3} {ln['kind']:<16} {_name(ln):<40} {ln['amount']:>14}")
        if explain:
            lines.append(f"        {ln['explain']}")
    return lines


@click.command()
@click.argument("cid")
@click.option("--revenue", "revenue_id", default=None, help="Which revenue (default: the latest not yet split).")
@click.option("--policy", "policy_file", type=click.Path(dir_okay=False), default=None,
              help="Try this split policy file instead of the adopted one (nothing is adopted).")
@click.option("--proposal", default=None, help="Try the split policy of this proposal.")
@click.option("--explain", is_flag=True, help="Show each line's arithmetic and each contribution's score.")
@json_option
def split(cid: str, revenue_id: str | None, policy_file: str | None, proposal: str | None,
          explain: bool) -> None:
    """Compute how a revenue divides, under the adopted policy or one you want to try."""
    req: dict[str, Any] = {"explain": explain}
    if revenue_id:
        req["revenue"] = parse_hex_id(revenue_id, "a revenue id")
    if policy_file:
        req["policy"] = _policy_file(policy_file)
    if proposal:
        req["proposal"] = parse_hex_id(proposal, "a proposal id")
    doc = _call("POST", _acct(cid, "split"), req)
    pol = doc["policy"]
    head = {"adopted": "under the adopted policy", "default": "under the default policy (none adopted yet)",
            "given": "under the policy in the file",
            "proposal": f"under the policy of proposal {str(pol['proposal'])[:16]}…",
            "final": f"as ratified in distribution {str(pol['distribution'])[:16]}…"}[pol["source"]]
    lines = [f"split {head}" + ("" if pol["adopted"] or pol["source"] == "final" else " (NOT adopted: a trial)")]
    lines += _dist_text(doc["distribution"], explain)
    lines.append("ratified by: " + ", ".join(_name(w) for w in doc["ratifiers"]))
    if explain:
        lines.append("scores:")
        for s in doc["scores"]:
            lines.append(f"  {s['contribution'][:12]} {_name(s)}: {s['explain']}")
    emit(doc, "\n".join(lines))


@click.group()
def distribution() -> None:
    """Propose, ratify, list and verify distributions of revenue."""


@distribution.command("propose")
@click.argument("cid")
@click.option("--revenue", "revenue_id", default=None, help="Which revenue (default: the latest not yet split).")
@wait_option
@json_option
def distribution_propose(cid: str, revenue_id: str | None, wait: bool) -> None:
    """Propose the split every node computes under the adopted policy; it waits for ratification."""
    req = {"revenue": parse_hex_id(revenue_id, "a revenue id")} if revenue_id else {}
    doc = _call("POST", _acct(cid, "distributions"), req)
    if wait:
        doc = wait_final(cid, doc)
    lines = [f"distribution {doc['id']} ({doc['status']})", *_dist_text(doc["distribution"], False),
             "to be ratified by: " + ", ".join(_name(w) for w in doc["ratifiers"])]
    emit(doc, "\n".join(lines))


@distribution.command("ratify")
@click.argument("cid")
@click.argument("distribution_id")
@click.option("--hash", "expected", default=None, help="Refuse unless the distribution has this hash.")
@wait_option
@json_option
def distribution_ratify(cid: str, distribution_id: str, expected: str | None, wait: bool) -> None:
    """Sign a proposed distribution; the last required signature makes it final."""
    req = {"hash": parse_hex_id(expected, "a distribution hash")} if expected else {}
    did = parse_hex_id(distribution_id, "a distribution id")
    doc = _call("POST", _acct(cid, f"distributions/{did}/ratify"), req)
    if wait:
        doc = wait_final(cid, doc)
    emit(doc, f"ratification {doc['id']} of {did[:16]}… hash {doc['hash'][:16]}… ({doc['status']})")


@distribution.command("list")
@click.argument("cid")
@click.option("--explain", is_flag=True, help="Show each line's arithmetic.")
@json_option
def distribution_list(cid: str, explain: bool) -> None:
    """Every proposed and final distribution, with who signed."""
    doc = _call("GET", _acct(cid, "distributions"))
    lines = []
    for d in doc["distributions"]:
        lines.append(f"{d['id']}  [{d['status']}]  signed {len(d['signed'])}/{len(d['required'])}")
        lines += ["  " + x for x in _dist_text(d["distribution"], explain)]
    emit(doc, "\n".join(lines) or "no distributions")


@distribution.command("verify")
@click.argument("cid")
@click.argument("distribution_ids", nargs=-1)
@json_option
def distribution_verify(cid: str, distribution_ids: tuple[str, ...]) -> None:
    """Recompute distributions from the inputs they carry; exit 1 if any does not verify."""
    req = {"distributions": [parse_hex_id(d, "a distribution id") for d in distribution_ids]} if distribution_ids \
        else {}
    doc = _call("POST", _acct(cid, "verify"), req)
    lines = [f"{r['id'][:16]}…  {'ok' if r['ok'] else 'FAILED'}  [{r['status']}]  "
             + (f"{r['amount']} {r['currency']} in {r['lines']} lines" if r["ok"] else r["reason"])
             for r in doc["distributions"]]
    emit(doc, "\n".join(lines))
    if not doc["ok"]:
        bad = next(r for r in doc["distributions"] if not r["ok"])
        fail(f"Distribution {bad['id'][:16]}… does not verify: {bad['reason']}")


# --------------------------------------------------------------------------- archive


@click.command("export")
@click.argument("cid")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "valueflows"]), default="jsonl",
              show_default=True, help="jsonl/csv: the signed archive; valueflows: a JSON-LD view.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None, help="Write here (default: stdout).")
@json_option
def export(cid: str, fmt: str, output: str | None) -> None:
    """Export a constellation: every signed block and record in consensus order, re-verifiable.

    With --output and --json, prints what was written; the archive itself is the output otherwise.
    """
    if fmt == "valueflows":
        doc = _call("GET", f"/v1/constellations/{parse_cid(cid)}/valueflows")
        text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
        if output is None:
            click.echo(text, nl=False)
            return
        _write_whole(Path(output), text)
        emit({"file": output, "format": fmt, "bytes": len(text.encode()), "state_hash": None, "records": None},
             f"wrote {output}")
        return
    if output is None:
        _export_to(parse_cid(cid), fmt, sys.stdout.buffer)
        return
    target = Path(output)
    # Written beside the target and renamed at the end, so a failed export leaves no half archive.
    part = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        with part.open("wb") as f:
            end = _export_to(parse_cid(cid), fmt, f)
        os.replace(part, target)
    except OSError as exc:
        raise LocalError(f"Cannot write {output}: {exc.strerror or exc}.") from None
    finally:
        part.unlink(missing_ok=True)
    emit({"file": output, "format": fmt, "bytes": target.stat().st_size, "state_hash": end.get("state_hash"),
          "records": end.get("records")}, f"wrote {output}")


def _export_to(cid: str, fmt: str, out: Any) -> dict[str, Any]:
    """Stream the daemon's archive into `out` line by line as it arrives; return its end line."""
    from valuemesh.node.archive import archive_csv_lines

    end: dict[str, Any] = {}

    def checked(lines: Iterable[bytes]) -> Iterator[tuple[bytes, dict[str, Any]]]:
        nonlocal end
        for line in lines:
            it = json.loads(line)
            if it.get("kind") == "error":
                raise LocalError(str(it.get("error")))
            end = it if it.get("kind") == "end" else {}
            yield line, it

    with current().api.stream(f"/v1/constellations/{cid}/export") as resp:
        if fmt == "jsonl":
            for line, _ in checked(resp):
                out.write(line)
        else:
            for text in archive_csv_lines(it for _, it in checked(resp)):
                out.write(text.encode())
    if not end:
        raise LocalError("The daemon's archive was cut short; export again.")
    return end


def _write_whole(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise LocalError(f"Cannot write {path}: {exc.strerror or exc}.") from None


@click.command("import")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--check", is_flag=True, help="Only verify the archive; change nothing.")
@json_option
def import_(file: str, check: bool) -> None:
    """Verify an archive offline and load it into this home (its daemon must be stopped).

    Every signature is checked, the commit order is re-derived from the blocks, the ledger is
    replayed and must give the archive's state hash; anything altered is refused. The daemon
    then serves the constellation read-only at its next start.
    """
    from valuemesh.node.archive import read_archive, verify_archive
    from valuemesh.node.daemon import installed_registry
    from valuemesh.node.settings import load

    c = current()
    disabled = load(c.home, {}, os.environ).disable_plugins
    archive = verify_archive(read_archive(Path(file)), installed_registry(disabled))
    summary = archive.summary()
    if not check:
        import asyncio

        ident = c.home.load_identity()
        asyncio.run(_load(c.home.db_file, archive, ident))
    summary["loaded"] = not check
    ds = summary["distributions"]["distributions"]
    text = (f"verified {summary['name']} {summary['constellation']}\n"
            f"  {summary['records']} final records in {summary['commits']} committed blocks "
            f"({summary['blocks']} blocks), every signature checked\n"
            f"  state hash {summary['state_hash']}\n"
            f"  quorum-signed epoch checkpoints matched: {len(summary['checkpoints'])}\n"
            f"  distributions re-verified: {sum(1 for d in ds if d['ok'])} of {len(ds)}\n"
            + ("  loaded: start the daemon to read it" if not check else "  (check only: nothing loaded)"))
    emit(summary, text)


async def _load(db_file: Path, archive: Any, ident: Any) -> None:
    from valuemesh.node.archive import load_archive
    from valuemesh.node.store import Store, StoreInUseError

    try:
        store = await Store.open(db_file)
    except StoreInUseError:
        raise LocalError("This home's daemon is running; stop it to import "
                         "(or use --check to only verify).") from None
    try:
        await load_archive(store, archive, ident)
    finally:
        await store.close()


def register(cli: click.Group) -> None:
    """Mount the accounting commands on the main `valuemesh` group."""
    for cmd in (agreement, revenue, policy, split, distribution, export, import_):
        cli.add_command(cmd)
