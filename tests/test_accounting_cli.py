"""Value accounting through the CLI on four real daemons: work, capital, an agreement, a
voted policy, revenue, a ratified distribution identical everywhere, export → import on a
fresh home, and bad input refused with one sentence and exit status 1."""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from test_archive import a_member_cannot_import, tampering_is_refused

from valuemesh.node.archive import read_archive
from valuemesh.node.testing import Cluster, Daemon, free_port, wait_until

pytestmark = pytest.mark.slow
DEADLINE_S = 45
F, INV, P, C = 0, 1, 2, 3
ROLES = {INV: "investor", P: "producer", C: "customer"}
POLICY = {"levy_bps": 200, "weights": {"work:hour": "1"}, "acks": {"required": 1}}


def together(*calls: Callable[[], Any]) -> list[Any]:
    """Run independent CLI calls at once (each is its own process); re-raise the first failure."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


@contextmanager
def paused(*daemons: Daemon) -> Iterator[None]:
    """Freeze daemons by PID (SIGSTOP) and always thaw them (SIGCONT)."""
    stopped = []
    try:
        for d in daemons:
            assert d.proc is not None
            os.kill(d.proc.pid, signal.SIGSTOP)
            stopped.append(d.proc.pid)
        yield
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)


def ledger(d: Daemon, cid: str) -> dict[str, Any]:
    doc: dict[str, Any] = d.api("GET", f"/v1/constellations/{cid}/ledger")
    return doc


def final(c: Cluster, cid: str, *ids: str) -> list[dict[str, Any]]:
    """Wait until every daemon holds `ids` as final; return their entries as daemon 0 has them."""
    def everywhere() -> bool:
        for d in c.daemons:
            have = {r["id"] for r in ledger(d, cid)["final"]}
            if not set(ids) <= have:
                return False
        return True
    wait_until(everywhere, DEADLINE_S, f"{len(ids)} record(s) to be final on every node")
    by_id = {r["id"]: r for r in ledger(c.daemons[0], cid)["final"]}
    return [by_id[i] for i in ids]


def applied(c: Cluster, cid: str, *ids: str) -> None:
    for r in final(c, cid, *ids):
        assert r["status"] == "applied", r


def refused(d: Daemon, args: list[str], words: str) -> str:
    """Run a command that must fail: exit 1 and one sentence naming the problem."""
    res = d.cli(*args, check=False)
    assert res.returncode == 1, (args, res.stdout, res.stderr)
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert err.endswith("."), err
    assert re.search(words, err), err
    return err


def submit(d: Daemon, *args: str) -> str:
    doc: dict[str, Any] = d.cli_json(*args)
    assert doc["status"] == "pending"
    return str(doc["id"])


def found(c: Cluster) -> str:
    """F founds; the investor, the producer and the customer join as core members."""
    cid: str = c.daemons[F].cli_json("constellation", "create", "bakery")["id"]
    tokens = together(*(lambda r=r: c.daemons[F].cli("constellation", "invite", cid, "--tier", "core",
                                                     "--role", r).stdout.strip() for r in ROLES.values()))
    together(*(lambda i=i, t=t: c.daemons[i].cli("constellation", "join", t)
               for i, t in zip(ROLES, tokens, strict=True)))
    wait_until(lambda: all(len(ledger(d, cid)["final"]) >= 4 and not ledger(d, cid)["pending"]
                           for d in c.daemons), DEADLINE_S, "the three joins to be final everywhere")
    return cid


def test_four_members_split_revenue_through_the_cli_and_the_archive_reproduces_it(tmp_path: Path) -> None:
    c = Cluster(tmp_path, 4)
    fresh = Daemon("fresh", tmp_path / "fresh", free_port(), c.network)
    try:
        together(*(d.start for d in c.daemons), lambda: fresh.cli("init", "--name", "auditor"))
        _scenario(c, fresh, tmp_path)
    finally:
        fresh.stop()
        c.stop()


def _scenario(c: Cluster, fresh: Daemon, tmp: Path) -> None:
    cid = found(c)
    ds = c.daemons
    m = [d.member for d in ds]

    policy_file, bad_policy = tmp / "policy.json", tmp / "bad-policy.json"
    policy_file.write_text(json.dumps(POLICY))
    bad_policy.write_text(json.dumps({"levy_bps": 0.5}))

    # Work and capital (the investor lends 500 EUR, F works 10 h, P 30 h), an agreement between F
    # and the customer (price, F's fee, the customer's rebate), a split policy and a poll proposed.
    loan, f_work, p_work, agr, prop, poll = together(
        lambda: submit(ds[INV], "contribute", cid, "--action", "transfer", "--quantity", "500", "--unit", "EUR",
                       "--payback", "debt-like"),
        lambda: submit(ds[F], "contribute", cid, "--action", "work", "--quantity", "10", "--unit", "hour"),
        lambda: submit(ds[P], "contribute", cid, "--action", "work", "--quantity", "30", "--unit", "hour"),
        lambda: submit(ds[F], "agreement", "propose", cid, "--title", "Bakery website", "--currency", "EUR",
                       "--customer", m[C], "--price", "1200.00", "--fee", f"{m[F]}=500bps",
                       "--rebate", f"{m[C]}=250bps"),
        lambda: submit(ds[F], "policy", "propose", cid, "--title", "Hours count, 2% levy",
                       "--split", str(policy_file), "--closes", "1d"),
        lambda: submit(ds[P], "policy", "propose", cid, "--title", "Where to meet", "--option", "online",
                       "--option", "berlin", "--opens", "1h", "--closes", "2h"),
        lambda: refused(ds[P], ["policy", "propose", cid, "--title", "t", "--split", str(bad_policy)], "levy_bps"))[:6]
    applied(c, cid, loan, f_work, p_work, agr, prop, poll)

    # A non-party cannot sign; acknowledgements, the customer's signature and three votes.
    together(lambda: refused(ds[INV], ["agreement", "sign", cid, agr], "is not a party to this agreement"),
             lambda: refused(ds[C], ["agreement", "sign", cid, agr[:-1] + "x"], "not an agreement id"),
             lambda: refused(ds[F], ["agreement", "propose", cid, "--title", "t", "--currency", "EUR",
                                     "--fee", f"{m[P]}=nothing"], "plain decimal"))
    *acks, sign = together(
        lambda: submit(ds[F], "ack", cid, loan), lambda: submit(ds[INV], "ack", cid, f_work),
        lambda: submit(ds[P], "ack", cid, f_work), lambda: submit(ds[INV], "ack", cid, p_work),
        lambda: submit(ds[C], "agreement", "sign", cid, agr))
    votes = together(*(lambda i=i: submit(ds[i], "policy", "vote", cid, prop, "agree") for i in (F, INV, P)))
    applied(c, cid, *acks, sign, *votes)
    assert ds[P].cli_json("agreement", "list", cid)["agreements"][0]["status"] == "final"

    # Revenue: bad amounts are refused before anything is recorded; a good one links the agreement.
    # The customer disagrees; a second vote, a vote before the poll opens, an unknown option are refused.
    # Two votes of one member, both sent before either is final (two of four members are paused,
    # so nothing can be), both pass submission; the ledger rejects the second when it orders it,
    # with its own sentence, in every node's final list.
    # `--wait` then exits 1 with that sentence.
    with ThreadPoolExecutor(max_workers=1) as pool:
        with paused(ds[INV], ds[P]):
            no = ds[C].api("POST", f"/v1/constellations/{cid}/records",
                           {"type": "policy", "body": {"op": "vote", "proposal": prop, "option": "disagree"}})["id"]
            again = pool.submit(refused, ds[C], ["policy", "vote", cid, prop, "agree", "--wait"], "already voted")
            wait_until(lambda: sum(r["type"] == "policy" for r in ledger(ds[C], cid)["pending"]) == 2,
                       DEADLINE_S, "both votes to be pending")
        again.result()
    twice = next(r["id"] for r in ledger(ds[C], cid)["pending"] + ledger(ds[C], cid)["final"]
                 if r["type"] == "policy" and r["body"].get("option") == "agree" and r["author"] == m[C])
    (rev,) = together(
        lambda: submit(ds[C], "revenue", cid, "--amount", "1200.00", "--currency", "EUR", "--agreement", agr),
        lambda: refused(ds[C], ["revenue", cid, "--amount", "1200.005", "--currency", "EUR", "--agreement", agr],
                        "3 decimals but EUR allows at most 2"),
        lambda: refused(ds[C], ["revenue", cid, "--amount", "-5", "--currency", "EUR"], "must not be negative"),
        lambda: refused(ds[C], ["revenue", cid, "--amount", "1e5", "--currency", "EUR"], "plain decimal"),
        lambda: refused(ds[C], ["revenue", cid, "--amount", "5000000000000", "--currency", "EUR"],
                        "plausible limit"),
        lambda: refused(ds[F], ["policy", "vote", cid, prop, "agree"], "already voted"),
        lambda: refused(ds[INV], ["policy", "vote", cid, poll, "online"], "opens at"),
        lambda: refused(ds[P], ["policy", "vote", cid, poll, "maybe"], "must be one of|opens at"))[:1]
    applied(c, cid, rev, no)
    final(c, cid, twice)
    rejected = [r for r in ds[INV].cli_json("ledger", cid)["final"] if r["id"] == twice]
    assert rejected[0]["status"] == "rejected" and "already voted" in rejected[0]["reason"], rejected
    finals = ledger(ds[C], cid)["final"]
    assert [r["id"] for r in finals if r["type"] == "revenue"] == [rev]

    # Try before voting: the proposed policy on the real ledger, adopting nothing.
    tried, by_proposal, default = together(
        lambda: ds[P].cli_json("split", cid, "--policy", str(policy_file)),
        lambda: ds[C].cli_json("split", cid, "--proposal", prop),
        lambda: ds[P].cli_json("split", cid))
    assert tried["policy"]["adopted"] is False and default["policy"]["source"] == "default"
    assert _amounts(by_proposal) == _amounts(tried) != _amounts(default)
    assert ledger(ds[P], cid)["state_hash"] == ledger(ds[C], cid)["state_hash"]
    closed = ds[P].cli_json("policy", "close", cid, prop, "--wait")
    assert closed["status"] == "final"
    applied(c, cid, closed["id"])
    shown = ds[C].cli_json("policy", "show", cid, prop)
    assert shown["proposals"][0]["outcome"]["result"] == "adopted"
    assert shown["proposals"][0]["outcome"]["tally"] == {"agree": 3, "disagree": 1}
    assert shown["current"]["proposal"] == prop

    # The adopted split, identical on every node and equal to what was tried.
    # The CLI on one node, the same API route it uses on the others (fewer processes on a busy machine).
    acct = f"/v1/constellations/{cid}/accounting"
    splits = [ds[F].cli_json("split", cid, "--explain"),
              *(d.api("POST", f"{acct}/split", {"explain": True}) for d in ds[1:])]
    assert len({json.dumps(s["distribution"], sort_keys=True) for s in splits}) == 1
    got = _amounts(splits[0])
    assert got == _amounts(tried)
    assert got[:4] == [("debt", m[INV], "500.00"), ("fee", m[F], "60.00"), ("levy", "commons", "24.00"),
                       ("rebate", m[C], "30.00")]
    assert sorted(got[4:]) == sorted([("pool", m[F], "146.50"), ("pool", m[P], "439.50")])
    assert {s["contribution"] for s in splits[0]["scores"]} == {f_work, p_work}
    text = ds[F].cli("split", cid, "--explain").stdout
    assert "debt-like contribution of 500 EUR" in text and "ratified by:" in text

    # Distribution: proposed, refused from a non-ratifier, ratified by the customer, final everywhere.
    proposed = ds[P].cli_json("distribution", "propose", cid)
    did = proposed["id"]
    assert [w["member"] for w in proposed["ratifiers"]] == [m[C]]
    applied(c, cid, did)
    together(lambda: refused(ds[INV], ["distribution", "ratify", cid, did], "is not asked to ratify"),
             lambda: refused(ds[C], ["distribution", "ratify", cid, did, "--hash", "00" * 32],
                             "not the one you reviewed"))
    ratified = ds[C].cli_json("distribution", "ratify", cid, did, "--hash", proposed["distribution"]["hash"], "--wait")
    assert ratified["status"] == "final"
    applied(c, cid, ratified["id"])
    views = [ds[P].cli_json("distribution", "list", cid)["distributions"],
             *(d.api("GET", f"{acct}/distributions")["distributions"] for d in ds if d is not ds[P])]
    assert len({json.dumps(v, sort_keys=True) for v in views}) == 1
    assert views[0][0]["status"] == "final" and views[0][0]["hash"] == proposed["distribution"]["hash"]
    assert [(ln["kind"], ln["member"], ln["amount"]) for ln in views[0][0]["distribution"]["lines"]] == got
    checks = together(lambda: refused(ds[F], ["distribution", "propose", cid], "already has a final distribution"),
                      lambda: ds[INV].cli_json("distribution", "verify", cid),
                      *(lambda d=d: d.api("POST", f"{acct}/verify", {}) for d in ds if d is not ds[INV]))
    assert all(v["ok"] is True and v["distributions"][0]["id"] == did for v in checks[1:])
    hashes = {ledger(d, cid)["state_hash"] for d in ds}
    assert len(hashes) == 1
    # A split revenue shows what was ratified, not a recomputation that sees its own repayments.
    as_ratified = ds[INV].cli_json("split", cid, "--revenue", rev)
    assert _amounts(as_ratified) == got
    assert as_ratified["policy"]["source"] == "final" and as_ratified["policy"]["distribution"] == did

    # Export → import on a fresh home: every signature re-checked, the same state and distribution.
    jsonl, csv_file, vf_file = tmp / "bakery.jsonl", tmp / "bakery.csv", tmp / "bakery-vf.json"
    exported, *_ = together(
        lambda: ds[INV].cli_json("export", cid, "--format", "jsonl", "--output", str(jsonl)),
        lambda: ds[P].cli("export", cid, "--format", "csv", "--output", str(csv_file)),
        lambda: ds[C].cli("export", cid, "--format", "valueflows", "--output", str(vf_file)))
    assert exported["state_hash"] in hashes and exported["bytes"] == jsonl.stat().st_size
    vf = json.loads(vf_file.read_text())
    claims = [n for n in vf["@graph"] if n["@type"] == "vf:Claim"]
    assert sorted(n["vf:resourceQuantity"]["om2:hasNumericalValue"] for n in claims) == sorted(a for *_, a in got)
    altered = tampering_is_refused(jsonl, vf_file, tmp)
    checked, _ = together(lambda: fresh.cli_json("import", "--check", str(csv_file)),
                          lambda: refused(fresh, ["import", str(altered)], "signature"))
    assert checked["state_hash"] in hashes and checked["loaded"] is False
    a_member_cannot_import(read_archive(jsonl), ds[C], tmp)
    loaded = fresh.cli_json("import", str(jsonl))
    assert loaded["state_hash"] in hashes and loaded["distributions"]["ok"] is True
    assert [x["id"] for x in loaded["distributions"]["distributions"]] == [did]
    refused(fresh, ["import", str(jsonl)], "already follows")
    fresh.start()
    assert ledger(fresh, cid)["state_hash"] in hashes
    assert [r["id"] for r in ledger(fresh, cid)["final"]] == [r["id"] for r in ledger(ds[F], cid)["final"]]
    verified, listed, _ = together(
        lambda: fresh.cli_json("distribution", "verify", cid, did),
        lambda: fresh.cli_json("distribution", "list", cid),
        lambda: refused(fresh, ["import", str(jsonl)], "daemon is running"))
    assert verified["ok"] is True and listed["distributions"] == views[0]


def _amounts(doc: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(ln["kind"], ln["member"], ln["amount"]) for ln in doc["distribution"]["lines"]]
