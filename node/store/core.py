"""The store's core: its two connections, the lock file, the write lock and group commit, and
the read helper every domain's reads build on (as Synapse's SQLBaseStore under its stores).

`Store` (the package's front) is this core with one read mixin per domain on top.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import IO, Any, Self

from valuemesh.node.store.apply import Op
from valuemesh.node.store.batch import Batch
from valuemesh.node.store.checks import is_uint, need
from valuemesh.node.store.connection import (
    BUSY_TIMEOUT_MS,
    SYNCHRONOUS_MODES,
    Db,
    connect,
    create_private,
    lock_file,
    rollback,
    tighten_modes,
    tune,
    use_wal,
)
from valuemesh.node.store.errors import StoreError, plain_sqlite_error, store_error
from valuemesh.node.store.groupcommit import INLINE_MAX_ITEMS, MAX_GROUP, Queued, commit_group_now, fail_all
from valuemesh.node.store.rows import BatchResult
from valuemesh.node.store.schema import check_file, migrate


class StoreCore:
    """What every part of the store shares; open with `await Store.open(path)`, close with `await close()`."""

    def __init__(self, path: Path, writer: Db, reader: Db, synchronous: str, lock: IO[bytes]) -> None:
        self.path = path
        self._lock = lock
        self._writer = writer
        self._reader = reader
        self._synchronous = synchronous
        self._write_lock = asyncio.Lock()
        self._queue: list[Queued] = []
        self._sync_now: str | None = synchronous
        self._closed = False

    # lifecycle ----------------------------------------------------------------------
    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        synchronous: str = "FULL",
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
        now_ms: int | None = None,
    ) -> Self:
        """Open (creating or migrating) the database at `path`.

        Another program's SQLite file, or a damaged one (`PRAGMA quick_check`), is refused
        before anything writes to it (NotOurDatabaseError, StoreDamagedError).

        `synchronous="FULL"` (the default) makes every committed batch survive power loss;
        "NORMAL" survives process crashes only (see docs/storage.md). `now_ms` stamps applied
        migrations and defaults to the wall clock.
        """
        mode = synchronous.upper()
        need(mode in SYNCHRONOUS_MODES, "synchronous must be FULL or NORMAL.")
        need(is_uint(busy_timeout_ms), "The busy timeout must be a non-negative integer.")
        p = Path(path)
        if str(path) == ":memory:" or not p.parent.is_dir():
            raise StoreError(f"The database must be a file in an existing directory, not '{path}'.")
        lock = lock_file(p)
        try:
            create_private(p)
            writer = await connect(p, busy_timeout_ms)
        except BaseException:
            lock.close()
            raise
        try:
            await check_file(writer, p)
            tighten_modes(p)
            await use_wal(writer, p)
            await tune(writer, p, mode)
            await migrate(writer, p, now_ms if now_ms is not None else int(time.time() * 1000))
            reader = await connect(p, busy_timeout_ms)
        except BaseException:
            await writer.close()
            lock.close()
            raise
        try:
            await tune(reader, p, mode)
        except BaseException:
            await reader.close()
            await writer.close()
            lock.close()
            raise
        return cls(p, writer, reader, mode, lock)

    async def close(self) -> None:
        """Write the batches already waiting, then close; later batches raise StoreError."""
        if self._closed:
            return
        async with self._write_lock:
            # Waiting in line for the lock lets the batches queued before us commit first.
            if self._closed:
                return
            self._closed = True
            try:
                # Keep the WAL short for the next start; PASSIVE never blocks a reader.
                await self._writer.execute("PRAGMA optimize")
                await self._writer.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error:
                pass  # closing must still release both connections
            finally:
                try:
                    await self._reader.close()
                    await self._writer.close()
                finally:
                    self._lock.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # writing -------------------------------------------------------------------------
    def batch(self, *, durable: bool = True, urgent: bool = False) -> Batch:
        """Queue writes and apply them in one transaction at the end of `async with`.

        `durable=False` commits with synchronous=NORMAL: safe against a process crash but it
        may be lost on power failure until the next durable commit. Use it only for data that
        can be fetched again or re-derived (blocks from peers, peer addresses, commit
        entries), never for our own blocks or records, or sequence numbers.

        `urgent=True` lets a small durable batch commit on the event loop's thread, fsync
        included: for a write the caller's next step waits on and that little else would
        share (our block of a round). See groupcommit.INLINE_MAX_ITEMS.
        """
        self._check_open()
        return Batch(self._apply, durable, urgent)

    async def _apply(self, ops: list[Op], durable: bool, items: int = 0,
                     urgent: bool = False) -> BatchResult:
        """Group commit: whoever holds the write lock commits every batch queued meanwhile.

        Each batch runs inside its own SAVEPOINT, so a batch that fails is undone alone and its
        caller gets the error while the others commit; all of them share one COMMIT (one fsync).
        Every caller returns only after the transaction holding its batch has committed.
        """
        self._check_open()
        item = Queued(ops, durable, asyncio.get_running_loop().create_future(), items, urgent)
        self._queue.append(item)
        try:
            async with self._write_lock:
                while not item.done.done():
                    group, self._queue = self._queue[:MAX_GROUP], self._queue[MAX_GROUP:]
                    if self._closed:
                        fail_all(group, StoreError("The store was closed before the batch was written."))
                    else:
                        await self._commit_group(group)
        except asyncio.CancelledError:
            if item in self._queue:
                self._queue.remove(item)  # never applied: cancelling leaves no trace
            elif item.done.done() and not item.done.cancelled():
                item.done.exception()  # consumed here: the caller sees CancelledError instead
            raise
        return await item.done

    async def _commit_group(self, group: list[Queued]) -> None:
        # The whole transaction is one call on the writer's thread: awaiting each statement
        # would cost a thread hop and an event-loop wake-up per statement (about ten per
        # block), which on a busy host made a one-block commit take 3-5 ms.
        want = self._synchronous if any(q.durable for q in group) else "NORMAL"
        pragma = want if want != self._sync_now else None
        ops = [q.ops for q in group]
        small = sum(q.items for q in group) <= INLINE_MAX_ITEMS
        if small and (want == "NORMAL" or all(q.urgent for q in group if q.durable)):
            # The writer's thread is idle: every use of the writer connection holds _write_lock.
            try:
                results = commit_group_now(self._writer._conn, ops, pragma)
            except BaseException as e:
                self._sync_now = None
                fail_all(group, e)
                if not isinstance(e, Exception):
                    raise
                return
            self._sync_now = want
            self._settle(group, results)
            return
        job = asyncio.ensure_future(
            self._writer._execute(commit_group_now, self._writer._conn, ops, pragma)  # type: ignore[no-untyped-call]
        )
        cancelled = False
        while not job.done():
            # Once handed to the thread the transaction runs to its end: wait for it so that
            # every caller learns what really happened, then let the cancellation through.
            try:
                await asyncio.shield(job)
            except asyncio.CancelledError:
                cancelled = True
            except BaseException:
                break
        failure = job.exception()
        if failure is not None:
            self._sync_now = None  # unknown whether the pragma ran
            fail_all(group, failure)
        else:
            self._sync_now = want
            self._settle(group, job.result())
        if cancelled:
            raise asyncio.CancelledError

    @staticmethod
    def _settle(group: list[Queued], results: list[BatchResult | Exception]) -> None:
        for q, r in zip(group, results, strict=True):
            if isinstance(r, BaseException):
                q.done.set_exception(store_error(r))
            else:
                q.done.set_result(r)

    async def _set_sync(self, durable: bool) -> None:
        want = self._synchronous if durable else "NORMAL"
        if want != self._sync_now:
            await self._writer.execute(f"PRAGMA synchronous = {want}")
            self._sync_now = want

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Db]:
        """The writer alone in one durable `BEGIN IMMEDIATE … COMMIT`, outside group commit, for
        a write that must read what it writes; anything raised inside rolls it back."""
        self._check_open()
        async with self._write_lock:
            await self._set_sync(True)
            db = self._writer
            await db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                await db.execute("COMMIT")
            except BaseException:
                await rollback(db)
                raise

    # reading -------------------------------------------------------------------------
    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        self._check_open()
        try:
            return list(await self._reader.execute_fetchall(sql, params))
        except sqlite3.Error as e:
            raise StoreError(f"The database could not be read: {plain_sqlite_error(e)}.") from None

    async def schema_version(self) -> int:
        rows = await self._rows("SELECT MAX(version) FROM schema_version")
        return int(rows[0][0])

    async def integrity_check(self) -> list[str]:
        """Run SQLite's integrity and foreign-key checks; an empty list means healthy."""
        problems = [str(r[0]) for r in await self._rows("PRAGMA integrity_check")]
        problems = [p for p in problems if p != "ok"]
        fk = await self._rows("PRAGMA foreign_key_check")
        problems += [f"row {r[1]} of {r[0]} refers to a missing row of {r[2]}" for r in fk]
        return problems

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("The store is closed.")
