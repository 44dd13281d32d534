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
from chaos.daemons import DaemonError, Node, Unreadable, db_bytes, final_count, read_db
from chaos.faults import KINDS, Fault, inject, schedule
from chaos.load import Load

T = TypeVar("T")
FORM_TIMEOUT_S = 90.0
RECOVER_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 180.0
# A restart replays the whole store before the ready line: 2 s early in a long run, and over
# 30 s (the first start's bound) at kill 160 of seed 23 with 20 000 final records on a loaded
# machine; a restart that takes longer than this is a finding, never a crash of the runner.
RESTART_TIMEOUT_S = 180.0
POLL_S = 0.5
# The two disk-fault homes are ext4 on sparse loop images sized for the whole run (disk_mib):
# "full" is a fault the filler makes and takes back, never the steady state. Measured: with
# seed 23 a node's database (and its WAL) filled a 256 MiB image in 1 271 s of load (16 102
# final records: 0.20 MiB/s, 16 KiB per final record, 2.3 MiB per kill at 11.4 s a kill); the
# time budget bounds the run, so the image holds that rate over the budget and the settle
# wait, twice over. Oversizing costs nothing (sparse; the filler only reserves blocks).
DISK_BASE_MIB = 512
DISK_GROWTH_MIB_PER_S = 0.2
DISK_MARGIN = 2
LOW_DISK = 0.25  # less free than this outside a disk-full fault: the sizing was wrong (a finding)


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


