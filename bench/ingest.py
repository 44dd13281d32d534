"""Figure 1, ingest: signed records decoded, verified and stored per second by one
node, next to raw PyNaCl verify calls per second in the same process.

Two paths, each what the daemon does with data from a peer, minus consensus and ledger
(figure 5, catch-up, times those too, through a real daemon):
  records  a SubmitRecords batch: decode_records (every signature checked), then one durable
           store batch put_records + add_pending, as Engine.submit does;
  blocks   a Blocks message: decode_blocks (every block and record signature), then one
           non-durable put_blocks batch (it stores the records too), as Engine._persist_received.
Two ways, each against raw verify done the same way:
  one core   the process pinned to one core (SQLite's writer thread shares it), every
             signature checked on the calling thread; raw verify is a loop on that core;
  all cores  the process on every usable core, signatures checked as the daemon does
             (node/verify.py: the calling thread and workers, one slice each); raw verify is
             the same number of threads, each looping over its slice.
Raw verify runs in slices interleaved with the ingest slices so load from other processes
hits both alike, and the ratio is the median of the per-slice ratios (wall clock).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import nacl.signing

from valuemesh.node.store import ConstellationInfo, Store
from valuemesh.node.verify import ParallelVerifier, usable_cores
from valuemesh.protocol import cbor
from valuemesh.protocol.builtin.membership import make_genesis
from valuemesh.protocol.identity import Identity
from valuemesh.protocol.records import RECORD_DOMAIN, Block, Record, decode_blocks, decode_records

RECORDS_PER_BATCH = 128  # the daemon's SYNC_BATCH and a full SubmitRecords message
RECORDS_PER_BLOCK = 32
BLOCKS_PER_BATCH = 16


def _colleague_protocol_bench() -> Any:
    """bench/protocol.py (a colleague's) builds the typical records; load it by path, since
    the name `protocol` is also the repository's protocol package."""
    spec = importlib.util.spec_from_file_location("bench_protocol", Path(__file__).with_name("protocol.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pin_one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def _records_in(cid: bytes, n: int) -> list[Record]:
    # The colleague's records carry their own constellation id; re-sign the same bodies for ours.
    base = _colleague_protocol_bench().make_records(n)
    ids = {}
    out = []
    for k, r in enumerate(base):
        key = r.author.key
        if key not in ids:
            ids[key] = Identity(hashlib.blake2b(b"ingest-%d" % len(ids), digest_size=32).digest())
        out.append(Record.create(ids[key], type=r.type, v=r.v, constellation=cid, seq=r.seq, body=r.body,
                                 created=r.created + k))
    return out


async def _measure(total: int, slices: int, verifier: ParallelVerifier | None) -> dict[str, Any]:
    founder = Identity(hashlib.blake2b(b"ingest-founder", digest_size=32).digest())
    genesis = make_genesis(founder, name="ingest", purpose="bench", nonce=b"\x01" * 16, created=1_700_000_000_000,
                           plugins={"membership": "1.0.0", "contribution": "1.0.0"})
    cid = genesis.constellation
    records = _records_in(cid, total)
    raws = [r.raw for r in records]
    # The raw baseline verifies the very same messages and signatures the records carry.
    msgs = [_verify_input(r) for r in records]
    checks = [(r.author, RECORD_DOMAIN + cbor.encode(r.payload_map()), r.sig) for r in records]
    block_authors = [Identity(hashlib.blake2b(b"ingest-block-%d" % i, digest_size=32).digest()) for i in range(4)]
    blocks = []
    for i in range(0, total, RECORDS_PER_BLOCK):
        blocks.append(Block.create(block_authors[len(blocks) % 4], constellation=cid, epoch=0,
                                   round=len(blocks) // 4, prev=None, parents=[],
                                   records=records[i:i + RECORDS_PER_BLOCK], created=1_700_000_000_000 + i).raw)
    out: dict[str, Any] = {"records": total, "record_bytes": round(statistics.mean(len(r) for r in raws))}
    with tempfile.TemporaryDirectory(prefix="valuemesh-ingest-") as tmp:
        for path in ("records", "blocks"):
            store = await Store.open(Path(tmp) / f"{path}.db")
            try:
                async with store.batch() as tx:
                    tx.put_constellation(ConstellationInfo(cid, genesis.raw, genesis.created, "active", "core",
                                                           {"membership": 1, "contribution": 1}, "ingest"))
                ratios, rates, raw_rates = [], [], []
                per = total // slices
                for s in range(slices):
                    lo, hi = s * per, (s + 1) * per
                    t0 = time.perf_counter()
                    if verifier is None:
                        for vk, msg, sig in msgs[lo:hi]:
                            vk.verify(msg, sig)
                    elif verifier(checks[lo:hi]) is not None:
                        raise AssertionError("a raw signature did not verify")
                    raw_rate = (hi - lo) / (time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    if path == "records":
                        n = await _ingest_records(store, cid, raws[lo:hi], verifier)
                    else:
                        some = blocks[lo // RECORDS_PER_BLOCK:hi // RECORDS_PER_BLOCK]
                        n = await _ingest_blocks(store, some, verifier)
                    rate = n / (time.perf_counter() - t0)
                    raw_rates.append(raw_rate)
                    rates.append(rate)
                    ratios.append(rate / raw_rate)
                out[path] = {"per_s": round(statistics.median(rates)), "ratio": round(statistics.median(ratios), 3)}
                out.setdefault("raw_verify_per_s_list", []).extend(raw_rates)
            finally:
                await store.close()
    out["raw_verify_per_s"] = round(statistics.median(out.pop("raw_verify_per_s_list")))
    return out


def _verify_input(r: Record) -> tuple[nacl.signing.VerifyKey, bytes, bytes]:
    return nacl.signing.VerifyKey(r.author.key), RECORD_DOMAIN + cbor.encode(r.payload_map()), r.sig


async def _ingest_records(store: Store, cid: bytes, raws: list[bytes], verifier: ParallelVerifier | None) -> int:
    n = 0
    for i in range(0, len(raws), RECORDS_PER_BATCH):
        recs = decode_records(raws[i:i + RECORDS_PER_BATCH], batch_verifier=verifier)
        now = int(time.time() * 1000)
        async with store.batch() as tx:
            tx.put_records(recs, now)
            tx.add_pending(cid, [r.id for r in recs], now)
        n += len(recs)
    return n


async def _ingest_blocks(store: Store, raws: list[bytes], verifier: ParallelVerifier | None) -> int:
    n = 0
    for i in range(0, len(raws), BLOCKS_PER_BATCH):
        blocks = decode_blocks(raws[i:i + BLOCKS_PER_BATCH], batch_verifier=verifier)
        async with store.batch(durable=False) as tx:
            tx.put_blocks(blocks, int(time.time() * 1000))
        n += sum(len(b.records) for b in blocks)
    return n


def run(full: bool) -> dict[str, Any]:
    """Both ways in turn; pins this process to one core for the first."""
    total = 40_960 if full else 10_240
    slices = 20 if full else 10
    before = os.sched_getaffinity(0) if hasattr(os, "sched_setaffinity") else None
    _pin_one_core()
    try:
        out = asyncio.run(_measure(total, slices, None))
    finally:
        if before is not None:
            os.sched_setaffinity(0, before)
    cores = usable_cores()
    verifier = ParallelVerifier(cores)
    try:
        out["all_cores"] = {"cores": cores, **asyncio.run(_measure(total, slices, verifier))}
    finally:
        verifier.close()
    return out


if __name__ == "__main__":
    import json
    import sys
    print(json.dumps(run("--full" in sys.argv), indent=2))
