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
from collections.abc import Iterable, Iterator, Mapping
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
# Fixed CSV columns; other fields of an item travel as JSON in the `data` column.
CSV_COLUMNS = ("kind", "index", "id", "type", "op", "author", "seq", "round", "commit",
               "anchor_round", "created", "status", "reason", "raw", "data")
_INT_FIELDS = frozenset({"index", "seq", "round", "commit", "anchor_round", "created"})
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


def _note(o: Outcome, registry: Registry, block: bytes | None, position: int) -> dict[str, Any] | None:
    # The same rule as the engine's final view: duplicates and deferrals are not listed.
    if o.status in ("duplicate", "deferred"):
        return None
    r = o.record
    item: dict[str, Any] = {
        "kind": "record", "index": position, "id": r.id.hex(), "type": r.type,
        "op": str(r.body.get("op", "")), "author": str(r.author), "seq": r.seq, "created": r.created,
        "status": o.status, "reason": o.reason, "block": block.hex() if block else None,
        "body": body_to_json(registry.plugins.get(r.type), r.body), "raw": _b64(r.raw),
    }
    return item


def replay(registry: Registry, genesis: Record, commits: Iterable[tuple[Block, int]]) -> Replay:
    """Apply the genesis and committed blocks in order, exactly as a node's engine does on restart.

    The replay runs the engine's own code (its clock rule, and when a membership change closes
    an epoch), so an archive is judged by the rules the node itself follows. The engine gets a
    fresh identity that is no member, so it signs nothing, and it never touches a store here.
    """
    items = list(commits)
    carried: dict[bytes, bytes] = {}
    for b, _ in items:
        for r in b.records:
            carried.setdefault(r.id, b.id)
    eng = Engine(None, registry, Identity.generate(os.urandom), genesis)  # type: ignore[arg-type]
    first = eng.committee
    outcomes: list[Outcome] = [Outcome("applied", genesis)]
    # Every outcome, not the engine's bounded final view: an archive lists all of them.
    note = eng._note

    def noting(o: Outcome) -> None:
        outcomes.append(o)
        note(o)  # the engine's count goes into the snapshot its checkpoints sign

    eng._note = noting  # type: ignore[method-assign]
    eng._replaying = []
    eng._apply_committed(items)
    eng.finish_closings_now()
    committees = list(eng._replaying)
    records: list[dict[str, Any]] = []
    for o in outcomes:
        item = _note(o, registry, carried.get(o.record.id), len(records))
        if item is not None:
            records.append(item)
    # What each epoch closed with is what its committee signs as a checkpoint.
    return Replay(eng.ledger, records, committees, first, dict(eng.closed))


async def build_archive(store: Store, eng: Engine, registry: Registry) -> list[dict[str, Any]]:
    """Every block of the constellation with its commit order, and the records they make final.

    Commits are read before blocks: a commit is stored only after the blocks that decide it,
    so the blocks read afterwards always reproduce every commit in the archive.
    """
    first = await store.first_commit_index(eng.cid)
    if first not in (0, None):
        raise LocalError("This node holds the ledger from a checkpoint on (it started from one, or prunes old "
                         "blocks); export the archive from a node that keeps the whole history.")
    # Checkpoints first: one is stored only after the commit that closed its epoch.
    stored_checkpoints = await store.checkpoints(eng.cid)
    entries = [e async for e in store.iter_commits(eng.cid)]
    blocks = {b.id: b async for b in store.iter_blocks(eng.cid)}
    missing = [e.block_id for e in entries if e.block_id not in blocks]
    if missing:
        blocks.update(await store.get_blocks(missing))
    if any(e.block_id not in blocks for e in entries):
        raise LocalError("The database lacks a committed block; the archive cannot be complete.")
    committed = [(blocks[e.block_id], e.anchor_round) for e in entries]
    rep = await asyncio.to_thread(replay, registry, eng.genesis, committed)
    head = {"kind": "archive", "format": ARCHIVE_FORMAT, "v": ARCHIVE_VERSION,
            "constellation": eng.text_id, "name": eng.name, "genesis": _b64(eng.genesis.raw),
            "exported_at": int(time.time() * 1000), "exported_by": str(eng.identity.member)}
    items: list[dict[str, Any]] = [head]
    ordered = {b.id for b, _ in committed}
    for i, (b, anchor) in enumerate(committed):
        items.append({"kind": "block", "commit": i, "anchor_round": anchor, "id": b.id.hex(),
                      "round": b.round, "author": str(b.author), "created": b.created, "raw": _b64(b.raw)})
    for b in sorted((b for b in blocks.values() if b.id not in ordered), key=lambda b: (b.round, b.id)):
        items.append({"kind": "block", "commit": None, "anchor_round": None, "id": b.id.hex(),
                      "round": b.round, "author": str(b.author), "created": b.created, "raw": _b64(b.raw)})
    items.extend(rep.records)
    for cp in stored_checkpoints:
        cert = CheckpointCertificate(cp.content, tuple((MemberId(k), v) for k, v in cp.signatures.items()))
        committee = rep.committee_of(cp.epoch)
        try:
            if committee is None:
                continue
            cert.verify(committee)
        except ValuemeshError:
            continue  # signatures still being gathered: not yet a certificate
        items.append({"kind": "checkpoint", "epoch": cp.epoch, "round": cp.round, "index": cp.index,
                      "state_hash": cp.state_hash.hex(), "snapshot_hash": cp.snapshot_hash.hex(),
                      "next_committee": cp.next_committee.hex(),
                      "sigs": [[str(MemberId(k)), _b64(v)] for k, v in sorted(cp.signatures.items())]})
    items.append({"kind": "end", "state_hash": rep.ledger.state_hash().hex(), "records": len(rep.records),
                  "commits": len(committed), "blocks": len(blocks)})
    return items


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


