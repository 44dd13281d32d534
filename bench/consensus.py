"""Benchmark of the consensus machine in the simulator: CPU per committed block without
signatures at n = 4, 16, 64, and message delays from proposal to commit, fault-free.

Run: .venv/bin/python bench/consensus.py [--sizes 4,16,64] [--waves 10] [--probes 20]
"""

from __future__ import annotations

import argparse
import heapq
import platform
import statistics
import time

from valuemesh.protocol.sim import World

DELAY_MS = 100  # one message delay in the fixed-latency network


def machine() -> str:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{platform.system()} {platform.release()} {platform.machine()}, {cpu}, "
            f"Python {platform.python_version()} ({platform.python_implementation()})")


class FixedDelay:
    """Deliver every message exactly DELAY_MS after it is sent; run timers on time."""

    def __init__(self, world: World) -> None:
        self.w = world
        self.heap: list[tuple[int, int, int, object]] = []
        self.seq = 0

    def push(self, t: int, kind: int, arg: object) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, arg))

    def flush(self) -> None:
        for env in self.w.outbox:
            self.push(self.w.now + DELAY_MS, 0, env)
        self.w.outbox.clear()
        for t, i in self.w.tick_requests:
            self.push(max(t, self.w.now), 1, i)
        self.w.tick_requests.clear()

    def run_until_idle(self, limit_ms: int) -> None:
        self.flush()
        while self.heap and self.heap[0][0] <= limit_ms:
            t, _, kind, arg = heapq.heappop(self.heap)
            self.w.now = t
            if kind == 0:
                self.w.deliver(arg)  # type: ignore[arg-type]
            else:
                self.w.tick(arg)  # type: ignore[arg-type]
            self.flush()


def cpu_per_block(n: int, waves: int) -> tuple[float, float, int, list[float]]:
    """Every node proposes one record per wave (every 2 delays).

    Returns µs per committed block (whole network and per node), the block count and the
    message delays each record took from proposal to commit at its author.
    """
    world = World(n, crypto=False, observers=0)
    net = FixedDelay(world)
    start = time.process_time()
    for k in range(waves):
        for i in range(n):
            world.propose(i, body=k)
        net.run_until_idle(world.now + 2 * DELAY_MS)
    net.run_until_idle(world.now + 100 * DELAY_MS)
    cpu = time.process_time() - start
    blocks = len(world.nodes[0].log)
    assert world.check_safety() == [] and world.check_liveness() == []
    per_block = cpu / blocks * 1e6
    return per_block, per_block / n, blocks, [ms / DELAY_MS for ms in world.latency_ms]


def delays_to_commit(n: int, probes: int) -> list[float]:
    """One record at a time into a quiet constellation: message delays until its author commits."""
    world = World(n, crypto=False, observers=0)
    net = FixedDelay(world)
    out: list[float] = []
    for k in range(probes):
        i = k % n
        net.run_until_idle(world.now + 1_000 * DELAY_MS)
        world.now += 10 * DELAY_MS
        t0 = world.now
        rec = world.propose(i, body=k)
        assert rec is not None
        net.flush()
        node = world.nodes[i]
        while rec.id not in node.log_records and net.heap:
            t, _, kind, arg = heapq.heappop(net.heap)
            world.now = t
            if kind == 0:
                world.deliver(arg)  # type: ignore[arg-type]
            else:
                world.tick(arg)  # type: ignore[arg-type]
            net.flush()
        assert rec.id in node.log_records, "a probe record never committed"
        out.append((world.now - t0) / DELAY_MS)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4,16,64")
    ap.add_argument("--waves", type=int, default=10)
    ap.add_argument("--probes", type=int, default=20)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"machine: {machine()}")
    print("CPU per committed block (simulation of all n nodes, no signatures; "
          "CBOR encoding and BLAKE2b ids included)")
    loaded: dict[int, list[float]] = {}
    for n in sizes:
        total, per_node, blocks, loaded[n] = cpu_per_block(n, args.waves)
        print(f"  n={n:<3} {blocks:>6} blocks  {total:>10.0f} µs/block for the whole network"
              f"  {per_node:>8.0f} µs/block per node")
    print(f"message delays from proposal to commit at the proposer, fault-free, "
          f"fixed delay {DELAY_MS} ms, every node proposing every 2 delays")
    for n in sizes:
        d = loaded[n]
        print(f"  n={n:<3} p50={statistics.median(d):.1f}  min={min(d):.1f}  max={max(d):.1f}"
              f"  ({len(d)} records)")
    print(f"message delays from proposal to commit at the proposer, fault-free, "
          f"fixed delay {DELAY_MS} ms, quiet constellation")
    for n in sizes:
        d = delays_to_commit(n, args.probes)
        print(f"  n={n:<3} p50={statistics.median(d):.1f}  min={min(d):.1f}  max={max(d):.1f}"
              f"  ({len(d)} probes)")


if __name__ == "__main__":
    main()
