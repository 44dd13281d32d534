"""`valuemesh netcheck` in the internet bed (chaos/internet.py), through the CLI as a member runs
it: a daemon behind the endpoint-independent NAT reports `endpoint-independent`, one behind the
symmetric NAT `endpoint-dependent`, both "not reachable" behind NAT; one behind the router with
miniupnpd reports the port mapping it obtained; the links from a home to the public members
are `direct`, with a round trip."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # chaos/ is a folder of scripts, not installed

from chaos import internet
from chaos.internet import HomeSpec, Internet

REASON = internet.unavailable_reason()
pytestmark = [pytest.mark.slow, pytest.mark.netns,
              pytest.mark.skipif(REASON is not None, reason=f"internet bed: {REASON}")]

NET = "vmtest-netcheck"
PORT = 7470
DEADLINE_S = 120.0
EXE = Path(sys.executable).parent / "valuemesh"


class Member:
    """One daemon in a bed host, driven through the `valuemesh` command in its namespace."""

    def __init__(self, net: Internet, host: str, root: Path) -> None:
        self.net, self.host, self.home = net, host, root / host
        self.proc: subprocess.Popen[str] | None = None

    def start(self, listen: str) -> None:
        self.home.mkdir(parents=True)
        with open(self.home.parent / f"{self.host}.log", "w") as err:
            self.proc = self.net.popen(self.host, [str(EXE), "--home", str(self.home), "daemon", "--init-if-missing",
                                                   "--network", NET, "--listen", listen, "--no-mdns"],
                                       stdout=subprocess.DEVNULL, stderr=err)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = self.net.run(self.host, [str(EXE), "--home", str(self.home), *args], check=False, timeout=60)
        if check and res.returncode != 0:
            raise AssertionError(f"{self.host}: valuemesh {' '.join(args)}: {res.stderr.strip()}")
        return res

    def json(self, *args: str) -> Any:
        return json.loads(self.cli("--json", *args).stdout)

    def log(self) -> str:
        return (self.home.parent / f"{self.host}.log").read_text()[-3000:]


def until(pred: Any, what: str, members: list[Member], timeout: float = DEADLINE_S, interval: float = 1.0) -> Any:
    """Poll `pred` (bounded) until it returns something true; on time-out, fail with the logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = pred()
            if got:
                return got
        except (AssertionError, ValueError, KeyError):
            pass
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}\n" + "\n".join(f"--- {m.host}\n{m.log()}" for m in members))


@pytest.fixture(scope="module")
def net() -> Iterator[Internet]:
    internet.remove_stale()
    homes = [HomeSpec("eim", "eim"), HomeSpec("sym", "sym"), HomeSpec("upnp", "eim", upnp=True)]
    with Internet(homes, public_hosts=2) as bed:
        yield bed


