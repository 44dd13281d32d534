"""Issue #17's figures on the namespace internet (chaos/internet.py), printed beside their
targets: seven real daemons (pub1 the founder, pub2, eim1, sym1, upnp1, lan1, lan2), the group
formed by invites alone through the `valuemesh` command (chaos/members.py), then

- time from the last join to a full mesh (every member linked to every other, any path);
- commit gap after `kill -9` of the founder and of a relay, under load (each survivor
  submits a contribution every 0.25 s): the time from the kill to the next record final on
  every survivor, and the longest stall in that progress in the KILL_WINDOW_S after it;
- share of member pairs on a direct path (lan/direct/mapped/punched) per NAT pairing, beside
  libp2p DCUtR's 70 % ± 7 % of hole-punch attempts on the real internet;
- relay overhead: ping round trip over a direct link and over a relayed one, and the relay's
  CPU seconds per relayed MB (three bare transports, bench/reach_relay.py, sym1 → pub2 → eim1).

Medians over --repeats fresh beds. Needs root and network namespaces; says why and exits 0
where they are missing.

    .venv/bin/python bench/reach.py --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # chaos/ is a folder of scripts, not installed
sys.path.insert(0, str(ROOT / "bench"))

from machine import machine_info, proc_cpu_s  # noqa: E402

from chaos import internet  # noqa: E402
from chaos.internet import Internet  # noqa: E402
from chaos.members import MemberError, Members, api_error  # noqa: E402

HOSTS = ("pub1", "pub2", "eim1", "sym1", "upnp1", "lan1", "lan2")
FOUNDER = "pub1"
DIRECT = {"lan", "direct", "mapped", "punched"}
MESH_DEADLINE_S = 60.0
SETTLE_S = 150.0  # paths stop changing (punches, upgrades) within this, or are read as they are
STABLE_S = 20.0
LOAD_EVERY_S = 0.25
POLL_EVERY_S = 0.05
WARMUP_S = 2.0
KILL_WINDOW_S = 5.0
DCUTR = "libp2p DCUtR: 70 % ± 7 % of attempts on the real internet"


def kind(host: str) -> str:
    return "public" if host.startswith("pub") else {"eim": "EIM", "sym": "sym", "upnp": "UPnP", "lan": "LAN"}[
        host.rstrip("12")]


def pairing(a: str, b: str) -> str:
    ka, kb = sorted((kind(a), kind(b)))
    if a.startswith("lan") and b.startswith("lan"):
        return "same LAN"
    return f"{ka}-{kb}"


# -- polling the daemons' API from threads inside their namespaces ------------------------------


def linked_sets(ms: Members, names: list[str]) -> dict[str, set[str]]:
    """Each member's connected peers (host names), read from the API in parallel."""
    ids = ms.ids()

    def one(n: str) -> set[str]:
        try:
            doc = ms.request(n, "GET", "/v1/peers")
        except Exception as exc:
            if api_error(exc):
                return set()
            raise
        return {ids[p["member"]] for p in doc["peers"] if p.get("connected") and p["member"] in ids}

    calls = [(n, lambda n=n: one(n)) for n in names]
    return dict(zip(names, ms.net.call_all(calls, 30.0), strict=True))


def wait_mesh(ms: Members, names: list[str], deadline_s: float) -> float | None:
    """Seconds until every member of `names` is linked to every other, None if not by the deadline."""
    started = time.monotonic()
    while time.monotonic() - started < deadline_s:
        sets = linked_sets(ms, names)
        if all(sets[n] >= set(names) - {n} for n in names):
            return time.monotonic() - started
        time.sleep(0.1)
    return None


def settled_paths(ms: Members, deadline_s: float) -> dict[str, dict[str, tuple[str, str | None]]]:
    """The paths once they held still for STABLE_S (punches retried after a back-off change
    them), or as they are at the deadline."""
    started, last, since = time.monotonic(), None, time.monotonic()
    while True:
        now = ms.all_paths(list(HOSTS))
        if now != last:
            last, since = now, time.monotonic()
        if time.monotonic() - since >= STABLE_S or time.monotonic() - started > deadline_s:
            return now
        time.sleep(2.0)


