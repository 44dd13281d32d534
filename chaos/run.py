"""Run the fault suite: build the bed, form a constellation by invites, write under load while
the seeded schedule injects faults, heal, let every node catch up, then check the history.

    python -m chaos.run --seed 1 --kills 20            # the CI size (make chaos)
    python -m chaos.run --seed 7 --kills 1000          # the long run
Exit 0 when every invariant held (or the bed is unavailable: it prints SKIPPED), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from chaos import checker
from chaos.bed import Bed, BedError, enter_netns, remove_stale, unavailable_reason
from chaos.daemons import Node, read_db
from chaos.faults import KINDS, Fault, inject, schedule
from chaos.load import Load

T = TypeVar("T")
FORM_TIMEOUT_S = 90.0
RECOVER_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 180.0
POLL_S = 0.5
FULL_DISK_KIB = 1024 * 1024  # room for a long run's database (a 12-minute run grew one to 91 MB)
SLOW_DISK_MIB = 256


def in_netns(node: Node, fn: Callable[[], T], timeout: float = 30.0) -> T:
    """Run `fn` on a thread inside the node's namespace (the main thread never moves)."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            enter_netns(node.host.netns)
            box["v"] = fn()
        except BaseException as exc:  # handed to the caller
            box["e"] = exc

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    if "e" in box:
        raise box["e"]
    if "v" not in box:
        raise TimeoutError(f"{node.name}: no answer in {timeout:.0f} s")
    return box["v"]  # type: ignore[no-any-return]


def wait_for(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / POLL_S) + 2):
        try:
            if pred():
                return True
        except Exception:  # a node mid-restart: ask again
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
    return False


