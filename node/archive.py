"""The signed, re-verifiable archive of a constellation: export from a node's store,
JSONL and CSV reading and writing, offline verification by replay, and loading a verified
archive into a stopped node's store. The CLI and the export route both use it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import csv
import io
import json
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from valuemesh.node.accounting_views import verify_view
from valuemesh.node.engine import Engine
from valuemesh.node.jsonbody import body_to_json
from valuemesh.node.store import CommitEntry, ConstellationInfo, Store
from valuemesh.protocol.accounting.inputs import DISTRIBUTION_NS
from valuemesh.protocol.consensus import CheckpointCertificate, Committee, Consensus, Content
from valuemesh.protocol.errors import DecodeError, LocalError, ValidationError, ValuemeshError
from valuemesh.protocol.identity import Identity, MemberId
from valuemesh.protocol.ledger import Ledger, Outcome
from valuemesh.protocol.plugins import Registry, Version
from valuemesh.protocol.records import (
    Block,
    Record,
    constellation_text,
    decode_block,
    decode_record,
    parse_constellation,
)

ARCHIVE_FORMAT = "valuemesh-archive"
ARCHIVE_VERSION = 2
# Version 1 archives are still read; their checkpoint lines were signed over a payload this
# version no longer uses (docs/consensus.md §7), so only their blocks and records are checked.
READABLE_ARCHIVE_VERSIONS = (1, 2)
# An archive is read line by line; a line holds at most one block (4 MiB raw, base64 + JSON).
MAX_ARCHIVE_LINE = 8 * 1024 * 1024
MAX_ARCHIVE_BYTES = 1 << 30
MAX_ARCHIVE_ITEMS = 5_000_000
# Blocks and commits are written to a store in chunks so one import never builds a huge batch.
LOAD_CHUNK = 256
# An export reads and replays committed blocks this many at a time (a block may hold hundreds of records).
EXPORT_PAGE = 32
# Fixed CSV columns; other fields of an item travel as JSON in the `data` column.
CSV_COLUMNS = ("kind", "index", "id", "type", "op", "author", "seq", "round", "commit",
               "anchor_round", "created", "status", "reason", "raw", "data")
_INT_FIELDS = frozenset({"index", "seq", "round", "commit", "anchor_round", "created"})
_NULLABLE = frozenset({"commit", "anchor_round"})  # an empty CSV cell of these is null; of others, ""
# The fields of each kind of item, all of them; an item with another field is refused.
ITEM_FIELDS: dict[str, frozenset[str]] = {
    "archive": frozenset({"kind", "format", "v", "constellation", "name", "genesis", "exported_at", "exported_by"}),
    "block": frozenset({"kind", "commit", "anchor_round", "id", "round", "author", "created", "raw"}),
    "record": frozenset({"kind", "index", "id", "type", "op", "author", "seq", "created", "status", "reason",
                         "block", "body", "raw"}),
    "checkpoint": frozenset({"kind", "epoch", "round", "index", "state_hash", "snapshot_hash", "next_committee",
                             "sigs"}),
    "end": frozenset({"kind", "state_hash", "records", "commits", "blocks"}),
}
_FORMULA_START = frozenset("=+-@\t\r'")


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise DecodeError(f"The archive's {what} must be base64 text.")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise DecodeError(f"The archive's {what} is not valid base64.") from None


@dataclass(frozen=True, slots=True)
class Replay:
    """The ledger a constellation's genesis and committed blocks produce, and its record list."""

    ledger: Ledger
    records: list[dict[str, Any]]
    committees: list[Committee]
    first: Committee
    closes: dict[int, Content]  # epoch -> what it closed with (what its checkpoint signs)

    def committee_of(self, epoch: int) -> Committee | None:
        return next((c for c in [self.first, *self.committees] if c.epoch == epoch), None)