def link_rtts(ms: Members) -> dict[str, list[float]]:
    """The daemons' own round trips (`peers --json` rtt_ms) of their links, by relayed or not."""
    out: dict[str, list[float]] = {"relayed": [], "not relayed": []}
    for doc in ms.cli_all(list(HOSTS), "peers").values():
        for p in (doc or {}).get("peers", []):
            if p.get("connected") and p.get("rtt_ms") is not None and p.get("path"):
                out["relayed" if p["path"] == "relayed" else "not relayed"].append(float(p["rtt_ms"]))
    return out


class Load:
    """Each of `names` submits a contribution every LOAD_EVERY_S; each one's final count is
    sampled every POLL_EVERY_S. Threads inside the namespaces, stopped by `stop()`."""

    def __init__(self, ms: Members, cid: str, names: list[str]) -> None:
        self.ms, self.cid, self.names = ms, cid, names
        self.samples: dict[str, list[tuple[float, int]]] = {n: [] for n in names}
        self.failed = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._submit, args=(n,), daemon=True) for n in names]
        self._threads += [threading.Thread(target=self._poll, args=(n,), daemon=True) for n in names]
        for t in self._threads:
            t.start()

    def _submit(self, name: str) -> None:
        self.ms.enter(name)
        body = {"type": "contribution", "body": {"op": "record", "action": "work", "quantity": "1", "unit": "hour"}}
        for _ in range(100_000):
            if self._stop.wait(LOAD_EVERY_S):
                return
            try:
                self.ms.request(name, "POST", f"/v1/constellations/{self.cid}/records", body, timeout=2.0)
            except Exception as exc:
                if not api_error(exc):
                    raise
                self.failed += 1

    def _poll(self, name: str) -> None:
        self.ms.enter(name)
        for _ in range(1_000_000):
            if self._stop.wait(POLL_EVERY_S):
                return
            with contextlib.suppress(Exception):
                doc = self.ms.request(name, "GET", f"/v1/constellations/{self.cid}", timeout=2.0)
                self.samples[name].append((time.monotonic(), int(doc["final"])))

    def drop(self, name: str) -> None:
        """A member that is killed: no longer counted."""
        self.samples.pop(name, None)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10.0)

    def progress(self) -> list[tuple[float, int]]:
        """(time, count final on every counted member): the least of their latest samples."""
        events = sorted((t, n, m) for m, s in self.samples.items() for t, n in s)
        latest: dict[str, int] = {}
        out: list[tuple[float, int]] = []
        for t, n, m in events:
            latest[m] = n
            if len(latest) == len(self.samples):
                low = min(latest.values())
                if not out or low > out[-1][1]:
                    out.append((t, low))
        return out


def commit_gap(ms: Members, cid: str, victim: str) -> dict[str, float | None]:
    """kill -9 `victim` under load; (kill → next record final on every survivor, longest stall
    in that progress in the KILL_WINDOW_S after the kill), in ms."""
    survivors = [n for n in HOSTS if n != victim and ms.members[n].alive]
    load = Load(ms, cid, survivors)
    try:
        time.sleep(WARMUP_S)
        t_kill = ms.kill9(victim)
        time.sleep(KILL_WINDOW_S + 1.0)
    finally:
        load.stop()
    prog = load.progress()
    at_kill = max((n for t, n in prog if t <= t_kill), default=0)
    after = [t for t, n in prog if t > t_kill and n > at_kill]
    if not after:
        return {"next_ms": None, "longest_ms": None}
    window = [t_kill] + [t for t in after if t <= t_kill + KILL_WINDOW_S]
    longest = max(b - a for a, b in itertools.pairwise(window)) if len(window) > 1 else KILL_WINDOW_S
    return {"next_ms": (after[0] - t_kill) * 1000, "longest_ms": longest * 1000, "failed_writes": load.failed}


# -- relay overhead: three bare transports in the bed ------------------------------------------


