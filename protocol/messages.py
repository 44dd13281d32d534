"""Gossip and sync messages exchanged between nodes over an authenticated link.

Each message is a frozen dataclass; the wire form is a canonical CBOR map
`{"t": <type>, ...fields}`. `decode_message` is strict: unknown types, missing
or extra fields, wrong types and oversized lists raise DecodeError.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from . import cbor
from .addressrec import MAX_RECORD_SIZE as MAX_ADDRESS_RECORD_SIZE
from .errors import DecodeError
from .punch import MAX_MESSAGE as MAX_PUNCH_MESSAGE
from .records import MAX_BLOCK_SIZE, MAX_RECORD_SIZE
from .snapshot import MAX_SNAPSHOT_SIZE

MAX_MESSAGE_SIZE = MAX_BLOCK_SIZE + 64 * 1024
MAX_BATCH = 256
MAX_IDS = 1024
MAX_CONSTELLATIONS = 256
MAX_PEERS_PER_EXCHANGE = 32
# Address records (protocol/addressrec.py) per message, and addresses per dial-back request.
MAX_RECORDS_PER_MESSAGE = 32
MAX_DIALBACK_ADDRESSES = 4
DIALBACK_NONCE_LEN = 16
DIALBACK_RESULTS = ("reachable", "unreachable", "refused")
# One entry per (author, epoch) from the asker's epoch on: ample for any core size.
MAX_HEADS = 4096
# From the asker's first undecided round (`Heads.since`) on, this many rounds of its epoch
# are sent whole, whatever its heads say: once an epoch is closed nobody builds on it, so a
# block that no later block names (a vote, a certificate) reaches a lagging node only so.
SYNC_WINDOW_ROUNDS = 8
# A checkpoint chain has one link per closed epoch; a snapshot travels in parts of this size.
MAX_CHAIN_LINKS = 1024
SNAPSHOT_CHUNK = 1024 * 1024


def _bytes_list(v: object, limit: int, size: int | None = None) -> bool:
    return isinstance(v, list) and len(v) <= limit and all(
        isinstance(x, bytes) and (size is None or len(x) == size) for x in v
    )


@dataclass(frozen=True, slots=True)
class Hello:
    """First message on a link: the constellations I follow and my listen port."""

    t: ClassVar[str] = "hello"
    constellations: list[bytes]
    listen_port: int
    version: str

    def valid(self) -> bool:
        return _bytes_list(self.constellations, MAX_CONSTELLATIONS, 32) and 0 <= self.listen_port < 65536 \
            and len(self.version) <= 32


@dataclass(frozen=True, slots=True)
class Heads:
    """What I hold of a constellation, as a sync request: per author and epoch, my highest
    round, for every epoch from `epoch` (mine now; I need nothing of closed ones) on, and
    `since`, my first undecided round in `epoch` (see SYNC_WINDOW_ROUNDS).

    `heads` is a list of [author key, epoch, round] triples. Rounds restart at each epoch's
    first round, so the same author can hold blocks of one round in two epochs.
    """

    t: ClassVar[str] = "heads"
    c: bytes
    epoch: int
    since: int
    heads: list[list[Any]]

    def valid(self) -> bool:
        return len(self.c) == 32 and _uint(self.epoch) and _uint(self.since) and len(self.heads) <= MAX_HEADS and all(
            isinstance(h, list) and len(h) == 3 and isinstance(h[0], bytes) and len(h[0]) == 32
            and _uint(h[1]) and h[1] >= self.epoch and _uint(h[2])
            for h in self.heads
        )

    def as_dict(self) -> dict[tuple[bytes, int], int]:
        return {(k, e): r for k, e, r in self.heads}


def _uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


@dataclass(frozen=True, slots=True)
class Blocks:
    """Encoded blocks, in an order where parents come first when possible.

    `left` says how many more the sender has queued for this sync (progress).
    """

    t: ClassVar[str] = "blocks"
    c: bytes
    blocks: list[bytes]
    left: int

    def valid(self) -> bool:
        return len(self.c) == 32 and _bytes_list(self.blocks, MAX_BATCH) and self.left >= 0


@dataclass(frozen=True, slots=True)
class GetBlocks:
    """Ask for blocks by id (missing parents)."""

    t: ClassVar[str] = "get"
    c: bytes
    ids: list[bytes]

    def valid(self) -> bool:
        return len(self.c) == 32 and _bytes_list(self.ids, MAX_IDS, 32)


@dataclass(frozen=True, slots=True)
class SubmitRecords:
    """Records a member hands to a core node to include in its blocks."""

    t: ClassVar[str] = "records"
    c: bytes
    records: list[bytes]

    def valid(self) -> bool:
        return len(self.c) == 32 and _bytes_list(self.records, MAX_BATCH)


@dataclass(frozen=True, slots=True)
class JoinRequest:
    """An invitee's first contact: its signed invite token and join record."""

    t: ClassVar[str] = "join"
    token: bytes
    record: bytes

    def valid(self) -> bool:
        return len(self.token) <= 4096 and len(self.record) <= 64 * 1024


