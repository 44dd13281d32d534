"""`peers`, `status` and `valuemesh netcheck` on real daemons on loopback: each connected peer
shows its path and round trip (JSON and table); netcheck prints one sentence per line and
exits 0, refuses bad parameters with one sentence and changes nothing, says in one sentence
that the daemon is not running; a fresh dial-back round runs when allowed and not more often
than the members asked answer."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from node_kit import start_node

from valuemesh.node import netview
from valuemesh.node.daemon import Node
from valuemesh.node.home import Home
from valuemesh.node.testing import Daemon, free_port, wait_until

pytestmark = pytest.mark.slow
DEADLINE_S = 60.0
NET = "valuemesh-netcheck"


def _get(d: Daemon, path: str) -> tuple[int, dict[str, Any]]:
    home = Home(d.home)
    host, port = home.api_address()
    req = urllib.request.Request(f"http://{host}:{port}{path}",
                                 headers={"Authorization": f"Bearer {home.api_token()}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _connected(d: Daemon) -> list[dict[str, Any]]:
    return [p for p in d.cli_json("peers")["peers"] if p["connected"]]


def test_paths_rtt_and_netcheck_between_two_daemons(tmp_path: Path) -> None:
    a = Daemon("a", tmp_path / "a", free_port(), NET)
    b = Daemon("b", tmp_path / "b", free_port(), NET)
    try:
        a.start()
        b.start()
        cid = a.cli_json("constellation", "create", "paths")["id"]
        token = a.cli("constellation", "invite", cid, "--tier", "core").stdout.strip()
        b.cli("constellation", "join", token)
        wait_until(lambda: b.api("GET", f"/v1/constellations/{cid}")["my_tier"] == "core", DEADLINE_S,
                   "b's join to be final")
        wait_until(lambda: all(p["rtt_ms"] is not None for d in (a, b) for p in _connected(d)) and
                   all(_connected(d) for d in (a, b)), DEADLINE_S, "both links to have a round trip")
        for d, other in ((a, b), (b, a)):
            (peer,) = _connected(d)
            assert peer["member"] == other.member
            # Both on loopback, one of this host's networks: the nearest path there is.
            assert peer["path"] == "lan" and peer["relay"] is None and peer["rtt_ms"] >= 0
            assert peer["via"] in ("bootstrap", "invite", "inbound", "exchange", "record")  # learned-how, kept
            status = d.cli_json("status")
            assert [p["path"] for p in status["peers"] if p["connected"]] == ["lan"]
            table = d.cli("peers").stdout
            assert f"{other.member}" in table and "connected, lan, rtt " in table and " ms" in table
            assert "connected, lan, rtt " in d.cli("status").stdout

        res = a.cli("netcheck")
        assert res.returncode == 0 and res.stderr == ""
        lines = res.stdout.strip().splitlines()
        assert all(line[0].isupper() and line.endswith(".") for line in lines), lines
        doc = a.cli_json("netcheck")
        assert doc["lines"] == [ln for ln in doc["lines"] if ln]
        assert doc["reachability"]["state"] == "lan"  # b dialled a back at 127.0.0.1, not a public address
        assert [(x["kind"], x["result"]) for x in doc["addresses"]] == [("lan", "reachable")]
        assert doc["nat"]["kind"] == "unknown" and "own network" in doc["nat"]["text"]
        assert not doc["port_mapping"]["obtained"] and "loopback" in doc["port_mapping"]["reason"]
        assert doc["relays"]["reserved_at"] == [] and doc["relays"]["serves"] is True
        assert doc["links"]["counts"]["lan"] == 1
        cached = a.cli_json("netcheck", "--cached")
        assert cached["checked"] == "last" and "fresh=false" in cached["note"]
        assert cached["reachability"]["checked_at"] == doc["reachability"]["checked_at"]

        before = a.cli_json("netcheck", "--cached")["reachability"]["checked_at"]
        for query in ("fresh=maybe", "wait_s=21", "wait_s=nan", "fresh=1&fresh=0", "verbose=1", "wait_s="):
            status_code, err = _get(a, f"/v1/netcheck?{query}")
            assert status_code == 400, query
            assert list(err) == ["error"] and err["error"].endswith(".") and len(err["error"]) < 200, err
        assert a.cli_json("netcheck", "--cached")["reachability"]["checked_at"] == before  # nobody was asked
        bad = a.cli("netcheck", "--wait", "99", check=False)
        assert bad.returncode == 2 and "99" in bad.stderr  # click refuses it before asking the daemon
    finally:
        a.stop()
        b.stop()
    gone = a.cli("netcheck", check=False)
    assert gone.returncode == 1 and gone.stdout == ""
    assert gone.stderr.startswith("error: The daemon is not running") and gone.stderr.count("\n") == 1


async def test_a_fresh_round_runs_when_allowed_and_not_more_often(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with asyncio.timeout(DEADLINE_S):
        home_a, home_b = Home(tmp_path / "a"), Home(tmp_path / "b")
        a = await start_node(home_a, home_a.init("a"), NET)
        b: Node | None = None
        try:
            b = await start_node(home_b, home_b.init("b"), NET)
            made = await a.create_constellation("fresh", "")
            eng = a.engine_for(made["id"])
            invite = await a.invite(eng.cid, {"tier": "core"})
            await b.join(invite["token"])
            while not (b.engine_for(made["id"]).my_tier() == "core" and a.dialback.state.checked_at is not None
                       and not a.dialback.asking):
                await asyncio.sleep(0.05)  # the node's own first round, at link-up, is done
            first = a.dialback.state.checked_at
            again = await a.netcheck(True, 12.0)
            assert again["checked"] == "last" and "members answer one check per 30 s" in again["note"]
            assert again["lines"][0] == again["note"] and again["reachability"]["checked_at"] == first
            monkeypatch.setattr(netview, "FRESH_INTERVAL_S", 0.0)
            # Two at once, before the round has even started: one round, not two. The call that
            # does not wait says the round goes on in the background; the other waits for it.
            quick, fresh = await asyncio.gather(a.netcheck(True, 0.0), a.netcheck(True, 12.0))
            assert quick["checked"] == "last" and "goes on in the background" in quick["note"]
            assert fresh["checked"] == "fresh" and fresh["note"] == ""
            assert fresh["reachability"]["age_s"] == 0 and fresh["reachability"]["checked_at"] >= first
            assert fresh["reachability"]["asked"] == [str(b.identity.member)]
            assert fresh["reachability"]["state"] == "lan"
            # b answered both of a's requests: none was over its budget (burst 2, then one per 30 s).
            assert b.transport.reputation.score(a.identity.member, b.transport.clock()) == 100.0
        finally:
            if b is not None:
                await b.stop()
            await a.stop()
