"""Subprocess for the store's crash test: writes batches forever and reports each commit.

Run as `python store_writer.py DB SEED [--count N]`. After every transaction that extends the
final order commits, it prints `commit INDEX` lines and flushes, so whatever the parent read is a
lower bound of what must survive a SIGKILL at any instant. It also signs one record of its own per
loop with a reserved seq and prints `sent SEQ ID` *before* storing it, as if gossiped at once: the
parent checks that no seq was ever signed twice with different content.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys

from valuemesh.node.store import CommitEntry, ConstellationInfo, Store
from valuemesh.protocol.identity import Identity
from valuemesh.protocol.records import Block, Record

CONSTELLATION = bytes(range(32))
AUTHORS = tuple(Identity(bytes([i + 1]) * 32) for i in range(4))
LOCAL = Identity(bytes([9]) * 32)
RECORDS_PER_BLOCK = 12
# Seqs are spaced by block index so a block rewritten after a crash carries identical records.
SEQ_STRIDE = 100


def block_for(index: int) -> Block:
    """The deterministic block at final index `index`: the same bytes in every run."""
    author = AUTHORS[index % len(AUTHORS)]
    records = [
        Record.create(
            author,
            type="contribution",
            v=1,
            constellation=CONSTELLATION,
            seq=index * SEQ_STRIDE + j,
            body={"i": index, "j": j, "pad": "x" * 64},
            created=1_700_000_000_000 + index,
        )
        for j in range(RECORDS_PER_BLOCK)
    ]
    return Block.create(
        author,
        constellation=CONSTELLATION,
        epoch=0,
        round=index,
        prev=None,
        parents=[],
        records=records,
        created=1_700_000_000_000 + index,
    )


async def run(path: str, seed: int, count: int | None) -> None:
    rng = random.Random(seed)
    store = await Store.open(path)
    try:
        async with store.batch() as tx:
            tx.put_constellation(ConstellationInfo(CONSTELLATION, b"crash-test genesis", 1, "active", "core"))
        index = await store.commit_count(CONSTELLATION)
        written = 0
        while count is None or written < count:
            blocks = [block_for(index + k) for k in range(rng.randint(1, 3))]
            # Our own record: reserve the seq durably, sign fresh content, "gossip", then store.
            seq = await store.reserve_seq(CONSTELLATION, LOCAL.member)
            own = Record.create(
                LOCAL,
                type="contribution",
                v=1,
                constellation=CONSTELLATION,
                seq=seq,
                body={"nonce": os.urandom(8)},
                created=1_700_000_000_000 + index,
            )
            sys.stdout.write(f"sent {seq} {own.id.hex()}\n")
            sys.stdout.flush()
            # A proposed record goes pending first, as the node does, in its own commit.
            mine = blocks[0].records[0]
            async with store.batch() as tx:
                tx.put_records([mine, own], received_at=index)
                tx.add_pending(CONSTELLATION, [mine.id, own.id], added_at=index)
            async with store.batch() as tx:
                for b in blocks:
                    tx.put_block(b, received_at=index)
                tx.append_commits(
                    CONSTELLATION,
                    [CommitEntry(index + k, b.id, b.round) for k, b in enumerate(blocks)],
                )
            for k in range(len(blocks)):
                sys.stdout.write(f"commit {index + k}\n")
            sys.stdout.flush()
            index += len(blocks)
            written += len(blocks)
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("seed", type=int)
    parser.add_argument("--count", type=int, default=None)
    args = parser.parse_args()
    asyncio.run(run(args.db, args.seed, args.count))


if __name__ == "__main__":
    main()