def relay_overhead(net: Internet, mb: int) -> dict[str, float]:
    """Ping RTT sym1 → pub2 (direct) and sym1 → eim1 through pub2 (relayed), and pub2's CPU
    seconds per relayed MB over `mb` MB sent from sym1 to eim1 (bench/reach_relay.py)."""
    actor = [sys.executable, str(ROOT / "bench" / "reach_relay.py")]
    port = 7490
    relay = net.popen("pub2", [*actor, "relay", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs = [relay]
    try:
        relay_key = _line(relay)["key"]
        target = net.popen("eim1", [*actor, "target", net.host("pub2").ip, str(port), relay_key],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(target)
        target_key = _line(target)["key"]
        opener = net.popen("sym1", [*actor, "opener", net.host("pub2").ip, str(port), relay_key, target_key, str(mb)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(opener)
        pinged = _line(opener)
        cpu0 = proc_cpu_s(relay.pid)
        assert opener.stdin is not None
        opener.stdin.write("go\n")
        opener.stdin.flush()
        done = _line(opener, 120.0)
        cpu1 = proc_cpu_s(relay.pid)
        return {"rtt_direct_ms": pinged["direct_ms"], "rtt_relayed_ms": pinged["relayed_ms"],
                "relay_cpu_s_per_mb": (cpu1 - cpu0) / mb, "relayed_mb_per_s": mb / done["seconds"]}
    finally:
        for p in procs:
            net.stop(p)


def _line(proc: subprocess.Popen[str], timeout: float = 30.0) -> dict[str, Any]:
    """The next JSON line an actor prints (bounded in time)."""
    assert proc.stdout is not None
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(proc.stdout.readline() if proc.stdout else ""), daemon=True)
    reader.start()
    reader.join(timeout)
    if not got or not got[0].strip():
        err = proc.stderr.read()[-800:] if proc.stderr and proc.poll() is not None else ""
        raise MemberError(f"a relay actor said nothing within {timeout:.0f} s {err}")
    return dict(json.loads(got[0]))


# -- one run -----------------------------------------------------------------------------------


def one_run(workdir: Path, relay_mb: int) -> dict[str, Any]:
    internet.remove_stale()
    out: dict[str, Any] = {}
    with Internet() as net, Members(net, hosts=HOSTS, workdir=workdir) as ms:
        ms.start_all()
        t0 = time.monotonic()
        cid = ms.form(FOUNDER, [h for h in HOSTS if h != FOUNDER])
        out["form_s"] = time.monotonic() - t0
        out["mesh_s"] = wait_mesh(ms, list(HOSTS), MESH_DEADLINE_S)
        paths = settled_paths(ms, SETTLE_S)
        out["paths"] = {f"{a}-{b}": paths.get(a, {}).get(b, ("none", None))[0]
                        for a, b in itertools.combinations(HOSTS, 2)}
        rtts = link_rtts(ms)
        out["link_rtt_ms"] = {k: med(list(v)) for k, v in rtts.items()}
        out["founder"] = commit_gap(ms, cid, FOUNDER)
        ms.start(FOUNDER)
        out["mesh_after_founder_s"] = wait_mesh(ms, list(HOSTS), MESH_DEADLINE_S)
        now = ms.all_paths(list(HOSTS))
        relays = [via for row in now.values() for p, via in row.values() if p == "relayed" and via]
        victim = max(sorted(set(relays)), key=relays.count) if relays else "pub2"
        out["relay"] = {"victim": victim, "relayed_ends": relays.count(victim), **commit_gap(ms, cid, victim)}
        ms.start(victim)
        out["relay_overhead"] = relay_overhead(net, relay_mb)
    return out


def med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v: float | None, unit: str, digits: int = 0) -> str:
    return "not reached" if v is None else f"{v:.{digits}f} {unit}"


def report(runs: list[dict[str, Any]]) -> None:
    n = len(runs)
    print(f"\nreach figures, median of {n} run(s) on the namespace internet (7 members, 5 homes' worth of NAT)")
    rows = [
        ("6 joins by invite, one after the other", fmt(med([r["form_s"] for r in runs]), "s", 1), "-"),
        ("last join final -> full mesh (any path)", fmt(med([r["mesh_s"] for r in runs]), "s", 1),
         "<= 5 s (on loopback)"),
        ("founder kill -9 -> next record final on all survivors",
         fmt(med([r["founder"]["next_ms"] for r in runs]), "ms"), "<= 2 s, goal <= 300 ms"),
        ("  longest commit stall in the 5 s after it", fmt(med([r["founder"]["longest_ms"] for r in runs]), "ms"), ""),
        ("relay kill -9 -> next record final on all survivors",
         fmt(med([r["relay"]["next_ms"] for r in runs]), "ms"), "<= 2 s, goal <= 300 ms"),
        ("  longest commit stall in the 5 s after it", fmt(med([r["relay"]["longest_ms"] for r in runs]), "ms"), ""),
        ("daemons' link RTT, not relayed (peers --json, median)",
         fmt(med([r["link_rtt_ms"]["not relayed"] for r in runs]), "ms", 2), "-"),
        ("daemons' link RTT, relayed", fmt(med([r["link_rtt_ms"]["relayed"] for r in runs]), "ms", 2), "-"),
        ("ping RTT direct (sym1 -> pub2)",
         fmt(med([r["relay_overhead"]["rtt_direct_ms"] for r in runs]), "ms", 3), "-"),
        ("ping RTT relayed (sym1 -> pub2 -> eim1)",
         fmt(med([r["relay_overhead"]["rtt_relayed_ms"] for r in runs]), "ms", 3), "-"),
        ("relay CPU per relayed MB", fmt(med([r["relay_overhead"]["relay_cpu_s_per_mb"] * 1000 for r in runs]),
                                         "ms", 1), "-"),
        ("relayed throughput (within the 16 MiB budget burst)",
         fmt(med([r["relay_overhead"]["relayed_mb_per_s"] for r in runs]), "MB/s", 1), "-"),
    ]
    for what, got, target in rows:
        print(f"  {what:58} {got:>14}   {target}")
    killed = ", ".join(f"{r['relay']['victim']} ({r['relay']['relayed_ends']} relayed link ends)" for r in runs)
    print(f"  relays killed: {killed}")
    print(f"\nshare of member pairs on a direct path (lan/direct/mapped/punched), all runs ({DCUTR});")
    print("  EIM: eim1 behind an endpoint-independent NAT; LAN: lan1/lan2, one EIM router; UPnP: upnp1, mapped")
    by: dict[str, list[str]] = {}
    for r in runs:
        for pair, path in r["paths"].items():
            a, b = pair.split("-")
            by.setdefault(pairing(a, b), []).append(path)
    total_direct = total = nat_direct = nat_total = 0
    for name in sorted(by):
        paths = by[name]
        d = sum(p in DIRECT for p in paths)
        total_direct, total = total_direct + d, total + len(paths)
        if "public" not in name and "UPnP" not in name:
            nat_direct, nat_total = nat_direct + d, nat_total + len(paths)
        counts = ", ".join(f"{p} {paths.count(p)}" for p in sorted(set(paths)))
        print(f"  {name:18} {100 * d / len(paths):5.0f} %   ({counts})")
    print(f"  {'all pairs':18} {100 * total_direct / max(1, total):5.0f} %")
    print(f"  {'both behind NAT, no mapping':18} {100 * nat_direct / max(1, nat_total):5.0f} %   "
          f"(the pairs hole punching is for: {nat_direct}/{nat_total})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--relay-mb", type=int, default=16)
    ap.add_argument("--json", type=Path, help="also write the runs and the machine here")
    args = ap.parse_args()
    if not 1 <= args.repeats <= 10 or not 1 <= args.relay_mb <= 256:
        print("--repeats must be 1 to 10 and --relay-mb 1 to 256.")
        return 2
    reason = internet.unavailable_reason()
    if reason is not None:
        print(f"SKIPPED: the internet bed is unavailable: {reason}")
        return 0
    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['usable_cores']} usable cores, {machine['python']}, "
          f"commit {machine['commit']}, load {machine['load_average_at_start']}")
    runs = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="vm-reach-") as tmp:
            started = time.monotonic()
            run = one_run(Path(tmp), args.relay_mb)
            print(f"run {i + 1}: {time.monotonic() - started:.0f} s: " + json.dumps(
                {k: v for k, v in run.items() if k != "paths"}, default=lambda x: round(x, 3)))
            runs.append(run)
    report(runs)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