def _note(o: Outcome, registry: Registry, block: bytes | None, position: int) -> dict[str, Any]:
    """A final record's archive item: every field derived from its signed bytes and its outcome."""
    r = o.record
    return {"kind": "record", "index": position, "id": r.id.hex(), "type": r.type,
            "op": str(r.body.get("op", "")), "author": str(r.author), "seq": r.seq, "created": r.created,
            "status": o.status, "reason": o.reason, "block": block.hex() if block else None,
            "body": body_to_json(registry.plugins.get(r.type), r.body), "raw": _b64(r.raw)}


def _block_item(b: Block, commit: int | None, anchor_round: int | None) -> dict[str, Any]:
    """A block's archive item: every field but the commit position derived from its signed bytes."""
    return {"kind": "block", "commit": commit, "anchor_round": anchor_round, "id": b.id.hex(),
            "round": b.round, "author": str(b.author), "created": b.created, "raw": _b64(b.raw)}


def _checkpoint_json(content: Content, sigs: Iterable[tuple[bytes, bytes]]) -> dict[str, Any]:
    """A certified checkpoint's archive item: what its signatures cover, and the signatures."""
    return {"kind": "checkpoint", "epoch": content.epoch, "round": content.round, "index": content.index,
            "state_hash": content.state_hash.hex(), "snapshot_hash": content.snapshot_hash.hex(),
            "next_committee": content.next_committee.hex(),
            "sigs": [[str(MemberId(k)), _b64(v)] for k, v in sorted(sigs)]}


def _header(genesis: Record, exported_at: int, exported_by: str) -> dict[str, Any]:
    # The name is the genesis's own; when and by whom it was exported is the exporter's word.
    return {"kind": "archive", "format": ARCHIVE_FORMAT, "v": ARCHIVE_VERSION,
            "constellation": constellation_text(genesis.constellation), "name": str(genesis.body.get("name", "")),
            "genesis": _b64(genesis.raw), "exported_at": exported_at, "exported_by": exported_by}


class Replayer:
    """The engine's own replay of a constellation, fed its committed blocks in order a chunk
    at a time; it hands back each chunk's final record items, so an export never holds the
    whole list.

    The replay runs the engine's own code (its clock rule, and when a membership change closes
    an epoch), so an archive is judged by the rules the node itself follows. The engine gets a
    fresh identity that is no member, so it signs nothing, and it never touches a store here.
    """

    def __init__(self, registry: Registry, genesis: Record) -> None:
        self._registry = registry
        self._eng = eng = Engine(None, registry, Identity.generate(os.urandom), genesis)  # type: ignore[arg-type]
        self.first = eng.committee
        self.count = 0
        # A record's first carrying block, kept only until the record's outcome is known.
        self._carried: dict[bytes, bytes] = {}
        self._out: list[dict[str, Any]] = []
        self._take(Outcome("applied", genesis))
        note, apply = eng._note, eng._apply_block

        def noting(o: Outcome) -> None:
            self._take(o)
            note(o)  # the engine's count goes into the snapshot its checkpoints sign

        def applying(block: Block) -> None:
            for r in block.records:
                self._carried.setdefault(r.id, block.id)
            apply(block)

        eng._note = noting  # type: ignore[method-assign]
        eng._apply_block = applying  # type: ignore[method-assign]
        eng._replaying = []

    def _take(self, o: Outcome) -> None:
        if o.status == "deferred":
            return  # (its outcome comes later; duplicates and deferrals are not listed)
        block = self._carried.pop(o.record.id, None)
        if o.status != "duplicate":
            self._out.append(_note(o, self._registry, block, self.count))
            self.count += 1

    def take(self) -> list[dict[str, Any]]:
        """The final record items made since the last call."""
        out, self._out = self._out, []
        return out

    def feed(self, items: list[tuple[Block, int]]) -> list[dict[str, Any]]:
        """Apply committed blocks, whole anchors only (an epoch closes after its anchor's last
        block); return the final record items they make."""
        eng = self._eng
        eng._apply_committed(items)
        eng.finish_closings_now()
        # The engine's final view would keep up to FINAL_VIEW_LIMIT records; a replay lists its own.
        eng.final_log.clear()
        eng.final_at.clear()
        eng.final_pos.clear()
        return self.take()

    def finish(self, records: list[dict[str, Any]] | None = None) -> Replay:
        eng = self._eng
        assert eng._replaying is not None
        # What each epoch closed with is what its committee signs as a checkpoint.
        return Replay(eng.ledger, records or [], list(eng._replaying), self.first, dict(eng.closed))


