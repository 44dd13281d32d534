"""Figure 5 (catch-up) on its own, repeatable: 4 daemons; the last one stops, the other three
finalise N records, then the late one rejoins and is timed until it reports the same final
count and state hash. With --repeat K the late node's home is restored from its copy taken at
the stop, and it rejoins K times over the very same gap (medians are printed).

Run: .venv/bin/python bench/catchup.py [--records 1000] [--prior 0] [--repeat 3] [--profile DIR]
Prints one JSON document. Same code paths as bench/run.py (bench/vmcluster.py); the gap is built
through consensus in requests of --batch records (the API's batch form), so a 100 000-record
gap takes minutes, not the hours one record per request would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vmcluster as vc
from machine import machine_info, raw_verify_rate

# The rate the gap is offered at, in records/s: below what 3 daemons finalise in 64-record
# requests on this host, so the pending limit never refuses a request.
BUILD_RATE = 800.0
PROFILE_RATE_HZ = 200
PROFILE_STOP_S = 20.0
PROFILE_ATTACH_S = 20.0


def restore_home(src: Path, dst: Path) -> None:
    shutil.rmtree(dst)
    shutil.copytree(src, dst)


def rejoin_profiled(c: Any, cid: str, missed: int, out: Path) -> dict[str, Any]:
    """vc.rejoin with py-spy sampling the late daemon from just after its process starts
    (a watcher attaches as soon as the new PID exists) until it has caught up; collapsed
    stacks per thread into `out` (`py-spy record --format raw --threads`)."""
    late = c.daemons[-1]
    old = late.proc
    spy: list[subprocess.Popen[bytes]] = []
    spy_bin = str(Path(sys.executable).parent / "py-spy")

    def attach() -> None:
        deadline = time.monotonic() + PROFILE_ATTACH_S
        while time.monotonic() < deadline:
            p = late.proc
            if p is not None and p is not old:
                spy.append(subprocess.Popen([spy_bin, "record", "--pid", str(p.pid), "--rate", str(PROFILE_RATE_HZ),
                                             "--format", "raw", "--threads", "-o", str(out)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                return
            time.sleep(0.001)

    peer = c.daemons[0].proc
    if peer is not None:  # one of the peers streaming the gap, for the sender's side
        spy.append(subprocess.Popen([spy_bin, "record", "--pid", str(peer.pid), "--rate", str(PROFILE_RATE_HZ),
                                     "--format", "raw", "--threads", "-o", str(out.with_suffix(".peer.txt"))],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    watcher = threading.Thread(target=attach)
    watcher.start()
    try:
        r = vc.rejoin(c, cid, missed)
    finally:
        watcher.join()
        for s in spy:
            os.kill(s.pid, signal.SIGINT)  # py-spy writes its file on SIGINT
            try:
                s.wait(PROFILE_STOP_S)
            except subprocess.TimeoutExpired:
                s.kill()
                s.wait()
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=int, default=1000, help="records the late node misses")
    ap.add_argument("--prior", type=int, default=0, help="records final on all four before the late node stops")
    ap.add_argument("--batch", type=int, default=64, help="records per request while building the gap")
    ap.add_argument("--rate", type=float, default=BUILD_RATE, help="records/s offered while building the gap")
    ap.add_argument("--repeat", type=int, default=3, help="rejoins over the same gap")
    ap.add_argument("--profile", metavar="DIR", help="py-spy record each rejoin (needs py-spy) into DIR")
    ap.add_argument("--trace", metavar="DIR", help="event-trace the late daemon (VALUEMESH_TRACE) into DIR")
    ap.add_argument("--keep", action="store_true", help="keep the daemons' homes")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="valuemesh-catchup-"))
    out: dict[str, Any] = {"machine": machine_info(), "records": args.records, "prior": args.prior, "root": str(root)}
    out["raw_verify_per_s"] = round(raw_verify_rate(1.0))
    try:
        c, cid = vc.start(root / "n4", 4)
        try:
            if args.prior:  # final on all four: what the late node replays at its start
                asyncio.run(vc.run_load(c, cid, rate=args.rate, count=args.prior, timing=False,
                                           batch=args.batch))
            late = c.daemons[-1]
            late.stop()
            res, build_s = vc.build_gap(c, cid, records=args.records, rate=args.rate, batch=args.batch)
            out.update(missed_records=len(res.submitted), build_s=round(build_s, 1), build_failed=res.failed,
                       build_stalled=res.stalled)
            # Every rejoin starts from the same four homes, so each times the very same gap (a
            # restored late node alone would sign new blocks for rounds it had signed in the
            # previous rejoin: an equivocation its peers would hold against it).
            c.stop()
            saved = root / "saved"
            for d in c.daemons:
                shutil.copytree(d.home, saved / d.name)
            runs = []
            for k in range(args.repeat):
                c.stop()
                for d in c.daemons:
                    restore_home(saved / d.name, d.home)
                for d in c.daemons[:-1]:
                    d.start()
                vc.wait_until(lambda: vc.joined_all(c.daemons[:-1], cid), vc.JOIN_TIMEOUT_S,
                              "the three peers to agree again", 0.5)
                if args.trace:  # only the late daemon, started next, inherits it
                    os.environ["VALUEMESH_TRACE"] = str(Path(args.trace) / f"rejoin-{k}")
                if args.profile:
                    Path(args.profile).mkdir(parents=True, exist_ok=True)
                    r = rejoin_profiled(c, cid, len(res.submitted), Path(args.profile) / f"rejoin-{k}.txt")
                else:
                    r = vc.rejoin(c, cid, len(res.submitted), last=max(res.submitted, key=res.submitted.__getitem__))
                os.environ.pop("VALUEMESH_TRACE", None)
                runs.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
            out["runs"] = runs
            done = [r for r in runs if r.get("caught_up")]
            if done:
                for key in ("seconds", "start_s", "seconds_after_ready", "records_per_s", "records_per_s_after_ready"):
                    out[f"median_{key}"] = statistics.median(r[key] for r in done)
                out["ratio_to_raw_verify"] = round(out["median_records_per_s"] / out["raw_verify_per_s"], 3)
        finally:
            c.stop()
    finally:
        out["load_average_at_end"] = list(os.getloadavg())
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
