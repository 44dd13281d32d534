"""The Raft peer for the cluster benchmarks: pysyncobj replicas as subprocesses on
loopback, a 200-byte replicated write driven from one follower, commit times measured there.

Each replica is `python bench/raft.py replica ...`; it reads commands on stdin and answers
one JSON line on stdout: `status`, or `load COUNT RATE WINDOW SYNC` (SYNC 1 = one blocking
`sync=True` write at a time; 0 = callback writes, at most WINDOW in flight). A write whose
callback reports an error is counted as failed and retried (bounded) until it commits.
Modes: "pipelined" sets appendEntriesUseBatch=False (each entry sent at once), "batched"
keeps pysyncobj's default (entries grouped into append_entries batches).
pysyncobj keeps its log in memory here (no journal file): it does not fsync, valuemesh does.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

WRITE_BYTES = 200
READY_TIMEOUT_S = 30.0
LOAD_TIMEOUT_S = 120.0
MAX_RETRIES = 50
RETRY_PAUSE_S = 0.01
STOP_TIMEOUT_S = 5.0


def replica_main(argv: list[str]) -> None:
    from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated

    self_addr, mode, partners = argv[0], argv[1], argv[2].split(",")

    class Log(SyncObj):  # type: ignore[misc]
        def __init__(self) -> None:
            conf = SyncObjConf(appendEntriesUseBatch=(mode == "batched"), dynamicMembershipChange=False,
                               commandsWaitLeader=True)
            super().__init__(self_addr, partners, conf)
            self.count = 0
            self.bytes = 0

        @replicated  # type: ignore[misc]
        def append(self, data: bytes) -> int:
            self.count += 1
            self.bytes += len(data)
            return self.count

    obj = Log()
    out_lock = threading.Lock()

    def reply(doc: dict[str, Any]) -> None:
        with out_lock:
            sys.stdout.write(json.dumps(doc) + "\n")
            sys.stdout.flush()

    def status() -> dict[str, Any]:
        st = obj.getStatus()
        leader = st.get("leader")
        return {"self": self_addr, "leader": getattr(leader, "address", None), "ready": obj.isReady(),
                "count": obj.count}

    def load(count: int, rate: float, window: int, sync: bool) -> dict[str, Any]:
        payloads = [os.urandom(WRITE_BYTES) for _ in range(64)]
        submit_t: dict[int, float] = {}
        commit_t: dict[int, float] = {}
        attempts: dict[int, int] = {}
        again: list[int] = []  # failed writes, re-sent by the load loop (never from pysyncobj's thread)
        counts = {"failed": 0, "retried": 0, "given_up": 0}
        cond = threading.Condition()
        in_flight = [0]

        def send(i: int) -> None:
            def cb(result: Any, error: Any, i: int = i) -> None:
                with cond:
                    in_flight[0] -= 1
                    if error == FAIL_REASON.SUCCESS:
                        commit_t[i] = time.monotonic()
                    else:
                        counts["failed"] += 1
                        again.append(i)
                    cond.notify_all()

            with cond:
                in_flight[0] += 1
            submit_t.setdefault(i, time.monotonic())
            obj.append(payloads[i % len(payloads)], callback=cb)

        def resend_failed() -> None:
            with cond:
                todo, again[:] = list(again), []
            for i in todo:
                attempts[i] = attempts.get(i, 0) + 1
                if attempts[i] > MAX_RETRIES:
                    counts["given_up"] += 1
                    continue
                counts["retried"] += 1
                send(i)

        t0 = time.monotonic()
        deadline = t0 + LOAD_TIMEOUT_S
        for i in range(count):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if sync:
                for _ in range(MAX_RETRIES):
                    submit_t.setdefault(i, time.monotonic())
                    try:
                        obj.append(payloads[i % len(payloads)], sync=True, timeout=10)
                        commit_t[i] = time.monotonic()
                        break
                    except Exception:  # pysyncobj raises SyncObjException on leader loss or timeout
                        counts["failed"] += 1
                        counts["retried"] += 1
                        time.sleep(RETRY_PAUSE_S)
                continue
            resend_failed()
            with cond:
                while in_flight[0] >= window and time.monotonic() < deadline:
                    cond.wait(0.05)
            send(i)
        while time.monotonic() < deadline:
            resend_failed()
            with cond:
                if len(commit_t) + counts["given_up"] >= count:
                    break
                cond.wait(0.05)
        lat = [(commit_t[i] - submit_t[i]) * 1000 for i in commit_t]
        times = sorted(commit_t.values())
        gaps = [b - a for a, b in itertools.pairwise(times)]
        return {"count": count, "committed": len(commit_t), **counts,
                "latencies_ms": lat, "t_first_submit": t0, "t_last_commit": times[-1] if times else None,
                "longest_gap_ms": max(gaps) * 1000 if gaps else None}

    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "status":
            reply(status())
        elif parts[0] == "load":
            reply(load(int(parts[1]), float(parts[2]), int(parts[3]), parts[4] == "1"))
        elif parts[0] == "quit":
            break
    obj.destroy()


@dataclass
class Replica:
    addr: str
    proc: subprocess.Popen[str]

    def ask(self, command: str, timeout: float = LOAD_TIMEOUT_S + 30) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        box: list[str] = []
        t = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        t.start()
        t.join(timeout)
        if not box or not box[0]:
            raise RuntimeError(f"replica {self.addr} did not answer '{command.split()[0]}'")
        doc: dict[str, Any] = json.loads(box[0])
        return doc

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT_S)

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(STOP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired):
            self.kill9()


@dataclass
class RaftCluster:
    n: int
    mode: str
    replicas: list[Replica] = field(default_factory=list)

    def start(self) -> None:
        from valuemesh.node.testing import free_port
        addrs = [f"127.0.0.1:{free_port()}" for _ in range(self.n)]
        for a in addrs:
            others = ",".join(x for x in addrs if x != a)
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "replica", a, self.mode, others],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    text=True, start_new_session=True)
            self.replicas.append(Replica(a, proc))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            st = [r.ask("status", 10) for r in self.replicas]
            if all(s["ready"] and s["leader"] for s in st) and len({s["leader"] for s in st}) == 1:
                return
            time.sleep(0.2)
        raise RuntimeError("pysyncobj elected no leader in time")

    def leader(self) -> Replica:
        for r in self.replicas:
            if r.alive:
                lead = r.ask("status", 10)["leader"]
                for x in self.replicas:
                    if x.addr == lead:
                        return x
        raise RuntimeError("no pysyncobj leader")

    def follower(self) -> Replica:
        lead = self.leader()
        return next(r for r in self.replicas if r is not lead and r.alive)

    def stop(self) -> None:
        for r in self.replicas:
            r.stop()


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))], 1)


def measure(mode: str, *, replicas: int, light_writes: int, writes: int, window: int, avail_rate: float,
            avail_s: float, kill_after_s: float) -> dict[str, Any]:
    """One pysyncobj cluster in `mode`: light-load commit latency (blocking writes one at a
    time), throughput of `writes` callback writes with `window` in flight, then a steady load
    during which the leader is killed with -9. Writes come from a follower."""
    c = RaftCluster(replicas, mode)
    c.start()
    try:
        w = c.follower()
        light = w.ask(f"load {light_writes} 20 1 1")
        thr = w.ask(f"load {writes} 1000000 {window} 0")
        span = (thr["t_last_commit"] or thr["t_first_submit"]) - thr["t_first_submit"]
        lead, w = c.leader(), c.follower()
        timer = threading.Timer(kill_after_s, lead.kill9)
        timer.start()
        try:
            av = w.ask(f"load {int(avail_rate * avail_s)} {avail_rate} {window} 0")
        finally:
            timer.cancel()
        lat = thr["latencies_ms"]
        return {
            "mode": mode, "replicas": replicas, "write_bytes": WRITE_BYTES,
            "light": {"writes": light_writes, "p50_ms": _pct(light["latencies_ms"], 0.5),
                      "p99_ms": _pct(light["latencies_ms"], 0.99)},
            "throughput": {"writes": writes, "window": window, "committed": thr["committed"],
                           "per_s": round(thr["committed"] / span) if span > 0 else None,
                           "p50_ms": _pct(lat, 0.5), "p99_ms": _pct(lat, 0.99)},
            "leader_kill": {"offered_per_s": avail_rate, "writes": av["count"], "committed": av["committed"],
                            "longest_gap_ms": round(av["longest_gap_ms"] or 0), "failed_writes": av["failed"],
                            "retried_writes": av["retried"], "given_up": av["given_up"]},
        }
    finally:
        c.stop()


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "replica":
        replica_main(sys.argv[2:])
    else:
        sys.exit("usage: raft.py replica SELF MODE PARTNERS (started by bench/run.py)")
