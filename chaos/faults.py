"""The faults and the schedule: a seed gives the same list of faults (kind, target, duration,
parameter) every time, so a failing run is replayed with its seed. `inject` starts one fault
on the bed and returns the function that heals it.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from chaos.bed import Bed
from chaos.daemons import Node

# Every kind, and the ones the CI-size run schedules: faults the product claims to survive
# today (at most f = 1 of 4 core members faulty at a time, or a partition healed later).
KINDS = ("kill", "link-down", "partition", "asym-partition", "split", "loss", "duplicate", "delay-reorder",
         "clock-skew", "disk-full", "disk-slow")
NETWORK_KINDS = ("link-down", "partition", "asym-partition", "split", "loss", "duplicate", "delay-reorder")
FILL_STEPS = (256 << 20, 16 << 20, 1 << 20, 64 << 10, 4 << 10)
MAX_FILL_STEPS = 256  # 256 steps of 256 MiB = 64 GiB: more than any image run.disk_mib makes


@dataclass(frozen=True)
class Fault:
    kind: str
    target: int
    duration_s: float
    param: int = 0

    def describe(self) -> str:
        extra = f" ({self.param})" if self.param else ""
        return f"{self.kind} n{self.target} for {self.duration_s:.1f} s{extra}"


def schedule(seed: int, kills: int, kinds: Sequence[str], nodes: int, rounds: int = 1,
             full_disk_node: int = -1, slow_disk_node: int = -1) -> list[Fault]:
    """`kills` kill -9 faults and `rounds` of each other kind, shuffled; targets, durations and
    parameters drawn from the seed."""
    rng = random.Random(seed)
    out: list[Fault] = []
    for _ in range(kills):
        # down time: 0 (restart at once) to 3 s
        out.append(Fault("kill", rng.randrange(nodes), round(rng.uniform(0.0, 3.0), 2)))
    for _ in range(rounds):
        for kind in kinds:
            if kind == "kill":
                continue
            target = rng.randrange(nodes)
            duration = round(rng.uniform(4.0, 8.0), 1)
            param = 0
            if kind == "loss":
                param = rng.choice((10, 20, 30))
            elif kind == "duplicate":
                param = rng.choice((10, 25, 50))
            elif kind == "delay-reorder":
                param = rng.choice((128, 256, 512))  # kbit/s of the slow class
            elif kind == "clock-skew":
                param = rng.choice((-1, 1)) * rng.choice((5, 30, 120))
            elif kind == "split":
                param = rng.randrange(1, 2 ** nodes - 1)  # bit i set: node i on side A
            elif kind == "disk-full":
                target = full_disk_node
            elif kind == "disk-slow":
                target = slow_disk_node
                param = rng.choice((5, 10, 20))  # write IOPS
            out.append(Fault(kind, target, duration, param))
    rng.shuffle(out)
    return out


def inject(f: Fault, bed: Bed, nodes: Sequence[Node], restart: Callable[[Node, int], None]) -> Callable[[], None]:
    """Start fault `f` (not a kill: the runner does those) and return its healer. `restart`
    kills a node and starts it again with a clock skew in seconds."""
    hosts = bed.hosts
    h = hosts[f.target] if 0 <= f.target < len(hosts) else hosts[0]
    node = nodes[f.target] if 0 <= f.target < len(nodes) else nodes[0]
    if f.kind == "link-down":
        bed.link(h, False)
    elif f.kind == "partition":
        for other in hosts:
            if other is not h:
                bed.block(h, other)
                bed.block(other, h)
    elif f.kind == "asym-partition":
        for other in hosts:  # h hears everyone, nobody hears h
            if other is not h:
                bed.block(h, other)
    elif f.kind == "split":
        side = [bool(f.param >> i & 1) for i in range(len(hosts))]
        for a in hosts:
            for b in hosts:
                if side[a.index] != side[b.index]:
                    bed.block(a, b)
    elif f.kind == "loss":
        for x in hosts:
            bed.loss(x, f.param)
    elif f.kind == "duplicate":
        for x in hosts:
            bed.duplicate(x, f.param)
    elif f.kind == "delay-reorder":
        for x in hosts:
            bed.shape(x, f.param, 30)
    elif f.kind == "clock-skew":
        restart(node, f.param)
        return lambda: restart(node, 0)
    elif f.kind == "disk-full":
        filler = fill(node.home)

        def unfill() -> None:
            # No restart: once space returns the node rebuilds its memory from the store on
            # its own (Engine.recover) and the recovery wait checks that it catches up.
            filler.unlink(missing_ok=True)

        return unfill
    elif f.kind == "disk-slow":
        dev = node.loop_device
        bed.slow(dev, f.param)
        return lambda: bed.slow(dev, 0)
    else:
        raise ValueError(f"unknown fault kind {f.kind!r}")
    return bed.heal_all


def fill(home: Path) -> Path:
    """Fill the file system holding `home` until it refuses (ENOSPC) with one filler file,
    bounded in steps. fallocate reserves the blocks without writing them, so filling a large
    sparse image costs neither time nor room on the real disk; unlinking the filler gives all
    of it back. Big steps, then ever smaller ones down to one block."""
    filler = home / "chaos-filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    offset = 0
    try:
        for step in FILL_STEPS:
            for _ in range(MAX_FILL_STEPS):
                try:
                    os.posix_fallocate(fd, offset, step)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
                offset += step
    finally:
        os.close(fd)
    return filler