@dataclass(frozen=True, slots=True)
class JoinReply:
    """The constellation's genesis, so the joiner can follow it."""

    t: ClassVar[str] = "welcome"
    c: bytes
    genesis: bytes

    def valid(self) -> bool:
        return len(self.c) == 32


@dataclass(frozen=True, slots=True)
class Refuse:
    """A plain-sentence refusal of the peer's last request."""

    t: ClassVar[str] = "refuse"
    reason: str

    def valid(self) -> bool:
        return len(self.reason) <= 500


@dataclass(frozen=True, slots=True)
class Proof:
    """An equivocation proof (see records.EquivocationProof)."""

    t: ClassVar[str] = "proof"
    c: bytes
    proof: bytes

    def valid(self) -> bool:
        return len(self.c) == 32


@dataclass(frozen=True, slots=True)
class CheckpointSig:
    """One core member's signature over the ledger state closing an epoch."""

    t: ClassVar[str] = "checkpoint"
    c: bytes
    cp: bytes

    def valid(self) -> bool:
        return len(self.c) == 32 and len(self.cp) <= 1024


@dataclass(frozen=True, slots=True)
class GetCheckpoint:
    """A newcomer asks where it can start: the peer's latest certified epoch end."""

    t: ClassVar[str] = "getcp"
    c: bytes

    def valid(self) -> bool:
        return len(self.c) == 32


@dataclass(frozen=True, slots=True)
class CheckpointChain:
    """The answer to GetCheckpoint: for each closed epoch from 0 on, [certificate, committee
    it starts] (both canonical CBOR), and the size and final-record count of the snapshot of
    the last one. No links: nothing to start from (sync from genesis)."""

    t: ClassVar[str] = "cpchain"
    c: bytes
    links: list[list[bytes]]
    size: int
    final: int

    def valid(self) -> bool:
        return len(self.c) == 32 and len(self.links) <= MAX_CHAIN_LINKS and all(
            isinstance(x, list) and len(x) == 2 and all(isinstance(y, bytes) for y in x) for x in self.links
        ) and 0 <= self.size <= MAX_SNAPSHOT_SIZE and _uint(self.final) and (self.size > 0) == bool(self.links)


@dataclass(frozen=True, slots=True)
class GetSnapshot:
    """Ask for the part of an epoch's snapshot from byte `offset` on."""

    t: ClassVar[str] = "getsnap"
    c: bytes
    epoch: int
    offset: int

    def valid(self) -> bool:
        return len(self.c) == 32 and _uint(self.epoch) and 0 <= self.offset <= MAX_SNAPSHOT_SIZE


@dataclass(frozen=True, slots=True)
class SnapshotPart:
    """Up to SNAPSHOT_CHUNK bytes of an epoch's snapshot, from `offset`, of `total`."""

    t: ClassVar[str] = "snap"
    c: bytes
    epoch: int
    offset: int
    data: bytes
    total: int

    def valid(self) -> bool:
        return len(self.c) == 32 and _uint(self.epoch) and 0 < self.total <= MAX_SNAPSHOT_SIZE \
            and 0 <= self.offset < self.total and 0 < len(self.data) <= SNAPSHOT_CHUNK \
            and self.offset + len(self.data) <= self.total


@dataclass(frozen=True, slots=True)
class PeerExchange:
    """Addresses of other peers I know: [member key, host, port, age in seconds]."""

    t: ClassVar[str] = "pex"
    peers: list[list[Any]]

    def valid(self) -> bool:
        return len(self.peers) <= MAX_PEERS_PER_EXCHANGE and all(
            isinstance(p, list) and len(p) == 4 and isinstance(p[0], bytes) and len(p[0]) == 32
            and isinstance(p[1], str) and 0 < len(p[1]) <= 255 and isinstance(p[2], int) and 0 < p[2] < 65536
            and isinstance(p[3], int) and 0 <= p[3] <= 10 * 365 * 86400
            for p in self.peers
        )


@dataclass(frozen=True, slots=True)
class AddressRecords:
    """Signed address records (protocol/addressrec.py), each its canonical CBOR bytes."""

    t: ClassVar[str] = "arec"
    records: list[bytes]

    def valid(self) -> bool:
        return 0 < len(self.records) <= MAX_RECORDS_PER_MESSAGE and _bytes_list(self.records, MAX_RECORDS_PER_MESSAGE) \
            and all(len(r) <= MAX_ADDRESS_RECORD_SIZE for r in self.records)


def _hostport(v: object) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and 0 < len(v[0]) <= 45 \
        and type(v[1]) is int and 0 < v[1] < 65536


