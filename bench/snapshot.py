"""Cost of a ledger snapshot (protocol/snapshot.py) by ledger size: copying the ledger's
parts at an epoch end (on the event loop), encoding and hashing them (in a worker thread),
and, for a node that starts from one, decoding it and rebuilding the ledger.

Run: .venv/bin/python bench/snapshot.py [--records 2000,10000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_info

from valuemesh.protocol.snapshot import Snapshot
from valuemesh.protocol.testing import TestConstellation

WORK = {"op": "record", "action": "work", "quantity": "2", "unit": "hour"}


def ledger_of(records: int) -> TestConstellation:
    """Contributions by three members, every other one acknowledged by the next member."""
    tc = TestConstellation(3)
    i = 0
    while i < records:
        out = tc.post(i % 3, "contribution", WORK)
        i += 1
        if i < records:
            tc.post((i + 1) % 3, "contribution", {"op": "ack", "target": out.record.id})
            i += 1
    return tc


def timed(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def measure(n: int, repeat: int) -> dict[str, float]:
    tc = ledger_of(n)
    led = tc.ledger
    kw = {"epoch": 1, "round": 100, "index": n, "clock": tc.now, "final": n + 1}
    parts = led.parts()
    snap = Snapshot.encode(parts, **kw)
    assert snap.ledger(tc.registry).state_hash() == led.state_hash()
    return {
        "records": n, "entries": len(parts.data), "bytes": len(snap.raw),
        "copy_s": timed(led.parts, repeat),
        "encode_s": timed(lambda: Snapshot.encode(parts, **kw), repeat),
        "hash_s": timed(lambda: snap.hash, repeat),
        "decode_s": timed(lambda: Snapshot.decode(snap.raw), repeat),
        "rebuild_s": timed(lambda: snap.ledger(tc.registry), repeat),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", default="2000,10000")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    info = machine_info()
    print(f"# {info['cpu']}, {info['cores']} cores, Python {info['python']}, commit {info['commit']}")
    print("| records | state entries | snapshot bytes | copy parts (loop) | encode | hash | decode | rebuild ledger |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for n in (int(x) for x in args.records.split(",")):
        row = measure(n, args.repeat)
        rows.append(row)
        print(f"| {n} | {row['entries']} | {row['bytes']} | {row['copy_s'] * 1000:.1f} ms | "
              f"{row['encode_s'] * 1000:.0f} ms | {row['hash_s'] * 1000:.1f} ms | {row['decode_s'] * 1000:.0f} ms | "
              f"{row['rebuild_s'] * 1000:.0f} ms |")
    print(json.dumps({"machine": info, "rows": rows}))


if __name__ == "__main__":
    main()
