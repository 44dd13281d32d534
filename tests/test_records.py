"""Tests of signed records and blocks: encoding, ids, signatures, strict
decoding, equivocation proofs and constellation ids.

Property tests: any single changed byte of a signed record or block is
rejected; random bytes raise only DecodeError; the record fast path and the
general path accept and refuse exactly the same inputs.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from valuemesh.protocol import cbor
from valuemesh.protocol.errors import DecodeError, LocalError, SignatureError, ValidationError
from valuemesh.protocol.identity import Identity
from valuemesh.protocol.records import (
    BLOCK_DOMAIN,
    MAX_RECORD_SIZE,
    RECORD_DOMAIN,
    Block,
    EquivocationProof,
    Record,
    _record_from_map,
    blake2b256,
    check_equivocation,
    constellation_text,
    decode_block,
    decode_record,
    parse_constellation,
)

ALICE = Identity(hashlib.blake2b(b"alice", digest_size=32).digest())
BOB = Identity(hashlib.blake2b(b"bob", digest_size=32).digest())
CID = hashlib.blake2b(b"constellation", digest_size=32).digest()
OTHER_CID = hashlib.blake2b(b"other", digest_size=32).digest()
BODY = {"op": "record", "action": "work", "quantity": "3.5", "unit": "hour", "note": "design"}


def rec(who: Identity = ALICE, seq: int = 0, body: dict[str, object] | None = None,
        cid: bytes = CID, type: str = "contribution", created: int = 1_700_000_000_000) -> Record:
    return Record.create(who, type=type, v=1, constellation=cid, seq=seq,
                         body=BODY if body is None else body, created=created)


def general_path(data: bytes) -> Record:
    m, payload = cbor.decode_map_without(data, "sig", max_size=MAX_RECORD_SIZE)
    return _record_from_map(m, data, True, payload)


def test_record_round_trip_and_id() -> None:
    r = rec()
    back = decode_record(r.raw)
    assert back == r and back.id == r.id and back.raw == r.raw
    payload = cbor.encode(r.payload_map())
    assert r.id == blake2b256(payload)
    ALICE.member.verify(RECORD_DOMAIN + payload, r.sig)
    assert cbor.decode(r.raw) == {**r.payload_map(), "sig": r.sig}
    assert r.ref == (ALICE.member.key, 0)
    assert r.encode() == r.raw
    assert general_path(r.raw) == back


def test_id_depends_on_content_not_on_signature() -> None:
    a, b = rec(seq=1), rec(seq=1)
    assert a.id == b.id  # Ed25519 is deterministic; the id covers the payload only
    assert rec(seq=2).id != a.id
    # Re-signing the same payload with another signature would not change the id;
    # the id is the hash of the payload, which excludes sig.
    assert a.id == blake2b256(cbor.encode(a.payload_map()))


def test_created_record_body_is_in_decoded_form() -> None:
    r = rec(body={"op": "x", "list": (1, 2), "b": bytearray(b"ab")})
    assert r.body == {"op": "x", "list": [1, 2], "b": b"ab"}
    assert type(r.body["list"]) is list and type(r.body["b"]) is bytes
    assert decode_record(r.raw).body == r.body


def test_record_create_refuses_what_decode_would_refuse() -> None:
    with pytest.raises(LocalError):
        rec(type="")
    with pytest.raises(LocalError):
        rec(type="x" * 65)
    with pytest.raises(LocalError):
        rec(seq=-1)
    with pytest.raises(LocalError):
        rec(seq=1 << 53)
    with pytest.raises(LocalError):
        rec(cid=b"short")
    with pytest.raises(LocalError):
        rec(created=-5)
    with pytest.raises(LocalError):
        Record.create(ALICE, type="t", v=1 << 17, constellation=CID, seq=0, body={}, created=0)
    with pytest.raises(LocalError, match="over the limit"):
        rec(body={"op": "x", "blob": b"x" * MAX_RECORD_SIZE})
    with pytest.raises(LocalError):
        rec(body={"op": "x", "f": 1.5})


def test_records_of_every_size_class_round_trip() -> None:
    # Heads of 1, 2, 3, 5 and 9 bytes for seq and created; long type names take the general path.
    for seq, created, type_ in [(0, 0, "t"), (23, 24, "t" * 23), (255, 256, "t" * 24),
                                (65535, 65536, "t" * 64), (2**32, (1 << 53) - 1, "membership")]:
        r = rec(seq=seq, created=created, type=type_)
        assert decode_record(r.raw) == r


def _remap(r: Record, **changes: object) -> bytes:
    m = cbor.decode(r.raw)
    m.update(changes)
    return cbor.encode({k: v for k, v in m.items() if v is not _DROP})


_DROP = object()


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"extra": 1}, DecodeError),
        ({"body": _DROP}, DecodeError),
        ({"sig": _DROP}, DecodeError),
        ({"type": 5}, DecodeError),
        ({"type": ""}, DecodeError),
        ({"type": "x" * 65}, DecodeError),
        ({"v": -1}, DecodeError),
        ({"v": 1 << 17}, DecodeError),
        ({"v": True}, DecodeError),
        ({"c": b"\x00" * 31}, DecodeError),
        ({"author": b"\x00" * 33}, DecodeError),
        ({"author": BOB.member.key}, SignatureError),
        ({"seq": -1}, DecodeError),
        ({"seq": 1 << 53}, DecodeError),
        ({"seq": 1}, SignatureError),
        ({"seq": "0"}, DecodeError),
        ({"body": [1]}, DecodeError),
        ({"body": {**BODY, "note": "other"}}, SignatureError),
        ({"created": -1}, DecodeError),
        ({"sig": b"\x00" * 63}, DecodeError),
        ({"sig": b"\x00" * 64}, SignatureError),
    ],
)
def test_malformed_records_are_rejected(changes: dict[str, object], error: type[Exception]) -> None:
    data = _remap(rec(), **changes)
    with pytest.raises(error):
        decode_record(data)
    with pytest.raises(error):
        general_path(data)


def test_non_canonical_record_encodings_are_rejected() -> None:
    r = rec(seq=5)
    raw = r.raw
    i = raw.index(b"\x63seq\x05")
    long_form = raw[: i + 4] + b"\x18\x05" + raw[i + 5 :]
    with pytest.raises(DecodeError, match="canonical"):
        decode_record(long_form)
    with pytest.raises(DecodeError):
        decode_record(raw + b"\x00")
    with pytest.raises(DecodeError):
        decode_record(raw[:-1])
    with pytest.raises(DecodeError):
        decode_record(b"\x80")
    with pytest.raises(DecodeError):
        decode_record("text")  # type: ignore[arg-type]
    with pytest.raises(DecodeError, match="over the limit"):
        decode_record(b"\xa0" * (MAX_RECORD_SIZE + 1))


def test_verify_false_skips_only_the_signature() -> None:
    data = _remap(rec(), sig=b"\x00" * 64)
    assert decode_record(data, verify=False).sig == b"\x00" * 64
    with pytest.raises(DecodeError):
        decode_record(_remap(rec(), sig=b"\x00"), verify=False)


def _flip_outcome(fn, data: bytes):  # type: ignore[no-untyped-def]
    try:
        return ("ok", fn(data))
    except (DecodeError, SignatureError, ValidationError) as exc:
        return ("error", type(exc))


def test_every_single_bit_flip_of_a_record_is_rejected() -> None:
    raw = rec(body={**BODY, "period": {"start": 1, "end": 2}}).raw
    for pos in range(len(raw)):
        for mask in (0x01, 0x20, 0x80):
            bad = bytearray(raw)
            bad[pos] ^= mask
            with pytest.raises((DecodeError, SignatureError)):
                decode_record(bytes(bad))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_changed_byte_is_rejected_by_fast_and_general_path_alike(data: st.DataObject) -> None:
    raw = rec(seq=data.draw(st.integers(0, 2**40)), created=data.draw(st.integers(0, 2**53 - 1))).raw
    pos = data.draw(st.integers(0, len(raw) - 1))
    bad = bytearray(raw)
    bad[pos] ^= data.draw(st.integers(1, 255))
    fast = _flip_outcome(decode_record, bytes(bad))
    assert fast[0] == "error"
    assert fast == _flip_outcome(general_path, bytes(bad))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_truncations_and_insertions_are_rejected(data: st.DataObject) -> None:
    raw = rec().raw
    pos = data.draw(st.integers(0, len(raw)))
    if data.draw(st.booleans()):
        bad = raw[:pos] + data.draw(st.binary(min_size=1, max_size=4)) + raw[pos:]
    else:
        pos = min(pos, len(raw) - 1)
        bad = raw[:pos] + raw[pos + data.draw(st.integers(1, 4)) :]
    with pytest.raises((DecodeError, SignatureError)):
        decode_record(bad)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_record(data)
    with pytest.raises(DecodeError):
        decode_block(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_after_a_record_frame_raise_only_decode_error(tail: bytes) -> None:
    # Random bytes that start like a record reach the fast path's deeper branches.
    raw = rec().raw
    for cut in (37, 45, 120):
        with pytest.raises((DecodeError, SignatureError)):
            decode_record(raw[:cut] + tail)


# -- blocks ------------------------------------------------------------------------


def block(records: list[Record] | None = None, parents: list[bytes] | None = None) -> Block:
    records = [rec(seq=0), rec(BOB, seq=0), rec(seq=1)] if records is None else records
    parents = [blake2b256(b"p1"), blake2b256(b"p0")] if parents is None else parents
    return Block.create(ALICE, constellation=CID, epoch=0, round=3, prev=blake2b256(b"prev"),
                        parents=parents, records=records, created=1_700_000_000_500)


def test_block_round_trip() -> None:
    b = block()
    back = decode_block(b.raw)
    assert back == b and back.id == b.id
    assert list(back.parents) == sorted(back.parents)
    assert [r.id for r in back.records] == [r.id for r in b.records]
    m = cbor.decode(b.raw)
    payload = cbor.encode({k: v for k, v in m.items() if k != "sig"})
    assert b.id == blake2b256(payload)
    ALICE.member.verify(BLOCK_DOMAIN + payload, b.sig)
    genesis_like = Block.create(ALICE, constellation=CID, epoch=0, round=0, prev=None, parents=[],
                                records=[], created=0)
    assert decode_block(genesis_like.raw) == genesis_like


def test_block_record_verifier_is_used() -> None:
    b = block()
    seen: list[bytes] = []

    def verifier(raw: bytes) -> Record:
        seen.append(raw)
        return decode_record(raw, verify=False)

    decode_block(b.raw, record_verifier=verifier)
    assert seen == [r.raw for r in b.records]


def test_block_create_refuses_what_decode_would_refuse() -> None:
    with pytest.raises(LocalError):
        block(records=[rec(cid=OTHER_CID)])
    with pytest.raises(LocalError):
        block(records=[rec(), rec()])
    with pytest.raises(LocalError):
        block(parents=[b"short"])
    with pytest.raises(LocalError):
        Block.create(ALICE, constellation=CID, epoch=-1, round=0, prev=None, parents=[], records=[],
                     created=0)
    with pytest.raises(LocalError):
        Block.create(ALICE, constellation=CID, epoch=0, round=0, prev=b"x", parents=[], records=[],
                     created=0)


def _reblock(b: Block, sign: bool = True, **changes: object) -> bytes:
    m = cbor.decode(b.raw)
    m.update(changes)
    m.pop("sig")
    payload = cbor.encode(m)
    sig = ALICE.sign(BLOCK_DOMAIN + payload) if sign else b.sig
    return cbor.encode({**m, "sig": sig})


def test_malformed_blocks_are_rejected() -> None:
    b = block()
    p = sorted(b.parents)
    with pytest.raises(DecodeError, match="sorted"):
        decode_block(_reblock(b, parents=list(reversed(p))))
    with pytest.raises(DecodeError, match="sorted"):
        decode_block(_reblock(b, parents=[p[0], p[0]]))
    with pytest.raises(ValidationError, match="another constellation"):
        decode_block(_reblock(b, records=[rec(cid=OTHER_CID).raw]))
    with pytest.raises(ValidationError, match="twice"):
        decode_block(_reblock(b, records=[rec().raw, rec().raw]))
    with pytest.raises(DecodeError):
        decode_block(_reblock(b, records=[b"\xa0"]))
    with pytest.raises(DecodeError):
        decode_block(_reblock(b, records=["text"]))
    with pytest.raises(DecodeError):
        decode_block(_reblock(b, prev=b"\x00"))
    with pytest.raises(DecodeError):
        decode_block(_reblock(b, parents=[b"\x00" * 32] * 513))
    with pytest.raises(SignatureError):
        decode_block(_reblock(b, sign=False, round=4))
    bad_record = bytearray(b.records[0].raw)
    bad_record[-1] ^= 1
    with pytest.raises(SignatureError):
        decode_block(_reblock(b, records=[bytes(bad_record)]))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_changed_byte_of_a_block_is_rejected(data: st.DataObject) -> None:
    raw = block().raw
    pos = data.draw(st.integers(0, len(raw) - 1))
    bad = bytearray(raw)
    bad[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises((DecodeError, SignatureError, ValidationError)):
        decode_block(bytes(bad))


# -- equivocation -----------------------------------------------------------------


def test_record_equivocation_proof() -> None:
    a = rec(seq=4)
    b = rec(seq=4, body={**BODY, "quantity": "99"})
    proof = check_equivocation(a, b)
    assert proof is not None and proof.kind == "record"
    assert proof.verify() == ALICE.member
    assert proof.author == ALICE.member
    again = EquivocationProof.decode(proof.encode())
    assert again.verify() == ALICE.member
    assert check_equivocation(b, a) is not None
    assert EquivocationProof.decode(check_equivocation(b, a).encode()).encode() == proof.encode()  # type: ignore[union-attr]
    assert check_equivocation(a, a) is None
    assert check_equivocation(a, rec(seq=5)) is None
    assert check_equivocation(a, rec(BOB, seq=4)) is None
    assert check_equivocation(a, rec(seq=4, cid=OTHER_CID)) is None


def test_block_equivocation_proof() -> None:
    a = block()
    b = block(records=[rec(seq=0)])
    proof = check_equivocation(a, b)
    assert proof is not None and proof.kind == "block"
    assert EquivocationProof.decode(proof.encode()).verify() == ALICE.member
    assert check_equivocation(a, rec()) is None


@pytest.mark.parametrize(
    ("first", "second", "kind"),
    [
        (lambda: rec(seq=1), lambda: rec(seq=1), "record"),
        (lambda: rec(seq=1), lambda: rec(seq=2), "record"),
        (lambda: rec(seq=1), lambda: rec(BOB, seq=1), "record"),
        (lambda: rec(seq=1), lambda: rec(seq=1, cid=OTHER_CID), "record"),
    ],
)
def test_false_equivocation_proofs_are_refused(first, second, kind: str) -> None:  # type: ignore[no-untyped-def]
    proof = EquivocationProof(kind, first().raw, second().raw)
    with pytest.raises(ValidationError):
        proof.verify()
    with pytest.raises(ValidationError):
        EquivocationProof.decode(proof.encode())


def test_malformed_equivocation_proofs_are_refused() -> None:
    r = rec().raw
    for data in [cbor.encode({"kind": "x", "a": r, "b": r}), cbor.encode({"kind": "record", "a": r}),
                 cbor.encode({"kind": "record", "a": 1, "b": r}), b"\x00"]:
        with pytest.raises(DecodeError):
            EquivocationProof.decode(data)
    with pytest.raises(DecodeError):
        EquivocationProof("block", r, r).verify()


# -- constellation ids -------------------------------------------------------------


def test_constellation_text_round_trip_and_typos() -> None:
    text = constellation_text(CID)
    assert text.startswith("vc1") and len(text) == 61
    assert parse_constellation(text.upper()) == CID
    for i in (3, 20, 40, 60):
        c = "a" if text[i] != "a" else "b"
        with pytest.raises(LocalError, match="mistyped"):
            parse_constellation(text[:i] + c + text[i + 1 :])
    for bad in ("vc2" + text[3:], text[:-1], "vc1" + "1" * 58, ""):
        with pytest.raises(LocalError):
            parse_constellation(bad)
