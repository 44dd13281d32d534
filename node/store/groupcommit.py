"""Group commit: every batch queued while a transaction runs shares the next one, each in its
own SAVEPOINT, so one fsync serves many callers and a failing batch is undone alone.

`StoreCore._apply` queues and waits; the functions here run one group and settle its callers.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Final, cast

from valuemesh.node import trace
from valuemesh.node.store.apply import Apply, NowDb, Op
from valuemesh.node.store.errors import StoreError, store_error
from valuemesh.node.store.rows import BatchResult

# Batches one group commit may take: bounds the time one transaction holds the write lock.
MAX_GROUP: Final = 64
# A small group commit (at most this many items: blocks + records + ids) that does not
# fsync runs on the event loop's own thread: its statements take a few tenths of a
# millisecond, less than handing it to the writer thread costs on a busy host (a thread
# switch and a contended GIL each way). A durable one waits for an fsync (0.5 ms idle, 2-7
# ms with four daemons fsyncing on one disk); it runs on the writer thread, so the loop
# keeps reading peers and API requests meanwhile and what they queue shares the next fsync,
# unless the batch is `urgent` (our block of a round: the round waits for it, nothing
# would share it). Measured back to back (4 daemons, this 2-core host): durable commits
# inline gave the better light-load latency (p50 56, 67 vs 63, 80 ms) and on the thread
# the better one-record-per-request throughput (439-554 vs 321-348 records/s).
# Large groups (catch-up batches) always run on the writer thread.
INLINE_MAX_ITEMS: Final = 64


@dataclass(eq=False, slots=True)
class Queued:
    """A batch waiting for the next group commit, and the future its caller awaits."""

    ops: list[Op]
    durable: bool
    done: asyncio.Future[BatchResult]
    items: int = 0
    urgent: bool = False


def _now(coro: Coroutine[Any, Any, BatchResult]) -> BatchResult:
    """Run a coroutine that never suspends (its awaits are all NowDb calls) to its result."""
    try:
        coro.send(None)
    except StopIteration as done:
        return cast(BatchResult, done.value)
    coro.close()
    raise StoreError("A store operation waited inside a transaction; it was undone.")


def commit_group_now(conn: sqlite3.Connection, groups: list[list[Op]],
                     pragma: str | None) -> list[BatchResult | Exception]:
    """One group commit, run on the writer's thread (see StoreCore._apply for the semantics).
    Returns each batch's result or error; raises if the transaction as a whole failed."""
    if pragma is not None:
        conn.execute(f"PRAGMA synchronous = {pragma}")
    t0 = time.monotonic()
    conn.execute("BEGIN IMMEDIATE")
    db = NowDb(conn)
    results: list[BatchResult | Exception] = []
    try:
        if len(groups) == 1:
            # Alone, the batch is the transaction: no savepoints needed.
            results.append(_now(Apply(db).run(groups[0])))
        else:
            for ops in groups:
                conn.execute("SAVEPOINT batch")
                try:
                    results.append(_now(Apply(db).run(ops)))
                except Exception as e:
                    conn.execute("ROLLBACK TO batch")
                    results.append(e)
                conn.execute("RELEASE batch")
        t1 = time.monotonic()
        conn.execute("COMMIT")
        tr = trace.tracer
        if tr is not None:
            t2 = time.monotonic()
            sync = conn.execute("PRAGMA synchronous").fetchone()[0]
            tr.event("txn", work=t1 - t0, commit=t2 - t1, sync=sync, n=len(groups))
    except BaseException:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # SQLite already rolled back (e.g. after SQLITE_FULL)
        raise
    return results


def fail_all(group: list[Queued], e: BaseException) -> None:
    for q in group:
        if not q.done.done():
            if isinstance(e, Exception):
                q.done.set_exception(store_error(e))
            else:
                q.done.set_exception(StoreError("The write was interrupted and changed nothing."))
