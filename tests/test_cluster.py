"""Four real daemons on loopback: agreement, a SIGKILLed member, and catch-up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from valuemesh.node.testing import Cluster, cluster, wait_until

pytestmark = pytest.mark.slow
DEADLINE_S = 45


def _ledgers(c: Cluster, cid: str) -> list[dict]:
    return [d.cli_json("ledger", cid) for d in c.daemons if d.alive]


def _agreed(c: Cluster, cid: str, final: int) -> bool:
    ls = _ledgers(c, cid)
    return (
        all(len(x["final"]) >= final and not x["pending"] for x in ls)
        and len({x["state_hash"] for x in ls}) == 1
        and len({tuple(r["id"] for r in x["final"]) for x in ls}) == 1
    )


def test_four_daemons_agree_survive_a_kill_and_catch_up(tmp_path: Path) -> None:
    with cluster(tmp_path, 4) as c:
        cid = c.found("bakery")
        wait_until(lambda: _agreed(c, cid, 4), DEADLINE_S, "the three joins to be final everywhere")
        ids = [d.cli_json("contribute", cid, "--action", "work", "--quantity", str(i + 1), "--unit", "hour")["id"]
               for i, d in enumerate(c.daemons)]
        wait_until(lambda: _agreed(c, cid, 8), DEADLINE_S, "one contribution per member to be final")
        # Everyone acknowledges the next member's contribution; one dispute.
        for i, d in enumerate(c.daemons):
            d.cli("ack", cid, ids[(i + 1) % 4])
        c.daemons[1].cli("ack", cid, ids[0], "--dispute", "it was 2 hours")
        wait_until(lambda: _agreed(c, cid, 13), DEADLINE_S, "acknowledgements to be final")
        final = c.daemons[0].cli_json("ledger", cid)["final"]
        assert {r["id"] for r in final} >= set(ids)
        assert [r["status"] for r in final] == ["applied"] * len(final)
        assert [r["type"] for r in final].count("contribution") == 9

        victim = c.daemons[3]
        victim.kill()
        for d in c.daemons[:3]:
            d.cli("contribute", cid, "--action", "produce", "--quantity", "1", "--unit", "loaf")
        wait_until(lambda: _agreed(c, cid, 16), DEADLINE_S, "the three survivors to keep finalising")
        survivors_hash = c.daemons[0].cli_json("ledger", cid)["state_hash"]
        # Health speaks of now: with a second core member gone, 2 of 4 cannot finalise.
        first = c.daemons[0]
        now = first.cli_json("status")
        assert now["health"] == "ok"
        assert now["constellations"][0]["reach"]["text"] == (
            "reachable core: 3 of 4 — new records can become final; losing one more stops it")
        c.daemons[2].kill()
        wait_until(lambda: first.cli_json("status")["health"] != "ok", DEADLINE_S, "health to say degraded")
        assert first.cli_json("status")["health"] == (
            "degraded: bakery: reachable core: 2 of 4 — new records cannot become final")
        assert "now: reachable core: 2 of 4 — new records cannot become final" in first.cli("status").stdout
        c.daemons[2].start()
        wait_until(lambda: first.cli_json("status")["health"] == "ok", DEADLINE_S, "health to recover")

        victim.start()
        wait_until(lambda: _agreed(c, cid, 16), DEADLINE_S, "the restarted daemon to catch up")
        assert victim.cli_json("ledger", cid)["state_hash"] == survivors_hash
        status = victim.cli_json("status")
        assert status["constellations"][0]["guarantee"] == "byzantine-tolerant(1)"
        # Each membership change closed an epoch with a checkpoint signed by a quorum.
        cps = [d.cli_json("status")["constellations"][0]["checkpoint"] for d in c.daemons]
        assert cps[0] is not None and cps[0]["epoch"] >= 1
        assert len({(cp["epoch"], cp["state_hash"]) for cp in cps}) == 1

        # Leaving and dissolving are records like any other: final everywhere.
        victim.cli("constellation", "leave", cid)
        wait_until(lambda: _agreed(c, cid, 17), DEADLINE_S, "the leave to be final")
        shown = c.daemons[0].cli_json("constellation", "show", cid)
        assert {m["member"]: m["status"] for m in shown["member_list"]}[victim.member] == "left"
        c.daemons[0].cli("constellation", "dissolve", cid, "--reason", "done")
        wait_until(lambda: _agreed(c, cid, 18), DEADLINE_S, "the dissolution to be final")
        assert all(d.cli_json("constellation", "show", cid)["status"] == "dissolved" for d in c.daemons)
        late = c.daemons[1].cli("contribute", cid, "--action", "work", "--quantity", "1", "--unit", "hour",
                                check=False)
        assert late.returncode == 1
        assert "dissolved" in late.stderr


def test_a_newcomer_starts_from_the_latest_checkpoint(tmp_path: Path) -> None:
    with cluster(tmp_path, 4) as c:
        founder, newcomer = c.daemons[0], c.daemons[3]
        cid = founder.cli_json("constellation", "create", "bakery")["id"]
        trio = c.daemons[:3]
        for k, d in enumerate(c.daemons[1:3], start=2):  # two more core members: two epoch ends
            d.cli("constellation", "join", founder.cli("constellation", "invite", cid, "--tier", "core").stdout.strip())
            wait_until(lambda k=k: all(sum(x["status"] == "active" for x in t.cli_json("constellation", "show", cid)
                                           ["member_list"]) == k for t in trio[:k]),
                       DEADLINE_S, "the core join to be final on the core")
        for i, d in enumerate(trio):
            d.cli("contribute", cid, "--action", "work", "--quantity", str(i + 1), "--unit", "hour")
        wait_until(lambda: all(d.cli_json("status")["constellations"][0]["checkpoint"] is not None
                               and d.cli_json("status")["constellations"][0]["checkpoint"]["epoch"] == 1
                               for d in trio), DEADLINE_S, "epoch 1's checkpoint to be certified everywhere")
        final_before = founder.cli_json("ledger", cid)["final_count"]

        # The newcomer starts from any checkpoint (by default only from one of 10 000 records).
        newcomer.stop()
        cfg_path = newcomer.home / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["checkpoint_start_min_records"] = 0
        cfg_path.write_text(json.dumps(cfg))
        newcomer.start()
        newcomer.cli("constellation", "join", founder.cli("constellation", "invite", cid).stdout.strip())
        def caught_up() -> bool:  # same state and count (the newcomer lists only records after its start)
            ls = _ledgers(c, cid)
            return (len({(x["state_hash"], x["final_count"]) for x in ls}) == 1 and not any(x["pending"] for x in ls)
                    and ls[0]["final_count"] > final_before)

        wait_until(caught_up, DEADLINE_S, "the newcomer to agree with the core")
        mine = newcomer.cli_json("status")["constellations"][0]
        assert mine["started_from"] is not None and mine["started_from"]["epoch"] == 1
        # It holds the state from the checkpoint on, not the records before it.
        ledger = newcomer.cli_json("ledger", cid)
        assert ledger["final"][0]["index"] == mine["started_from"]["final"] > 0
        assert ledger["state_hash"] == founder.cli_json("ledger", cid)["state_hash"]
        # And it keeps following: a new record becomes final on it too.
        rid = founder.cli_json("contribute", cid, "--action", "work", "--quantity", "9", "--unit", "hour")["id"]
        wait_until(lambda: rid in {r["id"] for r in newcomer.cli_json("ledger", cid)["final"]}, DEADLINE_S,
                   "a later record to be final on the newcomer")
        # A restart starts from its stored snapshot (it holds nothing before it) to the same state.
        newcomer.stop()
        newcomer.start()
        wait_until(caught_up, DEADLINE_S, "the restarted newcomer to agree")
        assert newcomer.cli_json("status")["constellations"][0]["started_from"]["epoch"] == 1


def test_a_member_behind_pruned_epochs_skips_ahead_to_a_checkpoint(tmp_path: Path) -> None:
    c = Cluster(tmp_path, 4)
    try:
        for d in c.daemons:  # every node prunes all but the last closed epoch
            d.cli("init", "--name", d.name)
            cfg_path = d.home / "config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["retain_epochs"] = 1
            cfg_path.write_text(json.dumps(cfg))
        c.start()
        founder, late = c.daemons[0], c.daemons[3]
        cid = founder.cli_json("constellation", "create", "bakery")["id"]
        late.cli("constellation", "join", founder.cli("constellation", "invite", cid).stdout.strip())
        wait_until(lambda: late.cli_json("constellation", "show", cid)["my_tier"] == "contributor",
                   DEADLINE_S, "the contributor's join to be final on its node")
        late.stop()
        trio = c.daemons[:3]
        for k, d in enumerate(c.daemons[1:3], start=2):  # two core joins: epochs 0 and 1 close
            d.cli("constellation", "join", founder.cli("constellation", "invite", cid, "--tier", "core").stdout.strip())
            wait_until(lambda k=k: all(sum(x["tier"] == "core" and x["status"] == "active" for x in
                                           t.cli_json("constellation", "show", cid)["member_list"]) == k
                                       for t in trio[:k]), DEADLINE_S, "the core join to be final on the core")
        founder.cli("contribute", cid, "--action", "work", "--quantity", "3", "--unit", "hour")
        wait_until(lambda: "pruned blocks before epoch 1" in (founder.home / "daemon.log").read_text(),
                   DEADLINE_S, "the founder to prune epoch 0")

        late.start()  # it stopped in epoch 0, whose blocks no peer holds any more
        wait_until(lambda: (late.cli_json("status")["constellations"][0]["started_from"] or {}).get("epoch", -1) >= 1,
                   DEADLINE_S, "the late member to skip ahead to a checkpoint")
        rid = founder.cli_json("contribute", cid, "--action", "work", "--quantity", "4", "--unit", "hour")["id"]

        def caught_up() -> bool:
            ls = [d.cli_json("ledger", cid) for d in c.daemons]
            return len({(x["state_hash"], x["final_count"]) for x in ls}) == 1 and \
                rid in {r["id"] for r in ls[3]["final"]}

        wait_until(caught_up, DEADLINE_S, "the late member to agree and follow new records")
        assert "skipped ahead to the checkpoint" in (late.home / "daemon.log").read_text()
    finally:
        c.stop()
