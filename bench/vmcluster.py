"""valuemesh side of the cluster benchmarks: real daemons on loopback, records
submitted through the local API, finality timed on every node by the node itself.

How finality is timed: each daemon notes, for every record of its final order, the
wall-clock time at which it became final there (`final_at` in the ledger, in ms rounded
up, so never early and at most 1 ms late). The client notes the wall-clock time just
before each submit request; both run on this one host, so they share the clock.
Afterwards each daemon's ledger gives every record's final time on that node.
While the load runs, one poller per daemon reads the final count every POLL_S only to
know when the run is done (and whether it stalled); those polls no longer time anything,
so they are sparse and cost the daemons little CPU. (Until 2026-11-23 the polls timed
finality: a 20 ms interval, up to 20 ms plus an API round trip late, and 4 x 50 polls/s
that took CPU from the daemons on the same cores.)
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from machine import ensure_bytecode, median, pct

from valuemesh.node.home import Home
from valuemesh.node.testing import Cluster, Daemon, wait_until
from valuemesh.protocol.errors import LocalError, ValuemeshError

POLL_S = 0.2
JOIN_TIMEOUT_S = 120.0
SETTLE_TIMEOUT_S = 120.0
HTTP_TIMEOUT_S = 10.0
MAX_IN_FLIGHT = 64
RETRY_PAUSE_S = 0.05
MAX_RETRIES = 40
SAMPLE = 20
MAX_FAILED = 200
# No record became final anywhere for this long while some were outstanding: agreement has stalled.
STALL_S = 30.0
SETTLE_POLL_S = 0.2
AVAILABILITY_SETTLE_S = 30.0
# How often the rejoin timer polls the late node: its resolution, and cheap for the daemon.
REJOIN_POLL_S = 0.1
# While a rejoining node catches up, its status (final count, state hash) is read only this
# often: the state hash is recomputed over the whole state at every read once the ledger has
# changed, which at 100 000 records cost more than the catch-up itself at 0.1 s polling.
# In between the bench asks for one record of the gap by id, which costs the node nothing.
REJOIN_STATUS_S = 2.0


class Api:
    """An aiohttp client for one daemon's local API (address and token from its home)."""

    def __init__(self, session: aiohttp.ClientSession, daemon: Daemon) -> None:
        self.session = session
        self.daemon = daemon
        self.refresh()

    def refresh(self) -> None:
        home = Home(self.daemon.home)
        try:
            host, port = home.api_address()
            self.base = f"http://{host}:{port}"
            self.headers = {"Authorization": f"Bearer {home.api_token()}"}
        except LocalError:  # a stopped daemon: calls fail like a refused connection until refresh
            self.base = ""
            self.headers = {}

    async def get(self, path: str) -> Any:
        if not self.base:
            raise aiohttp.ClientConnectionError("daemon not running")
        async with self.session.get(self.base + path, headers=self.headers) as r:
            r.raise_for_status()
            return await r.json()

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        if not self.base:
            raise aiohttp.ClientConnectionError("daemon not running")
        async with self.session.post(self.base + path, json=body, headers=self.headers) as r:
            if r.status >= 400:
                raise aiohttp.ClientResponseError(r.request_info, (), status=r.status, message=await r.text())
            return await r.json()


def contribution(i: int) -> dict[str, Any]:
    """A typical contribution record body (about 200 bytes once signed and encoded)."""
    return {"type": "contribution",
            "body": {"op": "record", "action": "work", "quantity": f"{1 + i % 40}.5", "unit": "hour",
                     "note": f"bench load record {i}"}}


def start(root: Path, n: int) -> tuple[Cluster, str]:
    """n daemons, one constellation with all of them core members, all joins final everywhere."""
    ensure_bytecode()
    c = Cluster(root, n, network="valuemesh-bench")
    c.start()
    try:
        cid = c.found("bench", roles=("producer",))
        wait_until(lambda: joined(c, cid, n), JOIN_TIMEOUT_S, "every join to be final on every node", 0.5)
    except BaseException:
        c.stop()
        raise
    return c, cid