@dataclass(frozen=True, slots=True)
class DialBackAsk:
    """Dial me back at these [host, port] addresses (only ones at the IP you see me from)."""

    t: ClassVar[str] = "dbask"
    nonce: bytes
    addrs: list[list[Any]]

    def valid(self) -> bool:
        return len(self.nonce) == DIALBACK_NONCE_LEN and 0 < len(self.addrs) <= MAX_DIALBACK_ADDRESSES \
            and all(_hostport(a) for a in self.addrs)


@dataclass(frozen=True, slots=True)
class DialBackReply:
    """The answer to DialBackAsk `nonce`: [host, port, result] per address asked, and the
    [host, port] the asker's link is seen from."""

    t: ClassVar[str] = "dbrep"
    nonce: bytes
    results: list[list[Any]]
    observed: list[Any]

    def valid(self) -> bool:
        return len(self.nonce) == DIALBACK_NONCE_LEN and len(self.results) <= MAX_DIALBACK_ADDRESSES and all(
            isinstance(r, list) and len(r) == 3 and _hostport(r[:2]) and r[2] in DIALBACK_RESULTS
            for r in self.results
        ) and _hostport(self.observed)


@dataclass(frozen=True, slots=True)
class MySeq:
    """After a doubt about its own database: which is the highest-seq record of mine (the
    sender's) in constellation `c` that you hold, final or pending? (node/seqcheck.py)"""

    t: ClassVar[str] = "myseq"
    c: bytes

    def valid(self) -> bool:
        return len(self.c) == 32


@dataclass(frozen=True, slots=True)
class YourSeq:
    """The answer to MySeq: that record as signed (empty when I hold none of yours in `c`)."""

    t: ClassVar[str] = "yourseq"
    c: bytes
    record: bytes

    def valid(self) -> bool:
        return len(self.c) == 32 and len(self.record) <= MAX_RECORD_SIZE


@dataclass(frozen=True, slots=True)
class PunchMessage:
    """One hole-punch message (protocol/punch.py: punch-connect or punch-sync), carried over
    the relayed link it means to upgrade (node/reach.py); `data` is decoded by punch.decode."""

    t: ClassVar[str] = "punch"
    data: bytes

    def valid(self) -> bool:
        return 0 < len(self.data) <= MAX_PUNCH_MESSAGE


Message = (
    Hello | Heads | Blocks | GetBlocks | SubmitRecords | JoinRequest | JoinReply | Refuse | Proof | CheckpointSig
    | GetCheckpoint | CheckpointChain | GetSnapshot | SnapshotPart | PeerExchange | MySeq | YourSeq | AddressRecords
    | DialBackAsk | DialBackReply | PunchMessage
)
_TYPES: dict[str, type[Any]] = {
    cls.t: cls
    for cls in (Hello, Heads, Blocks, GetBlocks, SubmitRecords, JoinRequest, JoinReply, Refuse, Proof, CheckpointSig,
                GetCheckpoint, CheckpointChain, GetSnapshot, SnapshotPart, PeerExchange, MySeq, YourSeq,
                AddressRecords, DialBackAsk, DialBackReply, PunchMessage)
}
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "constellations": list, "listen_port": int, "version": str, "c": bytes, "heads": list,
    "blocks": list, "left": int, "ids": list, "records": list, "token": bytes, "record": bytes,
    "genesis": bytes, "reason": str, "proof": bytes, "peers": list, "cp": bytes, "epoch": int,
    "since": int, "links": list, "size": int, "final": int, "offset": int, "data": bytes, "total": int,
    "nonce": bytes, "addrs": list, "results": list, "observed": list,
}


def encode_message(msg: Message) -> bytes:
    m: dict[str, Any] = {"t": msg.t}
    for f in fields(msg):
        m[f.name] = getattr(msg, f.name)
    return cbor.encode(m)


def decode_message(data: bytes) -> Message:
    m = cbor.decode(data, max_size=MAX_MESSAGE_SIZE)
    if not isinstance(m, dict) or not isinstance(m.get("t"), str):
        raise DecodeError("A message must be a map with a type.")
    cls = _TYPES.get(m["t"])
    if cls is None:
        raise DecodeError(f"Unknown message type '{m['t'][:32]}'.")
    names = [f.name for f in fields(cls)]
    if set(m) != {"t", *names}:
        raise DecodeError(f"A '{cls.t}' message has missing or unknown fields.")
    for n in names:
        want = _FIELD_TYPES[n]
        v = m[n]
        if not isinstance(v, want) or isinstance(v, bool):
            raise DecodeError(f"Field '{n}' of a '{cls.t}' message has the wrong type.")
    msg: Message = cls(**{n: m[n] for n in names})
    if not msg.valid():
        raise DecodeError(f"A '{cls.t}' message is out of bounds.")
    return msg
