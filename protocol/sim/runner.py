"""The seeded fault-injecting driver of the simulator: one run is a pure function of
(nodes, seed, faults, rounds), and any violation comes back with its replay command.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterable
from dataclasses import dataclass, replace

from ..consensus import Committed, Committee
from .world import SIM_PARAMS, Envelope, SimNode, World

FAULT_KINDS = (
    "crash", "restart", "partition", "delay", "drop", "reorder", "duplicate", "equivocate",
    "reconfigure", "rotate",
)
# With the `rotate` fault, epochs also end every this many rounds (Params.epoch_rounds).
ROTATE_ROUNDS = 12
# Records are proposed in waves this far apart (virtual ms); `rounds` is the wave count.
WAVE_MS = 100
# After the last fault heals, every honest record must be final within this (virtual ms).
LIVENESS_BOUND_MS = 30_000
# Hard stop for one run, whatever happens.
MAX_EVENTS = 400_000
BASE_DELAY_MS = (5, 40)
DROP_P = 0.1
DUPLICATE_P = 0.08
SLOW_P = 0.1
SLOW_MEAN_MS = 400
SLOW_CAP_MS = 3_000
REORDER_JITTER_MS = 150
PROPOSE_P = 0.6


@dataclass(frozen=True, slots=True)
class RunResult:
    """The outcome of one simulated run; `summary()` is its one-line report."""

    nodes: int
    seed: int
    faults: tuple[str, ...]
    rounds: int
    commits: int
    records: int
    rounds_reached: int
    latency_rounds: tuple[int, int]
    latency_ms: tuple[int, int]
    injected: tuple[tuple[str, int], ...]
    violations: tuple[str, ...]
    proofs: int
    excluded: int
    epoch: int
    virtual_ms: int
    events: int

    @property
    def ok(self) -> bool:
        return not self.violations

    def replay(self) -> str:
        faults = f" --faults {','.join(self.faults)}" if self.faults else ""
        return (
            f"python -m valuemesh.protocol.sim --nodes {self.nodes} --seeds 1 "
            f"--seed-start {self.seed}{faults} --rounds {self.rounds}"
        )

    def summary(self) -> str:
        inj = ",".join(f"{k}={v}" for k, v in self.injected) or "none"
        return (
            f"seed={self.seed} n={self.nodes} commits={self.commits} records={self.records} "
            f"rounds={self.rounds_reached} finality_rounds(p50/p99)={self.latency_rounds[0]}/"
            f"{self.latency_rounds[1]} finality_ms(p50/p99)={self.latency_ms[0]}/"
            f"{self.latency_ms[1]} faults[{inj}] proofs={self.proofs} excluded={self.excluded} "
            f"epoch={self.epoch} "
            f"violations={len(self.violations)}"
        )


def _pct(values: list[int], p: float) -> int:
    if not values:
        return 0
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))]


class _Driver:
    """Timed events over a World: message delivery, ticks, proposals and faults."""

    def __init__(self, world: World, rng: random.Random, faults: frozenset[str]) -> None:
        self.w = world
        self.rng = rng
        self.faults = faults
        self.heap: list[tuple[int, int, str, object]] = []
        self.seq = 0
        self.ticks: set[tuple[int, int]] = set()
        self.lossy_until = 0
        self.injected: dict[str, int] = {}
        self.events = 0

    def at(self, t: int, kind: str, arg: object = None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, arg))

    def count(self, kind: str) -> None:
        self.injected[kind] = self.injected.get(kind, 0) + 1

    def flush(self) -> None:
        w, rng = self.w, self.rng
        for env in w.outbox:
            if not w.connected(env.src, env.dst):
                continue
            lossy = w.now < self.lossy_until
            if lossy and "drop" in self.faults and rng.random() < DROP_P:
                self.count("drop")
                continue
            copies = 1
            if lossy and "duplicate" in self.faults and rng.random() < DUPLICATE_P:
                copies = 2
                self.count("duplicate")
            for _ in range(copies):
                d = rng.randint(*BASE_DELAY_MS)
                if "delay" in self.faults and rng.random() < SLOW_P:
                    d += min(int(rng.expovariate(1 / SLOW_MEAN_MS)), SLOW_CAP_MS)
                    self.count("delay")
                if "reorder" in self.faults:
                    d += rng.randint(0, REORDER_JITTER_MS)
                self.at(w.now + d, "msg", env)
        w.outbox.clear()
        for t, i in w.tick_requests:
            t = max(t, w.now)
            if (t, i) not in self.ticks:
                self.ticks.add((t, i))
                self.at(t, "tick", i)
        w.tick_requests.clear()

    def loop(self, deadline: int) -> None:
        w = self.w
        while self.heap and self.events < MAX_EVENTS:
            t, _, kind, arg = heapq.heappop(self.heap)
            if t > deadline:
                break
            self.events += 1
            w.now = t
            if kind == "msg":
                assert isinstance(arg, Envelope)
                w.deliver(arg)
            elif kind == "tick":
                assert isinstance(arg, int)
                self.ticks.discard((t, arg))
                w.tick(arg)
            elif kind == "propose":
                assert isinstance(arg, int)
                w.propose(arg, body=self.seq)
            elif kind == "crash":
                assert isinstance(arg, tuple)
                w.crash(arg[0], for_good=arg[1])
            elif kind == "restart":
                assert isinstance(arg, int)
                w.restart(arg)
            elif kind == "partition":
                assert isinstance(arg, list)
                w.partition = arg
            elif kind == "heal":
                w.heal()
            elif kind == "reconfigure":
                assert isinstance(arg, int)
                w.propose(arg, type="membership", data={"scale": 2})
            self.flush()


def scale_weights(node: SimNode, c: Committed) -> Committee | None:
    """The node layer's reaction to a committed membership record: the next epoch starts
    right after its anchor, with every weight scaled (quorums stay the same in heads, so
    the fault budget of the run still holds)."""
    for rec in c.records:
        if rec.type == "membership":
            cur = node.consensus.committee_at(1 << 60)
            scale = int(rec.body.get("scale", 1))
            return Committee(
                cur.epoch + 1, tuple((m, w * scale) for m, w in cur.members),
                c.anchor_round + 1,
            )
    return None


def run(
    nodes: int,
    seed: int,
    faults: Iterable[str] = (),
    rounds: int = 20,
    *,
    crypto: bool = True,
    observers: int = 1,
) -> RunResult:
    """Simulate one constellation of `nodes` core members for `rounds` proposal waves."""
    fault_set = frozenset(faults)
    unknown = fault_set - set(FAULT_KINDS)
    if unknown:
        raise ValueError(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    if nodes < 1 or rounds < 1:
        raise ValueError("a run needs at least one node and one round")
    rng = random.Random(seed)
    load_end = rounds * WAVE_MS
    f = (nodes - 1) // 3
    quorum = (nodes + f + 2) // 2
    byz: list[int] = []
    if "equivocate" in fault_set and f >= 1:
        byz = rng.sample(range(nodes), rng.randint(1, f))
    honest = [i for i in range(nodes) if i not in byz]
    world = World(
        nodes, byzantine=byz, observers=observers, crypto=crypto,
        params=replace(SIM_PARAMS, epoch_rounds=ROTATE_ROUNDS) if "rotate" in fault_set else SIM_PARAMS,
        seed_bytes=rng.randbytes(16),
        reconfigure=scale_weights if "reconfigure" in fault_set else None,
    )
    drv = _Driver(world, rng, fault_set)
    drv.lossy_until = load_end
    for i in byz:
        peers = world.peers(i)
        world.twin_split[i] = set(rng.sample(peers, len(peers) // 2))
        drv.count("equivocate")
    for k in range(rounds):
        for i in range(nodes):
            if rng.random() < PROPOSE_P:
                drv.at(k * WAVE_MS + rng.randint(0, WAVE_MS - 1), "propose", i)
    spare = nodes - quorum - len(byz)  # core nodes that may stay down while liveness holds
    if "crash" in fault_set or "restart" in fault_set:
        restart = "restart" in fault_set
        budget = max(spare, 1) if restart else spare
        victims = rng.sample(honest, min(budget, len(honest), rng.randint(1, 2))) if budget else []
        for i in victims:
            t = rng.randint(0, load_end * 2 // 3)
            drv.at(t, "crash", (i, not restart))
            drv.count("crash")
            if restart:
                drv.at(rng.randint(t + 50, load_end), "restart", i)
                drv.count("restart")
    if "reconfigure" in fault_set:
        drv.at(rng.randint(0, load_end // 2), "reconfigure", rng.choice(honest))
        drv.count("reconfigure")
    if "partition" in fault_set and nodes >= 2:
        everyone = list(range(nodes + observers))
        rng.shuffle(everyone)
        cut = rng.randint(1, len(everyone) - 1)
        t1 = rng.randint(0, load_end * 2 // 3)
        drv.at(t1, "partition", [set(everyone[:cut]), set(everyone[cut:])])
        drv.at(rng.randint(t1 + 50, load_end), "heal")
        drv.count("partition")
    drv.loop(load_end + LIVENESS_BOUND_MS)
    violations = world.check_safety()
    violations += world.check_liveness()
    longest = max(world.honest_nodes(), key=lambda n: len(n.log))
    return RunResult(
        nodes=nodes,
        seed=seed,
        faults=tuple(k for k in FAULT_KINDS if k in fault_set),
        rounds=rounds,
        commits=len(longest.log),
        records=len(longest.log_records),
        rounds_reached=max(n.consensus.round for n in world.nodes),
        latency_rounds=(_pct(world.latency_rounds, 0.5), _pct(world.latency_rounds, 0.99)),
        latency_ms=(_pct(world.latency_ms, 0.5), _pct(world.latency_ms, 0.99)),
        injected=tuple(sorted(drv.injected.items())),
        violations=tuple(dict.fromkeys(violations)),
        proofs=world.proofs,
        excluded=len(longest.consensus.excluded),
        epoch=max((longest.store[i].epoch for i in longest.log if i in longest.store), default=0),
        virtual_ms=world.now,
        events=drv.events,
    )
