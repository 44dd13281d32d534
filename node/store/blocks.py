"""Reads of stored blocks: by id, by round, page by page (decoded or raw) and per-author heads.

Pages are bounded by count and by raw bytes, so memory stays bounded however large the blocks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from valuemesh.node.store.checks import MAX_PAGE, MAX_PAGE_BYTES, check_ids, check_limit, check_position, chunks
from valuemesh.node.store.codec import decode_stored_block
from valuemesh.node.store.core import StoreCore
from valuemesh.node.store.rows import StoredBlock
from valuemesh.protocol.identity import MemberId
from valuemesh.protocol.records import Block


class BlockReads(StoreCore):
    """The blocks table (and its indexes by round, author and epoch)."""

    async def get_block(self, block_id: bytes) -> Block | None:
        rows = await self._rows("SELECT raw FROM blocks WHERE id = ?", (block_id,))
        return decode_stored_block(rows[0][0], block_id) if rows else None

    async def get_blocks(self, block_ids: Sequence[bytes]) -> dict[bytes, Block]:
        """Blocks by id; ids that are not stored are absent from the result."""
        out: dict[bytes, Block] = {}
        for chunk in chunks(check_ids(block_ids), 500):
            marks = ",".join("?" * len(chunk))
            for bid, raw in await self._rows(f"SELECT id, raw FROM blocks WHERE id IN ({marks})", chunk):
                out[bytes(bid)] = decode_stored_block(raw, bytes(bid))
        return out

    async def get_raw_blocks(self, constellation: bytes, block_ids: Sequence[bytes]) -> list[bytes]:
        """The stored bytes of the constellation's blocks with these ids, in the order asked
        (each once), without decoding.

        For answering a peer's request for blocks by id: the peer decodes and verifies every
        block it takes (decoding a large block here first cost more than sending it). As with
        `iter_raw_blocks`, on-disk corruption reaches the peer, which refuses it."""
        found: dict[bytes, bytes] = {}
        for chunk in chunks(check_ids(block_ids), 500):
            marks = ",".join("?" * len(chunk))
            for bid, raw in await self._rows(
                    f"SELECT id, raw FROM blocks WHERE constellation = ? AND id IN ({marks})", (constellation, *chunk)):
                found[bytes(bid)] = bytes(raw)
        return [found[i] for i in dict.fromkeys(block_ids) if i in found]

    async def has_blocks(self, block_ids: Sequence[bytes]) -> set[bytes]:
        out: set[bytes] = set()
        for chunk in chunks(check_ids(block_ids), 500):
            marks = ",".join("?" * len(chunk))
            out.update(bytes(r[0]) for r in await self._rows(f"SELECT id FROM blocks WHERE id IN ({marks})", chunk))
        return out

    async def blocks(
        self,
        constellation: bytes,
        *,
        from_round: int = 0,
        to_round: int | None = None,
        author: MemberId | None = None,
        limit: int = MAX_PAGE,
        max_bytes: int | None = None,
    ) -> list[Block]:
        """Blocks with from_round <= round <= to_round, ordered by (round, author, id).

        With `max_bytes`, the list also ends before the block that would take the total of raw
        sizes past it (but always holds at least one block), bounding memory for large blocks.
        """
        check_limit(limit)
        check_position(from_round, to_round, max_bytes)
        where = "constellation = ? AND round >= ?"
        params: list[Any] = [constellation, from_round]
        if to_round is not None:
            where += " AND round <= ?"
            params.append(to_round)
        if author is not None:
            where += " AND author = ?"
            params.append(author.key)
        rows = _sorted_page(await self._rows(_budgeted(where), [*params, limit, max_bytes, max_bytes]))
        return [decode_stored_block(raw, bytes(bid)) for _, _, bid, raw in rows]

    async def iter_blocks(
        self, constellation: bytes, *, from_round: int = 0, epoch: int | None = None, page: int = 500
    ) -> AsyncIterator[Block]:
        """Every block from `from_round` on (of `epoch` only, if given), in (round, author, id)
        order, read page by page.

        A page holds at most `page` blocks and `MAX_PAGE_BYTES` of raw bytes, so memory stays
        bounded however large the blocks are.
        """
        async for _rnd, _author, bid, raw in self._block_rows(constellation, from_round, epoch, page, ""):
            yield decode_stored_block(raw, bytes(bid))

    async def iter_raw_blocks(
        self, constellation: bytes, *, from_round: int = 0, epoch: int | None = None, page: int = 500
    ) -> AsyncIterator[StoredBlock]:
        """`iter_blocks` without decoding: each block's slot and its bytes as stored.

        For relaying blocks to a peer (catch-up streams), which decodes and verifies every
        block it takes: decoding each one here as well, every record of it included, was
        most of a streaming peer's CPU. Unlike every other read, the bytes are not checked
        against the block's id, so on-disk corruption reaches the peer, which refuses it.
        """
        async for rnd, author, _bid, raw, ep in self._block_rows(constellation, from_round, epoch, page, ", b.epoch"):
            yield StoredBlock(int(ep), MemberId(bytes(author)), int(rnd), bytes(raw))

    async def _block_rows(
        self, constellation: bytes, from_round: int, epoch: int | None, page: int, extra: str
    ) -> AsyncIterator[Any]:
        """The rows of `iter_blocks`, page by page: (round, author, id, raw[, extra columns])."""
        check_limit(page)
        check_position(from_round)
        where = "constellation = ? AND (round, author, id) > (?, ?, ?)"
        scope: tuple[Any, ...] = (constellation,)
        if epoch is not None:
            check_position(epoch)
            where = "constellation = ? AND epoch = ? AND (round, author, id) > (?, ?, ?)"
            scope = (constellation, epoch)
        key: tuple[int, bytes, bytes] = (from_round, b"", b"")
        while True:
            rows = _sorted_page(
                await self._rows(
                    _budgeted(where, extra=extra),
                    (*scope, *key, page, MAX_PAGE_BYTES, MAX_PAGE_BYTES),
                )
            )
            if not rows:
                return
            for row in rows:
                yield row
                key = (int(row[0]), bytes(row[1]), bytes(row[2]))

    async def heads(self, constellation: bytes, from_epoch: int = 0) -> dict[tuple[MemberId, int], int]:
        """Per author and epoch (from `from_epoch` on), the highest stored round: what a peer
        needs to say what we miss. Rounds restart at each epoch's first round."""
        check_position(from_epoch)
        # Loose index scans on blocks_by_epoch: hop from epoch to epoch, then from author to
        # author, and read each one's maximum, so the cost grows with epochs x authors, not
        # with blocks.
        epochs = await self._rows(
            "WITH RECURSIVE e(epoch) AS ("
            " SELECT MIN(epoch) FROM blocks WHERE constellation = ?1 AND epoch >= ?2"
            " UNION ALL"
            " SELECT (SELECT MIN(epoch) FROM blocks WHERE constellation = ?1 AND epoch > e.epoch)"
            " FROM e WHERE e.epoch IS NOT NULL)"
            " SELECT epoch FROM e WHERE epoch IS NOT NULL",
            (constellation, from_epoch),
        )
        out: dict[tuple[MemberId, int], int] = {}
        for (epoch,) in epochs:
            rows = await self._rows(
                "WITH RECURSIVE a(author) AS ("
                " SELECT MIN(author) FROM blocks WHERE constellation = ?1 AND epoch = ?2"
                " UNION ALL"
                " SELECT (SELECT MIN(author) FROM blocks WHERE constellation = ?1 AND epoch = ?2"
                " AND author > a.author) FROM a WHERE a.author IS NOT NULL)"
                " SELECT author, (SELECT MAX(round) FROM blocks WHERE constellation = ?1 AND epoch = ?2"
                " AND author = a.author) FROM a WHERE author IS NOT NULL",
                (constellation, int(epoch)),
            )
            out.update({(MemberId(bytes(a)), int(epoch)): int(r) for a, r in rows})
        return out

    async def block_count(self, constellation: bytes) -> int:
        rows = await self._rows("SELECT COUNT(*) FROM blocks WHERE constellation = ?", (constellation,))
        return int(rows[0][0])


def _budgeted(where: str, extra: str = "") -> str:
    """A page of blocks matching `where`, cut by count, then by bytes (parameters: limit, budget, budget);
    each row is (round, author, id, raw) and then the `extra` columns of `b`.

    The inner query reads only each row's length (SQLite gets it from the record header, not
    the blob), so rows past the byte budget are never loaded. A NULL budget means no byte cut.
    """
    return (
        f"SELECT b.round, b.author, b.id, b.raw{extra} FROM (SELECT id, "
        "SUM(length(raw)) OVER (ORDER BY round, author, id ROWS UNBOUNDED PRECEDING) - length(raw) AS before "
        f"FROM blocks WHERE {where} ORDER BY round, author, id LIMIT ?) p "
        "JOIN blocks b ON b.id = p.id WHERE ? IS NULL OR p.before = 0 OR p.before < ?"
    )


def _sorted_page(rows: list[Any]) -> list[Any]:
    # Sorting here, not in SQL, spares SQLite copying every raw blob through a sorter.
    return sorted(rows, key=lambda r: (int(r[0]), bytes(r[1]), bytes(r[2])))
