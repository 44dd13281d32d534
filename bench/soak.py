"""Long simulation: many seeded fault schedules over several committee sizes, every fault kind
at once, in parallel worker processes. Prints, per size, the seeds run, the violations found
(target 0) with each one's replay command, seeds per second of wall time and the CPU seconds
one schedule costs (median and p99), then the machine it ran on.

The full run is 10^5 schedules, 25 000 per size (about 1.5 h on 2 cores; see
docs/consensus.md §9): `make bench-soak`. A sample: `.venv/bin/python bench/soak.py
--seeds 200`. Every run is bounded: `--max-seconds` stops handing out seeds when it is
reached, and Ctrl-C or SIGTERM stops it the same way; the report says how many ran.

Run: .venv/bin/python bench/soak.py [--sizes 4,7,10,16] [--seeds 25000] [--seed-start 0]
     [--rounds 20] [--workers N] [--max-seconds S] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from machine import machine_info

from valuemesh.protocol.sim.runner import FAULT_KINDS, run

# Every kind at once, as `make soak` runs them.
ALL_FAULTS = tuple(FAULT_KINDS)


@dataclass(frozen=True, slots=True)
class Outcome:
    nodes: int
    seed: int
    violations: tuple[str, ...]
    replay: str
    cpu_s: float


@dataclass(slots=True)
class SizeReport:
    nodes: int
    seeds: int = 0
    failures: list[Outcome] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return {
            "nodes": self.nodes,
            "seeds": self.seeds,
            "violations": len(self.failures),
            "failed_seeds": [o.seed for o in self.failures],
            "replay": [o.replay for o in self.failures],
            "cpu_s_per_seed_p50": round(statistics.median(self.cpu), 4) if self.cpu else None,
            "cpu_s_per_seed_p99": round(_p99(self.cpu), 4) if self.cpu else None,
            "cpu_s_total": round(sum(self.cpu), 1),
        }


def _p99(values: list[float]) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(0.99 * len(s)))]


def one(job: tuple[int, int, int]) -> Outcome:
    nodes, seed, rounds = job
    t0 = time.process_time()
    res = run(nodes, seed, ALL_FAULTS, rounds)
    return Outcome(nodes, seed, tuple(res.violations), res.replay(), time.process_time() - t0)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _quiet_worker() -> None:
    """Ctrl-C reaches the whole process group: only the parent answers it (and stops the pool)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def jobs(sizes: list[int], seeds: int, start: int, rounds: int) -> Iterator[tuple[int, int, int]]:
    # Sizes interleaved, so a run stopped by --max-seconds has sampled every size alike.
    for seed in range(start, start + seeds):
        for n in sizes:
            yield n, seed, rounds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/soak.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="4,7,10,16")
    ap.add_argument("--seeds", type=int, default=25_000, help="schedules per size")
    ap.add_argument("--seed-start", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=20, help="proposal waves per schedule")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--max-seconds", type=float, default=4 * 3600.0)
    ap.add_argument("--out", type=Path, default=None, help="also write the report as JSON")
    args = ap.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s]
    except ValueError:
        ap.error(f"--sizes takes comma-separated integers, not '{args.sizes}'.")
    if not sizes or min(sizes) < 1 or args.seeds < 1 or args.workers < 1:
        ap.error("--sizes, --seeds and --workers must be positive.")

    info = machine_info()
    reports = {n: SizeReport(n) for n in sizes}
    began = time.monotonic()
    stop = ""
    pool = multiprocessing.get_context("fork").Pool(args.workers, initializer=_quiet_worker)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # after the fork: workers keep the default
    try:
        for out in pool.imap_unordered(one, jobs(sizes, args.seeds, args.seed_start, args.rounds),
                                       chunksize=4):
            r = reports[out.nodes]
            r.seeds += 1
            r.cpu.append(out.cpu_s)
            if out.violations:
                r.failures.append(out)
                print(f"VIOLATION n={out.nodes} seed={out.seed}: {'; '.join(out.violations)}\n"
                      f"  replay: {out.replay}", flush=True)
            if time.monotonic() - began > args.max_seconds:
                stop = "stopped at --max-seconds"
                break
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: report what ran so far
        stop = "interrupted"
    finally:
        pool.terminate()
        pool.join()
        signal.signal(signal.SIGTERM, previous)
    stopped_early = bool(stop)
    wall = time.monotonic() - began

    total = sum(r.seeds for r in reports.values())
    bad = sum(len(r.failures) for r in reports.values())
    print(f"soak: faults {','.join(ALL_FAULTS)}; {args.rounds} waves; seeds from {args.seed_start}; "
          f"{args.workers} workers")
    print(f"{'n':>3} {'seeds':>7} {'violations':>10} {'cpu s/seed p50':>15} {'p99':>7} {'cpu s':>8}")
    for r in reports.values():
        j = r.as_json()
        print(f"{r.nodes:>3} {r.seeds:>7} {len(r.failures):>10} {j['cpu_s_per_seed_p50']!s:>15} "
              f"{j['cpu_s_per_seed_p99']!s:>7} {j['cpu_s_total']!s:>8}")
    print(f"all {total} schedules in {wall:.0f} s ({total / max(wall, 1e-9):.1f}/s), {bad} with a violation"
          + (f"; {stop}" if stop else ""))
    print(f"machine: {info['cpu']}, {info['usable_cores']} usable cores, Python {info['python']}, "
          f"commit {info['commit']}, load at start {info['load_average_at_start']}")
    if args.out:
        args.out.write_text(json.dumps({
            "machine": info, "faults": list(ALL_FAULTS), "rounds": args.rounds,
            "seed_start": args.seed_start, "workers": args.workers, "wall_s": round(wall, 1),
            "stopped_early": stopped_early, "sizes": [r.as_json() for r in reports.values()],
        }, indent=2) + "\n", encoding="utf-8")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
