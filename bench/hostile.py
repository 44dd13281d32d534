"""Honest finality under floods: four core daemons on loopback finalise a light load of
contributions while an attacker process floods one of them; each flood at a stated offered
rate, each measured beside an unloaded baseline, with the attacker's own CPU (it shares the
host's cores with the daemons), and what the flood left behind in memory and on disk.

The attacker is a separate process (`--attack KIND`), so its CPU is its own. Floods:

  proofs           a member: equivocation proofs naming made-up authors, large blocks
  future-seq       a member: its own records with far-future sequence numbers, 64 a message
  join-spam        a stranger: join requests with self-signed invites, and 256 join records a message
  checkpoint-sigs  a stranger: self-signed checkpoint signatures for the current epoch
  pex              a stranger: peer exchanges naming 64 made-up peers each
  history          a member: sync requests that hold nothing (asking for the whole history)
  idle-handshakes  anyone: 64 half-sent upgrade requests held open from 4 loopback addresses
  slowloris-api    a local process: 64 half-sent requests held open on the local API

The member floods use the key of a fifth member (a contributor) whose daemon is stopped
after its join is final: a member gone rogue, whose key is valid and who shares the
constellation. Each flood runs its stated rate for as long as the honest load lasts.

Run: .venv/bin/python bench/hostile.py [--floods all|k1,k2] [--count 40] [--rate 4]
     [--out FILE.json]
Prints a table (baseline and flooded finality p50/p99, ratio, attacker CPU, daemons' RSS and
disk growth) and the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import vmcluster as vc
from machine import machine_info, median

from valuemesh.node.home import Home
from valuemesh.node.link import PeerLink
from valuemesh.node.testing import Cluster, Daemon, QuietHandler, wait_until
from valuemesh.node.transport import Transport
from valuemesh.protocol import messages as m
from valuemesh.protocol.consensus.checkpoint import Checkpoint, Content
from valuemesh.protocol.errors import ValuemeshError
from valuemesh.protocol.identity import Identity
from valuemesh.protocol.invite import Invite
from valuemesh.protocol.records import Block, EquivocationProof, Record, parse_constellation

# Offered rate of each flood, in messages per second (connections held, for the last two).
RATES: dict[str, float] = {
    "proofs": 20, "future-seq": 10, "join-spam": 50, "checkpoint-sigs": 100, "pex": 20,
    "history": 20, "idle-handshakes": 64, "slowloris-api": 64,
}
MEMBER_FLOODS = {"proofs", "future-seq", "history"}
PROOF_RECORDS = 24  # records of 4 KiB notes per block of a made-up author: about 100 KiB a block
FUTURE_BATCH = 64
JOIN_BATCH = 256
PEX_ENTRIES = 64
HELD = 64
RECONNECT_PAUSE_S = 0.5
WARMUP_S = 2.0
MAX_FLOOD_S = 120.0


# -- the attacker process ---------------------------------------------------------------------

def _now_ms() -> int:
    return int(time.time() * 1000)


def _messages(kind: str, ident: Identity, cid: bytes, epoch: int, i: int) -> list[bytes]:
    """The i-th message(s) of a link-level flood."""
    if kind == "proofs":
        fake = Identity.generate(os.urandom)
        blocks = []
        for twin in range(2):
            recs = [Record.create(fake, type="contribution", v=1, constellation=cid, seq=k,
                                  body={"op": "record", "action": "work", "quantity": "1", "unit": "h",
                                        "note": secrets.token_hex(2048)}, created=_now_ms())
                    for k in range(PROOF_RECORDS)]
            blocks.append(Block.create(fake, constellation=cid, epoch=epoch, round=1, prev=None,
                                       parents=[], records=recs if twin else recs[1:], created=_now_ms()))
        proof = EquivocationProof("block", blocks[0].raw, blocks[1].raw)
        return [m.encode_message(m.Proof(cid, proof.encode()))]
    if kind == "future-seq":
        recs = [Record.create(ident, type="contribution", v=1, constellation=cid, seq=10**9 + i * FUTURE_BATCH + k,
                              body={"op": "record", "action": "work", "quantity": "1", "unit": "h",
                                    "note": "far ahead"}, created=_now_ms())
                for k in range(FUTURE_BATCH)]
        return [m.encode_message(m.SubmitRecords(cid, [r.raw for r in recs]))]
    if kind == "join-spam":
        inv = Invite.create(ident, constellation=cid, name="x", tier="core", roles=(), uses=1,
                            expires=_now_ms() + 3_600_000, addrs=(), nonce=os.urandom(16))
        token = inv.raw()
        join = Record.create(ident, type="membership", v=1, constellation=cid, seq=i,
                             body={"op": "join", "token": token, "name": "x"}, created=_now_ms())
        if i % 2 == 0:
            return [m.encode_message(m.JoinRequest(token, join.raw))]
        batch = [Record.create(ident, type="membership", v=1, constellation=cid, seq=i * JOIN_BATCH + k,
                               body={"op": "join", "token": token, "name": "x"}, created=_now_ms()).raw
                 for k in range(JOIN_BATCH)]
        return [m.encode_message(m.SubmitRecords(cid, batch))]
    if kind == "checkpoint-sigs":
        cp = Checkpoint.create(ident, Content(cid, epoch, 10 + i, 10 + i, os.urandom(32), os.urandom(32),
                                              os.urandom(32)))
        return [m.encode_message(m.CheckpointSig(cid, cp.encode()))]
    if kind == "pex":
        peers = [[os.urandom(32), f"10.{i % 250}.{k}.{1 + k % 250}", 7470, 0] for k in range(PEX_ENTRIES)]
        return [m.encode_message(m.PeerExchange(peers))]
    if kind == "history":
        return [m.encode_message(m.Heads(cid, 0, 0, []))]
    raise ValueError(kind)


async def _link_flood(kind: str, args: argparse.Namespace, stats: dict[str, int]) -> None:
    ident = (Home(Path(args.key_home)).load_identity() if kind in MEMBER_FLOODS
             else Identity.generate(os.urandom))
    cid = parse_constellation(args.cid)
    handler = QuietHandler()
    t = Transport(ident, args.network.encode(), handler)
    # Each flood dials from its own loopback address (--source), so one flood's address ban
    # does not shut the next one out; the transport's session is made here for that alone.
    t._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, local_addr=(args.source, 0)),
                                       timeout=aiohttp.ClientTimeout(total=None))
    await t.start("127.0.0.1", 0)
    interval = 1.0 / RATES[kind]
    deadline = time.monotonic() + args.seconds
    link: PeerLink | None = None
    i = 0
    try:
        while time.monotonic() < deadline:
            if link is None or link.closed:
                try:
                    link = await asyncio.wait_for(t.connect("127.0.0.1", args.port), 5.0)
                    stats["connects"] += 1
                except (ValuemeshError, OSError, TimeoutError):
                    stats["refused"] += 1
                    link = None
                    await asyncio.sleep(RECONNECT_PAUSE_S)
                    continue
            t0 = time.monotonic()
            for payload in _messages(kind, ident, cid, args.epoch, i):
                try:
                    await link.send(payload)
                    stats["sent"] += 1
                    stats["bytes"] += len(payload)
                except (ValuemeshError, ConnectionError, TimeoutError):
                    stats["send_failed"] += 1
            i += 1
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - t0)))
    finally:
        stats["cut_off"] = len(handler.reasons)
        await t.stop()


async def _held_flood(kind: str, args: argparse.Namespace, stats: dict[str, int]) -> None:
    """Keep HELD half-sent HTTP requests open (reopening what the server closes)."""
    port = args.port if kind == "idle-handshakes" else args.api_port
    deadline = time.monotonic() + args.seconds
    held: list[asyncio.StreamWriter] = []

    async def open_one(k: int) -> None:
        base = args.source.rsplit(".", 1)[0]
        src = f"{base}.{1 + k % 4}" if kind == "idle-handshakes" else "127.0.0.1"
        try:
            _, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0)), 5.0)
        except (OSError, TimeoutError):
            stats["refused"] += 1
            return
        w.write(b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")  # never finished
        stats["connects"] += 1
        held.append(w)

    k = 0
    while time.monotonic() < deadline:
        alive = [w for w in held if not w.is_closing() and not w.transport.is_closing()]
        for w in held:
            if w not in alive:
                stats["cut_off"] += 1
        held[:] = alive
        while len(held) < HELD and time.monotonic() < deadline:
            await open_one(k)
            k += 1
            if stats["refused"] > 10_000:
                break
        await asyncio.sleep(0.2)
        for w in held:  # a trickle keeps an idle timeout honest, never completes the headers
            try:
                w.write(b"X-a: b\r\n")
            except (OSError, RuntimeError):
                pass
    for w in held:
        w.close()


def attacker_main(args: argparse.Namespace) -> int:
    stats = {"sent": 0, "bytes": 0, "connects": 0, "refused": 0, "send_failed": 0, "cut_off": 0}
    flood = _held_flood if args.attack in ("idle-handshakes", "slowloris-api") else _link_flood
    asyncio.run(flood(args.attack, args, stats))
    ru = resource.getrusage(resource.RUSAGE_SELF)
    stats_out: dict[str, Any] = dict(stats)
    stats_out["cpu_s"] = round(ru.ru_utime + ru.ru_stime, 2)
    print(json.dumps(stats_out), flush=True)
    return 0


# -- the measuring side -----------------------------------------------------------------------

def _rss_mb(d: Daemon) -> float:
    if d.proc is None:
        return 0.0
    try:
        for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _disk_mb(d: Daemon) -> float:
    return sum(p.stat().st_size for p in d.home.glob("*.db*") if p.is_file()) / 2**20


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _found(root: Path) -> tuple[Cluster, str, Daemon]:
    """Four core daemons and a fifth member (a contributor) whose daemon is then stopped."""
    c = Cluster(root, 5, network="valuemesh-bench")
    c.start()
    founder = c.daemons[0]
    cid: str = founder.cli_json("constellation", "create", "hostile")["id"]
    for i, d in enumerate(c.daemons[1:], start=1):
        tier = "core" if i < 4 else "contributor"
        token = founder.cli("constellation", "invite", cid, "--tier", tier, "--role", "producer").stdout.strip()
        d.cli("constellation", "join", token)
    rogue = c.daemons.pop()
    wait_until(lambda: vc.joined(c, cid, 4) and all(
        s["members"] == 5 for s in (d.api("GET", f"/v1/constellations/{cid}") for d in c.daemons)),
        vc.JOIN_TIMEOUT_S, "every join to be final on every node", 0.5)
    rogue.stop()
    return c, cid, rogue


def _measure(c: Cluster, cid: str, count: int, rate: float) -> dict[str, Any]:
    res = asyncio.run(vc.run_load(c, cid, rate=rate, count=count))
    return vc.latency_summary(res)


def _flood(c: Cluster, cid: str, rogue: Daemon, kind: str, count: int, rate: float, k: int) -> dict[str, Any]:
    target = c.daemons[1]  # not the founder: nothing special about it
    epoch = target.api("GET", f"/v1/constellations/{cid}")["epoch"]
    _, api_port = Home(target.home).api_address()
    seconds = min(MAX_FLOOD_S, WARMUP_S + count / rate + 15)
    rss0 = [_rss_mb(d) for d in c.daemons]
    disk0 = [_disk_mb(d) for d in c.daemons]
    cmd = [sys.executable, __file__, "--attack", kind, "--port", str(target.port), "--api-port", str(api_port),
           "--cid", cid, "--network", c.network, "--key-home", str(rogue.home), "--epoch", str(epoch),
           "--seconds", f"{seconds:.0f}", "--source", f"127.0.{10 + 10 * k}.1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(WARMUP_S)
        cpu0 = _cpu_s(proc.pid)
        t0 = time.monotonic()
        lat = _measure(c, cid, count, rate)
        attacker_cpu = _cpu_s(proc.pid) - cpu0 if proc.poll() is None else None
        wall = time.monotonic() - t0
        out, err = proc.communicate(timeout=seconds + 30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    stats = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"error": err.strip()[-300:]}
    return {
        "flood": kind, "offered": RATES[kind],
        "unit": "connections held" if kind in ("idle-handshakes", "slowloris-api") else "messages/s",
        "honest": lat, "attacker": stats,
        "attacker_cpu_share": round(attacker_cpu / wall, 3) if attacker_cpu is not None else None,
        "rss_mb_growth_max": round(max(_rss_mb(d) - r for d, r in zip(c.daemons, rss0, strict=True)), 1),
        "disk_mb_growth_max": round(max(_disk_mb(d) - s for d, s in zip(c.daemons, disk0, strict=True)), 2),
        "target_alive": target.alive,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/hostile.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--floods", default="all", help=f"all, or comma-separated: {','.join(RATES)}")
    ap.add_argument("--count", type=int, default=40, help="honest records per measurement")
    ap.add_argument("--rate", type=float, default=4.0, help="honest records per second")
    ap.add_argument("--history", type=int, default=2000,
                    help="records finalised before the floods, so a history request has something to cost")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the daemons' homes")
    # The attacker process's own options.
    ap.add_argument("--attack", choices=sorted(RATES), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--api-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cid", help=argparse.SUPPRESS)
    ap.add_argument("--network", help=argparse.SUPPRESS)
    ap.add_argument("--key-home", help=argparse.SUPPRESS)
    ap.add_argument("--epoch", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=30.0, help=argparse.SUPPRESS)
    ap.add_argument("--source", default="127.0.0.1", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.attack:
        return attacker_main(args)
    floods = list(RATES) if args.floods == "all" else [f for f in args.floods.split(",") if f]
    unknown = [f for f in floods if f not in RATES]
    if unknown:
        ap.error(f"unknown flood(s) {', '.join(unknown)}; choose from {', '.join(RATES)}.")
    if args.count < 1 or args.rate <= 0:
        ap.error("--count and --rate must be positive.")
    info = machine_info()
    root = Path(tempfile.mkdtemp(prefix="valuemesh-hostile-"))
    report: dict[str, Any] = {"machine": info, "honest_rate": args.rate, "honest_count": args.count}
    try:
        c, cid, rogue = _found(root)
        try:
            if args.history:
                asyncio.run(vc.run_load(c, cid, rate=500.0, count=args.history, timing=False, batch=64))
            baselines = [_measure(c, cid, args.count, args.rate)]
            rows = []
            for k, kind in enumerate(floods):
                rows.append(_flood(c, cid, rogue, kind, args.count, args.rate, k))
                print(f"{kind}: {json.dumps(rows[-1])}", flush=True)
            baselines.append(_measure(c, cid, args.count, args.rate))
            base_p50 = median([b["p50_ms"] for b in baselines if b["p50_ms"] is not None])
            report.update(baselines=baselines, baseline_p50_ms=base_p50, floods=rows)
        finally:
            c.stop()
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\nhonest load: {args.count} records at {args.rate}/s over 4 core daemons; "
          f"baseline finality p50 {base_p50} ms (runs: {[b['p50_ms'] for b in baselines]})")
    print(f"{'flood':<16} {'offered':>14} {'p50 ms':>8} {'p99 ms':>8} {'x base':>7} {'final':>7} "
          f"{'att. CPU':>8} {'RSS +MB':>8} {'disk +MB':>9}")
    for r in rows:
        h = r["honest"]
        ratio = round(h["p50_ms"] / base_p50, 2) if h["p50_ms"] and base_p50 else None
        r["p50_ratio"] = ratio
        print(f"{r['flood']:<16} {r['offered']:>5g} {r['unit'][:8]:>8} {h['p50_ms']!s:>8} {h['p99_ms']!s:>8} "
              f"{ratio!s:>7} {h['final_on_all']:>3}/{h['records']:<3} {r['attacker_cpu_share']!s:>8} "
              f"{r['rss_mb_growth_max']:>8} {r['disk_mb_growth_max']:>9}")
    print(f"machine: {info['cpu']}, {info['usable_cores']} usable cores, Python {info['python']}, "
          f"commit {info['commit']}, load at start {info['load_average_at_start']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(30)
    sys.exit(main())
