"""Signed records and blocks: the two objects valuemesh signs, hashes and sends.

A record is one member's signed statement; a block is a core node's signed
vertex of a constellation's DAG carrying a batch of records. Both are frozen
dataclasses whose wire form is deterministic CBOR. The signature covers a
domain tag plus the canonical payload (every field but `sig`), and the content
id is BLAKE2b-256 of the same bytes, so an id never depends on the signature.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Generic, TypeVar

from . import cbor
from .errors import DecodeError, LocalError, SignatureError, ValidationError, ValuemeshError
from .identity import ID_PREFIX, BatchVerifier, Identity, MemberId, SignatureCheck, first_invalid

HASH_LEN = 32
MAX_RECORD_SIZE = 64 * 1024
MAX_BLOCK_SIZE = 4 * 1024 * 1024
MAX_RECORDS_PER_BLOCK = 2048
MAX_PARENTS = 512
MAX_TYPE_LEN = 64
MAX_SEQ = (1 << 53) - 1
MAX_VERSION = 1 << 16
RECORD_DOMAIN = b"valuemesh/record/v1\x00"
BLOCK_DOMAIN = b"valuemesh/block/v1\x00"
CONSTELLATION_PREFIX = "vc1"

_RECORD_KEYS = frozenset({"type", "v", "c", "author", "seq", "body", "created", "sig"})
_BLOCK_KEYS = frozenset(
    {"c", "epoch", "author", "round", "prev", "parents", "records", "created", "sig"}
)


def blake2b256(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=HASH_LEN).digest()


def _id_checksum(raw: bytes) -> bytes:
    return hashlib.blake2b(b"valuemesh-constellation-id" + raw, digest_size=4).digest()


def constellation_text(cid: bytes) -> str:
    """Text form of a constellation id: `vc1` + base32(id + checksum)."""
    return CONSTELLATION_PREFIX + base64.b32encode(cid + _id_checksum(cid)).decode().rstrip("=").lower()


def parse_constellation(text: str) -> bytes:
    # ASCII first: str.lower() maps some non-ASCII letters (the Kelvin sign) to 'k'.
    t = text.strip().lower() if isinstance(text, str) and text.isascii() else ""
    body = t[len(CONSTELLATION_PREFIX) :]
    if not t.startswith(CONSTELLATION_PREFIX) or len(body) != 58:
        raise LocalError(f"'{text}' is not a constellation id: it should be 'vc1' and 58 letters and digits.")
    try:
        raw = base64.b32decode(body.upper() + "======")
    except ValueError:
        raise LocalError(f"'{text}' is not a constellation id: it has characters outside base32.") from None
    cid, check = raw[:HASH_LEN], raw[HASH_LEN:]
    if _id_checksum(cid) != check:
        raise LocalError(f"'{text}' has a wrong checksum: the constellation id is mistyped.")
    # Two padding bits in the last character must be zero: one text form per id.
    if constellation_text(cid) != t:
        raise LocalError(f"'{text}' has a wrong last character: the constellation id is mistyped.")
    return cid


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise DecodeError(message)


def _uint(value: object, what: str, limit: int = MAX_SEQ) -> int:
    _need(isinstance(value, int) and not isinstance(value, bool), f"{what} must be an integer.")
    assert isinstance(value, int)
    _need(0 <= value <= limit, f"{what} is out of range.")
    return value


def _hash(value: object, what: str) -> bytes:
    _need(isinstance(value, bytes) and len(value) == HASH_LEN, f"{what} must be a 32-byte hash.")
    assert isinstance(value, bytes)
    return value


def _member(value: object, what: str) -> MemberId:
    _need(isinstance(value, bytes) and len(value) == 32, f"{what} must be a 32-byte member key.")
    assert isinstance(value, bytes)
    return MemberId(value)


@dataclass(frozen=True, slots=True)
class Record:
    """One member's signed statement in one constellation.

    `type` names the plugin that interprets `body`, `v` its major version;
    `seq` counts this author's records in this constellation from 0.
    """

    type: str
    v: int
    constellation: bytes
    author: MemberId
    seq: int
    body: Mapping[str, Any]
    created: int
    sig: bytes
    id: bytes = field(default=b"", compare=False)
    raw: bytes = field(default=b"", compare=False, repr=False)

    def payload_map(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "v": self.v,
            "c": self.constellation,
            "author": self.author.key,
            "seq": self.seq,
            "body": dict(self.body),
            "created": self.created,
        }

    @classmethod
    def create(
        cls,
        identity: Identity,
        *,
        type: str,
        v: int,
        constellation: bytes,
        seq: int,
        body: Mapping[str, Any],
        created: int,
    ) -> Record:
        """Sign a new record; the caller supplies `created` (ms since epoch)."""
        if not isinstance(type, str) or not type or len(type) > MAX_TYPE_LEN:
            raise LocalError("A record type must be 1 to 64 characters.")
        if not 0 <= seq <= MAX_SEQ:
            raise LocalError("A record sequence number is out of range.")
        # Refuse here what decode_record would refuse, so no node signs an undecodable record.
        if not 0 <= v <= MAX_VERSION:
            raise LocalError("A record version is out of range.")
        if not 0 <= created <= MAX_SEQ:
            raise LocalError("A record's created time is out of range.")
        if not isinstance(constellation, bytes) or len(constellation) != HASH_LEN:
            raise LocalError("A record's constellation must be a 32-byte id.")
        payload_map = {
            "type": type,
            "v": v,
            "c": constellation,
            "author": identity.member.key,
            "seq": seq,
            "body": dict(body),
            "created": created,
        }
        # The body is kept in its decoded form (tuples become lists, bytearrays bytes) so
        # plugins see the same values on the author's node as on every other node.
        payload, decoded = cbor.encode_with_form(payload_map, MAX_RECORD_SIZE)
        sig = identity.sign(RECORD_DOMAIN + payload)
        # The signed record is the payload with `sig` in its canonical place, right after
        # `seq` (what decoding splices out): the same bytes as encoding the whole map again.
        sig_start = _SIG_AFTER_C_V + _uint_len(v) + len(_F_SEQ) + _uint_len(seq)
        raw = b"\xa8" + payload[1:sig_start] + _F_SIG + sig + payload[sig_start:]
        if len(raw) > MAX_RECORD_SIZE:
            raise LocalError(f"The record is {len(raw)} bytes, over the limit of {MAX_RECORD_SIZE}.")
        return cls(
            type, v, constellation, identity.member, seq, decoded["body"], created, sig,
            blake2b256(payload), raw,
        )

    def encode(self) -> bytes:
        return self.raw

    @property
    def ref(self) -> tuple[bytes, int]:
        """The (author key, seq) slot this record occupies."""
        return (self.author.key, self.seq)


def decode_record(data: bytes, *, verify: bool = True) -> Record:
    """Decode and (by default) verify a record; raise DecodeError/SignatureError."""
    return _decode_record(data, verify, native=True)


def decode_record_reference(data: bytes, *, verify: bool = True) -> Record:
    """`decode_record` by the pure-Python reference path alone (tests and bench/protocol.py
    compare the two)."""
    return _decode_record(data, verify, native=False)


def decode_records(
    raws: Iterable[bytes], *, verify: bool = True, batch_verifier: BatchVerifier | None = None,
) -> list[Record]:
    """`decode_record` of each of `raws`: the same records, or the same first error, sooner.

    Every record is decoded before any signature is checked: alternating Python decoding
    with Ed25519 slows both (each evicts the other from the core's caches), by about a
    tenth of the whole (bench/protocol.py), and the signatures then go to `batch_verifier`
    as one batch (a node spreads it over its cores). When a record fails to decode, the
    signatures before it are checked first, so the error raised is the one a loop would
    have met first.
    """
    got = decode_records_unverified(raws)
    if not verify:
        got.checks.clear()
    return got.finish((batch_verifier or first_invalid)(got.checks))


T = TypeVar("T")


@dataclass(slots=True)
class Unverified(Generic[T]):
    """Objects decoded with their signatures not yet checked: `checks`, in the order a loop
    would check them, and `error`, the decoding error met after the last of `items` (raised
    only if every check passes, as a loop would have). A caller runs the checks where it likes
    (a node spreads a large batch over its cores) and calls `finish` with the index of the
    first failing check."""

    items: list[T]
    checks: list[SignatureCheck]
    error: Exception | None = None

    def finish(self, first_bad: int | None) -> list[T]:
        """The items, or the error a loop decoding and checking them one by one would raise."""
        if first_bad is not None:
            signer, message, sig = self.checks[first_bad]
            signer.verify(message, sig)  # raises the error naming the signer
            # The verifier and the check disagree: refuse rather than take unverified data.
            raise SignatureError(f"The signature of {signer.short}… does not verify.")
        if self.error is not None:
            raise self.error
        return self.items


def decode_records_unverified(raws: Iterable[bytes]) -> Unverified[Record]:
    """Decode records without checking signatures; see `Unverified`."""
    checks: list[SignatureCheck] = []
    records: list[Record] = []
    try:
        _decode_all_into(raws, checks, out=records)
    except ValuemeshError as exc:
        return Unverified(records, checks, exc)
    return Unverified(records, checks)


def _decode_all_into(
    raws: Iterable[object], checks: list[SignatureCheck], check: Callable[[Record], None] | None = None,
    not_bytes: str = "A record must be given as bytes.", out: list[Record] | None = None,
) -> list[Record]:
    """Decode every record (each passed to `check`) into `out`, appending its signature
    check to `checks`; on an error, what was decoded before it stays in both."""
    if out is None:
        out = []
    for raw in raws:
        _need(isinstance(raw, (bytes, bytearray, memoryview)), not_bytes)
        rec, payload = _decode_unverified(raw, native=True)  # type: ignore[arg-type]
        if check is not None:
            check(rec)
        out.append(rec)
        checks.append((rec.author, RECORD_DOMAIN + payload, rec.sig))
    return out


def _decode_record(data: bytes, verify: bool, native: bool) -> Record:
    rec, payload = _decode_unverified(data, native)
    if verify:
        rec.author.verify(RECORD_DOMAIN + payload, rec.sig)
    return rec


def _decode_unverified(data: bytes, native: bool) -> tuple[Record, bytes]:
    """A record and its signed payload (without the domain tag); the signature is not checked."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError("A record must be given as bytes.")
    if len(data) > MAX_RECORD_SIZE:
        raise DecodeError(f"A record is {len(data)} bytes, over the limit of {MAX_RECORD_SIZE}.")
    raw = bytes(data)
    fast = (native and _record_native(raw)) or _record_fast(raw)
    if fast is not None:
        return fast
    _need(len(raw) > 0 and raw[0] >> 5 == 5, "A record must be a map.")
    if native:
        m, payload = cbor.decode_map_without(raw, "sig", max_size=MAX_RECORD_SIZE)
    else:
        m, payload = cbor.decode_map_without_reference(raw, "sig", max_size=MAX_RECORD_SIZE)
    return _record_from_map(m, raw, False, payload), payload


# The canonical frame of a record: its 8 keys in canonical order with the
# fixed-size heads of the 32- and 64-byte fields. _record_fast matches these
# literally and decodes only the variable parts, which roughly halves the cost
# of decoding; anything that does not match takes the general path, which then
# accepts or refuses it exactly as it would have anyway.
_F_C = b"\xa8\x61c\x58\x20"
_F_V = b"\x61v"
_F_SEQ = b"\x63seq"
_F_SIG = b"\x63sig\x58\x40"
_F_BODY = b"\x64body"
_F_TYPE = b"\x64type"
_F_AUTHOR = b"\x66author\x58\x20"
_F_CREATED = b"\x67created"


# MemberIds of recent authors: a constellation has few, and building one per
# record is a measurable part of decoding. Bounded; cleared when full.
_MEMBERS: dict[bytes, MemberId] = {}
_MEMBERS_CACHED = 4096


def _uint_at(raw: bytes, p: int) -> tuple[int, int] | None:
    """A canonical unsigned integer at `p` and its end; None if something else is there."""
    if p >= len(raw):
        return None
    ib = raw[p]
    if ib < 0x18:
        return ib, p + 1
    if ib > 0x1B:
        return None
    width = 1 << (ib - 0x18)
    end = p + 1 + width
    if end > len(raw):
        raise DecodeError("The encoding ends in the middle of a value.")
    value = int.from_bytes(raw[p + 1 : end], "big")
    # Shortest form only: each width must be needed (RFC 8949 §4.2.1).
    if value < (24 if width == 1 else 1 << (4 * width)):
        raise DecodeError("The encoding is not canonical (a length is not in its shortest form).")
    return value, end


# The record's keys in canonical order (bytewise by encoding): c, v, seq, sig, body, type, author, created.
_RECORD_ORDER = tuple(sorted(_RECORD_KEYS, key=cbor.encode))
# Bytes from a record's start to its `v` value: map head, "c" entry (key, bytes(32) head, id), "v" key.
_SIG_AFTER_C_V = 1 + 2 + 2 + HASH_LEN + 2
_SIG_ENTRY = len(_F_SIG) + 64


def _uint_len(value: int) -> int:
    """Length of a non-negative integer's canonical encoding."""
    if value < 24:
        return 1
    if value < 0x100:
        return 2
    if value < 0x10000:
        return 3
    return 5 if value < 0x100000000 else 9


def _record_native(raw: bytes) -> tuple[Record, bytes] | None:
    """Decode a valid record through cbor2's decoder; None if it is not proven valid.

    Returns only records the reference path (_record_fast, then the general one)
    would return equal; anything else, every invalid record included, gets None, so
    refusals keep coming from the reference path with its messages.
    """
    m = cbor.decode_fixed_map(raw, _RECORD_ORDER)
    if m is None:
        return None
    rtype, v, cid, akey, seq = m["type"], m["v"], m["c"], m["author"], m["seq"]
    body, created, sig = m["body"], m["created"], m["sig"]
    if not (
        type(rtype) is str and 0 < len(rtype) <= MAX_TYPE_LEN
        and type(v) is int and 0 <= v <= MAX_VERSION
        and type(seq) is int and 0 <= seq <= MAX_SEQ
        and type(created) is int and 0 <= created <= MAX_SEQ
        and type(cid) is bytes and len(cid) == HASH_LEN
        and type(akey) is bytes and len(akey) == 32
        and type(sig) is bytes and len(sig) == 64
        and type(body) is dict
    ):
        return None
    # Canonical with these keys, so `sig` follows c, v and seq: splice it out as
    # _record_fast does, without re-encoding.
    sig_start = _SIG_AFTER_C_V + _uint_len(v) + len(_F_SEQ) + _uint_len(seq)
    if not raw.startswith(_F_SIG, sig_start):
        return None
    payload = b"\xa7" + raw[1:sig_start] + raw[sig_start + _SIG_ENTRY :]
    return _build_record(rtype, v, cid, akey, seq, body, created, sig, payload, raw), payload


def _build_record(
    rtype: str, v: int, cid: bytes, akey: bytes, seq: int, body: dict[str, Any], created: int, sig: bytes,
    payload: bytes, raw: bytes,
) -> Record:
    author = _MEMBERS.get(akey)
    if author is None:
        if len(_MEMBERS) >= _MEMBERS_CACHED:
            _MEMBERS.clear()
        author = _MEMBERS[akey] = MemberId(akey)
    rec = object.__new__(Record)
    rid = hashlib.blake2b(payload, digest_size=HASH_LEN).digest()
    for setter, value in zip(_RECORD_SETTERS, (rtype, v, cid, author, seq, body, created, sig, rid, raw),
                             strict=True):
        setter(rec, value)
    return rec


# Record's slot setters in field order. Decoders fill a Record through them: the frozen
# dataclass __init__ sets each of the ten fields through object.__setattr__, which costs
# about a microsecond per record received. Record has no __post_init__ that this skips.
_RECORD_SETTERS = tuple(getattr(Record, f.name).__set__ for f in fields(Record))
assert [f.name for f in fields(Record)] == [
    "type", "v", "constellation", "author", "seq", "body", "created", "sig", "id", "raw"
] and not hasattr(Record, "__post_init__")


def _record_fast(raw: bytes) -> tuple[Record, bytes] | None:
    """Decode a record in its canonical frame; None if it is not in that frame.

    The pure-Python reference for records in the canonical frame (decode_record
    tries _record_native first)."""
    if not raw.startswith(_F_C) or not raw.startswith(_F_V, 37) or len(raw) < 40:
        return None
    cid = raw[5:37]
    ib = raw[39]
    if ib < 0x18:
        v, p = ib, 40
    else:
        got = _uint_at(raw, 39)
        if got is None:
            return None
        v, p = got
    if not raw.startswith(_F_SEQ, p) or p + 4 >= len(raw):
        return None
    ib = raw[p + 4]
    if ib < 0x18:
        seq, p = ib, p + 5
    else:
        got = _uint_at(raw, p + 4)
        if got is None:
            return None
        seq, p = got
    if not raw.startswith(_F_SIG, p):
        return None
    sig_start = p
    sig = raw[p + 6 : p + 70]
    p += 70
    sig_end = p
    if not raw.startswith(_F_BODY, p) or p + 5 >= len(raw) or raw[p + 5] >> 5 != 5:
        return None
    body, p = cbor.decode_prefix(raw, p + 5)
    if not raw.startswith(_F_TYPE, p) or p + 5 >= len(raw):
        return None
    tb = raw[p + 5]
    if not 0x60 < tb < 0x78:
        return None
    try:
        rtype = raw[p + 6 : p + 6 + tb - 0x60].decode("utf-8")
    except UnicodeDecodeError:
        return None
    p += 6 + tb - 0x60
    if not raw.startswith(_F_AUTHOR, p):
        return None
    akey = raw[p + 9 : p + 41]
    p += 41
    if not raw.startswith(_F_CREATED, p):
        return None
    got = _uint_at(raw, p + 8)
    if got is None or got[1] != len(raw) or len(akey) != 32:
        return None
    created = got[0]
    if v > MAX_VERSION or seq > MAX_SEQ or created > MAX_SEQ:
        _need(v <= MAX_VERSION, "A record version is out of range.")
        _need(seq <= MAX_SEQ, "A record's seq is out of range.")
        raise DecodeError("A record's created time is out of range.")
    payload = b"\xa7" + raw[1:sig_start] + raw[sig_end:]
    return _build_record(rtype, v, cid, akey, seq, body, created, sig, payload, raw), payload


def _record_from_map(m: object, raw: bytes, verify: bool, payload: bytes | None = None) -> Record:
    _need(isinstance(m, dict), "A record must be a map.")
    assert isinstance(m, dict)
    _need(m.keys() == _RECORD_KEYS, "A record has missing or unknown fields.")
    rtype = m["type"]
    _need(isinstance(rtype, str) and 0 < len(rtype) <= MAX_TYPE_LEN, "A record type must be short text.")
    v = _uint(m["v"], "A record version", MAX_VERSION)
    cid = _hash(m["c"], "A record's constellation")
    author = _member(m["author"], "A record's author")
    seq = _uint(m["seq"], "A record's seq")
    body = m["body"]
    _need(isinstance(body, dict), "A record body must be a map.")
    created = _uint(m["created"], "A record's created time")
    sig = m["sig"]
    _need(isinstance(sig, bytes) and len(sig) == 64, "A record signature must be 64 bytes.")
    if payload is None:
        payload = cbor.encode({k: m[k] for k in m if k != "sig"})
    if verify:
        author.verify(RECORD_DOMAIN + payload, sig)
    return Record(rtype, v, cid, author, seq, body, created, sig, blake2b256(payload), raw)


@dataclass(frozen=True, slots=True)
class Block:
    """A vertex of a constellation's DAG, signed by one core member.

    `round` is the threshold-clock round; `parents` are ids of round-1 blocks
    (sorted, at least a quorum by weight except in round 0); `prev` is the
    author's own previous block, if any.
    """

    constellation: bytes
    epoch: int
    author: MemberId
    round: int
    prev: bytes | None
    parents: tuple[bytes, ...]
    records: tuple[Record, ...]
    created: int
    sig: bytes
    id: bytes = field(default=b"", compare=False)
    raw: bytes = field(default=b"", compare=False, repr=False)

    @classmethod
    def create(
        cls,
        identity: Identity,
        *,
        constellation: bytes,
        epoch: int,
        round: int,
        prev: bytes | None,
        parents: tuple[bytes, ...] | list[bytes],
        records: tuple[Record, ...] | list[Record],
        created: int,
    ) -> Block:
        parents_t = tuple(sorted(set(parents)))
        records_t = tuple(records)
        if len(parents_t) > MAX_PARENTS or len(records_t) > MAX_RECORDS_PER_BLOCK:
            raise LocalError("A block has too many parents or records.")
        # Refuse here what decode_block would refuse, so no node signs an undecodable block.
        if not isinstance(constellation, bytes) or len(constellation) != HASH_LEN:
            raise LocalError("A block's constellation must be a 32-byte id.")
        if not (0 <= epoch <= MAX_SEQ and 0 <= round <= MAX_SEQ and 0 <= created <= MAX_SEQ):
            raise LocalError("A block's epoch, round or created time is out of range.")
        if prev is not None and (not isinstance(prev, bytes) or len(prev) != HASH_LEN):
            raise LocalError("A block's prev must be a 32-byte block id or None.")
        if any(not isinstance(p, bytes) or len(p) != HASH_LEN for p in parents_t):
            raise LocalError("A block's parents must be 32-byte block ids.")
        if any(r.constellation != constellation for r in records_t):
            raise LocalError("A block cannot carry a record of another constellation.")
        if len({r.id for r in records_t}) != len(records_t):
            raise LocalError("A block cannot carry the same record twice.")
        payload_map = _block_payload(constellation, epoch, identity.member, round, prev, parents_t, records_t, created)
        payload = cbor.encode(payload_map)
        sig = identity.sign(BLOCK_DOMAIN + payload)
        raw = cbor.encode({**payload_map, "sig": sig})
        if len(raw) > MAX_BLOCK_SIZE:
            raise LocalError("The block is over the size limit; propose fewer records at once.")
        return cls(
            constellation, epoch, identity.member, round, prev, parents_t, records_t, created, sig,
            blake2b256(payload), raw,
        )

    def encode(self) -> bytes:
        return self.raw


def _block_payload(
    constellation: bytes,
    epoch: int,
    author: MemberId,
    round: int,
    prev: bytes | None,
    parents: tuple[bytes, ...],
    records: tuple[Record, ...],
    created: int,
) -> dict[str, Any]:
    return {
        "c": constellation,
        "epoch": epoch,
        "author": author.key,
        "round": round,
        "prev": prev,
        "parents": list(parents),
        "records": [r.raw for r in records],
        "created": created,
    }


def decode_block(
    data: bytes,
    *,
    verify: bool = True,
    record_verifier: Callable[[bytes], Record] | None = None,
    batch_verifier: BatchVerifier | None = None,
) -> Block:
    """Decode a block and every record in it; verify all signatures by default.

    `record_verifier` lets a caller that already verified a record (by id)
    skip doing it twice. Otherwise the block's and its records' signatures are
    checked as one batch, by `batch_verifier` if given.
    """
    if record_verifier is not None:
        return _decode_block_into(data, [], verify, record_verifier)
    got = decode_blocks_unverified([data])
    if not verify:
        got.checks.clear()
    return got.finish((batch_verifier or first_invalid)(got.checks))[0]


def decode_blocks(raws: Iterable[bytes], *, batch_verifier: BatchVerifier | None = None) -> list[Block]:
    """`decode_block` of each of `raws`, with every signature of all of them checked as one
    batch: the same blocks, or the same first error a loop would meet."""
    got = decode_blocks_unverified(raws)
    return got.finish((batch_verifier or first_invalid)(got.checks))


def decode_blocks_unverified(raws: Iterable[bytes]) -> Unverified[Block]:
    """Decode blocks and their records without checking signatures; see `Unverified`."""
    checks: list[SignatureCheck] = []
    blocks: list[Block] = []
    try:
        for raw in raws:
            blocks.append(_decode_block_into(raw, checks, False, None))
    except ValuemeshError as exc:
        return Unverified(blocks, checks, exc)
    return Unverified(blocks, checks)


def _decode_block_into(
    data: bytes, checks: list[SignatureCheck], verify_now: bool,
    record_verifier: Callable[[bytes], Record] | None,
) -> Block:
    """Decode one block, appending its signature check, then its records' ones, to `checks`
    (the block's is checked at once instead when `verify_now`)."""
    _need(isinstance(data, (bytes, bytearray, memoryview)), "A block must be given as bytes.")
    _need(len(data) <= MAX_BLOCK_SIZE, "A block is over the size limit.")
    data = bytes(data)
    _need(len(data) > 0 and data[0] >> 5 == 5, "A block must be a map.")
    m, payload = cbor.decode_map_without(data, "sig", max_size=MAX_BLOCK_SIZE)
    _need(isinstance(m, dict), "A block must be a map.")
    assert isinstance(m, dict)
    _need(m.keys() == _BLOCK_KEYS, "A block has missing or unknown fields.")
    cid = _hash(m["c"], "A block's constellation")
    epoch = _uint(m["epoch"], "A block's epoch")
    author = _member(m["author"], "A block's author")
    rnd = _uint(m["round"], "A block's round")
    prev = m["prev"]
    if prev is not None:
        prev = _hash(prev, "A block's prev")
    parents = m["parents"]
    _need(isinstance(parents, list) and len(parents) <= MAX_PARENTS, "A block's parents must be a short list.")
    parents_t = tuple(_hash(p, "A block parent") for p in parents)
    _need(all(parents_t[i] < parents_t[i + 1] for i in range(len(parents_t) - 1)),
          "A block's parents must be sorted and distinct.")
    recs = m["records"]
    _need(isinstance(recs, list) and len(recs) <= MAX_RECORDS_PER_BLOCK, "A block has too many records.")
    created = _uint(m["created"], "A block's created time")
    sig = m["sig"]
    _need(isinstance(sig, bytes) and len(sig) == 64, "A block signature must be 64 bytes.")
    if verify_now:
        author.verify(BLOCK_DOMAIN + payload, sig)
    else:
        checks.append((author, BLOCK_DOMAIN + payload, sig))
    records: list[Record] = []
    seen: set[bytes] = set()
    if record_verifier is not None:
        for r in recs:
            _need(isinstance(r, bytes), "A block's records must be encoded records.")
            rec = record_verifier(r)
            _check_block_record(rec, cid, seen)
            records.append(rec)
    else:
        records = _decode_all_into(recs, checks, lambda rec: _check_block_record(rec, cid, seen),
                                   "A block's records must be encoded records.")
    return Block(cid, epoch, author, rnd, prev, parents_t, tuple(records), created, sig,
                 blake2b256(payload), bytes(data))


def _check_block_record(rec: Record, cid: bytes, seen: set[bytes]) -> None:
    if rec.constellation != cid:
        raise ValidationError("A block carries a record of another constellation.")
    if rec.id in seen:
        raise ValidationError("A block carries the same record twice.")
    seen.add(rec.id)


@dataclass(frozen=True, slots=True)
class EquivocationProof:
    """Two different signed objects by one author in one slot: portable evidence.

    `kind` is "record" (same constellation, author and seq) or "block" (same
    constellation, epoch, author and round). Anyone can check it with `verify`.
    """

    kind: str
    first: bytes
    second: bytes

    @property
    def author(self) -> MemberId:
        first: Record | Block = self._decode()[0]
        return first.author

    def _decode(self, verify: bool = True) -> tuple[Any, Any]:
        if self.kind == "record":
            return decode_record(self.first, verify=verify), decode_record(self.second, verify=verify)
        if self.kind == "block":
            return decode_block(self.first, verify=verify), decode_block(self.second, verify=verify)
        raise DecodeError("An equivocation proof has an unknown kind.")

    def slot(self) -> tuple[bytes, MemberId]:
        """The (constellation, author) the proof claims, read without checking any signature
        (a node refuses a proof about a stranger or another constellation before that work)."""
        a, b = self._decode(verify=False)
        if a.author != b.author or a.constellation != b.constellation:
            raise ValidationError("An equivocation proof mixes authors or constellations.")
        return a.constellation, a.author

    def verify(self) -> MemberId:
        """Check the proof; return the equivocating member or raise ValidationError."""
        a, b = self._decode()
        if a.id == b.id:
            raise ValidationError("An equivocation proof names the same object twice.")
        if a.author != b.author or a.constellation != b.constellation:
            raise ValidationError("An equivocation proof mixes authors or constellations.")
        if self.kind == "record" and a.seq != b.seq:
            raise ValidationError("An equivocation proof's records have different seq numbers.")
        if self.kind == "block" and (a.round != b.round or a.epoch != b.epoch):
            raise ValidationError("An equivocation proof's blocks are in different rounds.")
        return a.author  # type: ignore[no-any-return]

    def encode(self) -> bytes:
        a, b = sorted([self.first, self.second])
        return cbor.encode({"kind": self.kind, "a": a, "b": b})

    @classmethod
    def decode(cls, data: bytes, *, verify: bool = True) -> EquivocationProof:
        """Decode a proof and (by default) `verify` it."""
        m = cbor.decode(data, max_size=2 * MAX_BLOCK_SIZE + 64)
        _need(isinstance(m, dict) and m.keys() == {"kind", "a", "b"}, "An equivocation proof is malformed.")
        _need(isinstance(m["a"], bytes) and isinstance(m["b"], bytes), "An equivocation proof is malformed.")
        _need(m["kind"] in ("record", "block"), "An equivocation proof has an unknown kind.")
        proof = cls(m["kind"], m["a"], m["b"])
        if verify:
            proof.verify()
        return proof


def check_equivocation(a: Record | Block, b: Record | Block) -> EquivocationProof | None:
    """Return a proof if `a` and `b` are distinct objects in the same author slot."""
    if isinstance(a, Record) and isinstance(b, Record):
        same = (a.constellation, a.author, a.seq) == (b.constellation, b.author, b.seq)
        return EquivocationProof("record", a.raw, b.raw) if same and a.id != b.id else None
    if isinstance(a, Block) and isinstance(b, Block):
        same = (a.constellation, a.epoch, a.author, a.round) == (b.constellation, b.epoch, b.author, b.round)
        return EquivocationProof("block", a.raw, b.raw) if same and a.id != b.id else None
    return None


def hex_id(h: bytes) -> str:
    return h.hex()


__all__ = [
    "ID_PREFIX",
    "Block",
    "EquivocationProof",
    "Record",
    "SignatureError",
    "Unverified",
    "blake2b256",
    "check_equivocation",
    "constellation_text",
    "decode_block",
    "decode_blocks",
    "decode_blocks_unverified",
    "decode_record",
    "decode_record_reference",
    "decode_records",
    "decode_records_unverified",
    "parse_constellation",
]
