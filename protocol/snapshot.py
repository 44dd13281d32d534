"""A ledger snapshot: the whole state of one constellation at the end of an epoch, from
which a node can start (or restart) without replaying the blocks before it.

It holds everything that decides how later records apply, not only what the user-visible
state hash covers: the state entries (which include every author's next seq), the ids of
the records that took each seq slot (a replayed duplicate is told from a seq reuse by id),
the records deferred behind a seq gap, and the counters a node continues from (commit
index, consensus clock, final-record count). Its hash is what a checkpoint signs, so a
peer serving a snapshot can neither add nor drop a deferred record unnoticed.

The encoding is a sequence of canonical CBOR items, so a state of any size decodes entry
by entry within the decoder's per-item limits:

    header  {"c", "epoch", "round", "index", "clock", "final", "count",
             "entries", "authors", "deferred"}          the last three are item counts
    entries times   [key: text, value: bytes]                strictly increasing keys
    authors times   [author: bytes(32), first: uint, ids: bytes]
                    one author's record ids of seq first, first + 1, ... (32 bytes each, at
                    most IDS_PER_ITEM); strictly increasing (author, first), each author's
                    items contiguous from seq 0
    deferred times  [record: bytes, now: uint]               by (author, seq)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from . import cbor
from .errors import DecodeError, ValidationError
from .ledger import Ledger, LedgerParts
from .plugins import Registry
from .records import HASH_LEN, MAX_RECORD_SIZE, MAX_SEQ, Record, decode_records

SNAPSHOT_DOMAIN = b"valuemesh/snapshot/v1\x00"
# A state larger than this is refused rather than held in memory whole; ~100 000 records of
# accounting state take a few MB.
MAX_SNAPSHOT_SIZE = 512 * 1024 * 1024
MAX_ENTRY_SIZE = 2 * MAX_RECORD_SIZE
IDS_PER_ITEM = 1024
_HEADER_KEYS = frozenset({"c", "epoch", "round", "index", "clock", "final", "count",
                          "entries", "authors", "deferred"})


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise DecodeError(message)


def _uint(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SEQ


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The state after the last block ordered by the anchor of `round` that closed `epoch`."""

    constellation: bytes
    epoch: int
    round: int
    index: int  # blocks ordered before this point (the next commit's index)
    clock: int  # consensus time at this point (the latest ordered block's `created`)
    final: int  # final records counted so far (applied or rejected)
    raw: bytes

    @property
    def hash(self) -> bytes:
        return hashlib.blake2b(SNAPSHOT_DOMAIN + self.raw, digest_size=HASH_LEN).digest()

    @classmethod
    def take(cls, ledger: Ledger, *, epoch: int, round: int, index: int, clock: int, final: int) -> Snapshot:
        return cls.encode(ledger.parts(), epoch=epoch, round=round, index=index, clock=clock, final=final)

    @classmethod
    def encode(cls, parts: LedgerParts, *, epoch: int, round: int, index: int, clock: int, final: int) -> Snapshot:
        """Encode a ledger's parts (`Ledger.parts`, a copy: this may run in a worker thread
        while the ledger goes on)."""
        entries = sorted(parts.data.items())
        authors: list[tuple[bytes, int, bytes]] = []
        for author, seq_ids in sorted(parts.applied.items()):
            for first in range(0, len(seq_ids), IDS_PER_ITEM):
                authors.append((author, first, b"".join(seq_ids[first:first + IDS_PER_ITEM])))
        deferred = sorted(parts.deferred, key=lambda d: (d[0].author.key, d[0].seq))
        out = bytearray(cbor.encode({
            "c": parts.constellation, "epoch": epoch, "round": round, "index": index, "clock": clock,
            "final": final, "count": parts.applied_count,
            "entries": len(entries), "authors": len(authors), "deferred": len(deferred),
        }))
        for k, v in entries:
            out += cbor.encode([k, v])
        for author, first, chunk in authors:
            out += cbor.encode([author, first, chunk])
        for rec, now in deferred:
            out += cbor.encode([rec.raw, now])
        return cls(parts.constellation, epoch, round, index, clock, final, bytes(out))

    @classmethod
    def decode_header(cls, raw: bytes) -> tuple[Snapshot, dict[str, int], int]:
        """Check the header; return the snapshot, its item counts and where the items start."""
        _need(isinstance(raw, bytes), "A snapshot must be bytes.")
        _need(len(raw) <= MAX_SNAPSHOT_SIZE, "The snapshot is over the size limit.")
        head, pos = cbor.decode_prefix(raw, 0, 0)
        _need(isinstance(head, dict) and set(head) == _HEADER_KEYS, "A snapshot header has missing or unknown fields.")
        assert isinstance(head, dict)
        _need(isinstance(head["c"], bytes) and len(head["c"]) == HASH_LEN, "A snapshot's constellation id is bad.")
        for k in _HEADER_KEYS - {"c"}:
            _need(_uint(head[k]), f"A snapshot's {k} is out of range.")
        snap = cls(head["c"], head["epoch"], head["round"], head["index"], head["clock"], head["final"], raw)
        return snap, {k: head[k] for k in ("count", "entries", "authors", "deferred")}, pos

    @classmethod
    def decode(cls, raw: bytes) -> Snapshot:
        """Check the whole encoding (shape and canonical order); raise DecodeError."""
        snap, counts, pos = cls.decode_header(raw)
        for _ in _items(raw, pos, counts):
            pass
        return snap

    def ledger(self, registry: Registry) -> Ledger:
        """The ledger this snapshot holds; raise DecodeError/ValidationError if it is not one."""
        _, counts, pos = self.decode_header(self.raw)
        data: dict[str, bytes] = {}
        applied: dict[bytes, list[bytes]] = {}
        deferred_raw: list[tuple[bytes, int]] = []
        for kind, a, b in _items(self.raw, pos, counts):
            if kind == "entry":
                assert isinstance(a, str) and isinstance(b, bytes)
                data[a] = b
            elif kind == "author":
                assert isinstance(a, bytes) and isinstance(b, bytes)
                applied.setdefault(a, []).extend(b[i:i + HASH_LEN] for i in range(0, len(b), HASH_LEN))
            else:
                assert isinstance(a, bytes) and isinstance(b, int)
                deferred_raw.append((a, b))
        records = decode_records([r for r, _ in deferred_raw])
        deferred: list[tuple[Record, int]] = [(rec, now) for rec, (_, now) in zip(records, deferred_raw, strict=True)]
        keys = [(r.author.key, r.seq) for r, _ in deferred]
        _need(keys == sorted(set(keys)), "A snapshot's deferred records are not in (author, seq) order.")
        led = Ledger.restore(registry, self.constellation, data, applied, deferred, counts["count"])
        _need(led.constellation == self.constellation, "A snapshot names another constellation.")
        return led


