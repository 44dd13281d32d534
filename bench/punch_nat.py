"""Hole-punch success and time to connect per NAT pairing on the namespace internet
(chaos/internet.py), printed beside libp2p DCUtR's 70 % ± 7 % of attempts on the real internet.

Each attempt is one try (CONNECT, answer, SYNC, synchronised dial, bounded by the 5 s dial
window) between hosts in two different homes, coordinated through a public host, on a fresh
listen port. Needs root and network namespaces; says why and exits 0 where they are missing.

    .venv/bin/python bench/punch_nat.py --attempts 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # chaos/ is a folder of scripts, not installed
sys.path.insert(0, str(ROOT / "tests"))

import punch_bed  # noqa: E402

from chaos import internet  # noqa: E402
from chaos.internet import HomeSpec, Internet  # noqa: E402

HOMES = (HomeSpec("ea", "eim"), HomeSpec("eb", "eim"), HomeSpec("sa", "sym"), HomeSpec("sb", "sym"))
PAIRINGS = (("EIM-EIM", "ea1", "eb1"), ("EIM-sym", "ea1", "sa1"), ("sym-EIM", "sa1", "ea1"), ("sym-sym", "sa1", "sb1"))
DCUTR = "libp2p DCUtR on the real internet: 70 % ± 7 % of attempts"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attempts", type=int, default=10)
    args = ap.parse_args()
    if not 1 <= args.attempts <= 50:
        print("--attempts must be 1 to 50.")
        return 2
    reason = internet.unavailable_reason()
    if reason is not None:
        print(f"SKIPPED: the internet bed is unavailable: {reason}")
        return 0
    internet.remove_stale()
    port = 20000
    rows = []
    with Internet(HOMES, public_hosts=1) as net:
        for name, answerer, upgrader in PAIRINGS:
            ok, times, why = 0, [], set()
            for _ in range(args.attempts):
                port += 1
                a, u = punch_bed.run_pair(net, answerer, upgrader, port, ("--tries", "1"), 60.0)
                if a.get("ok") and u.get("ok"):
                    ok += 1
                    times.append(float(u["elapsed"]))  # type: ignore[arg-type]
                else:
                    why.add(str(u.get("reason", "?")))
            rows.append((name, ok, times, why))
    print(f"{'pairing':10} {'success':>9} {'median ms':>10} {'max ms':>8}  (per try; {DCUTR})")
    total = 0
    for name, ok, times, why in rows:
        total += ok
        med = f"{statistics.median(times) * 1000:.0f}" if times else "-"
        top = f"{max(times) * 1000:.0f}" if times else "-"
        print(f"{name:10} {ok:>3}/{args.attempts:<5} {med:>10} {top:>8}")
        for w in sorted(why)[:2]:
            print(f"    e.g. {w}")
    print(f"all pairings: {total}/{args.attempts * len(rows)} "
          f"({100 * total / (args.attempts * len(rows)):.0f} %); where the NAT pairing allows it "
          f"(EIM-EIM): {rows[0][1]}/{args.attempts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