def ensure_tools() -> None:
    """Install nftables and libfaketime when root and missing (the registry mirror is local)."""
    if os.geteuid() != 0 or (shutil.which("nft") and shutil.which("faketime")):
        return
    subprocess.run(["apt-get", "install", "-y", "-q", "nftables", "faketime"], capture_output=True, timeout=300)


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="vmchaos-run-"))
        self.bed = Bed(args.nodes, self.work)
        self.nodes: list[Node] = []
        self.cid = ""
        self.t0 = time.monotonic()
        self.snapshots: list[checker.Snapshot] = []
        self.findings: list[str] = []
        self.events: list[str] = []
        self.kills = 0
        self.faults_done: dict[str, int] = {}
        self.rng = random.Random(args.seed ^ 0x5EED)
        self.integrity: dict[str, str] = {}
        self.dropped: set[str] = set()

    def log(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.1f} s] {text}"
        self.events.append(line)
        print(line, flush=True)

    # -- forming the group --------------------------------------------------------------------

    def build(self) -> None:
        self.bed.create()
        n = self.args.nodes
        self.full_disk, self.slow_disk = n - 1, n - 2
        for h in self.bed.hosts:
            home = self.bed.dir / f"home{h.index}"
            node = Node(h, home)
            if h.index == self.full_disk:
                self.bed.tmpfs(home, FULL_DISK_KIB)
            elif h.index == self.slow_disk:
                node.loop_device = self.bed.loop_mount(home, SLOW_DISK_MIB)
            node.init()
            self.nodes.append(node)

    def form(self) -> None:
        founder = self.nodes[0]
        founder.start()
        self.cid = str(founder.cli("constellation", "create", "chaos")["id"])
        self.log(f"founder {founder.name} created {self.cid}")
        for node in self.nodes[1:]:
            token = founder.cli("constellation", "invite", self.cid, "--tier", "core", "--role", "producer")
            node.start()  # knows no one: the token carries the inviter's address
            node.cli("constellation", "join", str(token["token"]))
            if not wait_for(partial(self.has_members, node, node.host.index + 1), FORM_TIMEOUT_S):
                raise RuntimeError(f"{node.name} did not become an active member in {FORM_TIMEOUT_S:.0f} s")
            self.log(f"{node.name} joined")
        for node in self.nodes:
            if not wait_for(partial(self.has_members, node, len(self.nodes)), FORM_TIMEOUT_S):
                raise RuntimeError(f"{node.name} does not see all {len(self.nodes)} members")
        self.log(f"{len(self.nodes)} core members formed by invites")

    def has_members(self, node: Node, n: int) -> bool:
        return self.members_active(node) >= n

    def members_active(self, node: Node) -> int:
        doc = in_netns(node, lambda: node.call("GET", f"/v1/constellations/{self.cid}"))
        if doc.get("status") != "active":
            return 0
        return sum(1 for m in doc.get("member_list", []) if m.get("status") == "active" and m.get("tier") == "core")

    # -- faults -------------------------------------------------------------------------------

    def final_count(self, node: Node) -> int:
        return len(read_db(node.db)[1])

    def snapshot(self, node: Node, label: str) -> checker.Snapshot:
        integrity, order = read_db(node.db)
        snap = checker.Snapshot(node.name, time.monotonic() - self.t0, label, tuple(order), integrity)
        self.snapshots.append(snap)
        if integrity != "ok":
            self.findings.append(f"{node.name} after {label}: integrity_check said {integrity!r}")
        return snap

    def restart(self, node: Node, skew_s: int) -> None:
        node.kill()
        node.start(skew_s=skew_s)

    def revive(self, why: str) -> None:
        for node in self.nodes:
            if not node.alive:
                self.log(f"{node.name} was not running after {why}; restarting it")
                self.findings.append(f"{node.name} exited during {why} (restarted)")
                node.start()

    def following(self) -> list[Node]:
        """The nodes still following the constellation; one that dropped it after a restart is
        recorded once and left out of recovery waits and of later faults."""
        for node in self.nodes:
            if node.name not in self.dropped and node.dropped_constellation():
                self.dropped.add(node.name)
                self.findings.append(f"{node.name} restarted and refused to follow the constellation: 'The stored "
                                     f"blocks do not reproduce the stored commit order.' (seed {self.args.seed}, "
                                     f"after {self.kills} kills)")
                self.log(f"  FINDING: {node.name} dropped the constellation at restart")
        return [nd for nd in self.nodes if nd.name not in self.dropped]

    def recover(self, label: str) -> None:
        """Every following node reaches the longest final order seen at heal time (bounded)."""
        time.sleep(POLL_S)  # a restarted node decides within its first ticks whether it follows
        nodes = self.following()
        target = max(self.final_count(nd) for nd in nodes)
        start = time.monotonic()
        if wait_for(lambda: min(self.final_count(nd) for nd in self.following()) >= target, RECOVER_TIMEOUT_S):
            self.log(f"  recovered after {label} in {time.monotonic() - start:.1f} s (final ≥ {target})")
            return
        counts = {nd.name: self.final_count(nd) for nd in self.nodes}
        self.findings.append(f"stall: after {label}, not every node reached {target} final records in "
                             f"{RECOVER_TIMEOUT_S:.0f} s ({counts}; seed {self.args.seed})")
        self.log(f"  STALL after {label}: {counts}")

    def run_fault(self, f: Fault) -> None:
        time.sleep(self.rng.uniform(0.2, 1.5))  # a random point under load
        live = self.following()
        if f.target < len(self.nodes) and self.nodes[f.target] not in live:
            f = Fault(f.kind, live[f.target % len(live)].host.index, f.duration_s, f.param)
            if f.kind in ("disk-full", "disk-slow"):
                self.log(f"skip {f.kind}: its node dropped the constellation")
                return
        if f.kind == "kill":
            node = self.nodes[f.target]
            node.kill()
            self.kills += 1
            snap = self.snapshot(node, f"kill {self.kills}")
            self.log(f"kill -9 #{self.kills} {node.name} (final {len(snap.order)}, integrity {snap.integrity}); "
                     f"down {f.duration_s:.1f} s")
            time.sleep(f.duration_s)
            node.start()
            self.recover(f"kill {self.kills}")
        else:
            self.log(f"fault {f.describe()}")
            heal = inject(f, self.bed, self.nodes, self.restart)
            time.sleep(f.duration_s)
            heal()
            self.revive(f.kind)
            for node in self.nodes:
                self.snapshot(node, f"after {f.kind}")
            self.recover(f.kind)
        self.faults_done[f.kind] = self.faults_done.get(f.kind, 0) + 1
        found = checker.check_orders({s.node: s.order for s in self.snapshots[-len(self.nodes):]})
        for a in found:
            self.findings.append(f"after {f.describe()}: {a}")

    # -- the end ------------------------------------------------------------------------------

    def settle(self, load: Load) -> dict[str, list[str]]:
        acked = set(load.acknowledged())
        self.bed.heal_all()
        for node in self.nodes:
            if node.loop_device:
                self.bed.slow(node.loop_device, 0)
            if node.skew_s or not node.alive:
                self.restart(node, 0)

        def done() -> bool:
            orders = [read_db(nd.db)[1] for nd in self.following()]
            return len({len(o) for o in orders}) == 1 and all(acked <= set(o) for o in orders)

        start = time.monotonic()
        ok = wait_for(done, SETTLE_TIMEOUT_S)
        self.log(f"settled: {'all caught up' if ok else 'NOT all caught up'} in {time.monotonic() - start:.1f} s")
        for node in self.nodes:
            node.stop()
        finals: dict[str, list[str]] = {}
        for node in self.nodes:
            self.integrity[node.name], finals[node.name] = read_db(node.db)
        return finals

    def run(self) -> int:
        args = self.args
        kinds = [k for k in args.faults.split(",") if k] if args.faults != "all" else list(KINDS)
        plan = schedule(args.seed, args.kills, kinds, args.nodes, args.rounds, args.nodes - 1, args.nodes - 2)
        self.log(f"seed {args.seed}: {len(plan)} faults planned ({args.kills} kills), bed {self.bed.base}")
        self.build()
        self.form()
        load = Load(self.nodes, self.cid, args.seed, self.t0)
        load.start()
        deadline = time.monotonic() + args.max_minutes * 60
        done = 0
        try:
            for f in plan:
                if time.monotonic() > deadline:
                    self.log(f"time budget spent: {done} of {len(plan)} faults run")
                    break
                self.run_fault(f)
                done += 1
            time.sleep(1.0)
        finally:
            load.stop()
        finals = self.settle(load)
        verdict = checker.check(load.ops, finals, self.snapshots, self.integrity)
        return self.report(verdict, load, finals, done, len(plan))

    def report(self, v: checker.Verdict, load: Load, finals: dict[str, list[str]], done: int, planned: int) -> int:
        elapsed = time.monotonic() - self.t0
        summary = {
            "seed": self.args.seed, "nodes": self.args.nodes, "kills": self.kills, "faults": self.faults_done,
            "faults_run": done, "faults_planned": planned, "duration_s": round(elapsed, 1),
            "writes": len(load.ops), "acknowledged": v.acknowledged, "refused": v.refused, "unknown": v.unknown,
            "final_records": v.final_len, "lagging": v.lagging, "snapshots": len(self.snapshots),
            "lost_acknowledged": sum(1 for a in v.anomalies if a.startswith("acknowledged write lost")),
            "anomalies": v.anomalies, "findings": self.findings, "events": self.events,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}",
        }
        (self.work / "report.json").write_text(json.dumps(summary, indent=2))
        with open(self.work / "history.jsonl", "w") as out:
            for op in load.ops:
                out.write(json.dumps(op.__dict__) + "\n")
        print(json.dumps(summary, indent=2))
        print(f"{'PASS' if v.ok else 'FAIL'}: {self.kills} kills, {sum(self.faults_done.values()) - self.kills} other "
              f"faults, {v.acknowledged} acknowledged writes, {summary['lost_acknowledged']} lost, "
              f"{len(v.anomalies)} anomalies, {len(self.findings)} findings, {elapsed:.0f} s; files in {self.work}")
        return 0 if v.ok else 1

    def close(self) -> None:
        for node in self.nodes:
            try:
                node.stop()
            except (OSError, subprocess.SubprocessError):
                pass
        self.bed.teardown()


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m chaos.run", description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=1, help="the schedule is replayed from it")
    p.add_argument("--kills", type=int, default=20, help="kill -9 faults under load")
    p.add_argument("--nodes", type=int, default=4, choices=range(4, 8), metavar="4..7")
    p.add_argument("--faults", default="all", help=f"comma-separated kinds, or all: {','.join(KINDS)}")
    p.add_argument("--rounds", type=int, default=1, help="how many of each non-kill fault")
    p.add_argument("--max-minutes", type=float, default=60.0, help="stop injecting after this long")
    p.add_argument("--workdir", default="", help="where homes, logs and the report go")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    ensure_tools()
    reason = unavailable_reason()
    if reason is not None:
        print(f"SKIPPED: {reason}.")
        return 0
    removed = remove_stale()
    if removed:
        print(f"removed {len(removed)} leftovers of earlier chaos runs")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(2))  # run the finally below
    runner = Runner(args)
    try:
        return runner.run()
    except (BedError, RuntimeError) as exc:
        print(f"FAIL: {exc}")
        return 1
    finally:
        runner.close()
        left = runner.bed.leftovers()
        if left:
            print(f"warning: left behind {left}")


if __name__ == "__main__":
    sys.exit(main())
