"""`make demo`: four local daemons form a constellation, record work, agree,
lose a member to SIGKILL, keep agreeing, and catch the member up again.

Everything runs on 127.0.0.1 with mDNS off, in a temporary directory that is
removed at the end; every daemon is stopped by PID.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from valuemesh.node.testing import Cluster, wait_until

DEADLINE_S = 60


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def show(c: Cluster, cid: str) -> None:
    for d in c.daemons:
        if d.alive:
            led = d.cli_json("ledger", cid)
            print(f"   {d.name}: {len(led['final']):>3} final, {len(led['pending'])} pending, "
                  f"state {led['state_hash'][:16]}")
        else:
            print(f"   {d.name}: (down)")


def agreed(c: Cluster, cid: str, n: int) -> bool:
    ls = [d.cli_json("ledger", cid) for d in c.daemons if d.alive]
    return all(len(x["final"]) >= n and not x["pending"] for x in ls) and len({x["state_hash"] for x in ls}) == 1


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="valuemesh-demo-"))
    c = Cluster(root, 4)
    try:
        say(f"starting four daemons on loopback (homes under {root})")
        c.start()
        for d in c.daemons:
            print(f"   {d.name}: {d.member}")
        say("node0 founds 'Bakery' and invites the three others as core members")
        cid = c.found("Bakery", roles=("producer",))
        print(f"   constellation {cid}")
        wait_until(lambda: agreed(c, cid, 4), DEADLINE_S, "joins")
        print("   " + c.daemons[0].cli("constellation", "show", cid).stdout.replace("\n", "\n   "))
        say("each member records a contribution")
        for i, d in enumerate(c.daemons):
            d.cli("contribute", cid, "--action", "work", "--quantity", str(i + 1), "--unit", "hour",
                  "--note", f"shift {i + 1}")
        wait_until(lambda: agreed(c, cid, 8), DEADLINE_S, "contributions")
        show(c, cid)
        say("kill -9 node3; the other three keep agreeing")
        c.daemons[3].kill()
        t = time.monotonic()
        for d in c.daemons[:3]:
            d.cli("contribute", cid, "--action", "produce", "--quantity", "12", "--unit", "loaf")
        wait_until(lambda: agreed(c, cid, 11), DEADLINE_S, "finality without node3")
        print(f"   final on the three survivors after {time.monotonic() - t:.2f} s")
        show(c, cid)
        say("restart node3; it catches up from its peers")
        t = time.monotonic()
        c.daemons[3].start()
        wait_until(lambda: agreed(c, cid, 11), DEADLINE_S, "catch-up")
        print(f"   caught up in {time.monotonic() - t:.2f} s")
        show(c, cid)
        say("the ledger, as node3 sees it")
        print(c.daemons[3].cli("ledger", cid).stdout)
        return 0
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)
        say("stopped every daemon and removed the demo homes")


if __name__ == "__main__":
    sys.exit(main())
