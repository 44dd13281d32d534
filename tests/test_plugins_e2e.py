"""Plugins end to end with real daemons: the separately installed `sharing` plugin
through a full lend-and-return cycle on three nodes, a node without it refused,
and a deliberately broken plugin that the kit catches and that cannot crash a node.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from valuemesh.node.home import Home
from valuemesh.plugin import (
    ApplyContext,
    Cluster,
    Daemon,
    LocalError,
    Plugin,
    Record,
    Version,
    check_plugin,
    text,
    wait_until,
)

pytestmark = pytest.mark.slow
DEADLINE_S = 45


# -- helpers ----------------------------------------------------------------------------


def _settled(ds: list[Daemon], cid: str, final: int) -> bool:
    ls = [d.cli_json("ledger", cid) for d in ds]
    return (all(len(x["final"]) >= final and not x["pending"] for x in ls)
            and len({x["state_hash"] for x in ls}) == 1
            and len({tuple(r["id"] for r in x["final"]) for x in ls}) == 1)


def _join(founder: Daemon, d: Daemon, cid: str, tier: str = "core") -> subprocess.CompletedProcess[str]:
    token = founder.cli("constellation", "invite", cid, "--tier", tier, "--role", "producer").stdout.strip()
    return d.cli("constellation", "join", token, check=False)


def _final_on(ds: list[Daemon], cid: str, rid: str) -> bool:
    try:
        return all(d.api("GET", f"/v1/constellations/{cid}/records/{rid}").get("final") for d in ds)
    except LocalError:  # a node that has not received the record yet answers 404
        return False


# -- the sharing plugin on three daemons, and a fourth without it ---------------------------


def test_three_daemons_finish_a_sharing_cycle_and_a_node_without_the_plugin_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = Cluster(tmp_path, 4)
    lender, borrower, third, outsider = c.daemons
    try:
        for d in c.daemons[:3]:
            d.start()
        # A real node whose registry lacks the plugin: the operator switched it off.
        monkeypatch.setenv("VALUEMESH_DISABLE_PLUGINS", "sharing")
        outsider.start()
        monkeypatch.delenv("VALUEMESH_DISABLE_PLUGINS")

        cid = lender.cli_json("constellation", "create", "tool library")["id"]
        assert lender.cli_json("constellation", "show", cid)["plugins"]["sharing"] == "1.0"
        for d in (borrower, third):
            assert _join(lender, d, cid).returncode == 0
        three = [lender, borrower, third]
        wait_until(lambda: _settled(three, cid, 3), DEADLINE_S, "both joins to be final on three nodes")

        refused = _join(lender, outsider, cid, tier="contributor")
        assert refused.returncode == 1
        assert refused.stderr.strip() == (
            "error: This constellation uses plugin 'sharing' 1.0, which is not installed; "
            "install a distribution providing 'sharing' 1.x (at least 1.0).")
        assert outsider.cli_json("constellation", "list")["constellations"] == []
        out_plugins = {p["name"]: p for p in outsider.cli_json("plugin", "list")["plugins"]}
        assert out_plugins["sharing"]["daemon"] is None and out_plugins["sharing"]["constellations"] == []
        assert lender.cli_json("plugin", "info", "sharing")["constellations"] == [
            {"id": cid, "name": "tool library", "version": "1.0"}]

        # offer -> need -> match -> return, each command on the member who would type it.
        offer = lender.cli_json("sharing", "offer", cid, "ladder", "--note", "3 m", "--category", "tools")["id"]
        need = borrower.cli_json("sharing", "need", cid, "a ladder for Saturday")["id"]
        wait_until(lambda: _final_on(three, cid, offer) and _final_on(three, cid, need), DEADLINE_S,
                   "the offer and the need to be final")
        # Short prefixes are resolved against the final state.
        match = lender.cli_json("sharing", "match", cid, offer[:10], need[:10])["id"]
        wait_until(lambda: _final_on(three, cid, match), DEADLINE_S, "the match to be final")
        listed = borrower.cli_json("sharing", "list", cid)
        assert [(o["id"], o["status"]) for o in listed["offers"]] == [(offer, "lent")]
        assert listed["offers"][0]["loan"]["borrower"] == borrower.member
        assert [(n["id"], n["status"]) for n in listed["needs"]] == [(need, "matched")]

        ret = lender.cli_json("sharing", "return", cid, offer, "--wait", str(DEADLINE_S))
        rid, contribution = ret["return"]["id"], ret["contribution"]["id"]
        wait_until(lambda: _settled(three, cid, 7), DEADLINE_S, "the return and its contribution everywhere")

        states = [d.api("GET", f"/plugins/sharing/{cid}") for d in three]
        assert len({json.dumps(s, sort_keys=True) for s in states}) == 1
        [done] = states[0]["completed"]
        assert (done["id"], done["lender"], done["borrower"], done["days"]) == (rid, lender.member, borrower.member, 1)
        assert states[0]["lenders"] == [{"lender": lender.member, "loans": 1, "days": 1}]
        final = lender.cli_json("ledger", cid)["final"]
        assert all(r["status"] == "applied" for r in final)
        [rec] = [r for r in final if r["id"] == contribution]
        assert rec["type"] == "contribution" and rec["author"] == lender.member
        assert rec["body"]["evidence"]["hash"] == rid and rec["body"]["action"] == "use"
        # A second claim of the same loan is refused, and nothing is submitted.
        again = lender.cli("sharing", "claim", cid, rid, check=False)
        assert again.returncode == 1 and "already recorded as contribution" in again.stderr
        # Only the lender confirms a return: the ledger's sentence reaches the borrower's CLI.
        wrong = borrower.cli("sharing", "return", cid, offer, "--no-contribution", check=False)
        assert wrong.returncode == 1 and "Only the lender" in wrong.stderr

        # The plugin's route sits behind the daemon's token like every API route.
        host, port = Home(lender.home).api_address()
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(f"http://{host}:{port}/plugins/sharing/{cid}", timeout=10)
        assert exc.value.code == 401
        # Errors inside the plugin's handler become the daemon's one-sentence JSON errors.
        with pytest.raises(LocalError, match="'nonsense' is not a constellation id"):
            lender.api("GET", "/plugins/sharing/nonsense")
        # The node without the plugin does not mount its routes at all.
        with pytest.raises(LocalError, match="HTTP 404"):
            outsider.api("GET", f"/plugins/sharing/{cid}")
    finally:
        c.stop()


def test_a_node_refused_for_a_missing_plugin_does_not_become_a_member(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = Cluster(tmp_path, 2)
    founder, outsider = c.daemons
    try:
        founder.start()
        monkeypatch.setenv("VALUEMESH_DISABLE_PLUGINS", "sharing")
        outsider.start()
        monkeypatch.delenv("VALUEMESH_DISABLE_PLUGINS")
        cid = founder.cli_json("constellation", "create", "tool library")["id"]
        assert _join(founder, outsider, cid, tier="contributor").returncode == 1
        wait_until(lambda: not founder.cli_json("ledger", cid)["pending"], DEADLINE_S, "nothing pending")
        members = [m["member"] for m in founder.cli_json("constellation", "show", cid)["member_list"]]
        assert outsider.member not in members
    finally:
        c.stop()


# -- a deliberately broken plugin ---------------------------------------------------------


class Boom(Plugin):
    """Raises in apply, on every record."""

    name = "boom"
    ops = {"go": {"n": text(8)}}

    def apply(self, ctx: ApplyContext, record: Record) -> None:
        raise RuntimeError("boom")

    def examples(self) -> list[dict[str, Any]]:
        return [{"op": "go", "n": "1"}]


class Flaky(Plugin):
    """Writes a value from a hidden input (randomness), so two nodes disagree."""

    name = "flaky"
    ops = {"go": {"n": text(8)}}

    def apply(self, ctx: ApplyContext, record: Record) -> None:
        ctx.put(f"x/{record.id.hex()}", os.urandom(8))

    def examples(self) -> list[dict[str, Any]]:
        return [{"op": "go", "n": "1"}]


def test_the_kit_catches_a_plugin_that_raises_in_apply() -> None:
    with pytest.raises(AssertionError, match=r"none of its examples applies.*RuntimeError: boom"):
        check_plugin(Boom())


def test_the_kit_catches_a_non_deterministic_apply() -> None:
    with pytest.raises(AssertionError, match="gave different results on two ledgers"):
        check_plugin(Flaky())


BROKEN_MODULE = '''
"""A deliberately broken valuemesh plugin, installed only for one test."""
from valuemesh.plugin import Plugin, Version, text


class Broken(Plugin):
    name = "broken"
    version = Version(1, 0)
    distribution = "vm-broken"
    ops = {"boom": {"n": text(8)}, "arm": {"n": text(8)}, "tripwire": {"n": text(8)}}

    def apply(self, ctx, record):
        if ctx.op == "boom":
            raise RuntimeError("boom in apply")
        if ctx.op == "arm":
            ctx.put("armed", True)
            return
        # The daemon checks a submission against the final state; submitted in one
        # batch with an "arm" that is not final yet, this passes that check and
        # raises once it is ordered after the arm.
        if ctx.get("armed"):
            raise KeyError("tripwire")
        ctx.put("t", record.seq)

    def cli(self):
        raise RuntimeError("cli exploded")

    def api_routes(self):
        raise RuntimeError("routes exploded")


PLUGIN = Broken()
'''


def _install_dist(site: Path, dist: str, module: str, source: str, entry: str) -> None:
    """A minimal installed distribution: a module and a dist-info naming its entry point."""
    site.mkdir(parents=True)
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n"
                                   "Summary: A plugin installed for one test.\n")
    (info / "entry_points.txt").write_text(f"[valuemesh.plugins]\n{entry} = {module}:PLUGIN\n")


def _install_broken(site: Path) -> None:
    _install_dist(site, "vm-broken", "vm_broken_plugin", BROKEN_MODULE, "broken")


def _with_path(monkeypatch: pytest.MonkeyPatch, site: Path) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))


TALLY_MODULE = '''
from valuemesh.plugin import Plugin, Version, integer


class Tally(Plugin):
    name = "tally"
    version = Version(1, MINOR)
    distribution = "vm-tally"
    ops = {"add": {"n": integer(0, 10)}}

    def apply(self, ctx, record):
        ctx.put("sum", (ctx.get("sum") or 0) + record.body["n"])


PLUGIN = Tally()
'''


def test_a_node_with_an_older_minor_version_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = Cluster(tmp_path / "nodes", 2)
    founder, old = c.daemons
    try:
        with monkeypatch.context() as m:
            site = tmp_path / "new"
            _install_dist(site, "vm-tally", "vm_tally", TALLY_MODULE.replace("MINOR", "2"), "tally")
            _with_path(m, site)
            founder.start()
        with monkeypatch.context() as m:
            site = tmp_path / "old"
            _install_dist(site, "vm-tally", "vm_tally", TALLY_MODULE.replace("MINOR", "0"), "tally")
            _with_path(m, site)
            old.start()
        cid = founder.cli_json("constellation", "create", "counting")["id"]
        assert founder.cli_json("constellation", "show", cid)["plugins"]["tally"] == "1.2"
        res = _join(founder, old, cid, tier="contributor")
        assert res.returncode == 1
        assert res.stderr.strip() == ("error: This constellation uses plugin 'tally' 1.2, but 1.0 is installed; "
                                      "install 'tally' 1.x at least 1.2.")
        assert old.cli_json("constellation", "list")["constellations"] == []
    finally:
        c.stop()


def test_a_broken_plugin_cannot_crash_a_node_or_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    _install_broken(site)
    _with_path(monkeypatch, site)
    c = Cluster(tmp_path / "nodes", 1)
    [d] = c.daemons
    try:
        d.start()  # api_routes() raised inside the daemon: logged, the daemon serves on
        cid = d.cli_json("constellation", "create", "crash test")["id"]
        assert d.cli_json("constellation", "show", cid)["plugins"]["broken"] == "1.0"

        with pytest.raises(LocalError) as exc:
            d.api("POST", f"/v1/constellations/{cid}/records", {"type": "broken", "body": {"op": "boom", "n": "1"}})
        assert exc.value.message == "Plugin 'broken' failed on this record (RuntimeError: boom in apply)."

        trip = d.api("POST", f"/v1/constellations/{cid}/records",
                     {"records": [{"type": "broken", "body": {"op": "arm", "n": "1"}},
                                  {"type": "broken", "body": {"op": "tripwire", "n": "1"}}]})["records"][1]
        good = d.cli_json("contribute", cid, "--action", "work", "--quantity", "2", "--unit", "hour")["id"]
        wait_until(lambda: _final_on([d], cid, trip["id"]) and _final_on([d], cid, good), DEADLINE_S,
                   "the tripwire record and a contribution to be final")
        final = {r["id"]: r for r in d.cli_json("ledger", cid)["final"]}
        assert final[trip["id"]]["status"] == "rejected"
        assert final[trip["id"]]["reason"] == "Plugin 'broken' failed on this record (KeyError: 'tripwire')."
        assert final[good]["status"] == "applied"
        assert d.alive and d.cli_json("status")["health"] == "ok"
        with pytest.raises(LocalError):
            d.api("GET", f"/plugins/broken/{cid}")  # its routes were skipped, not half-mounted

        # The CLI: the broken plugin's commands are skipped with a warning; the rest works.
        res = d.cli("broken", "anything", check=False)
        assert res.returncode == 1
        assert "warning: skipped plugin 'broken' (vm-broken 0.1.0)" in res.stderr
        assert "RuntimeError: cli exploded" in res.stderr
        assert "Traceback" not in res.stderr
        assert "broken" in d.cli("--help").stdout
        plugins = {p["name"]: p for p in d.cli_json("plugin", "list")["plugins"]}
        assert plugins["broken"]["hook_errors"] == {"cli()": "RuntimeError: cli exploded",
                                                    "api_routes()": "RuntimeError: routes exploded"}
        assert [x["id"] for x in plugins["broken"]["constellations"]] == [cid]
        assert plugins["sharing"]["hook_errors"] == {} and plugins["sharing"]["cli"] is True
    finally:
        c.stop()


def test_plugin_info_names_what_is_missing(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "valuemesh.cli.main", "--home", str(tmp_path), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    res = run("plugin", "info", "nosuch")
    assert res.returncode == 1
    assert res.stderr.strip() == "error: No plugin 'nosuch' is installed; 'valuemesh plugin list' shows what is."
    doc = json.loads(run("--json", "plugin", "info", "sharing").stdout)
    assert doc["distribution"] == "valuemesh-sharing" and doc["constellations"] is None
    assert doc["ops"]["match"] == {"offer": "hash", "need": "hash"}
    assert Version.parse(doc["version"]).major == 1


# -- mounting plugin commands, in process --------------------------------------------------


class _Loud(Plugin):
    name = "loud"
    ops = {"go": {"n": text(8)}}
    loaded = 0

    def cli(self) -> Any:
        import click
        type(self).loaded += 1

        @click.group("loud")
        def loud() -> None:
            """Commands that go wrong."""

        @loud.command()
        def crash() -> None:
            raise ZeroDivisionError("division by zero in a plugin")

        return loud


class _Silent(Plugin):
    name = "silent"
    ops = {"go": {"n": text(8)}}


FAKE_PLUGINS = types.ModuleType("vm_fake_plugins")
FAKE_PLUGINS.LOUD = _Loud()  # type: ignore[attr-defined]
FAKE_PLUGINS.SILENT = _Silent()  # type: ignore[attr-defined]


def _root_with(monkeypatch: pytest.MonkeyPatch, *names: str) -> Any:
    from importlib.metadata import EntryPoint

    from valuemesh.cli.main import Group
    from valuemesh.cli.plugins import PluginCommands
    monkeypatch.setitem(sys.modules, "vm_fake_plugins", FAKE_PLUGINS)
    root = Group("valuemesh")
    for n in names:
        root.add_command(PluginCommands(EntryPoint(n, f"vm_fake_plugins:{n.upper()}", "valuemesh.plugins")))
    return root


def test_plugin_commands_load_only_when_invoked_and_their_crashes_are_one_sentence(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    root = _root_with(monkeypatch, "loud", "silent")
    _Loud.loaded = 0
    assert CliRunner().invoke(root, ["--help"]).exit_code == 0
    assert _Loud.loaded == 0
    res = CliRunner().invoke(root, ["loud", "crash"])
    assert _Loud.loaded == 1
    assert res.exit_code == 1
    assert res.stderr.strip() == ("error: Plugin 'loud' failed in its command "
                                  "(ZeroDivisionError: division by zero in a plugin).")
    res = CliRunner().invoke(root, ["silent"])
    assert res.exit_code == 1
    assert res.stderr.strip() == "error: The plugin 'silent' (unknown distribution) has no commands."
