"""A contributor member posts through a core node and need not stay online."""

from __future__ import annotations

from pathlib import Path

import pytest

from valuemesh.node.testing import Cluster, wait_until

pytestmark = pytest.mark.slow


def test_contributor_records_become_final_through_the_core(tmp_path: Path) -> None:
    c = Cluster(tmp_path, 2)
    try:
        c.start()
        core, helper = c.daemons
        cid = c.found("garden", tier="contributor", roles=("customer",))
        # Both views: the contributor's node signs for it only once it has applied its own join.
        wait_until(lambda: all(len(d.cli_json("constellation", "show", cid)["member_list"]) == 2 for d in c.daemons),
                   30, "the join on both nodes")
        shown = core.cli_json("constellation", "show", cid)
        tiers = {m["member"]: (m["tier"], m["roles"]) for m in shown["member_list"]}
        assert tiers[helper.member] == ("contributor", ["customer"])
        # One core member: the guarantee says plainly that nothing else holds the data.
        assert shown["guarantee"] == "single-node" and "add a core member" in shown["guarantee_text"]

        rid = helper.cli_json("contribute", cid, "--action", "deliver-service", "--quantity", "2",
                              "--unit", "hour")["id"]
        wait_until(lambda: rid in {r["id"] for r in core.cli_json("ledger", cid)["final"]}, 30,
                   "the contributor's record to be final on the core")
        wait_until(lambda: not helper.cli_json("ledger", cid)["pending"], 30, "the contributor to see it final")
        assert helper.cli_json("ledger", cid)["state_hash"] == core.cli_json("ledger", cid)["state_hash"]

        # The contributor goes away; the core keeps finalising alone.
        helper.kill()
        core.cli("contribute", cid, "--action", "work", "--quantity", "1", "--unit", "hour")
        wait_until(lambda: not core.cli_json("ledger", cid)["pending"], 30, "the core to finalise alone")
    finally:
        c.stop()