def archive_jsonl(items: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    for it in items:
        yield json.dumps(it, sort_keys=True, separators=(",", ":")) + "\n"


def _cell(v: str) -> str:
    # Spreadsheets run a cell starting with = + - @ as a formula, and record types and reasons
    # are text from other members; a leading quote defuses it and is removed again on import.
    return "'" + v if v[:1] in _FORMULA_START else v


def _uncell(v: str) -> str:
    return v[1:] if v.startswith("'") else v


def archive_csv(items: Iterable[Mapping[str, Any]]) -> str:
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
    return buf.getvalue()


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
        it: dict[str, Any] = {}
        for col, v in zip(CSV_COLUMNS, row, strict=True):
            if col == "data":
                if v:
                    extra = json.loads(v)
                    if not isinstance(extra, dict):
                        raise DecodeError(f"Line {n} of the CSV archive has a malformed data column.")
                    it.update(extra)
            elif v == "":
                it[col] = "" if col == "reason" else None
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


def verify_archive(items: list[dict[str, Any]], registry: Registry) -> VerifiedArchive:
    """Check an archive offline; raise a typed one-sentence error at the first fault.

    Every block and record signature is verified; the commit order is re-derived from the
    blocks by the consensus rule (never trusted); the ledger is replayed, and the record
    list and state hash must be exactly those the archive states.
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
            if c is not None:
                if c != len(commits) or not isinstance(ar, int) or isinstance(ar, bool) or ar < 0:
                    raise ValidationError(f"The block on line {n} breaks the archive's commit sequence.")
                commits.append(CommitEntry(c, b.id, ar))
        elif kind == "record":
            stated.append(it)
        elif kind == "checkpoint":
            if version != 1:
                certs.append(_checkpoint_item(cid, it, n))
        else:
            raise DecodeError(f"Line {n} of the archive is of an unknown kind.")
    rep = replay(registry, genesis, [(blocks[e.block_id], e.anchor_round) for e in commits])
    # The order is derived from the DAG, so a reordered or forged commit list fails here.
    cons = Consensus(cid, rep.first, None)
    try:
        cons.restore(list(blocks.values()), [e.block_id for e in commits], rep.committees)
    except LocalError:
        raise ValidationError("The archive's commit order is not the one its blocks decide.") from None
    if len(stated) != len(rep.records):
        raise ValidationError(f"The archive lists {len(stated)} final records; its blocks make "
                              f"{len(rep.records)} final.")
    for got, want in zip(stated, rep.records, strict=True):
        for k in ("id", "status", "reason", "raw", "index", "type", "author", "seq"):
            if got.get(k) != want[k]:
                raise ValidationError(f"Final record {want['index']} ({want['id'][:12]}) differs from what "
                                      f"its block says (field '{k}').")
    if end.get("state_hash") != rep.ledger.state_hash().hex():
        raise ValidationError("The archive's state hash is not the one its records produce.")
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
    return VerifiedArchive(genesis, list(blocks.values()), commits, rep, str(head.get("name", ""))[:200],
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