def test_netcheck_tells_each_nat_and_the_mapping(net: Internet, tmp_path: Path) -> None:
    if not EXE.exists():
        pytest.skip("the valuemesh command is not installed in this environment")
    members = {h: Member(net, h, tmp_path) for h in ("pub1", "pub2", "eim1", "sym1", "upnp1")}
    every = list(members.values())
    try:
        for name, m in members.items():
            # pub1 and the homes listen on every interface of both families (the default), pub2 on
            # its IPv4 address alone.
            m.start(f"{net.host(name).ip}:{PORT}" if name == "pub2" else f"[::]:{PORT}")
        for m in every:
            until(lambda m=m: m.cli("status", check=False).returncode == 0, f"{m.host}'s daemon to answer", every)
        founder = members["pub1"]
        cid = founder.json("constellation", "create", "bed")["id"]
        for name in ("pub2", "eim1", "sym1", "upnp1"):
            token = founder.cli("constellation", "invite", cid).stdout.strip()
            members[name].cli("constellation", "join", token)
        pubs = {founder.json("status")["member"], members["pub2"].json("status")["member"]}

        def linked_to_pubs(m: Member) -> list[dict[str, Any]]:
            peers = [p for p in m.json("peers")["peers"] if p["connected"] and p["member"] in pubs]
            return peers if len(peers) == 2 and all(p["rtt_ms"] is not None for p in peers) else []

        for name in ("eim1", "sym1"):
            m = members[name]
            peers = until(lambda m=m: linked_to_pubs(m), f"{name} to link to both public members", every)
            assert all(p["path"] == "direct" and p["relay"] is None for p in peers), peers

        def verdict(m: Member) -> dict[str, Any] | None:
            doc = m.json("netcheck")
            return doc if doc["nat"]["kind"] != "unknown" else None

        # The first dial-back round may have seen one public member only; netcheck asks again
        # once the last round is 30 s old.
        eim = until(lambda: verdict(members["eim1"]), "eim1's netcheck to tell its NAT", every)
        assert eim["nat"]["kind"] == "endpoint-independent", eim["nat"]
        assert eim["nat"]["outside"] == [net.homes["eim"].outside_ip]
        assert eim["reachability"]["state"] == "unreachable"
        assert f"at {net.homes['eim'].outside_ip}, behind NAT" in eim["reachability"]["text"]
        sym = until(lambda: verdict(members["sym1"]), "sym1's netcheck to tell its NAT", every)
        assert sym["nat"]["kind"] == "endpoint-dependent" and "symmetric" in sym["nat"]["text"], sym["nat"]
        assert sym["reachability"]["state"] == "unreachable"
        assert not sym["port_mapping"]["obtained"] and "granted none" in sym["port_mapping"]["reason"]

        router = net.homes["upnp"].outside_ip
        mapped = until(lambda: (d := members["upnp1"].json("netcheck", "--cached"))["port_mapping"]["obtained"] and d,
                       "upnp1's port mapping", every)
        pm = mapped["port_mapping"]
        assert pm["method"] in ("pcp", "natpmp", "upnp") and pm["external_ip"] == router, pm
        assert pm["text"].startswith(f"Port mapping: the router forwards {router}:{pm['external_port']} to this "
                                     f"node's port {PORT} by ")
        public = until(lambda: (d := founder.json("netcheck"))["reachability"]["state"] == "reachable" and d,
                       "pub1's netcheck to find it reachable", every)
        assert f"{net.host('pub1').ip}:{PORT}" in public["reachability"]["text"]
        found = {a["address"]: (a["kind"], a["result"]) for a in public["addresses"]}
        assert found[f"{net.host('pub1').ip}:{PORT}"] == ("direct", "reachable"), found
        assert public["relays"]["reserved_at"] == [] and "needs none" in public["relays"]["text"]
        # Listening on both families, it announces its global IPv6 address too (members with
        # IPv6 dial it); pub2, listening on its IPv4 address alone, announces none and says so.
        assert public["ipv6"]["host_addresses"] == [net.host("pub1").ip6]
        assert public["ipv6"]["announced"] == [f"[{net.host('pub1').ip6}]:{PORT}"], public["ipv6"]
        other = members["pub2"].json("netcheck", "--cached")["ipv6"]
        assert other["announced"] == [] and "announces no IPv6 address" in other["text"]
        for name, doc in (("pub1", public), ("eim1", eim), ("sym1", sym), ("upnp1", mapped)):
            print(f"--- {name}: valuemesh netcheck\n" + "\n".join(doc["lines"]))
        # With node/reach.py: the mapping is announced and dial-back reaches it; a home member
        # without one holds reservations at the public members.
        upnp = until(lambda: (d := members["upnp1"].json("netcheck"))["reachability"]["state"] == "reachable" and d,
                     "upnp1 to be found reachable through its mapping", every)
        assert f"{router}:{pm['external_port']}" in upnp["reachability"]["text"]
        assert ("mapped", "reachable") in [(a["kind"], a["result"]) for a in upnp["addresses"]]
        held = until(lambda: members["eim1"].json("netcheck", "--cached")["relays"]["reserved_at"],
                     "eim1 to hold relay reservations", every)
        assert set(held) <= pubs
        text = members["eim1"].cli("netcheck", "--cached").stdout
        assert "endpoint-independent" in text and "Not reachable from the internet" in text
        assert all(line.endswith(".") for line in text.strip().splitlines())
    finally:
        for m in every:
            if m.proc is not None:
                net.stop(m.proc)
