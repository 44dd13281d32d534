"""Four real daemons on loopback: agreement, a SIGKILLed member, and catch-up."""

from __future__ import annotations

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
        final = c.daemons[0].cli_json("ledger", cid)["final"]
        assert {r["id"] for r in final} >= set(ids)
        assert [r["status"] for r in final] == ["applied"] * len(final)

        victim = c.daemons[3]
        victim.kill()
        for d in c.daemons[:3]:
            d.cli("contribute", cid, "--action", "produce", "--quantity", "1", "--unit", "loaf")
        wait_until(lambda: _agreed(c, cid, 11), DEADLINE_S, "the three survivors to keep finalising")
        survivors_hash = c.daemons[0].cli_json("ledger", cid)["state_hash"]

        victim.start()
        wait_until(lambda: _agreed(c, cid, 11), DEADLINE_S, "the restarted daemon to catch up")
        assert victim.cli_json("ledger", cid)["state_hash"] == survivors_hash
        status = victim.cli_json("status")
        assert status["constellations"][0]["guarantee"] == "byzantine-tolerant(1)"
