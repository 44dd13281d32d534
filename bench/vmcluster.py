"""valuemesh side of the cluster benchmarks: real daemons on loopback, records
submitted through the local API, finality timed on every node by polling it.

How finality is timed: while a load runs, one poller per daemon reads the
constellation summary (`GET /v1/constellations/{cid}`, field `final`, the length
of the final order) every POLL_S. Afterwards each daemon's ledger gives the
position of every record in the final order, so the record at position i was
final on that node at the first poll that saw more than i final records. The
error is at most one poll interval plus one API round trip (a few ms), always
late, never early.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from machine import median, pct

from valuemesh.node.home import Home
from valuemesh.node.testing import Cluster, Daemon, wait_until

POLL_S = 0.02
JOIN_TIMEOUT_S = 120.0
SETTLE_TIMEOUT_S = 120.0
HTTP_TIMEOUT_S = 10.0
MAX_IN_FLIGHT = 64
RETRY_PAUSE_S = 0.05
MAX_RETRIES = 40


class Api:
    """An aiohttp client for one daemon's local API (address and token from its home)."""

    def __init__(self, session: aiohttp.ClientSession, daemon: Daemon) -> None:
        self.session = session
        self.daemon = daemon
        self.refresh()

    def refresh(self) -> None:
        home = Home(self.daemon.home)
        host, port = home.api_address()
        self.base = f"http://{host}:{port}"
        self.headers = {"Authorization": f"Bearer {home.api_token()}"}

    async def get(self, path: str) -> Any:
        async with self.session.get(self.base + path, headers=self.headers) as r:
            r.raise_for_status()
            return await r.json()

    async def post(self, path: str, body: dict[str, Any]) -> Any:
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
    c = Cluster(root, n, network="valuemesh-bench")
    c.start()
    try:
        cid = c.found("bench", roles=("producer",))
        wait_until(lambda: joined(c, cid, n), JOIN_TIMEOUT_S, "every join to be final on every node", 0.5)
    except BaseException:
        c.stop()
        raise
    return c, cid


def joined(c: Cluster, cid: str, n: int) -> bool:
    sums = [d.api("GET", f"/v1/constellations/{cid}") for d in c.daemons if d.alive]
    return all(s["core"] == n and s["pending"] == 0 for s in sums) and len({s["state_hash"] for s in sums}) == 1


@dataclass
class Series:
    """(monotonic time, final count) as one node answered it."""

    points: list[tuple[float, int]] = field(default_factory=list)

    def final_at(self, index: int) -> float | None:
        for t, n in self.points:
            if n > index:
                return t
        return None


@dataclass
class LoadResult:
    submitted: dict[str, float]  # record id -> monotonic submit time
    series: list[Series]
    order: list[dict[str, int]]  # per node: record id -> index in its final order
    failed: int
    retried: int
    t_start: float
    t_end_submit: float
    stopped: set[int]

    def finality_ms(self) -> list[float]:
        """Per record: submit to final on every live node (ms); records never final on all are left out."""
        out = []
        for rid, t0 in self.submitted.items():
            worst = 0.0
            for i, s in enumerate(self.series):
                if i in self.stopped:
                    continue
                idx = self.order[i].get(rid)
                t = s.final_at(idx) if idx is not None else None
                if t is None:
                    worst = -1.0
                    break
                worst = max(worst, t - t0)
            if worst >= 0:
                out.append(worst * 1000)
        return out

    def all_final_time(self) -> float | None:
        lat = self.finality_ms()
        if len(lat) < len(self.submitted):
            return None
        ends = []
        for rid in self.submitted:
            for i, s in enumerate(self.series):
                if i not in self.stopped:
                    t = s.final_at(self.order[i][rid])
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
                   targets: list[int] | None = None, during: Any = None) -> LoadResult:
    """Offer `count` records at `rate`/s (open loop, round-robin over live daemons),
    then wait until every live daemon has all of them final (bounded)."""
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
    conn = aiohttp.TCPConnector(limit=MAX_IN_FLIGHT * 2)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as session:
        apis = [Api(session, d) for d in c.daemons]
        series = [Series() for _ in apis]
        stop = asyncio.Event()
        interval = poll_s * max(1, len(apis) / 4)
        pollers = [asyncio.create_task(_poll(a, cid, s, stop, interval)) for a, s in zip(apis, series, strict=True)]
        submitted: dict[str, float] = {}
        counters = {"failed": 0, "retried": 0}
        sem = asyncio.Semaphore(MAX_IN_FLIGHT)
        order_targets = targets if targets is not None else list(range(len(apis)))
        stopped: set[int] = set()

        async def submit(i: int) -> None:
            async with sem:
                body = contribution(i)
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
                    submitted[doc["id"]] = t0
                    return
                counters["failed"] += 1

        t_start = time.monotonic()
        tasks = []
        side = asyncio.create_task(during(c, apis, stopped)) if during is not None else None
        for i in range(count):
            delay = t_start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(submit(i)))
        await asyncio.gather(*tasks)
        t_end_submit = time.monotonic()
        if side is not None:
            await side
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        orders: list[dict[str, int]] = [{} for _ in apis]
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
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
                    if any(r not in orders[i] for r in submitted):
                        done = False
            if done:
                break
        # One more poll round so the series covers the last finalisations.
        await asyncio.sleep(interval * 2)
        stop.set()
        await asyncio.gather(*pollers)
        return LoadResult(submitted, series, orders, counters["failed"], counters["retried"], t_start,
                          t_end_submit, stopped | {i for i, d in enumerate(c.daemons) if not d.alive})


def latency_summary(res: LoadResult) -> dict[str, Any]:
    lat = res.finality_ms()
    return {"records": len(res.submitted), "final_on_all": len(lat),
            "p50_ms": _r(median(lat)), "p99_ms": _r(pct(lat, 0.99)), "max_ms": _r(max(lat) if lat else None),
            "failed_writes": res.failed, "retried_writes": res.retried}


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def kill9(d: Daemon) -> None:
    """kill -9 by PID (the crash case) and reap it."""
    if d.proc is not None and d.proc.poll() is None:
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait(10)
