"""Reads of records and their state: by id, pending here or final, per-author seqs (the
durable seq reservation and the floor a restored store must not go below), and the
equivocation evidence kept instead of a twin record.
"""

from __future__ import annotations

from collections.abc import Sequence

from valuemesh.node.store.checks import MAX_PAGE, check_hash, check_ids, check_limit, chunks, is_uint, need
from valuemesh.node.store.codec import decode_proof, decode_stored_record
from valuemesh.node.store.connection import Db
from valuemesh.node.store.core import StoreCore
from valuemesh.node.store.rows import Equivocation
from valuemesh.protocol.identity import MemberId
from valuemesh.protocol.records import Record


class RecordReads(StoreCore):
    """The records, pending and equivocations tables, and the seq counters in kv."""

    async def reserve_seq(self, constellation: bytes, author: MemberId) -> int:
        """Durably reserve the next record seq for `author` before signing with it.

        Reserving first means a crash between signing and storing can never lead us to sign
        a second, different record with the same seq (an equivocation).
        """
        check_hash(constellation, "A constellation id")
        async with self._transaction() as db:
            seq = await _next_seq(db, constellation, author)
            await db.execute(
                "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (_seq_key(constellation, author), (seq + 1).to_bytes(8, "big")),
            )
        return seq

    async def get_record(self, record_id: bytes) -> Record | None:
        rows = await self._rows("SELECT raw FROM records WHERE id = ?", (record_id,))
        return decode_stored_record(rows[0][0], record_id) if rows else None

    async def get_records(self, record_ids: Sequence[bytes]) -> dict[bytes, Record]:
        out: dict[bytes, Record] = {}
        for chunk in chunks(check_ids(record_ids), 500):
            marks = ",".join("?" * len(chunk))
            for rid, raw in await self._rows(f"SELECT id, raw FROM records WHERE id IN ({marks})", chunk):
                out[bytes(rid)] = decode_stored_record(raw, bytes(rid))
        return out

    async def record_status(self, record_id: bytes) -> str | None:
        """ "final", "pending" (proposed here, not final), "known" (stored) or None."""
        rows = await self._rows(
            "SELECT EXISTS (SELECT 1 FROM final_records WHERE record_id = ?), "
            "EXISTS (SELECT 1 FROM pending WHERE record_id = ?), "
            "EXISTS (SELECT 1 FROM records WHERE id = ?)",
            (record_id, record_id, record_id),
        )
        final, pending, known = rows[0]
        return "final" if final else "pending" if pending else "known" if known else None

    async def pending(self, constellation: bytes, *, limit: int = MAX_PAGE) -> list[Record]:
        """Records proposed here and not yet final, oldest first."""
        check_limit(limit)
        rows = await self._rows(
            "SELECT r.id, r.raw FROM pending p JOIN records r ON r.id = p.record_id "
            "WHERE p.constellation = ? ORDER BY p.added_at, r.author, r.seq LIMIT ?",
            (constellation, limit),
        )
        return [decode_stored_record(raw, bytes(rid)) for rid, raw in rows]

    async def latest_record(self, constellation: bytes, author: MemberId) -> Record | None:
        """`author`'s highest-seq record in `constellation` that this store holds, final or not."""
        rows = await self._rows(
            "SELECT id, raw FROM records WHERE constellation = ? AND author = ? ORDER BY seq DESC LIMIT 1",
            (constellation, author.key),
        )
        return decode_stored_record(rows[0][1], bytes(rows[0][0])) if rows else None

    async def next_seq(self, constellation: bytes, author: MemberId) -> int:
        """The seq `reserve_seq` would hand out next (a read; reserves nothing)."""
        self._check_open()
        return max(await _held_seq(self._reader, constellation, author))

    async def own_seq(self, constellation: bytes, author: MemberId) -> tuple[int, int]:
        """(what this store holds: the seq after the highest stored or reserved one; the floor).

        The floor is what the home remembers beyond the store (`raise_seq_floor`); while it is
        above what the store holds, records this member signed are missing here.
        """
        self._check_open()
        return await _held_seq(self._reader, constellation, author)

    async def raise_seq_floor(self, constellation: bytes, author: MemberId, floor: int) -> None:
        """Durably make `next_seq` and `reserve_seq` never hand out less than `floor` (used when
        the home knows this member signed more than the store holds: docs/storage.md)."""
        check_hash(constellation, "A constellation id")
        need(is_uint(floor), "A seq floor must be a non-negative integer.")
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = "
                "max(value, excluded.value)",
                (_floor_key(constellation, author), floor.to_bytes(8, "big")),
            )

    async def equivocations(self, constellation: bytes) -> list[Equivocation]:
        rows = await self._rows(
            "SELECT kind, author, slot, proof, found_at FROM equivocations WHERE constellation = ? "
            "ORDER BY found_at, kind, author, slot",
            (constellation,),
        )
        out = []
        for kind, author, slot, proof, found_at in rows:
            p = decode_proof(bytes(proof))
            out.append(Equivocation(str(kind), constellation, MemberId(bytes(author)), int(slot), p, int(found_at)))
        return out

    async def equivocation_count(self, constellation: bytes, author: MemberId) -> int:
        """How many equivocation proofs of `author` this node keeps (a per-author bound)."""
        rows = await self._rows("SELECT COUNT(*) FROM equivocations WHERE constellation = ? AND author = ?",
                                (constellation, author.key))
        return int(rows[0][0])

    async def equivocators(self, constellation: bytes) -> set[MemberId]:
        rows = await self._rows("SELECT DISTINCT author FROM equivocations WHERE constellation = ?", (constellation,))
        return {MemberId(bytes(r[0])) for r in rows}


async def _next_seq(db: Db, constellation: bytes, author: MemberId) -> int:
    return max(await _held_seq(db, constellation, author))


async def _held_seq(db: Db, constellation: bytes, author: MemberId) -> tuple[int, int]:
    # Floors are 8-byte big-endian like the reservation, so max() over the blobs is numeric.
    rows = list(
        await db.execute_fetchall(
            "SELECT (SELECT value FROM kv WHERE key = ?), (SELECT value FROM kv WHERE key = ?), "
            "(SELECT MAX(seq) + 1 FROM records WHERE constellation = ? AND author = ?)",
            (_seq_key(constellation, author), _floor_key(constellation, author), constellation, author.key),
        )
    )
    reserved, floor, stored = rows[0]
    held = max(int.from_bytes(reserved, "big") if reserved is not None else 0, stored or 0)
    return held, int.from_bytes(floor, "big") if floor is not None else 0


def _seq_key(constellation: bytes, author: MemberId) -> str:
    return f"next-seq/{constellation.hex()}/{author.key.hex()}"


def _floor_key(constellation: bytes, author: MemberId) -> str:
    return f"seq-floor/{constellation.hex()}/{author.key.hex()}"
