"""Reads of the final order: commits, where this node's order begins, and the final records in
ledger order; and the rebuild of the tables derived from it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from valuemesh.node.store.blocks import BlockReads
from valuemesh.node.store.checks import MAX_PAGE, check_limit, check_position
from valuemesh.node.store.codec import decode_stored_record
from valuemesh.node.store.errors import StoreError
from valuemesh.node.store.rows import CommitEntry, FinalRecord
from valuemesh.node.store.schema import derive


class OrderReads(BlockReads):
    """The commits and final_records tables (a final record may be read from its block)."""

    async def rebuild_derived(self) -> None:
        """Recompute block_records and final_records from blocks and commits in one transaction.

        A repair tool: these tables are derived, so rebuilding them loses nothing.
        """
        async with self._transaction() as db:
            await db.execute("DELETE FROM final_records")
            await db.execute("DELETE FROM block_records")
            await derive(db)

    async def commit_count(self, constellation: bytes) -> int:
        """How many blocks are final; also the index the next commit must carry."""
        rows = await self._rows(
            "SELECT MAX(COALESCE((SELECT MAX(idx) + 1 FROM commits WHERE constellation = ?1), 0), "
            "COALESCE((SELECT MAX(commit_idx) FROM snapshots WHERE constellation = ?1), 0))", (constellation,)
        )
        return int(rows[0][0])

    async def holds_order_to(self, constellation: bytes, end: int) -> bool:
        """Whether the final order from 0 to `end` (exclusive) is all here."""
        rows = await self._rows("SELECT COUNT(*) FROM commits WHERE constellation = ? AND idx < ?",
                                (constellation, end))
        return int(rows[0][0]) == end

    async def first_commit_index(self, constellation: bytes) -> int | None:
        """The index of the first commit held (0, or a snapshot's for a node started from
        one); None if none."""
        rows = await self._rows("SELECT MIN(idx) FROM commits WHERE constellation = ?", (constellation,))
        return None if rows[0][0] is None else int(rows[0][0])

    async def commits(self, constellation: bytes, *, start: int = 0, limit: int = MAX_PAGE) -> list[CommitEntry]:
        """The final order from index `start`, one page."""
        check_limit(limit)
        check_position(start)
        rows = await self._rows(
            "SELECT idx, block_id, anchor_round FROM commits WHERE constellation = ? AND idx >= ? ORDER BY idx LIMIT ?",
            (constellation, start, limit),
        )
        return [CommitEntry(int(i), bytes(b), int(r)) for i, b, r in rows]

    async def iter_commits(
        self, constellation: bytes, *, start: int = 0, page: int = 2_000
    ) -> AsyncIterator[CommitEntry]:
        """The whole final order from `start`, e.g. for Consensus.restore after a restart."""
        while True:
            entries = await self.commits(constellation, start=start, limit=page)
            for e in entries:
                yield e
            if len(entries) < page:
                return
            start = entries[-1].index + 1

    async def final_records(self, constellation: bytes, *, start: int = 0, limit: int = MAX_PAGE) -> list[FinalRecord]:
        """Final records in ledger order from commit index `start`, each once (first commit wins)."""
        check_limit(limit)
        check_position(start)
        rows = await self._rows(
            "SELECT f.commit_idx, f.pos, f.record_id, r.raw, c.block_id FROM final_records f "
            "JOIN commits c ON c.constellation = f.constellation AND c.idx = f.commit_idx "
            "LEFT JOIN records r ON r.id = f.record_id "
            "WHERE f.constellation = ? AND f.commit_idx >= ? ORDER BY f.commit_idx, f.pos LIMIT ?",
            (constellation, start, limit),
        )
        out: list[FinalRecord] = []
        for idx, pos, rid, raw, bid in rows:
            if raw is not None:
                record = decode_stored_record(raw, bytes(rid))
            else:
                # The record lost its slot to an equivocating twin: read it from its block.
                block = await self.get_block(bytes(bid))
                if block is None:
                    raise StoreError("A committed block is missing from the store.")
                record = block.records[int(pos)]
            out.append(FinalRecord(int(idx), int(pos), record))
        return out