def by_anchor(items: Iterable[tuple[Block, int]], size: int = LOAD_CHUNK) -> Iterator[list[tuple[Block, int]]]:
    """Committed blocks in chunks of about `size` that never split an anchor's blocks."""
    chunk: list[tuple[Block, int]] = []
    for item in items:
        if len(chunk) >= size and chunk[-1][1] != item[1]:
            yield chunk
            chunk = []
        chunk.append(item)
    if chunk:
        yield chunk


def replay(registry: Registry, genesis: Record, commits: Iterable[tuple[Block, int]]) -> Replay:
    """Apply the genesis and committed blocks in order, exactly as a node's engine does on restart."""
    rp = Replayer(registry, genesis)
    records = rp.take()
    for chunk in by_anchor(commits):
        records += rp.feed(chunk)
    return rp.finish(records)


async def export_archive(store: Store, eng: Engine, registry: Registry) -> AsyncGenerator[dict[str, Any], None]:
    """Every block of the constellation with its commit order, the records they make final,
    the certified checkpoints and the closing line, item by item: memory holds a page of
    blocks and the replayed ledger, never the archive.

    Commits are counted before blocks are read: a commit is stored only after the blocks that
    decide it, so the blocks read afterwards always reproduce every commit in the archive.
    The faults a node can know beforehand are raised before the first item.
    """
    cid = eng.cid
    first = await store.first_commit_index(cid)
    if first not in (0, None):
        raise LocalError("This node holds the ledger from a checkpoint on (it started from one, or prunes old "
                         "blocks); export the archive from a node that keeps the whole history.")
    # Checkpoints first: one is stored only after the commit that closed its epoch.
    stored_checkpoints = await store.checkpoints(cid)
    commits = await store.commit_count(cid)
    yield _header(eng.genesis, int(time.time() * 1000), str(eng.identity.member))

    async def committed() -> AsyncIterator[list[tuple[Block, int]]]:
        entries: list[CommitEntry] = []
        async for e in store.iter_commits(cid, page=EXPORT_PAGE):
            if e.index >= commits:
                break
            entries.append(e)
            if len(entries) == EXPORT_PAGE:
                yield await _blocks_of(store, entries)
                entries = []
        if entries:
            yield await _blocks_of(store, entries)

    ordered: set[bytes] = set()
    page: list[tuple[Block, int]] = []
    b: Block | None = None
    async for page in committed():
        for b, anchor in page:
            yield _block_item(b, len(ordered), anchor)
            ordered.add(b.id)
    if len(ordered) != commits:
        raise LocalError("The database lacks a committed block; the archive cannot be complete.")
    count = len(ordered)
    async for b in store.iter_blocks(cid, page=EXPORT_PAGE):
        if b.id not in ordered:
            count += 1
            yield _block_item(b, None, None)
    page, b, ordered = [], None, set()  # (loop variables would keep the last page alive through the replay)
    rp = Replayer(registry, eng.genesis)
    for it in rp.take():
        yield it
    pending: list[tuple[Block, int]] = []
    async for page in committed():
        pending += page
        chunks = list(by_anchor(pending, EXPORT_PAGE))
        pending = chunks.pop() if chunks else []  # the last anchor may go on in the next page
        for chunk in chunks:
            for it in await asyncio.to_thread(rp.feed, chunk):
                yield it
        del page, chunks
    for it in await asyncio.to_thread(rp.feed, pending):
        yield it
    del pending
    rep = rp.finish()
    for cp in stored_checkpoints:
        cert = CheckpointCertificate(cp.content, tuple((MemberId(k), v) for k, v in cp.signatures.items()))
        committee = rep.committee_of(cp.epoch)
        try:
            if committee is None:
                continue
            cert.verify(committee)
        except ValuemeshError:
            continue  # signatures still being gathered: not yet a certificate
        yield _checkpoint_json(cp.content, cp.signatures.items())
    yield {"kind": "end", "state_hash": rep.ledger.state_hash().hex(), "records": rp.count,
           "commits": commits, "blocks": count}