def joined_all(daemons: list[Daemon], cid: str) -> bool:
    """Every one of `daemons` answers with the same final count and state hash."""
    sums = [d.api("GET", f"/v1/constellations/{cid}") for d in daemons]
    return len({(s["final"], s["state_hash"]) for s in sums}) == 1


def joined(c: Cluster, cid: str, n: int) -> bool:
    sums = [d.api("GET", f"/v1/constellations/{cid}") for d in c.daemons if d.alive]
    return all(s["core"] == n and s["pending"] == 0 for s in sums) and len({s["state_hash"] for s in sums}) == 1


@dataclass
class Series:
    """(monotonic time, final count) as one node answered it."""

    points: list[tuple[float, int]] = field(default_factory=list)
    _counts: list[int] = field(default_factory=list)

    def final_at(self, index: int) -> float | None:
        # A node's final count never decreases (a restart replays the order before it answers).
        if len(self._counts) != len(self.points):
            self._counts = list(itertools.accumulate((n for _, n in self.points), max))
        k = bisect.bisect_right(self._counts, index)
        return self.points[k][0] if k < len(self.points) else None


def exact_series(ledgers: list[dict[str, Any]], to_mono: float) -> tuple[dict[str, float], Series]:
    """From a daemon's ledgers: record id -> monotonic time it became final on that node, and
    the node's final count over time (`to_mono` turns wall-clock seconds into monotonic).

    A restarted daemon replays its final order and notes the replay time, so a node killed
    during the run contributes the ledger read just before its kill too: each record keeps
    the earliest time any of the node's ledgers gives it (a record that became final in the
    few ms between that read and the kill gets its later replay time: late, never early)."""
    times: dict[str, float] = {}
    index: dict[str, int] = {}
    for led in ledgers:
        for e, t in zip(led["final"], led["final_at"], strict=True):
            mono = t / 1000 + to_mono
            if mono < times.get(e["id"], mono + 1):
                times[e["id"]] = mono
            index[e["id"]] = e["index"]
    return times, Series(sorted((t, index[rid] + 1) for rid, t in times.items()))


@dataclass
class LoadResult:
    submitted: dict[str, float]  # record id -> monotonic submit time
    accepted_by: dict[str, tuple[int, float]]  # record id -> (daemon index, monotonic time of the 202)
    series: list[Series]
    order: list[dict[str, int]]  # per node: record id -> index in its final order
    failed: int
    retried: int
    t_start: float
    t_end_submit: float
    stopped: set[int]
    stalled: bool = False
    final_times: list[dict[str, float]] = field(default_factory=list)  # per node: record id -> monotonic

    def final_at(self, node: int, rid: str) -> float | None:
        return self.final_times[node].get(rid)

    def finality_ms(self, first: bool = False) -> list[float]:
        """Per record: submit to final on every live node (ms), or with `first` on the first
        node that had it final; records never final on all live nodes are left out."""
        out = []
        for rid, t0 in self.submitted.items():
            times = []
            for i in range(len(self.series)):
                if i in self.stopped:
                    continue
                t = self.final_at(i, rid)
                if t is None:
                    break
                times.append(t - t0)
            else:
                if times:
                    out.append((min(times) if first else max(times)) * 1000)
        return out

    def all_final_time(self) -> float | None:
        lat = self.finality_ms()
        if len(lat) < len(self.submitted):
            return None
        ends = []
        for rid in self.submitted:
            for i in range(len(self.series)):
                if i not in self.stopped:
                    t = self.final_at(i, rid)
                    assert t is not None
                    ends.append(t)
        return max(ends)

    def longest_gap_ms(self, node: int) -> float:
        """Longest time between two increases of the final count on one node, while records were outstanding."""
        pts = self.series[node].points
        last_t, last_n, gap = None, None, 0.0
        target = max((n for _, n in pts), default=0)
        for t, n in pts:
            if t < self.t_start:
                continue
            if last_n is None or n > last_n:
                if last_t is not None:
                    gap = max(gap, t - last_t)
                last_t, last_n = t, n
            if n >= target:
                break
        return gap * 1000


