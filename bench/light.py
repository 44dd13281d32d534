"""The 4-daemon pieces of figures 2-4 on their own, for iterating on the hop cost: light-load
finality (with rounds per record), optionally sustained throughput and the kill -9 gap.

Run: .venv/bin/python bench/light.py [--count 30] [--rate 2] [--sustained 800] [--kill]
Prints one JSON document. Same code paths as bench/run.py (bench/vmcluster.py).
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
from run import BATCH, sustained


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nodes", type=int, default=4, help="daemons (sustained and --kill assume 4)")
    ap.add_argument("--count", type=int, default=30, help="records at light load")
    ap.add_argument("--rate", type=float, default=2.0, help="light load, records per second")
    ap.add_argument("--sustained", type=int, default=0, metavar="N", help="also sustained throughput of N records")
    ap.add_argument("--kill", action="store_true", help="also kill -9 each daemon in turn under load (quick mode)")
    ap.add_argument("--keep", action="store_true", help="keep the daemons' homes (logs, traces)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="valuemesh-light-"))
    out: dict[str, Any] = {"root": str(root)}
    try:
        c, cid = vc.start(root / f"n{args.nodes}", args.nodes)
        try:
            r0 = c.daemons[0].api("GET", f"/v1/constellations/{cid}")["round"]
            t0 = time.monotonic()
            out["light"] = vc.latency_summary(asyncio.run(vc.run_load(c, cid, rate=args.rate, count=args.count)))
            rounds = c.daemons[0].api("GET", f"/v1/constellations/{cid}")["round"] - r0
            out["light"].update(rounds=rounds, rounds_per_record=round(rounds / args.count, 2),
                                seconds=round(time.monotonic() - t0, 1))
            if args.sustained:
                out["sustained"] = sustained(c, cid, args.sustained, 1)
                out["sustained_batch"] = sustained(c, cid, args.sustained, BATCH)
            if args.kill:
                out["availability"] = vc.availability(c, cid, rate=30.0, quick=True)
        finally:
            c.stop()
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
