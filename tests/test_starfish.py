"""A group formed by invites alone, as members form one: the founder invites each member, and
each joiner's daemon knows only what its token told it (the founder's address) — no
bootstrap flags, no address list handed to every daemon. Then the founder dies (kill -9) and
the others must go on finalising with no manual step (#17: "a starfish, not a spider")."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from valuemesh.node.testing import Daemon, free_port, wait_until

pytestmark = pytest.mark.slow
DEADLINE_S = 60.0
NET = "valuemesh-starfish"


def _final(d: Daemon, cid: str) -> int:
    return int(d.api("GET", f"/v1/constellations/{cid}")["final"])


def _agreed(daemons: list[Daemon], cid: str, n: int) -> bool:
    sums = [d.api("GET", f"/v1/constellations/{cid}") for d in daemons]
    return all(s["final"] >= n and s["pending"] == 0 for s in sums) and len({s["state_hash"] for s in sums}) == 1


def test_the_group_goes_on_when_its_founder_dies(tmp_path: Path) -> None:
    daemons = [Daemon(f"m{i}", tmp_path / f"m{i}", free_port(), NET) for i in range(4)]  # no bootstrap
    founder, others = daemons[0], daemons[1:]
    try:
        for d in daemons:
            d.start()
        cid = founder.cli_json("constellation", "create", "bakery")["id"]
        for d in others:  # one at a time, as invites are accepted
            token = founder.cli("constellation", "invite", cid, "--tier", "core", "--role", "producer").stdout.strip()
            d.cli("constellation", "join", token)
            wait_until(lambda d=d: d.api("GET", f"/v1/constellations/{cid}")["my_tier"] == "core", DEADLINE_S,
                       f"{d.name}'s join to be final")
        wait_until(lambda: _agreed(daemons, cid, 4), DEADLINE_S, "the joins to be final everywhere")
        for d in daemons:
            d.cli("contribute", cid, "--action", "work", "--quantity", "1", "--unit", "hour")
        wait_until(lambda: _agreed(daemons, cid, 8), DEADLINE_S, "one contribution each, final everywhere")
        time.sleep(3.0)  # a few seconds of normal life: peer exchange, saved addresses

        founder.kill()
        before = _final(others[0], cid)
        started = time.monotonic()
        for d in others:
            d.cli("contribute", cid, "--action", "work", "--quantity", "2", "--unit", "hour")
        wait_until(lambda: _agreed(others, cid, before + 3), DEADLINE_S,
                   "the three survivors to finalise without their founder")
        print(f"survivors final again {time.monotonic() - started:.1f} s after the founder's kill")

        # A survivor killed too and restarted with no flags finds the others from its store.
        survivor = others[0]
        survivor.kill()
        survivor.start()
        survivor.cli("contribute", cid, "--action", "work", "--quantity", "3", "--unit", "hour")
        wait_until(lambda: _agreed(others, cid, before + 4), DEADLINE_S,
                   "a restarted survivor to rejoin the others without the founder")
    finally:
        for d in daemons:
            d.stop()
