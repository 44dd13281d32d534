"""How long a newcomer takes to reach a long-lived constellation's state: starting from its
latest quorum-signed checkpoint against replaying every block since genesis, in the same run.

Two core daemons finalise N records; a third joins as core, which closes the epoch with a
checkpoint whose snapshot holds those records. Then two newcomers join as contributors, one
after the other: one starts from the checkpoint (`checkpoint_start_min_records` 0), the other
replays the blocks (its threshold above N). Each is timed from `constellation join` until its
node reports the core's final count and state hash.

Run: .venv/bin/python bench/newcomer.py [--records 2000] [--rate 400]
Prints a table line and one JSON document; real daemons on loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vmcluster as vc
from machine import machine_info

from valuemesh.node.testing import Cluster, Daemon, wait_until

DEADLINE_S = 300.0


def _configure(d: Daemon, min_records: int) -> None:
    d.cli("init", "--name", d.name)
    path = d.home / "config.json"
    cfg = json.loads(path.read_text())
    cfg["checkpoint_start_min_records"] = min_records
    path.write_text(json.dumps(cfg))


def _summary(d: Daemon, cid: str) -> dict[str, Any]:
    return d.api("GET", f"/v1/constellations/{cid}")  # type: ignore[no-any-return]


def _time_join(founder: Daemon, newcomer: Daemon, cid: str) -> dict[str, Any]:
    want = _summary(founder, cid)
    token = founder.cli("constellation", "invite", cid).stdout.strip()
    t0 = time.monotonic()
    newcomer.cli("constellation", "join", token)
    t_joined = time.monotonic()
    done: list[float] = []

    def caught_up() -> bool:
        s = _summary(newcomer, cid)
        if s["state_hash"] == _summary(founder, cid)["state_hash"] and s["final"] >= want["final"] + 1:
            done.append(time.monotonic())
            return True
        return False

    wait_until(caught_up, DEADLINE_S, f"{newcomer.name} to reach the core's state", 0.05)
    s = _summary(newcomer, cid)
    return {"seconds": round(done[0] - t0, 2), "join_call_s": round(t_joined - t0, 2),
            "started_from": s.get("started_from"), "final": s["final"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=400.0)
    ap.add_argument("--keep", action="store_true", help="keep the daemons' homes (logs)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="valuemesh-newcomer-"))
    c = Cluster(root, 5, network="valuemesh-bench")
    try:
        for i, d in enumerate(c.daemons):
            # node3 starts from a checkpoint whatever its size; node4 replays (threshold above N)
            _configure(d, 0 if i == 3 else args.records * 10)
        c.start()
        founder, second, third, from_cp, replayer = c.daemons
        cid = founder.cli_json("constellation", "create", "bench")["id"]
        core_token = founder.cli("constellation", "invite", cid, "--tier", "core", "--uses", "2").stdout.strip()
        second.cli("constellation", "join", core_token)
        wait_until(lambda: all(_summary(d, cid)["core"] == 2 and _summary(d, cid)["pending"] == 0
                               for d in (founder, second)), vc.JOIN_TIMEOUT_S, "the second core member")
        for d in (third, from_cp, replayer):
            d.stop()  # only the two core daemons build the ledger
        res = asyncio.run(vc.run_load(c, cid, rate=args.rate, count=args.records, targets=[0, 1], timing=False))
        third.start()
        third.cli("constellation", "join", core_token)
        wait_until(lambda: (_summary(founder, cid)["checkpoint"] or {}).get("epoch", -1) >= 1,
                   DEADLINE_S, "the epoch holding the records to be certified")
        from_cp.start()
        a = _time_join(founder, from_cp, cid)
        replayer.start()
        b = _time_join(founder, replayer, cid)
        out = {"machine": machine_info(), "records": len(res.submitted), "final_order": a["final"],
               "from_checkpoint": a, "replaying": b,
               "speedup": round(b["seconds"] / a["seconds"], 1) if a["seconds"] else None}
        print(f"| newcomer, {out['final_order']} final records | from checkpoint {a['seconds']} s "
              f"(started from epoch {(a['started_from'] or {}).get('epoch')}) | replaying {b['seconds']} s | "
              f"{out['speedup']} x |")
        print(json.dumps(out))
        return 0 if a["started_from"] is not None and b["started_from"] is None else 1
    finally:
        c.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
