"""Benchmark: signed records decoded and verified per second on one core,
next to raw PyNaCl VerifyKey.verify calls per second measured in the same run.

Run: .venv/bin/python bench/protocol.py [--records N] [--repeats R]
The target is a ratio of at least 0.8: decoding must cost little next to Ed25519.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import nacl
import nacl.signing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/ siblings, however this runs
from machine import cpu_model

from valuemesh.protocol import cbor
from valuemesh.protocol.identity import Identity
from valuemesh.protocol.records import (
    RECORD_DOMAIN,
    Block,
    Record,
    decode_block,
    decode_record,
    decode_record_reference,
    decode_records,
)

DEFAULT_RECORDS = 2000
DEFAULT_REPEATS = 7
N_AUTHORS = 16
SLICES = 10
BATCH = 128  # records per SubmitRecords message (the daemon's SYNC_BATCH)


def make_records(n: int) -> list[Record]:
    """Typical contribution records from several authors (fixed seeds: reproducible bytes)."""
    ids = [Identity(hashlib.blake2b(b"bench-%d" % i, digest_size=32).digest()) for i in range(N_AUTHORS)]
    cid = hashlib.blake2b(b"bench-constellation", digest_size=32).digest()
    out = []
    for k in range(n):
        body = {
            "op": "record",
            "action": "work",
            "quantity": f"{1 + k % 40}.5",
            "unit": "hour",
            "note": f"design review, iteration {k}",
            "period": {"start": 1_700_000_000_000 + k, "end": 1_700_000_360_000 + k},
        }
        out.append(Record.create(ids[k % N_AUTHORS], type="contribution", v=1, constellation=cid,
                                 seq=k // N_AUTHORS, body=body, created=1_700_000_000_000 + k))
    return out


def rate(fn: Callable[[], int], repeats: int) -> tuple[float, list[float]]:
    """Median operations per second of `fn` (which returns how many it did) over repeats.

    Time is this process's CPU time, so other processes on a shared machine
    that preempt us do not count against either side of the ratio.
    """
    rates = []
    for _ in range(repeats):
        t0 = time.process_time()
        n = fn()
        rates.append(n / max(time.process_time() - t0, 1e-9))
    return statistics.median(rates), rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=int, default=DEFAULT_RECORDS)
    ap.add_argument("--repeats", type=int, default=DEFAULT_REPEATS)
    args = ap.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the target says

    records = make_records(args.records)
    raws = [r.raw for r in records]
    # The raw baseline verifies the very same messages and signatures the records carry.
    signed = [(nacl.signing.VerifyKey(r.author.key), RECORD_DOMAIN + _payload(r), r.sig) for r in records]
    size = statistics.mean(len(r) for r in raws)

    slice_n = max(1, len(raws) // SLICES)
    cursor = [0]

    def raw_verify_slice() -> int:
        i = cursor[0]
        for vk, msg, sig in signed[i : i + slice_n]:
            vk.verify(msg, sig)
        return len(signed[i : i + slice_n])

    def decode_verify_slice() -> int:
        i = cursor[0]
        for raw in raws[i : i + slice_n]:
            decode_record(raw)
        cursor[0] = (i + slice_n) % len(raws)
        return len(raws[i : i + slice_n])

    def reference_verify_slice() -> int:
        # The pure-Python decoder alone (what decode_record did before cbor2), same slice.
        i = cursor[0]
        for raw in raws[i : i + slice_n]:
            decode_record_reference(raw)
        return len(raws[i : i + slice_n])

    def batch_verify_slice() -> int:
        # The same records through decode_records, in batches of a SubmitRecords message.
        i = cursor[0]
        todo = raws[i : i + slice_n]
        for j in range(0, len(todo), BATCH):
            decode_records(todo[j : j + BATCH])
        return len(todo)

    def decode_only() -> int:
        for raw in raws:
            decode_record(raw, verify=False)
        return len(raws)

    ident = Identity(hashlib.blake2b(b"bench-block", digest_size=32).digest())
    block = Block.create(ident, constellation=records[0].constellation, epoch=0, round=1, prev=None,
                         parents=[], records=records[:1000], created=1_700_000_000_000)
    braw = block.raw

    def block_verify() -> int:
        decode_block(braw)
        return len(block.records)

    # Interleave the two main measurements in short slices so load from other
    # processes on a shared machine hits both alike; the ratio is the median of
    # the per-slice ratios, the rates the medians of the slices.
    raw_rates: list[float] = []
    rec_rates: list[float] = []
    ref_rates: list[float] = []
    batch_rates: list[float] = []
    ratios: list[float] = []
    ref_ratios: list[float] = []
    batch_ratios: list[float] = []
    for _ in range(args.repeats * SLICES):
        a = rate(raw_verify_slice, 1)[0]
        c = rate(reference_verify_slice, 1)[0]
        d = rate(batch_verify_slice, 1)[0]
        b = rate(decode_verify_slice, 1)[0]
        raw_rates.append(a)
        rec_rates.append(b)
        ref_rates.append(c)
        batch_rates.append(d)
        ratios.append(b / a)
        ref_ratios.append(c / a)
        batch_ratios.append(d / a)
    raw_med = statistics.median(raw_rates)
    rec_med = statistics.median(rec_rates)
    ref_med = statistics.median(ref_rates)
    ratio = statistics.median(ratios)
    ref_ratio = statistics.median(ref_ratios)
    batch_med = statistics.median(batch_rates)
    batch_ratio = statistics.median(batch_ratios)
    dec_med, _ = rate(decode_only, args.repeats)
    blk_med, _ = rate(block_verify, max(3, args.repeats // 2))

    print(f"platform   {platform.platform()}")
    print(f"cpu        {cpu_model()} (pinned to one core)")
    print(f"python     {sys.version.split()[0]} ({platform.python_implementation()})")
    print(f"pynacl     {nacl.__version__}")
    print(f"records    {len(raws)} x {size:.0f} bytes, {args.repeats} repeats, medians")
    print(f"raw VerifyKey.verify        {raw_med:10.0f} /s")
    print(f"decode_record (verify)      {rec_med:10.0f} /s")
    print(f"  pure-Python reference     {ref_med:10.0f} /s   (ratio {ref_ratio:.3f})")
    print(f"decode_records, {BATCH} a call  {batch_med:10.0f} /s   (ratio {batch_ratio:.3f})")
    print(f"decode_record (no verify)   {dec_med:10.0f} /s")
    print(f"decode_block of 1000 (all)  {blk_med:10.0f} records/s")
    print(f"ratio decode+verify / raw   {ratio:10.3f}   (target >= 0.8; one record a call)")


def _payload(r: Record) -> bytes:
    return cbor.encode(r.payload_map())


if __name__ == "__main__":
    main()