async def _blocks_of(store: Store, entries: list[CommitEntry]) -> list[tuple[Block, int]]:
    got = await store.get_blocks([e.block_id for e in entries])
    if any(e.block_id not in got for e in entries):
        raise LocalError("The database lacks a committed block; the archive cannot be complete.")
    return [(got[e.block_id], e.anchor_round) for e in entries]


async def build_archive(store: Store, eng: Engine, registry: Registry) -> list[dict[str, Any]]:
    """The whole archive as a list (tests and small ledgers; the export route streams it)."""
    return [it async for it in export_archive(store, eng, registry)]


def _checkpoint_hash(it: Mapping[str, Any], key: str, n: int) -> bytes:
    v = it.get(key)
    if not isinstance(v, str) or len(v) != 64:
        raise DecodeError(f"The checkpoint on line {n} is malformed.")
    try:
        return bytes.fromhex(v)
    except ValueError:
        raise DecodeError(f"The checkpoint on line {n} is malformed.") from None


def _checkpoint_item(cid: bytes, it: Mapping[str, Any], n: int) -> CheckpointCertificate:
    epoch, rnd, index, sigs = it.get("epoch"), it.get("round"), it.get("index"), it.get("sigs")
    if not (all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (epoch, rnd, index))
            and isinstance(sigs, list) and len(sigs) <= 512):
        raise DecodeError(f"The checkpoint on line {n} is malformed.")
    assert isinstance(epoch, int) and isinstance(rnd, int) and isinstance(index, int) and isinstance(sigs, list)
    pairs = []
    for pair in sigs:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
            raise DecodeError(f"The checkpoint on line {n} is malformed.")
        pairs.append((MemberId.parse(pair[0]), _unb64(pair[1], f"checkpoint signature on line {n}")))
    content = Content(cid, epoch, rnd, index, _checkpoint_hash(it, "state_hash", n),
                      _checkpoint_hash(it, "snapshot_hash", n), _checkpoint_hash(it, "next_committee", n))
    return CheckpointCertificate(content, tuple(pairs))


def archive_line(item: Mapping[str, Any]) -> str:
    """One item as a line of a JSONL archive."""
    return json.dumps(item, sort_keys=True, separators=(",", ":")) + "\n"


