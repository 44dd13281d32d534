"""Command line of the simulator: run many seeds, print one line per run, exit non-zero
with the exact replay command when any run breaks an invariant.
"""

from __future__ import annotations

import argparse
import sys

from .runner import FAULT_KINDS, run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m valuemesh.protocol.sim")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--seed-start", type=int, default=0)
    ap.add_argument("--faults", default="", help=f"comma-separated: {','.join(FAULT_KINDS)}")
    ap.add_argument("--rounds", type=int, default=20, help="proposal waves per run")
    ap.add_argument("--no-crypto", action="store_true", help="skip signing and verifying")
    args = ap.parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    bad = [f for f in faults if f not in FAULT_KINDS]
    if bad:
        print(f"unknown fault kind(s): {', '.join(bad)}", file=sys.stderr)
        return 2
    failed = 0
    for seed in range(args.seed_start, args.seed_start + args.seeds):
        res = run(args.nodes, seed, faults, args.rounds, crypto=not args.no_crypto)
        print(res.summary(), flush=True)
        if not res.ok:
            failed += 1
            for v in res.violations:
                print(f"  violation: {v}")
            print(f"  replay: {res.replay()}", flush=True)
    print(f"{args.seeds - failed}/{args.seeds} runs passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