class Progress:
    """Whether the cluster's final count stopped rising for STALL_S while we wait on it."""

    def __init__(self) -> None:
        self.best = -1
        self.since = time.monotonic()

    def saw(self, final: int) -> None:
        if final > self.best:
            self.best, self.since = final, time.monotonic()

    @property
    def stalled(self) -> bool:
        return time.monotonic() - self.since > STALL_S


async def _poll(api: Api, cid: str, series: Series, stop: asyncio.Event, interval: float) -> None:
    while not stop.is_set():
        try:
            s = await api.get(f"/v1/constellations/{cid}")
            series.points.append((time.monotonic(), int(s["final"])))
        except (TimeoutError, aiohttp.ClientError, OSError):
            await asyncio.sleep(interval)  # a killed or restarting node: keep polling the others
            continue
        await asyncio.sleep(interval)


async def run_load(c: Cluster, cid: str, *, rate: float, count: int, poll_s: float = POLL_S,
                   targets: list[int] | None = None, during: Any = None, timing: bool = True,
                   settle_s: float = SETTLE_TIMEOUT_S, batch: int = 1,
                   before_kill: dict[int, list[dict[str, Any]]] | None = None) -> LoadResult:
    """Offer `count` records at `rate`/s (open loop, round-robin over live daemons),
    then wait until every live daemon has all of them final (bounded). Without `timing`
    nothing is polled during the load and completion is judged by a sample of the last
    records (for long builds, whose ledgers are too large to fetch)."""
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
    conn = aiohttp.TCPConnector(limit=MAX_IN_FLIGHT * 2)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as session:
        apis = [Api(session, d) for d in c.daemons]
        series = [Series() for _ in apis]
        stop = asyncio.Event()
        interval = poll_s * max(1, len(apis) / 4)
        pollers = [asyncio.create_task(_poll(a, cid, s, stop, interval)) for a, s in zip(apis, series, strict=True)
                   if timing]
        submitted: dict[str, float] = {}
        accepted_by: dict[str, tuple[int, float]] = {}
        counters = {"failed": 0, "retried": 0}
        sem = asyncio.Semaphore(MAX_IN_FLIGHT)
        order_targets = targets if targets is not None else list(range(len(apis)))
        stopped: set[int] = set()

        async def submit(i: int) -> None:
            async with sem:
                if counters["failed"] >= MAX_FAILED:  # the cluster refuses everything: stop offering
                    counters["failed"] += 1
                    return
                if batch == 1:
                    body = contribution(i)
                else:
                    body = {"records": [contribution(j) for j in range(i * batch, min(count, (i + 1) * batch))]}
                for attempt in range(MAX_RETRIES):
                    k = order_targets[(i + attempt) % len(order_targets)]
                    if not c.daemons[k].alive:
                        continue
                    t0 = time.monotonic()
                    try:
                        doc = await apis[k].post(f"/v1/constellations/{cid}/records", body)
                    except (TimeoutError, aiohttp.ClientError, OSError):
                        counters["retried"] += 1
                        await asyncio.sleep(RETRY_PAUSE_S)
                        continue
                    t1 = time.monotonic()
                    for rid in ([doc["id"]] if batch == 1 else [r["id"] for r in doc["records"]]):
                        submitted[rid] = t0
                        accepted_by[rid] = (k, t1)
                    return
                counters["failed"] += 1

        base = [0] * len(apis)  # final count before the load, per node
        for i, a in enumerate(apis):
            if timing and c.daemons[i].alive:
                base[i] = int((await a.get(f"/v1/constellations/{cid}"))["final"])
        t_start = time.monotonic()
        tasks = []
        side = asyncio.create_task(during(c, apis, stopped)) if during is not None else None
        for i in range(-(-count // batch)):
            delay = t_start + i * batch / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(submit(i)))
        await asyncio.gather(*tasks)
        t_end_submit = time.monotonic()
        if side is not None:
            await side
        deadline = time.monotonic() + settle_s + (0 if timing else count / 20)
        orders: list[dict[str, int]] = [{} for _ in apis]
        exact: list[dict[str, float]] = [{} for _ in apis]
        to_mono = time.monotonic() - time.time()
        # Without timing: done when every live node holds the last SAMPLE accepted records as
        # final and all report one final count (a count target would wait forever on a lost record).
        sample = sorted(accepted_by, key=lambda rid: accepted_by[rid][1])[-SAMPLE:]
        progress = Progress()
        while not timing and time.monotonic() < deadline and not progress.stalled:
            await asyncio.sleep(0.5)
            try:
                live = [a for i, a in enumerate(apis) if c.daemons[i].alive]
                finals = {int((await a.get(f"/v1/constellations/{cid}"))["final"]) for a in live}
                progress.saw(max(finals, default=0))
                if len(finals) != 1:
                    continue
                views = [await a.get(f"/v1/constellations/{cid}/records/{rid}") for a in live for rid in sample]
                if all(v.get("final") for v in views):
                    break
            except (aiohttp.ClientError, OSError, TimeoutError):
                continue
        # Fetching whole ledgers costs the daemons CPU, so first wait (bounded) until the polled
        # final counts show every record final; a record that never becomes final ends this at the deadline.
        while timing and time.monotonic() < deadline and not progress.stalled:
            live = [i for i in range(len(apis)) if i not in stopped and c.daemons[i].alive]
            if all(series[i].points and series[i].points[-1][1] >= base[i] + len(submitted) for i in live):
                break
            progress.saw(max((series[i].points[-1][1] for i in live if series[i].points), default=0))
            await asyncio.sleep(0.2)
        while timing and time.monotonic() < deadline + 5 * SETTLE_POLL_S:
            await asyncio.sleep(SETTLE_POLL_S)
            done = True
            for i, a in enumerate(apis):
                if i in stopped or not c.daemons[i].alive:
                    continue
                if len(orders[i]) < len(submitted) or any(r not in orders[i] for r in submitted):
                    try:
                        led = await a.get(f"/v1/constellations/{cid}/ledger")
                    except (TimeoutError, aiohttp.ClientError, OSError):
                        done = False
                        continue
                    orders[i] = {e["id"]: e["index"] for e in led["final"]}
                    if timing:
                        earlier = (before_kill or {}).get(i, [])
                        exact[i], series[i] = exact_series([*earlier, led], to_mono)
                    if any(r not in orders[i] for r in submitted):
                        done = False
            if done:
                break
        # One more poll round so the series covers the last finalisations.
        await asyncio.sleep(interval * 2)
        stop.set()
        await asyncio.gather(*pollers)
        return LoadResult(submitted, accepted_by, series, orders, counters["failed"], counters["retried"], t_start,
                          t_end_submit, stopped | {i for i, d in enumerate(c.daemons) if not d.alive},
                          progress.stalled, exact)


def latency_summary(res: LoadResult) -> dict[str, Any]:
    lat = res.finality_ms()
    first = res.finality_ms(first=True)
    return {"records": len(res.submitted), "final_on_all": len(lat),
            "first_node_p50_ms": _r(median(first)), "first_node_p99_ms": _r(pct(first, 0.99)),
            "p50_ms": _r(median(lat)), "p99_ms": _r(pct(lat, 0.99)), "max_ms": _r(max(lat) if lat else None),
            "failed_writes": res.failed, "retried_writes": res.retried}


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def kill9(d: Daemon) -> None:
    """kill -9 by PID (the crash case) and reap it."""
    if d.proc is not None and d.proc.poll() is None:
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait(10)


# -- figure 4: availability ---------------------------------------------------------------

def progress_gaps(res: LoadResult, windows: list[tuple[float, float]]) -> list[float]:
    """Longest gap (ms) in cluster-wide commit progress (the highest final count any live node
    reports) inside each window, counting only while submitted records were still outstanding."""
    events: list[tuple[float, int]] = sorted(p for s in res.series for p in s.points)
    best = 0
    increases: list[float] = []
    for t, n in events:
        if n > best:
            best = n
            increases.append(t)
    target_t = increases[-1] if increases else res.t_start
    out = []
    for lo, hi in windows:
        hi = min(hi, target_t)
        inside = [lo] + [t for t in increases if lo < t <= hi]
        out.append(max((b - a for a, b in itertools.pairwise(inside)), default=0.0) * 1000)
    return out


async def kill_each_in_turn(c: Cluster, apis: list[Api], stopped: set[int], *, warmup_s: float, down_s: float,
                            after_s: float, log: list[dict[str, float]], cid: str = "",
                            before_kill: dict[int, list[dict[str, Any]]] | None = None) -> None:
    """kill -9 each daemon in turn, restart it after down_s, and let it catch up for after_s.
    With `before_kill`, each daemon's ledger is read just before its kill (see exact_series)."""
    await asyncio.sleep(warmup_s)
    for i, d in enumerate(c.daemons):
        if before_kill is not None:
            with contextlib.suppress(TimeoutError, aiohttp.ClientError, OSError):
                before_kill.setdefault(i, []).append(await apis[i].get(f"/v1/constellations/{cid}/ledger"))
        t_kill = time.monotonic()
        kill9(d)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(d.start)
        apis[i].refresh()
        t_up = time.monotonic()
        await asyncio.sleep(after_s)
        log.append({"node": i, "t_kill": t_kill, "t_up": t_up, "t_next": time.monotonic()})


def availability(c: Cluster, cid: str, *, rate: float, quick: bool) -> dict[str, Any]:
    down_s, after_s, warmup_s = (2.0, 3.0, 2.0) if quick else (5.0, 10.0, 5.0)
    per_node = down_s + after_s + 5.0  # restart takes a few seconds on a loaded 2-core host
    count = int(rate * (warmup_s + per_node * len(c.daemons) + 2.0))
    log: list[dict[str, float]] = []

    async def during(cl: Cluster, apis: list[Api], stopped: set[int]) -> None:
        await kill_each_in_turn(cl, apis, stopped, warmup_s=warmup_s, down_s=down_s, after_s=after_s, log=log,
                                cid=cid, before_kill=before_kill)

    # A record acknowledged by a daemon that then lost it never becomes final: do not wait long for it.
    before_kill: dict[int, list[dict[str, Any]]] = {}
    res = asyncio.run(run_load(c, cid, rate=rate, count=count, during=during, settle_s=AVAILABILITY_SETTLE_S,
                               before_kill=before_kill))
    gaps = progress_gaps(res, [(e["t_kill"], e["t_next"]) for e in log])
    lat = res.finality_ms()
    final_all = {rid for rid in res.submitted if all(rid in o for i, o in enumerate(res.order) if i not in res.stopped)}
    lost_by: dict[str, int] = {}
    for rid in res.submitted:
        if rid not in final_all:
            k = f"node{res.accepted_by[rid][0]}"
            lost_by[k] = lost_by.get(k, 0) + 1
    return {"records": len(res.submitted), "final_on_all": len(lat), "offered_per_s": rate,
            "never_final_by_accepting_node": lost_by,
            "longest_gap_ms_per_kill": [round(g) for g in gaps], "longest_gap_ms": round(max(gaps, default=0)),
            "failed_writes": res.failed + (len(res.submitted) - len(lat)), "retried_writes": res.retried,
            "acknowledged_never_final": len(res.submitted) - len(lat), "stalled": res.stalled,
            "finality_p50_ms": _r(median(lat)), "finality_p99_ms": _r(pct(lat, 0.99)),
            "down_s": down_s}


# -- figure 5: catch-up ---------------------------------------------------------------------

def catch_up(c: Cluster, cid: str, *, records: int, rate: float, batch: int = 1) -> dict[str, Any]:
    """Stop the last daemon, finalise `records` more on the others, restart it and time how long
    until it reports the same final count and state hash as the others."""
    late = c.daemons[-1]
    late.stop()
    res, build_s = build_gap(c, cid, records=records, rate=rate, batch=batch)
    out: dict[str, Any] = {"missed_records": len(res.submitted), "build_s": round(build_s, 1),
                           "build_stalled": res.stalled, "failed_writes": res.failed}
    out.update(rejoin(c, cid, len(res.submitted), last=max(res.submitted, key=res.submitted.__getitem__)))
    return out


def build_gap(c: Cluster, cid: str, *, records: int, rate: float, batch: int = 1) -> tuple[LoadResult, float]:
    """Finalise `records` on every daemon but the last (stopped), offered at `rate`/s."""
    others = c.daemons[:-1]
    t0 = time.monotonic()
    res = asyncio.run(run_load(c, cid, rate=rate, count=records, targets=list(range(len(others))), timing=False,
                               batch=batch))
    return res, time.monotonic() - t0


def rejoin(c: Cluster, cid: str, missed: int, last: str | None = None) -> dict[str, Any]:
    """Start the last (stopped) daemon and time it until it reports the same final count and
    state hash as the first: from process start, and from its ready line (process start =
    interpreter, imports, store open, ledger replay of what it held, listeners). With `last`
    (the id of the gap's last record), the node is asked for that record every 0.1 s and
    for its status only every REJOIN_STATUS_S until that record is final on it."""
    from machine import proc_cpu_s, proc_threads_cpu_s
    late = c.daemons[-1]
    want = c.daemons[0].api("GET", f"/v1/constellations/{cid}")
    others = [d.proc.pid for d in c.daemons[:-1] if d.proc is not None and d.alive]
    others_cpu0 = sum(proc_cpu_s(p) for p in others)
    t_start = time.monotonic()
    late.start()
    t_ready = time.monotonic()
    assert late.proc is not None
    late_ready_cpu = proc_cpu_s(late.proc.pid)
    deadline = t_ready + max(SETTLE_TIMEOUT_S, missed / 50)
    caught = None
    progress = Progress()
    probing = last is not None
    status_at = 0.0
    while time.monotonic() < deadline and not progress.stalled:
        if probing and time.monotonic() - status_at < REJOIN_STATUS_S:
            with contextlib.suppress(ValuemeshError, OSError, ValueError):  # not up yet, or not known yet
                probing = not late.api("GET", f"/v1/constellations/{cid}/records/{last}").get("final")
            if probing:
                time.sleep(REJOIN_POLL_S)
                continue
        status_at = time.monotonic()
        s = late.api("GET", f"/v1/constellations/{cid}")
        progress.saw(int(s["final"]))
        if s["final"] >= want["final"] and s["state_hash"] == want["state_hash"]:
            caught = time.monotonic()
            break
        time.sleep(REJOIN_POLL_S)
    out: dict[str, Any] = {"final_order_length": want["final"], "start_s": round(t_ready - t_start, 2)}
    # Where the cores went: the late daemon before and after its ready line (its event-loop
    # thread and the rest, i.e. SQLite's threads), and the peers that stream it the gap.
    threads = proc_threads_cpu_s(late.proc.pid)
    out["cpu_s"] = {"late_start": round(late_ready_cpu, 2),
                    "late_after_ready": round(sum(threads.values()) - late_ready_cpu, 2),
                    "late_main_thread": round(threads["main"], 2), "late_other_threads": round(threads["other"], 2),
                    "peers": round(sum(proc_cpu_s(p) for p in others) - others_cpu0, 2)}
    if caught is None:
        out["caught_up"] = False
        return out
    out.update(caught_up=True, seconds=round(caught - t_start, 2), seconds_after_ready=round(caught - t_ready, 2),
               records_per_s=round(missed / (caught - t_start)),
               records_per_s_after_ready=round(missed / max(caught - t_ready, 1e-3)))
    return out


# -- figure 6: idle -------------------------------------------------------------------------

def idle(root: Path, *, constellations: int, seconds: float) -> dict[str, Any]:
    """One daemon in `constellations` constellations, quiescent: CPU % and RSS over `seconds`."""
    from machine import proc_cpu_s, proc_rss_mb
    ensure_bytecode()
    c = Cluster(root, 1, network="valuemesh-bench-idle")
    c.start()
    try:
        d = c.daemons[0]
        for k in range(constellations):
            d.cli_json("constellation", "create", f"idle-{k}")
        time.sleep(2.0)  # let start-up and the founding writes settle
        assert d.proc is not None
        pid = d.proc.pid
        cpu0, t0 = proc_cpu_s(pid), time.monotonic()
        time.sleep(seconds)
        cpu1, t1 = proc_cpu_s(pid), time.monotonic()
        return {"constellations": constellations, "seconds": seconds,
                "cpu_percent": round(100 * (cpu1 - cpu0) / (t1 - t0), 2), "rss_mb": round(proc_rss_mb(pid), 1)}
    finally:
        c.stop()