def archive_jsonl(items: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    return map(archive_line, items)


def _cell(v: str) -> str:
    # Spreadsheets run a cell starting with = + - @ as a formula, and record types and reasons
    # are text from other members; a leading quote defuses it and is removed again on import.
    return "'" + v if v[:1] in _FORMULA_START else v


def _uncell(v: str) -> str:
    return v[1:] if v.startswith("'") else v


def archive_csv_lines(items: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """The CSV archive line by line (the header row first), for writing as items arrive."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for it in items:
        row = []
        rest = {k: v for k, v in it.items() if k not in CSV_COLUMNS}
        for col in CSV_COLUMNS:
            if col == "data":
                row.append(json.dumps(rest, sort_keys=True, separators=(",", ":")) if rest else "")
            else:
                v = it.get(col)
                row.append("" if v is None else _cell(str(v)))
        w.writerow(row)
        yield buf.getvalue()
        buf.seek(0)
        buf.truncate()
    yield buf.getvalue()


def archive_csv(items: Iterable[Mapping[str, Any]]) -> str:
    return "".join(archive_csv_lines(items))


def _items_from_csv(text: str) -> list[dict[str, Any]]:
    # A block's base64 cell is far over csv's default field limit of 128 KiB.
    csv.field_size_limit(max(csv.field_size_limit(), MAX_ARCHIVE_LINE))
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if header is None or tuple(header) != CSV_COLUMNS:
        raise DecodeError("The CSV archive does not start with valuemesh's archive columns.")
    out = []
    for n, row in enumerate(rows, start=2):
        if len(row) != len(CSV_COLUMNS):
            raise DecodeError(f"Line {n} of the CSV archive has {len(row)} columns, not {len(CSV_COLUMNS)}.")
        fields = ITEM_FIELDS.get(_uncell(row[0]))
        if fields is None:
            raise DecodeError(f"Line {n} of the CSV archive is of an unknown kind.")
        it: dict[str, Any] = {}
        for col, v in zip(CSV_COLUMNS, row, strict=True):
            if col == "data":
                if v:
                    extra = json.loads(v)
                    if not isinstance(extra, dict) or any(k in CSV_COLUMNS for k in extra):
                        raise DecodeError(f"Line {n} of the CSV archive has a malformed data column.")
                    it.update(extra)
            elif col not in fields:
                # A column this kind of item does not have stays empty, so nothing unread hides there.
                if v != "":
                    raise DecodeError(f"Line {n} of the CSV archive has a {col} cell, which its kind has not.")
            elif v == "":
                it[col] = None if col in _NULLABLE else ""
            elif (v := _uncell(v)) == "":
                raise DecodeError(f"Line {n} of the CSV archive has a malformed {col}.")
            elif col in _INT_FIELDS:
                if not v.isdigit() or len(v) > 20:
                    raise DecodeError(f"Line {n} of the CSV archive has a malformed {col}.")
                it[col] = int(v)
            else:
                it[col] = v
        out.append(it)
    return out


def read_archive(path: Path) -> list[dict[str, Any]]:
    """The items of a JSONL or CSV archive file; DecodeError if it is not one."""
    try:
        size = path.stat().st_size
        if size > MAX_ARCHIVE_BYTES:
            raise DecodeError(f"The archive is {size} bytes, over the limit of {MAX_ARCHIVE_BYTES}.")
        data = path.read_bytes()
    except OSError as exc:
        raise LocalError(f"Cannot read {path}: {exc.strerror or exc}.") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("The archive is not UTF-8 text.") from None
    if text.lstrip().startswith("{") and '"@context"' in text[:4096]:
        try:
            whole = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            whole = None
        if isinstance(whole, dict) and "@context" in whole:
            raise DecodeError("This is a ValueFlows view, which is for other tools; import a jsonl or csv archive.")
    try:
        if text.startswith("kind,"):
            items = _items_from_csv(text)
        else:
            items = []
            for n, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                if len(line) > MAX_ARCHIVE_LINE:
                    raise DecodeError(f"Line {n} of the archive is over the size limit.")
                it = json.loads(line)
                if not isinstance(it, dict):
                    raise DecodeError(f"Line {n} of the archive is not a JSON object.")
                items.append(it)
                if len(items) > MAX_ARCHIVE_ITEMS:
                    raise DecodeError("The archive has too many lines.")
    except (json.JSONDecodeError, csv.Error):
        raise DecodeError("The archive is neither valuemesh JSONL nor CSV (it does not parse).") from None
    except RecursionError:
        raise DecodeError("The archive nests too deeply.") from None
    return items


@dataclass(frozen=True, slots=True)
class VerifiedArchive:
    """An archive whose every signature, commit and record was checked against a replay."""

    genesis: Record
    blocks: list[Block]
    commits: list[CommitEntry]
    replay: Replay
    name: str
    checkpoints: list[int]  # epochs whose quorum-signed checkpoint the archive carried and matched

    @property
    def cid(self) -> bytes:
        return self.genesis.constellation

    def summary(self) -> dict[str, Any]:
        state = self.replay.ledger.reader
        dists = [bytes.fromhex(k[2:]) for k, _ in state.scan(DISTRIBUTION_NS, "d/")]
        return {"constellation": constellation_text(self.cid), "name": self.name,
                "state_hash": self.replay.ledger.state_hash().hex(), "records": len(self.replay.records),
                "blocks": len(self.blocks), "commits": len(self.commits), "checkpoints": self.checkpoints,
                "distributions": verify_view(state, dists)}


def difference(got: Any, want: Any, path: str = "") -> str | None:
    """The first field (a dotted path, `[i]` for a list position) where `got` is not exactly
    `want`, or None: same keys, same list lengths, same types (1 is not true, nor 1.0)."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return path or "(the whole item)"
        for k in sorted(set(want) | set(got), key=str):
            if k not in want or k not in got:
                return f"{path}.{k}" if path else str(k)
            found = difference(got[k], want[k], f"{path}.{k}" if path else str(k))
            if found is not None:
                return found
        return None
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            found = difference(g, w, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    return None if type(got) is type(want) and got == want else path


def _readable(it: Mapping[str, Any], want: Mapping[str, Any], what: str) -> None:
    """Refuse an item whose readable fields are not exactly those derived from its signed bytes."""
    field = difference(it, want)
    if field is not None:
        raise ValidationError(f"{what} differs from what its signed bytes say (field '{field}').")


def _exporter_fields(head: Mapping[str, Any]) -> None:
    # When and by whom an archive was exported is the exporter's own word; it is shown as such.
    at, by = head.get("exported_at"), head.get("exported_by")
    if not (isinstance(at, int) and not isinstance(at, bool) and at >= 0 and isinstance(by, str) and len(by) <= 100):
        raise DecodeError("The archive's header is malformed (exported_at, exported_by).")


def verify_archive(items: list[dict[str, Any]], registry: Registry) -> VerifiedArchive:
    """Check an archive offline; raise a typed one-sentence error at the first fault.

    Every block and record signature is verified; the commit order is re-derived from the
    blocks by the consensus rule (never trusted); the ledger is replayed, and the record
    list and state hash must be exactly those the archive states. Every readable field of
    every item (a record's body, a block's round, …) must be exactly the one derived from
    the signed bytes, so what anyone reads in the file is what its authors signed.
    """
    if not items or items[0].get("kind") != "archive" or items[0].get("format") != ARCHIVE_FORMAT:
        raise DecodeError("The file is not a valuemesh archive (its first line is not the archive header).")
    head = items[0]
    version = head.get("v")
    if version not in READABLE_ARCHIVE_VERSIONS:
        raise DecodeError("This valuemesh reads archive versions 1 and 2 only.")
    genesis = decode_record(_unb64(head.get("genesis"), "genesis"))
    cid = genesis.constellation
    if genesis.type != "membership" or genesis.seq != 0 or genesis.body.get("op") != "genesis":
        raise ValidationError("The archive's genesis is not a genesis record.")
    named = head.get("constellation")
    if not isinstance(named, str) or parse_constellation(named) != cid:
        raise ValidationError("The archive's header names another constellation than its genesis.")
    _exporter_fields(head)
    _readable(head, {**_header(genesis, head["exported_at"], head["exported_by"]), "v": version},
              "The archive's header")
    if items[-1].get("kind") != "end":
        raise DecodeError("The archive is cut short (it has no closing line).")
    end = items[-1]
    blocks: dict[bytes, Block] = {}
    commits: list[CommitEntry] = []
    stated: list[dict[str, Any]] = []
    certs: list[CheckpointCertificate] = []
    for n, it in enumerate(items[1:-1], start=2):
        kind = it.get("kind")
        if kind == "block":
            b = decode_block(_unb64(it.get("raw"), f"block on line {n}"))
            if b.constellation != cid:
                raise ValidationError(f"The block on line {n} belongs to another constellation.")
            if it.get("id") != b.id.hex():
                raise ValidationError(f"The block on line {n} does not have the id the archive states.")
            if b.id in blocks:
                raise ValidationError(f"The block on line {n} appears twice.")
            blocks[b.id] = b
            c, ar = it.get("commit"), it.get("anchor_round")
            position = None
            if c is not None:
                if c != len(commits) or not isinstance(ar, int) or isinstance(ar, bool) or ar < 0:
                    raise ValidationError(f"The block on line {n} breaks the archive's commit sequence.")
                position = len(commits)
                commits.append(CommitEntry(position, b.id, ar))
            _readable(it, _block_item(b, position, ar if position is not None else None),
                      f"The block on line {n} ({b.id.hex()[:12]})")
        elif kind == "record":
            stated.append(it)
        elif kind == "checkpoint":
            if version != 1:  # (a version 1 checkpoint is neither checked nor shown)
                cert = _checkpoint_item(cid, it, n)
                _readable(it, _checkpoint_json(cert.content, ((m.key, s) for m, s in cert.signatures)),
                          f"The checkpoint on line {n}")
                certs.append(cert)
        else:
            raise DecodeError(f"Line {n} of the archive is of an unknown kind.")
    rep = replay(registry, genesis, [(blocks[e.block_id], e.anchor_round) for e in commits])
    # The order is derived from the DAG, so a reordered or forged commit list fails here.
    cons = Consensus(cid, rep.first, None)
    try:
        cons.restore(list(blocks.values()), [e.block_id for e in commits], rep.committees,
                     [e.anchor_round for e in commits])
    except LocalError:
        raise ValidationError("The archive's commit order or anchor rounds are not the ones its blocks "
                              "decide.") from None
    if len(stated) != len(rep.records):
        raise ValidationError(f"The archive lists {len(stated)} final records; its blocks make "
                              f"{len(rep.records)} final.")
    for got, want in zip(stated, rep.records, strict=True):
        field = difference(got, want)
        if field is not None:
            raise ValidationError(f"Final record {want['index']} ({want['id'][:12]}) differs from what "
                                  f"its block says (field '{field}').")
    if end.get("state_hash") != rep.ledger.state_hash().hex():
        raise ValidationError("The archive's state hash is not the one its records produce.")
    _readable(end, {"kind": "end", "state_hash": rep.ledger.state_hash().hex(), "records": len(rep.records),
                    "commits": len(commits), "blocks": len(blocks)}, "The archive's closing line")
    for cert in certs:
        # A quorum of the epoch's own committee signed the state its blocks close the epoch with.
        committee = rep.committee_of(cert.epoch)
        if committee is None or cert.epoch not in rep.closes:
            raise ValidationError(f"The archive's checkpoint of epoch {cert.epoch} is of an epoch its blocks "
                                  "never close.")
        cert.verify(committee)
        if rep.closes[cert.epoch] != cert.content:
            raise ValidationError(f"The archive's checkpoint of epoch {cert.epoch} is not the state its blocks "
                                  "close that epoch with.")
    return VerifiedArchive(genesis, list(blocks.values()), commits, rep, str(genesis.body.get("name", "")),
                           sorted(c.epoch for c in certs))


async def load_archive(store: Store, archive: VerifiedArchive, identity: Identity) -> None:
    """Write a verified archive into a node's store; the node replays it when it starts."""
    if await store.constellation(archive.cid) is not None:
        raise LocalError(f"This node already follows {constellation_text(archive.cid)}; "
                         "import into a fresh home.")
    state = archive.replay.ledger.reader
    if state.member(identity.member.key) is not None:
        # A member's node restored from an archive older than its last block could sign a
        # second block for a round it already signed: an equivocation. Members catch up from peers.
        raise LocalError("This home's member belongs to that constellation; a member's node must catch up "
                         "from its peers, not from an archive (import into a home of another identity).")
    tier = "applicant"
    meta = state.read("membership", "meta")
    plugins = {k: Version.parse(v).major for k, v in meta["plugins"].items()}
    now = int(time.time() * 1000)
    g = archive.genesis
    async with store.batch() as tx:
        tx.put_constellation(ConstellationInfo(g.constellation, g.raw, now, "active", tier, plugins,
                                               archive.name))
        tx.put_records([g], now)
    for i in range(0, len(archive.blocks), LOAD_CHUNK):
        async with store.batch() as tx:
            chunk = archive.blocks[i:i + LOAD_CHUNK]
            tx.put_blocks(chunk, now)
            tx.put_records([r for b in chunk for r in b.records], now)
    for i in range(0, len(archive.commits), LOAD_CHUNK):
        async with store.batch() as tx:
            tx.append_commits(g.constellation, archive.commits[i:i + LOAD_CHUNK])