def _items(raw: bytes, pos: int, counts: dict[str, int]) -> list[tuple[str, object, object]]:
    out: list[tuple[str, object, object]] = []
    last_key: str | None = None
    author, next_seq = b"", 0
    for kind, n in (("entry", counts["entries"]), ("author", counts["authors"]), ("deferred", counts["deferred"])):
        for _ in range(n):
            _need(pos < len(raw), "The snapshot is cut short.")
            item, end = cbor.decode_prefix(raw, pos, 0)
            _need(end - pos <= MAX_ENTRY_SIZE, "A snapshot entry is over the size limit.")
            _need(isinstance(item, list) and len(item) == (3 if kind == "author" else 2),
                  "A snapshot item is malformed.")
            assert isinstance(item, list)
            if kind == "entry":
                a, b = item
                _need(isinstance(a, str) and isinstance(b, bytes), "A snapshot state entry is malformed.")
                assert isinstance(a, str)
                _need(last_key is None or a > last_key, "A snapshot's state entries are not in key order.")
                last_key = a
            elif kind == "author":
                a, first, b = item
                _need(isinstance(a, bytes) and len(a) == HASH_LEN and isinstance(b, bytes) and 0 < len(b)
                      and len(b) % HASH_LEN == 0 and len(b) <= IDS_PER_ITEM * HASH_LEN,
                      "A snapshot's applied ids are malformed.")
                assert isinstance(a, bytes) and isinstance(b, bytes)
                # Each author's ids run from seq 0 without a gap, authors in key order.
                expected = next_seq if a == author else 0
                _need((a > author or a == author) and first == expected,
                      "A snapshot's applied ids are out of order or leave a gap.")
                author, next_seq = a, expected + len(b) // HASH_LEN
            else:
                a, b = item
                _need(isinstance(a, bytes) and _uint(b), "A snapshot's deferred record is malformed.")
            out.append((kind, a, b))
            pos = end
    _need(pos == len(raw), "The snapshot has trailing bytes.")
    if counts["deferred"] == 0 and counts["entries"] == 0:
        raise ValidationError("A snapshot without state is not one of a founded constellation.")
    return out


__all__ = ["MAX_SNAPSHOT_SIZE", "SNAPSHOT_DOMAIN", "Snapshot"]
