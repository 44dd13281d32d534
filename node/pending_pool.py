"""An engine's pending records by id, counting each author's share as it changes (records,
bytes, highest seq), so a per-member budget is checked without walking the whole pool.
"""

from __future__ import annotations

from typing import Any

from valuemesh.protocol.records import Record


class PendingPool(dict[bytes, Record]):
    """A dict of record id -> pending record that keeps per-author totals; it takes only
    the ways the engine changes it (set, delete, clear), and refuses the others."""

    def __init__(self) -> None:
        super().__init__()
        self._count: dict[bytes, int] = {}
        self._bytes: dict[bytes, int] = {}
        self._seqs: dict[bytes, dict[int, int]] = {}  # author -> seq -> records of that seq

    def __setitem__(self, key: bytes, rec: Record) -> None:
        if key in self:
            self._drop(self[key])
        super().__setitem__(key, rec)
        a = rec.author.key
        self._count[a] = self._count.get(a, 0) + 1
        self._bytes[a] = self._bytes.get(a, 0) + len(rec.raw)
        seqs = self._seqs.setdefault(a, {})
        seqs[rec.seq] = seqs.get(rec.seq, 0) + 1

    def __delitem__(self, key: bytes) -> None:
        rec = self[key]
        super().__delitem__(key)
        self._drop(rec)

    def _drop(self, rec: Record) -> None:
        a = rec.author.key
        self._count[a] -= 1
        self._bytes[a] -= len(rec.raw)
        seqs = self._seqs[a]
        seqs[rec.seq] -= 1
        if not seqs[rec.seq]:
            del seqs[rec.seq]
        if not self._count[a]:
            del self._count[a], self._bytes[a], self._seqs[a]

    def clear(self) -> None:
        super().clear()
        self._count.clear()
        self._bytes.clear()
        self._seqs.clear()

    def pop(self, key: bytes, *default: Any) -> Any:
        if key not in self and default:
            return default[0]
        rec = self[key]
        del self[key]
        return rec

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("A pending pool changes only by set, delete, pop and clear.")

    update = setdefault = popitem = __ior__ = _refuse

    def records_of(self, author: bytes) -> int:
        return self._count.get(author, 0)

    def bytes_of(self, author: bytes) -> int:
        return self._bytes.get(author, 0)

    def highest_seq(self, author: bytes) -> int:
        """The author's highest pending seq, or -1."""
        seqs = self._seqs.get(author)
        return max(seqs) if seqs else -1