def disk_mib(max_minutes: float) -> int:
    """The size of a disk-fault home's image for a run bounded by `max_minutes`."""
    seconds = max_minutes * 60 + SETTLE_TIMEOUT_S
    return DISK_BASE_MIB + int(DISK_MARGIN * DISK_GROWTH_MIB_PER_S * seconds)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank) of `values`; 0 when empty."""
    if not values:
        return 0.0
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, max(0, int(q / 100 * len(ranked) + 0.5) - 1))]


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
        self.recoveries: list[float] = []  # seconds from a killed node's restart to all caught up
        self.startups: list[tuple[int, int, float]] = []  # (kills so far, its final count, seconds to ready)
        self.checks = {"ok": 0, "failed": 0, "unreadable": 0}  # integrity_check answers
        self.growth: list[dict[str, Any]] = []  # database bytes and final counts after each kill
        self.unreadable: set[str] = set()  # "node: error" already reported
        self.filling = False  # the full-disk fault is on

    def log(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.1f} s] {text}"
        self.events.append(line)
        print(line, flush=True)

    # -- forming the group --------------------------------------------------------------------

    def build(self) -> None:
        self.bed.create()
        n = self.args.nodes
        self.full_disk, self.slow_disk = n - 1, n - 2
        size = disk_mib(self.args.max_minutes)
        for h in self.bed.hosts:
            home = self.bed.dir / f"home{h.index}"
            node = Node(h, home)
            if h.index in (self.full_disk, self.slow_disk):
                node.loop_device = self.bed.loop_mount(home, size)
            node.init()
            self.nodes.append(node)
        self.log(f"disk-fault homes (n{self.slow_disk}, n{self.full_disk}): ext4 on sparse {size} MiB images")

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

    def unreadable_finding(self, node: Node, label: str, exc: Unreadable) -> None:
        """A database the runner cannot read is a finding (node, moment, SQLite's words), once
        per node and error, and the run goes on."""
        key = f"{node.name}: {exc}"
        if key not in self.unreadable:
            self.unreadable.add(key)
            self.findings.append(f"{node.name} database unreadable ({label}): {exc}")
            self.log(f"  FINDING: {node.name} database unreadable ({label}): {exc}")

    def final_count(self, node: Node, label: str = "recovery wait") -> int:
        """Its final count, or -1 when its database cannot be read (reported once)."""
        try:
            return final_count(node.db)
        except Unreadable as exc:
            self.unreadable_finding(node, label, exc)
            return -1

    def snapshot(self, node: Node, label: str) -> checker.Snapshot | None:
        try:
            integrity, order = read_db(node.db)
        except Unreadable as exc:
            self.checks["unreadable"] += 1
            self.unreadable_finding(node, label, exc)
            return None
        snap = checker.Snapshot(node.name, time.monotonic() - self.t0, label, tuple(order), integrity)
        self.snapshots.append(snap)
        self.checks["ok" if integrity == "ok" else "failed"] += 1
        if integrity != "ok":
            self.findings.append(f"{node.name} after {label}: integrity_check said {integrity!r}")
        return snap

    def measure(self) -> None:
        """Each database's size and final count after a kill (the disk sizing's evidence), and
        a finding when a disk-fault home runs short of room outside the full-disk fault."""
        sample: dict[str, Any] = {"kill": self.kills, "t": round(time.monotonic() - self.t0, 1)}
        for node in self.nodes:
            sample[node.name] = [db_bytes(node.db), self.final_count(node, f"kill {self.kills}")]
            if node.loop_device and not self.filling:
                st = os.statvfs(node.home)
                if st.f_bavail < LOW_DISK * st.f_blocks:
                    self.findings.append(f"{node.name}: its disk has {st.f_bavail * st.f_frsize >> 20} MiB free "
                                         f"after kill {self.kills}: the image is too small for this run")
        self.growth.append(sample)

    def start(self, node: Node, why: str, skew_s: int = 0) -> bool:
        """Start a node again (bounded by RESTART_TIMEOUT_S) and note how long its start-up
        replay took; one that does not start is a finding, and the run goes on without it."""
        count = self.final_count(node, why)
        try:
            node.start(skew_s=skew_s, timeout=RESTART_TIMEOUT_S)
        except DaemonError as exc:
            self.findings.append(f"{node.name} did not start again after {why} ({exc}; final count {count}, "
                                 f"seed {self.args.seed}); last errors: {node.last_errors()}")
            self.log(f"  FINDING: {node.name} did not start again after {why}: {exc}")
            return False
        self.startups.append((self.kills, count, node.started_in))
        return True

    def restart(self, node: Node, skew_s: int) -> None:
        node.kill()
        self.start(node, f"a restart with skew {skew_s} s", skew_s)

    def revive(self, why: str) -> None:
        for node in self.nodes:
            if not node.alive:
                self.log(f"{node.name} was not running after {why}; restarting it")
                self.findings.append(f"{node.name} exited during {why} (restarted)")
                self.start(node, why)

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

    def recover(self, label: str, start: float) -> None:
        """Every following node reaches the longest final order seen at heal time (bounded).
        The recovery time runs from `start`, the heal (a killed node: the restart command, so
        its start-up replay counts), until then, polled every POLL_S."""
        target = max(self.final_count(nd) for nd in self.nodes)
        time.sleep(POLL_S)  # a restarted node decides within its first ticks whether it follows
        if wait_for(lambda: min(self.final_count(nd) for nd in self.following()) >= target, RECOVER_TIMEOUT_S):
            took = time.monotonic() - start
            if label.startswith("kill"):  # other faults' times include integrity checks of every node
                self.recoveries.append(took)
            self.log(f"  recovered after {label} in {took:.1f} s (final ≥ {target})")
            return
        counts = {nd.name: self.final_count(nd) for nd in self.nodes}
        behind = [nd for nd in self.nodes if counts[nd.name] < target]
        errors = {nd.name: nd.last_errors() for nd in behind}
        self.findings.append(f"stall: after {label}, not every node reached {target} final records in "
                             f"{RECOVER_TIMEOUT_S:.0f} s ({counts}; seed {self.args.seed}); last errors logged "
                             f"by those behind: {errors}")
        self.log(f"  STALL after {label}: {counts}; last errors: {errors}")

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
            seen = f"final {len(snap.order)}, integrity {snap.integrity}" if snap else "database unreadable"
            self.log(f"kill -9 #{self.kills} {node.name} ({seen}); down {f.duration_s:.1f} s")
            time.sleep(f.duration_s)
            start = time.monotonic()
            if self.start(node, f"kill {self.kills}"):
                self.recover(f"kill {self.kills}", start)
            else:
                self.revive(f"kill {self.kills}")  # once more; if it still fails, the next fault's revive tries
                if node.alive:
                    self.recover(f"kill {self.kills}", start)
            self.measure()
        else:
            self.log(f"fault {f.describe()}")
            self.filling = f.kind == "disk-full"
            heal = inject(f, self.bed, self.nodes, self.restart)
            time.sleep(f.duration_s)
            start = time.monotonic()
            heal()
            self.filling = False
            self.revive(f.kind)
            for node in self.nodes:
                self.snapshot(node, f"after {f.kind}")
            self.recover(f.kind, start)
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
            orders = [read_db(nd.db, integrity=False)[1] for nd in self.following()]
            return len({len(o) for o in orders}) == 1 and all(acked <= set(o) for o in orders)

        start = time.monotonic()
        ok = wait_for(done, SETTLE_TIMEOUT_S)
        self.log(f"settled: {'all caught up' if ok else 'NOT all caught up'} in {time.monotonic() - start:.1f} s")
        for node in self.nodes:
            node.stop()
        finals: dict[str, list[str]] = {}
        for node in self.nodes:
            try:
                self.integrity[node.name], finals[node.name] = read_db(node.db)
            except Unreadable as exc:  # left out of the orders; the checker still sees the others
                self.checks["unreadable"] += 1
                self.unreadable_finding(node, "at the end", exc)
                continue
            self.checks["ok" if self.integrity[node.name] == "ok" else "failed"] += 1
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
                try:
                    self.run_fault(f)
                except (DaemonError, Unreadable, OSError, subprocess.SubprocessError) as exc:
                    # The runner's own trouble with one fault (a command that failed, a read):
                    # a finding, and the run goes on to its check, which is what it is for.
                    self.findings.append(f"the runner failed during {f.describe()}: {type(exc).__name__}: {exc}")
                    self.log(f"  FINDING: the runner failed during {f.describe()}: {type(exc).__name__}: {exc}")
                    self.revive(f.kind)
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
            "recovery_s": {"n": len(self.recoveries), "median": round(percentile(self.recoveries, 50), 1),
                           "p95": round(percentile(self.recoveries, 95), 1),
                           "max": round(max(self.recoveries, default=0.0), 1)},
            "startup_s": self.startup_summary(), "startups": self.startups,
            "integrity_checks": self.checks, "growth": self.growth_summary(), "growth_samples": self.growth,
            "anomalies": v.anomalies, "findings": self.findings, "events": self.events,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}",
        }
        (self.work / "report.json").write_text(json.dumps(summary, indent=2))
        with open(self.work / "history.jsonl", "w") as out:
            for op in load.ops:
                out.write(json.dumps(op.__dict__) + "\n")
        print(json.dumps(summary, indent=2))
        rec = summary["recovery_s"]
        print(f"recovery after a kill: median {rec['median']} s, p95 {rec['p95']} s, max {rec['max']} s over "
              f"{rec['n']}; start-up: {summary['startup_s']}; integrity_check: {self.checks}; "
              f"growth: {summary['growth']}")
        print(f"{'PASS' if v.ok else 'FAIL'}: {self.kills} kills, {sum(self.faults_done.values()) - self.kills} other "
              f"faults, {v.acknowledged} acknowledged writes, {summary['lost_acknowledged']} lost, "
              f"{len(v.anomalies)} anomalies, {len(self.findings)} findings, {elapsed:.0f} s; files in {self.work}")
        return 0 if v.ok else 1

    def startup_summary(self) -> dict[str, float]:
        """How long restarts took to their ready line (the store's replay): overall, and the
        first and last tenth of them (it grows with the history)."""
        times = [t for _, _, t in self.startups]
        if not times:
            return {}
        tenth = max(1, len(times) // 10)
        return {"n": len(times), "median": round(percentile(times, 50), 1), "p95": round(percentile(times, 95), 1),
                "max": round(max(times), 1), "first_tenth_median": round(percentile(times[:tenth], 50), 1),
                "last_tenth_median": round(percentile(times[-tenth:], 50), 1),
                "last_final_count": self.startups[-1][1]}

    def growth_summary(self) -> dict[str, float]:
        """The largest node database's growth between the first and the last kill: per kill,
        per second and per final record (what disk_mib is argued from)."""
        if len(self.growth) < 2:
            return {}
        first, last = self.growth[0], self.growth[-1]
        grew = max(last[nd.name][0] - first[nd.name][0] for nd in self.nodes) / 2**20
        records = max(last[nd.name][1] - first[nd.name][1] for nd in self.nodes)
        kills, seconds = last["kill"] - first["kill"], last["t"] - first["t"]
        return {"mib_per_kill": round(grew / kills, 2), "mib_per_s": round(grew / seconds, 3),
                "kib_per_final_record": round(grew * 1024 / max(records, 1), 1),
                "s_per_kill": round(seconds / kills, 1), "largest_db_mib": round(max(
                    last[nd.name][0] for nd in self.nodes) / 2**20, 1)}

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
